"""asgo-compare in smoke mode: a real (tiny) grid, its tables and plots."""

import csv
import math

import pytest
from hydra import compose, initialize_config_dir

from asgo.harness.compare import aggregate, compare, first_reach
from asgo.harness.config import CONFIG_DIR

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
    return compare(cfg, out), out


def test_every_run_is_trained_and_tabulated(grid):
    result, out = grid
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
    result, out = grid
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
    result, out = grid
    import asgo.harness.compare as module

    monkeypatch.setattr(module, "train", lambda *a: pytest.fail("a finished run was trained again"))
    cfg = module.OmegaConf.create({"compare": {"target_loss": 3.5}})
    again = module.run_one(cfg, "adamw", 0.003, 0, out / "runs" / "adamw" / "lr0.003_seed0")
    first = next(r for r in result["runs"] if (r["optimizer"], r["seed"]) == ("adamw", 0))
    assert again["final_val_loss"] == first["final_val_loss"]


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
