"""Shampoo (Gupta, Koren & Singer, ICML 2018) as the ASGO authors' baseline: two-sided Kronecker
preconditioning with inverse fourth roots, grafted to the Adam update norm."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from asgo.linalg import inverse_fourth_root
from asgo.optim._base import Bucket, MatrixOptimizer, Root, Update
from asgo.optim._config import (LR, POSITIVE, STEPS, UNIT, Choice, Flag, RootSchedule, hyper,
                                root_due)
from asgo.optim._layout import logical_matrix, matrix_shape

GRAFTING_TYPES = ("adam", "none")
PRE_START_UPDATES = ("momentum", "grafting")


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


@dataclass(frozen=True)
class Tile:
    """The :class:`Layout` of one block class of a parameter: its ``(count, r, c)`` blocks of the
    logical matrix (the transpose when ``transposed``), with the factors viewed in the flat
    ``left*``/``right*`` buffers."""

    k: BlockClass
    param_shape: torch.Size
    transposed: bool = False
    views: ClassVar[bool] = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k.r, self.k.c)

    @property
    def count(self) -> int:
        return self.k.count

    def _matrix(self, t: Tensor) -> Tensor:
        return logical_matrix(t, self.transposed)

    def blocks(self, t: Tensor) -> Tensor:
        return self.k.blocks(self._matrix(t))

    def write(self, t: Tensor, blocks: Tensor) -> None:
        self.k.write(self._matrix(t), blocks)

    def merge(self, blocks: Tensor) -> Tensor:
        out = blocks.new_empty(self.param_shape)
        self.write(out, blocks)
        return out

    def state(self, key: str, t: Tensor) -> Tensor:
        return self.k.left(t) if key.startswith("left") else self.k.right(t)


@dataclass
class ShampooConfig(RootSchedule):
    lr: float = hyper(5e-3, LR)
    beta2: float = hyper(0.999, UNIT)
    grafting: str = hyper("adam", Choice(GRAFTING_TYPES))
    grafting_eps: float = hyper(1e-10, POSITIVE)
    max_preconditioner_dim: int = hyper(1024, STEPS)
    transposed: bool = hyper(False, Flag())
    relative_eps: bool = hyper(False, Flag())
    pre_start_update: str = hyper("momentum", Choice(PRE_START_UPDATES))

    def check_combination(self) -> None:
        super().check_combination()
        if self.pre_start_update == "grafting" and self.grafting == "none":
            raise ValueError("invalid pre_start_update: 'grafting' needs a grafting method, got "
                             "grafting='none' (expected pre_start_update='momentum')")


class Shampoo(MatrixOptimizer):
    r"""Shampoo with the ASGO authors' baseline settings: two-sided Kronecker preconditioning of
    each weight matrix with inverse fourth roots, grafted to the Adam update norm.

    For a matrix block :math:`W` (m x n) with gradient :math:`G_t`::

        M_t = beta1 M_{t-1} + (1 - beta1) G_t              # beta1 = momentum, no bias correction
        L_t = beta2 L_{t-1} + (1 - beta2) G_t G_t^T        # m x m, L_0 = 0
        R_t = beta2 R_{t-1} + (1 - beta2) G_t^T G_t        # n x n, R_0 = 0
        P_t = (L_t + d(L_t) I)^(-1/4),  Q_t = (R_t + d(R_t) I)^(-1/4)   on root steps,
              else P_{t-1}, Q_{t-1}                        (P_0 = Q_0 = I)
              with d(X) = max(eps, 16 finfo.eps ||X||_F)    relative_eps=False
                   d(X) = max(eps, 16 finfo.eps) ||X||_F    relative_eps=True
        U_t = P_t M_t Q_t
        grafting='adam':                                   # same beta2, no bias correction
            v_t = beta2 v_{t-1} + (1 - beta2) G_t * G_t
            U_t <- U_t ||A_t||_F / ||U_t||_F,  A_t = M_t / sqrt(v_t + grafting_eps)
            t < s and pre_start_update='grafting':  U_t <- A_t   (Distributed Shampoo)
        W_t = W_{t-1} (1 - lr wd) - lr U_t

    Args:
        params: matrices (2-D or more, viewed as ``(shape[0], prod(shape[1:]))``).
        lr (float | Tensor): step size. Default 5e-3.
        momentum (float): ``beta1``, in [0, 1). Default 0.9.
        beta2 (float): EMA coefficient of ``L``, ``R`` and ``v``, in [0, 1). Default 0.999.
        eps (float): damping of ``L`` and ``R``, > 0: absolute, or relative to ``||X||_F``
            with ``relative_eps``. Default 1e-10 (absolute, the authors' value).
        weight_decay (float): decoupled, multiplied by ``lr``. Default 0.1.
        precondition_frequency (int): ``tau``, steps between roots. Default 1.
        start_preconditioning_step (int): ``s``, the first root step; before it the roots are
            the identity (the update is ``pre_start_update``'s). Default 1.
        root_method (str): ``'auto'`` (``'eigh'`` on the CPU, ``'polar_express'`` elsewhere:
            :func:`asgo.linalg.auto_root_method`), ``'eigh'``, ``'polar_express'`` or
            ``'newton_schulz'`` (two inverse square roots;
            :func:`asgo.linalg.inverse_fourth_root`). Default ``'auto'``.
        root_steps (int): iterations per square root (``'polar_express'``,
            ``'newton_schulz'``). Default 10.
        grafting (str): ``'adam'`` or ``'none'``. Default ``'adam'``.
        grafting_eps (float): > 0. Default 1e-10.
        max_preconditioner_dim (int): a side longer than ``d`` is split into ``ceil(side / d)``
            near-equal chunks; each block gets its own factors, roots and grafting norm, exactly
            as a separate parameter. Fixed once training has started. Default 1024, as
            Distributed Shampoo's; the authors' baseline does not block (a value at least every
            side, e.g. 8192 for GPT-2).
        transposed (bool): the parameters are 2-D weights stored ``(in, out)``, as Hugging Face's
            ``Conv1D``: each is updated exactly as its transpose stored ``(out, in)`` (bit for bit,
            tested on CPU), so its blocks, ``L`` (output side) and ``R`` (input side) are those of
            ``(out, in)``. Default False.
        relative_eps (bool): ``d(X) = max(eps, 16 finfo.eps) ||X||_F``, scale-free: the
            update does not depend on the gradients' scale (``grafting='none'``; with Adam
            grafting only through ``grafting_eps``). Default False.
        pre_start_update (str): the update before step ``s``: ``'momentum'`` (``M_t``, grafted
            to the Adam norm when ``grafting='adam'``) or ``'grafting'`` (the grafting method's
            own update ``A_t``, as Distributed Shampoo; needs ``grafting='adam'``). Default
            ``'momentum'``.

    Notes:
        Shampoo: Gupta, Koren & Singer, ICML 2018 (arXiv 1802.09568); the conventions are the
        ASGO authors' baseline, whose values are the defaults except the roots (theirs: coupled
        Newton to tolerance 1e-6) and the blocking (theirs: none). ``d`` is exactly ``eps``
        (``eps ||X||_F``) above the round-off floor ``16 finfo.eps ||X||_F`` (float32:
        ``1.9e-6 ||X||_F``), which keeps the float32 roots of rank-deficient factors bounded (see
        :func:`asgo.linalg.inverse_fourth_root`); so in float32 an absolute ``eps`` acts only
        while ``||X||_F < eps / 1.9e-6`` (``5.2e-5`` for 1e-10), a relative one when above 1.9e-6.
        Same-shape blocks are stacked and every root of one size in a group goes through one
        batched call. State (float32; float64 for float64 parameters): ``momentum``,
        ``exp_avg_sq`` (grafting 'adam'), the flat ``left``, ``right``, ``left_root``,
        ``right_root`` buffers of the blocks' factors (:meth:`block_factors`), ``step`` (CPU)
        and the counters ``skipped_steps`` and ``root_failures``. ``step()`` never syncs with
        the host except ``torch.linalg.eigh`` on CUDA (``root_method='eigh'``; ``'auto'`` runs
        it only on the CPU).
        Reference: :func:`asgo.optim.reference.shampoo_step`.
    """

    Config = ShampooConfig
    ELEMENTWISE = ("momentum", "exp_avg_sq")
    COUNTERS = ("skipped_steps", "root_failures")

    def layouts(self, p: Tensor, group: dict) -> list[Tile]:
        return [Tile(k, p.shape, group["transposed"]) for k in self._plan(p, group)]

    @staticmethod
    def _plan(p: Tensor, group: dict) -> tuple[BlockClass, ...]:
        rows, cols = matrix_shape(p.shape, group["transposed"])
        return block_plan(rows, cols, group["max_preconditioner_dim"])

    def init_state(self, state: dict, p: Tensor, group: dict) -> None:
        dtype, device = self.state_dtype(p), p.device
        plan = self._plan(p, group)
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            for side, size in (("left", lambda k: k.r), ("right", lambda k: k.c)):
                eyes = [torch.eye(size(k), dtype=dtype, device=device).expand(k.count, -1, -1).flatten()
                        for k in plan]
                state[f"{side}_root"] = torch.cat(eyes)
                state[side] = torch.zeros_like(state[f"{side}_root"])
        if (state["left"].numel(), state["right"].numel()) != _factor_sizes(plan):
            raise ValueError(
                f"max_preconditioner_dim={group['max_preconditioner_dim']} does not match the "
                f"blocking of the saved state of a parameter of shape {tuple(p.shape)}; it cannot "
                f"change once training has started")
        if group["grafting"] == "adam" and "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(state["momentum"])

    def block_factors(self, p: Tensor) -> list[dict]:
        """Per block of ``p`` (ordered by row start, then column start): its ``rows`` and ``cols``
        slices of the logical matrix (``(shape[0], prod(shape[1:]))``, or ``p^T`` when its group
        is ``transposed``) and views of its ``left``, ``right``, ``left_root`` and ``right_root``
        matrices in the optimizer state."""
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

    def compute(self, group: dict, G: Tensor, S: dict[str, Tensor], bucket: Bucket):
        beta2 = group["beta2"]
        M = S["momentum"].lerp(G, 1 - group["momentum"])
        L = S["left"].lerp(G @ G.mT, 1 - beta2)
        R = S["right"].lerp(G.mT @ G, 1 - beta2)
        P, Q = S["left_root"], S["right_root"]
        if root_due(group, bucket.step):
            options = dict(method=group["root_method"], steps=group["root_steps"], eps=group["eps"],
                           relative=group["relative_eps"])
            P, Q = yield [Root(inverse_fourth_root, L, P, options),
                          Root(inverse_fourth_root, R, Q, options)]
        new = dict(momentum=M, left=L, right=R, left_root=P, right_root=Q)
        pre_start = bucket.step < group["start_preconditioning_step"]
        U = M if pre_start else P @ M @ Q  # identity roots before s
        if group["grafting"] == "adam":
            v = new["exp_avg_sq"] = S["exp_avg_sq"].lerp(G * G, 1 - beta2)
            A = M / (v + group["grafting_eps"]).sqrt()
            if pre_start and group["pre_start_update"] == "grafting":
                return Update(A, new)
            norm_u = torch.linalg.matrix_norm(U, keepdim=True).clamp_min(torch.finfo(U.dtype).tiny)
            U = U * (torch.linalg.matrix_norm(A, keepdim=True) / norm_u)
        return Update(U, new)
