"""Muon (Jordan et al., 2024): momentum orthogonalised by Newton–Schulz, as ``torch.optim.Muon``."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from asgo.linalg import NEWTON_SCHULZ_ORTHOGONALIZE_COEFFS, ORTHOGONALIZE_METHODS, orthogonalize
from asgo.optim._base import (
    MatrixOptimizer,
    check_choice,
    check_int,
    check_range,
    evaluate_closure,
    finite_flag,
)

ADJUST_LR_FNS = ("original", "match_rms_adamw")


def adjusted_lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """Factor on ``lr`` for the orthogonalised update of a ``rows x cols`` matrix:
    ``'original'`` (or ``None``) ``sqrt(max(1, rows / cols))``; ``'match_rms_adamw'``
    ``0.2 sqrt(max(rows, cols))``, which gives the update an RMS of about 0.2 like AdamW's."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


class Muon(MatrixOptimizer):
    r"""Muon: momentum orthogonalised by a matrix iteration (Jordan et al., 2024, "Muon: An
    optimizer for hidden layers in neural networks"; Liu et al., 2025, "Muon is Scalable for LLM
    Training" for ``'match_rms_adamw'``), with ``torch.optim.Muon``'s arguments and update.

    For a matrix parameter :math:`W \in \mathbb{R}^{m \times n}` with gradient :math:`G_t`::

        B_t = mu B_{t-1} + (1 - mu) G_t               # momentum buffer, B_0 = 0 (torch's lerp_)
        N_t = (1 - mu) G_t + mu B_t   if nesterov     # G_t.lerp(B_t, mu)
              B_t                     otherwise
        O_t = orth(N_t)                               # ~ U V^T of N_t = U S V^T
        W_t = W_{t-1} (1 - lr wd) - lr_adj O_t        # decoupled weight decay with the raw lr
        lr_adj = lr sqrt(max(1, m / n))               # adjust_lr_fn = 'original' (or None)
               = lr 0.2 sqrt(max(m, n))               # adjust_lr_fn = 'match_rms_adamw'

    **Momentum convention.** ``torch.optim.Muon``'s docstring writes the heavy-ball form
    ``B_t = mu B_{t-1} + G_t`` (Nesterov: ``G_t + mu B_t``), but its code (torch 2.13) uses the EMA
    above (``buf.lerp_(grad, 1 - mu)``, ``grad.lerp(buf, mu)``); this class follows the code.
    The two buffers differ by the constant factor ``1 - mu``, so the update directions are the same
    and, since ``orth`` normalises its input, so are the updates, up to ``eps`` (see below).

    ``orth`` is :func:`asgo.linalg.orthogonalize` on the short side: ``X_0 = N / (||N||_F + eps)``
    then ``ns_steps`` quintic steps ``X <- a X + (b A + c A^2) X``, ``A = X X^T``, with
    ``(a, b, c) = ns_coefficients`` (``orthogonalize_method='newton_schulz'``, torch's iteration,
    singular values mapped into roughly [0.7, 1.2]), or the Polar Express schedule
    (``'polar_express'``; ``ns_coefficients`` is then unused), which converges to ``U V^T`` (about
    10 steps in float64). torch divides by ``max(||N||_F, eps)`` rather than ``||N||_F + eps``:
    the same up to a relative ``eps / ||N||_F``.

    The iteration runs in float32 by default (float64 for float64 parameters); torch runs it in
    bfloat16, which ``ns_dtype=torch.bfloat16`` also does. Either way the iterates follow
    ``torch.optim.Muon`` to its bfloat16 round-off, not bitwise: torch rounds ``b A + c A^2`` and
    ``a X + B X`` once each (``addmm``), :func:`~asgo.linalg.orthogonalize` rounds each product and
    sum. Measured over 10 steps (tests/optim/test_muon.py), the displacement ``W_t - W_0`` differs
    from torch's by up to 1.9e-2 relative in float32 and 4.9e-2 in bfloat16.

    Parameters with more than two dimensions (conv weights) are viewed as
    ``(shape[0], prod(shape[1:]))``, and ``m, n`` in ``lr_adj`` are that view's (torch refuses them).
    Same-shape matrices of a group are stacked and orthogonalised in one batched call. State,
    in float32 (float64 for float64 parameters): ``momentum_buffer`` (torch's name) and the fault
    counter ``skipped_steps``: a parameter whose gradient has a non-finite entry is left untouched,
    its buffer too. ``step()`` never syncs with the host; :meth:`diagnostics` reads the counter.

    Defaults are ``torch.optim.Muon``'s: ``lr=1e-3, weight_decay=0.1, momentum=0.95,
    nesterov=True``, quintic ``(3.4445, -4.7750, 2.0315)``, ``ns_steps=5``, ``eps=1e-7``,
    ``adjust_lr_fn=None`` (= ``'original'``).

    **The ASGO authors' Muon baseline** (their code: NS5 quintic, 5 steps, no Nesterov, momentum
    as lerp with 0.9, lr 1e-2, wd 0.1, update scaled by ``0.2 sqrt(max(m, n))``) is::

        Muon(params, lr=1e-2, momentum=0.9, nesterov=False, weight_decay=0.1,
             adjust_lr_fn="match_rms_adamw")

    (their lerp momentum is torch's convention above; whether their weight decay uses the raw or
    the adjusted lr, and their Newton–Schulz dtype, are not documented in papers.md).

    Args:
        params: matrices (2-D or more; 1-D parameters and marked embeddings are refused).
        lr: learning rate before the shape adjustment.
        weight_decay: decoupled weight decay, multiplied by the raw ``lr``.
        momentum: ``mu`` in [0, 1).
        nesterov: use ``(1 - mu) G_t + mu B_t`` instead of ``B_t``.
        ns_coefficients: ``(a, b, c)`` of the Newton–Schulz quintic.
        eps: added to ``||N||_F`` before the normalisation (> 0).
        ns_steps: iterations of the orthogonalisation.
        adjust_lr_fn: ``None``/``'original'`` or ``'match_rms_adamw'``.
        orthogonalize_method: ``'newton_schulz'`` or ``'polar_express'``.
        ns_dtype: dtype of the orthogonalisation; ``None`` = float32 (float64 stays float64).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NEWTON_SCHULZ_ORTHOGONALIZE_COEFFS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        orthogonalize_method: str = "newton_schulz",
        ns_dtype: torch.dtype | None = None,
    ):
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            orthogonalize_method=orthogonalize_method, ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)

    def validate_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"invalid nesterov: {group['nesterov']!r}, expected a bool")
        coeffs = group["ns_coefficients"]
        if not (isinstance(coeffs, (tuple, list)) and len(coeffs) == 3
                and all(isinstance(c, (int, float)) and math.isfinite(c) for c in coeffs)):
            raise ValueError(f"invalid ns_coefficients: {coeffs!r}, expected three finite numbers")
        check_range("eps", group["eps"], 0.0, low_inclusive=False)
        check_int("ns_steps", group["ns_steps"], 1)
        if group["adjust_lr_fn"] is not None:
            check_choice("adjust_lr_fn", group["adjust_lr_fn"], ADJUST_LR_FNS)
        check_choice("orthogonalize_method", group["orthogonalize_method"], ORTHOGONALIZE_METHODS)
        ns_dtype = group["ns_dtype"]
        if ns_dtype is not None and not (isinstance(ns_dtype, torch.dtype) and ns_dtype.is_floating_point):
            raise ValueError(f"invalid ns_dtype: {ns_dtype!r}, expected None or a floating torch.dtype")

    def _init_state(self, state: dict, p: Tensor) -> None:
        state["momentum_buffer"] = torch.zeros_like(
            p, dtype=self.state_dtype(p), memory_format=torch.contiguous_format)
        self.init_counters(state, p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            buckets = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                state = self.state[p]
                if not state:
                    self._init_state(state, p)
                rows = p.shape[0]
                buckets[(rows, p.numel() // rows, state["momentum_buffer"].dtype)].append((p, state))
            for (rows, cols, _), entries in buckets.items():
                self._step_bucket(group, rows, cols, entries)
        return loss

    def _step_bucket(self, group: dict, rows: int, cols: int, entries: list) -> None:
        """One step for same-shape matrices: momentum, one batched orthogonalisation, update."""
        mu = group["momentum"]
        active, inputs = [], []
        for p, state in entries:
            buf = state["momentum_buffer"]
            a = finite_flag(p.grad, buf.dtype)
            g = torch.where(a.bool(), p.grad, 0).to(buf.dtype)
            buf.lerp_(g, (1 - mu) * a)
            state["skipped_steps"] += 1 - a.to(torch.int64)
            update = g.lerp(buf, mu) if group["nesterov"] else buf
            active.append(a)
            inputs.append(update.reshape(rows, cols))

        O = orthogonalize(
            torch.stack(inputs), method=group["orthogonalize_method"], steps=group["ns_steps"],
            eps=group["eps"], coefficients=tuple(group["ns_coefficients"]), dtype=group["ns_dtype"])
        lr, wd = group["lr"], group["weight_decay"]
        lr_adj = lr * adjusted_lr_ratio(group["adjust_lr_fn"], rows, cols)
        for (p, state), o, a in zip(entries, O, active):
            # As torch: W <- W (1 - lr wd), then W.add_(O, alpha=-lr_adj), O promoted to the state
            # dtype; both skipped where a = 0 (``shrink`` is exactly float(1 - lr wd) or 1).
            shrink = a * (1 - lr * wd) + (1 - a)
            step = (o * a).reshape(p.shape)
            if p.dtype == a.dtype:
                p.mul_(shrink).add_(step, alpha=-lr_adj)
            else:
                p.copy_(p.to(a.dtype).mul_(shrink).add_(step, alpha=-lr_adj))
