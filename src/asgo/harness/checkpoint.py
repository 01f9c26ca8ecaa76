"""Checkpoints written atomically (temporary file, then rename) and read back safely."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` to ``path`` so that a crash never leaves a half-written file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (train.resume expects a file written by "
                                f"asgo-train, e.g. <run dir>/checkpoint.pt)")
    return torch.load(path, map_location=map_location, weights_only=True)
