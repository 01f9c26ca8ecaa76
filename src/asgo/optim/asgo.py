"""ASGO: Adaptive Structured Gradient Optimization (An et al., NeurIPS 2025), Algorithm 2."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asgo.linalg import inverse_sqrt
from asgo.optim._base import Bucket, MatrixOptimizer, Root, Update, rms_normalize
from asgo.optim._config import POSITIVE, Integer, Optional, RootSchedule, hyper, root_due
from asgo.optim._layout import MatrixView


@dataclass
class ASGOConfig(RootSchedule):
    update_rms: float | None = hyper(0.2, Optional(POSITIVE))
    num_heads: int = hyper(1, Integer(1))


class ASGO(MatrixOptimizer):
    r"""One-sided structured preconditioning of each weight matrix (ASGO, Algorithm 2).

    For a block :math:`W \in \mathbb{R}^{s \times l}` (``s <= l``; wider blocks are transposed)
    with gradient :math:`G_t`::

        M_t = beta1 M_{t-1} + (1 - beta1) G_t            # momentum (EMA), beta1 = momentum
        V_t = beta2 V_{t-1} + (1 - beta2) G_t G_t^T      # s x s, V_0 = 0
        Q_t = (V_t + eps I)^(-1/2)   on root steps, else Q_{t-1}    (Q_0 = I)
        U_t = Q_t M_t                # scaled to RMS r when update_rms = r: U_t r sqrt(sl) / ||U_t||_F
        W_t = W_{t-1} (1 - lr wd) - lr U_t

    Args:
        params: matrices (2-D or more, viewed as ``(shape[0], prod(shape[1:]))``).
        lr (float | Tensor): step size. Default 1e-2.
        momentum (float): ``beta1``, in [0, 1). Default 0.9.
        beta2 (float): EMA coefficient of ``V``, in [0, 1). Default 0.8.
        eps (float): damping of the root, > 0. Default 1e-10.
        weight_decay (float): decoupled, multiplied by ``lr``. Default 0.1.
        precondition_frequency (int): ``tau``, steps between roots. Default 1.
        start_preconditioning_step (int): ``s``, the first root step; before it ``Q = I``.
            Root steps are ``s, s + tau, s + 2 tau, ...``. Default 1.
        root_method (str): ``'polar_express'``, ``'newton_schulz'`` or ``'eigh'``
            (:func:`asgo.linalg.inverse_sqrt`). Default ``'polar_express'``.
        root_steps (int): iterations of the root. Default 10.
        update_rms (float | None): RMS of each block's update; None: unscaled. Default 0.2.
        num_heads (int): split each weight's rows into this many blocks (attention heads), each
            preconditioned as if it were a separate parameter. Default 1.

    Notes:
        The smaller side is preconditioned; square blocks use the right side, as the authors'
        code. Same-shape blocks are stacked and their roots batched (one call per root size).
        State (float32; float64 for float64 parameters): ``momentum``, ``preconditioner`` ``V``
        and ``inv_root`` ``Q`` (``(blocks, s, s)``), ``step`` (CPU) and the counters
        ``skipped_steps`` and ``root_failures`` (a non-finite root keeps the previous one).
        Defaults are the authors' code values; where the library departs from their code and
        how closely it follows it is in ``docs/optimizers.md``. Reference:
        :func:`asgo.optim.reference.asgo_step`.
    """

    Config = ASGOConfig
    ELEMENTWISE = ("momentum",)
    COUNTERS = ("skipped_steps", "root_failures")

    def layouts(self, p: Tensor, group: dict) -> list[MatrixView]:
        return [MatrixView.of(p, group["num_heads"])]

    def init_state(self, state: dict, p: Tensor, group: dict) -> None:
        if "momentum" not in state:
            view, dtype = self.layouts(p, group)[0], self.state_dtype(p)
            s = view.shape[0]
            state["momentum"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            state["preconditioner"] = torch.zeros(view.count, s, s, dtype=dtype, device=p.device)
            state["inv_root"] = torch.eye(s, dtype=dtype, device=p.device).repeat(view.count, 1, 1)

    def compute(self, group: dict, G: Tensor, S: dict[str, Tensor], bucket: Bucket):
        M = S["momentum"].lerp(G, 1 - group["momentum"])
        V = S["preconditioner"].lerp(G @ G.mT, 1 - group["beta2"])
        Q = S["inv_root"]
        if root_due(group, bucket.step):
            Q = yield Root(inverse_sqrt, V, Q, dict(method=group["root_method"],
                                                    steps=group["root_steps"], eps=group["eps"]))
        U = rms_normalize(Q @ M, group["update_rms"])
        return Update(U, dict(momentum=M, preconditioner=V, inv_root=Q))
