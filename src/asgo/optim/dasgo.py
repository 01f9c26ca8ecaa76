"""DASGO: Diagonal Adaptive Structured Gradient Optimization (An et al., NeurIPS 2025), Algorithm 4."""

from __future__ import annotations

import torch

from asgo.optim._base import (
    MatrixOptimizer,
    apply_update_,
    check_range,
    evaluate_closure,
    finite_flag,
    rms_normalize_,
)


class DASGO(MatrixOptimizer):
    r"""ASGO with a diagonal one-sided preconditioner: one scale per column (Algorithm 4).

    For :math:`W \in \mathbb{R}^{m \times n}` with gradient :math:`G_t`::

        M_t = beta1 M_{t-1} + (1 - beta1) G_t
        v_t = beta2 v_{t-1} + (1 - beta2) diag(G_t^T G_t)      # column sums of G*G, v in R^n
        U_t = M_t diag(v_t + eps)^(-1/2)                       # scales each column
        U_t <- U_t * r sqrt(mn) / ||U_t||_F                    # when update_rms = r is given
        W_t = W_{t-1} (1 - lr wd) - lr U_t

    The column (input) side is used whatever the shape, as in the authors' code. Memory per
    matrix: the momentum and one n-vector (float32; float64 for float64 parameters). Tensors with
    more than two dimensions are viewed as ``(shape[0], prod(shape[1:]))``. Non-finite gradients
    leave the parameter and its state untouched and are counted in ``skipped_steps``.

    Defaults are the authors' configuration: ``lr=1e-2, momentum=0.9, beta2=0.95, eps=1e-8,
    weight_decay=0.1, update_rms=0.2``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        momentum: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        update_rms: float | None = 0.2,
    ):
        defaults = dict(lr=lr, momentum=momentum, beta2=beta2, eps=eps,
                        weight_decay=weight_decay, update_rms=update_rms)
        super().__init__(params, defaults)

    def validate_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0)
        check_range("beta2", group["beta2"], 0.0, 1.0)
        check_range("eps", group["eps"], 0.0, low_inclusive=False)
        check_range("weight_decay", group["weight_decay"], 0.0)
        if group["update_rms"] is not None:
            check_range("update_rms", group["update_rms"], 0.0, low_inclusive=False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["momentum"], group["beta2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DASGO does not support sparse gradients")
                state = self.state[p]
                dtype = self.state_dtype(p)
                shape = (p.shape[0], p[0].numel())
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.int64)
                    state["momentum"] = torch.zeros(shape, dtype=dtype, device=p.device)
                    state["column_second_moment"] = torch.zeros(shape[1], dtype=dtype, device=p.device)
                    self.init_counters(state, p)
                state["step"] += 1

                a = finite_flag(p.grad, dtype)
                g = torch.where(a.bool(), p.grad, 0).to(dtype).reshape(shape)
                state["momentum"].lerp_(g, (1 - beta1) * a)
                state["column_second_moment"].lerp_(g.square().sum(0), (1 - beta2) * a)
                state["skipped_steps"] += 1 - a.to(torch.int64)

                update = state["momentum"] * (state["column_second_moment"] + group["eps"]).rsqrt()
                rms_normalize_(update, group["update_rms"])
                apply_update_(p, update.view(p.shape), group["lr"], group["weight_decay"], a)
        return loss
