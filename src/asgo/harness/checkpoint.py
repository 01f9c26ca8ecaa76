"""Checkpoints written atomically and read back safely.

``checkpoint.pt`` (one process, ``train.parallel=ddp``): one file, written by rank 0 to a
temporary name, then renamed. ``checkpoint_dcp/`` (``train.parallel=fsdp2``): a
``torch.distributed.checkpoint`` directory in which every rank writes its shards of the model and
optimizer, plus ``extra.pt`` (schedule, step, RNG of every rank, config) from rank 0; written as
``.checkpoint_dcp.tmp/`` and renamed by rank 0 once complete. It loads at any world size, also in
one process without a process group.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

EXTRA = "extra.pt"  # the non-tensor part of a DCP checkpoint directory


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
                                f"asgo-train, e.g. <run dir>/checkpoint.pt, or a <run dir>/checkpoint_dcp "
                                f"directory)")
    return torch.load(path, map_location=map_location, weights_only=True)


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / ".metadata").is_file()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextmanager
def _one_process_intended():
    """Without a process group DCP warns that it assumes one process: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_dcp_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        extra: dict) -> Path:
    """Every rank calls it (collectives): the model's and optimizer's state (sharded DTensors, or
    plain tensors in one process) with ``torch.distributed.checkpoint`` into ``path``, a directory,
    and ``extra`` (written by rank 0) into ``path/extra.pt``.

    The checkpoint is written to ``.<name>.tmp`` beside ``path``; after every rank has finished,
    rank 0 moves the previous one to ``.<name>.old``, renames the new one to ``path`` and deletes
    the old one, so ``path`` always holds a complete checkpoint (after a crash between the two
    renames, the next save puts ``.<name>.old`` back first).
    """
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    is_main = not _distributed() or dist.get_rank() == 0
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        if old.is_dir() and not path.exists():  # an earlier save stopped between its renames
            old.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)  # an earlier save that did not finish
    _barrier()
    # under owner-compute get_optimizer_state_dict gathers the matrices' state: every rank calls it
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    with _one_process_intended():
        save(state, checkpoint_id=str(tmp))  # returns on every rank once all have written
    if is_main:
        save_checkpoint(tmp / EXTRA, extra)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load_dcp_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict:
    """Load a :func:`save_dcp_checkpoint` directory into ``model`` and ``optimizer`` (every rank;
    sharded or not, at any world size, in one process without a process group) and return its
    ``extra.pt``."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not is_dcp_checkpoint(path):
        raise FileNotFoundError(f"no torch.distributed.checkpoint directory at {path} (no .metadata; "
                                f"train.resume expects <run dir>/checkpoint_dcp or <run dir>/checkpoint.pt)")
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    with _one_process_intended():
        load(state, checkpoint_id=str(path))  # each rank reads its shards (everything without sharding)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return torch.load(path / EXTRA, map_location="cpu", weights_only=True)


def read_dcp_checkpoint(path: str | os.PathLike) -> dict:
    """A :func:`save_dcp_checkpoint` directory as plain, full tensors in this process, without a
    model: ``{"model": state dict, "optim": optimizer state (by parameter name), **extra}``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    if not is_dcp_checkpoint(path):
        raise FileNotFoundError(f"no torch.distributed.checkpoint directory at {path}")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "checkpoint.pt")
        state = torch.load(Path(tmp) / "checkpoint.pt", map_location="cpu", weights_only=True)
    return {**state, **torch.load(path / EXTRA, map_location="cpu", weights_only=True)}
