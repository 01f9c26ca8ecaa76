"""Sanity checks of the float64 references themselves (asgo.optim.reference), by hand."""

import math

import pytest
import torch

from asgo.optim.reference import (
    adafactor_step,
    asgo_step,
    damped_fourth_root,
    dasgo_step,
    galore_step,
    muon_step,
    polar_factor,
    run,
    shampoo_step,
)

F64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("shape", [(3, 5), (5, 3)])
def test_asgo_moments_are_the_emas_by_hand(shape):
    """Two steps, update_rms=None: M, V (on the smaller side) and W by hand."""
    W0, G1, G2 = randn(*shape, seed=0), randn(*shape, seed=1), randn(*shape, seed=2)
    hp = dict(lr=0.1, momentum=0.6, beta2=0.7, eps=1e-10, weight_decay=0.2, update_rms=None)
    state = {}
    W1 = asgo_step(W0, G1, state, **hp)
    W2 = asgo_step(W1, G2, state, **hp)
    left = shape[0] < shape[1]
    gram = (lambda G: G @ G.T) if left else (lambda G: G.T @ G)
    V = 0.7 * (0.3 * gram(G1)) + 0.3 * gram(G2)
    M = 0.6 * (0.4 * G1) + 0.4 * G2
    assert state["t"] == 2 and state["V"].shape == (min(shape),) * 2
    torch.testing.assert_close(state["V"], V, rtol=1e-14, atol=0)
    torch.testing.assert_close(state["M"], M, rtol=1e-14, atol=0)
    e, Q = torch.linalg.eigh(V + 1e-10 * torch.eye(min(shape), dtype=F64))
    root = Q @ torch.diag(e**-0.5) @ Q.T
    U = root @ M if left else M @ root
    torch.testing.assert_close(W2, W1 * (1 - 0.1 * 0.2) - 0.1 * U, rtol=1e-12, atol=0)


def test_asgo_root_whitens_v_at_root_steps_only():
    """Q (V + eps I) Q = I after a root step; between root steps Q is the previous root."""
    hp = dict(lr=0.1, momentum=0.9, beta2=0.8, eps=1e-10, weight_decay=0.0, update_rms=0.2,
              precondition_frequency=2)
    W, state = randn(4, 9), {}
    eye = torch.eye(4, dtype=F64)
    for t in range(1, 5):
        W = asgo_step(W, randn(4, 9, seed=t), state, **hp)
        Q, V = state["Q"], state["V"]
        whitened = Q @ (V + 1e-10 * eye) @ Q
        if t % 2 == 1:
            assert (whitened - eye).abs().max() < 1e-10, t
            assert (Q @ V @ Q - eye).abs().max() < 1e-8, t
        else:
            assert (whitened - eye).abs().max() > 1e-3, t


def test_asgo_before_start_is_rms_scaled_momentum():
    hp = dict(lr=0.1, momentum=0.5, beta2=0.8, eps=1e-10, weight_decay=0.0, update_rms=0.2,
              start_preconditioning_step=2)
    W0, G = randn(4, 6), randn(4, 6, seed=1)
    W1 = asgo_step(W0, G, {}, **hp)
    torch.testing.assert_close(W0 - W1, 0.1 * 0.2 * math.sqrt(24) * G / G.norm(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_update_has_unit_singular_values(shape, nesterov):
    """'original' on a wide matrix has lr_adj = lr; on a tall one lr sqrt(m / n)."""
    hp = dict(lr=1.0, momentum=0.9, nesterov=nesterov, weight_decay=0.0, adjust_lr_fn="original")
    W, state = randn(*shape), {}
    ratio = math.sqrt(max(1, shape[0] / shape[1]))
    for t in range(3):
        W_new = muon_step(W, randn(*shape, seed=t + 1), state, **hp)
        s = torch.linalg.svdvals(W - W_new) / ratio
        torch.testing.assert_close(s, torch.ones(min(shape), dtype=F64), rtol=0, atol=1e-12)
        W = W_new


def test_muon_match_rms_adamw_gives_update_rms_0_2_lr():
    W0 = randn(8, 20)
    W1 = muon_step(W0, randn(8, 20, seed=1), {}, lr=0.01, momentum=0.9, nesterov=False,
                   weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    assert (W1 - W0).square().mean().sqrt().item() == pytest.approx(0.2 * 0.01, rel=1e-12)


def test_dasgo_scales_columns_by_hand():
    """2 x 3, momentum = beta2 = 0: v = column sums of G*G = (25, 4, 2), U = G / sqrt(v)."""
    G = torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, -1.0]], dtype=F64)
    W0 = torch.zeros(2, 3, dtype=F64)
    hp = dict(lr=1.0, momentum=0.0, beta2=0.0, eps=1e-30, weight_decay=0.0)
    state = {}
    W1 = dasgo_step(W0, G, state, update_rms=None, **hp)
    r = 1 / math.sqrt(2)
    U = torch.tensor([[3 / 5, 0.0, r], [4 / 5, 1.0, -r]], dtype=F64)
    torch.testing.assert_close(state["v"], torch.tensor([25.0, 4.0, 2.0], dtype=F64))
    torch.testing.assert_close(W0 - W1, U, rtol=1e-15, atol=0)
    W1 = dasgo_step(W0, G, {}, update_rms=0.2, **hp)
    torch.testing.assert_close(W0 - W1, U * 0.2 * math.sqrt(6) / U.norm(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("clip_threshold", [None, 1.0])
def test_adafactor_first_step_by_hand(clip_threshold):
    """G = [[1, 2], [3, 4]], beta2_1 = 1/2: R = (2.5, 12.5), C = (5, 10), 1^T R = 15,
    W = R C^T / 15 = [[5/6, 5/3], [25/6, 25/3]], U = G / sqrt(W), RMS(U) = sqrt(48) / 5 > 1."""
    G = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    X0 = torch.zeros(2, 2, dtype=F64)
    state = {}
    X1 = adafactor_step(X0, G, state, lr=0.1, c=0.8, lr_decay=0.5, eps1=1e-30,
                        clip_threshold=clip_threshold, clip_alpha=None)
    U = torch.tensor([[math.sqrt(6 / 5), 2 * math.sqrt(3 / 5)],
                      [3 * math.sqrt(6) / 5, 4 * math.sqrt(3) / 5]], dtype=F64)
    torch.testing.assert_close(state["R"].flatten(), torch.tensor([2.5, 12.5], dtype=F64))
    torch.testing.assert_close(state["C"].flatten(), torch.tensor([5.0, 10.0], dtype=F64))
    clip = 1.0 if clip_threshold is None else math.sqrt(48) / 5
    torch.testing.assert_close(X0 - X1, 0.1 * U / clip, rtol=1e-14, atol=0)
    assert state["clipped"] == (clip_threshold is not None)


def test_adafactor_vector_is_unfactored_and_schedules_decay():
    """1-D: v = beta2_k v + (1 - beta2_k) g^2; step 2 has beta2_2 = 1 - 2^(-c), rho_2 = lr 2^(-p)."""
    g1, g2 = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([3.0, 1.0], dtype=F64)
    hp = dict(lr=0.1, c=1.0, lr_decay=0.5, eps1=1e-30, clip_threshold=None, clip_alpha=None)
    state = {}
    x1 = adafactor_step(torch.zeros(2, dtype=F64), g1, state, **hp)
    x2 = adafactor_step(x1, g2, state, **hp)
    v2 = 0.5 * (0.5 * g1**2) + 0.5 * g2**2
    torch.testing.assert_close(x1 - x2, 0.1 / math.sqrt(2) * g2 / v2.sqrt(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
@pytest.mark.parametrize("golore_fraction", [0.0, 1.0])
@pytest.mark.parametrize("nesterov", [False, True])
def test_galore_full_rank_sgd_is_plain_momentum_sgd(shape, golore_fraction, nesterov):
    """rank = min(m, n): P is square orthogonal and the re-projected buffer is SGD's."""
    mu, damp = 0.9, 0.0 if nesterov else 0.3
    hp = dict(rank=min(shape), update_proj_gap=2, lr=0.1, inner="sgd", momentum=mu,
              dampening=damp, nesterov=nesterov, golore_fraction=golore_fraction)
    grads = [randn(*shape, seed=t) for t in range(6)]
    got = run(galore_step, randn(*shape), lambda W, it=iter(grads): next(it), 6, **hp)
    W, B = randn(*shape), None
    for t, G in enumerate(grads):
        B = G.clone() if B is None else mu * B + (1 - damp) * G
        W = W - 0.1 * (G + mu * B if nesterov else B)
        torch.testing.assert_close(got[t], W, rtol=0, atol=1e-13)


def test_galore_low_rank_update_lies_in_the_top_singular_subspace():
    G = randn(5, 12)
    W1 = galore_step(torch.zeros(5, 12, dtype=F64), G, {}, rank=2, update_proj_gap=1, lr=1.0,
                     inner="sgd")
    U = torch.linalg.svd(G).U[:, :2]
    torch.testing.assert_close(-W1, U @ U.T @ G, rtol=0, atol=1e-13)


def test_shampoo_one_step_on_a_square_gradient_is_its_polar_factor():
    """momentum = beta2 = 0: (G G^T)^(-1/4) G (G^T G)^(-1/4) = U V^T (up to the damping)."""
    G = randn(5, 5)
    W1 = shampoo_step(torch.zeros(5, 5, dtype=F64), G, {}, lr=1.0, momentum=0.0, beta2=0.0,
                      eps=1e-30, weight_decay=0.0, grafting="none")
    torch.testing.assert_close(-W1, polar_factor(G), rtol=0, atol=1e-8)


def test_damped_fourth_root_to_the_fourth_inverts():
    A = randn(6, 6)
    A = A @ A.T
    X = damped_fourth_root(A, eps=1e-3)
    d = 1e-3 + 16 * torch.finfo(F64).eps * A.norm()
    torch.testing.assert_close(X @ X @ X @ X @ (A + d * torch.eye(6, dtype=F64)),
                               torch.eye(6, dtype=F64), rtol=0, atol=1e-10)


def test_run_returns_independent_iterates_and_leaves_w0_alone():
    W0 = randn(3, 4)
    before = W0.clone()
    its = run(dasgo_step, W0, lambda W: W, 3, lr=0.1, momentum=0.0, beta2=0.0, eps=1e-8,
              weight_decay=0.0, update_rms=0.2)
    assert torch.equal(W0, before) and len(its) == 3
    assert not torch.equal(its[0], its[1]) and not torch.equal(its[1], its[2])
