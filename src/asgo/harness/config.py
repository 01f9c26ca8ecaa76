"""From Hydra configuration to library objects."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import asgo

CONFIG_DIR = Path(__file__).parent / "conf"


def optimizer_from_config(model: torch.nn.Module, cfg: DictConfig, train_steps: int):
    """``asgo.build_optimizer`` with every key of the optimizer config passed on.

    ``learning_rate`` is the matrices' ``lr``; ``adamw`` holds the AdamW group's settings (its
    ``learning_rate: null`` means the same lr); ``total_steps: null`` is filled with the run's
    number of steps. Any other key is a hyper-parameter of the optimizer, so a key it does not
    take is an error, never silently dropped.
    """
    params = OmegaConf.to_container(cfg, resolve=True)
    name = params.pop("name")
    params["lr"] = params.pop("learning_rate")
    adamw = params.pop("adamw", None) or {}
    adamw_lr = adamw.pop("learning_rate", None)
    adamw = {**adamw, "lr": params["lr"] if adamw_lr is None else adamw_lr}
    if "betas" in adamw:
        adamw["betas"] = tuple(adamw["betas"])
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    if params.get("total_steps", 0) is None:
        params["total_steps"] = train_steps
    try:
        return asgo.build_optimizer(model, name, adamw=adamw, **params)
    except TypeError as e:
        raise ValueError(f"optimizer config for {name!r} has a key the optimizer does not take: {e}") from e
