"""The typed schema of the harness's ``train``, ``model`` and ``dataset`` configs.

One dataclass per section (per architecture for ``model``, per dataset for ``dataset``): each
field is one config key with its default, its :class:`~asgo.optim._config.Check` (type and
allowed range or choices) and a one-line meaning. :func:`validate_config` checks every key a
config holds against it, before any data or model is loaded: a key the schema does not list, or a
value of the wrong type or out of range, is a :class:`~asgo.harness.config.ConfigError` in one
line naming the key, e.g. ``train.batch_size: expected an integer >= 1, got 0``.

The ``optimizer`` section is checked by :func:`asgo.harness.config.check_optimizer_config`
(against the optimizer's own constructor).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from asgo.harness.config import PARALLEL, ConfigError
from asgo.harness.data import DATASET_KEYS
from asgo.harness.models import MODEL_CONFIGS, GPTConfig, LlamaConfig
from asgo.optim._config import Check, Choice, Flag, Integer, Optional, Real

__all__ = ["DATASET_SCHEMAS", "MODEL_SCHEMAS", "TrainConfig", "key", "schema_keys", "validate_config"]


class Text(Check):
    expected = "a string"

    def ok(self, value: Any) -> bool:
        return isinstance(value, str)


class PathText(Check):
    expected = "a path (string)"

    def ok(self, value: Any) -> bool:
        return isinstance(value, (str, os.PathLike))


class Device(Check):
    expected = "'auto' or a torch device string such as 'cpu', 'cuda', 'cuda:0'"

    def ok(self, value: Any) -> bool:
        if not isinstance(value, str):
            return False
        if value == "auto":
            return True
        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            return False
        return True


class AutoOrFlag(Check):
    expected = "'auto' or a bool"

    def ok(self, value: Any) -> bool:
        return value == "auto" or isinstance(value, bool)


class Minutes(Check):
    expected = "a number >= 0 (0 or null: off)"

    def ok(self, value: Any) -> bool:
        return value is None or Real(0.0).ok(value)


STEPS = Integer(1)
FRACTION = Real(0.0, 1.0)
POSITIVE = Real(0.0, low_open=True)
PATH = Optional(PathText())


def key(default: Any, check: Check, doc: str) -> Any:
    """A config key: its default, its check and a one-line meaning."""
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass
class TrainConfig:
    """``train.*``: the loop, logging, checkpoints, devices and parallelism."""

    batch_size: int = key(32, STEPS, "sequences per process per micro-step")
    grad_accumulation: int = key(1, STEPS, "micro-steps per optimizer step")
    train_steps: int = key(300, STEPS, "optimizer steps")
    warmup_fraction: float = key(0.1, FRACTION, "linear warmup over this fraction of the steps")
    min_lr_ratio: float = key(0.02, FRACTION, "cosine decay to this fraction of the peak lr")
    grad_clip: float = key(1.0, Real(0.0), "global-norm clipping threshold; 0 disables")
    eval_interval: int = key(100, Integer(0), "validation every N steps (and at the end); 0: only at the end")
    eval_batches: int = key(20, STEPS, "validation batches per evaluation (eval_batches x eval_batch_size windows)")
    eval_batch_size: int = key(32, STEPS, "sequences per validation batch (not train.batch_size); ranks split them")
    eval_full: bool = key(False, Flag(), "validate on the whole val split in consecutive non-overlapping windows")
    log_interval: int = key(10, STEPS, "train loss, lr and tokens/s every N steps")
    checkpoint_interval: int = key(500, Integer(0), "checkpoint every N steps (and at the end); 0: off")
    keep_checkpoints: bool = key(False, Flag(), "also keep checkpoint_<step> at every interval")
    seed: int = key(42, Integer(0), "seed of the weights, dropout and data order")
    dataset_path: str | None = key(None, PATH, "directory holding the datasets; null: $ASGO_DATA_DIR or the cache")
    out_dir: str | None = key(None, PATH, "output directory; null: Hydra's run directory")
    resume: str | None = key(None, PATH, "a checkpoint.pt or checkpoint_dcp directory to continue from")
    resume_overrides: bool = key(False, Flag(), "resume: apply changed optimizer/schedule keys instead of refusing")
    overwrite: bool = key(False, Flag(), "allow an out_dir that already holds another run")
    init_from: str | None = key(None, PATH, "fine-tuning: a checkpoint.pt or a Hugging Face GPT-2 directory")
    device: str = key("auto", Device(), "auto: cuda when available, else cpu")
    parallel: str = key("ddp", Choice(PARALLEL), "under torchrun: ddp (replicated) or fsdp2 (sharded)")
    owner_compute: bool = key(True, Flag(), "ddp: each matrix's optimizer state and update on one rank")
    autocast: Any = key("auto", AutoOrFlag(), "auto: bf16 autocast on GPU; true/false to force")
    compile_optimizer: bool = key(False, Flag(), "optimizer.step() compiled with torch.compile (one process)")
    progress: bool = key(True, Flag(), "tqdm progress bar (rank 0)")
    tensorboard: bool = key(True, Flag(), "TensorBoard event files")
    wandb: bool = key(False, Flag(), "Weights & Biases logging")
    wandb_project: str = key("asgo", Text(), "the Weights & Biases project")
    wandb_mode: str = key("offline", Choice(("online", "offline", "disabled")), "the Weights & Biases mode")
    plot: bool = key(True, Flag(), "write loss.png at the end")
    on_nonfinite: str = key("stop", Choice(("stop", "skip")), "a non-finite loss or gradient: stop, or skip the step")
    checkpoint_minutes: float | None = key(30, Minutes(), "also checkpoint every N minutes of wall time; 0 or null: off")


# model keys: null (or absent) keeps the named configuration's value
_DIM = Optional(Integer(1))


@dataclass
class ModelConfig:
    """``model.*`` keys every architecture takes."""

    name: str = key(None, Choice(tuple(sorted(MODEL_CONFIGS))), "the model configuration (models.MODEL_CONFIGS)")
    n_layer: int | None = key(None, _DIM, "transformer blocks")
    n_head: int | None = key(None, _DIM, "attention heads (must divide n_embd)")
    n_embd: int | None = key(None, _DIM, "hidden width")
    block_size: int | None = key(None, _DIM, "context length in tokens")
    dropout: float | None = key(None, Optional(Real(0.0, 1.0, high_open=True)), "dropout probability")


@dataclass
class GPTModelConfig(ModelConfig):
    """``model.*`` of the GPT models (:class:`~asgo.harness.models.GPTConfig`)."""

    bias: bool | None = key(None, Optional(Flag()), "biases in the Linear layers and LayerNorms")
    gelu_approximate: str | None = key(None, Optional(Choice(("none", "tanh"))), "GELU approximation")
    layer_norm_eps: float | None = key(None, Optional(POSITIVE), "LayerNorm epsilon")


@dataclass
class LlamaModelConfig(ModelConfig):
    """``model.*`` of the LLaMA models (:class:`~asgo.harness.models.LlamaConfig`)."""

    intermediate_size: int | None = key(None, _DIM, "SwiGLU width")
    rope_theta: float | None = key(None, Optional(POSITIVE), "rotary embedding base")
    norm_eps: float | None = key(None, Optional(POSITIVE), "RMSNorm epsilon")


MODEL_SCHEMAS: dict[type, type[ModelConfig]] = {GPTConfig: GPTModelConfig, LlamaConfig: LlamaModelConfig}


@dataclass
class DatasetConfig:
    """``dataset.*`` of the datasets without options (shakespeare_char, openwebtext, c4)."""

    name: str = key(None, Choice(tuple(DATASET_KEYS)), "the dataset")


@dataclass
class WikiText2Config(DatasetConfig):
    """``dataset.*`` of WikiText-2 (null: the loader's default)."""

    objective: str | None = key(None, Optional(Choice(("clm", "fim"))), "causal LM or fill-in-the-middle")
    fim_rate: float | None = key(None, Optional(FRACTION), "fim: probability that a sample is FIM-permuted")
    spm_rate: float | None = key(None, Optional(FRACTION), "fim: probability of the SPM order")
    fim_loss: str | None = key(None, Optional(Choice(("all", "middle"))), "fim: loss on every token or the middle")
    train_split: str | None = key(None, Optional(Choice(("train", "test"))), "the file to train on")
    tokenizer: str | None = key(None, PATH, "'gpt2', 'byte' or a Hugging Face tokenizer directory")
    hf_config: str | None = key(None, PATH, "the Hugging Face datasets configuration")


DATASET_SCHEMAS: dict[str, type[DatasetConfig]] = {
    "shakespeare_char": DatasetConfig, "openwebtext": DatasetConfig, "c4": DatasetConfig,
    "wikitext2": WikiText2Config,
}


def schema_keys(schema: type) -> list[str]:
    """The config keys of a schema dataclass."""
    return [f.name for f in fields(schema)]


def _check_section(prefix: str, values: Any, schema: type) -> Any:
    """``values`` (a mapping) checked key by key against ``schema``; the dataclass instance."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping of settings, got {values!r}")
    known = {f.name: f for f in fields(schema)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {', '.join(f'{prefix}.{k}' for k in unknown)}; valid keys under "
                          f"{prefix}: {', '.join(sorted(known))}")
    for name, value in values.items():
        check = known[name].metadata["check"]
        if not check.ok(value):
            raise ConfigError(f"{prefix}.{name}: expected {check.expected}, got {value!r}")
    return schema(**values)


def _named(prefix: str, values: Any, choices: tuple) -> str:
    name = values.get("name") if isinstance(values, dict) else None
    if name not in choices:
        raise ConfigError(f"{prefix}.name: expected one of {choices}, got {name!r}")
    return name


def validate_config(cfg: DictConfig) -> dict[str, Any]:
    """Check every key of ``cfg.train``, ``cfg.model`` and ``cfg.dataset`` (those present; an
    absent section is not checked) against the schema: a :class:`ConfigError` naming the first
    bad key otherwise. Returns ``{section: dataclass instance}`` of the sections checked."""
    checked = {}
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if "train" in container:
        checked["train"] = _check_section("train", container["train"], TrainConfig)
    if "model" in container:
        values = container["model"]
        name = _named("model", values, tuple(sorted(MODEL_CONFIGS)))
        base = MODEL_CONFIGS[name]
        model = checked["model"] = _check_section("model", values, MODEL_SCHEMAS[type(base)])
        n_head = model.n_head if model.n_head is not None else base.n_head
        n_embd = model.n_embd if model.n_embd is not None else base.n_embd
        if n_embd % n_head:
            raise ConfigError(f"model.n_head: expected a divisor of model.n_embd={n_embd}, got {n_head}")
        if isinstance(base, LlamaConfig) and (n_embd // n_head) % 2:
            raise ConfigError(f"model.n_head: expected model.n_embd / model.n_head even (rotary embeddings), "
                              f"got {n_embd} / {n_head} = {n_embd // n_head}")
    if "dataset" in container:
        values = container["dataset"]
        name = _named("dataset", values, tuple(DATASET_KEYS))
        checked["dataset"] = _check_section("dataset", values, DATASET_SCHEMAS[name])
    return checked

