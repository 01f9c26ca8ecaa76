"""The fine-tuning loop of ``asgo-finetune``, read top to bottom (one process).

    config checks (schema, optimizer) -> data (tokenised) -> model -> optimizer (asgo.build_optimizer;
    the classification head, embeddings, norms and biases to AdamW) -> schedule
    -> [resume: checkpoint.pt] -> for each optimizer step:
        the epoch's order (a permutation drawn from train.seed and the epoch) -> grad_accumulation
        micro-batches -> loss / examples (multiple choice: / answer tokens) of the step -> backward
        -> clip -> [loss and gradient norm finite?] -> step -> schedule
        every log_interval: train loss, lr, examples/s
        each epoch's end: evaluation (metrics.csv/jsonl), checkpoint
        every checkpoint_interval steps or checkpoint_minutes: checkpoint
        SIGINT, SIGTERM, SIGUSR1: checkpoint at the end of the step, exit 128 + the signal
    -> summary.json, curves.png

Steps per epoch: ceil(training examples / (batch_size x grad_accumulation)); the schedule runs over
epochs x that many steps: warmup rising linearly as (step + 1) / warmup steps, then linear or cosine
decay from the peak to ``min_lr_ratio`` x peak at the last step, or constant. The data order and the
dropout masks come from ``train.seed`` (and the epoch), and a checkpoint holds the step and the RNG
state, so a resumed run continues the uninterrupted one exactly. A non-finite loss or gradient norm
raises :class:`~asgo.harness.train.Diverged` (exit 3), or skips the step with
``train.on_nonfinite=skip``; no checkpoint with non-finite weights or state is written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from asgo.harness.checkpoint import load_checkpoint, remove_stray_temporaries, save_checkpoint
from asgo.harness.config import ConfigError, check_optimizer_config, optimizer_from_config
from asgo.harness.finetune.plots import plot_finetune
from asgo.harness.finetune.runners import make_run
from asgo.harness.finetune.schema import validate_finetune_config
from asgo.harness.metrics import MetricsLogger, strict_json
from asgo.harness.schedule import warmup_cosine
from asgo.harness.train import (Diverged, Interrupted, StopRequest, _check_out_dir, _flat_config,
                                _nonfinite_tensors, guarded_step)

log = logging.getLogger(__name__)

# keys a resumed run may change: where and how it logs, evaluates and checkpoints
RESUME_MAY_DIFFER = frozenset({
    "train.resume", "train.overwrite", "train.out_dir", "train.progress", "train.log_interval",
    "train.eval_batch_size", "train.tensorboard", "train.plot", "train.device", "train.checkpoint_interval",
    "train.checkpoint_minutes", "train.keep_checkpoints", "train.on_nonfinite", "task.data_dir"})


class FinetuneMetrics(MetricsLogger):
    """metrics.csv with the fine-tuning columns (every row also in metrics.jsonl)."""

    FIELDS = ("step", "epoch", "split", "loss", "lr", "examples_per_s", "time_s", "accuracy", "f1",
              "matthews_correlation", "pearson", "spearmanr")


def schedule_factor(step: int, kind: str, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): ``(step + 1) / warmup_steps``
    during warmup, then ``linear`` (1 to ``min_ratio`` at ``total_steps``), ``cosine`` (the same ends)
    or ``constant`` (1). With no warmup and ``min_ratio`` 0, ``linear`` is ``(total - step) / total``,
    transformers' ``get_linear_schedule_with_warmup``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return warmup_cosine(step, total_steps, warmup_steps, min_ratio)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - (1.0 - min_ratio) * progress


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training examples' order in ``epoch``: a permutation drawn from ``seed`` and ``epoch`` alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def _check_resume(t, stored_yaml: str | None, cfg: DictConfig) -> None:
    if stored_yaml is None:
        return
    old, new = _flat_config(OmegaConf.create(stored_yaml)), _flat_config(cfg)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and k not in RESUME_MAY_DIFFER}
    if changed:
        listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"train.resume={t.resume}: settings differ from the checkpoint's ({listing}); resume "
                          f"with the checkpoint's values (only {', '.join(sorted(RESUME_MAY_DIFFER))} may change)")


def finetune(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Fine-tune ``cfg.model.path`` on ``cfg.task`` with ``cfg.optimizer``; return the summary."""
    checked = validate_finetune_config(cfg)
    t = checked["train"]
    opt_cfg = cfg.optimizer
    check_optimizer_config(opt_cfg, 1)
    out_dir = Path(out_dir)
    _check_out_dir(cfg.train, out_dir)
    resume_ckpt = None
    if t.resume:
        resume_ckpt = load_checkpoint(t.resume)
        _check_resume(t, resume_ckpt.get("config"), cfg)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if t.device == "auto" else t.device)
    use_bf16 = device.type == "cuda" if t.autocast == "auto" else bool(t.autocast)
    autocast = (partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
                if use_bf16 else contextlib.nullcontext)
    for stray in remove_stray_temporaries(out_dir):
        log.info("removed a stray temporary checkpoint file %s", stray)

    # data, model, optimizer, schedule
    task_values = OmegaConf.to_container(cfg.task, resolve=True)
    run = make_run(task_values, OmegaConf.to_container(cfg.model, resolve=True), t.seed)
    per_step = t.batch_size * t.grad_accumulation
    n_train = len(run.train_items)
    if n_train == 0:
        raise ConfigError(f"task {task_values['name']}: no training examples (task.num_train, task.num_dev)")
    steps_per_epoch = math.ceil(n_train / per_step)
    total_steps = t.epochs * steps_per_epoch
    torch.manual_seed(t.seed)  # the new head's initial weights
    model = run.build_model().to(device)
    model.train()
    optimizer = optimizer_from_config(model, opt_cfg, total_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "routing.txt").write_text(optimizer.report() + "\n")
    warmup = int(t.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(schedule_factor, kind=t.schedule, total_steps=total_steps, warmup_steps=warmup,
                           min_ratio=t.min_lr_ratio))
    torch.manual_seed(t.seed)  # dropout

    step, previous = 0, None
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        step = int(resume_ckpt["step"])
        previous = {k: resume_ckpt[k] for k in ("history", "skipped", "train_seconds") if k in resume_ckpt}
        torch.set_rng_state(resume_ckpt["rng"]["torch"])
        if resume_ckpt["rng"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(resume_ckpt["rng"]["cuda"], device)
        if step >= total_steps:
            raise ConfigError(f"train.resume={t.resume}: the run already finished ({step} of {total_steps} steps)")
        resume_ckpt = None

    last_good = {"path": t.resume}

    def diverged(what: str) -> Diverged:
        where = (f"the last good checkpoint is {last_good['path']}" if last_good["path"] else
                 "no checkpoint was written before it")
        return Diverged(f"{what}; {where}")

    def checkpoint(path: Path) -> None:
        state = (v for s in optimizer.state.values() for v in s.values())
        if _nonfinite_tensors(model.parameters()) or _nonfinite_tensors(state):
            raise diverged(f"weights or optimizer state became non-finite (found at step {step}, before writing "
                           f"{path})")
        clock["checkpoint"] = time.monotonic()
        save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "step": step, "config": OmegaConf.to_yaml(cfg),
                               "history": history, "skipped": skipped, "train_seconds": train_seconds(),
                               "rng": {"torch": torch.get_rng_state(),
                                       "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}})
        if path.name == "checkpoint.pt":
            last_good["path"] = str(path)

    logger = FinetuneMetrics(out_dir, tensorboard=t.tensorboard, resume=bool(t.resume),
                             resume_step=step if t.resume else None)
    progress = None
    if t.progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc="finetune", dynamic_ncols=True)
    # evaluations, skipped steps and training time so far: a resumed run's summary is the whole run's
    done = previous or {}
    clock = {"start": time.perf_counter() - done.get("train_seconds", 0.0), "eval": 0.0,
             "checkpoint": time.monotonic()}
    minutes = t.checkpoint_minutes or 0
    skipped = done.get("skipped", 0)
    history: dict[str, list[tuple[int, dict]]] = done.get("history", {})

    def train_seconds() -> float:
        return time.perf_counter() - clock["start"] - clock["eval"]

    def evaluate(epoch: int, final: bool) -> dict:
        start = time.perf_counter()
        results = run.evaluate(model, t.eval_batch_size, device, autocast, final)
        clock["eval"] += time.perf_counter() - start
        for split, values in results.items():
            logger.log({"step": step, "epoch": epoch, "split": split, **values, "time_s": train_seconds()})
            history.setdefault(split, []).append((epoch, values))
        return results

    tick, tick_step = train_seconds(), step
    results = {}
    with StopRequest() as stop:
        try:
            while step < total_steps:
                epoch, within = divmod(step, steps_per_epoch)
                chunk = epoch_order(n_train, t.seed, epoch)[within * per_step:(within + 1) * per_step]
                micro = [[run.train_items[i] for i in chunk[k:k + t.batch_size]]
                         for k in range(0, len(chunk), t.batch_size)]
                count = sum(run.count(items) for items in micro)  # examples (answer tokens) of the step
                loss_sum = torch.zeros((), device=device)
                for items in micro:
                    with autocast():
                        loss = run.batch_loss(model, items, device)
                    (loss / count).backward()
                    loss_sum += loss.detach().float()
                params = [p for p in model.parameters() if p.grad is not None]
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, t.grad_clip) if t.grad_clip
                             else torch.nn.utils.get_total_norm([p.grad for p in params]))
                step_loss, step_norm = torch.stack([loss_sum / count, grad_norm.float().to(device)]).tolist()
                lr = optimizer.param_groups[0]["lr"]
                what = guarded_step(optimizer.step, step_loss, step_norm, t.on_nonfinite, step + 1, diverged)
                if what:
                    skipped += 1
                    log.warning("%s at step %d: optimizer step skipped (train.on_nonfinite=skip)", what, step + 1)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % t.log_interval == 0 or step == total_steps:
                    now = train_seconds()
                    rate = per_step * (step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, step
                    logger.log({"step": step, "epoch": step / steps_per_epoch, "split": "train", "loss": step_loss,
                                "lr": lr, "examples_per_s": rate, "time_s": now, "nonfinite_skipped": skipped})
                    if progress:
                        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                if progress:
                    progress.update(1)
                epoch_end = step % steps_per_epoch == 0
                if epoch_end:
                    results = evaluate(step // steps_per_epoch, final=step == total_steps)
                on_interval = bool(t.checkpoint_interval) and step % t.checkpoint_interval == 0
                on_time = bool(minutes) and time.monotonic() - clock["checkpoint"] >= 60 * minutes
                if epoch_end or on_interval or on_time or stop.signum is not None:
                    checkpoint(out_dir / "checkpoint.pt")
                if on_interval and t.keep_checkpoints:
                    checkpoint(out_dir / f"checkpoint_{step:06d}.pt")
                if stop.signum is not None and step < total_steps:
                    name = "Ctrl-C" if stop.signum == signal.SIGINT else signal.Signals(stop.signum).name
                    message = (f"interrupted ({name}) at step {step}: checkpoint written; continue with "
                               f"train.resume={out_dir / 'checkpoint.pt'}")
                    log.warning("%s", message)
                    raise Interrupted(message, stop.signum)
        except (KeyboardInterrupt, Diverged):
            logger.close()
            raise
        finally:
            if progress:
                progress.close()

    split, metric = run.headline
    best_epoch, best = max(((e, v[metric]) for e, v in history.get(split, [])), key=lambda x: x[1],
                           default=(None, None))
    summary = {"task": task_values["name"], "model": cfg.model.path, "optimizer": cfg.optimizer.name,
               "steps": step, "epochs": t.epochs, "steps_per_epoch": steps_per_epoch,
               "train_examples": n_train, "eval_examples": {k: len(v) for k, v in run.eval_sets.items()},
               "final": results, "headline": {"split": split, "metric": metric,
                                              "final": results.get(split, {}).get(metric),
                                              "best": best, "best_epoch": best_epoch},
               "nonfinite_skipped_steps": skipped, "diagnostics": optimizer.diagnostics(),
               "train_seconds": train_seconds(),
               "optimizer_state_bytes": sum(v.numel() * v.element_size() for s in optimizer.state.values()
                                            for v in s.values() if torch.is_tensor(v)),
               "checkpoint": str(out_dir / "checkpoint.pt"), "metrics": str(logger.csv_path)}
    logger.close()
    if t.plot:
        summary["plot"] = str(plot_finetune(logger.csv_path, out_dir / "curves.png",
                                            title=f"{task_values['name']} / {cfg.optimizer.name}"))
    (out_dir / "summary.json").write_text(strict_json(summary, indent=2))
    return summary
