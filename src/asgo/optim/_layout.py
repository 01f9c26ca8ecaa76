"""Layouts: how a parameter is seen as a stack of same-shape matrix blocks.

A matrix parameter's *logical* matrix has the output side as rows: ``(shape[0], prod(shape[1:]))``
(``nn.Linear``, conv weights), or, for a 2-D parameter stored ``(in, out)`` (``transposed``, as
Hugging Face's ``Conv1D``), its transpose. Layouts cut the logical matrix into blocks, so an
optimizer sees a transposed parameter exactly as it sees the transpose stored normally.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor


def matrix_shape(shape: tuple[int, ...], transposed: bool = False) -> tuple[int, int]:
    """``(rows, cols)`` of the logical matrix of a parameter of ``shape``: ``(out, in)``."""
    if transposed:
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def logical_matrix(t: Tensor, transposed: bool = False) -> Tensor:
    """The logical matrix of a parameter-shaped ``t`` (a view where one exists)."""
    return t.mT if transposed else t.reshape(t.shape[0], -1)


class Layout(Protocol):
    """How (part of) a parameter is seen as ``count`` blocks of one ``shape``.

    ``blocks``/``write`` convert parameter-shaped tensors (the gradient, elementwise state) to a
    ``(count, *shape)`` stack and back; ``state`` views a per-block state tensor as
    ``(count, ...)``; ``merge`` turns a stack into a parameter-shaped tensor, when the layout
    covers the whole parameter."""

    shape: tuple[int, ...]
    count: int
    views: bool  # whether ``blocks`` of a contiguous tensor is a view of it

    def blocks(self, t: Tensor) -> Tensor: ...
    def write(self, t: Tensor, blocks: Tensor) -> None: ...
    def state(self, key: str, t: Tensor) -> Tensor: ...
    def merge(self, blocks: Tensor) -> Tensor: ...


class _Reshaped:
    """``merge`` and ``write`` of a layout whose blocks are a reshape of the parameter's logical
    tensor (the parameter, or its transpose when ``transposed``), each block transposed when
    ``transpose``."""

    param_shape: torch.Size
    transpose: bool
    transposed: bool

    def logical(self, t: Tensor) -> Tensor:
        """The logical tensor of a parameter-shaped ``t``, and back (a view; its own inverse)."""
        return t.mT if self.transposed else t

    def merge(self, blocks: Tensor) -> Tensor:
        shape = self.param_shape[::-1] if self.transposed else self.param_shape
        return self.logical((blocks.mT if self.transpose else blocks).reshape(shape))

    def write(self, t: Tensor, blocks: Tensor) -> None:
        t.copy_(self.merge(blocks))


@dataclass(frozen=True)
class Single(_Reshaped):
    """The whole parameter as one block of ``shape`` (its logical matrix, or its own shape),
    transposed when ``transpose``. Per-block state is stored without a block axis."""

    param_shape: torch.Size
    shape: tuple[int, ...]
    transpose: bool = False
    transposed: bool = False
    count: ClassVar[int] = 1
    views: ClassVar[bool] = True

    @classmethod
    def matrix(cls, p: Tensor, transpose: bool = False, transposed: bool = False) -> Single:
        """The logical matrix ``(rows, cols)`` of ``p``, as ``(cols, rows)`` when ``transpose``."""
        rows, cols = matrix_shape(p.shape, transposed)
        return cls(p.shape, (cols, rows) if transpose else (rows, cols), transpose, transposed)

    @classmethod
    def whole(cls, p: Tensor, transposed: bool = False) -> Single:
        """``p`` in its own shape (its transpose when ``transposed``)."""
        return cls(p.shape, tuple(p.shape[::-1] if transposed else p.shape), transposed=transposed)

    def blocks(self, t: Tensor) -> Tensor:
        b = self.logical(t).reshape(1, *(self.shape[::-1] if self.transpose else self.shape))
        return b.mT if self.transpose else b

    def state(self, key: str, t: Tensor) -> Tensor:
        return t.unsqueeze(0)


@dataclass(frozen=True)
class MatrixView(_Reshaped):
    """A parameter's logical matrix ``(out, in)`` (conv weights as ``(out, prod(rest))``), split
    into ``num_blocks`` row blocks (attention heads: rows are the output side), each transposed
    when its row side is not the smaller one, so the preconditioned side comes first. Per-block
    state is stored with a leading block axis."""

    param_shape: torch.Size
    num_blocks: int
    transpose: bool
    transposed: bool = False
    views: ClassVar[bool] = True

    @classmethod
    def of(cls, p: Tensor, num_blocks: int = 1, transposed: bool = False) -> MatrixView:
        rows, cols = matrix_shape(p.shape, transposed)
        if rows % num_blocks:
            stored = " stored transposed, (in, out)" if transposed else ""
            raise ValueError(f"num_heads={num_blocks} does not divide the {rows} rows of a "
                             f"parameter of shape {tuple(p.shape)}{stored}")
        block_rows = rows // num_blocks
        transpose = block_rows >= cols  # square blocks use the right side, as the authors' code
        return cls(p.shape, num_blocks, transpose, transposed)

    @property
    def count(self) -> int:
        return self.num_blocks

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = matrix_shape(self.param_shape, self.transposed)
        rows //= self.num_blocks
        return (cols, rows) if self.transpose else (rows, cols)

    def blocks(self, t: Tensor) -> Tensor:
        rows = matrix_shape(self.param_shape, self.transposed)[0]
        b = self.logical(t).reshape(self.num_blocks, rows // self.num_blocks, -1)
        return b.mT if self.transpose else b

    def state(self, key: str, t: Tensor) -> Tensor:
        return t
