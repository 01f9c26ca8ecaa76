"""Pieces shared by the matrix optimizers: argument checks, matrix views, fault counters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from asgo.linalg import compute_dtype

ROUTING_HINT = "route it to AdamW with asgo.build_optimizer(model, ...) or a separate optimizer"


def mark_as_embedding(*params: Tensor) -> None:
    """Mark parameters as embeddings so matrix optimizers refuse them with a clear error."""
    for p in params:
        p._asgo_embedding = True  # type: ignore[attr-defined]


def is_embedding(p: Tensor) -> bool:
    return bool(getattr(p, "_asgo_embedding", False))


def check_range(name: str, value: float, low: float, high: float | None = None, *,
                low_inclusive: bool = True, high_inclusive: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in the given interval."""
    ok_low = value >= low if low_inclusive else value > low
    ok_high = high is None or (value <= high if high_inclusive else value < high)
    if not (ok_low and ok_high):
        lo = "[" if low_inclusive else "("
        hi = "inf)" if high is None else (f"{high}]" if high_inclusive else f"{high})")
        raise ValueError(f"invalid {name}: {value!r}, expected a value in {lo}{low}, {hi}")


def check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"invalid {name}: {value!r}, expected an integer >= {low}")


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"invalid {name}: {value!r}, expected one of {choices}")


@dataclass(frozen=True)
class MatrixView:
    """How a parameter is seen as a batch of matrices ``(blocks, short, long)``.

    A tensor of shape ``(out, *rest)`` is viewed as ``(out, prod(rest))`` (conv weights included),
    split into ``num_blocks`` row blocks (attention heads), and transposed when the row side
    of a block is not the smaller one (``transpose``) so the preconditioned side comes first.
    """

    shape: torch.Size
    num_blocks: int
    transpose: bool

    @classmethod
    def of(cls, p: Tensor, num_blocks: int = 1, *, transpose_square: bool = True) -> MatrixView:
        rows, cols = p.shape[0], p[0].numel()
        if rows % num_blocks:
            raise ValueError(f"num_heads={num_blocks} does not divide the {rows} rows of a "
                             f"parameter of shape {tuple(p.shape)}")
        block_rows = rows // num_blocks
        transpose = block_rows > cols or (transpose_square and block_rows == cols)
        return cls(p.shape, num_blocks, transpose)

    @property
    def block_shape(self) -> tuple[int, int]:
        rows, cols = self.shape[0] // self.num_blocks, self.shape.numel() // self.shape[0]
        return (cols, rows) if self.transpose else (rows, cols)

    def to_blocks(self, t: Tensor) -> Tensor:
        b = t.reshape(self.num_blocks, self.shape[0] // self.num_blocks, -1)
        return b.mT if self.transpose else b

    def from_blocks(self, b: Tensor) -> Tensor:
        return (b.mT if self.transpose else b).reshape(self.shape)


def check_matrix_params(optimizer_name: str, params: Iterable[Tensor], first_index: int) -> None:
    """Refuse 1-D parameters and marked embeddings, naming the parameter by index and shape."""
    for index, p in enumerate(params, start=first_index):
        if p.ndim < 2 or is_embedding(p):
            what = "an embedding" if is_embedding(p) else f"a {p.ndim}-D tensor"
            raise ValueError(
                f"{optimizer_name} preconditions matrices; parameter {index} of shape "
                f"{tuple(p.shape)} is {what}: {ROUTING_HINT}")


def restore_state_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of every state tensor to its parameter's dtype:
    reload each saved tensor with its saved dtype, on the parameter's device."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, saved in state_dict["state"].items():
        p = params[index]
        for key, value in saved.items():
            if torch.is_tensor(value) and key != "step":
                optimizer.state[p][key] = value.to(device=p.device, copy=True)


class MatrixOptimizer(torch.optim.Optimizer):
    """Base for optimizers whose state is kept in float32 (float64 for float64 parameters).

    ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype,
    which would round float32 moments of bf16 parameters and turn integer fault counters into
    floats; this class restores the saved dtypes so a resumed run continues exactly.
    Fault counters (``skipped_steps``, ``root_failures``) are device tensors, read only by
    :meth:`diagnostics`.
    """

    COUNTERS: tuple[str, ...] = ("skipped_steps",)

    def validate_group(self, group: dict) -> None:
        """Raise ``ValueError`` naming the first invalid hyper-parameter of ``group``."""

    def add_param_group(self, param_group: dict) -> None:
        self.validate_group({**self.defaults, **param_group})
        first_index = sum(len(g["params"]) for g in self.param_groups)
        super().add_param_group(param_group)
        check_matrix_params(type(self).__name__, self.param_groups[-1]["params"], first_index)

    @staticmethod
    def state_dtype(p: Tensor) -> torch.dtype:
        return compute_dtype(p.dtype)

    def init_counters(self, state: dict, p: Tensor) -> None:
        for name in self.COUNTERS:
            state[name] = torch.zeros((), dtype=torch.int64, device=p.device)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)

    def diagnostics(self) -> dict[str, int]:
        """Totals of the fault counters over all parameters (synchronises; call outside step)."""
        totals = {name: 0 for name in self.COUNTERS}
        for state in self.state.values():
            for name in self.COUNTERS:
                if name in state:
                    totals[name] += int(state[name])
        return totals


def evaluate_closure(closure):
    """The loss of ``closure()`` with gradients enabled (``step`` runs under ``no_grad``), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def finite_flag(t: Tensor, dtype: torch.dtype) -> Tensor:
    """0-dim tensor of ``dtype``: 1 if every entry of ``t`` is finite, else 0 (no host sync)."""
    return torch.isfinite(t).all().to(dtype)


def apply_update_(p: Tensor, update: Tensor, lr: float, weight_decay: float, active: Tensor) -> None:
    """``p <- p (1 - lr wd a) - lr a update`` with ``a`` in {0, 1}: decoupled weight decay then the
    step, both skipped where ``active`` is 0. Computed in ``update``'s dtype, rounded once."""
    if p.dtype == update.dtype:
        p.mul_(1 - lr * weight_decay * active).sub_(update.mul_(lr * active))
    else:
        p.copy_(p.to(update.dtype).mul_(1 - lr * weight_decay * active).sub_(update.mul_(lr * active)))


def rms_normalize_(U: Tensor, rms: float | None) -> Tensor:
    """Scale each matrix of ``U`` (..., m, n) in place to RMS ``rms``: ``U * rms sqrt(mn) / ||U||_F``."""
    if rms is None:
        return U
    m, n = U.shape[-2:]
    norm = torch.linalg.matrix_norm(U, keepdim=True).clamp_min(1e-30)
    return U.mul_(rms * (m * n) ** 0.5 / norm)
