import copy
import math

import pytest
import torch
from problems import rel_err

import asgo
from asgo.optim.adafactor import Adafactor
from asgo.optim.reference import adafactor_step

SHAPES = [(6, 10), (10, 6), (7,), (2, 3, 4), ()]


def make_problem(seed=0, shapes=SHAPES, scale=0.3):
    """Initial parameters (float64) and ``grad(Xs, k)``: noise plus the parameter itself (the
    gradient of 0.5 ||X||^2 + <N_k, X>), so the trajectory feeds back into the gradients."""
    g = torch.Generator().manual_seed(seed)
    X0 = [scale * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    noise = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(12)]

    def grad(Xs, k):
        return [N + X for N, X in zip(noise[k - 1], Xs)]

    return X0, grad


def adafactor_reference(X0, grad, steps, **hp):
    """:func:`asgo.optim.reference.adafactor_step` on every parameter of ``X0`` with the
    gradients ``grad(Xs, k)``. Returns the iterates and the number of clipped updates."""
    if "beta1" in hp:  # the optimizer's former name of the first moment
        hp["momentum"] = hp.pop("beta1")
    Xs, states, iterates = [X.clone() for X in X0], [{} for _ in X0], []
    for k in range(1, steps + 1):
        Xs = [adafactor_step(X, G, s, **hp) for X, G, s in zip(Xs, grad(Xs, k), states)]
        iterates.append(Xs)
    return iterates, sum(s["clipped"] for s in states)


def run(make_opt, X0, grad, steps, dtype=torch.float64):
    """Our optimizer on parameters of ``dtype`` with float64 gradients cast to ``dtype``."""
    params = [torch.nn.Parameter(X.to(dtype).clone()) for X in X0]
    opt = make_opt(params)
    iterates = []
    for k in range(1, steps + 1):
        for p, G in zip(params, grad([p.detach().double() for p in params], k)):
            p.grad = G.to(dtype)
        opt.step()
        iterates.append([p.detach().double().clone() for p in params])
    return iterates, opt


def max_rel_err(got, ref, X0):
    """Largest relative error over steps and parameters, of the iterate and of X_k - X_0."""
    worst = 0.0
    for got_k, ref_k in zip(got, ref):
        for a, b, x0 in zip(got_k, ref_k, X0):
            worst = max(worst, rel_err(a, b), rel_err(a - x0, b - x0))
    return worst


CLIPS = {"off": (None, None), "constant": (1.0, None), "time_varying": (1.0, 2.0)}


@pytest.mark.parametrize("lr_decay", [0.0, 0.5])
@pytest.mark.parametrize("clip", CLIPS.keys())
@pytest.mark.parametrize("c", [0.5, 0.8, 1.0])
def test_matches_algorithm_1_in_float64(c, clip, lr_decay):
    X0, grad = make_problem(seed=1)
    clip_threshold, clip_alpha = CLIPS[clip]
    hp = dict(lr=0.05, c=c, lr_decay=lr_decay, eps1=1e-6, clip_threshold=clip_threshold,
              clip_alpha=clip_alpha)
    ref, clipped = adafactor_reference(X0, grad, 8, **hp)
    if clip_threshold is not None:
        assert clipped > 0  # the clipping branch is exercised
    got, _ = run(lambda p: Adafactor(p, **hp), X0, grad, 8)
    assert max_rel_err(got, ref, X0) < 1e-14  # measured: < 8e-16


@pytest.mark.parametrize("extras", [dict(momentum=0.9), dict(weight_decay=0.1),
                                    dict(momentum=0.5, weight_decay=0.2, beta2_first=0.0)])
def test_extensions_match_reference(extras):
    X0, grad = make_problem(seed=2)
    hp = dict(lr=0.05, c=0.8, lr_decay=0.5, eps1=1e-30, clip_threshold=1.0, clip_alpha=3.0, **extras)
    ref, _ = adafactor_reference(X0, grad, 8, **hp)
    got, _ = run(lambda p: Adafactor(p, **hp), X0, grad, 8)
    assert max_rel_err(got, ref, X0) < 1e-14


@pytest.mark.parametrize("clip", ["off", "time_varying"])
def test_float32_and_bfloat16_follow_the_reference(clip):
    X0, grad = make_problem(seed=3)
    clip_threshold, clip_alpha = CLIPS[clip]
    hp = dict(lr=0.05, c=0.8, lr_decay=0.5, eps1=1e-30, clip_threshold=clip_threshold,
              clip_alpha=clip_alpha)
    ref, _ = adafactor_reference(X0, grad, 8, **hp)
    got32, opt32 = run(lambda p: Adafactor(p, **hp), X0, grad, 8, torch.float32)
    X0_32 = [X.float().double() for X in X0]
    assert max_rel_err(got32, ref, X0_32) < 1e-5  # measured: < 2e-6
    got16, opt16 = run(lambda p: Adafactor(p, **hp), X0, grad, 8, torch.bfloat16)
    for state in opt16.state.values():
        for key, value in state.items():
            if key != "step" and key != "skipped_steps":
                assert value.dtype == torch.float32, key
    for a, b in zip(got16[-1], ref[-1]):
        assert rel_err(a, b) < 2e-2  # bf16 rounding of the parameters (measured: < 7e-3)


# ---------------------------------------------------------------------------------------------
# torch.optim.Adafactor


def torch_equivalent(c, clip_threshold):
    """torch.optim.Adafactor arguments that reproduce ours with ``beta2_first=0``, ``eps1=1e-30``:
    beta2_decay = -c, the same negligible eps1, eps2 = 1 (no relative step while RMS(X) <= 1)
    and d = inf for no clipping."""
    return dict(beta2_decay=-c, eps=(1e-30, 1.0), d=math.inf if clip_threshold is None else clip_threshold)


@pytest.mark.parametrize("clip_threshold", [None, 1.0, 2.0])
@pytest.mark.parametrize("c", [0.5, 0.8, 1.0])
def test_matches_torch_adafactor_constant_step(c, clip_threshold):
    """torch's rho_t = min(lr, 1/sqrt(t)) = lr for lr <= 1/sqrt(T): ours with lr_decay = 0."""
    X0, grad = make_problem(seed=4)
    lr, wd, steps = 0.01, 0.1, 10
    ours, _ = run(lambda p: Adafactor(p, lr=lr, c=c, eps1=1e-30, clip_threshold=clip_threshold,
                                      weight_decay=wd, beta2_first=0.0), X0, grad, steps)
    theirs, _ = run(lambda p: torch.optim.Adafactor(p, lr=lr, weight_decay=wd,
                                                    **torch_equivalent(c, clip_threshold)),
                    X0, grad, steps)
    assert max(X.norm() / X.numel() ** 0.5 for X in theirs[-1]) < 1  # eps2 = 1 dominates RMS(X)
    assert max_rel_err(ours, theirs, X0) < 1e-14  # measured: < 3e-15


def test_float32_matches_torch_adafactor_with_its_default_eps1():
    """torch's default eps1 (machine epsilon, as clamps) and ours (1e-30, added to the squares)
    are both negligible for ordinary gradients: float32 runs agree to float32 round-off."""
    X0, grad = make_problem(seed=4)
    ours, _ = run(lambda p: Adafactor(p, lr=0.01, c=0.8, weight_decay=0.1, beta2_first=0.0),
                  X0, grad, 10, torch.float32)
    theirs, _ = run(lambda p: torch.optim.Adafactor(p, lr=0.01, weight_decay=0.1, eps=(None, 1.0)),
                    X0, grad, 10, torch.float32)
    assert max_rel_err(ours, theirs, [X.float().double() for X in X0]) < 1e-5  # measured: < 1e-6


def updates_from_fixed_point(make_opt, X0, grads):
    """Feed gradients ``grads[k]`` at the fixed point X0 (restored after every step) and return
    each step's update: isolates the optimizers' states and schedules from the trajectory."""
    params = [torch.nn.Parameter(X.clone()) for X in X0]
    opt = make_opt(params)
    updates = []
    for gs in grads:
        for p, G in zip(params, gs):
            p.grad = G.clone()
        opt.step()
        updates.append([p.detach() - X for p, X in zip(params, X0)])
        with torch.no_grad():
            for p, X in zip(params, X0):
                p.copy_(X)
    return updates


@pytest.mark.parametrize("clip_threshold", [None, 1.0])
@pytest.mark.parametrize("c", [0.5, 0.8, 1.0])
def test_matches_torch_adafactor_decaying_step(c, clip_threshold):
    """torch's rho_t = min(lr, 1/sqrt(t)) = t^(-1/2) for lr >= 1: ours with lr = 1, lr_decay = 1/2
    (relative step size neutralised by eps2 = 1 at a point of RMS <= 1)."""
    X0, grad = make_problem(seed=5)
    grads = [grad(X0, k) for k in range(1, 11)]
    ours = updates_from_fixed_point(
        lambda p: Adafactor(p, lr=1.0, lr_decay=0.5, c=c, eps1=1e-30, clip_threshold=clip_threshold,
                            beta2_first=0.0), X0, grads)
    theirs = updates_from_fixed_point(
        lambda p: torch.optim.Adafactor(p, lr=1.0, **torch_equivalent(c, clip_threshold)), X0, grads)
    for a_k, b_k in zip(ours, theirs):
        for a, b in zip(a_k, b_k):
            assert rel_err(a, b) < 1e-14  # measured: < 3e-15


def test_beta2_first_is_where_the_default_departs_from_torch():
    """With the analysis's beta2_1 = 1/2, W_1 is half of torch's: the unclipped first update is
    sqrt(2) times torch's; with clipping both are scaled to RMS <= d (equal once both are clipped,
    or for vectors, whose first torch update sign(g) has RMS exactly 1)."""
    X0, grad = make_problem(seed=6)
    grads = [grad(X0, 1)]
    kw = dict(lr=0.01, c=0.8, eps1=1e-30)
    ours = updates_from_fixed_point(lambda p: Adafactor(p, clip_threshold=None, **kw), X0, grads)[0]
    theirs = updates_from_fixed_point(
        lambda p: torch.optim.Adafactor(p, lr=0.01, **torch_equivalent(0.8, None)), X0, grads)[0]
    for a, b in zip(ours, theirs):
        assert rel_err(a, math.sqrt(2) * b) < 1e-14
    ours = updates_from_fixed_point(lambda p: Adafactor(p, clip_threshold=1.0, **kw), X0, grads)[0]
    theirs = updates_from_fixed_point(
        lambda p: torch.optim.Adafactor(p, lr=0.01, **torch_equivalent(0.8, 1.0)), X0, grads)[0]
    for X, a, b in zip(X0, ours, theirs):
        if X.ndim < 2:
            assert rel_err(a, b) < 1e-14
    # From step 2 on the schedules agree, but S_1 keeps half of torch's weight: no longer equal.
    grads = [grad(X0, k) for k in (1, 2)]
    ours = updates_from_fixed_point(lambda p: Adafactor(p, clip_threshold=None, **kw), X0, grads)[1]
    assert rel_err(ours[0], updates_from_fixed_point(
        lambda p: torch.optim.Adafactor(p, lr=0.01, **torch_equivalent(0.8, None)), X0, grads)[1][0]) > 1e-3


# ---------------------------------------------------------------------------------------------
# Behaviour


def test_defaults_are_algorithm_1():
    d = Adafactor([torch.nn.Parameter(torch.zeros(2, 3))]).defaults
    assert d == dict(lr=1e-2, c=1.0, lr_decay=0.0, eps1=1e-30, clip_threshold=1.0, clip_alpha=None,
                     momentum=None, weight_decay=0.0, beta2_first=0.5, transposed=False)


def test_accepts_vectors_scalars_and_embeddings_with_factored_state():
    emb = torch.nn.Embedding(11, 4).weight
    asgo.mark_as_embedding(emb)
    W, b, s, conv = (torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(7)),
                     torch.nn.Parameter(torch.randn(())), torch.nn.Parameter(torch.randn(3, 2, 4, 5)))
    opt = Adafactor([W, b, emb], momentum=0.9)
    opt.add_param_group({"params": [s, conv], "lr": 0.1})
    for p in (W, b, emb, s, conv):
        p.grad = torch.randn_like(p)
    opt.step()
    shapes = {k: tuple(v.shape) for k, v in opt.state[W].items()}
    assert shapes == dict(step=(), row_second_moment=(5,), column_second_moment=(7,),
                          momentum=(5, 7), skipped_steps=())
    assert opt.state[conv]["row_second_moment"].shape == (3, 2, 4)
    assert opt.state[conv]["column_second_moment"].shape == (3, 2, 5)
    assert opt.state[b]["second_moment"].shape == (7,) and opt.state[s]["second_moment"].shape == ()
    assert all(torch.isfinite(p).all() for p in (W, b, emb, s, conv))


def test_clipping_caps_the_update_rms_at_rho_d():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.zeros(8, 16))
    opt = Adafactor([W], lr=0.1, clip_threshold=0.5)
    W.grad = torch.randn(8, 16)
    W.grad[0, 0] = 1e3  # a spike the rank-1 estimate cannot follow: RMS(U) >> 1
    opt.step()
    assert (W.detach().norm() / 128**0.5).item() == pytest.approx(0.1 * 0.5, rel=1e-5)


def test_time_varying_threshold_needs_a_scale():
    with pytest.raises(ValueError, match="invalid clip_alpha"):
        Adafactor([torch.nn.Parameter(torch.zeros(4, 4))], clip_threshold=None, clip_alpha=2.0)


def params_and_grads(dtype=torch.float32, seed=0, steps=8):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 10), (7,), (2, 3, 4), ()]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]
    return params, grads


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


@pytest.mark.parametrize("index", [1, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_and_keeps_state(bad, index):
    params, grads = params_and_grads()
    opt = Adafactor(params, momentum=0.9, weight_decay=0.1)
    for gs in grads[:3]:
        set_grads(params, gs)
        opt.step()
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict()["state"])
    poisoned = [g.clone() for g in grads[3]]
    poisoned[index].view(-1)[2] = bad
    set_grads(params, poisoned)
    opt.step()
    assert torch.equal(params[index], before_params[index])
    after_state = opt.state_dict()["state"][index]
    for key, value in before_state[index].items():
        if key not in ("step", "skipped_steps"):
            assert torch.equal(after_state[key], value), key
    assert int(after_state["skipped_steps"]) == 1
    assert all(not torch.equal(p, b) for i, (p, b) in enumerate(zip(params, before_params)) if i != index)
    assert opt.diagnostics() == {"skipped_steps": 1}
    set_grads(params, grads[4])
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[index], before_params[index])


def test_skipped_first_step_and_zero_gradients_stay_finite():
    params, grads = params_and_grads()
    opt = Adafactor(params, momentum=0.9)
    before = [p.detach().clone() for p in params]
    set_grads(params, [torch.full_like(g, float("nan")) for g in grads[0]])
    opt.step()  # moments never updated: W = 0 must not leak NaN into the parameters
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    set_grads(params, [torch.zeros_like(g) for g in grads[0]])
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    set_grads(params, grads[1])
    opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(params, before))
    assert opt.diagnostics() == {"skipped_steps": len(params)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_does_not_sync_and_matches_cpu():
    params, grads = params_and_grads()
    cuda_params = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    kw = dict(momentum=0.9, weight_decay=0.1, clip_alpha=2.0, lr_decay=0.5)
    opt, cuda_opt = Adafactor(params, **kw), Adafactor(cuda_params, **kw)
    for gs in grads[:3]:
        set_grads(params, gs)
        set_grads(cuda_params, [g.cuda() for g in gs])
        opt.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cuda_opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for p, q in zip(params, cuda_params):
        assert rel_err(q.detach().cpu().double(), p.detach().double()) < 1e-5
