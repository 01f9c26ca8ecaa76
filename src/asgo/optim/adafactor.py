"""Adafactor as analysed by Hong & Lin (NeurIPS 2025), Algorithm 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asgo.optim._base import Bucket, MatrixOptimizer, Update
from asgo.optim._config import (
    LR,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Flag,
    HyperParameters,
    Optional,
    Real,
    hyper,
)
from asgo.optim._layout import Single


@dataclass
class AdafactorConfig(HyperParameters):
    lr: float = hyper(1e-2, LR)
    c: float = hyper(1.0, Real(0.5, 1.0))
    lr_decay: float = hyper(0.0, NON_NEGATIVE)
    eps1: float = hyper(1e-30, POSITIVE)
    clip_threshold: float | None = hyper(1.0, Optional(POSITIVE))
    clip_alpha: float | None = hyper(None, Optional(Real(1.0, low_open=True)))
    momentum: float | None = hyper(None, Optional(UNIT))
    weight_decay: float = hyper(0.0, NON_NEGATIVE)
    beta2_first: float = hyper(0.5, UNIT)
    transposed: bool = hyper(False, Flag())

    def check_combination(self) -> None:
        if self.clip_alpha is not None and self.clip_threshold is None:
            raise ValueError("invalid clip_alpha: a time-varying threshold needs clip_threshold "
                             "(its scale), got clip_threshold=None")


class Adafactor(MatrixOptimizer):
    r"""Adafactor with a factored second moment, exactly Algorithm 1 of Hong & Lin (2025).

    For a matrix parameter :math:`X \in \mathbb{R}^{n \times m}` with gradient :math:`G_k`, at
    step :math:`k = 1, 2, \dots` (:math:`R_0 = 0, C_0 = 0`)::

        S_k   = G_k * G_k + eps1 1_n 1_m^T                  # eps1 added BEFORE the sums
        R_k   = beta2_k R_{k-1} + (1 - beta2_k) S_k 1_m     # row sums, R in R^n
        C_k   = beta2_k C_{k-1} + (1 - beta2_k) 1_n^T S_k   # column sums, C in R^m
        W_k   = R_k C_k / (1_n^T R_k)                       # rank-1 second-moment estimate
        U_k   = G_k / sqrt(W_k)                             # elementwise
        eta_k = rho_k / max(1, RMS(U_k) / d_k)              # update clipping
        X_{k+1} = X_k (1 - rho_k wd) - eta_k U_k

    with ``beta2_1 = beta2_first``, ``beta2_k = 1 - k^(-c)`` for ``k >= 2``,
    ``rho_k = lr k^(-lr_decay)`` and ``d_k = clip_threshold`` (times ``k^(c / (2 (alpha - 1)))``
    when ``clip_alpha = alpha`` is set). With ``momentum = beta1`` (Shazeer & Stern, Section 6)
    the clipped update ``Uc_k`` is averaged, ``M_k = beta1 M_{k-1} + (1 - beta1) Uc_k``, and
    ``X_{k+1} = X_k (1 - rho_k wd) - rho_k M_k``.

    Args:
        params: any tensors; 0-D and 1-D ones use the unfactored
            ``v_k = beta2_k v_{k-1} + (1 - beta2_k)(g_k^2 + eps1)``, tensors with more than two
            dimensions are factored over their last two (a batch of matrices).
        lr (float | Tensor): ``rho`` before its decay. Default 1e-2.
        c (float): decay exponent of ``beta2_k``, in [1/2, 1]; 1 gives the best rate of the
            analysis, the original Adafactor uses 0.8. Default 1.0.
        lr_decay (float): ``p`` of ``rho_k = lr k^(-p)``; 0 (full batch) or 1/2 (stochastic)
            in the analysis. Default 0.0.
        eps1 (float): added to every squared gradient entry, > 0. Default 1e-30.
        clip_threshold (float | None): ``d``; None turns clipping off. Default 1.0.
        clip_alpha (float | None): ``alpha > 1`` of the time-varying threshold. Default None.
        momentum (float | None): ``beta1`` of the first moment, in [0, 1); None: none (a
            scheduler that cycles momentum, e.g. ``OneCycleLR`` with its default
            ``cycle_momentum=True``, sets it and so switches the first moment on, as it does for
            ``torch.optim.SGD``). Default None.
        weight_decay (float): decoupled, multiplied by ``rho_k``. Default 0.0.
        beta2_first (float): ``beta2_1``; the analysis needs 1/2, torch uses 0. Default 0.5.
        transposed (bool): the parameters are 2-D weights stored ``(in, out)``, as Hugging Face's
            ``Conv1D``: each is updated exactly as its transpose stored ``(out, in)`` (bit for bit,
            tested on CPU), so ``R`` has one entry per output, ``C`` one per input. Default False.

    Notes:
        The defaults are Algorithm 1 (momentum and weight decay off). Same-shape parameters are
        stacked; the clipping RMS is taken over each whole parameter. State (float32; float64
        for float64 parameters): ``row_second_moment`` and ``column_second_moment`` (sums, not
        means) or ``second_moment``, ``momentum`` when set, ``step`` (CPU; every step that saw a
        gradient, so the schedules follow the number of calls) and the counter
        ``skipped_steps``. The seven differences from ``torch.optim.Adafactor`` and the
        settings under which the two give the same iterates are in ``docs/optimizers.md``.
        Reference: :func:`asgo.optim.reference.adafactor_step`.
    """

    Config = AdafactorConfig
    ELEMENTWISE = ("momentum", "second_moment")
    MATRICES_ONLY = False
    DISTRIBUTED = False  # its step size follows each parameter's own step count

    def layouts(self, p: Tensor, group: dict) -> list[Single]:
        return [Single.whole(p, group["transposed"])]

    def init_state(self, state: dict, p: Tensor, group: dict) -> None:
        zeros = dict(dtype=self.state_dtype(p), device=p.device)
        if "row_second_moment" not in state and "second_moment" not in state:
            shape = self.layouts(p, group)[0].shape
            if p.ndim >= 2:
                state["row_second_moment"] = torch.zeros(shape[:-1], **zeros)
                state["column_second_moment"] = torch.zeros(shape[:-2] + shape[-1:], **zeros)
            else:
                state["second_moment"] = torch.zeros(p.shape, **zeros)
        if group["momentum"] is not None and "momentum" not in state:
            state["momentum"] = torch.zeros(p.shape, **zeros)

    @staticmethod
    def schedules(group: dict, k: int) -> tuple[float, float, float | None]:
        """``(beta2_k, rho_k / lr, d_k)`` of ``group`` at step ``k >= 1`` (``d_k`` None: no
        clipping)."""
        c = group["c"]
        beta2 = group["beta2_first"] if k == 1 else 1.0 - k ** (-c)
        d = group["clip_threshold"]
        if d is not None and group["clip_alpha"] is not None:
            d = d * k ** (c / (2.0 * (group["clip_alpha"] - 1.0)))
        return beta2, k ** (-group["lr_decay"]), d

    def compute(self, group: dict, G: Tensor, S: dict[str, Tensor], bucket: Bucket) -> Update:
        beta2, lr_scale, d = self.schedules(group, bucket.step)
        tiny = torch.finfo(G.dtype).tiny
        squares = G.square().add_(group["eps1"])
        new = {}
        if "second_moment" in S:
            W = new["second_moment"] = S["second_moment"].lerp(squares, 1 - beta2)
        else:
            R = new["row_second_moment"] = S["row_second_moment"].lerp(squares.sum(-1), 1 - beta2)
            C = new["column_second_moment"] = S["column_second_moment"].lerp(squares.sum(-2), 1 - beta2)
            # R C / (1^T R) as R (C / 1^T R), so that R_i C_j cannot underflow
            W = R.unsqueeze(-1) * (C / R.sum(-1, keepdim=True).clamp_min(tiny)).unsqueeze(-2)
        U = W.clamp_min(tiny).rsqrt() * G
        if d is not None:
            per_param = U.reshape(len(U), -1)
            rms = torch.linalg.vector_norm(per_param, dim=1) / per_param.shape[1] ** 0.5
            U = U / (rms / d).clamp(min=1.0).reshape(-1, *[1] * (U.ndim - 1))
        if group["momentum"] is not None:
            U = new["momentum"] = S["momentum"].lerp(U, 1 - group["momentum"])
        return Update(U, new, lr_scale=lr_scale)
