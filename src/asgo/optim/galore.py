"""GaLore and GoLore: low-rank gradient projection (He et al., ICML 2025, Algorithm 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from asgo.optim._base import Bucket, MatrixOptimizer, Update
from asgo.optim._config import (
    LR,
    NON_NEGATIVE,
    POSITIVE,
    STEPS,
    UNIT,
    Choice,
    Flag,
    HyperParameters,
    Integer,
    Optional,
    Real,
    Reals,
    hyper,
)
from asgo.optim._layout import Single, matrix_shape

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
INNER_OPTIMIZERS = ("adamw", "sgd")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def basis_seed(seed: int, index: int, step: int, side: int = 0) -> int:
    """Seed of the random basis drawn for parameter ``index`` at the refresh before step
    ``step + 1`` (``step`` = number of steps already taken): a splitmix64 hash, in [0, 2^63).
    ``side=1`` seeds the second (right) basis of ``proj_type='full'``."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ index)
    h = _splitmix64(h ^ step)
    if side:
        h = _splitmix64(h ^ side)
    return h & ((1 << 63) - 1)


def random_orthonormal(k: int, r: int, *, seed: int, device=None, dtype=torch.float32) -> Tensor:
    """A ``(k, r)`` matrix with orthonormal columns, uniform (Haar) on the Stiefel manifold.

    ``Z`` has i.i.d. N(0, 1) entries from a fresh ``torch.Generator`` on ``device`` seeded with
    ``seed``; ``Z = Q R`` (reduced QR, in ``dtype``) and the columns of ``Q`` are multiplied by
    the signs of ``diag(R)``, which makes ``Q = Z (Z^T Z)^(-1/2)``, Haar distributed, the
    sampler of the GoLore code, without its SVD. ``Z`` is drawn in float32 whatever ``dtype``,
    so the draw depends only on ``seed`` and the device type (CPU and CUDA generators differ).
    """
    if torch.device(device or "cpu").type == "meta":  # shape-only dry run (RoutedOptimizer.report)
        return torch.empty(k, r, device="meta", dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    Z = torch.randn(k, r, generator=gen, device=device, dtype=torch.float32).to(dtype)
    Q, R = torch.linalg.qr(Z)
    signs = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(dtype)
    return Q * signs


@torch.library.custom_op("asgo::random_bases", mutates_args=())
def random_bases(k: int, r: int, seed: int, indices: list[int], steps_taken: int, side: int,
                 device: torch.device, dtype: torch.dtype) -> Tensor:
    """The ``(len(indices), k, r)`` stack of :func:`random_orthonormal` bases of parameters
    ``indices`` at the refresh after ``steps_taken`` steps, seeded by :func:`basis_seed` (``seed``
    taken modulo 2^64). An operator, so ``torch.compile`` calls it without tracing the generator."""
    return torch.stack([random_orthonormal(k, r, seed=basis_seed(seed, i, steps_taken, side),
                                           device=device, dtype=dtype) for i in indices])


@random_bases.register_fake
def _(k, r, seed, indices, steps_taken, side, device, dtype):
    return torch.empty(len(indices), k, r, device=device, dtype=dtype)


def _int64(x: int) -> int:
    """``x`` modulo 2^64 as a signed 64-bit integer (an operator's ``int``)."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def top_singular_pairs(G: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """The top-``r`` left and right singular vectors ``(U_r, V_r)`` of ``G = U S V^T``
    (``torch.linalg.svd``, batched over leading dimensions), each pair's sign chosen so that the
    entry of largest magnitude of its left vector is positive (scikit-learn's ``svd_flip``): the
    bases are then a function of ``G`` alone, not of the SVD backend's sign convention."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    U, V = U[..., :r], Vh[..., :r, :].mT
    peak = U.gather(-2, U.abs().argmax(dim=-2, keepdim=True))
    signs = torch.where(peak < 0, -1.0, 1.0).to(U.dtype)
    return U * signs, V * signs


def top_singular_vectors(G: Tensor, r: int) -> Tensor:
    """The top-``r`` left singular vectors of ``G``, sign-fixed as in :func:`top_singular_pairs`."""
    return top_singular_pairs(G, r)[0]


def golore_switch_step(golore_fraction: float, total_steps: int | None) -> int:
    """Number of steps after which refreshes draw random bases: ``ceil((1 - x) N)`` for
    GoLore@x% with ``x = golore_fraction`` and ``N = total_steps`` (0 for pure GoLore; never
    reached for pure GaLore). Rounded to 1e-6 first so ``(1 - 0.7) * 100`` gives 30, not 31."""
    if golore_fraction <= 0:
        return math.inf  # type: ignore[return-value]
    if golore_fraction >= 1:
        return 0
    return math.ceil(round((1 - golore_fraction) * total_steps, 6))


@dataclass
class GaLoreConfig(HyperParameters):
    lr: float = hyper(1e-3, LR)
    rank: int = hyper(128, STEPS)
    update_proj_gap: int = hyper(200, STEPS)
    scale: float = hyper(1.0, POSITIVE)
    proj_type: str = hyper("std", Choice(PROJ_TYPES))
    inner: str = hyper("adamw", Choice(INNER_OPTIMIZERS))
    betas: tuple[float, float] = hyper((0.9, 0.999), Reals(2, UNIT))
    eps: float = hyper(1e-6, POSITIVE)
    weight_decay: float = hyper(0.0, NON_NEGATIVE)
    momentum: float = hyper(0.0, UNIT)
    dampening: float = hyper(0.0, Real(0.0, 1.0))
    nesterov: bool = hyper(False, Flag())
    golore_fraction: float = hyper(0.0, Real(0.0, 1.0))
    total_steps: int | None = hyper(None, Optional(STEPS))
    seed: int = hyper(0, Integer(0))
    reproject_moments: bool = hyper(True, Flag())
    transposed: bool = hyper(False, Flag())

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        super().__post_init__()

    def check_combination(self) -> None:
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("invalid nesterov: True needs momentum > 0 and dampening = 0")
        if self.total_steps is None and 0 < self.golore_fraction < 1:
            raise ValueError(f"invalid total_steps: None, GoLore@x% (golore_fraction="
                             f"{self.golore_fraction}) needs the number of training steps")


class GaLore(MatrixOptimizer):
    r"""Gradient low-rank projection with an inner AdamW or momentum-SGD (GaLore / GoLore).

    For a matrix :math:`W \in \mathbb{R}^{m \times n}` with gradient :math:`G_t`, seen as a
    ``(k, l)`` block ``X`` with the projected side first (``X = G`` projecting on the left,
    ``G^T`` on the right), at step ``t = 1, 2, ...``::

        r = min(rank, m, n)
        if (t - 1) % tau == 0:                        # tau = update_proj_gap
            P_new = top-r left singular vectors of X_t               # GaLore
                  = uniform random orthonormal k x r columns         # GoLore
            M <- P_new^T P M                          # if reproject_moments; V is kept
            P <- P_new
        R_t = P^T X_t                                 # r x l
        adamw: M = b1 M + (1 - b1) R_t,  V = b2 V + (1 - b2) R_t * R_t,
               N = (M / (1 - b1^s)) / (sqrt(V / (1 - b2^s)) + eps)
        sgd:   B = mu B + (1 - dampening) R_t  (B = R_t at the first step),
               N = B, or R_t + mu B with nesterov, or R_t when mu = 0
        W <- W (1 - lr wd) - lr scale (P N, transposed back on the right side)

    with ``s`` the number of steps applied so far (skipped ones excluded). ``proj_type='full'``
    projects both sides of ``X = G`` (galore-torch's ``'full'``): a refresh takes the top-r left
    and right singular vectors ``(P, Q)`` of one SVD (GoLore: two random bases), moments are
    ``r x r``::

        M <- P_new^T P M Q^T Q_new,   R_t = P^T X_t Q,   update P N Q^T

    Args:
        params: matrices (2-D or more, viewed as ``(shape[0], prod(shape[1:]))``).
        lr (float | Tensor): step size. Default 1e-3.
        rank (int): ``r``, clamped to ``min(m, n)``. Default 128.
        update_proj_gap (int): ``tau``, steps between basis refreshes. Default 200.
        scale (float): ``alpha``, > 0. Default 1.0.
        proj_type (str): ``'std'`` (the short side: left when ``m < n``, else right),
            ``'reverse_std'`` (the long side: left when ``m >= n``, else right), ``'left'``,
            ``'right'`` or ``'full'`` (both sides). Default ``'std'``.
        inner (str): ``'adamw'`` or ``'sgd'``. Default ``'adamw'``.
        betas (tuple): AdamW's ``(b1, b2)``, each in [0, 1). Default (0.9, 0.999).
        eps (float): AdamW's eps, > 0. Default 1e-6.
        weight_decay (float): decoupled, multiplied by ``lr``, before the step. Default 0.0.
        momentum (float): SGD's ``mu``, in [0, 1). Default 0.0.
        dampening (float): SGD's dampening, in [0, 1]. Default 0.0.
        nesterov (bool): SGD's Nesterov momentum (needs ``momentum > 0``, no dampening).
            Default False.
        golore_fraction (float): ``x`` in [0, 1]: refreshes after ``ceil((1 - x) N)`` steps draw
            random bases (:func:`golore_switch_step`); 0 is GaLore, 1 GoLore. Default 0.0.
        total_steps (int | None): ``N``, needed when ``0 < golore_fraction < 1``. Default None.
        seed (int): seed of the random bases. Default 0.
        reproject_moments (bool): carry the first moment into a new basis. Default True.
        transposed (bool): the parameters are 2-D weights stored ``(in, out)``, as Hugging Face's
            ``Conv1D``: each is updated exactly as its transpose stored ``(out, in)`` (bit for bit,
            tested on CPU), so ``m = out``, ``n = in`` and ``proj_type`` refers to ``(out, in)``.
            Default False.

    Notes:
        He et al., "Subspace Optimization for Large Language Models with Convergence
        Guarantees" (ICML 2025), Algorithm 1, as the authors' ``golore_torch`` code; defaults
        are galore-torch's. The SVD basis is sign-fixed (:func:`top_singular_pairs`). The
        random basis of parameter ``i`` (its ``state_dict`` index) at a refresh after ``j``
        steps is ``random_orthonormal(k, r, seed=basis_seed(seed, i, j))`` (``'full'``'s right
        one: ``random_orthonormal(l, r, seed=basis_seed(seed, i, j, side=1))``): it consumes nothing
        from torch's global generator and a resumed run draws the same bases. Same-shape
        matrices are stacked (one batched SVD). State (float32; float64 for float64
        parameters): ``projector`` ``(k, r)`` (and ``right_projector`` ``(l, r)`` for
        ``'full'``); ``exp_avg`` and ``exp_avg_sq`` (adamw) or ``momentum_buffer`` (sgd,
        ``momentum > 0``), ``(r, l)`` (``(r, r)`` for ``'full'``); ``applied_steps`` (``s``);
        ``step`` (CPU, every call, so refreshes follow the number of calls) and the counters
        ``skipped_steps`` and ``basis_failures`` (a non-finite basis keeps the previous one).
        Differences from the official codes and exact equivalences with ``torch.optim.SGD`` /
        ``AdamW`` are in ``docs/optimizers.md``. Reference:
        :func:`asgo.optim.reference.galore_step`.
    """

    Config = GaLoreConfig
    COUNTERS = ("skipped_steps", "basis_failures")

    @staticmethod
    def projects_right(group: dict, m: int, n: int) -> bool:
        """Whether a ``(m, n)`` matrix is projected on the right (``G P``) rather than the left
        (``'full'`` projects on both sides, its first basis on the left)."""
        proj_type = group["proj_type"]
        return (proj_type == "right" or (proj_type == "std" and m >= n)
                or (proj_type == "reverse_std" and m < n))

    @staticmethod
    def uses_random_basis(group: dict, steps_taken: int) -> bool:
        """Whether a refresh after ``steps_taken`` steps draws a random (GoLore) basis."""
        return steps_taken >= golore_switch_step(group["golore_fraction"], group["total_steps"])

    def layouts(self, p: Tensor, group: dict) -> list[Single]:
        transposed = group["transposed"]
        right = self.projects_right(group, *matrix_shape(p.shape, transposed))
        return [Single.matrix(p, right, transposed)]

    def init_state(self, state: dict, p: Tensor, group: dict) -> None:
        k, l = self.layouts(p, group)[0].shape
        r = min(group["rank"], k, l)
        full = group["proj_type"] == "full"
        cols = r if full else l  # moments: (r, r) projected on both sides, else (r, l)
        zeros = dict(dtype=self.state_dtype(p), device=p.device)
        if "projector" not in state:
            state["projector"] = torch.zeros(k, r, **zeros)
            state["applied_steps"] = torch.zeros((), **zeros)
        if full and "right_projector" not in state:
            state["right_projector"] = torch.zeros(l, r, **zeros)
        if group["inner"] == "adamw" and "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(r, cols, **zeros)
            state["exp_avg_sq"] = torch.zeros(r, cols, **zeros)
        if group["inner"] == "sgd" and group["momentum"] > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(r, cols, **zeros)

    def load_state_dict(self, state_dict: dict) -> None:
        if any(isinstance(s, dict) and "projector" in s and "applied_steps" not in s
               for s in state_dict["state"].values()):
            raise ValueError(f"this {type(self).__name__} state_dict was written by asgo 0.1, whose "
                             f"moments were stored (m, r) on the right side and which counted applied "
                             f"steps differently; resume it with asgo 0.1")
        super().load_state_dict(state_dict)

    def new_basis(self, group: dict, X: Tensor, r: int, bucket: Bucket,
                  two_sided: bool) -> tuple[Tensor, Tensor | None]:
        """The ``(B, k, r)`` bases of a refresh, and the ``(B, l, r)`` right ones when
        ``two_sided``: sign-fixed SVD, or seeded random ones."""
        steps_taken = bucket.step - 1
        if not self.uses_random_basis(group, steps_taken):
            P, Q = top_singular_pairs(X, r)
            return P, Q if two_sided else None

        def draw(size: int, side: int) -> Tensor:
            return random_bases(size, r, _int64(group["seed"]), bucket.indices, steps_taken, side,
                                X.device, X.dtype)

        return draw(X.shape[-2], 0), draw(X.shape[-1], 1) if two_sided else None

    def compute(self, group: dict, X: Tensor, S: dict[str, Tensor], bucket: Bucket) -> Update:
        P, Q, new, faults = S["projector"], S.get("right_projector"), {}, {}
        first = "exp_avg" if group["inner"] == "adamw" else "momentum_buffer"
        M = S.get(first)
        if (bucket.step - 1) % group["update_proj_gap"] == 0:
            P_new, Q_new = self.new_basis(group, X, P.shape[-1], bucket, Q is not None)
            ok = torch.isfinite(P_new).flatten(1).all(1)
            if Q is not None:
                ok = ok & torch.isfinite(Q_new).flatten(1).all(1)
            faults["basis_failures"] = (~ok).to(torch.int64)
            ok = ok.reshape(-1, 1, 1)
            if M is not None and group["reproject_moments"]:
                M_new = (P_new.mT @ P) @ M
                if Q is not None:
                    M_new = M_new @ (Q.mT @ Q_new)
                M = torch.where(ok, M_new, M)
            P = new["projector"] = torch.where(ok, P_new, P)
            if Q is not None:
                Q = new["right_projector"] = torch.where(ok, Q_new, Q)
        R = P.mT @ X if Q is None else P.mT @ X @ Q
        s = new["applied_steps"] = S["applied_steps"] + 1
        s = s.reshape(-1, 1, 1)
        if group["inner"] == "adamw":
            b1, b2 = group["betas"]
            M = new["exp_avg"] = M.lerp(R, 1 - b1)
            V = new["exp_avg_sq"] = S["exp_avg_sq"].lerp(R.square(), 1 - b2)
            N = (M / (1 - b1**s)) / (V.sqrt() / (1 - b2**s).sqrt() + group["eps"])
        elif group["momentum"] > 0:
            mu = group["momentum"]
            M = new["momentum_buffer"] = M * mu + R * (1 - group["dampening"] * (s != 1).to(R.dtype))
            N = R + mu * M if group["nesterov"] else M
        else:
            N = R
        U = P @ N if Q is None else P @ N @ Q.mT
        return Update(U.mul_(group["scale"]), new, faults)


@dataclass
class GoLoreConfig(GaLoreConfig):
    golore_fraction: float = hyper(1.0, Real(0.0, 1.0))


class GoLore(GaLore):
    """GaLore with random bases (GoLore, He et al., Algorithm 1): :class:`GaLore` with
    ``golore_fraction=1.0`` by default, so every refresh draws a uniform random orthonormal
    basis. Pass ``golore_fraction=x / 100`` and ``total_steps=N`` for GoLore@x%; see
    :class:`GaLore` for the update, the arguments, the seeding of the random bases and the
    state."""

    Config = GoLoreConfig
