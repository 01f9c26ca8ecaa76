"""DASGO: Diagonal Adaptive Structured Gradient Optimization (An et al., NeurIPS 2025), Algorithm 4."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asgo.optim._base import Bucket, MatrixOptimizer, Update, rms_normalize
from asgo.optim._config import POSITIVE, UNIT, EMAHyperParameters, Flag, Optional, hyper
from asgo.optim._layout import Single


@dataclass
class DASGOConfig(EMAHyperParameters):
    beta2: float = hyper(0.95, UNIT)
    eps: float = hyper(1e-8, POSITIVE)
    update_rms: float | None = hyper(0.2, Optional(POSITIVE))
    transposed: bool = hyper(False, Flag())


class DASGO(MatrixOptimizer):
    r"""ASGO with a diagonal one-sided preconditioner: one scale per column (Algorithm 4).

    For :math:`W \in \mathbb{R}^{m \times n}` with gradient :math:`G_t`::

        M_t = beta1 M_{t-1} + (1 - beta1) G_t             # beta1 = momentum
        v_t = beta2 v_{t-1} + (1 - beta2) diag(G_t^T G_t) # column sums of G * G, v in R^n
        U_t = M_t diag(v_t + eps)^(-1/2)                  # scales each column
        U_t <- U_t r sqrt(mn) / ||U_t||_F                 # when update_rms = r is given
        W_t = W_{t-1} (1 - lr wd) - lr U_t

    Args:
        params: matrices (2-D or more, viewed as ``(shape[0], prod(shape[1:]))``).
        lr (float | Tensor): step size. Default 1e-2.
        momentum (float): ``beta1``, in [0, 1). Default 0.9.
        beta2 (float): EMA coefficient of ``v``, in [0, 1). Default 0.95.
        eps (float): added to ``v``, > 0. Default 1e-8.
        weight_decay (float): decoupled, multiplied by ``lr``. Default 0.1.
        update_rms (float | None): RMS of each update; None: unscaled. Default 0.2.
        transposed (bool): the parameters are 2-D weights stored ``(in, out)``, as Hugging Face's
            ``Conv1D``: each is updated exactly as its transpose stored ``(out, in)`` (bit for bit,
            tested on CPU), so ``v`` has one entry per input (per row of the stored parameter).
            Default False.

    Notes:
        The column (input) side is used whatever the shape, as in the authors' code (for a
        weight stored ``(in, out)``, pass ``transposed=True`` to keep it the input side); defaults
        are their configuration. Same-shape matrices are stacked. State (float32; float64 for
        float64 parameters): ``momentum``, ``column_second_moment`` (``n``), ``step`` (CPU) and
        the counter ``skipped_steps``. Reference: :func:`asgo.optim.reference.dasgo_step`.
    """

    Config = DASGOConfig
    ELEMENTWISE = ("momentum",)

    def layouts(self, p: Tensor, group: dict) -> list[Single]:
        return [Single.matrix(p, transposed=group["transposed"])]

    def init_state(self, state: dict, p: Tensor, group: dict) -> None:
        if "momentum" not in state:
            dtype, cols = self.state_dtype(p), self.layouts(p, group)[0].shape[1]
            state["momentum"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            state["column_second_moment"] = torch.zeros(cols, dtype=dtype, device=p.device)

    def compute(self, group: dict, G: Tensor, S: dict[str, Tensor], bucket: Bucket) -> Update:
        M = S["momentum"].lerp(G, 1 - group["momentum"])
        v = S["column_second_moment"].lerp(G.square().sum(-2), 1 - group["beta2"])
        U = rms_normalize(M * (v + group["eps"]).rsqrt().unsqueeze(-2), group["update_rms"])
        return Update(U, dict(momentum=M, column_second_moment=v))
