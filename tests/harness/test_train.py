"""End-to-end runs of the harness on the shared Shakespeare copy (no network)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from asgo.harness.config import CONFIG_DIR
from asgo.harness.metrics import read_metrics
from asgo.harness.train import train

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A private copy of shared/data/shakespeare_char/input.txt (prepared .bin files go beside it)."""
    root = tmp_path_factory.mktemp("data")
    (root / "shakespeare_char").mkdir()
    shutil.copy(SHARED_DATA / "shakespeare_char" / "input.txt", root / "shakespeare_char" / "input.txt")
    return root


def config(data_dir, *overrides):
    base = ["model=tiny", "model.n_layer=2", "model.n_embd=64", "model.block_size=64",
            "train.batch_size=8", "train.eval_batches=4", "train.log_interval=1", "train.progress=false",
            "train.tensorboard=false", f"train.dataset_path={data_dir}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=base + list(overrides))


def train_losses(out_dir):
    return [r["loss"] for r in read_metrics(Path(out_dir) / "metrics.csv") if r["split"] == "train"]


@pytest.mark.slow
def test_tiny_gpt_learns_shakespeare(data_dir, tmp_path):
    cfg = config(data_dir, "model.n_layer=4", "model.n_embd=128", "model.block_size=128",
                 "train.batch_size=16", "train.train_steps=60", "train.eval_interval=30",
                 "train.log_interval=10", "optimizer=asgo", "optimizer.learning_rate=0.02")
    result = train(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.csv")
    val = [r["loss"] for r in rows if r["split"] == "val"]
    assert val[0] > 4.0  # ~ln(65) = 4.17 at initialisation
    assert result["final_val_loss"] < 2.9, result
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "metrics.jsonl").exists()
    assert result["diagnostics"] == {"skipped_steps": 0, "root_failures": 0}


def test_resume_continues_exactly(data_dir, tmp_path):
    common = ["train.train_steps=20", "train.eval_interval=0", "model.dropout=0.1", "optimizer=asgo",
              "optimizer.precondition_frequency=3"]
    full = tmp_path / "full"
    train(config(data_dir, *common, "train.checkpoint_interval=10", "train.keep_checkpoints=true"), full)
    resumed = tmp_path / "resumed"
    train(config(data_dir, *common, f"train.resume={full / 'checkpoint_000010.pt'}"), resumed)
    assert len(train_losses(full)) == 20 and len(train_losses(resumed)) == 10
    assert train_losses(resumed) == train_losses(full)[10:]
    a = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_dataset_says_how_to_prepare(tmp_path):
    from asgo.harness.data import DatasetError

    with pytest.raises(DatasetError, match="openwebtext"):
        train(config(tmp_path, "dataset=openwebtext", "train.train_steps=1"), tmp_path / "run")


@pytest.mark.slow
def test_cli_main_job_and_overrides(data_dir, tmp_path):
    """The console script with the seed README's overrides, as a user runs it."""
    cmd = [sys.executable, "-m", "asgo.harness.cli", "dataset=shakespeare_char", "model=tiny", "optimizer=dasgo",
           "train.batch_size=4", "train.train_steps=3", "optimizer.learning_rate=0.01",
           f"train.dataset_path={data_dir}", "model.n_layer=1", "train.eval_batches=2",
           f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final val loss:" in out.stdout and (tmp_path / "loss.png").exists()
    bad = subprocess.run(cmd[:-1] + ["optimizer.bogus=1", f"hydra.run.dir={tmp_path / 'bad'}"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "bogus" in bad.stderr


@pytest.mark.slow
def test_torchrun_two_cpu_processes_end_identical(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "asgo.harness.cli", "optimizer=asgo", "train.train_steps=4", "train.batch_size=4",
           "model.n_layer=1", "train.eval_batches=2", f"train.dataset_path={data_dir}",
           "train.progress=false", f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["max_param_diff_across_ranks"] == 0.0
