"""The training loop: one function, read top to bottom.

    data -> model [-> fully_shard under train.parallel=fsdp2]
    -> optimizer (asgo.build_optimizer; under torchrun owner-compute) -> schedule
    -> [resume: checkpoint.pt or checkpoint_dcp/] -> loop:
        every eval_interval: validation loss and perplexity
        grad_accumulation micro-batches -> clip -> [loss and gradient norm finite?] -> step -> schedule
        every log_interval: train loss, lr, tokens/s, the optimizer's fault counters;
        every checkpoint_interval steps or checkpoint_minutes: checkpoint
        SIGINT (Ctrl-C), SIGTERM, SIGUSR1: checkpoint at the end of the current step, then
        Interrupted (a KeyboardInterrupt; asgo-train exits 128 + the signal: 130, 143, 138)
    -> final evaluation, checkpoint, loss plot

Under torchrun, train.parallel=ddp replicates the model (DistributedDataParallel; the matrices'
optimizer state and updates split by owner-compute) and writes checkpoint.pt from rank 0;
train.parallel=fsdp2 shards weights, gradients and optimizer state (fully_shard) and every rank
writes its shards into checkpoint_dcp/ (torch.distributed.checkpoint).

Divergence: a non-finite training loss or gradient norm raises Diverged (asgo-train exits 3,
EXIT_DIVERGED) naming the step and the last good checkpoint; train.on_nonfinite=skip skips that
optimizer step instead (counted: summary.json's nonfinite_skipped_steps). No checkpoint with
non-finite weights or optimizer state is ever written, so the last good one stays in place.
metrics.jsonl and summary.json are strict JSON (non-finite numbers as null).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import threading
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor

from asgo.harness import distributed
from asgo.harness.checkpoint import (load_checkpoint, load_dcp_checkpoint, read_stored_config, remove_stray_temporaries,
                                     save_checkpoint, save_dcp_checkpoint)
from asgo.harness.config import (ConfigError, check_fsdp2_optimizer, check_optimizer_config, optimizer_from_config,
                                 parallel_settings, supports_owner_compute)
from asgo.harness.data import IGNORE_INDEX, eval_windows, load_data
from asgo.harness.metrics import MetricsLogger, plot_losses, strict_json
from asgo.harness.models import build_model, load_gpt2_pretrained
from asgo.harness.schedule import warmup_cosine
from asgo.harness.schema import validate_config

log = logging.getLogger(__name__)


def evaluate(model, dataset, cfg, device, autocast, dist_info: distributed.Distributed | None = None) -> float:
    """Mean loss per target token over a fixed set of validation windows.

    The windows (:func:`~asgo.harness.data.eval_windows`): ``eval_batches * eval_batch_size`` at
    offsets from a constant seed (``EVAL_SEED``, independent of ``train.seed`` and of the training
    batch size), or with ``train.eval_full`` the whole split in consecutive non-overlapping windows;
    the same set at every call. Under torchrun each rank evaluates a contiguous share of them in
    batches of ``eval_batch_size`` (every rank runs the same number of forwards: fsdp2's forward is a
    collective) and the loss sums and target-token counts are summed over ranks, so N ranks get the
    one-process value (within float round-off) doing 1/N of the work.
    """
    t = cfg.train
    windows = eval_windows(len(dataset), cfg.model.block_size,
                           None if t.eval_full else t.eval_batches * t.eval_batch_size)
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info is not None and dist_info.enabled else (0, 1)
    mine = windows.shard(rank, world)
    batches = math.ceil(math.ceil(len(windows) / world) / t.eval_batch_size)  # the largest share's
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, target tokens
    model.eval()
    with torch.no_grad():
        for b in range(batches):
            start = mine.start + b * t.eval_batch_size
            index = torch.arange(start, min(start + t.eval_batch_size, mine.stop))
            real = len(index) > 0
            x, y = dataset.eval_batch(windows, index if real else torch.zeros(1, dtype=torch.int64), device)
            with autocast():
                _, loss = model(x, y)  # a rank out of windows still runs the forward (a collective under fsdp2)
            if real:
                count = (y != IGNORE_INDEX).sum().double()
                totals += torch.stack([torch.where(count > 0, loss.double() * count, 0.0), count])
    model.train()
    if world > 1:
        torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
    total, count = totals.tolist()
    return total / count if count else float("nan")


EXIT_DIVERGED = 3  # asgo-train's exit status when the loss or gradient norm became non-finite
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # asgo-train exits 128 + the signal's number:
# 130 (SIGINT, Ctrl-C), 143 (SIGTERM: preemption, e.g. Slurm or Kubernetes), 138 (SIGUSR1: Slurm's --signal)


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal at a step boundary, after writing a checkpoint; ``exit_code`` is
    128 + the signal's number (the shell's convention)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


class Diverged(RuntimeError):
    """The training loss, gradient norm or weights became non-finite; nothing non-finite was
    checkpointed. ``exit_code``: :data:`EXIT_DIVERGED`."""

    exit_code = EXIT_DIVERGED


class StopRequest:
    """Turns the first SIGINT (Ctrl-C), SIGTERM or SIGUSR1 into a request to stop at the next step boundary.

    The loop checks :meth:`requested` after each step, so the checkpoint it then writes holds a
    consistent state; a second such signal acts at once (the previous handlers are back).
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        self._restore()

    def _restore(self):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        self._restore()

    def requested(self, dist_info: distributed.Distributed, device: torch.device) -> bool:
        """Whether any rank received a stop signal (all ranks agree, so they stop at the same step)."""
        return distributed.any_rank(self.signum is not None, dist_info, device)


def _validate_train_keys(t) -> tuple[str, float]:
    """train.on_nonfinite and train.checkpoint_minutes (keys this module adds), checked up front."""
    on_nonfinite = t.get("on_nonfinite", "stop")
    if on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite: unknown value {on_nonfinite!r} (expected stop or skip)")
    minutes = t.get("checkpoint_minutes", 0)
    minutes = 0 if minutes is None else minutes
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not math.isfinite(minutes) or minutes < 0:
        raise ConfigError(f"train.checkpoint_minutes: expected a number >= 0 (0 or null: off), got {minutes!r}")
    return on_nonfinite, float(minutes)


def _resume_command(path: Path) -> str:
    """The command line that continues this run: asgo-train with this run's overrides and train.resume."""
    overrides = ["..."]
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("train.resume=", "+train.resume="))]
    except Exception:  # not under Hydra's command line (train() called directly)
        pass
    return " ".join(["asgo-train", *overrides, f"train.resume={path}"])


# Resume (train.resume) compares the checkpoint's config with this run's: a changed model.* or dataset.* key, or
# another optimizer.name, is refused; these keys may differ freely (where and how the run logs, evaluates, checkpoints and runs, and how
# long it trains); any other change (optimizer.*, the lr schedule's train.warmup_fraction/min_lr_ratio, batch,
# clipping, seed, autocast) is refused too unless train.resume_overrides=true, which applies the new values to
# the loaded optimizer param groups and schedule and logs them.
RESUME_MAY_DIFFER = frozenset({
    "train.resume", "train.resume_overrides", "train.overwrite", "train.train_steps", "train.out_dir",
    "train.dataset_path", "train.init_from", "train.progress", "train.log_interval", "train.eval_interval",
    "train.eval_batches", "train.eval_batch_size", "train.eval_full", "train.tensorboard", "train.wandb", "train.wandb_project", "train.wandb_mode",
    "train.plot", "train.device", "train.parallel", "train.owner_compute", "train.checkpoint_interval",
    "train.checkpoint_minutes", "train.keep_checkpoints", "train.on_nonfinite"})
RESUME_REFUSED = ("model", "dataset", "optimizer.name")  # whose change a resume always refuses
RUN_OUTPUTS = ("checkpoint.pt", "checkpoint_dcp", "metrics.csv", "metrics.jsonl", "summary.json")
_ABSENT = "<absent>"


def _flat_config(cfg) -> dict:
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation only Hydra's command line resolves
        tree = OmegaConf.to_container(cfg, resolve=False)
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node

    walk(tree, "")
    return flat


def resume_config_changes(stored_yaml: str, cfg: DictConfig) -> tuple[dict, dict]:
    """The keys whose value differs between a checkpoint's config (YAML) and ``cfg``, less
    :data:`RESUME_MAY_DIFFER`: ``(refused, overridable)``, each ``{key: (stored, new)}``."""
    old, new = _flat_config(OmegaConf.create(stored_yaml)), _flat_config(cfg)
    refused, overridable = {}, {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a == b or key in RESUME_MAY_DIFFER:
            continue
        always = key.split(".")[0] in RESUME_REFUSED or key in RESUME_REFUSED
        (refused if always else overridable)[key] = (a, b)
    return refused, overridable


def _listing(changes: dict) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def _check_resume_config(t, stored_yaml: str | None, cfg: DictConfig) -> dict:
    """ConfigError for a resume whose model/dataset changed, or whose optimizer/training keys changed
    without train.resume_overrides=true; the overridable changes to apply."""
    if stored_yaml is None:
        return {}
    refused, overridable = resume_config_changes(stored_yaml, cfg)
    if refused:
        raise ConfigError(f"train.resume={t.resume}: the model or dataset differs from the checkpoint's "
                          f"({_listing(refused)}); resume with the checkpoint's model and dataset")
    if overridable and not t.get("resume_overrides", False):
        raise ConfigError(f"train.resume={t.resume}: optimizer or training settings differ from the checkpoint's "
                          f"({_listing(overridable)}); resume with the checkpoint's values, or set "
                          f"train.resume_overrides=true to apply the new ones to the loaded optimizer and schedule")
    return overridable


def _check_out_dir(t, out_dir: Path) -> None:
    """ConfigError when ``out_dir`` already holds another run (a checkpoint or metrics), unless this
    run resumes from a checkpoint there or train.overwrite=true."""
    if t.get("overwrite", False) or not out_dir.is_dir():
        return
    found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    found += sorted(p.name for p in out_dir.glob("checkpoint_*"))[:1]
    if not found:
        return
    if t.resume and Path(t.resume).resolve().parent == out_dir.resolve():
        return
    raise ConfigError(f"train.out_dir={out_dir} already holds another run ({', '.join(found)}): continue it with "
                      f"train.resume={out_dir / 'checkpoint.pt'} (or checkpoint_dcp), choose another "
                      f"train.out_dir, or set train.overwrite=true")


def _differs(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return not (torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b))
    return bool(a != b)


def _apply_resume_overrides(optimizer, scheduler, fresh_groups: list[dict], changes: dict, is_main: bool) -> None:
    """train.resume_overrides=true: this run's optimizer hyperparameters (``fresh_groups``, the param
    groups as built from this config) replace the loaded ones, the schedule restarts from the new
    peak lr (``initial_lr``) and schedule keys at the loaded step; logged."""
    applied = []
    for i, (group, fresh) in enumerate(zip(optimizer.param_groups, fresh_groups)):
        for k, v in fresh.items():
            if k == "lr":  # from initial_lr and the schedule, below
                continue
            if k not in group or _differs(group[k], v):
                applied.append(f"param_groups[{i}].{k}: {group.get(k)!r} -> {v!r}")
                group[k] = v
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for i, (group, base, factor) in enumerate(zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas)):
        lr = base * factor(scheduler.last_epoch)
        if not torch.is_tensor(group["lr"]) and _differs(group["lr"], lr):
            applied.append(f"param_groups[{i}].lr: {group['lr']!r} -> {lr!r}")
            group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if is_main:
        log.warning("train.resume_overrides=true: resuming with changed settings %s; applied to the loaded "
                    "optimizer and schedule: %s", _listing(changes), "; ".join(applied) or "nothing to change")


def _nonfinite_tensors(tensors) -> bool:
    """Whether any floating-point tensor (this rank's shard of a DTensor) holds nan or inf (local)."""
    for v in tensors:
        if torch.is_tensor(v) and v.is_floating_point():
            v = _local(v)
            if v.numel() and not torch.isfinite(v).all():
                return True
    return False


def guarded_step(optimizer_step, loss: float, grad_norm: float, on_nonfinite: str, step: int,
                 diverged) -> str | None:
    """``optimizer_step()`` (``optimizer.step``, or it compiled) when the step's loss and gradient
    norm are finite; otherwise raise ``diverged(message)`` (``on_nonfinite='stop'``) or skip the
    update and return what went wrong."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer_step()
        return None
    what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
    if on_nonfinite == "stop":
        raise diverged(f"{what} at step {step}")
    return what


def train(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Train ``cfg.model`` on ``cfg.dataset`` with ``cfg.optimizer``; return the final metrics."""
    t = cfg.train
    parallel, owner_compute = parallel_settings(t)  # config errors before any work
    validate_config(cfg)  # train/model/dataset typed keys
    check_optimizer_config(cfg.optimizer, t.train_steps)
    on_nonfinite, checkpoint_minutes = _validate_train_keys(t)
    fsdp2 = parallel == "fsdp2"  # checkpoints in checkpoint_dcp/, in one process too
    if fsdp2:
        check_fsdp2_optimizer(cfg.optimizer)
        if t.resume and distributed.launched_world_size() > 1 and not Path(t.resume).is_dir():
            raise ConfigError(f"train.resume={t.resume}: train.parallel=fsdp2 under torchrun resumes a "
                              "checkpoint_dcp directory; resume a checkpoint.pt with train.parallel=ddp")
    if t.get("compile_optimizer") and (fsdp2 or distributed.launched_world_size() > 1):
        raise ConfigError("train.compile_optimizer=true runs in one process with train.parallel=ddp; the "
                          "step's collectives (torchrun, fsdp2's sharded parameters) are not compiled: set it to false")
    _check_out_dir(t, Path(out_dir))
    resume_ckpt, resume_overrides = None, {}
    if t.resume:  # the stored config against this one, before any work
        if Path(t.resume).is_dir():
            stored_config = read_stored_config(t.resume)  # extra.pt only
        else:
            resume_ckpt = load_checkpoint(t.resume)
            stored_config = resume_ckpt.get("config")
        resume_overrides = _check_resume_config(t, stored_config, cfg)
    dist_info, device = distributed.setup(t.device)
    sharded = fsdp2 and dist_info.enabled
    if sharded:  # FSDP2: each matrix's owner gathers its gradient and computes; AdamW steps its shards
        owner_compute = supports_owner_compute(cfg.optimizer)
    else:  # owner-compute (DDP): each matrix's state and update on one rank, the updates exchanged in step()
        owner_compute = owner_compute and dist_info.enabled
        if owner_compute and not supports_owner_compute(cfg.optimizer):
            owner_compute = False
            if dist_info.is_main:
                log.info("owner-compute off: optimizer %s (or a route of optimizer.routes) cannot take a "
                         "process_group; every rank computes every update", cfg.optimizer.name)
    out_dir = Path(out_dir)
    if dist_info.is_main:  # what an interrupted save_checkpoint left behind
        for stray in remove_stray_temporaries(out_dir):
            log.info("removed a stray temporary checkpoint file %s", stray)
    torch.manual_seed(t.seed)  # same initial weights on every rank
    use_bf16 = device.type == "cuda" if t.autocast == "auto" else bool(t.autocast)
    autocast = (partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
                if use_bf16 else contextlib.nullcontext)

    # data and model
    with distributed.main_process_first(dist_info):
        data = load_data(cfg.dataset, t.dataset_path, seed=t.seed)
    model_overrides = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "name" and v is not None}
    if t.init_from and Path(t.init_from).is_dir():  # a Hugging Face GPT-2: its architecture, our block/dropout
        model = load_gpt2_pretrained(t.init_from, **{k: v for k, v in model_overrides.items()
                                                      if k in ("block_size", "dropout")})
        model.grow_vocab(data.vocab_size)  # FIM's sentinel tokens
    else:
        model = build_model(cfg.model.name, vocab_size=data.vocab_size, **model_overrides)
        if t.init_from:
            model.load_state_dict(load_checkpoint(t.init_from)["model"])
    model.to(device)
    if sharded:  # row-sharded DTensors: build_optimizer detects them and uses the mesh's group
        distributed.shard_model(model, device)
    optimizer = optimizer_from_config(
        model, cfg.optimizer, t.train_steps,
        process_group=torch.distributed.group.WORLD if owner_compute and not sharded else None)
    warmup = max(1, int(t.warmup_fraction * t.train_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, total_steps=t.train_steps, warmup_steps=warmup,
                           min_ratio=t.min_lr_ratio))
    # compiled after the scheduler wraps optimizer.step; dynamic: the same graphs before and after a resume
    optimizer_step = torch.compile(optimizer.step, dynamic=True) if t.get("compile_optimizer") else optimizer.step
    train_model = model  # FSDP2: the sharded model itself
    if dist_info.enabled and not sharded:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def leave_process_group() -> None:
        """DDP's reducer holds the process group too; were the last reference dropped there (at
        garbage collection, the GIL held), gloo's destructor could wait forever on a worker thread
        that needs the GIL (pytorch/pytorch#56297). Drop DDP first, then leave the group."""
        nonlocal train_model
        train_model = None
        gc.collect()
        distributed.teardown(dist_info)

    generator = torch.Generator().manual_seed(data.sampler_seed(t.seed, dist_info.rank))
    torch.manual_seed(t.seed + dist_info.rank)  # dropout masks differ per rank

    # resume: weights, optimizer, schedule, data position and RNG
    step = 0
    if t.resume:
        fresh_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        if Path(t.resume).is_dir():  # checkpoint_dcp/: any world size, sharded or not
            ckpt = load_dcp_checkpoint(t.resume, model, optimizer)
        else:
            ckpt, resume_ckpt = resume_ckpt, None
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        if resume_overrides:  # train.resume_overrides=true (else refused above)
            _apply_resume_overrides(optimizer, scheduler, fresh_groups, resume_overrides, dist_info.is_main)
        saved_world_size = len(ckpt["rng"])  # one entry per rank of the run that saved it
        if saved_world_size != dist_info.world_size and dist_info.is_main:
            log.warning("resuming a checkpoint of a %d-process run in %d processes: weights, optimizer and "
                        "schedule continue exactly, but the data order (and the global batch, "
                        "train.batch_size per process) differs from the saving run; ranks below %d continue "
                        "their data/RNG streams, the others start fresh ones", saved_world_size,
                        dist_info.world_size, min(saved_world_size, dist_info.world_size))
        if dist_info.rank < saved_world_size:
            rng = ckpt["rng"][dist_info.rank]
            generator.set_state(rng["data"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], device)
        else:  # a rank the saving run did not have: fresh streams, distinct from every rank's and step's
            fresh = data.sampler_seed(t.seed + step, dist_info.rank)
            generator.manual_seed(fresh)
            torch.manual_seed(fresh)

    def checkpoint_path(at_step: int | None = None) -> Path:
        """checkpoint.pt (ddp) or checkpoint_dcp (fsdp2); with ``at_step`` the kept copy of that step."""
        suffix = f"_{at_step:06d}" if at_step is not None else ""
        return out_dir / (f"checkpoint_dcp{suffix}" if fsdp2 else f"checkpoint{suffix}.pt")

    last_good = {"path": str(t.resume) if t.resume else None}  # the latest checkpoint known to be finite

    def diverged(what: str) -> Diverged:
        where = (f"the last good checkpoint is {last_good['path']}" if last_good["path"] else
                 "no checkpoint was written before it (see train.checkpoint_interval, train.checkpoint_minutes)")
        return Diverged(f"{what}; {where}")

    def checkpoint(path: Path) -> None:
        """Every rank calls it (collectives); rank 0 writes (fsdp2: every rank its shards). Refuses
        (:class:`Diverged`) to write non-finite weights or optimizer state: the last good one stays."""
        state = (v for s in optimizer.state.values() for v in s.values())
        if distributed.any_rank(_nonfinite_tensors(model.parameters()) or _nonfinite_tensors(state),
                                dist_info, device):
            raise diverged(f"weights or optimizer state became non-finite (found at step {step}, before "
                           f"writing {path})")
        clock["checkpoint"] = time.monotonic()
        rng = {"data": generator.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        rng_per_rank = [rng]
        if dist_info.enabled:
            rng_per_rank = [None] * dist_info.world_size
            torch.distributed.all_gather_object(rng_per_rank, rng)
        extra = {"scheduler": scheduler.state_dict(), "step": step, "rng": rng_per_rank,
                 "config": OmegaConf.to_yaml(cfg)}
        if fsdp2:
            save_dcp_checkpoint(path, model, optimizer, extra)
        else:
            # under owner-compute a collective gathering every rank's matrix state: the whole
            # optimizer's, which loads at any world size
            optimizer_state = optimizer.state_dict()
            if dist_info.is_main:
                save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer_state, **extra})
        if path == checkpoint_path():
            last_good["path"] = str(path)

    logger = None
    if dist_info.is_main:
        wandb = {"project": t.wandb_project, "dir": str(out_dir), "mode": t.wandb_mode,
                 "config": OmegaConf.to_container(cfg, resolve=True)} if t.wandb else None
        # resume: rows after the checkpoint's step dropped (and its val rows when validated there again)
        revalidate = step >= t.train_steps or bool(t.eval_interval and step % t.eval_interval == 0)
        logger = MetricsLogger(out_dir, tensorboard=t.tensorboard, wandb_config=wandb, resume=bool(t.resume),
                               resume_step=step if t.resume else None, revalidate=revalidate)
        report = optimizer.report()
        (out_dir / "routing.txt").write_text(report + "\n")
        totals = [line for line in report.splitlines() if line.startswith("total")]
        log.info("optimizer %s, parameters by algorithm (per tensor in %s):\n%s",
                 cfg.optimizer.name, out_dir / "routing.txt", "\n".join(totals))
    tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accumulation * dist_info.world_size
    progress = None
    if dist_info.is_main and t.progress:
        from tqdm import tqdm

        progress = tqdm(total=t.train_steps, initial=step, desc="train", dynamic_ncols=True)

    postfix = {}
    clock = {"start": time.perf_counter(), "eval": 0.0,  # training time excludes evaluation
             "checkpoint": time.monotonic()}  # when the last checkpoint was written (train.checkpoint_minutes)
    skipped_nonfinite = 0  # train.on_nonfinite=skip: optimizer steps skipped for a non-finite loss or gradient
    # the optimizer's fault counters (a collective under a process group: every rank calls it)
    diagnostics = optimizer.diagnostics if hasattr(optimizer, "diagnostics") else dict
    counters_seen, counters_warned = dict(diagnostics()), set()

    def train_seconds() -> float:
        return time.perf_counter() - clock["start"] - clock["eval"]

    def eval_and_log() -> float:
        start = time.perf_counter()
        loss = evaluate(model, data.val, cfg, device, autocast, dist_info)
        clock["eval"] += time.perf_counter() - start
        if logger:
            logger.log({"step": step, "split": "val", "loss": loss, "perplexity": math.exp(min(loss, 50)),
                        "time_s": train_seconds()})
        postfix["val"] = f"{loss:.4f}"
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tick, tick_step = train_seconds(), step  # tokens/s: evaluation time excluded
    with StopRequest() as stop:
        try:
            while step < t.train_steps:
                if t.eval_interval and step % t.eval_interval == 0:
                    eval_and_log()
                loss_sum = torch.zeros((), device=device)
                for micro in range(t.grad_accumulation):
                    x, y = data.train.get_batch(t.batch_size, cfg.model.block_size, generator, device)
                    last = micro == t.grad_accumulation - 1
                    with distributed.gradient_sync(train_model, last), autocast():
                        _, loss = train_model(x, y)
                    (loss / t.grad_accumulation).backward()
                    loss_sum += loss.detach().float()
                if t.grad_clip:  # fsdp2: the norm of the full gradient, from every rank's shards
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                               if p.grad is not None])
                if isinstance(grad_norm, DTensor):
                    grad_norm = grad_norm.full_tensor()
                # divergence guard: the rank-mean loss and the (global) gradient norm, one sync per step
                health = distributed.mean_across_ranks(
                    torch.stack([loss_sum / t.grad_accumulation, grad_norm.detach().float().to(device)]), dist_info)
                step_loss, step_norm = health.tolist()
                lr = optimizer.param_groups[0]["lr"]
                what = guarded_step(optimizer_step, step_loss, step_norm, on_nonfinite, step + 1, diverged)
                if what:
                    skipped_nonfinite += 1  # train.on_nonfinite=skip: no update this step; the schedule moves on
                    if dist_info.is_main:
                        log.warning("%s at step %d: optimizer step skipped (train.on_nonfinite=skip; %d skipped "
                                    "so far)", what, step + 1, skipped_nonfinite)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                if step % t.log_interval == 0 or step == t.train_steps:
                    train_loss = distributed.mean_across_ranks(loss_sum / t.grad_accumulation, dist_info).item()
                    now = train_seconds()
                    tokens_per_s = tokens_per_step * (step - tick_step) / (now - tick)
                    tick, tick_step = now, step
                    counters = diagnostics()  # every rank: a collective under a process group
                    for key, value in counters.items():
                        if value > counters_seen.get(key, 0) and key not in counters_warned and dist_info.is_main:
                            counters_warned.add(key)  # once per counter
                            log.warning("optimizer fault counter %s grew to %d at step %d (%s's diagnostics(); "
                                        "further growth is in metrics.jsonl as optimizer_%s)",
                                        key, value, step, cfg.optimizer.name, key)
                    counters_seen.update(counters)
                    if logger:
                        logger.log({"step": step, "split": "train", "loss": train_loss, "lr": lr,
                                    "tokens_per_s": tokens_per_s, "tokens": step * tokens_per_step,
                                    "time_s": train_seconds(), "nonfinite_skipped": skipped_nonfinite,
                                    **{f"optimizer_{k}": v for k, v in counters.items()}})
                    postfix.update(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
                if progress:
                    progress.set_postfix(postfix, refresh=False)
                    progress.update(1)
                on_interval = bool(t.checkpoint_interval) and step % t.checkpoint_interval == 0
                on_time = bool(checkpoint_minutes) and time.monotonic() - clock["checkpoint"] >= 60 * checkpoint_minutes
                # one collective: every rank checkpoints and stops at the same step
                stopping, on_time = _any_rank_flags([stop.signum is not None, on_time], dist_info, device)
                if (on_interval or on_time) and step < t.train_steps:
                    if not stopping:  # else written just below
                        checkpoint(checkpoint_path())
                    if t.keep_checkpoints and on_interval:
                        checkpoint(checkpoint_path(step))
                if stopping:
                    checkpoint(checkpoint_path())
                    signum = stop.signum or signal.SIGTERM  # another rank's signal: as preemption
                    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                    message = (f"interrupted ({name}) at step {step}: checkpoint written; continue with "
                               f"train.resume={checkpoint_path()}:\n  {_resume_command(checkpoint_path())}")
                    if dist_info.is_main:
                        log.warning("%s", message)
                    raise Interrupted(message, signum)
        except (KeyboardInterrupt, Diverged):
            if logger:
                logger.close()
            leave_process_group()
            raise
        finally:
            if progress:
                progress.close()

    val_loss = eval_and_log()
    try:
        checkpoint(checkpoint_path())
    except Diverged:
        if logger:
            logger.close()
        leave_process_group()
        raise
    # what each rank holds: owner-compute its matrices' optimizer state, fsdp2 its shards of everything
    held = [(_state_bytes(optimizer), _param_bytes(model))]
    if dist_info.enabled:
        held = [None] * dist_info.world_size
        torch.distributed.all_gather_object(held, (_state_bytes(optimizer), _param_bytes(model)))
    state_bytes, param_bytes = [s for s, _ in held], [p for _, p in held]
    result = {"final_val_loss": val_loss, "steps": step, "out_dir": str(out_dir),
              "checkpoint": str(checkpoint_path()),
              "world_size": dist_info.world_size, "parallel": parallel if dist_info.enabled else None,
              "owner_compute": owner_compute,
              "on_nonfinite": on_nonfinite, "nonfinite_skipped_steps": skipped_nonfinite,
              "diagnostics": optimizer.diagnostics(),  # a collective under owner-compute: every rank
              "train_seconds": train_seconds(), "optimizer_state_bytes": state_bytes[0],
              "optimizer_state_bytes_per_rank": state_bytes, "optimizer_state_bytes_total": sum(state_bytes),
              "parameter_bytes_per_rank": param_bytes,
              "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    if dist_info.enabled and not sharded:  # replicas must agree; fsdp2's shards differ by design
        result["max_param_diff_across_ranks"] = _max_param_diff_across_ranks(model)
    if logger:
        logger.close()
        result["metrics"] = str(logger.csv_path)
        if t.plot:
            result["plot"] = str(plot_losses(logger.csv_path, out_dir / "loss.png",
                                             title=f"{cfg.model.name} / {cfg.dataset.name} / {cfg.optimizer.name}"))
        (out_dir / "summary.json").write_text(strict_json(result, indent=2))  # nan/inf as null
    leave_process_group()
    return result


def _any_rank_flags(flags: list[bool], dist_info: distributed.Distributed, device: torch.device) -> list[bool]:
    """Each flag true on any rank (one collective for all of them: every rank must call it)."""
    if not dist_info.enabled:
        return list(flags)
    value = torch.tensor([float(f) for f in flags], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (fsdp2), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state this process holds (local: never a collective)."""
    return sum(_local(v).numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))


def _param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights this process holds (fsdp2: its shards; local: never a collective)."""
    return sum(_local(p).numel() * p.element_size() for p in model.parameters())


def _max_param_diff_across_ranks(model: torch.nn.Module) -> float:
    """Largest absolute difference between this rank's weights and rank 0's, maximised over ranks."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    reference = flat.clone()
    torch.distributed.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    return diff.item()
