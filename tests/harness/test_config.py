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
