import json
import math

import pytest
import torch

from asgo.harness.checkpoint import load_checkpoint, save_checkpoint
from asgo.harness.metrics import MetricsLogger, plot_losses, read_metrics
from asgo.harness.schedule import warmup_cosine


def test_warmup_then_cosine_to_floor():
    total, warmup, floor = 100, 10, 0.02
    f = [warmup_cosine(s, total, warmup, floor) for s in range(total + 1)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[55] == pytest.approx(floor + (1 - floor) * 0.5)
    assert f[100] == pytest.approx(floor)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    with pytest.raises(FileNotFoundError, match="train.resume"):
        load_checkpoint(tmp_path / "missing.pt")


def test_metrics_csv_jsonl_tensorboard_and_plot(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 6):
        logger.log({"step": step, "split": "train", "loss": 4.0 / step, "lr": 1e-3})
    logger.log({"step": 5, "split": "val", "loss": 1.0})
    logger.close()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert len(rows) == 6 and rows[-1]["perplexity"] == pytest.approx(math.e)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "split": "train", "loss": 4.0, "lr": 1e-3}
    assert any((tmp_path / "tensorboard").iterdir())
    png = plot_losses(tmp_path / "metrics.csv", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    resumed = MetricsLogger(tmp_path, tensorboard=False, resume=True)
    resumed.log({"step": 6, "split": "train", "loss": 0.5})
    resumed.close()
    assert len(read_metrics(tmp_path / "metrics.csv")) == 7


def test_metrics_and_summary_json_are_strict(tmp_path):
    """nan and inf are written as null: the files parse with a parser that refuses NaN/Infinity."""
    from asgo.harness.metrics import strict_json

    def refuse(name):
        raise ValueError(name)

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"step": 1, "split": "train", "loss": float("nan"), "lr": float("inf")})
    logger.log({"step": 1, "split": "val", "loss": float("nan")})
    logger.close()
    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "split": "train", "loss": None, "lr": None},
                    {"step": 1, "split": "val", "loss": None, "perplexity": None}]
    assert math.isnan(read_metrics(tmp_path / "metrics.csv")[0]["loss"])  # the CSV keeps nan
    text = strict_json({"a": [1.0, float("-inf")], "b": {"c": float("nan"), "d": "x"}, "e": 2})
    assert json.loads(text, parse_constant=refuse) == {"a": [1.0, None], "b": {"c": None, "d": "x"}, "e": 2}


def test_truncate_metrics_drops_rows_after_the_resume_step(tmp_path):
    from asgo.harness.metrics import truncate_metrics

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(5):
        logger.log({"step": step, "split": "train", "loss": 1.0})
        logger.log({"step": step, "split": "val", "loss": 2.0})
    logger.close()
    truncate_metrics(tmp_path, 2, revalidate=True)  # the resumed run validates at step 2 again
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [(r["step"], r["split"]) for r in rows] == [(0, "train"), (0, "val"), (1, "train"), (1, "val"), (2, "train")]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in lines] == [(r["step"], r["split"]) for r in rows]
    logger = MetricsLogger(tmp_path, tensorboard=False, resume=True, resume_step=1)
    logger.log({"step": 2, "split": "train", "loss": 3.0})
    logger.close()
    assert [(r["step"], r["split"], r["loss"]) for r in read_metrics(tmp_path / "metrics.csv")][-2:] == [
        (1, "val", 2.0), (2, "train", 3.0)]


def test_checkpoint_file_mode_and_stray_temporaries(tmp_path):
    import os

    from asgo.harness.checkpoint import remove_stray_temporaries

    umask = os.umask(0o022)
    os.umask(umask)
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    strays = [tmp_path / ".checkpoint.pt.x1y2.tmp", tmp_path / ".checkpoint_000002.pt.abc.tmp"]
    for stray in strays:
        stray.write_bytes(b"half")
    keep = tmp_path / ".other.tmp"
    keep.write_bytes(b"not ours")
    assert sorted(remove_stray_temporaries(tmp_path)) == sorted(strays)
    assert not any(s.exists() for s in strays) and keep.exists() and path.exists()
