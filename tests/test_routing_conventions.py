"""RoutedOptimizer follows torch.optim's conventions: add_param_group, deepcopy and pickle,
step hooks once per step, momentum-cycling schedulers."""
import copy
import io
import pickle

import pytest
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch import nn

import asgo
from test_routing import SMALL_SETTINGS, TinyGPT, loss_of

NAMES = ["asgo", "dasgo", "adamw", "adafactor", "shampoo", "muon", "galore", "golore"]


def train(model, opt, seeds, sched=None):
    for s in seeds:
        opt.zero_grad()
        loss_of(model, s % 4).backward()
        opt.step()
        if sched is not None:
            sched.step()


def make_frozen():
    """A TinyGPT with its second block frozen, routed to ASGO (matrices) and AdamW (the rest)."""
    torch.manual_seed(0)
    model = TinyGPT()
    model.blocks[1].requires_grad_(False)
    opt = asgo.build_optimizer(model, "asgo", lr=0.02, precondition_frequency=2, beta2=0.9,
                               adamw={"lr": 3e-3})
    return model, opt


def unfreeze(model, opt):
    model.blocks[1].requires_grad_(True)
    opt.add_param_group({"params": list(model.blocks[1].named_parameters(prefix="blocks.1"))})


def test_unfreezing_a_layer_routes_fills_settings_and_steps_like_fresh_optimizers():
    model, opt = make_frozen()
    train(model, opt, range(2))
    unfreeze(model, opt)
    matrices = [p for p in model.blocks[1].parameters() if p.ndim == 2]
    vectors = [p for p in model.blocks[1].parameters() if p.ndim < 2]
    new_matrix, new_vector = opt.param_groups[-2:]
    assert new_matrix["algorithm"] == "asgo" and new_matrix["params"] == matrices
    assert (new_matrix["lr"], new_matrix["precondition_frequency"], new_matrix["beta2"]) == (0.02, 2, 0.9)
    assert new_vector["algorithm"] == "adamw" and new_vector["params"] == vectors
    assert (new_vector["lr"], new_vector["betas"], new_vector["weight_decay"]) == (3e-3, (0.9, 0.95), 0.0)
    assert opt.optimizers["asgo"].param_groups[-1] is new_matrix
    assert opt.optimizers["adamw"].param_groups[-1] is new_vector
    by_name = {r.name: r for r in opt.routes}
    assert (by_name["blocks.1.attn.q_proj.weight"].algorithm, by_name["blocks.1.attn.q_proj.weight"].role) \
        == ("asgo", "matrix")
    assert by_name["blocks.1.ln_1.bias"].algorithm == "adamw"
    assert "blocks.1.mlp.2.weight" in opt.report()

    # the added parameters move exactly as fresh ASGO / AdamW with the same settings move them
    ref_matrices = [nn.Parameter(p.detach().clone()) for p in matrices]
    ref_vectors = [nn.Parameter(p.detach().clone()) for p in vectors]
    ref_asgo = asgo.ASGO(ref_matrices, lr=0.02, precondition_frequency=2, beta2=0.9)
    ref_adamw = torch.optim.AdamW(ref_vectors, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for s in range(2, 5):
        opt.zero_grad()
        loss_of(model, s).backward()
        for ref, p in zip(ref_matrices + ref_vectors, matrices + vectors):
            ref.grad = p.grad.clone()
        opt.step()
        ref_asgo.step()
        ref_adamw.step()
    for ref, p in zip(ref_matrices + ref_vectors, matrices + vectors):
        torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-9)
    initial = make_frozen()[0].blocks[1]
    assert all(not torch.equal(p, q) for p, q in zip(matrices + vectors,
                                                       [*(q for q in initial.parameters() if q.ndim == 2),
                                                        *(q for q in initial.parameters() if q.ndim < 2)]))


def test_unfrozen_run_resumes_exactly_and_survives_deepcopy():
    model_a, opt_a = make_frozen()
    train(model_a, opt_a, range(2))
    unfreeze(model_a, opt_a)
    train(model_a, opt_a, range(2, 4))
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_c, opt_c = make_frozen()
    unfreeze(model_c, opt_c)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    model_d, opt_d = copy.deepcopy((model_a, opt_a))
    for model, opt in ((model_a, opt_a), (model_c, opt_c), (model_d, opt_d)):
        train(model, opt, range(4, 7))
    for a, c, d in zip(model_a.parameters(), model_c.parameters(), model_d.parameters()):
        assert torch.equal(a, c) and torch.equal(a, d)


def test_add_param_group_creates_a_missing_optimizer_and_infers_from_an_adamw_router():
    torch.manual_seed(0)
    model = TinyGPT()
    opt = asgo.build_optimizer(model, "asgo", lr=0.02)
    extra = nn.Parameter(torch.randn(8, 32) * 0.1)
    opt.add_param_group({"params": [extra], "algorithm": "muon", "lr": 0.05})
    assert set(opt.optimizers) == {"asgo", "adamw", "muon"}
    group = opt.param_groups[-1]
    assert (group["algorithm"], group["lr"], group["momentum"]) == ("muon", 0.05, 0.95)
    assert opt.routes[-1].name == f"param_groups[{len(opt.param_groups) - 1}][0]"
    before = extra.detach().clone()
    extra.grad = torch.randn(8, 32) * 1e-3
    opt.step()
    ref = nn.Parameter(before.clone())
    ref.grad = extra.grad.clone()
    asgo.Muon([ref], lr=0.05).step()
    assert not torch.equal(extra, before)
    torch.testing.assert_close(extra, ref, rtol=0, atol=0)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert opt.optimizers["muon"].param_groups[0] is opt.param_groups[-1]
    extra.grad = torch.full_like(extra, float("nan"))
    opt.step()  # counted once, by Muon alone, though ASGO's state is the same dict
    assert opt.diagnostics() == {"skipped_steps": 1, "root_failures": 0}

    model = TinyGPT()
    everywhere = asgo.build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    w, b = nn.Parameter(torch.randn(8, 32)), nn.Parameter(torch.zeros(8))
    everywhere.add_param_group({"params": [w, b]})
    assert [(g["algorithm"], g["weight_decay"], g["params"]) for g in everywhere.param_groups[-2:]] \
        == [("adamw", 0.1, [w]), ("adamw", 0.0, [b])]
    c = nn.Parameter(torch.zeros(4))
    everywhere.add_param_group({"params": [c], "algorithm": "adamw", "momentum": 0.8})
    assert everywhere.param_groups[-1]["betas"] == (0.8, 0.999)


def test_add_param_group_errors_name_the_problem_and_change_nothing():
    model = TinyGPT()
    opt = asgo.build_optimizer(model, "asgo")
    count = len(opt.param_groups)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [model.blocks[0].attn.q_proj.weight]})
    with pytest.raises(ValueError, match=r"invalid algorithm 'sgdx'.*valid"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3, 3))], "algorithm": "sgdx"})
    with pytest.raises(ValueError, match=r"ASGO takes no hyper-parameter \['betas'\]"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3, 3))], "betas": (0.9, 0.99)})
    with pytest.raises(ValueError, match=r"ASGO preconditions matrices; parameter \d+ of shape \(3,\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], "algorithm": "asgo"})
    with pytest.raises(ValueError, match="invalid lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3, 3))], "lr": -1.0})
    assert len(opt.param_groups) == count and len(opt.routes) == len(list(model.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_pickle_step_like_the_original(name):
    torch.manual_seed(0)
    model = TinyGPT()
    opt = asgo.build_optimizer(model, name, lr=1e-2, **SMALL_SETTINGS.get(name, {}))
    train(model, opt, range(2))
    twins = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    for m, o in [(model, opt), *twins]:
        assert all(o.optimizers[g["algorithm"]].param_groups.count(g) for g in o.param_groups)
        train(m, o, range(2, 5))
    for m, o in twins:
        for a, b in zip(model.parameters(), m.parameters()):
            assert torch.equal(a, b)
        assert o.report() == opt.report()


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["asgo", "adamw"])
def test_a_process_group_refuses_copying_and_its_state_dict_round_trips(name, one_process_group):
    model = TinyGPT()
    opt = asgo.build_optimizer(model, name, process_group=one_process_group)
    for copy_it in (copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match=r"process_group cannot be copied or pickled; save its"):
            copy_it(opt)
    train(model, opt, range(2))
    extra = nn.Parameter(torch.randn(8, 32) * 0.1)
    opt.add_param_group({"params": [extra], "algorithm": "dasgo"})
    assert opt.optimizers["dasgo"].process_group is one_process_group
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)
    train(model, opt, range(2, 3))
    assert opt.diagnostics()["skipped_steps"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_fire_once_per_step(name):
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o)))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("post", type(o)))),
    ]
    try:
        model = TinyGPT()
        opt = asgo.build_optimizer(model, name, **SMALL_SETTINGS.get(name, {}))
        opt.report()
        assert calls == []  # building (state creation) and the report's dry run step nothing
        handles += [opt.register_step_pre_hook(lambda o, a, k: calls.append(("own pre", type(o)))),
                    opt.register_step_post_hook(lambda o, a, k: calls.append(("own post", type(o))))]
        train(model, opt, range(2))
    finally:
        for h in handles:
            h.remove()
    routed = asgo.RoutedOptimizer
    assert calls == 2 * [("pre", routed), ("own pre", routed), ("own post", routed), ("post", routed)]


def one_cycle(opt, cycle_momentum=True):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=6, pct_start=0.5,
                                               cycle_momentum=cycle_momentum)


def cyclic(opt, cycle_momentum=True):
    return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=2e-3, max_lr=2e-2, step_size_up=2,
                                             cycle_momentum=cycle_momentum)


@pytest.mark.parametrize("scheduler", [one_cycle, cyclic])
@pytest.mark.parametrize("name", NAMES)
def test_momentum_cycling_schedulers_drive_each_inner_first_moment(name, scheduler):
    """The scheduler's momentum is the value each inner optimizer uses: the run equals one that
    sets AdamW's betas[0] (GaLore's too) or the method's momentum by hand to the schedule torch
    computes for SGD, and differs from the run without momentum cycling."""
    def make():
        torch.manual_seed(0)
        model = TinyGPT()
        return model, asgo.build_optimizer(model, name, **SMALL_SETTINGS.get(name, {}))

    steps = 5
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-2, momentum=0.9)
    probe_sched = scheduler(probe)
    schedule = []
    for _ in range(steps):
        schedule.append((probe.param_groups[0]["lr"], probe.param_groups[0]["momentum"]))
        probe.step()
        probe_sched.step()
    assert len({m for _, m in schedule}) > 2  # the momentum does cycle

    model_a, opt_a = make()
    train(model_a, opt_a, range(steps), scheduler(opt_a))
    model_b, opt_b = make()
    for s, (lr, momentum) in enumerate(schedule):
        for g in opt_b.param_groups:
            g["lr"] = lr
            if g["algorithm"] == "adamw" or g["algorithm"] in ("galore", "golore"):
                g["betas"] = (momentum, g["betas"][1])
            else:
                g["momentum"] = momentum
        train(model_b, opt_b, [s])
    model_c, opt_c = make()
    train(model_c, opt_c, range(steps), scheduler(opt_c, cycle_momentum=False))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    for g in opt_b.param_groups:  # set by hand, betas[0] shows as the group's momentum
        assert g["momentum"] == schedule[-1][1]
    by_algorithm = {}
    for g in opt_a.param_groups:
        by_algorithm.setdefault(g["algorithm"], []).extend(g["params"])
    params_c = dict(zip(model_a.parameters(), model_c.parameters()))
    for algorithm, params in by_algorithm.items():  # the momentum mattered to every algorithm
        assert any(not torch.allclose(p, params_c[p], rtol=1e-6, atol=0) for p in params), algorithm


def test_max_bucket_bytes_reaches_every_matrix_optimizer_and_survives_copies():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    opt = asgo.build_optimizer(model, "muon", max_bucket_bytes=1)
    assert opt.optimizers["muon"].max_bucket_bytes == 1
    assert not hasattr(opt.optimizers["adamw"], "max_bucket_bytes")
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], "algorithm": "asgo"})
    assert opt.optimizers["asgo"].max_bucket_bytes == 1
    assert copy.deepcopy(opt).optimizers["asgo"].max_bucket_bytes == 1
    with pytest.raises(ValueError, match="max_bucket_bytes"):
        asgo.build_optimizer(model, "muon", max_bucket_bytes=0)


@pytest.mark.parametrize("name", ["asgo", "shampoo", "muon"])
def test_a_routed_checkpoint_from_before_the_later_hyperparameters_resumes(name):
    """A state_dict written before ``transposed``/``compat``/... existed keeps this optimizer's
    values and continues exactly as the full state_dict does."""
    from asgo.optim._base import LATER_HYPERPARAMETERS

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 4))
    opt = asgo.build_optimizer(model, name)
    model(torch.randn(3, 6)).square().mean().backward()
    opt.step()
    full = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(full)
    for group in old["param_groups"]:
        for key in LATER_HYPERPARAMETERS:
            group.pop(key, None)
    results = []
    for state_dict in (full, old):
        clone = copy.deepcopy(model)
        fresh = asgo.build_optimizer(clone, name)
        fresh.load_state_dict(state_dict)
        clone(torch.ones(3, 6)).square().mean().backward()
        fresh.step()
        results.append(torch.cat([p.detach().flatten() for p in clone.parameters()]))
    assert torch.equal(results[0], results[1])
    without_lr = copy.deepcopy(full)
    del next(g for g in without_lr["param_groups"] if g["algorithm"] == name)["lr"]
    with pytest.raises(ValueError, match=r"no hyper-parameter \['lr'\].*another version"):
        asgo.build_optimizer(copy.deepcopy(model), name).load_state_dict(without_lr)
