"""Matrix functions shared by the optimizers: inverse square roots and orthogonalisation.

Every function is batched over leading dimensions, does its maths in float32 whatever the
input dtype (float64 stays float64) and never synchronises with the host.

Both iterations below apply an odd polynomial ``p(x) = a x + b x^3 + c x^5`` to the singular
values (orthogonalisation) or to ``sqrt(z * y)`` in each eigen-direction (the coupled
inverse-root iteration), so one coefficient schedule serves both:

* ``newton_schulz``: fixed coefficients (Newton–Schulz, ASGO Algorithm 3 / Muon's quintic).
* ``polar_express``: the per-step minimax coefficients of Polar Express (Amsel et al., 2025),
  as used by the ASGO authors' code.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

InverseSqrtMethod = Literal["polar_express", "newton_schulz", "eigh"]
OrthogonalizeMethod = Literal["newton_schulz", "polar_express"]

INVERSE_SQRT_METHODS = ("polar_express", "newton_schulz", "eigh")
ORTHOGONALIZE_METHODS = ("newton_schulz", "polar_express")

# Coupled Newton–Schulz for V^(-1/2) (ASGO authors' `_matrix_inverse_root_newtonschulz`).
NEWTON_SCHULZ_INVERSE_SQRT_COEFFS = (2.0, -1.5, 0.5)
# Muon's quintic orthogonalisation (Keller Jordan; torch.optim.Muon's default).
NEWTON_SCHULZ_ORTHOGONALIZE_COEFFS = (3.4445, -4.7750, 2.0315)

_POLAR_EXPRESS_SAFETY = 1.01
_POLAR_EXPRESS_COEFFS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
_POLAR_EXPRESS_TAIL = (1.875, -1.25, 0.375)


def polar_express_coefficients(steps: int) -> list[tuple[float, float, float]]:
    """Coefficients ``(a, b, c)`` of each Polar Express step.

    The first seven minimax triples are divided by ``(1.01, 1.01^3, 1.01^5)`` for safety against
    round-off; later steps repeat the limit ``(1.875, -1.25, 0.375)``.
    """
    s = _POLAR_EXPRESS_SAFETY
    coeffs = [(a / s, b / s**3, c / s**5) for a, b, c in _POLAR_EXPRESS_COEFFS[:steps]]
    return coeffs + [_POLAR_EXPRESS_TAIL] * max(0, steps - len(coeffs))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_square(A: Tensor, name: str) -> None:
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be a (batch of) square matrices, got shape {tuple(A.shape)}")


def _coefficients(method: str, steps: int, fixed: tuple[float, float, float]):
    if method == "polar_express":
        return polar_express_coefficients(steps)
    return [fixed] * steps


def _is_finite(X: Tensor) -> Tensor:
    return torch.isfinite(X).all(dim=-1).all(dim=-1)


def inverse_sqrt(
    A: Tensor,
    *,
    method: InverseSqrtMethod = "polar_express",
    steps: int = 10,
    eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Inverse square root ``(A + eps I)^(-1/2)`` of symmetric PSD matrices ``A`` of shape (..., s, s).

    ``eps`` is an absolute damping added to the diagonal before the root (not relative to the
    trace). Methods:

    * ``'newton_schulz'`` (ASGO Algorithm 3): coupled iteration on ``Y0 = (A + eps I) / c``,
      ``c = ||A + eps I||_F``, ``Z0 = I``; each step ``B = b ZY + c' (ZY)^2``, ``Y <- aY + YB``,
      ``Z <- aZ + BZ`` with ``(a, b, c') = (2, -1.5, 0.5)``; returns ``Z / sqrt(c)``.
    * ``'polar_express'``: the same iteration with the Polar Express schedule and
      ``c = 1.01 ||A + eps I||_F`` (the ASGO authors' default solver; their code adds eps only
      inside the norm, which for eps=1e-10 is below float32 resolution unless ``||A|| < 1e-3``).
    * ``'eigh'``: exact, via ``torch.linalg.eigh``; eigenvalues are floored at
      ``finfo.eps * max(lambda_max, tiny)`` so singular inputs stay finite.

    The iterations converge for eigenvalues whose ratio to ``c`` is not too small: with the
    default 10 steps both reach float32 round-off for condition numbers up to about 1e3, and
    truncate the smallest eigenvalues beyond that (see docs/linalg.md for measured accuracy).
    On rank-deficient ``A`` the null-space gain stays finite; the number of steps then acts as
    a hidden damping.

    Returns ``(X, ok)``: ``X`` in float32 (float64 for float64 input) and a boolean tensor of shape
    ``A.shape[:-2]`` telling which matrices came out finite, computed without a host sync.
    """
    _check_square(A, "A")
    if method not in INVERSE_SQRT_METHODS:
        raise ValueError(f"method must be one of {INVERSE_SQRT_METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    A = A.to(compute_dtype(A.dtype))
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    if eps:
        A = A + eps * eye
    if method == "eigh":
        X = _inverse_sqrt_eigh(A)
    else:
        X = _inverse_sqrt_coupled(A, eye, method, steps)
    return X, _is_finite(X)


def _inverse_sqrt_eigh(A: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(A)
    finfo = torch.finfo(A.dtype)
    floor = evals[..., -1:].clamp_min(finfo.tiny) * finfo.eps
    return (evecs * evals.clamp_min(floor).rsqrt().unsqueeze(-2)) @ evecs.mT


def _inverse_sqrt_coupled(A: Tensor, eye: Tensor, method: str, steps: int) -> Tensor:
    scale = torch.linalg.matrix_norm(A, keepdim=True)
    if method == "polar_express":
        scale = scale * _POLAR_EXPRESS_SAFETY
    scale = scale.clamp_min(torch.finfo(A.dtype).tiny)
    Y = A / scale
    Z = eye.expand_as(A)
    for a, b, c in _coefficients(method, steps, NEWTON_SCHULZ_INVERSE_SQRT_COEFFS):
        ZY = Z @ Y
        B = b * ZY + c * (ZY @ ZY)
        Y = a * Y + Y @ B
        Z = a * Z + B @ Z
    return Z / scale.sqrt()


def orthogonalize(
    G: Tensor,
    *,
    method: OrthogonalizeMethod = "newton_schulz",
    steps: int = 5,
    eps: float = 1e-7,
    coefficients: tuple[float, float, float] = NEWTON_SCHULZ_ORTHOGONALIZE_COEFFS,
) -> Tensor:
    """Approximate polar factor ``U V^T`` of ``G = U S V^T`` for matrices of shape (..., m, n).

    ``X0 = G / (||G||_F + eps)`` (Polar Express: ``G / (1.01 ||G||_F + eps)``), then ``steps``
    iterations ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, working on the short side (tall
    matrices are transposed). Newton–Schulz uses the fixed quintic ``coefficients`` (Muon's by
    default), which maps singular values into roughly [0.7, 1.2] rather than exactly 1;
    Polar Express converges to the polar factor.
    """
    if G.ndim < 2:
        raise ValueError(f"G must be a (batch of) matrices, got shape {tuple(G.shape)}")
    if method not in ORTHOGONALIZE_METHODS:
        raise ValueError(f"method must be one of {ORTHOGONALIZE_METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    X = G.to(compute_dtype(G.dtype))
    transpose = X.shape[-2] > X.shape[-1]
    if transpose:
        X = X.mT
    norm = torch.linalg.matrix_norm(X, keepdim=True)
    if method == "polar_express":
        norm = norm * _POLAR_EXPRESS_SAFETY
    X = X / (norm + eps)
    for a, b, c in _coefficients(method, steps, coefficients):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if transpose else X

