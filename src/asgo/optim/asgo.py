"""ASGO: Adaptive Structured Gradient Optimization (An et al., NeurIPS 2025), Algorithm 2."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asgo.linalg import inverse_sqrt, inverse_sqrt_official
from asgo.optim._base import Bucket, MatrixOptimizer, Root, Update, _cat, rms_normalize
from asgo.optim._config import (POSITIVE, STEPS, Choice, Flag, Integer, Optional, RootSchedule,
                                hyper, root_due)
from asgo.optim._layout import MatrixView


@dataclass
class ASGOConfig(RootSchedule):
    precondition_frequency: int = hyper(5, STEPS)  # by evidence: docs/results/asgo_tau.md
    update_rms: float | None = hyper(0.2, Optional(POSITIVE))
    num_heads: int = hyper(1, Integer(1))
    transposed: bool = hyper(False, Flag())
    compat: str | None = hyper(None, Choice((None, "official")))

    def check_combination(self) -> None:
        super().check_combination()
        if self.compat == "official" and self.root_method == "eigh":
            raise ValueError("invalid root_method: 'eigh' with compat='official', expected "
                             "'polar_express' or 'newton_schulz' (the authors' code has no eigh root)")


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
        precondition_frequency (int): ``tau``, steps between roots. Default 5: the largest tau
            whose validation loss on the tiny GPT is within one seed std of tau = 1's
            (``docs/results/asgo_tau.md``); the authors' code uses 1.
        start_preconditioning_step (int): ``s``, the first root step; before it ``Q = I``.
            Root steps are ``s, s + tau, s + 2 tau, ...``. Default 1.
        root_method (str): ``'auto'`` (``'eigh'`` on the CPU, ``'polar_express'`` elsewhere:
            :func:`asgo.linalg.auto_root_method`; ``'polar_express'`` under
            ``compat='official'``), ``'polar_express'``, ``'newton_schulz'`` or ``'eigh'``
            (:func:`asgo.linalg.inverse_sqrt`). Default ``'auto'``: on the CPU, eigh costs
            less than the 10-step iteration at every size and trains the tiny GPT as well
            (``docs/results/asgo_root.md``).
        root_steps (int): iterations of the root. Default 10.
        update_rms (float | None): RMS of each block's update; None: unscaled. Default 0.2.
        num_heads (int): split each weight's rows (its output side) into this many blocks
            (attention heads), each preconditioned as if it were a separate parameter. Default 1.
        transposed (bool): the parameters are 2-D weights stored ``(in, out)``, as Hugging Face's
            ``Conv1D``: each is updated exactly as its transpose stored ``(out, in)`` (bit for bit,
            tested on CPU), so heads split its outputs and the side of a square block is chosen as
            for ``(out, in)``. Default False.
        compat (str | None): None: the root above, ``(V_t + eps I)^(-1/2)`` with the round-off
            damping of :func:`asgo.linalg.inverse_sqrt` (``tol=None``: a root is replaced only if
            not finite). ``'official'``: the authors' float32 code,
            :func:`asgo.linalg.inverse_sqrt_official` (eps only in the Frobenius normalisation of
            Polar Express, no ``eps I`` added to ``V``, no round-off damping), their rounding of
            the ``V`` update, ``M Q`` on the right side, and the identity where a root is not
            finite; needs ``root_method`` ``'polar_express'`` or ``'newton_schulz'``. Default None.

    Notes:
        The smaller side is preconditioned; square blocks use the right side, as the authors'
        code. Same-shape blocks are stacked and their roots batched (one call per root size).
        State (float32; float64 for float64 parameters): ``momentum``, ``preconditioner`` ``V``
        and ``inv_root`` ``Q`` (``(blocks, s, s)``), ``step`` (CPU) and the counters
        ``skipped_steps`` and ``root_failures`` (a non-finite root keeps the previous one;
        identity under ``compat='official'``). Defaults are the authors' code values but
        ``precondition_frequency`` (theirs: 1) and ``root_method`` (theirs: Polar Express,
        which ``'auto'`` runs off the CPU); the default root departs from their code at small
        gradient scales and on rank-deficient ``V`` (measured in ``docs/optimizers.md``). Reference:
        :func:`asgo.optim.reference.asgo_step`.
    """

    Config = ASGOConfig
    ELEMENTWISE = ("momentum",)
    COUNTERS = ("skipped_steps", "root_failures")

    def layouts(self, p: Tensor, group: dict) -> list[MatrixView]:
        return [MatrixView.of(p, group["num_heads"], group["transposed"])]

    def init_state(self, state: dict, p: Tensor, group: dict) -> None:
        if "momentum" not in state:
            view, dtype = self.layouts(p, group)[0], self.state_dtype(p)
            s = view.shape[0]
            state["momentum"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            state["preconditioner"] = torch.zeros(view.count, s, s, dtype=dtype, device=p.device)
            state["inv_root"] = torch.eye(s, dtype=dtype, device=p.device).repeat(view.count, 1, 1)

    def compute(self, group: dict, G: Tensor, S: dict[str, Tensor], bucket: Bucket):
        beta2, official = group["beta2"], group["compat"] == "official"
        P = G @ G.mT
        M = torch.lerp(S["momentum"], G, 1 - group["momentum"], out=G)  # G is not read again
        if official:  # the authors' V.mul_(beta2).add_(P, alpha=1 - beta2), rounded as theirs
            V = torch.add(S["preconditioner"] * beta2, P, alpha=1 - beta2)
        else:
            V = S["preconditioner"].lerp(P, 1 - beta2)
        Q = S["inv_root"]
        if root_due(group, bucket.step):
            method = group["root_method"]
            if official and method == "auto":
                method = "polar_express"
            options = dict(method=method, steps=group["root_steps"], eps=group["eps"])
            if official:  # a non-finite root falls back to the identity, as theirs
                eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device).expand_as(Q)
                Q = yield Root(inverse_sqrt_official, V, eye, options)
            else:
                Q = yield Root(inverse_sqrt, V, Q, dict(options, tol=None))
        if official:  # theirs is M Q on the right side: (M Q)^T = Q^T M^T on a transposed block
            U = _cat([q.mT if getattr(slot.layout, "transpose", False) else q
                      for slot, q in zip(bucket.slots, Q.split(bucket.counts))]) @ M
        else:
            U = Q @ M
        U = rms_normalize(U, group["update_rms"], inplace=True)
        return Update(U, dict(momentum=M, preconditioner=V, inv_root=Q), scratch=True)
