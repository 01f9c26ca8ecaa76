"""End-to-end runs of the harness on the package's embedded Shakespeare copy (no network)."""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from asgo.harness.checkpoint import read_dcp_checkpoint
from asgo.harness.config import CONFIG_DIR, ConfigError
from asgo.harness.metrics import MetricsLogger, read_metrics
from asgo.harness.train import train

WIKITEXT = Path(__file__).resolve().parents[1] / "data" / "wikitext2"  # the small sample (tests/data/README.md)
REPO = Path(__file__).resolve().parents[2]
ASGO_TRAIN = Path(sys.executable).parent / "asgo-train"  # the installed console script
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # as conftest.py does in this process


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An empty data directory: the first run writes shakespeare_char/input.txt there from the
    package's embedded copy, as the main job does on a fresh machine (prepared .bin files beside it)."""
    return tmp_path_factory.mktemp("data")


BASE = ["model=tiny", "model.n_layer=2", "model.n_embd=64", "model.block_size=64", "train.batch_size=8",
        "train.eval_batches=4", "train.log_interval=1", "train.progress=false", "train.tensorboard=false"]


def config(data_dir, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=[*BASE, f"train.dataset_path={data_dir}", *overrides])


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
        shutil.copy(WIKITEXT / f"{split}.txt", tmp_path / "data" / "wikitext2")
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
                                               ("optimizer.momentum=abc", "optimizer.momentum: expected a number"),
                                               ("optimizer=adafactor train.parallel=fsdp2",
                                                "train.parallel=fsdp2: optimizer adafactor is single-process")])
def test_cli_optimizer_config_error_before_any_work(tmp_path, override, message):
    """Before the dataset (missing here) is even looked at: one line, no traceback."""
    cmd = [str(ASGO_TRAIN), "dataset=openwebtext", f"train.dataset_path={tmp_path / 'none'}", *override.split(),
           f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ONE_THREAD)
    assert out.returncode == 1 and out.stderr.startswith(f"error: {message}"), out.stderr[-3000:]
    assert "Traceback" not in out.stderr


@pytest.mark.slow  # Inductor compiles the step's graphs: about a minute on 2 CPU cores
def test_compiled_optimizer_step_trains_as_eager_and_resumes_exactly(data_dir, tmp_path):
    # a root every step: one schedule decision, so one compiled graph per run
    eager = config(data_dir, *RESUME, "model.n_layer=1", "train.train_steps=12", "train.checkpoint_interval=6",
                   "train.keep_checkpoints=true", "optimizer.precondition_frequency=1")
    compiled = OmegaConf.merge(eager, {"train": {"compile_optimizer": True}})
    train(eager, tmp_path / "eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. torch's "lr_scheduler.step() before optimizer.step()"
        train(compiled, tmp_path / "compiled")
    eager_losses, compiled_losses = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert compiled_losses[0] == eager_losses[0]  # before any step
    assert max(abs(a - b) / b for a, b in zip(compiled_losses, eager_losses)) < 1e-4
    assert compiled_losses != eager_losses  # generated kernels: float32 round-off, not bitwise
    train(OmegaConf.merge(compiled, {"train": {"resume": str(tmp_path / "compiled" / "checkpoint_000006.pt")}}),
          tmp_path / "resumed")
    assert train_losses(tmp_path / "resumed") == compiled_losses[6:]


def test_compiled_optimizer_is_refused_under_torchrun_and_fsdp2(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="^train.compile_optimizer=true runs in one process"):
        train(config(tmp_path, "train.compile_optimizer=true", "train.parallel=fsdp2"), tmp_path / "run")
    monkeypatch.setattr("asgo.harness.distributed.launched_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="^train.compile_optimizer=true runs in one process"):
        train(config(tmp_path, "train.compile_optimizer=true"), tmp_path / "run")


def test_parallel_config_errors_before_any_work(tmp_path):
    """Checked before the dataset (missing here) is looked at."""
    for override, message in [("train.parallel=zero", "train.parallel: unknown value 'zero'"),
                              ("train.owner_compute=maybe", "train.owner_compute: expected a bool"),
                              ("train.parallel=fsdp2 train.owner_compute=false",
                               "train.owner_compute=false applies to train.parallel=ddp only"),
                              ("train.parallel=fsdp2 optimizer=adafactor",
                               "train.parallel=fsdp2: optimizer adafactor is single-process"),
                              ("train.parallel=fsdp2 optimizer=asgo +optimizer.routes={mlp.*:adafactor}",
                               "train.parallel=fsdp2: optimizer adafactor is single-process")]:
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
            train(config(tmp_path, "dataset=openwebtext", *override.split()), tmp_path / "run")


# torchrun: 2 gloo processes on CPU, 1 layer, 4 steps of 2 micro-batches of 4 sequences per process
DDP = ["optimizer=asgo", "optimizer.precondition_frequency=3", "model.n_layer=1", "model.dropout=0.1",
       "train.batch_size=4", "train.grad_accumulation=2", "train.train_steps=4", "train.eval_interval=0",
       "train.eval_batches=2", "train.plot=false"]


def torchrun(data_dir, out, *overrides, nproc=2):
    """``asgo-train`` under torchrun with BASE + DDP + ``overrides``; its summary.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "asgo.harness.cli", *BASE, f"train.dataset_path={data_dir}", *DDP, *overrides,
           f"hydra.run.dir={out}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ONE_THREAD, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((Path(out) / "summary.json").read_text())
    assert summary["world_size"] == nproc, summary
    if summary["parallel"] == "ddp":  # replicas agree (fsdp2's shards differ by design: not recorded)
        assert summary["max_param_diff_across_ranks"] == 0.0, summary
    return summary | {"log": run.stdout + run.stderr}


def checkpoint_of(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)


def dcp_of(out, name="checkpoint_dcp"):
    """A checkpoint_dcp directory read into this process: full tensors, no process group."""
    return read_dcp_checkpoint(Path(out) / name)


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def equal(a, b):
    """Bitwise equality of nested checkpoint contents."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory):
    """2 processes, owner-compute (the default), keeping the checkpoint of step 2."""
    out = tmp_path_factory.mktemp("ddp")
    summary = torchrun(data_dir, out, "train.checkpoint_interval=2", "train.keep_checkpoints=true")
    return out, summary


@pytest.mark.slow
def test_torchrun_owner_compute_equals_every_rank_computing(data_dir, ddp_run, tmp_path):
    """Owner-compute and every rank computing every update end bitwise equal: weights, losses and
    the whole optimizer state (gathered from both ranks into the checkpoint); each rank holds less."""
    out, owner = ddp_run
    every = torchrun(data_dir, tmp_path, "train.owner_compute=false", "train.checkpoint_interval=2")
    assert (owner["parallel"], owner["owner_compute"]) == ("ddp", True)
    assert (every["parallel"], every["owner_compute"]) == ("ddp", False)
    assert train_losses(out) == train_losses(tmp_path) and owner["final_val_loss"] == every["final_val_loss"]
    a, b = checkpoint_of(out), checkpoint_of(tmp_path)
    assert equal(a["model"], b["model"]) and equal(a["optimizer"], b["optimizer"]) and len(a["rng"]) == 2
    assert owner["diagnostics"] == every["diagnostics"] == {"skipped_steps": 0, "root_failures": 0}
    mine, all_ = owner["optimizer_state_bytes_per_rank"], every["optimizer_state_bytes_per_rank"]
    assert owner["optimizer_state_bytes"] == mine[0] and owner["optimizer_state_bytes_total"] == sum(mine)
    assert len(mine) == 2 and all(m < e for m, e in zip(mine, all_)) and all_[0] == all_[1]


@pytest.mark.slow
def test_torchrun_two_process_checkpoint_resumes_in_two_processes_exactly(data_dir, ddp_run, tmp_path):
    out, _ = ddp_run
    resumed = torchrun(data_dir, tmp_path, f"train.resume={out / 'checkpoint_000002.pt'}")
    assert resumed["steps"] == 4 and resumed["owner_compute"] and "data order" not in resumed["log"]
    assert train_losses(tmp_path) == train_losses(out)[2:]
    assert equal(checkpoint_of(tmp_path)["model"], checkpoint_of(out)["model"])


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(data_dir, ddp_run, tmp_path, caplog):
    """Weights, optimizer state (all of it, from both owners) and schedule load; rank 0 keeps its
    data stream; a warning says the data order differs."""
    out, _ = ddp_run
    with caplog.at_level("WARNING", logger="asgo.harness.train"):
        result = train(config(data_dir, *DDP, f"train.resume={out / 'checkpoint_000002.pt'}"), tmp_path)
    assert "2-process run in 1 processes" in caplog.text and "data order" in caplog.text
    assert result["steps"] == 4 and len(train_losses(tmp_path)) == 2 and math.isfinite(result["final_val_loss"])
    assert (result["parallel"], result["owner_compute"], result["world_size"]) == (None, False, 1)
    assert result["optimizer_state_bytes_total"] == result["optimizer_state_bytes"]


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_processes(data_dir, tmp_path):
    train(config(data_dir, *DDP, "train.checkpoint_interval=2", "train.keep_checkpoints=true"), tmp_path / "one")
    resumed = torchrun(data_dir, tmp_path / "two", f"train.resume={tmp_path / 'one' / 'checkpoint_000002.pt'}")
    assert "1-process run in 2 processes" in resumed["log"] and resumed["owner_compute"]
    assert resumed["steps"] == 4 and len(train_losses(tmp_path / "two")) == 2
    assert len(checkpoint_of(tmp_path / "two")["rng"]) == 2


# train.parallel=fsdp2: fully_shard'ed weights, gradients and optimizer state; DCP checkpoints
FSDP2 = "train.parallel=fsdp2"
NO_CLIP = "train.grad_clip=0"  # see test_torchrun_fsdp2_equals_ddp_owner_compute


@pytest.fixture(scope="module")
def fsdp2_run(data_dir, tmp_path_factory):
    """2 processes, sharded, gradients not clipped, keeping the DCP checkpoint of step 2."""
    out = tmp_path_factory.mktemp("fsdp2")
    summary = torchrun(data_dir, out, FSDP2, NO_CLIP, "train.checkpoint_interval=2", "train.keep_checkpoints=true")
    return out, summary


@pytest.mark.slow
def test_torchrun_fsdp2_equals_ddp_owner_compute(data_dir, fsdp2_run, tmp_path):
    """The same data per rank and the same rank-averaged gradients (micro-batches accumulated, then
    reduce-scattered) as DDP, the same owner computing each matrix's update from its full gradient:
    losses, validation loss and final weights agree within 1e-5 relative (bitwise here). Clipping
    is off in both: FSDP2's gradient norm, summed from the shards, rounds differently from DDP's
    (one ulp), which ASGO's preconditioner root amplifies to ~3e-5 in a few matrices within 4 steps
    (and the key bias, whose gradient is rounding noise, diverges). Weights and the AdamW state
    are split between the ranks."""
    out, fsdp2 = fsdp2_run
    ddp = torchrun(data_dir, tmp_path, NO_CLIP, "train.checkpoint_interval=2")
    assert (fsdp2["parallel"], fsdp2["owner_compute"], fsdp2["steps"]) == ("fsdp2", True, 4)
    assert "max_param_diff_across_ranks" not in fsdp2 and fsdp2["checkpoint"] == str(out / "checkpoint_dcp")
    assert fsdp2["diagnostics"] == ddp["diagnostics"] == {"skipped_steps": 0, "root_failures": 0}
    ours, theirs = train_losses(out), train_losses(tmp_path)
    assert len(ours) == 4 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(ours, theirs)), (ours, theirs)
    assert abs(fsdp2["final_val_loss"] - ddp["final_val_loss"]) <= 1e-5 * ddp["final_val_loss"]
    sharded, replicated = dcp_of(out), checkpoint_of(tmp_path)
    assert sharded["model"].keys() == replicated["model"].keys()
    errors = {k: relative_error(sharded["model"][k], v) for k, v in replicated["model"].items()}
    assert max(errors.values()) <= 1e-5, errors
    assert (sharded["step"], len(sharded["rng"])) == (4, 2) and "parallel: fsdp2" in sharded["config"]
    # each rank holds half the weights; the optimizer state in all is smaller (AdamW's not replicated)
    assert sum(fsdp2["parameter_bytes_per_rank"]) == ddp["parameter_bytes_per_rank"][0]
    assert max(fsdp2["parameter_bytes_per_rank"]) < ddp["parameter_bytes_per_rank"][0]
    assert fsdp2["optimizer_state_bytes_total"] < ddp["optimizer_state_bytes_total"]


@pytest.mark.slow
def test_torchrun_fsdp2_checkpoint_resumes_in_two_processes_exactly(data_dir, fsdp2_run, tmp_path):
    out, _ = fsdp2_run
    resumed = torchrun(data_dir, tmp_path, FSDP2, NO_CLIP, f"train.resume={out / 'checkpoint_dcp_000002'}")
    assert resumed["steps"] == 4 and resumed["parallel"] == "fsdp2" and "data order" not in resumed["log"]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint_dcp",
                                                                                "checkpoint_dcp_000002"]
    assert train_losses(tmp_path) == train_losses(out)[2:]
    a, b = dcp_of(tmp_path), dcp_of(out)
    assert equal(a["model"], b["model"]) and equal(a["optim"], b["optim"]) and equal(a["rng"], b["rng"])


@pytest.mark.slow
def test_torchrun_ddp_resumes_an_fsdp2_checkpoint(data_dir, fsdp2_run, tmp_path):
    """checkpoint_dcp/ loads into replicated weights and an owner-compute optimizer too; without
    clipping the two modes step alike, so the DDP run continues the FSDP2 run bit for bit."""
    out, _ = fsdp2_run
    resumed = torchrun(data_dir, tmp_path, NO_CLIP, f"train.resume={out / 'checkpoint_dcp_000002'}")
    assert (resumed["parallel"], resumed["owner_compute"], resumed["steps"]) == ("ddp", True, 4)
    assert train_losses(tmp_path) == train_losses(out)[2:]
    assert equal(checkpoint_of(tmp_path)["model"], dcp_of(out)["model"])


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_in_one_process(data_dir, fsdp2_run, tmp_path, caplog):
    """No process group: the DCP checkpoint loads into the unsharded model and optimizer, every
    matrix's state from both owners, and training continues (rank 0's data stream, a warning)."""
    out, _ = fsdp2_run
    saved = dcp_of(out, "checkpoint_dcp_000002")
    # nothing left to train: the final checkpoint.pt is what was loaded, bit for bit
    train(config(data_dir, *DDP, NO_CLIP, "train.train_steps=2", f"train.resume={out / 'checkpoint_dcp_000002'}"),
          tmp_path / "loaded")
    loaded = checkpoint_of(tmp_path / "loaded")
    assert equal(loaded["model"], saved["model"]) and loaded["step"] == 2
    names = {i: name for ids, fqns in zip(loaded["optimizer"]["param_groups"], saved["optim"]["param_groups"])
             for i, name in zip(ids["params"], fqns["params"])}
    assert equal({names[i]: s for i, s in loaded["optimizer"]["state"].items()}, saved["optim"]["state"])

    with caplog.at_level("WARNING", logger="asgo.harness.train"):
        result = train(config(data_dir, *DDP, NO_CLIP, f"train.resume={out / 'checkpoint_dcp_000002'}"),
                       tmp_path / "run")
    assert "2-process run in 1 processes" in caplog.text and "data order" in caplog.text
    assert result["steps"] == 4 and len(train_losses(tmp_path / "run")) == 2
    assert math.isfinite(result["final_val_loss"])
    assert (result["parallel"], result["world_size"]) == (None, 1)
    assert result["checkpoint"] == str(tmp_path / "run" / "checkpoint.pt")


@pytest.mark.slow
def test_one_process_fsdp2_checkpoint_resumes_in_two_processes(data_dir, tmp_path):
    """train.parallel=fsdp2 in one process writes checkpoint_dcp/ (plain tensors): it loads sharded
    (and trains with the gradient clipped from the shards' norms)."""
    result = train(config(data_dir, *DDP, FSDP2, "train.checkpoint_interval=2", "train.keep_checkpoints=true"),
                   tmp_path / "one")
    assert result["checkpoint"] == str(tmp_path / "one" / "checkpoint_dcp") and result["parallel"] is None
    resumed = torchrun(data_dir, tmp_path / "two", FSDP2, f"train.resume={tmp_path / 'one' / 'checkpoint_dcp_000002'}")
    assert "1-process run in 2 processes" in resumed["log"] and resumed["owner_compute"]
    assert resumed["steps"] == 4 and len(train_losses(tmp_path / "two")) == 2
    assert len(dcp_of(tmp_path / "two")["rng"]) == 2


def test_fsdp2_torchrun_refuses_a_checkpoint_pt(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before joining any group
    with pytest.raises(ConfigError, match=r"^train\.resume=.*checkpoint\.pt: train\.parallel=fsdp2 under torchrun"):
        train(config(tmp_path, "dataset=openwebtext", FSDP2, f"train.resume={tmp_path / 'checkpoint.pt'}"),
              tmp_path / "run")


# divergence guard, strict JSON and preemption (issue 11)
def strict_json_lines(path):
    """Parse JSON (lines) refusing NaN/Infinity, as a strict (RFC 8259) parser does."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name} in {path}")

    text = Path(path).read_text()
    if Path(path).suffix == ".jsonl":
        return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]
    return json.loads(text, parse_constant=refuse)


def all_finite(ckpt):
    return all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_cli_diverging_run_exits_3_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    """optimizer.learning_rate=1e6: the run stops at the first non-finite loss or gradient norm with
    exit status 3 and a message naming the step and the last good checkpoint, which stays finite."""
    cmd = [str(ASGO_TRAIN), *BASE, "model.n_layer=1", "train.batch_size=4", "train.train_steps=20",
           "train.checkpoint_interval=1", "train.eval_batches=2", "train.plot=false", "optimizer.learning_rate=1e6",
           f"train.dataset_path={data_dir}", f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ONE_THREAD)
    assert out.returncode == 3, out.stderr[-3000:]
    match = re.search(r"^error: (loss|gradient norm) became (nan|inf|-inf) at step (\d+); "
                      r"the last good checkpoint is (\S+)$", out.stderr, re.MULTILINE)
    assert match and "Traceback" not in out.stderr, out.stderr[-3000:]
    step, path = int(match[3]), Path(match[4])
    assert path == tmp_path / "run" / "checkpoint.pt" and step >= 2
    good = torch.load(path, weights_only=True)
    assert good["step"] == step - 1 and all_finite(good)
    assert "final val loss" not in out.stdout and not (tmp_path / "run" / "summary.json").exists()
    rows = strict_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert max(r["step"] for r in rows) == step - 1


def nan_loss_at_step(monkeypatch, bad_step):
    """The model's training loss becomes nan at optimizer step ``bad_step`` (grad_accumulation 1)."""
    import asgo.harness.train as train_module

    build = train_module.build_model

    def build_with_nan(*args, **kwargs):
        model = build(*args, **kwargs)
        calls = [0]

        def hook(module, inputs, output):
            if module.training:
                calls[0] += 1
                if calls[0] == bad_step:
                    return output[0], output[1] * float("nan")
            return None

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "build_model", build_with_nan)


SHORT = ["model.n_layer=1", "train.batch_size=4", "train.train_steps=6", "train.eval_interval=0",
         "train.eval_batches=2", "train.plot=false"]


def test_nonfinite_loss_stops_by_default_without_checkpointing_it(data_dir, tmp_path, monkeypatch):
    from asgo.harness.train import Diverged

    nan_loss_at_step(monkeypatch, 3)
    with pytest.raises(Diverged, match=rf"^loss became nan at step 3; the last good checkpoint is "
                                       rf"{re.escape(str(tmp_path / 'checkpoint.pt'))}$") as info:
        train(config(data_dir, *SHORT, "train.checkpoint_interval=2"), tmp_path)
    assert info.value.exit_code == 3
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert good["step"] == 2 and all_finite(good)
    assert [r["step"] for r in strict_json_lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_on_nonfinite_skip_skips_the_step_counts_and_writes_strict_json(data_dir, tmp_path, monkeypatch, caplog):
    nan_loss_at_step(monkeypatch, 3)
    with caplog.at_level("WARNING", logger="asgo.harness.train"):
        result = train(config(data_dir, *SHORT, "train.on_nonfinite=skip"), tmp_path)
    assert "loss became nan at step 3: optimizer step skipped" in caplog.text
    assert result["steps"] == 6 and result["nonfinite_skipped_steps"] == 1 and math.isfinite(result["final_val_loss"])
    summary = strict_json_lines(tmp_path / "summary.json")
    assert summary["nonfinite_skipped_steps"] == 1 and summary["on_nonfinite"] == "skip"
    rows = [r for r in strict_json_lines(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert [r["loss"] is None for r in rows] == [False, False, True, False, False, False]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert rows[-1]["optimizer_skipped_steps"] == 0 and rows[-1]["optimizer_root_failures"] == 0
    assert all_finite(torch.load(tmp_path / "checkpoint.pt", weights_only=True))


def test_nonfinite_weights_are_never_checkpointed(data_dir, tmp_path, monkeypatch):
    """Finite loss and gradient but weights made non-finite by the step: no checkpoint written."""
    import asgo.harness.train as train_module
    from asgo.harness.train import Diverged

    build = train_module.optimizer_from_config

    def build_poisoned(model, *args, **kwargs):
        optimizer = build(model, *args, **kwargs)
        calls = [0]

        def poisoned_step(self, *a, **k):  # the second update makes a weight inf
            out = type(self).step(self, *a, **k)
            calls[0] += 1
            if calls[0] == 2:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))
            return out

        optimizer.step = types.MethodType(poisoned_step, optimizer)  # a bound method, as LambdaLR expects
        return optimizer

    monkeypatch.setattr(train_module, "optimizer_from_config", build_poisoned)
    cfg = config(data_dir, *SHORT, "train.train_steps=3", "train.checkpoint_interval=1")
    with pytest.raises(Diverged, match=r"^weights or optimizer state became non-finite .*the last good checkpoint "
                                       rf"is {re.escape(str(tmp_path / 'checkpoint.pt'))}$"):
        train(cfg, tmp_path)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1


def test_new_train_keys_are_validated(tmp_path):
    """Before the dataset (missing here) is looked at: an error naming the key."""
    with pytest.raises(ConfigError, match=r"^train\.on_nonfinite: .*'ignore'"):
        train(config(tmp_path, "dataset=openwebtext", "train.on_nonfinite=ignore"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^train\.checkpoint_minutes: expected a number >= 0"):
        train(config(tmp_path, "dataset=openwebtext", "train.checkpoint_minutes=-1"), tmp_path / "run")


def test_sigusr1_checkpoints_at_a_step_boundary_like_ctrl_c(data_dir, tmp_path, monkeypatch):
    from asgo.harness.train import Interrupted

    log = MetricsLogger.log

    def log_then_signal(self, row):
        log(self, row)
        if row["split"] == "train" and row["step"] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]
    monkeypatch.setattr(MetricsLogger, "log", log_then_signal)
    with pytest.raises(Interrupted, match=r"interrupted \(SIGUSR1\) at step 2") as info:
        train(config(data_dir, *SHORT), tmp_path)
    assert info.value.exit_code == 128 + signal.SIGUSR1 and isinstance(info.value, KeyboardInterrupt)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)] == handlers
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_checkpoint_minutes_checkpoints_by_time(data_dir, tmp_path):
    train(config(data_dir, *SHORT, "train.train_steps=3", "train.checkpoint_minutes=1e-9",
                 "train.keep_checkpoints=true"), tmp_path)  # a checkpoint after every step, no kept copies
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint.pt"]


PREEMPT = ["model.n_layer=1", "train.batch_size=4", "train.train_steps=120", "train.eval_interval=0",
           "train.eval_batches=2", "train.plot=false", "model.dropout=0.1", "optimizer=asgo",
           "optimizer.precondition_frequency=3"]


@pytest.mark.slow
def test_cli_sigterm_checkpoints_exits_143_and_resumes_exactly(data_dir, tmp_path):
    """SIGTERM (preemption) to a running asgo-train: a checkpoint at the step boundary, exit 143,
    the resume command in the log; resuming ends bitwise like an uninterrupted run."""
    run = tmp_path / "killed"
    cmd = [str(ASGO_TRAIN), *BASE, *PREEMPT, f"train.dataset_path={data_dir}", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=ONE_THREAD)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # a few steps logged
            metrics = run / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, output[-3000:]
    stopped = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= stopped < 120
    assert f"interrupted (SIGTERM) at step {stopped}: checkpoint written" in output, output[-3000:]
    assert re.search(rf"asgo-train .*model\.n_layer=1 .*train\.resume={re.escape(str(run / 'checkpoint.pt'))}$",
                     output, re.MULTILINE), output[-3000:]

    train(config(data_dir, *PREEMPT, f"train.resume={run / 'checkpoint.pt'}"), tmp_path / "resumed")
    train(config(data_dir, *PREEMPT), tmp_path / "full")
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "full")[stopped:]
    a, b = checkpoint_of(tmp_path / "resumed"), checkpoint_of(tmp_path / "full")
    assert a["step"] == b["step"] == 120 and equal(a["model"], b["model"]) and equal(a["optimizer"], b["optimizer"])


# evaluation (train.eval_batch_size, train.eval_full): independent of train.batch_size, sharded over ranks

def eval_setup(data_dir, *overrides):
    from asgo.harness.data import load_data
    from asgo.harness.models import build_model

    cfg = config(data_dir, "model.n_layer=1", *overrides)
    data = load_data(cfg.dataset, data_dir)
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=data.vocab_size, n_layer=1, n_embd=64, block_size=64)
    return cfg, data, model


def test_val_loss_does_not_depend_on_the_training_batch_size(data_dir):
    from asgo.harness.train import evaluate

    cfg4, data, model = eval_setup(data_dir, "train.batch_size=4", "train.eval_batch_size=6")
    cfg8 = config(data_dir, "model.n_layer=1", "train.batch_size=8", "train.eval_batch_size=6", "train.seed=7")
    a = evaluate(model, data.val, cfg4, torch.device("cpu"), contextlib.nullcontext)
    b = evaluate(model, data.val, cfg8, torch.device("cpu"), contextlib.nullcontext)
    assert a == b and math.isfinite(a)  # exactly: the same windows in the same batches (any train.seed too)
    assert a == evaluate(model, data.val, cfg4, torch.device("cpu"), contextlib.nullcontext)  # every call


def test_eval_full_scores_every_validation_token_once(data_dir):
    from asgo.harness.data import IGNORE_INDEX
    from asgo.harness.train import evaluate

    cfg, data, model = eval_setup(data_dir, "train.eval_full=true", "train.eval_batch_size=64")
    seen = []

    def counting(x, y):
        seen.append(y)
        return model(x, y)

    counting.eval, counting.train = model.eval, model.train
    loss = evaluate(counting, data.val, cfg, torch.device("cpu"), contextlib.nullcontext)
    targets = torch.cat([y.flatten() for y in seen])
    assert int((targets != IGNORE_INDEX).sum()) == len(data.val) - 1  # every token after the first, once
    assert len(seen) == math.ceil(math.ceil((len(data.val) - 1) / 64) / 64) and math.isfinite(loss)
    expected = torch.from_numpy(data.val.tokens[1:].astype("int64")).bincount(minlength=data.vocab_size)
    assert torch.equal(targets[targets != IGNORE_INDEX].bincount(minlength=data.vocab_size), expected)


def test_tokens_per_second_excludes_evaluation(data_dir, tmp_path, monkeypatch):
    from asgo.harness import train as train_module

    real = train_module.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", slow_evaluate)
    result = train(config(data_dir, "model.n_layer=1", "train.train_steps=3", "train.eval_interval=1",
                          "train.eval_batches=1", "train.plot=false", "train.checkpoint_interval=0"), tmp_path)
    rows = [r for r in read_metrics(tmp_path / "metrics.csv") if r["split"] == "train"]
    tokens_per_step = 8 * 64
    assert len(rows) == 3 and all(tokens_per_step / r["tokens_per_s"] < 0.4 for r in rows), rows  # no 0.5 s sleeps
    assert result["train_seconds"] < 1.5, result  # the clock excludes the four evaluations (2 s of sleep)


@pytest.mark.slow
def test_torchrun_val_loss_equals_one_process(data_dir, tmp_path):
    """2 processes each evaluate half of the windows (5 = 2 + 3) and get the one-process loss."""
    from asgo.harness.train import evaluate

    evals = ["train.train_steps=2", "train.eval_batches=1", "train.eval_batch_size=5", "train.grad_accumulation=1"]
    summary = torchrun(data_dir, tmp_path, *evals)
    cfg, data, model = eval_setup(data_dir, *DDP, *evals)
    model.load_state_dict(checkpoint_of(tmp_path)["model"])
    one = evaluate(model, data.val, cfg, torch.device("cpu"), contextlib.nullcontext)
    assert abs(summary["final_val_loss"] - one) < 1e-6, (summary["final_val_loss"], one)


# issue 11: resume checks the stored config, metrics cut back, out_dir guarded, stray temporaries
SMALL = ["model.n_layer=1", "train.batch_size=4", "train.train_steps=4", "train.eval_interval=2",
         "train.eval_batches=2", "train.plot=false", "train.checkpoint_interval=2", "train.keep_checkpoints=true"]


@pytest.fixture(scope="module")
def small_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    train(config(data_dir, *SMALL), out)
    return out


@pytest.mark.parametrize("override, keys", [("model.n_embd=32", ["model.n_embd: 64 -> 32"]),
                                            ("dataset=wikitext2", ["dataset.name: 'shakespeare_char' -> 'wikitext2'"])])
def test_resume_refuses_a_changed_model_or_dataset(data_dir, small_run, tmp_path, override, keys):
    with pytest.raises(ConfigError, match="the model or dataset differs") as error:
        train(config(data_dir, *SMALL, override, "train.resume_overrides=true",
                     f"train.resume={small_run / 'checkpoint_000002.pt'}"), tmp_path / "run")
    assert all(key in str(error.value) for key in keys), error.value
    assert not (tmp_path / "run").exists()  # before any work


def test_resume_refuses_optimizer_changes_unless_resume_overrides(data_dir, small_run, tmp_path, caplog):
    changed = ["optimizer.learning_rate=0.001", "optimizer.beta2=0.5"]
    resume = f"train.resume={small_run / 'checkpoint_000002.pt'}"
    with pytest.raises(ConfigError, match="train.resume_overrides=true") as error:
        train(config(data_dir, *SMALL, *changed, resume), tmp_path / "refused")
    assert "optimizer.learning_rate: 0.01 -> 0.001" in str(error.value) and "optimizer.beta2: 0.8 -> 0.5" in str(error.value)
    with pytest.raises(ConfigError, match=re.escape("train.warmup_fraction: 0.1 -> 0.5")):
        train(config(data_dir, *SMALL, "train.warmup_fraction=0.5", resume), tmp_path / "refused")
    # keys that may differ: steps extended, logging, checkpoint cadence, progress
    train(config(data_dir, *SMALL, "train.train_steps=5", "train.log_interval=2", "train.checkpoint_interval=0",
                 "train.progress=true", resume), tmp_path / "extended")

    with caplog.at_level("WARNING", logger="asgo.harness.train"):
        result = train(config(data_dir, *SMALL, *changed, "train.resume_overrides=true", resume), tmp_path / "applied")
    assert result["steps"] == 4 and "optimizer.beta2: 0.8 -> 0.5" in caplog.text
    groups = torch.load(tmp_path / "applied" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    asgo_groups = [g for g in groups if g["algorithm"] == "asgo"]
    assert asgo_groups and all(g["beta2"] == 0.5 and g["initial_lr"] == 0.001 for g in asgo_groups)
    assert all(g["lr"] <= 0.001 for g in asgo_groups)


def test_resume_into_its_run_cuts_metrics_back_to_the_checkpoint(data_dir, tmp_path):
    train(config(data_dir, *SMALL), tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # as if the run had gone on after the checkpoint
        f.write(json.dumps({"step": 3, "split": "train", "loss": 9.0}) + "\n")
    train(config(data_dir, *SMALL, f"train.resume={tmp_path / 'checkpoint_000002.pt'}"), tmp_path)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 2, 4]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in lines] == [(r["step"], r["split"]) for r in rows]
    assert all(r["loss"] != 9.0 for r in lines)


def test_out_dir_holding_another_run_is_refused_unless_overwrite(data_dir, small_run, tmp_path):
    with pytest.raises(ConfigError, match="already holds another run"):
        train(config(data_dir, *SMALL), small_run)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "metrics.csv").write_text("step,split\n")
    with pytest.raises(ConfigError, match=r"already holds another run \(metrics.csv\)"):
        train(config(data_dir, *SMALL), tmp_path / "partial")
    stray = tmp_path / "partial" / ".checkpoint.pt.abc123.tmp"
    stray.write_bytes(b"half")
    result = train(config(data_dir, *SMALL, "train.overwrite=true"), tmp_path / "partial")
    assert result["steps"] == 4 and not stray.exists()
    assert len(read_metrics(tmp_path / "partial" / "metrics.csv")) == 7  # 4 train + 3 val, started afresh
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("checkpoint.pt", "checkpoint_000002.pt", "metrics.csv"):
        assert (tmp_path / "partial" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_cli_hydra_outputs_go_into_train_out_dir(data_dir, tmp_path):
    cmd = [str(ASGO_TRAIN), *BASE, f"train.dataset_path={data_dir}", *SMALL, f"train.out_dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "cli.log").is_file() and (run / "metrics.csv").is_file()
    assert not (tmp_path / "runs").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ONE_THREAD)
    assert again.returncode == 1 and again.stderr.startswith("error: train.out_dir="), again.stderr[-3000:]
