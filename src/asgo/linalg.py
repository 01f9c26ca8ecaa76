"""Matrix functions shared by the optimizers: inverse square roots and orthogonalisation.

Every function is batched over leading dimensions, does its maths in float32 whatever the
input dtype (float64 stays float64) and reads no value on the host; the one synchronisation is
inside ``torch.linalg.eigh`` on CUDA (``method='eigh'``), which checks its result.

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

InverseSqrtMethod = Literal["auto", "polar_express", "newton_schulz", "eigh"]
OrthogonalizeMethod = Literal["newton_schulz", "polar_express"]

INVERSE_SQRT_METHODS = ("polar_express", "newton_schulz", "eigh")
ROOT_METHODS = ("auto", *INVERSE_SQRT_METHODS)  # 'auto': auto_root_method of the input's device
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


# inverse_sqrt's ok: the residual (an estimate of the largest relative error of the root in any
# eigen-direction, see inverse_sqrt) is at most this.
INVERSE_SQRT_TOL = 1e-2


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
    tol: float | None = INVERSE_SQRT_TOL,
) -> tuple[Tensor, Tensor]:
    """Inverse square root ``(A + eps I)^(-1/2)`` of symmetric PSD matrices ``A`` of shape (..., s, s).

    ``eps`` is an absolute damping added to the diagonal before the root (not relative to the
    trace): ``A_d = A + eps I``. Methods (``'auto'``: :func:`auto_root_method` of ``A``'s device,
    ``'eigh'`` on the CPU, ``'polar_express'`` elsewhere):

    * ``'newton_schulz'`` (ASGO Algorithm 3): coupled iteration on ``Y0 = A_r / c``,
      ``c = ||A_r||_F``, ``Z0 = I``; each step ``B = b ZY + c' (ZY)^2``, ``Y <- aY + YB``,
      ``Z <- aZ + BZ`` with ``(a, b, c') = (2, -1.5, 0.5)``; returns ``Z / sqrt(c)``.
    * ``'polar_express'``: the same iteration with the Polar Express schedule and
      ``c = 1.01 ||A_r||_F`` (the ASGO authors' default solver; their code adds eps only
      inside the norm, which for eps=1e-10 is below float32 resolution unless ``||A|| < 1e-3``).
    * ``'eigh'``: exact, via ``torch.linalg.eigh`` of ``A_d``; eigenvalues are floored at
      ``finfo.eps * max(lambda_max, tiny)`` so singular inputs stay finite.

    ``A_r = A_d + delta I`` is the iterations' input, with the round-off damping

        delta = 16 finfo.eps ||A_d||_F   if Cholesky of  A_d - finfo.eps ||A_d||_F / 4 I  fails,
        delta = 0                        otherwise.

    An eigenvalue below ``finfo.eps ||A_d||_F / 4`` (float32: ``3e-8 ||A_d||_F``) cannot be told
    from round-off, and a negative one (``z y < 0``) makes every later step grow until the output
    overflows; so matrices that are singular to working precision (a rank-deficient ``G G^T``
    with ``eps`` below its round-off) get ``inverse_fourth_root``'s floor, and every other matrix
    is iterated bit for bit unchanged (one batched ``cholesky_ex``, no host sync).

    The iterations converge for eigenvalues whose ratio to ``c`` is not too small: with the
    default 10 steps Polar Express converges for condition numbers up to 1e6 (float64: 1e-11
    relative error, float32: 2e-3) and Newton-Schulz up to about 1e4, truncating the smallest
    eigenvalues beyond that (see docs/linalg.md for measured accuracy). On rank-deficient ``A``
    the null-space gain is then at most ``1 / sqrt(delta)``, or less where the steps do not reach
    ``delta / c`` (the number of steps acts as a hidden damping).

    Returns ``(X, ok)``: ``X`` in float32 (float64 for float64 input) and a boolean tensor of shape
    ``A.shape[:-2]``, computed without a host sync. ``ok`` is True where ``X`` is finite and
    ``residual <= tol``; ``tol=None`` checks finiteness only (what the optimizers use: their
    truncated roots of rank-deficient statistics are meant to be inexact). The residual bounds
    the largest relative error of ``X`` in any eigen-direction of ``A_d``,
    ``max_i |x_i sqrt(lambda_i) - 1|`` (tested against float64 eigh up to cond 1e14):

        residual = ||Z_K Y_K - I||_F + finfo.eps ||A_d||_F ||X^2||_F    (iterations; inf if delta > 0)
        residual = finfo.eps ||A_d||_F ||X^2||_F                        (eigh)

    In exact arithmetic ``Z_K Y_K = x_K^2`` in each eigen-direction, so the first term bounds
    the truncation error (``|x - 1| <= |x^2 - 1|``); the second, about ``finfo.eps`` times the
    condition number, bounds the round-off and is conservative (float32 with the default
    ``tol = 1e-2``: ok up to cond 1e3-1e4, where the measured error is at most 2e-3). Indefinite
    input is never ok (``delta > 0``; eigh's floor makes the residual at least 1). The check costs
    one or two extra matrix products. A matrix with a non-finite entry is replaced by zeros
    before the root (so one overflowed statistic neither raises in ``torch.linalg.eigh`` nor
    costs the rest of the batch), its ``X`` is NaN and its ``ok`` False.
    """
    _check_square(A, "A")
    if method not in ROOT_METHODS:
        raise ValueError(f"method must be one of {ROOT_METHODS}, got {method!r}")
    if method == "auto":
        method = auto_root_method(A.device)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 or None, got {tol}")

    A = A.to(compute_dtype(A.dtype))
    finite = _is_finite(A)[..., None, None]
    A = torch.where(finite, A, 0)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    if eps:
        A = A + eps * eye
    if method == "eigh":
        X, residual = _inverse_sqrt_eigh(A), 0.0
    else:
        delta = _roundoff_damping(A, eye)
        X, residual = _inverse_sqrt_coupled(A + delta * eye, eye, method, steps, tol is not None)
    X = torch.where(finite, X, torch.nan)
    ok = _is_finite(X)
    if tol is None:
        return X, ok
    if method != "eigh":  # A_d singular to working precision: no accurate root exists
        residual = torch.where(delta[..., 0, 0] == 0, residual, torch.inf)
    residual = residual + torch.finfo(A.dtype).eps * (
        torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(X @ X))
    return X, ok & (residual <= tol)


# Round-off damping, in units of finfo.eps * ||A||_F: the floor of inverse_fourth_root's damping,
# and what inverse_sqrt's iterations add to matrices whose smallest eigenvalue is below
# ROUNDOFF_GATE units (see inverse_sqrt).
ROUNDOFF_DAMPING = 16.0
ROUNDOFF_GATE = 0.25


def _roundoff_damping(A: Tensor, eye: Tensor) -> Tensor:
    """``16 finfo.eps ||A||_F`` where ``A - finfo.eps ||A||_F / 4 I`` has no Cholesky factor,
    else 0; shape (..., 1, 1)."""
    unit = torch.finfo(A.dtype).eps * torch.linalg.matrix_norm(A, keepdim=True)
    _, info = torch.linalg.cholesky_ex(A - ROUNDOFF_GATE * unit * eye)
    return torch.where(info[..., None, None] == 0, 0.0, ROUNDOFF_DAMPING * unit)


def _inverse_sqrt_eigh(A: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(A)
    finfo = torch.finfo(A.dtype)
    floor = evals[..., -1:].clamp_min(finfo.tiny) * finfo.eps
    return (evecs * evals.clamp_min(floor).rsqrt().unsqueeze(-2)) @ evecs.mT


def _inverse_sqrt_coupled(A: Tensor, eye: Tensor, method: str, steps: int,
                          residual: bool = False) -> tuple[Tensor, Tensor | None]:
    """The root and, if ``residual``, ``||Z_K Y_K - I||_F`` (else None)."""
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
    return Z / scale.sqrt(), torch.linalg.matrix_norm(Z @ Y - eye) if residual else None


def inverse_sqrt_official(
    A: Tensor, *, method: str = "polar_express", steps: int = 10, eps: float = 1e-10,
) -> tuple[Tensor, Tensor]:
    """The ASGO authors' inverse square root of ``A`` (..., s, s), their eps placement and no
    other damping (``asgo.ASGO(compat='official')``): with ``c`` below, ``Z_0 = I`` and the
    coupled iteration of :func:`inverse_sqrt` for ``steps`` steps, ``X = Z_K / sqrt(c)``.

    * ``'polar_express'``: ``c = 1.01 ||A + eps I||_F``, ``Y_0 = A / c`` (eps only in the norm).
    * ``'newton_schulz'``: ``c = ||A||_F``, ``Y_0 = (A + eps I) / (c + eps)``.

    Computed in float32 (float64 for float64 input), without a host sync. Returns ``(X, ok)``
    with ``ok`` telling only which ``X`` came out finite (their code replaces a non-finite root
    by the identity): on a matrix singular to working precision the root is finite but far from
    any inverse root (see docs/linalg.md).
    """
    _check_square(A, "A")
    if method not in ("polar_express", "newton_schulz"):
        raise ValueError(f"method must be 'polar_express' or 'newton_schulz', got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    A = A.to(compute_dtype(A.dtype))
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    if method == "polar_express":
        scale = _POLAR_EXPRESS_SAFETY * torch.linalg.matrix_norm(A + eps * eye, keepdim=True)
        Y = A / scale
    else:
        scale = torch.linalg.matrix_norm(A, keepdim=True)
        Y = (A + eps * eye) / (scale + eps)
    Z = eye.expand_as(A)
    for a, b, c in _coefficients(method, steps, NEWTON_SCHULZ_INVERSE_SQRT_COEFFS):
        ZY = Z @ Y
        B = b * ZY + c * ZY @ ZY
        Y = a * Y + Y @ B
        Z = a * Z + B @ Z
    X = Z / scale.sqrt()
    return X, _is_finite(X)


def auto_root_method(device: torch.device) -> str:
    """What ``method='auto'`` of :func:`inverse_sqrt` and :func:`inverse_fourth_root` runs on
    ``device``: ``'eigh'`` on the CPU, where LAPACK's eigh costs less than 10 iteration steps at
    every size (measured 2x to 12x less from 2 to 1024, docs/optimizers.md), ``'polar_express'``
    elsewhere (matrix products, no host sync; ``torch.linalg.eigh`` syncs on CUDA)."""
    return "eigh" if device.type == "cpu" else "polar_express"


def inverse_fourth_root(
    A: Tensor, *, method: str = "polar_express", steps: int = 10, eps: float = 0.0,
    relative: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(A + delta I)^(-1/4)`` of symmetric PSD matrices ``A`` (..., s, s), with the damping

        delta = max(eps, 16 finfo.eps ||A||_F)       relative=False (eps absolute)
        delta = max(eps, 16 finfo.eps) ||A||_F       relative=True

    so ``delta`` is exactly ``eps`` (or ``eps ||A||_F``) whenever that is above the round-off
    floor ``16 finfo.eps ||A||_F`` of the compute dtype (float32: ``1.9e-6 ||A||_F``, float64:
    ``3.6e-15 ||A||_F``). An EMA of ``G G^T`` accumulated in float32 is only known to about
    ``2 finfo.eps ||A||_F`` (measured: its smallest eigenvalue reaches ``-2.2 finfo.eps ||A||_F``
    when ``A`` is rank-deficient), so a damping below the floor would leave round-off
    eigenvalues, possibly negative, that the inverse root amplifies or on which the iterations
    diverge. A matrix whose ``delta`` would be 0 (``A = 0`` with ``relative`` or ``eps = 0``)
    gets ``delta = 1``: its root is the identity, as before any statistic.

    * ``method='auto'``: :func:`auto_root_method` of ``A``'s device (``'eigh'`` on the CPU).
    * ``'eigh'``: one ``torch.linalg.eigh`` of ``A_d = A + delta I``, eigenvalues clamped
      at ``delta`` against round-off, raised to the power -1/4; bitwise the same whatever the
      batch it is computed in.
    * ``'polar_express'`` / ``'newton_schulz'``: two inverse square roots of
      :func:`inverse_sqrt` (same ``method`` and ``steps``)::

          X = A_d^(-1/2),   result = sym(X Y)  with  Y = sym(X)^(-1/2) = A_d^(1/4)

      with ``sym(B) = (B + B^T) / 2``. ``X`` has the square root of ``A_d``'s condition number
      (at most ``(1 / (16 finfo.eps))^(1/2)``, about 700 in float32), within the range where the
      iterations converge in 10 steps, and the directions that matter (large eigenvalues of
      ``A``) are its small eigenvalues, which the inverse root amplifies least; the alternative
      ``S = A_d X = A_d^(1/2)``, ``S^(-1/2)`` amplifies the first root's round-off between the
      near-null and the leading directions of ``A`` (measured: 2e-2 instead of 5e-4 relative error
      of ``M R^(-1/4)`` on a rank-deficient float32 ``R``). The smallest eigenvalues of ``A_d``
      are truncated by the first root as described in :func:`inverse_sqrt`, which
      acts as extra damping.

    Matrices with a non-finite entry (an overflowed statistic) are replaced by zeros first, since
    ``torch.linalg.eigh`` raises on them, and reported as failed. Returns ``(root, ok)`` like
    :func:`inverse_sqrt`: float32 (float64 for float64 input) and a boolean tensor of
    shape ``A.shape[:-2]``, computed without a host sync (except ``torch.linalg.eigh`` on CUDA).
    """
    if method not in ROOT_METHODS:
        raise ValueError(f"method must be one of {ROOT_METHODS}, got {method!r}")
    if method == "auto":
        method = auto_root_method(A.device)
    A = A.to(compute_dtype(A.dtype))
    finite = _is_finite(A)
    A = torch.where(finite[..., None, None], A, 0)
    floor = ROUNDOFF_DAMPING * torch.finfo(A.dtype).eps
    norm = torch.linalg.matrix_norm(A, keepdim=True)
    damping = max(eps, floor) * norm if relative else (floor * norm).clamp_min(eps)
    damping = torch.where(damping > 0, damping, 1.0)
    A = A + damping * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    if method == "eigh":
        evals, evecs = torch.linalg.eigh(A)
        # x^(-1/4) as 1 / sqrt(sqrt(x)): correctly rounded, so the same in SIMD and scalar
        # kernels (pow is not), whatever the batch
        gains = evals.clamp_min(damping[..., 0]).sqrt().sqrt().reciprocal()
        root = (evecs * gains.unsqueeze(-2)) @ evecs.mT
        return 0.5 * (root + root.mT), finite & _is_finite(root)
    X, ok = inverse_sqrt(A, method=method, steps=steps, tol=None)
    X = 0.5 * (X + X.mT)
    ok = ok & finite
    Y, ok_y = inverse_sqrt(torch.where(ok[..., None, None], X, 0), method=method, steps=steps,
                           tol=None)
    root = X @ Y
    root = 0.5 * (root + root.mT)
    return root, ok & ok_y & _is_finite(root)


def orthogonalize(
    G: Tensor,
    *,
    method: OrthogonalizeMethod = "newton_schulz",
    steps: int = 5,
    eps: float = 1e-7,
    coefficients: tuple[float, float, float] = NEWTON_SCHULZ_ORTHOGONALIZE_COEFFS,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Approximate polar factor ``U V^T`` of ``G = U S V^T`` for matrices of shape (..., m, n).

    ``X0 = G / (||G||_F + eps)`` (Polar Express: ``G / (1.01 ||G||_F + eps)``), then ``steps``
    iterations ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, working on the short side (tall
    matrices are transposed). Newton–Schulz uses the fixed quintic ``coefficients`` (Muon's by
    default), which maps singular values into roughly [0.7, 1.2] rather than exactly 1;
    Polar Express converges to the polar factor.

    ``dtype`` is the dtype the iteration computes (and returns) in; ``None`` keeps the module's
    rule (float32, float64 stays float64). ``torch.optim.Muon`` runs its Newton–Schulz in
    ``torch.bfloat16``.
    """
    if G.ndim < 2:
        raise ValueError(f"G must be a (batch of) matrices, got shape {tuple(G.shape)}")
    if method not in ORTHOGONALIZE_METHODS:
        raise ValueError(f"method must be one of {ORTHOGONALIZE_METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    X = G.to(compute_dtype(G.dtype) if dtype is None else dtype)
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

