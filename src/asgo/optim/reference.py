r"""Plain float64 reference implementations of every update rule in :mod:`asgo.optim`.

One short function per algorithm, one step on one matrix, written line for line from the
equations in the optimizer's docstring, for reading and for testing: the optimizers of this
package are tested against these functions (``tests/optim``). Everything is float64; matrix
functions are exact, by ``torch.linalg.eigh`` / ``torch.linalg.svd`` (never the iterations of
:mod:`asgo.linalg`, so the references do not depend on the code they test). There is no
batching, no blocking or head splitting, no handling of non-finite values, no dtype handling:
a parameter is one float64 matrix ``W`` (Adafactor: any shape), and nothing is done in place.

Every ``*_step`` function has the form ::

    W_new = algorithm_step(W, G, state, **hyper_parameters)

``state`` is a dict, empty before the first step, which the function fills and updates (its
keys are the letters of the equations: ``t`` the step count, ``M`` the first moment, ...).
Hyper-parameters have the optimizers' names, so the same keyword dict drives both::

    from asgo.optim.reference import asgo_step, run

    iterates = run(asgo_step, W0, grad_fn, 10, lr=1e-2, momentum=0.9, beta2=0.8, eps=1e-10,
                   weight_decay=0.1, update_rms=0.2)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from asgo.optim.galore import basis_seed, random_orthonormal

__all__ = [
    "adafactor_step", "asgo_step", "damped_fourth_root", "dasgo_step", "galore_step",
    "matrix_power", "muon_step", "polar_factor", "run", "shampoo_step",
]

F64 = torch.float64
FLOAT64_ROUNDOFF_FLOOR = 16 * torch.finfo(F64).eps  # Shampoo's damping floor in float64


# --- exact matrix functions -------------------------------------------------------------------

def matrix_power(A: Tensor, power: float) -> Tensor:
    """``A^power`` of a symmetric positive definite ``A``: ``Q diag(e^power) Q^T`` by eigh."""
    e, Q = torch.linalg.eigh(A)
    return (Q * e.pow(power)) @ Q.T


def polar_factor(X: Tensor) -> Tensor:
    """``U V^T`` of the reduced SVD ``X = U S V^T``: the orthogonal factor of ``X``."""
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def damped_fourth_root(A: Tensor, eps: float, floor: float = FLOAT64_ROUNDOFF_FLOOR,
                       relative: bool = False) -> Tensor:
    """Shampoo's root ``(A + d I)^(-1/4)`` with ``d = max(eps, floor ||A||_F)``, or
    ``d = max(eps, floor) ||A||_F`` when ``relative``."""
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    d = max(eps, floor) * A.norm() if relative else max(eps, floor * A.norm())
    return matrix_power(A + d * eye, -0.25)


def _sign_fixed(U: Tensor) -> Tensor:
    """Each column's sign chosen so that its entry of largest magnitude is positive."""
    idx = U.abs().argmax(dim=0)
    return U * torch.sign(U[idx, torch.arange(U.shape[1])])


# --- the update rules -------------------------------------------------------------------------

def asgo_step(W, G, state, *, lr, momentum, beta2, eps, weight_decay, update_rms,
              precondition_frequency=1, start_preconditioning_step=1):
    """ASGO (An et al., Algorithm 2), :class:`asgo.ASGO`: one-sided ``V^(-1/2)`` on the smaller
    side (the left when ``m < n``, else the right), root recomputed at steps ``s, s + tau, ...``
    (identity before ``s``), update scaled to RMS ``update_rms`` unless it is None."""
    m, n = W.shape
    left = m < n
    s = min(m, n)
    if not state:
        state.update(t=0, M=torch.zeros_like(W), V=torch.zeros(s, s, dtype=F64),
                     Q=torch.eye(s, dtype=F64))
    t = state["t"] = state["t"] + 1
    M = state["M"] = momentum * state["M"] + (1 - momentum) * G
    V = state["V"] = beta2 * state["V"] + (1 - beta2) * (G @ G.T if left else G.T @ G)
    start, tau = start_preconditioning_step, precondition_frequency
    if t >= start and (t - start) % tau == 0:
        state["Q"] = matrix_power(V + eps * torch.eye(s, dtype=F64), -0.5)
    Q = state["Q"]
    U = Q @ M if left else M @ Q
    if update_rms is not None:
        U = U * update_rms * math.sqrt(m * n) / U.norm()
    return W * (1 - lr * weight_decay) - lr * U


def dasgo_step(W, G, state, *, lr, momentum, beta2, eps, weight_decay, update_rms):
    """DASGO (An et al., Algorithm 4), :class:`asgo.DASGO`: one scale per column,
    ``U = M diag(v + eps)^(-1/2)`` with ``v`` the EMA of the columns' squared norms."""
    m, n = W.shape
    if not state:
        state.update(M=torch.zeros_like(W), v=torch.zeros(n, dtype=F64))
    M = state["M"] = momentum * state["M"] + (1 - momentum) * G
    v = state["v"] = beta2 * state["v"] + (1 - beta2) * torch.diag(G.T @ G)
    U = M @ torch.diag((v + eps) ** -0.5)
    if update_rms is not None:
        U = U * update_rms * math.sqrt(m * n) / U.norm()
    return W * (1 - lr * weight_decay) - lr * U


def muon_step(W, G, state, *, lr, momentum, nesterov, weight_decay, adjust_lr_fn=None):
    """Muon, :class:`asgo.Muon` (= ``torch.optim.Muon``) with the exact polar factor. The EMA
    buffer ``B`` is ``(1 - mu)`` times the heavy-ball one of torch's docstring
    (``B = mu B + G``, Nesterov ``G + mu B``): the same direction, so the same polar factor."""
    m, n = W.shape
    if not state:
        state.update(B=torch.zeros_like(W))
    B = state["B"] = momentum * state["B"] + (1 - momentum) * G
    N = (1 - momentum) * G + momentum * B if nesterov else B
    if adjust_lr_fn == "match_rms_adamw":
        lr_adj = lr * 0.2 * math.sqrt(max(m, n))
    else:  # 'original' or None
        lr_adj = lr * math.sqrt(max(1, m / n))
    return W * (1 - lr * weight_decay) - lr_adj * polar_factor(N)


def shampoo_step(W, G, state, *, lr, momentum, beta2, eps, weight_decay, grafting,
                 grafting_eps=1e-10, precondition_frequency=1, start_preconditioning_step=1,
                 relative_eps=False, pre_start_update="momentum", floor=FLOAT64_ROUNDOFF_FLOOR):
    """Shampoo as :class:`asgo.Shampoo` (the ASGO authors' baseline), one block (no blocking):
    ``U = L^(-1/4) M R^(-1/4)`` with damped roots (:func:`damped_fourth_root`; ``floor`` is the
    round-off floor, 16 finfo.eps of the dtype mimicked), grafted to the norm of Adam's
    ``A = M / sqrt(v + grafting_eps)`` when ``grafting='adam'``. Before step ``s`` the roots are
    the identity, and with ``pre_start_update='grafting'`` (and Adam grafting) ``U = A``."""
    m, n = W.shape
    if not state:
        state.update(t=0, M=torch.zeros_like(W), v=torch.zeros_like(W),
                     L=torch.zeros(m, m, dtype=F64), R=torch.zeros(n, n, dtype=F64),
                     P=torch.eye(m, dtype=F64), Q=torch.eye(n, dtype=F64))
    t = state["t"] = state["t"] + 1
    M = state["M"] = momentum * state["M"] + (1 - momentum) * G
    v = state["v"] = beta2 * state["v"] + (1 - beta2) * G * G
    L = state["L"] = beta2 * state["L"] + (1 - beta2) * G @ G.T
    R = state["R"] = beta2 * state["R"] + (1 - beta2) * G.T @ G
    start, tau = start_preconditioning_step, precondition_frequency
    if t >= start and (t - start) % tau == 0:
        state["P"] = damped_fourth_root(L, eps, floor, relative_eps)
        state["Q"] = damped_fourth_root(R, eps, floor, relative_eps)
    U = state["P"] @ M @ state["Q"]
    if grafting == "adam":
        A = M / (v + grafting_eps).sqrt()
        U = A if t < start and pre_start_update == "grafting" else U * A.norm() / U.norm()
    return W * (1 - lr * weight_decay) - lr * U


def adafactor_step(X, G, state, *, lr, c, lr_decay, eps1, clip_threshold, clip_alpha,
                   momentum=None, weight_decay=0.0, beta2_first=0.5):
    """Adafactor (Hong & Lin, Algorithm 1), :class:`asgo.Adafactor`, plus its extensions (first
    moment ``momentum`` on the clipped update, decoupled weight decay). ``X`` of 2 or more
    dimensions is factored over its last two (a batch of ``n x m`` matrices, the clipping RMS
    over the whole tensor); 0-D and 1-D ``X`` use the unfactored second moment ``v``.
    ``state['clipped']`` counts the steps whose update was clipped."""
    if not state:
        state.update(k=0, R=0.0, C=0.0, v=0.0, M=0.0, clipped=0)
    k = state["k"] = state["k"] + 1
    beta2 = beta2_first if k == 1 else 1 - k ** (-c)
    rho = lr * k ** (-lr_decay)
    if X.ndim >= 2:
        n, m = X.shape[-2:]
        one_n = torch.ones(n, 1, dtype=F64)
        one_m = torch.ones(m, 1, dtype=F64)
        S = G * G + eps1 * one_n @ one_m.T
        R = state["R"] = beta2 * state["R"] + (1 - beta2) * S @ one_m       # (..., n, 1)
        C = state["C"] = beta2 * state["C"] + (1 - beta2) * one_n.T @ S     # (..., 1, m)
        W = (R @ C) / (one_n.T @ R)
    else:
        W = state["v"] = beta2 * state["v"] + (1 - beta2) * (G * G + eps1)
    U = G / W.sqrt()
    factor = 1.0
    if clip_threshold is not None:
        d = clip_threshold * (k ** (c / (2 * (clip_alpha - 1))) if clip_alpha else 1.0)
        rms = (U.norm() / math.sqrt(U.numel())).item()
        factor = max(1.0, rms / d)
        state["clipped"] += int(rms > d)
    if momentum is None:
        step = (rho / factor) * U
    else:
        M = state["M"] = momentum * state["M"] + (1 - momentum) * U / factor
        step = rho * M
    return X * (1 - rho * weight_decay) - step


def galore_step(W, G, state, *, rank, update_proj_gap, lr, proj_type="std", inner="adamw",
                scale=1.0, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, momentum=0.0,
                dampening=0.0, nesterov=False, golore_fraction=0.0, total_steps=None, seed=0,
                index=0, reproject_moments=True):
    """GaLore / GoLore (He et al., Algorithm 1), :class:`asgo.GaLore`, in the natural orientation
    (left: ``R = P^T G``, ``P`` m x r; right: ``R = G P``, ``P`` n x r; full: ``R = P^T G Q``).
    ``'std'`` projects the short side (right when ``m >= n``), ``'reverse_std'`` the long one
    (left when ``m >= n``). The basis is refreshed after ``k = 0, tau, 2 tau, ...`` steps: the
    sign-fixed top-r singular vectors of ``G`` by SVD (GaLore; for ``'full'`` ``P = U_r``,
    ``Q = V_r`` with the signs fixed on ``U_r``), or, once ``k >= (1 - golore_fraction)
    total_steps``, the random orthonormal basis of :func:`asgo.optim.galore.random_orthonormal`
    seeded by ``basis_seed(seed, index, k)`` (``Q``: ``basis_seed(seed, index, k, 1)``) (GoLore;
    ``index`` is the parameter's index in the optimizer)."""
    m, n = W.shape
    full = proj_type == "full"
    right = (proj_type == "right" or (proj_type == "std" and m >= n)
             or (proj_type == "reverse_std" and m < n))
    r = min(rank, m, n)
    if not state:
        shape = (r, r) if full else (m, r) if right else (r, n)
        state.update(t=0, P=torch.zeros(n if right else m, r, dtype=F64),
                     Q=torch.zeros(n, r, dtype=F64),
                     M=torch.zeros(shape, dtype=F64), V=torch.zeros(shape, dtype=F64))
    t = state["t"] = state["t"] + 1
    P, Q, M, V = state["P"], state["Q"], state["M"], state["V"]
    k = t - 1  # steps taken before this one
    if k % update_proj_gap == 0:
        Q_new = Q
        if golore_fraction > 0 and k >= (1 - golore_fraction) * (total_steps or 0) - 1e-9:
            P_new = random_orthonormal(P.shape[0], r, seed=basis_seed(seed, index, k), dtype=F64)
            if full:
                Q_new = random_orthonormal(n, r, seed=basis_seed(seed, index, k, 1), dtype=F64)
        elif full:
            U, _, Vh = torch.linalg.svd(G)
            signs = torch.sign(U[U[:, :r].abs().argmax(dim=0), torch.arange(r)])
            P_new, Q_new = U[:, :r] * signs, Vh[:r].T * signs
        elif right:
            P_new = _sign_fixed(torch.linalg.svd(G).Vh[:r].T)
        else:
            P_new = _sign_fixed(torch.linalg.svd(G).U[:, :r])
        if reproject_moments:  # carry the first moment into the new basis
            if full:
                M = (P_new.T @ P) @ M @ (Q.T @ Q_new)
            else:
                M = M @ (P.T @ P_new) if right else (P_new.T @ P) @ M
        P, Q = P_new, Q_new
    R = P.T @ G @ Q if full else G @ P if right else P.T @ G
    if inner == "adamw":
        beta1, beta2 = betas
        M = beta1 * M + (1 - beta1) * R
        V = beta2 * V + (1 - beta2) * R * R
        N = (M / (1 - beta1**t)) / ((V / (1 - beta2**t)).sqrt() + eps)
    elif momentum > 0:  # torch.optim.SGD: the first buffer is the gradient
        M = R.clone() if t == 1 else momentum * M + (1 - dampening) * R
        N = R + momentum * M if nesterov else M
    else:
        N = R
    state.update(P=P, Q=Q, M=M, V=V)
    U = P @ N @ Q.T if full else N @ P.T if right else P @ N
    return W * (1 - lr * weight_decay) - lr * scale * U


# --- driver -----------------------------------------------------------------------------------

def run(step, W0, grad, steps, **hyper_parameters):
    """``steps`` steps of ``step`` (one of the ``*_step`` functions) from ``W0`` with gradients
    ``grad(W)``, in float64; returns the iterates ``[W_1, ..., W_steps]``."""
    W, state, iterates = W0.to(F64).clone(), {}, []
    for _ in range(steps):
        W = step(W, grad(W).to(F64), state, **hyper_parameters)
        iterates.append(W)
    return iterates
