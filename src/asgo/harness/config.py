"""From Hydra configuration to library objects."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import asgo
from asgo.routing import OPTIMIZERS, RoutedOptimizer

CONFIG_DIR = Path(__file__).parent / "conf"
ROUTING_KEYS = ("headwise", "routes")  # the keyword arguments of asgo.build_optimizer a config may set
NOT_CONFIG = ("params", "process_group")  # constructor arguments the harness sets, never a config
PARALLEL = ("ddp", "fsdp2")  # train.parallel
EXPECTED = {bool: "a bool", int: "an integer (int)", float: "a number (float)", str: "a string (str)"}


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any work starts."""


def _accepted(cls: Any) -> dict[str, inspect.Parameter]:
    """Config key -> constructor parameter of ``cls``, the learning rate as ``learning_rate``."""
    params = {k: p for k, p in inspect.signature(cls).parameters.items() if k not in NOT_CONFIG}
    return {"learning_rate" if k == "lr" else k: p for k, p in params.items()}


def _check_names(prefix: str, values: dict, accepted: dict[str, inspect.Parameter],
                 also: tuple[str, ...] = ()) -> None:
    if "lr" in values:
        raise ConfigError(f"{prefix}lr: use {prefix}learning_rate instead (the one name of the learning rate "
                          "in configs)")
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown key {', '.join(prefix + k for k in unknown)}; valid keys under "
                          f"{prefix[:-1]}: {', '.join(sorted([*accepted, *also]))}")


def _type_ok(value: Any, kind: type) -> bool:
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def _check_types(prefix: str, values: dict, accepted: dict[str, inspect.Parameter]) -> dict:
    """``values`` as keyword arguments (``lr``; lists made tuples where the default is one);
    a value of the wrong type is a ConfigError."""
    checked = {}
    for key, value in values.items():
        param = accepted[key]
        kind = type(param.default)
        nullable = param.default is None or any(s in str(param.annotation) for s in ("None", "Optional"))
        if kind in EXPECTED and not (value is None and nullable) and not _type_ok(value, kind):
            raise ConfigError(f"{prefix}{key}: expected {EXPECTED[kind]}, got {value!r}")
        if isinstance(value, list) and isinstance(param.default, tuple):
            value = tuple(value)
        if "dtype" in str(param.annotation) and isinstance(value, str):  # e.g. ns_dtype: float32
            if not isinstance(getattr(torch, value, None), torch.dtype):
                raise ConfigError(f"{prefix}{key}: expected a torch dtype name (float32, bfloat16, ...), "
                                  f"got {value!r}")
            value = getattr(torch, value)
        checked["lr" if key == "learning_rate" else key] = value
    return checked


def optimizer_settings(cfg: DictConfig, train_steps: int) -> tuple[str, dict, dict]:
    """``(name, keyword arguments of asgo.build_optimizer, its adamw=)`` of an optimizer config,
    every key checked to be one the optimizer takes and every value's type, before building.

    ``learning_rate`` is the matrices' ``lr``; ``adamw`` holds the AdamW group's settings (its
    ``learning_rate: null`` means the same lr); ``total_steps: null`` is the run's number of steps.
    """
    params = OmegaConf.to_container(cfg, resolve=True)
    name = params.pop("name", None)
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    adamw = params.pop("adamw", None) or {}
    if not isinstance(adamw, dict):
        raise ConfigError(f"optimizer.adamw: expected a mapping of AdamW settings, got {adamw!r}")
    if "learning_rate" in adamw and adamw["learning_rate"] is None:
        del adamw["learning_rate"]  # the matrices' lr
    build = inspect.signature(asgo.build_optimizer).parameters
    accepted = {**{k: build[k] for k in ROUTING_KEYS}, **_accepted(OPTIMIZERS[name])}
    adamw_accepted = _accepted(torch.optim.AdamW)
    _check_names("optimizer.", params, accepted, also=("adamw", "name"))
    _check_names("optimizer.adamw.", adamw, adamw_accepted)
    params = _check_types("optimizer.", params, accepted)
    adamw = _check_types("optimizer.adamw.", adamw, adamw_accepted)
    if params.get("total_steps", 0) is None:
        params["total_steps"] = train_steps
    return name, params, adamw


def parallel_settings(cfg: DictConfig) -> tuple[str, bool]:
    """``(train.parallel, train.owner_compute)`` of the ``train`` config, checked: a ConfigError
    naming the key otherwise. Both only matter under torchrun (more than one process), but for
    the checkpoint format: ``fsdp2`` writes ``checkpoint_dcp/`` in one process too."""
    parallel = cfg.get("parallel", "ddp")
    if parallel not in PARALLEL:
        raise ConfigError(f"train.parallel: unknown value {parallel!r}; valid: {', '.join(PARALLEL)}")
    owner_compute = cfg.get("owner_compute", True)
    if not isinstance(owner_compute, bool):
        raise ConfigError(f"train.owner_compute: expected a bool (true or false), got {owner_compute!r}")
    if parallel == "fsdp2" and not owner_compute:
        raise ConfigError("train.owner_compute=false applies to train.parallel=ddp only: with sharded "
                          "parameters (fsdp2) each matrix's owner always computes its update")
    return parallel, owner_compute


def _structured_algorithms(cfg: DictConfig) -> set[str]:
    """The algorithms of ``optimizer.name`` and the targets of ``optimizer.routes``, but AdamW."""
    name, params, _ = optimizer_settings(cfg, train_steps=1)
    return ({name} | set((params.get("routes") or {}).values())) - {"adamw"}


def supports_owner_compute(cfg: DictConfig) -> bool:
    """Whether every structured algorithm of the optimizer config (``optimizer.name`` and the
    targets of ``optimizer.routes``) takes a ``process_group``: not plain AdamW (torch's, which
    only ever updates the replicated embeddings, head, norms and biases) nor Adafactor."""
    algorithms = _structured_algorithms(cfg)
    return bool(algorithms) and all(getattr(OPTIMIZERS.get(a), "DISTRIBUTED", False) for a in algorithms)


def check_fsdp2_optimizer(cfg: DictConfig) -> None:
    """``train.parallel=fsdp2`` needs an optimizer that steps row-sharded DTensors: AdamW (torch's,
    natively) and every algorithm that takes a process group, not Adafactor (also as a target of
    ``optimizer.routes``): a ConfigError before any work otherwise."""
    single = sorted(a for a in _structured_algorithms(cfg) if not getattr(OPTIMIZERS.get(a), "DISTRIBUTED", False))
    if single:
        raise ConfigError(f"train.parallel=fsdp2: optimizer {', '.join(single)} is single-process (its step "
                          f"schedule lives in the per-parameter state) and cannot step sharded parameters; "
                          f"use train.parallel=ddp, or another optimizer")


def optimizer_from_config(model: torch.nn.Module, cfg: DictConfig, train_steps: int,
                          process_group: torch.distributed.ProcessGroup | None = None) -> RoutedOptimizer:
    """``asgo.build_optimizer`` with every key of the optimizer config passed on (see
    :func:`optimizer_settings`); a key or value the optimizer does not take is a ConfigError
    naming it as ``optimizer.<key>``, never silently dropped. ``process_group`` (set by the
    harness, never by a config: ``optimizer.process_group`` is an unknown key) turns on
    owner-compute for the matrices (see :func:`supports_owner_compute`)."""
    name, params, adamw = optimizer_settings(cfg, train_steps)
    try:
        return asgo.build_optimizer(model, name, adamw=adamw, process_group=process_group, **params)
    except (ValueError, TypeError) as e:
        message = str(e)
        match = re.match(r"invalid (\w+):", message)
        if match and match[1] in params:  # the library's "invalid <key>: <value>, expected ..."
            key = "learning_rate" if match[1] == "lr" else match[1]
            message = f"invalid optimizer.{key}:{message[match.end():]}"
        raise ConfigError(f"optimizer config for {name!r}: {message}") from e


def check_optimizer_config(cfg: DictConfig, train_steps: int) -> None:
    """Every check of :func:`optimizer_from_config`, the library's own included, on a one-layer
    model: a ConfigError before any data or model is loaded."""
    optimizer_from_config(torch.nn.Linear(2, 2), cfg, train_steps)
