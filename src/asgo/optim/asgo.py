"""ASGO: Adaptive Structured Gradient Optimization (An et al., NeurIPS 2025), Algorithm 2."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from asgo.linalg import INVERSE_SQRT_METHODS, inverse_sqrt
from asgo.optim._base import (
    MatrixOptimizer,
    MatrixView,
    apply_update_,
    check_choice,
    check_int,
    check_range,
    evaluate_closure,
    finite_flag,
    rms_normalize_,
)


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class ASGO(MatrixOptimizer):
    r"""One-sided structured preconditioning of each weight matrix (ASGO, Algorithm 2).

    For a matrix parameter :math:`W \in \mathbb{R}^{m \times n}` with gradient :math:`G_t`
    (written for the left side, used when :math:`m < n`)::

        M_t = beta1 M_{t-1} + (1 - beta1) G_t                  # momentum (EMA)
        V_t = beta2 V_{t-1} + (1 - beta2) G_t G_t^T            # m x m, V_0 = 0
        Q_t = (V_t + eps I)^(-1/2)   if t is a root step, else Q_{t-1}
        U_t = Q_t M_t   (scaled to RMS `update_rms` when given: U_t * r sqrt(mn) / ||U_t||_F)
        W_t = W_{t-1} (1 - lr wd) - lr U_t

    When :math:`m \ge n` the right side is used instead (``V = EMA(G^T G)``, ``U = M Q``), so V
    is always ``min(m, n)`` square; square matrices use the right side, as the authors' code.
    Root steps are ``t = s, s + tau, s + 2 tau, ...`` with ``s = start_preconditioning_step`` and
    ``tau = precondition_frequency``; before ``s`` the root is the identity (momentum SGD with the
    RMS scaling). Parameters with more than two dimensions (conv weights) are viewed as
    ``(shape[0], prod(shape[1:]))``.

    With ``num_heads = h`` (a per-group option for attention query/key weights) a weight of
    ``h * d_head`` rows is split into ``h`` row blocks of shape ``(d_head, n)``, each with its own
    preconditioner, momentum scaling and RMS normalisation, exactly as if each block were a
    separate parameter.

    Same-shape blocks of a group are stacked for one batched Gram product, one batched inverse
    root and one batched update product. State is kept in float32 (float64 for float64
    parameters): ``momentum`` (shape of the parameter), ``preconditioner`` and ``inv_root``
    (``(blocks, s, s)``), ``step`` (CPU) and the fault counters ``skipped_steps`` (non-finite
    gradient: the parameter and its state are left untouched) and ``root_failures`` (a non-finite
    root: the previous root is kept, identity before the first). ``step()`` never syncs with the
    host; :meth:`diagnostics` reads the counters.

    Defaults are the authors' code values: ``lr=1e-2, momentum=0.9, beta2=0.8, eps=1e-10,
    weight_decay=0.1``, Polar Express with 10 steps, ``update_rms=0.2``, and the root recomputed
    every step (``precondition_frequency=1``). With those settings the update equals the
    official implementation's step for step, to float32 round-off.
    """

    COUNTERS = ("skipped_steps", "root_failures")

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        momentum: float = 0.9,
        beta2: float = 0.8,
        eps: float = 1e-10,
        weight_decay: float = 0.1,
        precondition_frequency: int = 1,
        start_preconditioning_step: int = 1,
        root_method: str = "polar_express",
        root_steps: int = 10,
        update_rms: float | None = 0.2,
        num_heads: int = 1,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, beta2=beta2, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step, root_method=root_method,
            root_steps=root_steps, update_rms=update_rms, num_heads=num_heads,
        )
        super().__init__(params, defaults)

    def validate_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0)
        check_range("beta2", group["beta2"], 0.0, 1.0)
        check_range("eps", group["eps"], 0.0, low_inclusive=False)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_int("precondition_frequency", group["precondition_frequency"], 1)
        check_int("start_preconditioning_step", group["start_preconditioning_step"], 1)
        check_choice("root_method", group["root_method"], INVERSE_SQRT_METHODS)
        check_int("root_steps", group["root_steps"], 1)
        if group["update_rms"] is not None:
            check_range("update_rms", group["update_rms"], 0.0, low_inclusive=False)
        check_int("num_heads", group["num_heads"], 1)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            MatrixView.of(p, group["num_heads"])

    def _init_state(self, state: dict, p: Tensor, view: MatrixView) -> None:
        dtype = self.state_dtype(p)
        s = view.block_shape[0]
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["momentum"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        state["preconditioner"] = torch.zeros(view.num_blocks, s, s, dtype=dtype, device=p.device)
        state["inv_root"] = torch.eye(s, dtype=dtype, device=p.device).repeat(view.num_blocks, 1, 1)
        self.init_counters(state, p)

    @staticmethod
    def _root_due(group: dict, step: int) -> bool:
        start = group["start_preconditioning_step"]
        return step >= start and (step - start) % group["precondition_frequency"] == 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            buckets = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ASGO does not support sparse gradients")
                view = MatrixView.of(p, group["num_heads"])
                state = self.state[p]
                if not state:
                    self._init_state(state, p, view)
                state["step"] += 1
                buckets[view.block_shape].append((p, view, state))
            for entries in buckets.values():
                self._step_bucket(group, entries)
        return loss

    def _step_bucket(self, group: dict, entries: list) -> None:
        """One step for same-shape blocks: batched Gram product, inverse root and update."""
        beta1, beta2 = group["momentum"], group["beta2"]
        active, grad_blocks = [], []
        for p, view, state in entries:
            a = finite_flag(p.grad, state["momentum"].dtype)
            g = torch.where(a.bool(), p.grad, 0).to(state["momentum"].dtype)
            state["momentum"].lerp_(g, (1 - beta1) * a)
            state["skipped_steps"] += 1 - a.to(torch.int64)
            active.append(a)
            grad_blocks.append(view.to_blocks(g))

        gram = _cat(grad_blocks)
        gram = gram @ gram.mT
        sizes = [view.num_blocks for _, view, _ in entries]
        for (_, _, state), g2, a in zip(entries, gram.split(sizes), active):
            state["preconditioner"].lerp_(g2, (1 - beta2) * a)

        due = [i for i, (_, _, state) in enumerate(entries) if self._root_due(group, int(state["step"]))]
        if due:
            roots, ok = inverse_sqrt(
                _cat([entries[i][2]["preconditioner"] for i in due]),
                method=group["root_method"], steps=group["root_steps"], eps=group["eps"])
            due_sizes = [sizes[i] for i in due]
            for i, root, ok_i in zip(due, roots.split(due_sizes), ok.split(due_sizes)):
                state = entries[i][2]
                keep_old = (~ok_i | ~active[i].bool())[:, None, None]
                state["inv_root"].copy_(torch.where(keep_old, state["inv_root"], root))
                state["root_failures"] += (~ok_i).sum()

        update = _cat([state["inv_root"] for _, _, state in entries]) @ _cat(
            [view.to_blocks(state["momentum"]) for _, view, state in entries])
        rms_normalize_(update, group["update_rms"])
        for (p, view, _), u, a in zip(entries, update.split(sizes), active):
            apply_update_(p, view.from_blocks(u), group["lr"], group["weight_decay"], a)
