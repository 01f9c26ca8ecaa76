"""Adafactor as analysed by Hong & Lin (NeurIPS 2025), Algorithm 1."""

from __future__ import annotations

import torch
from torch import Tensor

from asgo.optim._base import MatrixOptimizer, apply_update_, check_range, evaluate_closure, finite_flag


class Adafactor(MatrixOptimizer):
    r"""Adafactor with a factored second moment, exactly Algorithm 1 of Hong & Lin (2025).

    For a matrix parameter :math:`X \in \mathbb{R}^{n \times m}` with gradient :math:`G_k`, at
    step :math:`k = 1, 2, \dots` (:math:`R_0 = 0, C_0 = 0`)::

        S_k   = G_k * G_k + eps1 1_n 1_m^T            # eps1 added to every entry BEFORE the sums
        R_k   = beta2_k R_{k-1} + (1 - beta2_k) S_k 1_m     # row sums, R in R^n
        C_k   = beta2_k C_{k-1} + (1 - beta2_k) 1_n^T S_k   # column sums, C in R^m
        W_k   = R_k C_k / (1_n^T R_k)                 # rank-1 second-moment estimate, n x m
        U_k   = G_k / sqrt(W_k)                       # elementwise
        eta_k = rho_k / max(1, RMS(U_k) / d_k)        # update clipping, RMS = ||U||_F / sqrt(nm)
        X_{k+1} = X_k (1 - rho_k wd) - eta_k U_k

    with the schedules

    * decay: ``beta2_1 = beta2_first`` (1/2, as the analysis requires) and
      ``beta2_k = 1 - k^(-c)`` for ``k >= 2``, with ``c`` in [1/2, 1]. The stochastic rate of
      the analysis is O~(T^(1/2 - c)), so ``c = 1`` (the default) is the best; the original
      Adafactor uses ``c = 0.8``;
    * step size: ``rho_k = lr k^(-p)`` with ``p = lr_decay`` (0: constant, the full-batch
      setting; 1/2: the stochastic setting);
    * clipping threshold: ``d_k = clip_threshold`` (constant), or the analysis's time-varying
      ``d_k = clip_threshold k^(c / (2 (alpha - 1)))`` with ``alpha = clip_alpha > 1`` (the paper's
      ``d_k`` is ``clip_threshold = 1``); ``clip_threshold=None`` turns clipping off
      (``eta_k = rho_k``).

    Extensions, all off by default so the defaults are Algorithm 1: decoupled weight decay
    ``weight_decay`` (the ``(1 - rho_k wd)`` factor above, skipped when 0) and a first moment
    ``beta1`` on the clipped update ``Uc_k = U_k / max(1, RMS(U_k)/d_k)`` (Shazeer & Stern,
    Section 6): ``M_k = beta1 M_{k-1} + (1 - beta1) Uc_k``, ``X_{k+1} = X_k - rho_k M_k``.

    Parameter shapes: 0-D and 1-D parameters (biases, norms) use the unfactored second moment
    ``v_k = beta2_k v_{k-1} + (1 - beta2_k)(g_k^2 + eps1)``, ``U_k = g_k / sqrt(v_k)``. Tensors
    with more than two dimensions are factored over their last two dimensions, as
    ``torch.optim.Adafactor`` does: a batch of ``n x m`` matrices, each with its own ``R``, ``C``
    and ``1^T R``; the clipping RMS is taken over the whole tensor. Unlike the matrix optimizers
    of this package, Adafactor accepts every parameter (vectors and embeddings included).

    State, float32 (float64 for float64 parameters): ``row_second_moment`` (shape[:-1]) and
    ``column_second_moment`` (shape[:-2] + shape[-1:]) for factored parameters, or
    ``second_moment`` (the parameter's shape) otherwise; ``momentum`` when ``beta1`` is set;
    ``step`` (CPU int64; it counts every step that saw a gradient, skipped ones included, so the
    schedules follow the number of calls) and the fault counter ``skipped_steps``: a non-finite
    gradient leaves the parameter and its moments untouched. ``step()`` never syncs with the host
    (the clipping factor stays a tensor); :meth:`diagnostics` reads the counter.

    Differences from ``torch.optim.Adafactor`` (torch 2.13), which follows Shazeer & Stern:

    1. **beta2 at step 1.** torch uses ``beta2_t = 1 - t^beta2_decay`` for every ``t``, so
       ``beta2_1 = 0``; here ``beta2_1 = 1/2``, which halves ``R_1``, ``C_1`` and ``W_1`` (an
       unclipped first update is ``sqrt(2)`` times torch's) and keeps a weight ``1/2`` on
       ``S_1`` forever after. ``beta2_first=0`` removes this difference; for ``k >= 2`` the
       schedules agree with ``beta2_decay = -c``.
    2. **eps1.** torch leaves the squares alone and clamps instead: ``1^T R`` at ``eps1`` and
       ``W`` at ``eps1^2`` (``eps1`` defaults to the dtype's machine epsilon); here ``eps1``
       (default 1e-30, Shazeer & Stern's value) is added to every squared entry before the sums.
       They agree to round-off when ``eps1`` is negligible against the squared gradients.
    3. **Means vs sums.** torch keeps row/column *means*; here sums. ``W`` is the same either way.
    4. **Step size.** torch steps by ``max(eps2, RMS(X_{k-1})) min(lr, k^(-1/2))`` (relative step
       size); here by ``rho_k = lr k^(-p)``, with no parameter-scale factor (Algorithm 1 has no
       eps2). They agree while ``RMS(X) <= eps2``: with torch's ``eps=(eps1, 1.0)`` and ``lr``,
       torch's ``lr <= 1/sqrt(k)`` is ours with ``lr_decay=0`` and the same ``lr``, and torch's
       ``lr >= 1`` is ours with ``lr=1, lr_decay=0.5``.
    5. **Clipping.** torch's threshold is a constant ``d >= 1`` (``d=inf`` turns it off); here it
       may be any positive constant, time-varying (``clip_alpha``), or off (``None``).
    6. **Weight decay.** torch multiplies by ``1 - lr wd`` with the unscheduled ``lr``; here by
       ``1 - rho_k wd`` (equal when ``lr_decay=0``).
    7. torch has no first moment (``beta1``), no skipping of non-finite gradients, and syncs with
       the host every step (it reads its step count into a Python number).

    With ``beta2_first=0``, ``c = -beta2_decay``, the same negligible ``eps1``, torch's
    ``eps2 = 1`` with parameters of RMS at most 1, and items 4-6 matched, the two give the same
    iterates to float64 round-off (tested).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        c: float = 1.0,
        lr_decay: float = 0.0,
        eps1: float = 1e-30,
        clip_threshold: float | None = 1.0,
        clip_alpha: float | None = None,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        beta2_first: float = 0.5,
    ):
        defaults = dict(lr=lr, c=c, lr_decay=lr_decay, eps1=eps1, clip_threshold=clip_threshold,
                        clip_alpha=clip_alpha, beta1=beta1, weight_decay=weight_decay,
                        beta2_first=beta2_first)
        super().__init__(params, defaults)

    def validate_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("c", group["c"], 0.5, 1.0, high_inclusive=True)
        check_range("lr_decay", group["lr_decay"], 0.0)
        check_range("eps1", group["eps1"], 0.0, low_inclusive=False)
        if group["clip_threshold"] is not None:
            check_range("clip_threshold", group["clip_threshold"], 0.0, low_inclusive=False)
        if group["clip_alpha"] is not None:
            if group["clip_threshold"] is None:
                raise ValueError("invalid clip_alpha: a time-varying threshold needs "
                                 "clip_threshold (its scale), got clip_threshold=None")
            check_range("clip_alpha", group["clip_alpha"], 1.0, low_inclusive=False)
        if group["beta1"] is not None:
            check_range("beta1", group["beta1"], 0.0, 1.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("beta2_first", group["beta2_first"], 0.0, 1.0)

    def add_param_group(self, param_group: dict) -> None:
        # Adafactor takes every parameter: skip MatrixOptimizer's refusal of vectors/embeddings.
        self.validate_group({**self.defaults, **param_group})
        torch.optim.Optimizer.add_param_group(self, param_group)

    def _init_state(self, state: dict, p: Tensor, group: dict) -> None:
        dtype = self.state_dtype(p)
        state["step"] = torch.zeros((), dtype=torch.int64)
        if p.ndim >= 2:
            state["row_second_moment"] = torch.zeros(p.shape[:-1], dtype=dtype, device=p.device)
            state["column_second_moment"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=dtype,
                                                        device=p.device)
        else:
            state["second_moment"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        if group["beta1"] is not None:
            state["momentum"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        self.init_counters(state, p)

    @staticmethod
    def schedules(group: dict, k: int) -> tuple[float, float, float | None]:
        """``(beta2_k, rho_k, d_k)`` of ``group`` at step ``k >= 1`` (``d_k`` None: no clipping)."""
        c = group["c"]
        beta2 = group["beta2_first"] if k == 1 else 1.0 - k ** (-c)
        rho = group["lr"] * k ** (-group["lr_decay"])
        d = group["clip_threshold"]
        if d is not None and group["clip_alpha"] is not None:
            d = d * k ** (c / (2.0 * (group["clip_alpha"] - 1.0)))
        return beta2, rho, d

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                if torch.is_complex(p):
                    raise RuntimeError("Adafactor does not support complex parameters")
                state = self.state[p]
                if not state:
                    self._init_state(state, p, group)
                state["step"] += 1
                beta2, rho, d = self.schedules(group, int(state["step"]))
                self._update(p, state, group, beta2, rho, d)
        return loss

    @staticmethod
    def _update(p: Tensor, state: dict, group: dict, beta2: float, rho: float,
                d: float | None) -> None:
        dtype = MatrixOptimizer.state_dtype(p)
        tiny = torch.finfo(dtype).tiny
        a = finite_flag(p.grad, dtype)
        g = torch.where(a.bool(), p.grad, 0).to(dtype)
        S = g.square().add_(group["eps1"])
        weight = (1 - beta2) * a  # 0 on a skipped step: the moments stay as they are
        state["skipped_steps"] += 1 - a.to(torch.int64)
        if p.ndim >= 2:
            R, C = state["row_second_moment"], state["column_second_moment"]
            R.lerp_(S.sum(-1), weight)
            C.lerp_(S.sum(-2), weight)
            # W = R C / (1^T R), as R (C / 1^T R) so that R_i C_j cannot underflow; the clamps
            # only matter for moments never updated (all steps so far skipped), where g = 0.
            scale = C / R.sum(-1, keepdim=True).clamp_min(tiny)
            W = R.unsqueeze(-1) * scale.unsqueeze(-2)
        else:
            state["second_moment"].lerp_(S, weight)
            W = state["second_moment"]
        update = W.clamp_min(tiny).rsqrt_().mul_(g)
        if d is not None:
            rms = torch.linalg.vector_norm(update) / update.numel() ** 0.5
            update.div_(rms.div_(d).clamp_(min=1.0))
        if group["beta1"] is not None:
            state["momentum"].lerp_(update, (1 - group["beta1"]) * a)
            update = state["momentum"].clone()
        apply_update_(p, update, rho, group["weight_decay"], a)
