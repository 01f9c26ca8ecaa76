"""Checkpoints written atomically and read back safely.

``checkpoint.pt`` (one process, ``train.parallel=ddp``): one file, written by rank 0 to a
temporary name, then renamed. ``checkpoint_dcp/`` (``train.parallel=fsdp2``): a
``torch.distributed.checkpoint`` directory in which every rank writes its shards of the model and
optimizer, plus ``extra.pt`` (schedule, step, RNG of every rank, config) from rank 0; written as
``.checkpoint_dcp.tmp/`` and renamed by rank 0 once complete. It loads at any world size, also in
one process without a process group.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

EXTRA = "extra.pt"  # the non-tensor part of a DCP checkpoint directory


class CheckpointError(ValueError):
    """A file given as a checkpoint that cannot be one; ``asgo-train`` prints it in one line."""


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` to ``path`` so that a crash never leaves a half-written file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as other outputs (0644 under umask 022), not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(e):
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(f"no space left on the device to write {path} ({free / 2**20:.1f} MiB "
                                  f"free); any previous checkpoint there is kept") from e
        raise
    return path


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` is a full disk: ENOSPC, or torch.save's zip writer failing on a short write."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    return isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "No space left" in str(e))


def _torch_load(path: Path, what: str, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)``; a file that is not one (random bytes, truncated, a
    text file) or holds no dict is a ``ValueError`` naming ``path`` and what was expected."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, KeyError, ... for a bad file
        size = path.stat().st_size if path.is_file() else 0
        # torch's weights_only message advises weights_only=False (unsafe for a file of unknown origin):
        # keep only its diagnosis (e.g. 'Unsupported operand 11', 'Unsupported global: ...')
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if lines and lines[0].startswith("Weights only load failed"):
            lines = [line for line in lines if line.startswith("Unsupported")] or ["not a torch.save pickle"]
        detail = lines[0].split(". ")[0][:200] if lines else "no detail"
        raise CheckpointError(f"{path} ({size} bytes) is not a readable checkpoint: expected {what}; the file is "
                         f"corrupt, truncated or of another kind ({type(e).__name__}: {detail})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint: expected {what}, found a {type(state).__name__}")
    return state


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stray_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted :func:`save_checkpoint` left in ``out_dir``
    (``.checkpoint*.pt.*.tmp``); call it at the start of a run, before anything writes there."""
    removed = []
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        for stray in out_dir.glob(".checkpoint*.pt.*.tmp"):
            if stray.is_file():
                stray.unlink(missing_ok=True)
                removed.append(stray)
    return removed


def read_stored_config(path: str | os.PathLike) -> str | None:
    """The config (YAML) a checkpoint.pt or checkpoint_dcp directory was written with, or None."""
    path = Path(path)
    if path.is_dir():
        if not (path / EXTRA).is_file():
            return None  # not a checkpoint_dcp directory: load_dcp_checkpoint says so
        return torch.load(path / EXTRA, map_location="cpu", weights_only=True).get("config")
    return load_checkpoint(path).get("config")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (train.resume expects a file written by "
                                f"asgo-train, e.g. <run dir>/checkpoint.pt, or a <run dir>/checkpoint_dcp "
                                f"directory)")
    return _torch_load(path, "a checkpoint.pt written by asgo-train (torch.save of a dict)", map_location)


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
    return _torch_load(path / EXTRA, f"the {EXTRA} of a checkpoint_dcp directory written by asgo-train")


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
    return {**state, **_torch_load(path / EXTRA, f"the {EXTRA} of a checkpoint_dcp directory written by asgo-train")}
