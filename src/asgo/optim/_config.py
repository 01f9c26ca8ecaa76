"""Typed hyper-parameter configs that check themselves.

Each optimizer declares a :class:`HyperParameters` dataclass: one field per constructor argument,
its default and its :class:`Check`. Constructing it checks every field and then the combinations,
raising a ``ValueError`` that names the argument, the value and what was expected.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from asgo.linalg import ROOT_METHODS


class Check:
    """A constraint on one hyper-parameter; ``check(name, value)`` raises a ``ValueError`` that
    names the hyper-parameter, the value and what was expected."""

    expected = "a value"

    def ok(self, value: Any) -> bool:
        raise NotImplementedError

    def __call__(self, name: str, value: Any) -> None:
        if not self.ok(value):
            raise ValueError(f"invalid {name}: {value!r}, expected {self.expected}")


def _is_real(value: Any) -> bool:
    """A finite real number: Python's, numpy's, or a 1-element floating or integer tensor."""
    if torch.is_tensor(value):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool \
            and (value.device.type == "meta" or math.isfinite(value.item()))
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Real(Check):
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    @property
    def expected(self) -> str:  # type: ignore[override]
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open or self.high == math.inf else "]"
        high = "inf" if self.high == math.inf else self.high
        return f"a real number in {lo}{self.low}, {high}{hi}"

    def ok(self, value: Any) -> bool:
        if not _is_real(value):
            return False
        if torch.is_tensor(value):
            if value.device.type == "meta":
                return True
            value = value.item()  # construction time: a sync is fine here
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


@dataclass(frozen=True)
class Integer(Check):
    low: int = 0

    @property
    def expected(self) -> str:  # type: ignore[override]
        return f"an integer >= {self.low}"

    def ok(self, value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= self.low


@dataclass(frozen=True)
class Choice(Check):
    choices: tuple

    @property
    def expected(self) -> str:  # type: ignore[override]
        return f"one of {self.choices}"

    def ok(self, value: Any) -> bool:
        return isinstance(value, (str, type(None))) and value in self.choices


class Flag(Check):
    expected = "a bool"

    def ok(self, value: Any) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Optional(Check):
    check: Check

    @property
    def expected(self) -> str:  # type: ignore[override]
        return f"None or {self.check.expected}"

    def ok(self, value: Any) -> bool:
        return value is None or self.check.ok(value)


@dataclass(frozen=True)
class Reals(Check):
    """A tuple (or list) of ``count`` reals, each satisfying ``each``."""

    count: int
    each: Real = Real()

    @property
    def expected(self) -> str:  # type: ignore[override]
        return f"{self.count} numbers, each {self.each.expected}"

    def ok(self, value: Any) -> bool:
        return (isinstance(value, (tuple, list)) and len(value) == self.count
                and all(self.each.ok(v) for v in value))


class LearningRate(Check):
    """A real >= 0, or a 1-element tensor holding one (``torch.optim``'s tensor lr)."""

    expected = "a real number >= 0 or a 1-element tensor"

    def __call__(self, name: str, value: Any) -> None:
        if torch.is_tensor(value):
            if value.numel() != 1:
                raise ValueError(f"invalid {name}: Tensor lr must be 1-element, got shape "
                                 f"{tuple(value.shape)}")
            if value.device.type != "meta":
                value = value.item()  # construction time: a sync is fine here
            else:
                return
        super().__call__(name, value)

    def ok(self, value: Any) -> bool:
        return _is_real(value) and value >= 0


LR = LearningRate()
UNIT = Real(0.0, 1.0, high_open=True)        # EMA coefficients: momentum, beta2
POSITIVE = Real(0.0, low_open=True)
NON_NEGATIVE = Real(0.0)
STEPS = Integer(1)


def hyper(default: Any, check: Check) -> Any:
    """A hyper-parameter field: its default and its check."""
    return field(default=default, metadata={"check": check})


@dataclass
class HyperParameters:
    """Base of every optimizer's hyper-parameter dataclass: constructing one checks every field
    (``ValueError`` naming the first invalid one) and then :meth:`check_combination`."""

    def __post_init__(self) -> None:
        for f in fields(self):
            f.metadata["check"](f.name, getattr(self, f.name))
        self.check_combination()

    def check_combination(self) -> None:
        """Checks that involve several fields."""


@dataclass
class EMAHyperParameters(HyperParameters):
    """Shared by ASGO, DASGO and Shampoo: step size, the two EMA coefficients, damping, decay."""

    lr: float = hyper(1e-2, LR)
    momentum: float = hyper(0.9, UNIT)
    beta2: float = hyper(0.8, UNIT)
    eps: float = hyper(1e-10, POSITIVE)
    weight_decay: float = hyper(0.1, NON_NEGATIVE)


@dataclass
class RootSchedule(EMAHyperParameters):
    """Shared by ASGO and Shampoo: when and how their inverse roots are recomputed."""

    precondition_frequency: int = hyper(1, STEPS)
    start_preconditioning_step: int = hyper(1, STEPS)
    root_method: str = hyper("auto", Choice(ROOT_METHODS))
    root_steps: int = hyper(10, STEPS)


def root_due(group: dict, step: int) -> bool:
    """Whether step ``step`` recomputes the roots: ``step = s, s + tau, s + 2 tau, ...``."""
    start = group["start_preconditioning_step"]
    return step >= start and (step - start) % group["precondition_frequency"] == 0
