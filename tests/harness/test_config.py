import dataclasses
import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import asgo
from asgo.harness.config import (CONFIG_DIR, ConfigError, check_fsdp2_optimizer, optimizer_from_config,
                                 parallel_settings, supports_owner_compute)

OPTIMIZER_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "optimizer").glob("*.yaml"))


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = 2
        self.q_proj, self.k_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(10, 8)
        self.attn = Attention()
        self.fc = torch.nn.Linear(8, 16)
        self.ln = torch.nn.LayerNorm(16)


def compose_config(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_every_optimizer_has_a_config():
    assert set(OPTIMIZER_CONFIGS) == set(asgo.routing.OPTIMIZERS)


@pytest.mark.parametrize("name", OPTIMIZER_CONFIGS)
def test_every_hyperparameter_reaches_the_optimizer(name):
    """Change every numeric key of the config and check the optimizer's groups carry it."""
    cfg = compose_config(f"optimizer={name}").optimizer
    changed = {}
    for key, value in cfg.items():
        if isinstance(value, bool) or key in ("name", "adamw", "headwise", "total_steps"):
            continue
        if isinstance(value, (int, float)):
            new = value + 1 if isinstance(value, int) else value * 0.5
            cfg[key] = changed[key] = new
    opt = optimizer_from_config(Model(), cfg, train_steps=100)
    groups = [g for g in opt.param_groups if g["algorithm"] == name and g.get("weight_decay") == cfg.get("weight_decay")]
    assert groups, opt.param_groups
    if cfg.get("inner") == "adamw":  # the routed group's 'momentum' is then betas[0] (cycled by schedulers)
        changed.pop("momentum", None)
    for key, value in changed.items():
        group_key = "lr" if key == "learning_rate" else key
        assert all(g[group_key] == value for g in groups), key
    assert changed, "no numeric hyper-parameter found"


def test_adamw_group_settings_and_default_lr():
    cfg = compose_config("optimizer=asgo", "optimizer.learning_rate=0.03").optimizer
    opt = optimizer_from_config(Model(), cfg, train_steps=10)
    adamw = [g for g in opt.param_groups if g["algorithm"] == "adamw"]
    assert adamw and all(g["lr"] == 0.03 and g["betas"] == (0.9, 0.95) and g["weight_decay"] == 0.0 for g in adamw)
    cfg.adamw.learning_rate = 1e-3
    opt = optimizer_from_config(Model(), cfg, train_steps=10)
    assert {g["lr"] for g in opt.param_groups if g["algorithm"] == "adamw"} == {1e-3}


def test_unknown_keys_are_errors():
    with pytest.raises(Exception, match="bogus"):
        compose_config("optimizer.bogus=1")
    cfg = compose_config("optimizer=asgo").optimizer
    with open_dict(cfg):
        cfg.bogus = 1
    with pytest.raises(ValueError, match="bogus"):
        optimizer_from_config(Model(), cfg, train_steps=10)


@pytest.mark.parametrize("name", OPTIMIZER_CONFIGS)
def test_every_optimizer_config_builds(name):
    cfg = compose_config(f"optimizer={name}").optimizer
    opt = optimizer_from_config(Model(), cfg, train_steps=100)
    lrs = {g["algorithm"]: g["lr"] for g in opt.param_groups}
    assert lrs == {name: cfg.learning_rate, "adamw": cfg.learning_rate}


@pytest.mark.parametrize("override, key, use", [("+optimizer.lr=0.5", "optimizer.lr", "optimizer.learning_rate"),
                                                ("+optimizer.adamw.lr=0.7", "optimizer.adamw.lr",
                                                 "optimizer.adamw.learning_rate")])
def test_lr_is_refused_for_learning_rate(override, key, use):
    cfg = compose_config("optimizer=asgo", override).optimizer
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}: use {re.escape(use)} instead"):
        optimizer_from_config(Model(), cfg, train_steps=10)


@pytest.mark.parametrize("override, key, valid", [("+optimizer.foo=1", "optimizer.foo", "momentum, name"),
                                                  ("+optimizer.adamw.foo=1", "optimizer.adamw.foo", "amsgrad, betas")])
def test_unknown_keys_are_named_in_full_with_the_valid_ones(override, key, valid):
    cfg = compose_config("optimizer=asgo", override).optimizer
    with pytest.raises(ValueError, match=rf"unknown key {re.escape(key)}; valid keys .*{valid}"):
        optimizer_from_config(Model(), cfg, train_steps=10)


def test_added_keys_reach_the_optimizer():
    cfg = compose_config("optimizer=galore", "+optimizer.dampening=0.25", "+optimizer.adamw.amsgrad=true",
                         "optimizer.adamw.learning_rate=0.002").optimizer
    opt = optimizer_from_config(Model(), cfg, train_steps=10)
    groups = {g["algorithm"]: g for g in opt.param_groups}
    assert groups["galore"]["dampening"] == 0.25 and groups["galore"]["lr"] == 0.001
    assert groups["adamw"]["amsgrad"] is True and groups["adamw"]["lr"] == 0.002


@pytest.mark.parametrize("override, message", [
    ("optimizer.momentum=abc", "optimizer.momentum: expected a number (float), got 'abc'"),
    ("optimizer.momentum=true", "optimizer.momentum: expected a number (float), got True"),
    ("optimizer.momentum=null", "optimizer.momentum: expected a number (float), got None"),
    ("optimizer.learning_rate=abc", "optimizer.learning_rate: expected a number (float), got 'abc'"),
    ("optimizer.precondition_frequency=2.5", "optimizer.precondition_frequency: expected an integer (int), got 2.5"),
    ("optimizer.headwise=1", "optimizer.headwise: expected a bool, got 1"),
    ("optimizer.root_method=3", "optimizer.root_method: expected a string (str), got 3"),
    ("optimizer.adamw.eps=abc", "optimizer.adamw.eps: expected a number (float), got 'abc'"),
])
def test_wrong_types_name_the_key_and_the_type(override, message):
    cfg = compose_config("optimizer=asgo", override).optimizer
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        optimizer_from_config(Model(), cfg, train_steps=10)


def test_nullable_values_and_library_errors():
    cfg = compose_config("optimizer=asgo", "optimizer.update_rms=null", "optimizer.learning_rate=1").optimizer
    assert {g["lr"] for g in optimizer_from_config(Model(), cfg, train_steps=10).param_groups} == {1}
    cfg = compose_config("optimizer=asgo", "optimizer.momentum=2").optimizer
    with pytest.raises(ValueError, match=r"^optimizer config for 'asgo': invalid optimizer\.momentum: 2") as e:
        optimizer_from_config(Model(), cfg, train_steps=10)
    assert isinstance(e.value.__cause__, ValueError)


def test_a_dtype_is_given_by_name():
    cfg = compose_config("optimizer=muon", "+optimizer.ns_dtype=float32").optimizer
    opt = optimizer_from_config(Model(), cfg, train_steps=10)
    assert {g["ns_dtype"] for g in opt.param_groups if g["algorithm"] == "muon"} == {torch.float32}
    cfg = compose_config("optimizer=muon", "+optimizer.ns_dtype=float33").optimizer
    with pytest.raises(ConfigError, match=r"^optimizer\.ns_dtype: expected a torch dtype name"):
        optimizer_from_config(Model(), cfg, train_steps=10)


def test_seed_readme_overrides_compose():
    cfg = compose_config("dataset=shakespeare_char", "model=tiny", "optimizer=asgo", "train.batch_size=32",
                         "train.train_steps=300", "optimizer.learning_rate=0.01", "train.dataset_path=/data")
    assert (cfg.train.batch_size, cfg.train.train_steps, cfg.optimizer.learning_rate) == (32, 300, 0.01)
    assert cfg.train.dataset_path == "/data" and OmegaConf.is_missing(cfg, "train") is False


@pytest.mark.parametrize("override, message", [
    ("train.parallel=fsdp2 train.owner_compute=false", "train.owner_compute=false applies to train.parallel=ddp only"),
    ("train.parallel=zero", "train.parallel: unknown value 'zero'; valid: ddp, fsdp2"),
    ("train.parallel=null", "train.parallel: unknown value None"),
    ("train.owner_compute=maybe", "train.owner_compute: expected a bool (true or false), got 'maybe'"),
    ("train.owner_compute=1", "train.owner_compute: expected a bool (true or false), got 1"),
])
def test_parallel_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        parallel_settings(compose_config(*override.split()).train)


def test_parallel_defaults():
    assert parallel_settings(compose_config().train) == ("ddp", True)
    assert parallel_settings(compose_config("train.owner_compute=false").train) == ("ddp", False)
    assert parallel_settings(compose_config("train.parallel=fsdp2").train) == ("fsdp2", True)


@pytest.mark.parametrize("name, routes, supported", [
    ("asgo", {}, True), ("muon", {}, True), ("galore", {}, True), ("adamw", {}, True), ("adafactor", {}, False),
    ("asgo", {"fc.*": "adafactor"}, False), ("adamw", {"fc.*": "muon"}, True),
])
def test_which_optimizers_step_fsdp2_shards(name, routes, supported):
    """AdamW steps DTensors natively, the structured optimizers with owner-compute; not Adafactor."""
    cfg = compose_config(f"optimizer={name}").optimizer
    with open_dict(cfg):
        cfg.routes = routes
    if supported:
        check_fsdp2_optimizer(cfg)
    else:
        with pytest.raises(ConfigError, match=r"^train\.parallel=fsdp2: optimizer adafactor is single-process"):
            check_fsdp2_optimizer(cfg)


def test_process_group_is_set_by_the_harness_never_by_a_config():
    cfg = compose_config("optimizer=muon", "+optimizer.process_group=1").optimizer
    with pytest.raises(ConfigError, match=r"^unknown key optimizer\.process_group; valid keys") as e:
        optimizer_from_config(Model(), cfg, train_steps=10)
    assert "process_group" not in str(e.value).split("valid keys")[1]


@pytest.mark.parametrize("name, routes, supported", [
    ("asgo", {}, True), ("dasgo", {}, True), ("muon", {}, True), ("shampoo", {}, True), ("galore", {}, True),
    ("golore", {}, True), ("adamw", {}, False), ("adafactor", {}, False),
    ("asgo", {"fc.*": "adafactor"}, False), ("asgo", {"fc.*": "adamw"}, True), ("adamw", {"fc.*": "muon"}, True),
])
def test_which_optimizers_take_owner_compute(name, routes, supported):
    cfg = compose_config(f"optimizer={name}").optimizer
    with open_dict(cfg):
        cfg.routes = routes
    assert supports_owner_compute(cfg) is supported


def test_process_group_reaches_the_matrix_optimizer(tmp_path):
    """A one-process gloo group: the matrix optimizer gets it, torch's AdamW does not."""
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        opt = optimizer_from_config(Model(), compose_config("optimizer=dasgo").optimizer, train_steps=10,
                                    process_group=dist.group.WORLD)
        assert opt.optimizers["dasgo"].process_group is dist.group.WORLD
        assert not hasattr(opt.optimizers["adamw"], "process_group")
        assert optimizer_from_config(Model(), compose_config().optimizer, 10).optimizers["asgo"].process_group is None
    finally:
        dist.destroy_process_group()


# the typed schema of train.*, model.* and dataset.* (asgo.harness.schema)

MODEL_YAMLS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
DATASET_YAMLS = sorted(p.stem for p in (CONFIG_DIR / "dataset").glob("*.yaml"))


@pytest.mark.parametrize("model", MODEL_YAMLS)
@pytest.mark.parametrize("dataset", DATASET_YAMLS)
def test_every_shipped_config_combination_validates(model, dataset):
    from asgo.harness.schema import validate_config

    checked = validate_config(compose_config(f"model={model}", f"dataset={dataset}"))
    assert set(checked) == {"train", "model", "dataset"}
    assert checked["model"].name == model and checked["dataset"].name == dataset


def test_the_schema_lists_every_shipped_key():
    """Every key of config.yaml's train:, the models' dataclasses (but vocab_size, the data's) and
    the loader's dataset options has a schema entry, and no entry is missing from them."""
    from asgo.harness.data import DATASET_KEYS
    from asgo.harness.models import MODEL_CONFIGS
    from asgo.harness.schema import DATASET_SCHEMAS, MODEL_SCHEMAS, TrainConfig, schema_keys

    assert set(compose_config().train) <= set(schema_keys(TrainConfig))
    for name, base in MODEL_CONFIGS.items():
        architecture = {f.name for f in dataclasses.fields(base)} - {"vocab_size"}
        assert set(schema_keys(MODEL_SCHEMAS[type(base)])) == architecture | {"name"}, name
    assert set(DATASET_SCHEMAS) == set(DATASET_KEYS)
    for name, options in DATASET_KEYS.items():
        assert set(schema_keys(DATASET_SCHEMAS[name])) == options | {"name"}, name


BAD_VALUES = [
    ("train.train_steps=0", "train.train_steps: expected an integer >= 1, got 0"),
    ("train.train_steps=-5", "train.train_steps: expected an integer >= 1, got -5"),
    ("train.grad_clip=-1", "train.grad_clip: expected a real number in [0.0, inf), got -1"),
    ("train.batch_size=0", "train.batch_size: expected an integer >= 1, got 0"),
    ("train.batch_size=abc", "train.batch_size: expected an integer >= 1, got 'abc'"),
    ("train.eval_batches=0", "train.eval_batches: expected an integer >= 1, got 0"),
    ("train.grad_accumulation=0", "train.grad_accumulation: expected an integer >= 1, got 0"),
    ("train.eval_interval=-1", "train.eval_interval: expected an integer >= 0, got -1"),
    ("train.log_interval=0", "train.log_interval: expected an integer >= 1, got 0"),
    ("train.warmup_fraction=1.5", "train.warmup_fraction: expected a real number in [0.0, 1.0], got 1.5"),
    ("train.seed=1.5", "train.seed: expected an integer >= 0, got 1.5"),
    ("train.progress=yes", "train.progress: expected a bool, got 'yes'"),
    ("train.autocast=sometimes", "train.autocast: expected 'auto' or a bool, got 'sometimes'"),
    ("train.device=gpu", "train.device: expected 'auto' or a torch device string"),
    ("train.wandb_mode=sync", "train.wandb_mode: expected one of ('online', 'offline', 'disabled'), got 'sync'"),
    ("train.resume=3", "train.resume: expected None or a path (string), got 3"),
    ("++train.on_nonfinite=ignore", "train.on_nonfinite: expected one of ('stop', 'skip'), got 'ignore'"),
    ("++train.checkpoint_minutes=-1", "train.checkpoint_minutes: expected a number >= 0 (0 or null: off), got -1"),
    ("+train.bogus=1", "unknown key train.bogus; valid keys under train: autocast, batch_size"),
    ("model.n_layer=0", "model.n_layer: expected None or an integer >= 1, got 0"),
    ("model.block_size=abc", "model.block_size: expected None or an integer >= 1, got 'abc'"),
    ("model.dropout=1.0", "model.dropout: expected None or a real number in [0.0, 1.0), got 1.0"),
    ("model.n_head=3", "model.n_head: expected a divisor of model.n_embd=128, got 3"),
    ("model.name=gpt5", "model.name: expected one of"),
    ("+model.vocab_size=65", "unknown key model.vocab_size; valid keys under model:"),
    ("+model.rope_theta=1e4", "unknown key model.rope_theta; valid keys under model:"),  # a LLaMA key on a GPT
    ("dataset.name=imagenet", "dataset.name: expected one of"),
    ("+dataset.objective=fim", "unknown key dataset.objective; valid keys under dataset: name"),
    ("dataset=wikitext2 dataset.fim_rate=2", "dataset.fim_rate: expected None or a real number in [0.0, 1.0], got 2"),
    ("dataset=wikitext2 dataset.objective=mlm", "dataset.objective: expected None or one of ('clm', 'fim'), got 'mlm'"),
    ("model=llama-60m model.n_head=512", "model.n_head: expected model.n_embd / model.n_head even"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES)
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    from asgo.harness.schema import validate_config

    with pytest.raises(ConfigError, match=f"^{re.escape(message)}") as e:
        validate_config(compose_config(*override.split()))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [v for v in BAD_VALUES if v[0].lstrip("+").startswith("train.")])
def test_train_reports_bad_values_before_reading_data(tmp_path, override, message):
    """train() with a dataset that does not exist still reports the config error (not the
    missing data) and writes nothing."""
    from asgo.harness.train import train

    cfg = compose_config("dataset=openwebtext", f"train.dataset_path={tmp_path / 'none'}", "train.progress=false",
                         "train.tensorboard=false", *override.split())
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "none").exists()


def test_wikitext2_options_and_nulls_validate():
    from asgo.harness.schema import validate_config

    cfg = compose_config("dataset=wikitext2", "dataset.objective=fim", "dataset.fim_rate=0", "+dataset.spm_rate=1",
                         "+dataset.fim_loss=middle", "+dataset.tokenizer=byte", "dataset.train_split=test",
                         "model=llama-60m", "model.dropout=null", "+model.rope_theta=500000.0", "train.autocast=false",
                         "train.device=cuda:1", "train.grad_clip=0", "train.eval_interval=0",
                         "++train.checkpoint_minutes=null", "++train.on_nonfinite=skip")
    checked = validate_config(cfg)
    assert checked["dataset"].fim_loss == "middle" and checked["model"].rope_theta == 500000.0
    assert checked["train"].autocast is False and checked["train"].checkpoint_minutes is None
