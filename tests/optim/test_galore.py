import copy
import io

import pytest
import torch
from golore_counterexample import CounterExample
from problems import fit_with_closure, least_squares, rel_err, scaled_least_squares, two_layer_regression

from asgo.optim.galore import (
    GaLore,
    GoLore,
    basis_seed,
    golore_switch_step,
    random_orthonormal,
    top_singular_pairs,
    top_singular_vectors,
)
from asgo.optim.reference import galore_step
from asgo.optim.reference import run as run_reference


@pytest.fixture
def one_thread():
    """Thousands of 10 x 10 steps: intra-op threads only add overhead (10x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(make_opt, W0, grad, steps, dtype=torch.float64):
    W = torch.nn.Parameter(W0.to(dtype).clone())
    opt = make_opt([W])
    iterates = []
    for t in range(steps):
        W.grad = grad(W.detach().double()).to(dtype) if callable(grad) else grad[t].to(dtype)
        opt.step()
        iterates.append(W.detach().double().clone())
    return iterates, opt


INNER = {
    "adamw": dict(inner="adamw", betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
    "sgd": dict(inner="sgd", momentum=0.9, dampening=0.2, weight_decay=0.1),
}
SIDES = [((6, 10), "std"), ((10, 6), "std"), ((10, 6), "left"), ((6, 10), "right")]


# (a) float64 reference, basis changes every tau = 2 steps --------------------------------------

@pytest.mark.parametrize("reproject", [True, False])
@pytest.mark.parametrize("basis", ["galore", "golore"])
@pytest.mark.parametrize("shape,proj_type", SIDES)
@pytest.mark.parametrize("inner", INNER)
def test_matches_float64_reference(inner, shape, proj_type, basis, reproject):
    W0, grad, _ = least_squares(shape)
    hp = dict(INNER[inner], rank=3, update_proj_gap=2, proj_type=proj_type, lr=0.05, scale=0.5,
              seed=7, golore_fraction=1.0 if basis == "golore" else 0.0)
    ref = run_reference(galore_step, W0, grad, 7, reproject_moments=reproject, **hp)
    got, opt = run(lambda p: GaLore(p, reproject_moments=reproject, **hp), W0, grad, 7)
    for t in range(7):
        assert rel_err(got[t] - W0, ref[t] - W0) < 1e-10, t
    state = opt.state[opt.param_groups[0]["params"][0]]
    right = proj_type == "right" or (proj_type == "std" and shape[0] >= shape[1])
    assert state["projector"].shape == (shape[1] if right else shape[0], 3)
    if reproject:  # the moments really are re-projected: without it the run differs
        other = run_reference(galore_step, W0, grad, 7, reproject_moments=False, **hp)
        assert rel_err(other[-1] - W0, ref[-1] - W0) > 1e-6


@pytest.mark.parametrize("basis", ["galore", "golore"])
@pytest.mark.parametrize("inner", INNER)
def test_float32_parameters_follow_the_reference(inner, basis):
    W0, grad, _ = least_squares((8, 24))
    hp = dict(INNER[inner], rank=4, proj_type="std", lr=0.02, golore_fraction=float(basis == "golore"))
    ref = run_reference(galore_step, W0, grad, 8, update_proj_gap=3, **hp)
    got, opt = run(lambda p: GaLore(p, update_proj_gap=3, **hp), W0, grad, 8, torch.float32)
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg" if inner == "adamw" else
                                                       "momentum_buffer"].dtype == torch.float32
    assert rel_err(got[-1] - W0.float().double(), ref[-1] - W0) < 1e-4


def test_basis_is_the_sign_fixed_top_singular_subspace():
    G = torch.randn(7, 12, dtype=torch.float64)
    P = top_singular_vectors(G, 3)
    U, S, _ = torch.linalg.svd(G)
    assert torch.allclose(P.T @ P, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(P @ P.T, U[:, :3] @ U[:, :3].T, atol=1e-12)
    assert (P.gather(0, P.abs().argmax(0, keepdim=True)) > 0).all()
    assert torch.allclose((P.T @ G).norm() ** 2, S[:3].square().sum())


def test_rank_is_clamped_to_the_smaller_dimension():
    params = [torch.nn.Parameter(torch.randn(6, 10)), torch.nn.Parameter(torch.randn(10, 6)),
              torch.nn.Parameter(torch.randn(10, 6))]
    opt = GaLore([{"params": params[:2]}, {"params": params[2:], "proj_type": "left"}], rank=100)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    shapes = [tuple(opt.state[p]["projector"].shape) for p in params]
    assert shapes == [(6, 6), (6, 6), (10, 6)]
    # moments are (r, l): the projected side's rank, then the other side
    assert opt.state[params[0]]["exp_avg"].shape == (6, 10)  # left: (r, n)
    assert opt.state[params[1]]["exp_avg"].shape == (6, 10)  # right: (r, m)
    assert opt.state[params[2]]["exp_avg"].shape == (6, 6)   # forced left on a tall matrix: (r, n)


# (a') galore-torch's 'reverse_std' and 'full' projections ----------------------------------------

NEW_PROJECTIONS = [((6, 10), "reverse_std"), ((10, 6), "reverse_std"), ((8, 8), "reverse_std"),
                   ((6, 10), "full"), ((10, 6), "full")]


def projector_shapes(shape, proj_type, r):
    """(projector, right projector or None, moments) shapes: reverse_std projects the long side."""
    m, n = shape
    if proj_type == "full":
        return (m, r), (n, r), (r, r)
    return ((m, r), None, (r, n)) if m >= n else ((n, r), None, (r, m))


@pytest.mark.parametrize("rank", [None, 2], ids=["full_rank", "rank2"])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-4])
@pytest.mark.parametrize("basis", ["galore", "golore"])
@pytest.mark.parametrize("shape,proj_type", NEW_PROJECTIONS)
@pytest.mark.parametrize("inner", INNER)
def test_new_projections_match_float64_reference(inner, shape, proj_type, basis, scale, rank):
    """Gradients of size ``scale`` (AdamW's eps matters at 1e-4), full rank with r = 3 or rank 2
    with r = 2 (r above the gradient's rank leaves SVD basis vectors that are any orthonormal
    completion: the run then depends on the SVD backend); the basis changes every 2 steps,
    moments re-projected. Measured: within 1e-12, except 'full' with AdamW and SVD bases: 1e-7
    at scale 1, as right after a refresh ``P^T G Q`` is diagonal up to round-off, which
    AdamW's first step divides by ``|.| + eps``."""
    W0, grad, _ = scaled_least_squares(shape, scale, rank)
    if rank is not None:
        assert torch.linalg.matrix_rank(grad(W0)) == rank
    r = 3 if rank is None else rank
    hp = dict(INNER[inner], rank=r, update_proj_gap=2, proj_type=proj_type, lr=0.05, scale=0.5,
              seed=7, golore_fraction=1.0 if basis == "golore" else 0.0)
    ref = run_reference(galore_step, W0, grad, 7, **hp)
    got, opt = run(lambda p: GaLore(p, **hp), W0, grad, 7)
    tol = 5e-7 if (inner, proj_type, basis) == ("adamw", "full", "galore") else 1e-10
    for t in range(7):
        assert rel_err(got[t] - W0, ref[t] - W0) < tol, t
    state = opt.state[opt.param_groups[0]["params"][0]]
    P, Q, moments = projector_shapes(shape, proj_type, r)
    assert state["projector"].shape == P
    assert ("right_projector" in state) == (Q is not None)
    if Q is not None:
        assert state["right_projector"].shape == Q
    assert state["exp_avg" if inner == "adamw" else "momentum_buffer"].shape == moments
    if inner == "adamw":  # AdamW is not rotation invariant: the projected sides matter
        other = dict(hp, proj_type="std" if proj_type == "reverse_std" else "left")
        other = run_reference(galore_step, W0, grad, 7, **other)
        assert rel_err(other[-1] - W0, ref[-1] - W0) > 0.1  # measured: 0.56 or more


@pytest.mark.parametrize("scale", [1e-3, 1e-4])
@pytest.mark.parametrize("basis", ["galore", "golore"])
@pytest.mark.parametrize("shape,proj_type", NEW_PROJECTIONS)
def test_new_projections_float32_follow_the_reference(shape, proj_type, basis, scale):
    """float32 parameters and state, rank-2 gradients, r = 2. Measured: at most 5e-6, except
    'full' with SVD bases: 4.7e-3 (scale 1e-3) and 7.2e-4 (1e-4), float32 round-off in the
    off-diagonal of ``P^T G Q`` after a refresh, divided by ``|.| + eps`` at AdamW's next step."""
    W0, grad, _ = scaled_least_squares(shape, scale, rank=2)
    hp = dict(INNER["adamw"], rank=2, update_proj_gap=3, proj_type=proj_type, lr=0.02,
              golore_fraction=float(basis == "golore"))
    ref = run_reference(galore_step, W0, grad, 8, **hp)
    got, _ = run(lambda p: GaLore(p, **hp), W0, grad, 8, torch.float32)
    W0 = W0.float().double()
    tol = 1e-2 if (proj_type, basis) == ("full", "galore") else 1e-5
    for t in range(8):
        assert rel_err(got[t] - W0, ref[t] - W0) < tol, t


def galore_torch_project_back(G, rank, proj_type):
    """galore-torch's ``GaLoreProjector.project_back(project(G))`` (``scale=1``), transcribed for
    ``'reverse_std'`` and ``'full'`` (``get_orthogonal_matrix``: ``U[:, :r]``, ``Vh[:r]``)."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    A, B = U[:, :rank], Vh[:rank, :]
    if proj_type == "full":
        return A @ (A.T @ G @ B.T) @ B
    if G.shape[0] >= G.shape[1]:
        low = A.T @ G
        return A @ low if low.shape[0] <= low.shape[1] else low @ A
    low = G @ B.T
    return B.T @ low if low.shape[0] <= low.shape[1] else low @ B


@pytest.mark.parametrize("shape,proj_type", NEW_PROJECTIONS + [((12, 5), "reverse_std")])
def test_first_step_is_galore_torch_projection(shape, proj_type):
    """With the plain inner step (sgd, no momentum) one step moves W by ``lr`` times galore-torch's
    projected-back gradient: the same sides and bases (sign-independent)."""
    g = torch.Generator().manual_seed(3)
    W = torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64))
    W0, G = W.detach().clone(), 1e-3 * torch.randn(*shape, generator=g, dtype=torch.float64)
    opt = GaLore([W], rank=3, proj_type=proj_type, inner="sgd", lr=0.5)
    W.grad = G.clone()
    opt.step()
    expected = galore_torch_project_back(G, 3, proj_type)
    assert rel_err(W.detach() - W0, -0.5 * expected) < 1e-12
    assert rel_err(expected, G) > 0.1  # rank 3 < min(m, n): a real projection


def test_full_bases_are_sign_paired_singular_vectors():
    G = torch.randn(7, 12, dtype=torch.float64)
    P, Q = top_singular_pairs(G, 3)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(P.T @ G @ Q, torch.diag(S[:3]), rtol=0, atol=1e-12)
    assert torch.equal(P, top_singular_vectors(G, 3))
    assert (P.gather(0, P.abs().argmax(0, keepdim=True)) > 0).all()


# (b) full-rank equivalences ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8), (4, 2, 3)])
@pytest.mark.parametrize("tau", [1, 3])
@pytest.mark.parametrize("cls", [GaLore, GoLore])
@pytest.mark.parametrize("sgd", [dict(momentum=0.9, dampening=0.3), dict(momentum=0.9, nesterov=True),
                                 dict(momentum=0.0)])
def test_full_rank_sgd_is_torch_sgd(shape, tau, cls, sgd):
    """With rank = min(m, n) the basis is square orthogonal (P P^T = I) and the re-projected
    buffer satisfies P_t B_t = mu P_{t-1} B_{t-1} + (1 - d) G_t: momentum SGD, for any basis."""
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(8)]
    got, _ = run(lambda p: cls(p, lr=0.1, rank=min(shape[0], W0[0].numel()), update_proj_gap=tau,
                               inner="sgd", **sgd), W0, grads, 8)
    ref, _ = run(lambda p: torch.optim.SGD(p, lr=0.1, **sgd), W0, grads, 8)
    for t in range(8):
        assert rel_err(got[t] - W0, ref[t] - W0) < 1e-12, t


def test_full_rank_sgd_without_reprojection_is_not_sgd():
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(6, 10, generator=g, dtype=torch.float64)
    grads = [torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(8)]
    got, _ = run(lambda p: GoLore(p, lr=0.1, rank=6, update_proj_gap=1, inner="sgd", momentum=0.9,
                                  reproject_moments=False), W0, grads, 8)
    ref, _ = run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), W0, grads, 8)
    assert rel_err(got[-1] - W0, ref[-1] - W0) > 0.1


def orthogonal_row_gradients(m, n, steps, seed=0):
    """Gradients whose rows have disjoint supports and norms ordered row 0 > row 1 > ...: G G^T is
    diagonal with a fixed order, so the (sign-fixed) top-m SVD basis is the identity."""
    g = torch.Generator().manual_seed(seed)
    width = n // m
    grads = []
    for _ in range(steps):
        G = torch.zeros(m, n, dtype=torch.float64)
        for i in range(m):
            v = torch.randn(width, generator=g, dtype=torch.float64)
            scale = (m - i) * (1 + 0.1 * torch.rand((), generator=g, dtype=torch.float64))
            G[i, i * width:(i + 1) * width] = v / v.norm() * scale
        grads.append(G)
    return grads


@pytest.mark.parametrize("right", [False, True])
@pytest.mark.parametrize("tau", [1, 2])
def test_full_rank_adamw_is_torch_adamw_when_the_basis_is_a_permutation(right, tau):
    """AdamW's element-wise second moment is not rotation invariant, so full-rank GaLore-AdamW is
    AdamW only when every SVD basis is a signed permutation in a fixed order: here, gradients with
    orthogonal rows (columns for the right side) of distinct, consistently ordered norms."""
    grads = orthogonal_row_gradients(4, 12, 8)
    if right:
        grads = [G.T.contiguous() for G in grads]
    W0 = torch.randn(*grads[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    got, opt = run(lambda p: GaLore(p, rank=4, update_proj_gap=tau, **hp), W0, grads, 8)
    ref, _ = run(lambda p: torch.optim.AdamW(p, **hp), W0, grads, 8)
    for t in range(8):
        assert rel_err(got[t] - W0, ref[t] - W0) < 1e-12, t
    P = opt.state[opt.param_groups[0]["params"][0]]["projector"]
    assert torch.allclose(P, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_full_rank_adamw_in_a_rotated_basis_is_not_torch_adamw():
    W0, grad, _ = least_squares((6, 10))
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    got, _ = run(lambda p: GaLore(p, rank=6, update_proj_gap=1, **hp), W0, grad, 8)
    ref, _ = run(lambda p: torch.optim.AdamW(p, **hp), W0, grad, 8)
    assert rel_err(got[-1] - W0, ref[-1] - W0) > 0.05


# (c) the GoLore paper's counter-example ---------------------------------------------------------

def test_counterexample_galore_stalls_golore_converges(one_thread):
    """Problem (1), n = 10, r = 4, sigma = 1, left projection, SGD inner, lr 1e-3, tau 10, 10k
    steps (measured: GaLore frozen at f - f* = 2.415 from ~2k steps on; GoLore ~0.01;
    GoLore@50% follows GaLore to step 5000, then falls to ~0.05)."""
    steps, log = 10_000, 1000
    hp = dict(lr=1e-3, rank=4, update_proj_gap=10, proj_type="left", inner="sgd", scale=1.0)
    problem = CounterExample()
    assert problem.gap(problem.X0) > 20
    _, galore = CounterExample().run(lambda p: GaLore(p, **hp), steps, log)
    _, golore = CounterExample().run(lambda p: GoLore(p, **hp), steps, log)
    _, half = CounterExample().run(lambda p: GoLore(p, golore_fraction=0.5, total_steps=steps, **hp),
                                   steps, log)
    assert galore[-1] > 1.0
    assert abs(galore[-1] - galore[len(galore) // 2]) < 1e-6  # stalled: X_top frozen
    assert golore[-1] < 0.05 and golore[-1] < galore[-1] / 50
    assert half[:5] == galore[:5]  # GaLore for the first 50%
    assert half[-1] < 0.2 and half[-1] < galore[-1] / 10


# (d) GoLore@x% ----------------------------------------------------------------------------------

def test_switch_step_rule():
    assert golore_switch_step(0.2, 10_000) == 8000
    assert golore_switch_step(0.7, 100) == 30  # (1 - 0.7) * 100 = 30.000000000000004
    assert golore_switch_step(0.25, 10) == 8  # ceil(7.5)
    assert golore_switch_step(1.0, None) == 0
    assert golore_switch_step(0.0, None) == float("inf")
    assert GoLore([torch.nn.Parameter(torch.zeros(2, 3))]).defaults["golore_fraction"] == 1.0
    assert GaLore([torch.nn.Parameter(torch.zeros(2, 3))]).defaults["golore_fraction"] == 0.0


def _bases_used(opt_kwargs, steps, shape=(5, 9)):
    """Per step: 'svd' if the basis is the sign-fixed SVD basis of that step's gradient, 'rand'
    if it is the documented random draw, '-' if unchanged from the previous step."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape, generator=g))
    opt = GaLore([p], rank=2, inner="sgd", seed=3, **opt_kwargs)
    kinds, previous = [], None
    for k in range(steps):
        p.grad = torch.randn(*shape, generator=g)
        opt.step()
        P = opt.state[p]["projector"].clone()
        if previous is not None and torch.equal(P, previous):
            kinds.append("-")
        elif torch.allclose(P, top_singular_vectors(p.grad, 2), atol=1e-5):
            kinds.append("svd")
        elif torch.equal(P, random_orthonormal(5, 2, seed=basis_seed(3, 0, k))):
            kinds.append("rand")
        else:
            kinds.append("?")
        previous = P
    return kinds


def test_golore_at_x_percent_switches_at_the_right_step():
    # tau = 1: random from step 7 = ceil((1 - 0.3) * 10) on
    assert _bases_used(dict(golore_fraction=0.3, total_steps=10, update_proj_gap=1), 10) == \
        ["svd"] * 7 + ["rand"] * 3
    # tau = 3: refreshes after 0, 3, 6, 9 steps; the switch (5) takes effect at the next refresh (6)
    assert _bases_used(dict(golore_fraction=0.5, total_steps=10, update_proj_gap=3), 10) == \
        ["svd", "-", "-", "svd", "-", "-", "rand", "-", "-", "rand"]
    assert _bases_used(dict(golore_fraction=1.0, update_proj_gap=2), 4) == ["rand", "-", "rand", "-"]
    assert _bases_used(dict(update_proj_gap=2), 4) == ["svd", "-", "svd", "-"]


# randomness -------------------------------------------------------------------------------------

def test_random_basis_is_uniform_orthonormal(one_thread):
    P = random_orthonormal(64, 16, seed=5)
    assert P.dtype == torch.float32
    assert (P.T @ P - torch.eye(16)).abs().max() < 1e-6
    draws = torch.stack([random_orthonormal(10, 4, seed=s, dtype=torch.float64) for s in range(2000)])
    mean_projection = (draws @ draws.mT).mean(0)
    assert (mean_projection - 0.4 * torch.eye(10, dtype=torch.float64)).abs().max() < 0.03
    assert draws.mean(0).abs().max() < 0.06  # no sign bias (QR sign fix)
    assert torch.equal(random_orthonormal(10, 4, seed=9), random_orthonormal(10, 4, seed=9))


def test_seeding_is_deterministic_and_leaves_the_global_generator_alone():
    def bases(seed):
        ps = [torch.nn.Parameter(torch.zeros(4, 8)), torch.nn.Parameter(torch.zeros(4, 8))]
        opt = GoLore(ps, rank=2, seed=seed)
        for p in ps:
            p.grad = torch.ones(4, 8)
        opt.step()
        return [opt.state[p]["projector"].clone() for p in ps]

    rng = torch.get_rng_state()
    a, b, c = bases(0), bases(0), bases(1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])  # the parameter index enters the seed
    assert not torch.equal(a[0], c[0])
    assert len({basis_seed(0, i, k) for i in range(50) for k in range(200)}) == 50 * 200


# (e) resume, faults, arguments ------------------------------------------------------------------

def params_and_grads(dtype=torch.float32, seed=0, steps=10):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 10), (10, 6), (8, 8), (4, 2, 3)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in shapes]
    grads = [[torch.randn(*s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]
    return params, grads


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


MAKERS = {
    "galore_adamw": lambda ps, **kw: GaLore(ps, rank=3, update_proj_gap=2, lr=0.01, weight_decay=0.1, **kw),
    "golore50_sgd": lambda ps, **kw: GaLore(ps, rank=3, update_proj_gap=2, lr=0.01, inner="sgd",
                                            momentum=0.9, golore_fraction=0.5, total_steps=10, **kw),
    "golore_adamw_right": lambda ps, **kw: GoLore(ps, rank=2, update_proj_gap=3, proj_type="right", **kw),
    "galore_full_sgd": lambda ps, **kw: GaLore(ps, rank=3, update_proj_gap=2, lr=0.01, proj_type="full",
                                               inner="sgd", momentum=0.9, **kw),
    "golore50_full_adamw": lambda ps, **kw: GaLore(ps, rank=2, update_proj_gap=2, proj_type="full",
                                                   golore_fraction=0.5, total_steps=10, **kw),
    "golore_reverse_std": lambda ps, **kw: GoLore(ps, rank=2, update_proj_gap=3, proj_type="reverse_std",
                                                  **kw),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_resume_across_basis_changes_is_exact(make, dtype):
    params_a, grads = params_and_grads(dtype)
    opt_a = make(params_a)
    for gs in grads:
        set_grads(params_a, gs)
        opt_a.step()

    params_b, _ = params_and_grads(dtype)
    opt_b = make(params_b)
    for gs in grads[:5]:  # saved after 5 steps: the next refreshes (and the GoLore switch) follow
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
    opt_c = make(params_c, seed=1234)  # the saved seed comes back with the param groups
    opt_c.load_state_dict(saved["opt"])
    assert opt_c.param_groups[0]["seed"] == 0
    state = opt_c.state[params_c[0]]
    assert state["step"].device.type == "cpu" and state["step"].dtype == torch.int64
    assert state["skipped_steps"].dtype == torch.int64
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    for gs in grads[5:]:
        set_grads(params_c, gs)
        opt_c.step()
    for a, c in zip(params_a, params_c):
        assert torch.equal(a, c)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_non_finite_gradient_skips_and_keeps_state(make, bad):
    params, grads = params_and_grads()
    opt = make(params)
    for gs in grads[:4]:  # the 5th step is a refresh step for tau = 2
        set_grads(params, gs)
        opt.step()
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict()["state"])
    poisoned = [g.clone() for g in grads[4]]
    poisoned[1][2, 3] = bad
    set_grads(params, poisoned)
    opt.step()
    assert torch.equal(params[1], before_params[1])
    after = opt.state_dict()["state"]
    for key, value in before_state[1].items():
        if key not in ("step", "skipped_steps"):
            assert torch.equal(after[1][key], value), key
    assert int(after[1]["step"]) == 5
    assert not torch.equal(params[0], before_params[0])
    assert opt.diagnostics() == {"skipped_steps": 1, "basis_failures": 0}
    set_grads(params, grads[5])
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[1], before_params[1])


def test_a_skipped_step_is_as_if_it_never_happened():
    """tau = 1 GaLore: the basis comes from each gradient and bias correction counts applied
    steps, so g1, NaN, g2, g3 gives exactly g1, g2, g3."""
    W0, grad, _ = least_squares((6, 10))
    grads = [grad(W0 * (1 + 0.1 * i)) for i in range(3)]
    nan = torch.full_like(grads[0], float("nan"))
    a, opt = run(lambda p: GaLore(p, rank=3, update_proj_gap=1, lr=0.01), W0,
                 [grads[0], nan] + grads[1:], 4)
    b, _ = run(lambda p: GaLore(p, rank=3, update_proj_gap=1, lr=0.01), W0, grads, 3)
    assert torch.equal(a[1], a[0])
    assert torch.allclose(a[-1], b[-1], rtol=0, atol=1e-14)
    assert opt.diagnostics()["skipped_steps"] == 1


def test_first_step_skipped_leaves_a_zero_projector_and_the_parameter():
    p = torch.nn.Parameter(torch.randn(4, 6))
    before = p.detach().clone()
    opt = GoLore([p], rank=2, update_proj_gap=2)
    p.grad = torch.full((4, 6), float("inf"))
    opt.step()
    assert torch.equal(p, before) and torch.equal(opt.state[p]["projector"], torch.zeros(4, 2))
    p.grad = torch.randn(4, 6)
    opt.step()  # not a refresh step: zero projector, zero update
    assert torch.equal(p, before)
    opt.step()  # refresh
    assert not torch.equal(p, before) and torch.isfinite(p).all()


def test_zero_gradients_stay_finite():
    for cls, inner in [(GaLore, "adamw"), (GaLore, "sgd"), (GoLore, "adamw")]:
        p = torch.nn.Parameter(torch.randn(6, 9))
        opt = cls([p], rank=3, update_proj_gap=1, inner=inner, momentum=0.9)
        for _ in range(3):
            p.grad = torch.zeros_like(p)
            opt.step()
        assert torch.isfinite(p).all()
        assert opt.diagnostics() == {"skipped_steps": 0, "basis_failures": 0}


def test_argument_combinations_name_the_argument():
    p = [torch.nn.Parameter(torch.zeros(4, 4))]
    with pytest.raises(ValueError, match="total_steps"):
        GaLore(p, golore_fraction=0.2)
    with pytest.raises(ValueError, match="total_steps"):
        GoLore(p, golore_fraction=0.5)
    with pytest.raises(ValueError, match="nesterov"):
        GaLore(p, inner="sgd", nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        GaLore(p, inner="sgd", nesterov=True, momentum=0.9, dampening=0.1)
    GaLore(p, golore_fraction=1.0)  # pure GoLore needs no total_steps


def test_closure_param_groups_and_scheduler():
    model, x, y = two_layer_regression()
    opt = GaLore([{"params": [model[0].weight]},
                  {"params": [model[2].weight], "lr": 3e-2, "inner": "sgd", "momentum": 0.9}],
                 lr=0.05, rank=4, update_proj_gap=5)
    first, last = fit_with_closure(opt, model, x, y)
    assert last < 0.8 * first
    assert opt.param_groups[1]["lr"] == pytest.approx(3e-2 * 0.98**30)
    assert "momentum_buffer" in opt.state[model[2].weight] and "exp_avg" in opt.state[model[0].weight]
