"""GaLore and GoLore: low-rank gradient projection (He et al., ICML 2025, Algorithm 1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from asgo.optim._base import (
    MatrixOptimizer,
    apply_update_,
    check_choice,
    check_int,
    check_range,
    evaluate_closure,
    finite_flag,
)

PROJ_TYPES = ("std", "left", "right")
INNER_OPTIMIZERS = ("adamw", "sgd")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def basis_seed(seed: int, index: int, step: int) -> int:
    """Seed of the random basis drawn for parameter ``index`` at the refresh before step
    ``step + 1`` (``step`` = number of steps already taken): a splitmix64 hash, in [0, 2^63)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ index)
    h = _splitmix64(h ^ step)
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


def top_singular_vectors(G: Tensor, r: int) -> Tensor:
    """The top-``r`` left singular vectors of ``G`` (``torch.linalg.svd``), each column's sign
    chosen so that its entry of largest magnitude is positive (scikit-learn's ``svd_flip``): the
    basis is then a function of ``G`` alone, not of the SVD backend's sign convention."""
    U = torch.linalg.svd(G, full_matrices=False)[0][:, :r]
    peak = U.gather(0, U.abs().argmax(dim=0, keepdim=True))
    return U * torch.where(peak < 0, -1.0, 1.0).to(U.dtype)


def golore_switch_step(golore_fraction: float, total_steps: int | None) -> int:
    """Number of steps after which refreshes draw random bases: ``ceil((1 - x) N)`` for
    GoLore@x% with ``x = golore_fraction`` and ``N = total_steps`` (0 for pure GoLore; never
    reached for pure GaLore). Rounded to 1e-6 first so ``(1 - 0.7) * 100`` gives 30, not 31."""
    if golore_fraction <= 0:
        return math.inf  # type: ignore[return-value]
    if golore_fraction >= 1:
        return 0
    return math.ceil(round((1 - golore_fraction) * total_steps, 6))


class GaLore(MatrixOptimizer):
    r"""Gradient low-rank projection with an inner AdamW or momentum-SGD (GaLore / GoLore).

    He et al., "Subspace Optimization for Large Language Models with Convergence Guarantees"
    (ICML 2025), Algorithm 1, as in the authors' ``golore_torch`` code. For a matrix parameter
    :math:`W \in \mathbb{R}^{m \times n}` (tensors with more dimensions are viewed as
    ``(shape[0], prod(shape[1:]))``) with gradient :math:`G_t`, at step ``t = 1, 2, ...``::

        r = min(rank, m, n)                           # rank is clamped, never an error
        side: left  if proj_type == 'left'  or (proj_type == 'std' and m <  n):  P in R^{m x r}
              right if proj_type == 'right' or (proj_type == 'std' and m >= n):  P in R^{n x r}
        if (t - 1) % tau == 0:                        # tau = update_proj_gap; t = 1, 1+tau, ...
            P_new = top-r left singular vectors of G_t (left) / right ones (right)    # GaLore
                  = uniform random orthonormal columns (see "Randomness")             # GoLore
            M <- P_new^T P M (left) or M P^T P_new (right)   # if reproject_moments; V is kept
            P <- P_new
        R_t = P^T G_t (r x n, left)  or  G_t P (m x r, right)
        adamw: M = b1 M + (1 - b1) R_t,  V = b2 V + (1 - b2) R_t * R_t,
               N = M_hat / (sqrt(V_hat) + eps),  M_hat = M / (1 - b1^s),  V_hat = V / (1 - b2^s)
        sgd:   B = mu B + (1 - dampening) R_t   (B = R_t at the first step),
               N = B, or R_t + mu B with nesterov, or R_t when mu = 0
        W <- W (1 - lr wd) - lr alpha P N (left)  or  - lr alpha N P^T (right)   # alpha = scale

    where ``s`` counts the steps applied so far (skipped ones excluded) and ``M`` is AdamW's
    first moment or the SGD buffer ``B``. The SVD is ``torch.linalg.svd`` of the gradient in the
    state dtype (float32; float64 for float64 parameters), each singular vector's sign fixed so
    its largest-magnitude entry is positive (:func:`top_singular_vectors`); the signs only matter
    with ``reproject_moments=False``.

    **GaLore vs GoLore.** A refresh after ``k = t - 1`` steps draws a random basis when
    ``k >= (1 - golore_fraction) * total_steps`` (the code's ``step >= rand_ratio * N``), else the
    SVD basis: ``golore_fraction = 0`` is GaLore (this class's default), ``1`` is GoLore
    (:class:`GoLore`'s default), and ``x / 100`` with ``total_steps = N`` is GoLore@x%: GaLore for
    the first ``(100 - x)%`` of ``N`` steps, then a random basis from the first refresh at or
    after the switch step :func:`golore_switch_step` (as in the official code, no extra refresh
    is forced at the switch).

    **Moments on a basis change.** With ``reproject_moments=True`` (default) the first moment
    (AdamW's ``exp_avg``, SGD's ``momentum_buffer``) is carried into the new basis as above, as
    GoLore intends: then ``P M`` is the projection of the old full-space momentum onto the new
    subspace, and with a full-rank basis momentum SGD is exactly unchanged by the rotation. The
    second moment ``exp_avg_sq`` is kept as is (entries now paired with other directions), as in
    both official codes. ``reproject_moments=False`` keeps both moments as they are, which is
    galore-torch's behaviour and, in effect, the GoLore code's (its re-projection is assigned to
    a local variable and lost).

    **Randomness.** Random bases consume nothing from torch's global generator (so GaLore and
    GoLore runs see the same data order and initialisation). The basis of parameter ``i`` (its
    index in ``state_dict``'s numbering) at a refresh after ``j`` steps is
    ``random_orthonormal(d, r, seed=basis_seed(seed, i, j))`` with ``d`` the projected side: a
    pure function of the group's ``seed`` (default 0, saved with the param groups), ``i`` and
    ``j`` on a given device type, so a resumed run draws exactly the bases the uninterrupted one
    would; vary ``seed`` to vary the bases.

    **State** (float32; float64 for float64 parameters): ``projector`` ``(k, r)`` with orthonormal
    columns, ``k`` the projected side (galore-torch's ``ortho_matrix``, transposed for the right
    side); ``exp_avg`` and ``exp_avg_sq`` (adamw) or ``momentum_buffer`` (sgd with
    ``momentum > 0``) of the projected shape, ``(r, n)`` or ``(m, r)``; ``step`` (CPU int64,
    every call counted, skipped ones included, so refreshes and the GoLore switch follow the
    number of calls); fault counters ``skipped_steps`` (a non-finite gradient: the parameter and
    all its state except ``step`` are left untouched, so a basis due then is not refreshed until
    the next refresh step; before the first refresh the projector is zero and the update too)
    and ``basis_failures`` (a non-finite SVD or QR result: the previous basis is kept). All state
    is tensors, so ``state_dict`` loads with ``torch.load(weights_only=True)``; ``step()`` never
    syncs with the host (the SVD/QR may, as the solvers of some backends do).

    **Differences from the official codes.** Weight decay is decoupled and applied before the
    step, as ``torch.optim.AdamW`` (galore-torch applies it after, a difference of
    ``lr^2 wd`` times the update), also for the SGD inner optimizer (the GoLore SGD ignores it);
    eps is added to the bias-corrected root as in ``torch.optim.AdamW`` (galore-torch's
    transformers-style AdamW amounts to ``eps / sqrt(1 - b2^s)`` there); the SGD inner optimizer
    follows ``torch.optim.SGD`` (first buffer = gradient, as the GoLore SGD) and adds
    ``nesterov``. 1-D parameters and embeddings are refused: route them to AdamW. Defaults are galore-torch's: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
    weight_decay=0, rank=128, update_proj_gap=200, scale=1.0, proj_type='std'``; SGD
    ``momentum=0, dampening=0`` as ``torch.optim.SGD``.

    **Equivalences.** With ``rank >= min(m, n)`` and ``proj_type='std'`` the basis is square
    orthogonal, ``P P^T = I``; then the ``sgd`` inner optimizer with re-projected moments is
    exactly ``torch.optim.SGD`` (for any ``update_proj_gap`` and either basis). AdamW's
    element-wise second moment is not rotation invariant, so the ``adamw`` inner optimizer equals
    ``torch.optim.AdamW`` only when every basis is a signed permutation with a fixed order (e.g.
    gradients with orthogonal rows of distinct, consistently ordered norms, whose SVD basis is
    the identity up to signs); with a general rotation it is Adam in the rotated coordinates.
    """

    COUNTERS = ("skipped_steps", "basis_failures")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        inner: str = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        golore_fraction: float = 0.0,
        total_steps: int | None = None,
        seed: int = 0,
        reproject_moments: bool = True,
    ):
        defaults = dict(
            lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
            inner=inner, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
            golore_fraction=golore_fraction, total_steps=total_steps, seed=seed,
            reproject_moments=reproject_moments,
        )
        super().__init__(params, defaults)

    def validate_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        check_int("rank", group["rank"], 1)
        check_int("update_proj_gap", group["update_proj_gap"], 1)
        check_range("scale", group["scale"], 0.0, low_inclusive=False)
        check_choice("proj_type", group["proj_type"], PROJ_TYPES)
        check_choice("inner", group["inner"], INNER_OPTIMIZERS)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"invalid betas: {betas!r}, expected a pair (beta1, beta2)")
        check_range("betas[0]", betas[0], 0.0, 1.0)
        check_range("betas[1]", betas[1], 0.0, 1.0)
        check_range("eps", group["eps"], 0.0, low_inclusive=False)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0)
        check_range("dampening", group["dampening"], 0.0, 1.0, high_inclusive=True)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"invalid nesterov: {group['nesterov']!r}, expected a bool")
        if group["nesterov"] and (group["momentum"] == 0 or group["dampening"] != 0):
            raise ValueError("invalid nesterov: True needs momentum > 0 and dampening = 0")
        check_range("golore_fraction", group["golore_fraction"], 0.0, 1.0, high_inclusive=True)
        if group["total_steps"] is not None:
            check_int("total_steps", group["total_steps"], 1)
        elif 0 < group["golore_fraction"] < 1:
            raise ValueError(f"invalid total_steps: None, GoLore@x% (golore_fraction="
                             f"{group['golore_fraction']}) needs the number of training steps")
        check_int("seed", group["seed"], 0)
        if not isinstance(group["reproject_moments"], bool):
            raise ValueError(f"invalid reproject_moments: {group['reproject_moments']!r}, expected a bool")

    @staticmethod
    def projects_right(group: dict, m: int, n: int) -> bool:
        """Whether a ``(m, n)`` matrix is projected on the right (``G P``) rather than the left."""
        proj_type = group["proj_type"]
        return proj_type == "right" or (proj_type == "std" and m >= n)

    @staticmethod
    def uses_random_basis(group: dict, steps_taken: int) -> bool:
        """Whether a refresh after ``steps_taken`` steps draws a random (GoLore) basis."""
        return steps_taken >= golore_switch_step(group["golore_fraction"], group["total_steps"])

    def _init_state(self, state: dict, group: dict, p: Tensor, m: int, n: int) -> None:
        dtype, device = self.state_dtype(p), p.device
        right = self.projects_right(group, m, n)
        r = min(group["rank"], m, n)
        k = n if right else m
        shape = (m, r) if right else (r, n)
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["projector"] = torch.zeros(k, r, dtype=dtype, device=device)
        if group["inner"] == "adamw":
            state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
        elif group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros(shape, dtype=dtype, device=device)
        self.init_counters(state, p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        index = -1
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._step_param(group, p, index)
        return loss

    def _new_basis(self, group: dict, state: dict, gv: Tensor, index: int, steps_taken: int) -> Tensor:
        k, r = state["projector"].shape
        if self.uses_random_basis(group, steps_taken):
            return random_orthonormal(k, r, seed=basis_seed(group["seed"], index, steps_taken),
                                      device=gv.device, dtype=gv.dtype)
        return top_singular_vectors(gv, r)

    def _step_param(self, group: dict, p: Tensor, index: int) -> None:
        state = self.state[p]
        m, n = p.shape[0], p[0].numel()
        if not state:
            self._init_state(state, group, p, m, n)
        dtype = self.state_dtype(p)
        right = self.projects_right(group, m, n)
        steps_taken = int(state["step"])  # CPU tensor: no device sync
        state["step"] += 1

        a = finite_flag(p.grad, dtype)
        ok = a.bool()
        state["skipped_steps"] += 1 - a.to(torch.int64)
        g = torch.where(ok, p.grad, 0).to(dtype).reshape(m, n)
        gv = g.mT if right else g  # (k, l): the projected side first
        P = state["projector"]
        first = "exp_avg" if group["inner"] == "adamw" else "momentum_buffer"
        if group["inner"] == "sgd" and group["momentum"] > 0 and first not in state:
            state[first] = torch.zeros((m, P.shape[1]) if right else (P.shape[1], n),
                                       dtype=dtype, device=p.device)
        moment = state.get(first)
        moment_v = None if moment is None else (moment.mT if right else moment)  # (r, l) views

        if steps_taken % group["update_proj_gap"] == 0:
            P_new = self._new_basis(group, state, gv, index, steps_taken)
            basis_ok = finite_flag(P_new, torch.bool)
            state["basis_failures"] += (ok & ~basis_ok).to(torch.int64)
            keep = ~(ok & basis_ok)
            if moment_v is not None and group["reproject_moments"]:
                moment_v.copy_(torch.where(keep, moment_v, (P_new.mT @ P) @ moment_v))
            P.copy_(torch.where(keep, P, P_new))

        R = P.mT @ gv  # (r, l)
        applied = (steps_taken + 1 - state["skipped_steps"]).to(dtype).clamp_min(1)
        if group["inner"] == "adamw":
            beta1, beta2 = group["betas"]
            exp_avg_v = moment_v
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq_v = exp_avg_sq.mT if right else exp_avg_sq
            exp_avg_v.lerp_(R, (1 - beta1) * a)
            exp_avg_sq_v.lerp_(R.square(), (1 - beta2) * a)
            bc1 = 1 - beta1**applied
            bc2 = 1 - beta2**applied
            N = (exp_avg_v / bc1) / (exp_avg_sq_v.sqrt() / bc2.sqrt() + group["eps"])
        elif group["momentum"] > 0:
            mu, damp = group["momentum"], group["dampening"]
            buf_v = moment_v
            coeff = 1 - damp * (applied != 1).to(dtype)  # no dampening on the first step
            buf_v.copy_(torch.where(ok, buf_v * mu + R * coeff, buf_v))
            N = R + mu * buf_v if group["nesterov"] else buf_v.clone()
        else:
            N = R
        update = (P @ N).mul_(group["scale"])  # (k, l)
        update = update.mT if right else update
        apply_update_(p, update.reshape(p.shape), group["lr"], group["weight_decay"], a)


class GoLore(GaLore):
    """GaLore with random bases (GoLore, He et al., Algorithm 1): :class:`GaLore` with
    ``golore_fraction=1.0`` by default, so every refresh draws a uniform random orthonormal
    basis. Pass ``golore_fraction=x / 100`` and ``total_steps=N`` for GoLore@x%; see
    :class:`GaLore` for the update, the seeding of the random bases and the state."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        inner: str = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        golore_fraction: float = 1.0,
        total_steps: int | None = None,
        seed: int = 0,
        reproject_moments: bool = True,
    ):
        super().__init__(
            params, lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
            proj_type=proj_type, inner=inner, betas=betas, eps=eps, weight_decay=weight_decay,
            momentum=momentum, dampening=dampening, nesterov=nesterov,
            golore_fraction=golore_fraction, total_steps=total_steps, seed=seed,
            reproject_moments=reproject_moments)
