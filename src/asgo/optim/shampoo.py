"""Shampoo (Gupta, Koren & Singer, ICML 2018) as the ASGO authors' baseline: two-sided Kronecker
preconditioning with inverse fourth roots, grafted to the Adam update norm."""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from asgo.linalg import INVERSE_SQRT_METHODS, inverse_fourth_root
from asgo.optim._base import (
    MatrixOptimizer,
    apply_update_,
    check_choice,
    check_int,
    check_range,
    evaluate_closure,
    finite_flag,
)

GRAFTING_TYPES = ("adam", "none")


@dataclass(frozen=True)
class BlockClass:
    """A rectangle ``rows x cols`` of the ``(m, n)`` matrix view tiled by ``count`` blocks of one
    shape ``(r, c)``: ``n_row`` row chunks times ``n_col`` column chunks, row-major."""

    row_start: int
    n_row: int
    r: int
    col_start: int
    n_col: int
    c: int
    left_offset: int   # into the flat buffers 'left' / 'left_root'
    right_offset: int  # into the flat buffers 'right' / 'right_root'

    @property
    def count(self) -> int:
        return self.n_row * self.n_col

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_start + self.n_row * self.r)

    @property
    def cols(self) -> slice:
        return slice(self.col_start, self.col_start + self.n_col * self.c)

    def blocks(self, X: Tensor) -> Tensor:
        """The ``(count, r, c)`` blocks of the matrix ``X`` in this class, row-major."""
        region = X[self.rows, self.cols].reshape(self.n_row, self.r, self.n_col, self.c)
        return region.transpose(1, 2).reshape(self.count, self.r, self.c)

    def write(self, X: Tensor, blocks: Tensor) -> None:
        """Inverse of :meth:`blocks`: write ``(count, r, c)`` blocks into ``X``."""
        region = blocks.reshape(self.n_row, self.n_col, self.r, self.c).transpose(1, 2)
        X[self.rows, self.cols] = region.reshape(self.n_row * self.r, self.n_col * self.c)

    def left(self, flat: Tensor) -> Tensor:
        size = self.count * self.r * self.r
        return flat[self.left_offset:self.left_offset + size].view(self.count, self.r, self.r)

    def right(self, flat: Tensor) -> Tensor:
        size = self.count * self.c * self.c
        return flat[self.right_offset:self.right_offset + size].view(self.count, self.c, self.c)


def _chunk_runs(size: int, max_dim: int) -> list[tuple[int, int, int]]:
    """``(start, count, chunk)`` runs of the balanced split of ``size`` into ``ceil(size/max_dim)``
    chunks (``torch.tensor_split``'s sizes: the first ``size % k`` chunks one longer)."""
    k = -(-size // max_dim)
    q, rem = divmod(size, k)
    runs = [(0, rem, q + 1)] if rem else []
    return runs + [(rem * (q + 1), k - rem, q)]


@functools.lru_cache(maxsize=None)
def block_plan(m: int, n: int, max_dim: int) -> tuple[BlockClass, ...]:
    """The block classes of an ``(m, n)`` matrix whose sides are split into ``ceil(side /
    max_dim)`` near-equal chunks (at most two chunk sizes per side, so at most four classes)."""
    classes, left, right = [], 0, 0
    for r0, nr, r in _chunk_runs(m, max_dim):
        for c0, nc, c in _chunk_runs(n, max_dim):
            classes.append(BlockClass(r0, nr, r, c0, nc, c, left, right))
            left += nr * nc * r * r
            right += nr * nc * c * c
    return tuple(classes)


def _factor_sizes(plan: tuple[BlockClass, ...]) -> tuple[int, int]:
    """Lengths of the flat ``left`` and ``right`` buffers of a parameter with this plan."""
    last = plan[-1]
    return last.left_offset + last.count * last.r**2, last.right_offset + last.count * last.c**2


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class Shampoo(MatrixOptimizer):
    r"""Shampoo with the ASGO authors' baseline settings: two-sided Kronecker preconditioning of
    each weight matrix with inverse fourth roots, grafted to the Adam update norm.

    Shampoo: Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization",
    ICML 2018 (arXiv 1802.09568); the conventions below are those of the Shampoo baseline in the
    ASGO authors' code (An et al., NeurIPS 2025). For a matrix block :math:`W` (m x n) with
    gradient :math:`G_t`::

        M_t = beta1 M_{t-1} + (1 - beta1) G_t              # momentum (EMA, no bias correction)
        L_t = beta2 L_{t-1} + (1 - beta2) G_t G_t^T        # m x m, L_0 = 0
        R_t = beta2 R_{t-1} + (1 - beta2) G_t^T G_t        # n x n, R_0 = 0
        P_t = (L_t + d(L_t) I)^(-1/4),  Q_t = (R_t + d(R_t) I)^(-1/4)   if t is a root step,
                                                           else P_{t-1}, Q_{t-1}
            with d(X) = eps + 16 finfo.eps ||X||_F
        U_t = P_t M_t Q_t
        grafting='adam':                                   # same beta2, no bias correction
            v_t = beta2 v_{t-1} + (1 - beta2) G_t * G_t    # elementwise
            A_t = M_t / sqrt(v_t + grafting_eps)
            U_t <- U_t ||A_t||_F / ||U_t||_F
        W_t = W_{t-1} (1 - lr wd) - lr U_t                 # decoupled weight decay

    ``eps`` is an absolute damping added to the diagonal of L and R, as in the authors' code; the
    second term of ``d`` is the round-off floor of the compute dtype (float32: ``1.9e-6 ||X||_F``,
    float64: ``3.6e-15 ||X||_F``), without which float32 round-off eigenvalues of a rank-deficient
    factor (every R while the gradients seen so far span fewer than n rows) get gains up to
    ``eps^(-1/4)`` or make the iterations diverge (see :func:`inverse_fourth_root`). Fourth roots
    use one ``eigh`` (``root_method='eigh'``) or two batched inverse square roots of
    :mod:`asgo.linalg` (``'polar_express'``, ``'newton_schulz'``, ``root_steps`` each). Root steps
    are ``t = s, s + tau, ...`` with ``s = start_preconditioning_step`` and ``tau =
    precondition_frequency``; before ``s`` the roots are the identity, so the update is the
    momentum (grafted to the Adam norm when grafting is on). Parameters with more than two
    dimensions are viewed as ``(shape[0], prod(shape[1:]))`` (the authors' code instead keeps one
    factor per tensor mode).

    Blocking: a side longer than ``max_preconditioner_dim = d`` is split into ``ceil(side / d)``
    near-equal chunks (``torch.tensor_split`` sizes), both sides independently; every block gets
    its own L, R, roots and its own grafting norm, so a blocked parameter is updated exactly as
    if each block were a separate parameter (momentum and ``v`` are elementwise, so they do not
    care). Factor memory is then at most ``m d + n d`` instead of ``m^2 + n^2`` numbers.

    Batching: the Gram products and updates of same-shape blocks of a group are stacked, and every
    root of the same size in a group (left or right factor, any parameter) goes through one
    batched :func:`inverse_fourth_root` call.

    State (float32, float64 for float64 parameters): ``momentum``, ``exp_avg_sq`` (grafting 'adam'
    only), the flat buffers ``left``, ``right``, ``left_root``, ``right_root`` holding the blocks'
    factors (see :meth:`block_factors`), ``step`` (CPU) and the fault counters ``skipped_steps``
    (non-finite gradient: the parameter and its state are left untouched) and ``root_failures``
    (one per non-finite root: the previous root is kept, the identity before the first). ``step()``
    never syncs with the host unless ``root_method='eigh'`` (``torch.linalg.eigh`` syncs on CUDA).

    Defaults are the authors' Shampoo values: ``lr=5e-3, momentum=0.9, beta2=0.999, eps=1e-10,
    weight_decay=0.1``, roots every step, exponent -1/4, Adam grafting with ``grafting_eps=1e-10``
    (the authors use their one ``eps`` in both places). Roots default to Polar Express with 10
    steps per square root (the authors iterate coupled Newton for p = 4 to tolerance 1e-6, at most
    50 steps). ``max_preconditioner_dim=8192`` leaves every GPT-2 matrix unblocked, as in the
    authors' code, while bounding factor memory for larger models.
    """

    COUNTERS = ("skipped_steps", "root_failures")

    def __init__(
        self,
        params,
        lr: float = 5e-3,
        momentum: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-10,
        weight_decay: float = 0.1,
        precondition_frequency: int = 1,
        start_preconditioning_step: int = 1,
        root_method: str = "polar_express",
        root_steps: int = 10,
        grafting: str = "adam",
        grafting_eps: float = 1e-10,
        max_preconditioner_dim: int = 8192,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, beta2=beta2, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step, root_method=root_method,
            root_steps=root_steps, grafting=grafting, grafting_eps=grafting_eps,
            max_preconditioner_dim=max_preconditioner_dim,
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
        check_choice("grafting", group["grafting"], GRAFTING_TYPES)
        check_range("grafting_eps", group["grafting_eps"], 0.0, low_inclusive=False)
        check_int("max_preconditioner_dim", group["max_preconditioner_dim"], 1)

    @staticmethod
    def _plan(p: Tensor, group: dict) -> tuple[BlockClass, ...]:
        return block_plan(p.shape[0], p[0].numel(), group["max_preconditioner_dim"])

    def _init_state(self, state: dict, p: Tensor, group: dict) -> None:
        dtype, device = self.state_dtype(p), p.device
        plan = self._plan(p, group)
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["momentum"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        if group["grafting"] == "adam":
            state["exp_avg_sq"] = torch.zeros_like(state["momentum"])
        for side, size in (("left", lambda k: k.r), ("right", lambda k: k.c)):
            eyes = [torch.eye(size(k), dtype=dtype, device=device).expand(k.count, -1, -1).flatten()
                    for k in plan]
            state[f"{side}_root"] = torch.cat(eyes)
            state[side] = torch.zeros_like(state[f"{side}_root"])
        self.init_counters(state, p)

    def block_factors(self, p: Tensor) -> list[dict]:
        """Per block of ``p`` (ordered by row start, then column start): its ``rows`` and ``cols``
        slices of the ``(shape[0], prod(shape[1:]))`` view and views of its ``left``, ``right``,
        ``left_root`` and ``right_root`` matrices in the optimizer state."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        state = self.state[p]
        out = []
        for k in self._plan(p, group):
            views = {key: (k.left if key.startswith("left") else k.right)(state[key])
                     for key in ("left", "right", "left_root", "right_root")}
            for b in range(k.count):
                i, j = divmod(b, k.n_col)
                rows = slice(k.row_start + i * k.r, k.row_start + (i + 1) * k.r)
                cols = slice(k.col_start + j * k.c, k.col_start + (j + 1) * k.c)
                out.append(dict(rows=rows, cols=cols, **{key: v[b] for key, v in views.items()}))
        return sorted(out, key=lambda d: (d["rows"].start, d["cols"].start))

    @staticmethod
    def _root_due(group: dict, step: int) -> bool:
        start = group["start_preconditioning_step"]
        return step >= start and (step - start) % group["precondition_frequency"] == 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            entries = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Shampoo does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(state, p, group)
                plan = self._plan(p, group)
                if (state["left"].numel(), state["right"].numel()) != _factor_sizes(plan):
                    raise ValueError(
                        f"max_preconditioner_dim={group['max_preconditioner_dim']} does not match "
                        f"the blocking of the saved state of a parameter of shape "
                        f"{tuple(p.shape)}; it cannot change once training has started")
                state["step"] += 1
                entries.append((p, state, plan))
            if entries:
                self._step_group(group, entries)
        return loss

    def _step_group(self, group: dict, entries: list) -> None:
        beta1, beta2 = group["momentum"], group["beta2"]
        adam = group["grafting"] == "adam"
        active, grads = [], []
        for p, state, _ in entries:
            a = finite_flag(p.grad, state["momentum"].dtype)
            g = torch.where(a.bool(), p.grad, 0).to(state["momentum"].dtype)
            state["momentum"].lerp_(g, (1 - beta1) * a)
            if adam:
                if "exp_avg_sq" not in state:  # grafting switched on after the first step
                    state["exp_avg_sq"] = torch.zeros_like(state["momentum"])
                state["exp_avg_sq"].lerp_(g * g, (1 - beta2) * a)
            state["skipped_steps"] += 1 - a.to(torch.int64)
            active.append(a)
            grads.append(g.reshape(g.shape[0], -1))

        # same-shape blocks of the group: (entry index, block class)
        by_shape = defaultdict(list)
        for e, (_, _, plan) in enumerate(entries):
            for k in plan:
                by_shape[(k.r, k.c)].append((e, k))

        for items in by_shape.values():
            G = _cat([k.blocks(grads[e]) for e, k in items])
            counts = [k.count for _, k in items]
            for (e, k), gl, gr in zip(items, (G @ G.mT).split(counts), (G.mT @ G).split(counts)):
                state, w = entries[e][1], (1 - beta2) * active[e]
                k.left(state["left"]).lerp_(gl, w)
                k.right(state["right"]).lerp_(gr, w)

        self._update_roots(group, entries, active)

        single = [len(plan) == 1 and plan[0].count == 1 for _, _, plan in entries]
        updates = [None if one else torch.empty_like(g) for one, g in zip(single, grads)]
        if adam:
            directions = [(state["momentum"] / (state["exp_avg_sq"] + group["grafting_eps"]).sqrt())
                          .reshape(grads[e].shape) for e, (_, state, _) in enumerate(entries)]
        for items in by_shape.values():
            left = _cat([k.left(entries[e][1]["left_root"]) for e, k in items])
            right = _cat([k.right(entries[e][1]["right_root"]) for e, k in items])
            momentum = _cat([k.blocks(entries[e][1]["momentum"].reshape(grads[e].shape))
                             for e, k in items])
            U = left @ momentum @ right
            if adam:
                A = _cat([k.blocks(directions[e]) for e, k in items])
                norm_u = torch.linalg.matrix_norm(U, keepdim=True)
                U = U * (torch.linalg.matrix_norm(A, keepdim=True)
                         / norm_u.clamp_min(torch.finfo(U.dtype).tiny))
            for (e, k), u in zip(items, U.split([k.count for _, k in items])):
                if single[e]:
                    updates[e] = u[0]
                else:
                    k.write(updates[e], u)

        for (p, _, _), u, a in zip(entries, updates, active):
            apply_update_(p, u.view(p.shape), group["lr"], group["weight_decay"], a)

    def _update_roots(self, group: dict, entries: list, active: list) -> None:
        """Recompute the due roots, one batched call per factor size; keep the old root where the
        new one is not finite or the parameter's gradient was skipped."""
        by_size = defaultdict(list)  # size -> [(statistic view, root view, entry index)]
        for e, (_, state, plan) in enumerate(entries):
            if not self._root_due(group, int(state["step"])):
                continue
            for k in plan:
                by_size[k.r].append((k.left(state["left"]), k.left(state["left_root"]), e))
                by_size[k.c].append((k.right(state["right"]), k.right(state["right_root"]), e))
        for items in by_size.values():
            roots, ok = inverse_fourth_root(
                _cat([stat for stat, _, _ in items]), method=group["root_method"],
                steps=group["root_steps"], eps=group["eps"])
            sizes = [stat.shape[0] for stat, _, _ in items]
            for (_, old, e), root, ok_i in zip(items, roots.split(sizes), ok.split(sizes)):
                keep_old = (~ok_i | ~active[e].bool())[:, None, None]
                old.copy_(torch.where(keep_old, old, root))
                entries[e][1]["root_failures"] += (~ok_i).sum()
