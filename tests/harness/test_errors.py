"""Clear errors for bad inputs (issue 11, item 7) and the seed command's settings (item 8)."""

from __future__ import annotations

import errno
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from asgo.harness.checkpoint import load_checkpoint, save_checkpoint
from asgo.harness.config import CONFIG_DIR
from asgo.harness.data import DatasetError, TokenDataset, load_data, prepare_shakespeare_char, prepare_wikitext2
from asgo.harness.data import tokens as tokens_module
from asgo.harness.data.tokens import write_meta, write_tokens

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASGO_DATA_DIR", str(tmp_path / "default-cache"))


def _token_dir(directory: Path, tokens, vocab_size: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    n = write_tokens(directory / "train.bin", [np.asarray(tokens)])
    write_meta(directory, {"vocab_size": vocab_size, "splits": {"train": n}})
    return directory


# ------------------------------------------------------------------------------------- source text

@pytest.mark.parametrize("content, what", [
    (b"To be, or not to be\n\xff\xfe\x80 binary \x81\n", "not UTF-8 text"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00", "binary file"),
])
def test_non_text_input_txt_is_a_dataset_error(tmp_path, content, what):
    source = tmp_path / "shakespeare_char" / "input.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        load_data({"name": "shakespeare_char"}, tmp_path)
    message = str(info.value)
    assert str(source) in message and what in message
    assert "expected plain UTF-8 text" in message and "delete it" in message
    assert not isinstance(info.value.__cause__, KeyboardInterrupt)


def test_utf8_input_with_windows_newlines_still_prepares_as_before(tmp_path):
    source = tmp_path / "shakespeare_char" / "input.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes("Sé, to be\r\nor not\r\n".encode() * 20)
    data = load_data({"name": "shakespeare_char"}, tmp_path)
    assert "\r" not in data.meta["itos"] and "é" in data.meta["itos"]  # as Path.read_text() read it


def test_non_utf8_wikitext_file_is_a_dataset_error(tmp_path):
    source = tmp_path / "copy"
    source.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        (source / name).write_text(" = A = \nsome text\n", encoding="utf-8")
    (source / "valid.txt").write_bytes(b" = A = \n\xc3\x28 latin-1 \xe9\n")
    with pytest.raises(DatasetError, match=re.escape(str(source / "valid.txt")) + ".*not UTF-8.*expected WikiText-2"):
        prepare_wikitext2(tmp_path, "byte", source)


# ------------------------------------------------------------------------------ corrupt token files

@pytest.mark.parametrize("defect", ["odd_size", "truncated", "empty"])
def test_corrupt_bin_names_the_file_and_says_to_delete_it(tmp_path, defect):
    directory = _token_dir(tmp_path / "openwebtext", np.arange(100), vocab_size=100)
    path = directory / "train.bin"
    data = path.read_bytes()
    path.write_bytes({"odd_size": data[:-1], "truncated": data[:100], "empty": b""}[defect])
    with pytest.raises(DatasetError) as info:
        TokenDataset(directory, "train", data_dir=tmp_path)
    message = str(info.value)
    assert str(path) in message and f"delete {path}" in message and "re-prepare" in message
    assert "python -m asgo.harness.data.prepare openwebtext" in message


def test_bin_shorter_than_a_window_says_to_delete_it(tmp_path):
    directory = _token_dir(tmp_path / "openwebtext", np.arange(10), vocab_size=10)
    ds = TokenDataset(directory, "train", data_dir=tmp_path)
    with pytest.raises(DatasetError) as info:
        ds.get_batch(2, 256)
    message = str(info.value)
    assert str(directory / "train.bin") in message and "fewer than block_size + 1 = 257" in message
    assert f"delete {directory / 'train.bin'}" in message and "re-prepare" in message


def test_deleting_a_truncated_shakespeare_bin_re_prepares_it(tmp_path):
    out = prepare_shakespeare_char(tmp_path)
    (out / "train.bin").write_bytes((out / "train.bin").read_bytes()[:1001])
    with pytest.raises(DatasetError, match="delete"):
        load_data({"name": "shakespeare_char"}, tmp_path)
    (out / "train.bin").unlink()  # what the message says to do
    assert len(load_data({"name": "shakespeare_char"}, tmp_path).train) == 1_003_854


# -------------------------------------------------------------------------------------- full disk

def _disk_full(f, data):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_preparing_names_the_directory_and_the_space_needed(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens_module, "_write", _disk_full)
    with pytest.raises(DatasetError) as info:
        prepare_shakespeare_char(tmp_path)
    message = str(info.value)
    directory = tmp_path / "shakespeare_char"
    assert f"no space left on the device holding {directory}" in message
    assert "needs 1.9 MiB (2007708 bytes)" in message  # 1,003,854 train tokens of 2 bytes
    assert "free" in message and "unexpected pos" not in message
    assert not list(directory.glob("*.bin")) and not list(directory.glob(".*.tmp-*"))  # nothing half-written


def test_disk_full_without_a_known_total_says_at_least(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens_module, "_write", _disk_full)
    with pytest.raises(DatasetError, match=re.escape(f"holding {tmp_path}") + r".*needs at least 200 bytes"):
        write_tokens(tmp_path / "train.bin", iter([np.arange(100)]))


def test_disk_full_writing_meta_json(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DatasetError, match=re.escape(f"holding {tmp_path}") + r".*meta.json needs"):
        write_meta(tmp_path, {"vocab_size": 3})


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    def broken(f, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(tokens_module, "_write", broken)
    with pytest.raises(OSError) as info:
        write_tokens(tmp_path / "train.bin", [np.arange(3)])
    assert info.value.errno == errno.EIO and not isinstance(info.value, DatasetError)


# ------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("content", ["random", "truncated", "text", "empty", "tensor"])
def test_a_file_that_is_not_a_checkpoint_names_the_path(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif content == "truncated":
        save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "step": 3})
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "text":
        path.write_text("hello\n")
    elif content == "empty":
        path.write_bytes(b"")
    else:
        torch.save(torch.ones(3), path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "checkpoint" in message and "written by asgo-train" in message
    assert "weights_only" not in message  # not torch's advice to load untrusted bytes unsafely


def test_a_good_checkpoint_still_loads(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"model": {"w": torch.ones(2)}, "step": 7})
    assert load_checkpoint(path)["step"] == 7


# ------------------------------------------------------------------------------ seed fidelity (8)

def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _readme_command(dataset: str) -> tuple[list[str], int]:
    """The overrides and process count of the README's torchrun command for ``dataset``."""
    text = README.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("torchrun") and f"dataset={dataset}" in line:
            words = shlex.split(line.split("#")[0])
            procs = int(next(w for w in words if w.startswith("--nproc_per_node=")).split("=")[1])
            return [w for w in words if "=" in w and not w.startswith("-")], procs
    raise AssertionError(f"no torchrun command with dataset={dataset} in the README")


def test_gpt2_config_uses_the_authors_block_size():
    cfg = _compose(["model=gpt2"])
    assert cfg.model.block_size == 256
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (12, 12, 768)


def test_documented_seed_command_has_the_authors_settings():
    overrides, procs = _readme_command("openwebtext")
    seed = ["dataset=openwebtext", "model=gpt2", "optimizer=asgo", "train.batch_size=32", "train.train_steps=2400"]
    assert set(seed) <= set(overrides)
    cfg = _compose(overrides)
    t = cfg.train
    assert procs == 4 and cfg.model.block_size == 256 and t.batch_size == 32
    assert (t.grad_accumulation, t.eval_interval, t.eval_batches) == (8, 200, 100)
    assert t.warmup_fraction > 0 and 0 < t.min_lr_ratio < 1  # cosine schedule with warmup
    tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accumulation * procs
    assert tokens_per_step == 262_144
    assert "262,144 tokens per step" in README.read_text()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 3380544 vs 3380436")])
def test_a_full_disk_while_checkpointing_names_the_path_and_keeps_the_old_one(tmp_path, monkeypatch, failure):
    from asgo.harness.checkpoint import CheckpointError, save_checkpoint

    path = save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"no space left .*checkpoint\.pt.*previous checkpoint there is kept"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_resume_with_another_optimizer_is_refused_even_with_overrides():
    from omegaconf import OmegaConf

    from asgo.harness.train import resume_config_changes

    old = OmegaConf.create({"optimizer": {"name": "asgo", "learning_rate": 0.01}})
    new = OmegaConf.create({"optimizer": {"name": "muon", "learning_rate": 0.01}})
    refused, overridable = resume_config_changes(OmegaConf.to_yaml(old), new)
    assert refused == {"optimizer.name": ("asgo", "muon")} and overridable == {}
