import io

import pytest
import torch
from problems import least_squares, rel_err, run_optimizer, scaled_least_squares

import asgo
from asgo.optim import muon as muon_module
from asgo.optim.muon import Muon
from asgo.optim.reference import muon_step
from asgo.optim.reference import run as run_reference
from torch.optim._muon import _zeropower_via_newtonschulz  # torch's iteration, to compare bitwise

SHAPES = [(8, 32), (32, 8), (16, 16)]
HPARAMS = dict(lr=0.02, momentum=0.95, weight_decay=0.1)

SCALES = [1.0, 1e-3, 1e-4]
# With torch's settings the iterates equal torch.optim.Muon's bit for bit (CPU, torch 2.13). The
# relative tolerance the issue asks for, 1e-4 on W_t - W_0 over 10 steps, would also catch an
# ignored Nesterov term: that moves it to 3.2e-2..4.7e-2 (measured).
TORCH_TOLERANCE = 1e-4


def run_both(hp, ours, scale, rank=None, steps=10):
    """``steps`` steps of ``torch.optim.Muon(**hp)`` and ``Muon(**ours)``, each on one list of
    matrices (two of each of SHAPES, so same shapes are batched), gradients of size ``scale``
    (rank ``rank``). Returns the float64 iterates of both, and the starting points."""
    problems = [scaled_least_squares(shape, scale, rank, seed=seed)
                for seed, shape in enumerate(SHAPES + SHAPES)]

    def run(make):
        Ws = [torch.nn.Parameter(W0.float().clone()) for W0, _, _ in problems]
        opt, iterates = make(Ws), []
        for _ in range(steps):
            for W, (_, grad, _) in zip(Ws, problems):
                W.grad = grad(W.detach().double()).float()
            opt.step()
            iterates.append([W.detach().double().clone() for W in Ws])
        return iterates

    ref = run(lambda p: torch.optim.Muon(p, **hp))
    got = run(lambda p: Muon(p, **ours))
    return got, ref, [W0.float().double() for W0, _, _ in problems]


def largest_gap(got, ref, W0):
    """Largest relative gap of a displacement ``W_t - W_0``, over steps and matrices."""
    return max(rel_err(g - w, r - w) for gs, rs in zip(got, ref) for g, r, w in zip(gs, rs, W0))


@pytest.mark.parametrize("shape", [(8, 32), (32, 8), (16, 16), (64, 200), (300, 100)])
@pytest.mark.parametrize("scale", SCALES)
def test_newton_schulz_is_torch_bit_for_bit(shape, scale):
    torch.manual_seed(0)
    N = scale * torch.randn(3, *shape)
    N[1] = scale * torch.randn(shape[0], 2) @ torch.randn(2, shape[1])  # rank 2
    coeffs = (3.4445, -4.7750, 2.0315)
    ours = muon_module.newton_schulz(N, coeffs, 5, 1e-7)
    for got, n in zip(ours, N):
        assert torch.equal(got, _zeropower_via_newtonschulz(n, coeffs, 5, 1e-7))
        assert torch.equal(got, muon_module.newton_schulz(n[None], coeffs, 5, 1e-7)[0])


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("rank", [None, 2], ids=["full_rank", "rank2"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_matches_torch_muon_bit_for_bit(scale, rank, nesterov, adjust_lr_fn):
    hp = dict(HPARAMS, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    got, ref, W0 = run_both(hp, hp, scale, rank)
    assert largest_gap(got, ref, W0) < TORCH_TOLERANCE
    assert all(torch.equal(g, r) for gs, rs in zip(got, ref) for g, r in zip(gs, rs))


@pytest.mark.parametrize("scale", SCALES)
def test_tolerance_catches_a_dropped_nesterov_term(scale):
    """Measured: 3.2e-2 to 4.7e-2, over 300 times TORCH_TOLERANCE."""
    hp = dict(HPARAMS, nesterov=True)
    got, ref, W0 = run_both(hp, dict(hp, nesterov=False), scale)
    assert largest_gap(got, ref, W0) > 30 * TORCH_TOLERANCE


def test_matches_torch_muon_at_torch_defaults():
    got, ref, _ = run_both({}, {}, 1e-3)
    assert all(torch.equal(g, r) for gs, rs in zip(got, ref) for g, r in zip(gs, rs))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_polar_express_matches_float64_reference(shape, nesterov, adjust_lr_fn):
    """Measured: displacement within 4e-15 relative (Polar Express, 10 steps, float64)."""
    W0, grad, loss = least_squares(shape)
    hp = dict(HPARAMS, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ref = run_reference(muon_step, W0, grad, 5, **hp)
    got, _ = run_optimizer(lambda p: Muon(p, orthogonalize_method="polar_express", ns_steps=10, **hp),
                           W0, grad, 5, torch.float64)
    for t in range(5):
        assert rel_err(got[t] - W0, ref[t] - W0) < 1e-12, t


def test_polar_express_float32_near_reference():
    """Measured: 3.1e-6 relative displacement (float32 parameters and iteration)."""
    W0, grad, loss = least_squares((16, 32))
    hp = dict(HPARAMS, nesterov=True, adjust_lr_fn="original")
    ref = run_reference(muon_step, W0, grad, 5, **hp)
    got, _ = run_optimizer(lambda p: Muon(p, orthogonalize_method="polar_express", ns_steps=10, **hp),
                           W0, grad, 5)
    W0 = W0.float().double()
    for t in range(5):
        assert rel_err(got[t] - W0, ref[t] - W0) < 2e-5, t


def test_defaults_are_torch_muon_defaults():
    p = torch.nn.Parameter(torch.zeros(4, 6))
    ours, theirs = Muon([p]).defaults, torch.optim.Muon([p]).defaults
    assert {k: ours[k] for k in theirs} == theirs
    assert ours["orthogonalize_method"] == "newton_schulz" and ours["ns_dtype"] is None


def test_authors_baseline_update_rms_is_0_2_lr():
    """'match_rms_adamw' with an exact polar factor: RMS(lr_adj U V^T) = 0.2 lr for any shape."""
    for shape in [(8, 32), (48, 12)]:
        W = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
        W0 = W.detach().clone()
        opt = Muon([W], lr=1e-2, momentum=0.9, nesterov=False, weight_decay=0.0,
                   adjust_lr_fn="match_rms_adamw", orthogonalize_method="polar_express", ns_steps=10)
        W.grad = torch.randn_like(W)
        opt.step()
        assert (W.detach() - W0).square().mean().sqrt().item() == pytest.approx(0.2e-2, rel=1e-10)


def test_heavy_ball_and_lerp_conventions_agree():
    """torch's EMA buffer is (1 - mu) times the heavy-ball one: same normalised iteration input."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(6, 10, dtype=torch.float64))
    opt = Muon([W], momentum=0.9)
    B = torch.zeros_like(W)
    for _ in range(3):
        G = torch.randn_like(W)
        W.grad = G.clone()
        opt.step()
        B = 0.9 * B + G
    torch.testing.assert_close(opt.state[W]["momentum_buffer"], 0.1 * B, rtol=1e-14, atol=0)


def test_momentum_zero_update_is_the_orthogonalized_gradient():
    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(12, 20))
    W0, G = W.detach().clone(), torch.randn(12, 20)
    opt = Muon([W], lr=0.1, momentum=0.0, nesterov=True, weight_decay=0.0)
    W.grad = G.clone()
    opt.step()
    O = _zeropower_via_newtonschulz(G, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    torch.testing.assert_close(W.detach(), W0 - 0.1 * O, rtol=0, atol=1e-7)


@pytest.mark.parametrize("function", ["newton_schulz", "orthogonalize"])
def test_same_shapes_share_one_orthogonalize_call(monkeypatch, function):
    calls = []
    original = getattr(muon_module, function)

    def spy(G, *args, **kw):
        calls.append(tuple(G.shape))
        return original(G, *args, **kw)

    monkeypatch.setattr(muon_module, function, spy)
    params = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(3)]
    params += [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8, 2, 2, 2, 2))]
    method = "newton_schulz" if function == "newton_schulz" else "polar_express"
    opt = Muon(params, orthogonalize_method=method)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(calls) == sorted([(4, 8, 16), (1, 16, 8)])


def test_conv_weight_viewed_as_out_by_rest():
    torch.manual_seed(3)
    conv = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
    flat = torch.nn.Parameter(conv.detach().reshape(8, 27).clone())
    o1, o2 = Muon([conv], adjust_lr_fn="match_rms_adamw"), Muon([flat], adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(8, 27)
        conv.grad, flat.grad = g.reshape(8, 3, 3, 3).clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(conv.detach().reshape(8, 27), flat.detach())


def test_bf16_parameters_keep_float32_state():
    W0, grad, loss = least_squares((16, 32))
    ref32, _ = run_optimizer(lambda p: Muon(p, **HPARAMS), W0, grad, 10, torch.float32)
    got, opt = run_optimizer(lambda p: Muon(p, **HPARAMS), W0, grad, 10, torch.bfloat16)
    W = opt.param_groups[0]["params"][0]
    assert W.dtype == torch.bfloat16 and opt.state[W]["momentum_buffer"].dtype == torch.float32
    assert rel_err(got[-1] - W0.bfloat16().double(), ref32[-1] - W0.float().double()) < 0.15  # measured 0.087
    assert loss(got[-1]) < 0.9 * loss(W0)


def test_state_dict_with_ns_dtype_resumes_exactly_weights_only():
    torch.manual_seed(5)
    grads = [torch.randn(6, 10) for _ in range(6)]

    def make():
        W = torch.nn.Parameter(torch.ones(6, 10))
        return W, Muon([W], ns_dtype=torch.bfloat16, orthogonalize_method="polar_express")

    def run(W, opt, gs):
        for g in gs:
            W.grad = g.clone()
            opt.step()

    W_a, opt_a = make()
    run(W_a, opt_a, grads)
    W_b, opt_b = make()
    run(W_b, opt_b, grads[:3])
    buf = io.BytesIO()
    torch.save({"W": W_b.detach(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    W_c, opt_c = make()
    with torch.no_grad():
        W_c.copy_(saved["W"])
    opt_c.load_state_dict(saved["opt"])
    assert opt_c.param_groups[0]["ns_dtype"] == torch.bfloat16
    run(W_c, opt_c, grads[3:])
    assert torch.equal(W_a, W_c)


def test_orthogonalize_dtype_argument():
    G = torch.randn(6, 10)
    assert asgo.orthogonalize(G).dtype == torch.float32
    assert asgo.orthogonalize(G.bfloat16()).dtype == torch.float32
    assert asgo.orthogonalize(G.double()).dtype == torch.float64
    assert torch.equal(asgo.orthogonalize(G, dtype=None), asgo.orthogonalize(G))
    low = asgo.orthogonalize(G, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    assert rel_err(low.double(), asgo.orthogonalize(G.double())) < 0.1
    assert asgo.orthogonalize(G.bfloat16(), dtype=torch.float64).dtype == torch.float64
