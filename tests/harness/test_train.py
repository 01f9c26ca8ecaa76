"""End-to-end runs of the harness on the shared Shakespeare copy (no network)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from asgo.harness.config import CONFIG_DIR
from asgo.harness.metrics import MetricsLogger, read_metrics
from asgo.harness.train import train

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
REPO = Path(__file__).resolve().parents[2]
ASGO_TRAIN = Path(sys.executable).parent / "asgo-train"  # the installed console script
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # as conftest.py does in this process


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


def test_tiny_gpt_learns_shakespeare(data_dir, tmp_path):
    cfg = config(data_dir, "train.batch_size=16", "train.train_steps=40", "train.eval_interval=20",
                 "train.log_interval=5", "optimizer=asgo", "optimizer.learning_rate=0.02")
    result = train(cfg, tmp_path)
    val = [r["loss"] for r in read_metrics(tmp_path / "metrics.csv") if r["split"] == "val"]
    assert len(val) == 3 and abs(val[0] - math.log(65)) < 0.1  # uniform over 65 characters at initialisation
    assert result["final_val_loss"] < 2.9, result
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "metrics.jsonl").exists()
    assert result["diagnostics"] == {"skipped_steps": 0, "root_failures": 0}


RESUME = ["train.train_steps=20", "train.eval_interval=0", "model.dropout=0.1", "optimizer=asgo",
          "optimizer.precondition_frequency=3"]


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """20 uninterrupted steps, keeping the checkpoint of step 10."""
    out = tmp_path_factory.mktemp("full")
    train(config(data_dir, *RESUME, "train.checkpoint_interval=10", "train.keep_checkpoints=true"), out)
    return out


def test_resume_continues_exactly(data_dir, full_run, tmp_path):
    train(config(data_dir, *RESUME, f"train.resume={full_run / 'checkpoint_000010.pt'}"), tmp_path)
    assert len(train_losses(full_run)) == 20 and len(train_losses(tmp_path)) == 10
    assert train_losses(tmp_path) == train_losses(full_run)[10:]
    a = torch.load(full_run / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_checkpoints_at_a_step_boundary_and_resumes(data_dir, full_run, tmp_path, monkeypatch):
    log = MetricsLogger.log

    def log_then_ctrl_c(self, row):  # Ctrl-C arrives in the middle of step 7's bookkeeping
        log(self, row)
        if row["split"] == "train" and row["step"] == 7:
            os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(MetricsLogger, "log", log_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(config(data_dir, *RESUME), tmp_path / "interrupted")
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is handler
    assert torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)["step"] == 7

    train(config(data_dir, *RESUME, f"train.resume={tmp_path / 'interrupted' / 'checkpoint.pt'}"), tmp_path / "resumed")
    assert train_losses(tmp_path / "resumed") == train_losses(full_run)[7:]


def test_fim_fine_tuning_from_a_hugging_face_gpt2_directory(tmp_path):
    """train.init_from=<HF dir>: the checkpoint's weights, our block size, and FIM's three sentinels
    appended to its vocabulary (byte tokenizer: 257 ids -> 260)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64,
                                                              vocab_size=257))
    hf.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "data" / "wikitext2").mkdir(parents=True)
    for split in ("valid", "test"):
        shutil.copy(SHARED_DATA / "wikitext2" / f"{split}.txt", tmp_path / "data" / "wikitext2")
    cfg = config(tmp_path / "data", "dataset=wikitext2", "+dataset.tokenizer=byte", "dataset.objective=fim",
                 "dataset.train_split=test", "model.block_size=32", "train.train_steps=2", "train.eval_interval=0",
                 f"train.init_from={tmp_path / 'gpt2'}")
    result = train(cfg, tmp_path / "run")
    weights = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert weights["wte.weight"].shape == (260, 32) and weights["wpe.weight"].shape == (32, 32)
    assert math.isfinite(result["final_val_loss"])


def test_missing_dataset_says_how_to_prepare(tmp_path):
    from asgo.harness.data import DatasetError

    with pytest.raises(DatasetError, match="openwebtext"):
        train(config(tmp_path, "dataset=openwebtext", "train.train_steps=1"), tmp_path / "run")


def test_wandb_only_when_enabled_and_offline_by_default(data_dir, tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    train(config(data_dir, "train.train_steps=2", "train.eval_interval=0"), tmp_path / "off")
    assert calls == []
    train(config(data_dir, "train.train_steps=2", "train.eval_interval=0", "train.wandb=true"), tmp_path / "on")
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[0][1]["dir"] == str(tmp_path / "on")
    step, values = calls[1][2], calls[1][1]
    assert step == 1 and {"train/loss", "train/lr", "train/tokens_per_s", "train/tokens"} <= set(values)
    assert values["train/loss"] == train_losses(tmp_path / "on")[0]
    assert calls[-1] == ("finish",)


def test_cli_main_job_and_overrides(data_dir, tmp_path):
    """The installed console script with the seed README's overrides, run from another directory."""
    cmd = [str(ASGO_TRAIN), "dataset=shakespeare_char", "model=tiny", "optimizer=dasgo",
           "train.batch_size=4", "train.train_steps=3", "optimizer.learning_rate=0.01",
           f"train.dataset_path={data_dir}", "model.n_layer=1", "train.eval_batches=2"]
    out = subprocess.run(cmd + [f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final val loss:" in out.stdout and f"{tmp_path / 'run' / 'loss.png'}" in out.stdout
    assert all(key in out.stderr for key in ("loss=", "lr=", "tok_s="))  # the tqdm bar
    assert (tmp_path / "run" / "tensorboard").is_dir() and (tmp_path / "run" / "metrics.csv").is_file()

    bad = subprocess.run(cmd + ["optimizer.bogus=1", f"hydra.run.dir={tmp_path / 'bad'}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ONE_THREAD)
    assert bad.returncode != 0 and "bogus" in bad.stderr

    missing = subprocess.run(cmd + ["dataset=openwebtext", f"train.dataset_path={tmp_path / 'none'}",
                                    f"hydra.run.dir={tmp_path / 'missing'}"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ONE_THREAD)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("error: dataset 'openwebtext'"), missing.stderr[-3000:]
    assert "python -m asgo.harness.data.prepare openwebtext" in missing.stderr


@pytest.mark.parametrize("override, message", [("+optimizer.lr=0.5", "optimizer.lr: use optimizer.learning_rate"),
                                               ("optimizer.momentum=abc", "optimizer.momentum: expected a number")])
def test_cli_optimizer_config_error_before_any_work(tmp_path, override, message):
    """Before the dataset (missing here) is even looked at: one line, no traceback."""
    cmd = [str(ASGO_TRAIN), "dataset=openwebtext", f"train.dataset_path={tmp_path / 'none'}", override,
           f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ONE_THREAD)
    assert out.returncode == 1 and out.stderr.startswith(f"error: {message}"), out.stderr[-3000:]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_torchrun_two_cpu_processes_end_identical(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "asgo.harness.cli", "optimizer=asgo", "train.train_steps=4", "train.batch_size=4",
           "model.n_layer=1", "train.eval_batches=2", f"train.dataset_path={data_dir}",
           "train.progress=false", f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ONE_THREAD, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["max_param_diff_across_ranks"] == 0.0
