"""The typed schema of ``asgo-finetune``'s ``train``, ``model`` and ``task`` configs, checked key by key
before any data or model is loaded (an unknown key or a bad value is a ConfigError naming it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from asgo.harness.config import ConfigError
from asgo.harness.finetune.tasks import GLUE_TASKS, MC_TASKS
from asgo.harness.schema import (PATH, STEPS, AutoOrFlag, Device, Minutes, Text, _check_section, _named, key)
from asgo.optim._config import Choice, Flag, Integer, Optional, Real

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class FinetuneTrainConfig:
    """``train.*`` of asgo-finetune."""

    batch_size: int = key(16, STEPS, "examples per micro-step")
    grad_accumulation: int = key(1, STEPS, "micro-steps per optimizer step")
    epochs: int = key(3, STEPS, "passes over the training examples")
    schedule: str = key("linear", Choice(SCHEDULES), "after warmup: linear/cosine decay to min_lr_ratio, or constant")
    warmup_fraction: float = key(0.0, Real(0.0, 1.0), "linear warmup over this fraction of the steps")
    min_lr_ratio: float = key(0.0, Real(0.0, 1.0), "linear/cosine: the lr's final fraction of the peak")
    grad_clip: float = key(1.0, Real(0.0), "global-norm clipping threshold; 0 disables")
    eval_batch_size: int = key(64, STEPS, "examples (multiple choice: options) per evaluation batch")
    log_interval: int = key(10, STEPS, "train loss and lr every N steps")
    checkpoint_interval: int = key(0, Integer(0), "also checkpoint every N steps (always: each epoch's end); 0: off")
    checkpoint_minutes: float | None = key(30, Minutes(), "also checkpoint every N minutes; 0 or null: off")
    keep_checkpoints: bool = key(False, Flag(), "also keep checkpoint_<step>.pt at every checkpoint_interval")
    seed: int = key(42, Integer(0), "seed of the new head's weights, dropout, data order and subsamples")
    out_dir: str | None = key(None, PATH, "output directory; null: Hydra's run directory")
    resume: str | None = key(None, PATH, "a checkpoint.pt of this run to continue from")
    overwrite: bool = key(False, Flag(), "allow an out_dir that already holds another run")
    device: str = key("auto", Device(), "auto: cuda when available, else cpu")
    autocast: Any = key("auto", AutoOrFlag(), "auto: bf16 autocast on GPU; true/false to force")
    progress: bool = key(True, Flag(), "tqdm progress bar")
    tensorboard: bool = key(True, Flag(), "TensorBoard event files")
    plot: bool = key(True, Flag(), "write curves.png at the end")
    on_nonfinite: str = key("stop", Choice(("stop", "skip")), "a non-finite loss or gradient: stop, or skip the step")


@dataclass
class FinetuneModelConfig:
    """``model.*`` of asgo-finetune: a Hugging Face model directory (config, weights, tokenizer) or hub id."""

    path: str = key(None, Text(), "local directory or hub id (AutoModelForSequenceClassification / ForCausalLM)")
    max_length: int = key(128, STEPS, "tokens per example (multiple choice: per option), longer ones truncated")
    dtype: str = key("float32", Choice(("float32", "bfloat16")), "the weights' dtype")


@dataclass
class TaskConfig:
    """``task.*`` keys of every task."""

    name: str = key(None, Choice((*GLUE_TASKS, *MC_TASKS)), "the task")
    data_dir: str | None = key(None, PATH, "directory of <split>.jsonl/.tsv files; null: the Hugging Face hub")
    hf_path: str = key(None, Text(), "the hub dataset (without data_dir)")
    hf_config: str | None = key(None, Optional(Text()), "the hub dataset's configuration")
    num_train: int | None = key(None, Optional(STEPS), "training examples, drawn with train.seed; null: all")
    num_eval: int | None = key(None, Optional(STEPS), "evaluation examples per split; null: all")


@dataclass
class ChoiceTaskConfig(TaskConfig):
    """``task.*`` of the multiple-choice tasks."""

    num_dev: int = key(100, Integer(0), "dev examples held out of the training split, evaluated every epoch")
    scoring: str = key("mean", Choice(("mean", "sum")), "an option's score: mean or summed answer-token log-likelihood")


def validate_finetune_config(cfg: DictConfig) -> dict[str, Any]:
    """``{"train", "model", "task"}`` dataclass instances of ``cfg``, every key checked."""
    if isinstance(cfg, DictConfig) and "model" in cfg and OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError("model.path: required: a Hugging Face model directory or hub id (model.path=DIR)")
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    for section in ("train", "model", "task"):
        if section not in container:
            raise ConfigError(f"{section}: missing section")
    checked = {"train": _check_section("train", container["train"], FinetuneTrainConfig)}
    model = checked["model"] = _check_section("model", container["model"], FinetuneModelConfig)
    if not model.path:
        raise ConfigError("model.path: expected a Hugging Face model directory or hub id, got "
                          f"{container['model'].get('path')!r}")
    name = _named("task", container["task"], (*GLUE_TASKS, *MC_TASKS))
    schema = ChoiceTaskConfig if name in MC_TASKS else TaskConfig
    task = checked["task"] = _check_section("task", container["task"], schema)
    if not task.data_dir and not task.hf_path:
        raise ConfigError("task.hf_path: expected a hub dataset when task.data_dir is null, got None")
    return checked
