"""Behaviour every matrix optimizer must have (a shared test matrix, extended by each new one)."""

import copy
import io

import pytest
import torch
from problems import fit_with_closure, two_layer_regression

import asgo

OPTIMIZERS = {
    "asgo": lambda params, **kw: asgo.ASGO(params, **kw),
    "asgo_eigh_tau3": lambda params, **kw: asgo.ASGO(params, root_method="eigh", precondition_frequency=3, **kw),
    "asgo_newton_schulz": lambda params, **kw: asgo.ASGO(params, root_method="newton_schulz", **kw),
    "dasgo": lambda params, **kw: asgo.DASGO(params, **kw),
    "shampoo": lambda params, **kw: asgo.Shampoo(params, **kw),
    "shampoo_eigh_tau2_blocked": lambda params, **kw: asgo.Shampoo(
        params, root_method="eigh", precondition_frequency=2, max_preconditioner_dim=4, **kw),
    "adafactor": lambda params, **kw: asgo.Adafactor(params, **kw),
    "adafactor_clip_momentum": lambda params, **kw: asgo.Adafactor(params, clip_alpha=2.0, beta1=0.9, **kw),
    "muon": lambda params, **kw: asgo.Muon(params, **kw),
    "muon_polar_express": lambda params, **kw: asgo.Muon(params, orthogonalize_method="polar_express",
                                                         nesterov=False, **kw),
    "galore": lambda params, **kw: asgo.GaLore(params, rank=2, update_proj_gap=3, **kw),
    "galore_sgd": lambda params, **kw: asgo.GaLore(params, rank=3, update_proj_gap=2, inner="sgd",
                                                   momentum=0.9, **kw),
    "golore": lambda params, **kw: asgo.GoLore(params, rank=2, update_proj_gap=3, **kw),
}
MATRICES_ONLY = {name: make for name, make in OPTIMIZERS.items() if not name.startswith("adafactor")}

BAD_ARGUMENTS = {
    "asgo": [("lr", -1.0), ("momentum", 1.0), ("momentum", -0.1), ("beta2", 1.0), ("eps", 0.0),
             ("eps", -1e-8), ("weight_decay", -0.1), ("precondition_frequency", 0),
             ("precondition_frequency", 2.5), ("start_preconditioning_step", 0),
             ("root_method", "svd"), ("root_steps", 0), ("update_rms", 0.0), ("num_heads", 0)],
    "shampoo": [("lr", -1.0), ("momentum", 1.0), ("beta2", 1.0), ("eps", -1.0), ("weight_decay", -1.0),
                ("precondition_frequency", 0), ("root_method", "qr"), ("grafting", "sgd"),
                ("max_preconditioner_dim", 0)],
    "dasgo": [("lr", -1.0), ("momentum", 1.0), ("beta2", 1.5), ("beta2", -0.5), ("eps", 0.0),
              ("weight_decay", -1.0), ("update_rms", -0.2)],
    "muon": [("lr", -1.0), ("momentum", 1.0), ("weight_decay", -1.0), ("ns_steps", 0),
             ("adjust_lr_fn", "sqrt"), ("orthogonalize_method", "svd")],
    "galore": [("lr", -1.0), ("rank", 0), ("update_proj_gap", 0), ("scale", 0.0), ("proj_type", "up"),
               ("inner", "lion"), ("eps", 0.0), ("golore_fraction", 1.5)],
}
CLASSES = {"asgo": asgo.ASGO, "dasgo": asgo.DASGO, "shampoo": asgo.Shampoo, "muon": asgo.Muon,
           "galore": asgo.GaLore}


def params_and_grads(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 10), (10, 6), (10, 6), (8, 8), (4, 2, 3)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in shapes]
    grads = [[torch.randn(*s, generator=g).to(dtype) for s in shapes] for _ in range(8)]
    return params, grads


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


@pytest.mark.parametrize("name,arg,value", [(n, a, v) for n, bad in BAD_ARGUMENTS.items() for a, v in bad])
def test_invalid_hyperparameters_name_the_argument(name, arg, value):
    with pytest.raises(ValueError, match=arg):
        CLASSES[name]([torch.nn.Parameter(torch.zeros(4, 4))], **{arg: value})
    opt = CLASSES[name]([torch.nn.Parameter(torch.zeros(4, 4))])
    with pytest.raises(ValueError, match=arg):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))], arg: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("make", MATRICES_ONLY.values(), ids=MATRICES_ONLY.keys())
def test_refuses_vectors_and_embeddings_naming_them(make):
    matrix, bias = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(7))
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(7,\).*build_optimizer"):
        make([matrix, bias])
    emb = torch.nn.Embedding(11, 4).weight
    asgo.mark_as_embedding(emb)
    with pytest.raises(ValueError, match=r"parameter 0 of shape \(11, 4\) is an embedding"):
        make([emb])
    opt = make([matrix])
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(7,\)"):
        opt.add_param_group({"params": [bias]})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_non_finite_gradient_skips_and_keeps_state(make, bad):
    params, grads = params_and_grads()
    opt = make(params)
    for gs in grads[:3]:
        set_grads(params, gs)
        opt.step()
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict()["state"])
    poisoned = [g.clone() for g in grads[3]]
    poisoned[1][2, 3] = bad
    set_grads(params, poisoned)
    opt.step()
    assert torch.equal(params[1], before_params[1])
    after_state = opt.state_dict()["state"][1]
    for key, value in before_state[1].items():
        if key not in ("step", "skipped_steps"):
            assert torch.equal(after_state[key], value), key
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[0], before_params[0])
    assert opt.diagnostics()["skipped_steps"] == 1
    set_grads(params, grads[4])
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[1], before_params[1])


# GoLore's random bases are seeded by the parameter's index, so alone each matrix draws another one.
BATCHABLE = {name: make for name, make in OPTIMIZERS.items() if name != "golore"}


@pytest.mark.parametrize("make", BATCHABLE.values(), ids=BATCHABLE.keys())
def test_batched_equals_unbatched(make):
    """Same-shape matrices stepped together (stacked where the optimizer batches) move exactly
    as each would alone."""
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(12, 20)) for _ in range(3)]
    params.append(torch.nn.Parameter(torch.randn(20, 12)))
    singles = [torch.nn.Parameter(p.detach().clone()) for p in params]
    batched = make(params)
    alone = [make([p]) for p in singles]
    for _ in range(4):
        for p, q in zip(params, singles):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        batched.step()
        for o in alone:
            o.step()
    for p, q in zip(params, singles):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_zero_gradients_stay_finite(make):
    p = torch.nn.Parameter(torch.randn(6, 9))
    opt = make([p])
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.isfinite(p).all()
    assert opt.diagnostics() == {k: 0 for k in opt.diagnostics()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_state_dict_resume_is_exact_with_weights_only_load(make, dtype):
    params_a, grads = params_and_grads(dtype)
    opt_a = make(params_a)
    for gs in grads:
        set_grads(params_a, gs)
        opt_a.step()

    params_b, _ = params_and_grads(dtype)
    opt_b = make(params_b)
    for gs in grads[:4]:
        set_grads(params_b, gs)
        opt_b.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params_b], "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    params_c, _ = params_and_grads(dtype)
    with torch.no_grad():
        for p, v in zip(params_c, saved["params"]):
            p.copy_(v)
    opt_c = make(params_c)
    opt_c.load_state_dict(saved["opt"])
    state = opt_c.state[params_c[0]]
    assert state["skipped_steps"].dtype == torch.int64
    assert all(v.dtype == torch.float32 for k, v in state.items() if v.is_floating_point())
    for gs in grads[4:]:
        set_grads(params_c, gs)
        opt_c.step()
    for a, c in zip(params_a, params_c):
        assert torch.equal(a, c)


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_closure_param_groups_and_scheduler(make):
    model, x, y = two_layer_regression()
    opt = make([{"params": [model[0].weight]}, {"params": [model[2].weight], "lr": 3e-2}], lr=0.05)
    first, last = fit_with_closure(opt, model, x, y)
    assert last < 0.8 * first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.98**30)
    assert opt.param_groups[1]["lr"] == pytest.approx(3e-2 * 0.98**30)
