import pytest
import torch
from problems import fit_with_closure, least_squares, rel_err, run_optimizer, two_layer_regression

import asgo
from asgo.optim import shampoo as shampoo_module
from asgo.linalg import auto_root_method, inverse_fourth_root
from asgo.optim.reference import damped_fourth_root, matrix_power, shampoo_step
from asgo.optim.reference import run as run_reference
from asgo.optim.shampoo import Shampoo, block_plan

SHAPES = [(8, 32), (32, 8), (16, 16)]
HPARAMS = dict(lr=5e-3, momentum=0.9, beta2=0.999, eps=1e-10, weight_decay=0.1)
F64_FLOOR = 16 * torch.finfo(torch.float64).eps
F32_FLOOR = 16 * torch.finfo(torch.float32).eps


def authors_shampoo_step(W, G, state, lr=5e-3, beta1=0.9, beta2=0.999, eps=1e-10, wd=0.1):
    """The ASGO authors' Shampoo baseline step for a matrix (papers.md section 1): lerp moments,
    L/R EMAs with beta2, (X + eps I)^(-1/4) by coupled Newton (p = 4, tolerance 1e-6, at most 50
    iterations), U = P M Q grafted to ||M / sqrt(v + eps)||_F, decoupled weight decay."""

    def coupled_newton_inverse_fourth_root(A):
        eye = torch.eye(A.shape[0], dtype=A.dtype)
        A = A + eps * eye
        z = 5 / (2 * A.norm())
        X, Mt = z ** 0.25 * eye, z * A
        for _ in range(50):
            if (Mt - eye).norm() / Mt.norm() <= 1e-6:
                break
            Mp = 1.25 * eye - 0.25 * Mt
            X = X @ Mp
            Mt = torch.linalg.matrix_power(Mp, 4) @ Mt
        return X

    m, n = W.shape
    if not state:
        state.update(M=torch.zeros_like(W), v=torch.zeros_like(W),
                     L=torch.zeros(m, m, dtype=W.dtype), R=torch.zeros(n, n, dtype=W.dtype))
    state["M"].lerp_(G, 1 - beta1)
    state["v"].lerp_(G * G, 1 - beta2)
    state["L"].lerp_(G @ G.T, 1 - beta2)
    state["R"].lerp_(G.T @ G, 1 - beta2)
    U = (coupled_newton_inverse_fourth_root(state["L"]) @ state["M"]
         @ coupled_newton_inverse_fourth_root(state["R"]))
    U = U * (state["M"] / (state["v"] + eps).sqrt()).norm() / U.norm()
    W.mul_(1 - lr * wd).sub_(lr * U)


# --- the fourth root --------------------------------------------------------------------------

def spd(s, cond, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(s, s, generator=g, dtype=torch.float64))
    e = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), s, dtype=torch.float64)
    if rank is not None:
        e[rank:] = 0
    return (Q * e) @ Q.T


@pytest.mark.parametrize("s", [8, 64])
@pytest.mark.parametrize("cond", [1e1, 1e3, 1e6])
@pytest.mark.parametrize("eps,relative", [(1e-10, False), (1e-7, True)])
def test_inverse_fourth_root_float64_eigh_is_exact(s, cond, eps, relative):
    """root^4 (A + delta I) = I with delta = eps, or eps ||A||_F when relative (both above the
    float64 floor; measured 4.5e-11)."""
    A = spd(s, cond)
    root, ok = inverse_fourth_root(A, method="eigh", eps=eps, relative=relative)
    assert ok.item() and root.dtype == torch.float64
    torch.testing.assert_close(root, root.T, rtol=0, atol=0)
    eye = torch.eye(s, dtype=torch.float64)
    A_d = A + (eps * A.norm() if relative else eps) * eye
    assert (root @ root @ root @ root @ A_d - eye).norm() / s**0.5 < 1e-9


@pytest.mark.parametrize("method", ["eigh", "polar_express", "newton_schulz"])
def test_damping_is_eps_above_the_floor_and_the_floor_below(method):
    """float32, rank-deficient A (where the damping sets the null-space gain): delta = eps
    (eps ||A||_F) exactly when above 16 finfo.eps ||A||_F (measured worst 4.4e-4; the old
    eps + floor would be 2.4e-2 to 4.3e-2 away), the floor when below (within the float32
    round-off of A: measured worst 3.4e-2, newton_schulz; eps itself would be 0.8 away)."""
    A = spd(32, 1e2, rank=8).float()
    A64, norm = A.double(), A.double().norm().item()
    floor = F32_FLOOR * norm
    eye = torch.eye(32, dtype=torch.float64)

    def exact(d):
        return matrix_power(A64 + d * eye, -0.25)

    for kw, d in [(dict(eps=10 * floor), 10 * floor), (dict(eps=1e-5, relative=True), 1e-5 * norm)]:
        root, ok = inverse_fourth_root(A, method=method, **kw)
        assert ok.item() and rel_err(root.double(), exact(d)) < 1e-3, kw
        assert rel_err(exact(d + floor), exact(d)) > 2e-2
    for kw, d in [(dict(eps=floor / 10), floor / 10), (dict(eps=1e-7, relative=True), 1e-7 * norm)]:
        root, ok = inverse_fourth_root(A, method=method, **kw)
        assert ok.item() and rel_err(root.double(), exact(floor)) < 5e-2, kw
        assert rel_err(exact(d), exact(floor)) > 0.3


def test_a_zero_statistic_gets_the_identity_with_relative_eps():
    """A = 0: absolute eps gives eps^(-1/4) I; a relative eps has no scale, and the root is the
    identity (as before any statistic), not a failure."""
    Z = torch.zeros(2, 4, 4)
    for method in ["eigh", "polar_express", "newton_schulz"]:
        root, ok = inverse_fourth_root(Z, method=method, eps=1e-8)
        assert ok.all()
        torch.testing.assert_close(root, torch.eye(4).expand(2, 4, 4) * 1e2, rtol=1e-4, atol=0)
        root, ok = inverse_fourth_root(Z, method=method, eps=1e-4, relative=True)
        assert ok.all()
        torch.testing.assert_close(root, torch.eye(4).expand(2, 4, 4), rtol=0, atol=1e-6)


# measured worst relative errors (float32, 10 steps, s = 8 and 64) for cond 1e1 / 1e3 / 1e6:
# eigh 7.3e-7 / 1.1e-5 / 7.2e-3, polar_express 1.4e-6 / 2.6e-6 / 9.1e-4,
# newton_schulz 2.5e-7 / 1.3e-6 / 7.5e-3
FOURTH_ROOT_TOL = {"eigh": (1e-5, 1e-4, 5e-2), "polar_express": (1e-5, 3e-5, 5e-3),
                   "newton_schulz": (5e-6, 2e-5, 5e-2)}


@pytest.mark.parametrize("method", ["eigh", "polar_express", "newton_schulz"])
def test_inverse_fourth_root_float32_accuracy(method):
    """Against the float64 root of the same float32 matrix with the float32 damping floor."""
    for s in (8, 64):
        for cond, tol in zip((1e1, 1e3, 1e6), FOURTH_ROOT_TOL[method]):
            A = spd(s, cond, seed=s).float()
            root, ok = inverse_fourth_root(A, method=method, eps=1e-10)
            assert ok.item() and root.dtype == torch.float32
            ref = damped_fourth_root(A.double(), 1e-10, F32_FLOOR)
            assert rel_err(root.double(), ref) < tol, (s, cond)


@pytest.mark.parametrize("method", ["eigh", "polar_express", "newton_schulz"])
def test_inverse_fourth_root_rank_deficient_float32_stays_bounded(method):
    """A rank-deficient float32 statistic (Shampoo's R while rows < columns): with the round-off
    floor every method is finite and the gain on the null space stays below (16 eps)^(-1/4) = 27
    times the gain on the top eigenvalue (measured 20.5 to 21.3)."""
    A = spd(64, 1e2, rank=16).float()
    for batch in (A, torch.stack([A, 2 * A])):
        root, ok = inverse_fourth_root(batch, method=method, eps=1e-10)
        assert ok.all()
        gain = torch.linalg.matrix_norm(root.double(), ord=2) * torch.linalg.matrix_norm(
            batch.double(), ord=2) ** 0.25
        assert (gain < 27).all(), gain


def test_without_the_roundoff_floor_polar_express_diverges(monkeypatch):
    """Why the floor exists: eps = 1e-10 alone leaves round-off eigenvalues of either sign."""
    A = spd(64, 1e2, rank=16).float()
    monkeypatch.setattr(asgo.linalg, "ROUNDOFF_DAMPING", 0.0)
    _, ok = inverse_fourth_root(A, method="polar_express", eps=1e-10)
    assert not ok.item()
    root, _ = inverse_fourth_root(A, method="eigh", eps=1e-10)
    gain = torch.linalg.matrix_norm(root.double(), ord=2) * torch.linalg.matrix_norm(
        A.double(), ord=2) ** 0.25
    assert gain > 100


def test_inverse_fourth_root_non_finite_input_fails_cleanly():
    A = torch.stack([spd(8, 10).float(), torch.full((8, 8), float("inf"))])
    for method in ["eigh", "polar_express", "newton_schulz"]:
        root, ok = inverse_fourth_root(A, method=method, eps=1e-10)
        assert ok.tolist() == [True, False]
        assert torch.isfinite(root[0]).all()


# --- the optimizer against references ---------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("grafting", ["adam", "none"])
def test_matches_float64_reference_eigh(shape, grafting):
    """float64 parameters compute in float64: the iterates' displacement matches the reference
    to 1e-9 (measured worst 5e-11, on the rank-deficient side of (8, 32))."""
    W0, grad, _ = least_squares(shape)
    hp = dict(HPARAMS, grafting=grafting, lr=5e-3 if grafting == "adam" else 1e-3)
    ref = run_reference(shampoo_step, W0, grad, 10, **hp)
    got, opt = run_optimizer(lambda p: Shampoo(p, root_method="eigh", **hp), W0, grad, 10,
                             torch.float64)
    for t in range(10):
        assert rel_err(got[t] - W0, ref[t] - W0) < 1e-9, t
    assert opt.diagnostics() == {"skipped_steps": 0, "root_failures": 0}


# measured worst displacement errors over 10 steps (float32, vs the reference with the float32
# round-off floor): eigh 2.6e-5, polar_express 1.6e-4, newton_schulz 5.2e-5, all on the
# rank-deficient (8, 32) / (32, 8); (16, 16) 7e-6 / 3e-6 / 2e-6
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method,tol", [("eigh", 2e-4), ("polar_express", 1e-3),
                                        ("newton_schulz", 5e-4)])
def test_float32_root_methods_match_reference(shape, method, tol):
    W0, grad, _ = least_squares(shape)
    hp = dict(HPARAMS, grafting="adam")
    ref = run_reference(shampoo_step, W0, grad, 10, floor=F32_FLOOR, **hp)
    got, opt = run_optimizer(lambda p: Shampoo(p, root_method=method, **hp), W0, grad, 10)
    W0 = W0.float().double()
    for t in range(10):
        assert rel_err(got[t] - W0, ref[t] - W0) < tol, t
    assert opt.diagnostics()["root_failures"] == 0


@pytest.mark.parametrize("method,tol", [("polar_express", 1e-3), ("newton_schulz", 5e-3)])
def test_float64_iterative_roots_match_reference(method, tol):
    """In float64 the only difference is the iterations' truncation of tiny eigenvalues
    (measured: polar_express 1.4e-4, newton_schulz 8.7e-4 on (8, 32))."""
    W0, grad, _ = least_squares((8, 32))
    hp = dict(HPARAMS, grafting="none", lr=1e-3)
    ref = run_reference(shampoo_step, W0, grad, 10, **hp)
    got, _ = run_optimizer(lambda p: Shampoo(p, root_method=method, **hp), W0, grad, 10,
                           torch.float64)
    assert max(rel_err(g - W0, r - W0) for g, r in zip(got, ref)) < tol


@pytest.mark.parametrize("shape", [(16, 16), (8, 12)])
def test_reproduces_authors_baseline_in_float64(shape):
    """Same defaults as the authors' Shampoo; their coupled Newton stops at tolerance 1e-6
    (measured 9e-8)."""
    W0, grad, _ = least_squares(shape)
    W_authors, state = W0.clone(), {}
    got, _ = run_optimizer(lambda p: Shampoo(p, root_method="eigh"), W0, grad, 10, torch.float64)
    for t in range(10):
        authors_shampoo_step(W_authors, grad(W_authors), state)
        assert rel_err(got[t] - W0, W_authors - W0) < 1e-6, t


def test_defaults_are_the_authors_values():
    d = Shampoo([torch.nn.Parameter(torch.zeros(2, 3))]).defaults
    assert (d["lr"], d["momentum"], d["beta2"], d["eps"], d["weight_decay"]) == (
        5e-3, 0.9, 0.999, 1e-10, 0.1)
    assert (d["precondition_frequency"], d["grafting"], d["grafting_eps"]) == (1, "adam", 1e-10)
    assert (d["relative_eps"], d["pre_start_update"]) == (False, "momentum")


def test_default_roots_and_blocks():
    """Not the authors': the root chosen by device and Distributed Shampoo's block size."""
    d = Shampoo([torch.nn.Parameter(torch.zeros(2, 3))]).defaults
    assert (d["root_method"], d["root_steps"], d["max_preconditioner_dim"]) == ("auto", 10, 1024)
    W = torch.nn.Parameter(torch.zeros(1536, 384))
    factors = Shampoo([W]).block_factors(W)
    assert [(f["rows"], f["cols"]) for f in factors] == [(slice(0, 768), slice(0, 384)),
                                                         (slice(768, 1536), slice(0, 384))]
    assert {(f["left"].shape[0], f["right"].shape[0]) for f in factors} == {(768, 384)}


def test_auto_root_is_eigh_on_the_cpu_and_the_iteration_elsewhere(monkeypatch):
    assert auto_root_method(torch.device("cpu")) == "eigh"
    assert auto_root_method(torch.device("cuda")) == "polar_express"
    A = spd(12, 1e4)
    for dtype in (torch.float32, torch.float64):
        auto, ok_auto = inverse_fourth_root(A.to(dtype), method="auto", eps=1e-10)
        eigh, ok_eigh = inverse_fourth_root(A.to(dtype), method="eigh", eps=1e-10)
        assert torch.equal(auto, eigh) and torch.equal(ok_auto, ok_eigh)

    def no_eigh(*args, **kwargs):
        raise AssertionError("eigh off the CPU")

    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    root, _ = inverse_fourth_root(torch.empty(2, 8, 8, device="meta"), method="auto")
    assert root.shape == (2, 8, 8)
    with pytest.raises(AssertionError, match="eigh off the CPU"):
        inverse_fourth_root(A, method="auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_root_does_not_depend_on_the_batch(dtype):
    """Each matrix's eigh root is bitwise the same in a batch of one or of six (with
    ``pow(-0.25)`` the vectorised and scalar kernels round differently: float32 roots 8e-8
    apart)."""
    g = torch.Generator().manual_seed(1)
    for s in (5, 12, 33):
        G = 1e-3 * torch.randn(6, s, s + 3, generator=g, dtype=dtype)
        A = G @ G.mT
        batched, _ = inverse_fourth_root(A, method="eigh", eps=1e-10)
        for i in range(6):
            alone, _ = inverse_fourth_root(A[i:i + 1], method="eigh", eps=1e-10)
            assert torch.equal(batched[i], alone[0])


def test_inverse_fourth_root_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="method must be one of .*'auto'.*got 'svd'"):
        inverse_fourth_root(spd(4, 10), method="svd")


def test_default_step_is_the_eigh_step_on_the_cpu():
    W0, grad, _ = least_squares((24, 40))
    auto, _ = run_optimizer(lambda p: Shampoo(p), W0, grad, 5, torch.float32)
    eigh, _ = run_optimizer(lambda p: Shampoo(p, root_method="eigh"), W0, grad, 5, torch.float32)
    assert all(torch.equal(a, e) for a, e in zip(auto, eigh))


@pytest.mark.parametrize("scale", [1e-3, 1e-4])
def test_defaults_match_float64_reference_per_block(scale):
    """A (1030, 12) matrix with the default blocks (two 515 x 12 row blocks) and root, rank-2
    gradients: each block follows the float64 reference run on it alone (measured 5e-14)."""
    grads = random_gradients((1030, 12), 2, scale, steps=4)
    W0 = torch.randn(1030, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    p = torch.nn.Parameter(W0.clone())
    opt = Shampoo([p])
    blocks = [(slice(0, 515), {}), (slice(515, 1030), {})]
    ref = [W0[rows].clone() for rows, _ in blocks]
    for G in grads:
        p.grad = G.clone()
        opt.step()
        for i, (rows, state) in enumerate(blocks):
            ref[i] = shampoo_step(ref[i], G[rows], state, **HPARAMS, grafting="adam")
    for (rows, _), r in zip(blocks, ref):
        assert rel_err(p.detach()[rows] - W0[rows], r - W0[rows]) < 1e-10


# --- float32 against the float64 algorithm: damping, cached roots, gradient scale --------------

def random_gradients(shape, rank, scale, steps=9, seed=0):
    """Fresh gradients every step (the stale roots of tau > 1 then meet directions outside the
    factors' range, where the damping sets the gain), of the given rank and entry scale."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    return [scale * torch.randn(m, rank, generator=g, dtype=torch.float64)
            @ torch.randn(rank, n, generator=g, dtype=torch.float64) / rank**0.5
            for _ in range(steps)]


def float32_against_float64(shape, grads, method="eigh", floor=F64_FLOOR, **hp):
    """Worst relative error of the float32 optimizer's displacement against the float64
    reference (its round-off floor ``floor``) over the steps, both fed the same gradients."""
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    hp = dict(HPARAMS, grafting="adam", **hp)
    W, state, ref = W0.clone(), {}, []
    for G in grads:
        W = shampoo_step(W, G, state, floor=floor, **hp)
        ref.append(W - W0)
    p = torch.nn.Parameter(W0.float())
    opt = Shampoo([p], root_method=method, **hp)
    worst = 0.0
    for G, r in zip(grads, ref):
        p.grad = G.float()
        opt.step()
        worst = max(worst, rel_err(p.detach().double() - W0.float().double(), r))
    assert opt.diagnostics() == {"skipped_steps": 0, "root_failures": 0}
    return worst


# measured worst over the methods (tau = 3, 9 steps): relative eps 1e-4: 7.9e-5 at every scale;
# absolute 1e-10: 5.7e-5 at 1e-3, 1.1e-5 at 1e-4 (before, with eps + floor: 2.1e-4 to 1.5e-3 at
# 1e-3, 2.2e-5 at 1e-4)
@pytest.mark.parametrize("method", ["eigh", "polar_express", "newton_schulz"])
@pytest.mark.parametrize("shape,rank", [((12, 40), 12), ((12, 40), 2), ((24, 24), 3)])
@pytest.mark.parametrize("scale,eps,relative", [(1.0, 1e-4, True), (1e-3, 1e-4, True),
                                                (1e-4, 1e-4, True), (1e-3, 1e-10, False),
                                                (1e-4, 1e-10, False)])
def test_float32_follows_the_float64_algorithm_with_cached_roots(method, shape, rank, scale,
                                                                 eps, relative):
    grads = random_gradients(shape, rank, scale)
    err = float32_against_float64(shape, grads, method, eps=eps, relative_eps=relative,
                                  precondition_frequency=3)
    assert err < 5e-4


def test_an_absolute_eps_below_float32_round_off_is_the_floor():
    """Gradients of scale 1 and eps = 1e-10: the float32 factors are known to 2.6e-7 ||X||_F, so
    the float32 run follows the float64 algorithm with the float32 floor (1.6e-3 measured), not
    the one with eps (0.21 measured: the documented limit; relative eps removes it)."""
    grads = random_gradients((32, 48), 32, 1.0)
    assert float32_against_float64((32, 48), grads, eps=1e-10, precondition_frequency=3,
                                   floor=F32_FLOOR) < 1e-2
    assert float32_against_float64((32, 48), grads, eps=1e-10, precondition_frequency=3) > 0.1


@pytest.mark.parametrize("scale,eps,relative", [(1e-3, (1e-10, 1e-8), False),
                                                (1.0, (1e-4, 1e-3), True)])
def test_eps_changes_the_float32_update_as_it_should(scale, eps, relative):
    """Two values of eps above the floor: the float32 runs differ (by 0.26 / 0.11 measured) and
    each follows the float64 algorithm with its own eps (measured within 6e-5)."""
    grads = random_gradients((12, 40), 2, scale)
    runs = []
    for e in eps:
        assert float32_against_float64((12, 40), grads, eps=e, relative_eps=relative,
                                       precondition_frequency=3) < 5e-4
        p = torch.nn.Parameter(torch.zeros(12, 40))
        opt = Shampoo([p], eps=e, relative_eps=relative, precondition_frequency=3)
        for G in grads:
            p.grad = G.float()
            opt.step()
        runs.append(p.detach().double())
    assert rel_err(runs[0], runs[1]) > 5e-2


@pytest.mark.parametrize("method", ["polar_express", "eigh"])
@pytest.mark.parametrize("grafting", ["none", "adam"])
def test_relative_eps_is_scale_free(grafting, method):
    """With a relative d, U = P M Q (and the Adam norm, up to grafting_eps) does not depend on
    the gradients' scale: gradients scaled by 2^-14 (exact in float32) give the same float32
    iterates, bit for bit with the iterations, within LAPACK's round-off with eigh (measured
    2.7e-5); with an absolute eps they differ (0.5 to 0.99)."""
    def run(scale, **hp):
        p = torch.nn.Parameter(torch.ones(12, 40))
        opt = Shampoo([p], lr=1e-3, grafting=grafting, grafting_eps=1e-30,
                      precondition_frequency=3, root_method=method, **hp)
        for G in random_gradients((12, 40), 2, scale):
            p.grad = G.float()
            opt.step()
        return p.detach().double() - 1

    relative = dict(eps=1e-4, relative_eps=True)
    if method == "eigh":
        assert rel_err(run(1.0, **relative), run(2.0**-14, **relative)) < 1e-4
    else:
        assert torch.equal(run(1.0, **relative), run(2.0**-14, **relative))
    assert rel_err(run(2.0**-14, eps=1e-10), run(1.0, eps=1e-10)) > 1e-1


# --- before the start step ----------------------------------------------------------------------

@pytest.mark.parametrize("pre_start", ["momentum", "grafting"])
def test_pre_start_update_matches_reference(pre_start):
    """float64, start 4, tau 2: 'grafting' (Distributed Shampoo: the Adam update itself before
    s) and 'momentum' (identity roots, grafted) match the reference to 1e-9 and differ."""
    W0, grad, _ = least_squares((8, 32))
    hp = dict(HPARAMS, grafting="adam", precondition_frequency=2, start_preconditioning_step=4)
    ref = run_reference(shampoo_step, W0, grad, 8, pre_start_update=pre_start, **hp)
    got, _ = run_optimizer(lambda p: Shampoo(p, root_method="eigh", pre_start_update=pre_start,
                                             **hp), W0, grad, 8, torch.float64)
    for t in range(8):
        assert rel_err(got[t] - W0, ref[t] - W0) < 1e-9, t
    other = run_reference(shampoo_step, W0, grad, 8, pre_start_update=(
        {"momentum", "grafting"} - {pre_start}).pop(), **hp)
    assert rel_err(other[2] - W0, ref[2] - W0) > 1e-2


def test_pre_start_grafting_is_the_adam_update():
    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(5, 7, dtype=torch.float64))
    opt = Shampoo([W], lr=0.1, weight_decay=0.0, start_preconditioning_step=3,
                  pre_start_update="grafting")
    for _ in range(2):
        W0, G = W.detach().clone(), torch.randn(5, 7, dtype=torch.float64)
        W.grad = G.clone()
        opt.step()
        state = opt.state[W]
        adam = state["momentum"] / (state["exp_avg_sq"] + 1e-10).sqrt()
        torch.testing.assert_close(W.detach(), W0 - 0.1 * adam, rtol=0, atol=1e-15)
    assert torch.equal(opt.block_factors(W)[0]["left_root"], torch.eye(5, dtype=torch.float64))


def test_pre_start_grafting_without_grafting_is_refused():
    with pytest.raises(ValueError, match="invalid pre_start_update: 'grafting' needs a grafting"):
        Shampoo([torch.nn.Parameter(torch.zeros(2, 3))], grafting="none",
                pre_start_update="grafting")


def test_grafting_sets_the_adam_norm():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(6, 10, dtype=torch.float64))
    opt = Shampoo([W], lr=1.0, weight_decay=0.0, root_method="eigh")
    for _ in range(3):
        W0 = W.detach().clone()
        W.grad = torch.randn_like(W)
        opt.step()
        state = opt.state[W]
        adam = state["momentum"] / (state["exp_avg_sq"] + 1e-10).sqrt()
        assert (W0 - W.detach()).norm().item() == pytest.approx(adam.norm().item(), rel=1e-12)


@pytest.mark.parametrize("tau,start", [(3, 1), (2, 4)])
def test_precondition_frequency_and_start(tau, start):
    W0, grad, _ = least_squares((8, 32))
    hp = dict(HPARAMS, grafting="adam")
    ref = run_reference(shampoo_step, W0, grad, 9, precondition_frequency=tau,
                        start_preconditioning_step=start, **hp)
    got, _ = run_optimizer(
        lambda p: Shampoo(p, root_method="eigh", precondition_frequency=tau,
                          start_preconditioning_step=start, **hp), W0, grad, 9, torch.float64)
    for t in range(9):
        assert rel_err(got[t] - W0, ref[t] - W0) < 1e-9, t
    every_step = run_reference(shampoo_step, W0, grad, 9, **hp)
    assert rel_err(every_step[-1] - W0, ref[-1] - W0) > 1e-4


def test_roots_cached_between_root_steps():
    W = torch.nn.Parameter(torch.randn(6, 10))
    opt = Shampoo([W], precondition_frequency=3)
    roots = []
    for _ in range(6):
        W.grad = torch.randn_like(W)
        opt.step()
        roots.append((opt.state[W]["left_root"].clone(), opt.state[W]["right_root"].clone()))
    for side in (0, 1):
        assert torch.equal(roots[0][side], roots[1][side]) and torch.equal(roots[1][side], roots[2][side])
        assert not torch.equal(roots[2][side], roots[3][side])
        assert torch.equal(roots[3][side], roots[5][side])


def test_before_start_the_update_is_grafted_momentum():
    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(5, 7, dtype=torch.float64))
    opt = Shampoo([W], lr=0.1, weight_decay=0.0, grafting="none", start_preconditioning_step=3)
    W0, G = W.detach().clone(), torch.randn(5, 7, dtype=torch.float64)
    W.grad = G.clone()
    opt.step()
    torch.testing.assert_close(W.detach(), W0 - 0.1 * 0.1 * G, rtol=0, atol=1e-15)
    assert torch.equal(opt.block_factors(W)[0]["left_root"], torch.eye(5, dtype=torch.float64))


# --- blocking and batching --------------------------------------------------------------------

def test_block_plan_is_a_balanced_split():
    assert [(k.r, k.c, k.count) for k in block_plan(10, 24, 8)] == [(5, 8, 6)]
    assert [(k.r, k.c, k.count) for k in block_plan(10, 7, 4)] == [(4, 4, 1), (4, 3, 1), (3, 4, 2), (3, 3, 2)]
    assert [(k.r, k.c, k.count) for k in block_plan(1030, 300, 1024)] == [(515, 300, 2)]
    assert [(k.r, k.c, k.count) for k in block_plan(6, 6, 8)] == [(6, 6, 1)]


@pytest.mark.parametrize("shape,max_dim", [((10, 24), 8), ((10, 7), 4)])
@pytest.mark.parametrize("grafting", ["adam", "none"])
def test_blocked_equals_independent_blocks(shape, max_dim, grafting):
    """Each side is split by torch.tensor_split into ceil(side / max_dim) chunks; every block
    is updated exactly as a separate parameter (own factors, roots and grafting norm)."""
    torch.manual_seed(2)
    m, n = shape
    W = torch.nn.Parameter(torch.randn(m, n))
    k_rows, k_cols = -(-m // max_dim), -(-n // max_dim)
    rows = torch.arange(m).tensor_split(k_rows)
    cols = torch.arange(n).tensor_split(k_cols)
    blocks = [torch.nn.Parameter(W.detach()[r][:, c].clone()) for r in rows for c in cols]
    hp = dict(lr=0.01, grafting=grafting, precondition_frequency=2)
    opt = Shampoo([W], max_preconditioner_dim=max_dim, **hp)
    alone = [Shampoo([b], **hp) for b in blocks]
    for _ in range(5):
        G = torch.randn(m, n) * torch.linspace(0.1, 3, m)[:, None]
        W.grad = G.clone()
        for b, (r, c) in zip(blocks, [(r, c) for r in rows for c in cols]):
            b.grad = G[r][:, c].clone()
        opt.step()
        for o in alone:
            o.step()
    factors = opt.block_factors(W)
    assert len(factors) == len(blocks)
    for f, b, o, (r, c) in zip(factors, blocks, alone, [(r, c) for r in rows for c in cols]):
        assert (f["rows"].start, f["cols"].start) == (r[0].item(), c[0].item())
        assert max(f["left"].shape[0], f["right"].shape[0]) <= max_dim
        ref = o.block_factors(b)[0]
        for key in ("left", "right", "left_root", "right_root"):
            torch.testing.assert_close(f[key], ref[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(W.detach()[r][:, c], b.detach(), rtol=1e-5, atol=1e-6)


def test_changing_max_preconditioner_dim_after_the_first_step_is_refused():
    W = torch.nn.Parameter(torch.randn(10, 24))
    opt = Shampoo([W], max_preconditioner_dim=8)
    W.grad = torch.randn_like(W)
    opt.step()
    opt.param_groups[0]["max_preconditioner_dim"] = 12
    with pytest.raises(ValueError, match="max_preconditioner_dim=12"):
        opt.step()


def test_grafting_can_be_switched_on_later():
    W = torch.nn.Parameter(torch.randn(6, 10))
    opt = Shampoo([W], grafting="none", lr=1e-3)
    W.grad = torch.randn_like(W)
    opt.step()
    assert "exp_avg_sq" not in opt.state[W]
    opt.param_groups[0]["grafting"] = "adam"
    opt.step()
    assert opt.state[W]["exp_avg_sq"].abs().sum() > 0 and torch.isfinite(W).all()



def test_one_root_call_per_factor_size(monkeypatch):
    calls = []
    original = shampoo_module.inverse_fourth_root

    def spy(A, **kw):
        calls.append(tuple(A.shape))
        return original(A, **kw)

    monkeypatch.setattr(shampoo_module, "inverse_fourth_root", spy)
    params = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(3)]
    params += [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(4, 4))]
    opt = Shampoo(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(calls) == sorted([(4, 8, 8), (4, 16, 16), (2, 4, 4)])


def test_conv_weight_viewed_as_out_by_rest():
    torch.manual_seed(4)
    conv = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
    flat = torch.nn.Parameter(conv.detach().reshape(8, 27).clone())
    o1, o2 = Shampoo([conv]), Shampoo([flat])
    for _ in range(3):
        g = torch.randn(8, 27)
        conv.grad, flat.grad = g.reshape(8, 3, 3, 3).clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(conv.detach().reshape(8, 27), flat.detach())


# --- faults, state, arguments -----------------------------------------------------------------

def test_failed_root_keeps_previous_root_and_is_counted(monkeypatch):
    torch.manual_seed(5)
    W = torch.nn.Parameter(torch.randn(6, 10))
    opt = Shampoo([W], momentum=0.0, grafting="none", lr=0.1)
    original = shampoo_module.inverse_fourth_root

    def failing(A, **kw):
        X, ok = original(A, **kw)
        return torch.full_like(X, float("nan")), torch.zeros_like(ok)

    monkeypatch.setattr(shampoo_module, "inverse_fourth_root", failing)
    W0, G = W.detach().clone(), torch.randn(6, 10)
    W.grad = G.clone()
    opt.step()
    # identity roots before the first good one: the update is the momentum = G
    torch.testing.assert_close(W.detach(), W0 * (1 - 0.1 * 0.1) - 0.1 * G)
    f = opt.block_factors(W)[0]
    assert torch.equal(f["left_root"], torch.eye(6)) and torch.equal(f["right_root"], torch.eye(10))
    assert opt.diagnostics() == {"skipped_steps": 0, "root_failures": 2}  # left and right

    monkeypatch.setattr(shampoo_module, "inverse_fourth_root", original)
    W.grad = G.clone()
    opt.step()
    good = (opt.state[W]["left_root"].clone(), opt.state[W]["right_root"].clone())
    assert not torch.equal(opt.block_factors(W)[0]["left_root"], torch.eye(6))
    monkeypatch.setattr(shampoo_module, "inverse_fourth_root", failing)
    W.grad = G.clone()
    opt.step()
    assert torch.equal(opt.state[W]["left_root"], good[0])
    assert torch.equal(opt.state[W]["right_root"], good[1])
    assert torch.isfinite(W).all()
    assert opt.diagnostics()["root_failures"] == 4


def test_bf16_parameters_follow_float32():
    W0, grad, loss = least_squares((16, 32))
    ref32, _ = run_optimizer(lambda p: Shampoo(p), W0, grad, 10, torch.float32)
    got, opt = run_optimizer(lambda p: Shampoo(p), W0, grad, 10, torch.bfloat16)
    W = opt.param_groups[0]["params"][0]
    assert W.dtype == torch.bfloat16 and opt.state[W]["left"].dtype == torch.float32
    assert rel_err(got[-1] - W0.bfloat16().double(), ref32[-1] - W0.float().double()) < 0.15
    assert loss(got[-1]) < loss(W0)


def test_closure_param_groups_and_scheduler():
    model, x, y = two_layer_regression()
    opt = Shampoo([{"params": [model[0].weight]}, {"params": [model[2].weight], "lr": 3e-2,
                                                   "grafting": "none"}], lr=0.05)
    first, last = fit_with_closure(opt, model, x, y)
    assert last < 0.8 * first
    assert opt.param_groups[1]["lr"] == pytest.approx(3e-2 * 0.98**30)
