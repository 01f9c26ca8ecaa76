import io

import pytest
import torch
from problems import least_squares, rel_err, run_optimizer

import asgo
from asgo.optim import muon as muon_module
from asgo.optim.muon import Muon
from asgo.optim.reference import muon_step
from asgo.optim.reference import run as run_reference

SHAPES = [(8, 32), (32, 8), (16, 16)]
HPARAMS = dict(lr=0.02, momentum=0.95, weight_decay=0.1)

# Largest relative gap to torch.optim.Muon over 10 steps on SHAPES (both nesterov, both
# adjust_lr_fn), of the iterates W_t and of the displacement W_t - W_0, measured on CPU (torch 2.13):
#   ns_dtype=bfloat16: iterates 7.0e-3, displacement 4.9e-2. Both iterations run in bfloat16 but
#     torch fuses b A + c A^2 and a X + B X into addmm (one rounding each) while
#     asgo.linalg.orthogonalize rounds every product and sum, so the two differ by bfloat16
#     round-off (~3.5e-2 per call), as much as torch's iteration differs from exact arithmetic.
#   ns_dtype=None (float32): iterates 3.2e-3, displacement 1.9e-2 (torch's bfloat16 round-off).
TORCH_TOLERANCES = {torch.bfloat16: (1.5e-2, 8e-2), None: (6e-3, 3e-2)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, None], ids=["bf16", "fp32"])
def test_matches_torch_muon(shape, nesterov, adjust_lr_fn, ns_dtype):
    W0, grad, loss = least_squares(shape)
    hp = dict(HPARAMS, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ref, _ = run_optimizer(lambda p: torch.optim.Muon(p, **hp), W0, grad, 10)
    got, _ = run_optimizer(lambda p: Muon(p, ns_dtype=ns_dtype, **hp), W0, grad, 10)
    tol_iterate, tol_step = TORCH_TOLERANCES[ns_dtype]
    W0 = W0.float().double()
    for t in range(10):
        assert rel_err(got[t], ref[t]) < tol_iterate, t
        assert rel_err(got[t] - W0, ref[t] - W0) < tol_step, t
    assert loss(got[-1]) < loss(W0)


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
    torch.testing.assert_close(W.detach(), W0 - 0.1 * asgo.orthogonalize(G), rtol=0, atol=1e-6)


def test_same_shapes_share_one_orthogonalize_call(monkeypatch):
    calls = []
    original = muon_module.orthogonalize

    def spy(G, **kw):
        calls.append(tuple(G.shape))
        return original(G, **kw)

    monkeypatch.setattr(muon_module, "orthogonalize", spy)
    params = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(3)]
    params += [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8, 2, 2, 2, 2))]
    opt = Muon(params)
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
    assert rel_err(got[-1] - W0.bfloat16().double(), ref32[-1] - W0.float().double()) < 0.15  # measured 0.089
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
