"""Layouts: how a parameter is seen as a stack of same-shape matrix blocks."""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor


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
    """``merge`` and ``write`` of a layout whose blocks are a reshape of the parameter, each
    block transposed when ``transpose``."""

    param_shape: torch.Size
    transpose: bool

    def merge(self, blocks: Tensor) -> Tensor:
        return (blocks.mT if self.transpose else blocks).reshape(self.param_shape)

    def write(self, t: Tensor, blocks: Tensor) -> None:
        t.copy_(self.merge(blocks))


@dataclass(frozen=True)
class Single(_Reshaped):
    """The whole parameter as one block of ``shape`` (its ``(rows, rest)`` matrix view, or its
    own shape), transposed when ``transpose``. Per-block state is stored without a block axis."""

    param_shape: torch.Size
    shape: tuple[int, ...]
    transpose: bool = False
    count: ClassVar[int] = 1
    views: ClassVar[bool] = True

    @classmethod
    def matrix(cls, p: Tensor, transpose: bool = False) -> Single:
        rows, cols = p.shape[0], math.prod(p.shape[1:])
        return cls(p.shape, (cols, rows) if transpose else (rows, cols), transpose)

    def blocks(self, t: Tensor) -> Tensor:
        b = t.reshape(1, *(self.shape[::-1] if self.transpose else self.shape))
        return b.mT if self.transpose else b

    def state(self, key: str, t: Tensor) -> Tensor:
        return t.unsqueeze(0)


@dataclass(frozen=True)
class MatrixView(_Reshaped):
    """A parameter of shape ``(out, *rest)`` as ``(out, prod(rest))`` (conv weights included),
    split into ``num_blocks`` row blocks (attention heads), each transposed when its row side is
    not the smaller one, so the preconditioned side comes first. Per-block state is stored with
    a leading block axis."""

    param_shape: torch.Size
    num_blocks: int
    transpose: bool
    views: ClassVar[bool] = True

    @classmethod
    def of(cls, p: Tensor, num_blocks: int = 1) -> MatrixView:
        rows, cols = p.shape[0], math.prod(p.shape[1:])
        if rows % num_blocks:
            raise ValueError(f"num_heads={num_blocks} does not divide the {rows} rows of a "
                             f"parameter of shape {tuple(p.shape)}")
        block_rows = rows // num_blocks
        transpose = block_rows >= cols  # square blocks use the right side, as the authors' code
        return cls(p.shape, num_blocks, transpose)

    @property
    def count(self) -> int:
        return self.num_blocks

    @property
    def shape(self) -> tuple[int, int]:
        rows = self.param_shape[0] // self.num_blocks
        cols = self.param_shape.numel() // self.param_shape[0]
        return (cols, rows) if self.transpose else (rows, cols)

    def blocks(self, t: Tensor) -> Tensor:
        b = t.reshape(self.num_blocks, self.param_shape[0] // self.num_blocks, -1)
        return b.mT if self.transpose else b

    def state(self, key: str, t: Tensor) -> Tensor:
        return t
