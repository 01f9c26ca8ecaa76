"""asgo-compare in smoke mode: a real (tiny) grid, its tables and plots."""

import copy
import csv
import json
import logging
import math
import shutil

import pytest
from hydra import compose, initialize_config_dir

import asgo.harness.compare as module
from asgo.harness.compare import CONFIG_FILE, aggregate, compare, first_reach, markdown_table
from asgo.harness.config import CONFIG_DIR, ConfigError

TEXT = "".join(f"{i} to be, or not to be: that is the question {i % 7}.\n" for i in range(400))


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    (data / "shakespeare_char").mkdir()
    (data / "shakespeare_char" / "input.txt").write_text(TEXT)
    out = tmp_path_factory.mktemp("compare")
    overrides = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
                 "train.batch_size=4", "train.train_steps=6", "train.eval_interval=2", "train.eval_batches=2",
                 "train.log_interval=2", f"train.dataset_path={data}", "compare.optimizers=[adamw,asgo]",
                 "compare.lrs.adamw=[0.003]", "compare.lrs.asgo=[0.003,0.03]", "compare.seeds=[0,1]",
                 "compare.target_loss=3.5", "+compare.settings.asgo.precondition_frequency=2"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="compare", overrides=overrides)
    return compare(cfg, out), out, cfg


def test_every_run_is_trained_and_tabulated(grid):
    result, out, _ = grid
    assert len(result["runs"]) == 1 * 2 + 2 * 2
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert {(r["optimizer"], float(r["lr"]), int(r["seed"])) for r in runs} == {
        ("adamw", 0.003, 0), ("adamw", 0.003, 1), ("asgo", 0.003, 0), ("asgo", 0.003, 1),
        ("asgo", 0.03, 0), ("asgo", 0.03, 1)}
    for r in result["runs"]:
        assert r["final_val_loss"] < math.log(len(set(TEXT)))  # below a uniform guess
        assert [s for s, _, _ in r["curve"]] == [0, 2, 4, 6]
        assert r["optimizer_state_bytes"] > 0 and r["tokens_per_s"] > 0
    asgo_runs = [r for r in result["runs"] if r["optimizer"] == "asgo"]
    assert (out / "runs" / "asgo" / "lr0.03_seed1" / "metrics.csv").exists()
    assert len({r["final_val_loss"] for r in asgo_runs}) == 4  # seeds and lrs differ


def test_results_table_and_plots(grid):
    result, out, _ = grid
    rows = result["rows"]
    assert len(rows) == 3 and sum(r["best_lr"] for r in rows) == 2
    for name in ("adamw", "asgo"):
        mine = [r for r in rows if r["optimizer"] == name]
        best = next(r for r in mine if r["best_lr"])
        assert best["final_val_loss"] == min(r["final_val_loss"] for r in mine)
    text = (out / "results.md").read_text()
    assert "| asgo" in text and "(best lr)" in text and "steps to 3.5" in text
    assert (out / "results.csv").read_text().count("\n") == 4
    for png in ("loss_curves.png", "lr_sensitivity.png"):
        assert (out / png).stat().st_size > 10_000


def test_a_finished_run_is_reused(grid, monkeypatch):
    result, out, cfg = grid
    monkeypatch.setattr(module, "train", lambda *a: pytest.fail("a finished run was trained again"))
    run_dir = out / "runs" / "adamw" / "lr0.003_seed0"
    assert json.loads((run_dir / CONFIG_FILE).read_text())["train"]["train_steps"] == 6
    again = module.run_one(cfg, "adamw", 0.003, 0, run_dir)
    first = next(r for r in result["runs"] if (r["optimizer"], r["seed"]) == ("adamw", 0))
    assert again["final_val_loss"] == first["final_val_loss"]


def fake_train(calls: list, losses=lambda cfg: [3.0, 2.5]):
    """A stand-in for asgo-train: writes metrics.csv (val losses ``losses(cfg)`` at steps 0, 1, ...)
    and summary.json into the run directory, and records each run's configuration in ``calls``."""
    def train(cfg, out_dir):
        calls.append(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        val = losses(cfg)
        with open(out_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "split", "loss", "tokens_per_s", "time_s"])
            for step, loss in enumerate(val):
                writer.writerow([step, "val", loss, "", step])
                writer.writerow([step, "train", loss, 100.0, step])
        summary = {"final_val_loss": val[-1], "train_seconds": 1.0, "optimizer_state_bytes": 8,
                   "peak_memory_bytes": None, "diagnostics": {}}
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary
    return train


def test_a_run_of_another_configuration_is_trained_again(grid, tmp_path, monkeypatch, caplog):
    _, out, cfg = grid
    run_dir = tmp_path / "lr0.003_seed0"
    shutil.copytree(out / "runs" / "adamw" / "lr0.003_seed0", run_dir)
    calls = []
    monkeypatch.setattr(module, "train", fake_train(calls))
    other = copy.deepcopy(cfg)
    other.train.train_steps = 5
    other.model.n_layer = 2
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        again = module.run_one(other, "adamw", 0.003, 0, run_dir)
    assert len(calls) == 1 and calls[0].train.train_steps == 5
    assert calls[0].train.overwrite is True  # asgo-train refuses a run directory holding a run otherwise
    assert "model.n_layer" in caplog.text and "train.train_steps" in caplog.text
    assert again["final_val_loss"] == 2.5  # not the stale 6-step number
    assert json.loads((run_dir / CONFIG_FILE).read_text())["train"]["train_steps"] == 5
    module.run_one(other, "adamw", 0.003, 0, run_dir)  # now it matches: reused
    assert len(calls) == 1
    (run_dir / CONFIG_FILE).unlink()  # a run directory of unknown configuration: trained again
    module.run_one(other, "adamw", 0.003, 0, run_dir)
    assert len(calls) == 2


def test_diverged_runs_are_counted_not_chosen_nor_plotted(grid, tmp_path, monkeypatch):
    _, _, cfg = grid
    calls = []
    # lr 0.3 (first in the grid) diverges: nan at its only evaluation; lr 0.1 diverges on one seed
    # (a non-finite train loss in the middle, a finite final loss); lr 0.01 is fine
    def losses(run):
        lr, seed = run.optimizer.learning_rate, run.train.seed
        return {0.3: [float("nan")], 0.1: [3.0, float("inf") if seed else 1.0, 1.5]}.get(lr, [3.0, 2.5, 2.0])
    monkeypatch.setattr(module, "train", fake_train(calls, losses))
    grid_cfg = copy.deepcopy(cfg)
    grid_cfg.compare.optimizers = ["adamw", "asgo"]
    grid_cfg.compare.lrs.adamw = [0.3, 0.1, 0.01]
    grid_cfg.compare.lrs.asgo = [0.3]  # every asgo run diverges: no best lr, no curve
    result = compare(grid_cfg, tmp_path)
    assert len(calls) == 8
    by_run = {(r["optimizer"], r["lr"], r["seed"]): r["diverged"] for r in result["runs"]}
    assert by_run[("adamw", 0.3, 0)] and by_run[("adamw", 0.1, 1)] and not by_run[("adamw", 0.1, 0)]
    rows = {(r["optimizer"], r["lr"]): r for r in result["rows"]}
    assert rows[("adamw", 0.01)]["best_lr"] and not rows[("adamw", 0.3)]["best_lr"]
    assert not rows[("adamw", 0.1)]["best_lr"]  # lower loss on its finite seed, but a seed diverged
    assert rows[("adamw", 0.3)]["diverged"] == 2 and rows[("adamw", 0.3)]["final_val_loss"] is None
    assert rows[("adamw", 0.1)]["diverged"] == 1 and rows[("adamw", 0.1)]["final_val_loss"] == 1.5
    assert not rows[("asgo", 0.3)]["best_lr"] and rows[("asgo", 0.3)]["diverged"] == 2
    text = (tmp_path / "results.md").read_text()
    assert "diverged" in text and "2/2" in text and "1/2" in text
    with open(tmp_path / "runs.csv") as f:
        assert sum(r["diverged"] == "True" for r in csv.DictReader(f)) == 5
    for png in ("loss_curves.png", "lr_sensitivity.png"):
        assert (tmp_path / png).exists()


def test_best_lr_skips_a_diverged_setting_first_in_the_grid():
    runs = [{"optimizer": "a", "lr": lr, "seed": 0, "final_val_loss": loss, "best_val_loss": None,
             "steps_to_target": None, "seconds_to_target": None, "tokens_per_s": None, "train_seconds": None,
             "peak_memory_bytes": None, "optimizer_state_bytes": None, "diverged": not math.isfinite(loss)}
            for lr, loss in [(1.0, float("nan")), (0.5, float("inf")), (0.1, 2.0)]]
    rows = {r["lr"]: r for r in aggregate(runs)}
    assert rows[0.1]["best_lr"] and not rows[1.0]["best_lr"] and not rows[0.5]["best_lr"]
    assert rows[1.0]["diverged"] == 1 and rows[1.0]["final_val_loss"] is None
    assert "| 1/1 |" in markdown_table(list(rows.values()), None)


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="compare", overrides=["compare.optimizers=[adamw,asgo]",
                                                         "compare.lrs.adamw=[0.003]", "compare.lrs.asgo=[0.01]",
                                                         "compare.seeds=[0]", *overrides])


def test_optimizer_overrides_apply_to_every_optimizer(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(module, "train", fake_train(calls))
    compare(_compose("optimizer.weight_decay=0.05", "optimizer.adamw.eps=1e-7",
                     "+compare.settings.asgo.weight_decay=0.2"), tmp_path)
    got = {c.optimizer.name: c.optimizer for c in calls}
    assert got["adamw"].weight_decay == 0.05 and got["asgo"].weight_decay == 0.2  # settings win
    assert got["adamw"].adamw.eps == got["asgo"].adamw.eps == 1e-7
    assert got["adamw"].learning_rate == 0.003 and got["asgo"].learning_rate == 0.01


@pytest.mark.parametrize("override, message", [
    ("optimizer.momentum=0.8", r"optimizer\.momentum=0\.8 .*but adamw do not take it"),
    ("+optimizer.lr=0.1", r"optimizer\.lr: use optimizer\.learning_rate"),
    ("optimizer.learning_rate=0.1", r"optimizer\.learning_rate: .*compare\.lrs"),
])
def test_optimizer_overrides_some_optimizer_does_not_take_fail_before_any_run(tmp_path, monkeypatch,
                                                                           override, message):
    monkeypatch.setattr(module, "train", lambda *a: pytest.fail("a run started"))
    with pytest.raises(ConfigError, match=message):
        compare(_compose(override), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_aggregation_and_time_to_target():
    curve = [(0, 4.2, 0.0), (10, 3.0, 1.5), (20, 2.0, 3.0)]
    assert first_reach(curve, 2.5) == (20, 3.0)
    assert first_reach(curve, 1.0) == (None, None) and first_reach(curve, None) == (None, None)
    runs = [{"optimizer": "a", "lr": lr, "seed": s, "final_val_loss": loss, "best_val_loss": loss,
             "steps_to_target": None if lr == 1 else 10, "seconds_to_target": None, "tokens_per_s": 1.0,
             "train_seconds": 1.0, "peak_memory_bytes": None, "optimizer_state_bytes": 8}
            for lr, s, loss in [(1, 0, 3.0), (1, 1, 3.2), (2, 0, 2.0), (2, 1, 2.4)]]
    rows = {r["lr"]: r for r in aggregate(runs)}
    assert rows[2]["best_lr"] and not rows[1]["best_lr"]
    assert rows[2]["final_val_loss"] == pytest.approx(2.2)
    assert rows[2]["final_val_loss_std"] == pytest.approx(0.2828427, rel=1e-6)
    assert rows[1]["reached_target"] == 0 and rows[2]["reached_target"] == 2


def test_missing_learning_rates_name_the_optimizer(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="compare", overrides=["compare.optimizers=[adamw,lion]"])
    with pytest.raises(ValueError, match=r"no learning rates for \['lion'\]"):
        compare(cfg, tmp_path)
