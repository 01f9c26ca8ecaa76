"""Whole training-step time (forward, backward, clip, optimizer step) per optimizer, as ratios to AdamW.

    python benchmarks/train_step.py                       # the 'tiny' GPT, batch 16 x 128 tokens
    python benchmarks/train_step.py --model nanogpt --batch-size 8 --device cuda
    python benchmarks/train_step.py --smoke               # 1-layer model, 1 repeat (the tests)
    python benchmarks/train_step.py --compile --only adamw,"asgo tau=5 (default)"   # + compiled steps

Each optimizer is built exactly as ``asgo-train`` builds it: its harness config
(``src/asgo/harness/conf/optimizer/<name>.yaml``) plus the variant's overrides, through
``asgo.harness.config.optimizer_from_config`` -> ``asgo.build_optimizer`` (hidden matrices to the
method, embeddings/head/norms/biases to AdamW). The baseline is ``optimizer=adamw`` (AdamW on every
parameter). Random token batches (timing does not depend on the text); gradient clipping at 1.0
as in the harness. After ``--warmup`` steps, ``--repeats`` steps are timed, the rows in turn (one
step of each, round-robin, so that load changes weigh on every row alike); median and mean
(mean amortises every-10-steps root refreshes; ``--repeats`` defaults to a multiple of 10), and
the median of the ``optimizer.step()`` part alone. ``--compile`` adds each row again with
``optimizer.step`` compiled as ``asgo-train train.compile_optimizer=true`` compiles it
(``torch.compile(opt.step, dynamic=True)``, Inductor), after at least 12 warm-up steps (the
compilations: the first step, then one graph per schedule decision).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from asgo.harness.config import CONFIG_DIR, optimizer_from_config
from asgo.harness.models import build_model

# (row name, optimizer config, overrides); GaLore/GoLore at the Shakespeare sweep's rank 32, gap 50
VARIANTS: list[tuple[str, str, dict]] = [
    ("adamw", "adamw", {}),
    ("asgo tau=1", "asgo", {"precondition_frequency": 1}),
    ("asgo tau=1 polar_express", "asgo", {"precondition_frequency": 1, "root_method": "polar_express"}),
    ("asgo tau=5 (default)", "asgo", {}),
    ("asgo tau=10", "asgo", {"precondition_frequency": 10}),
    ("dasgo", "dasgo", {}),
    ("muon", "muon", {}),
    ("muon fp32 NS", "muon", {"ns_dtype": "float32"}),
    ("shampoo tau=1", "shampoo", {"precondition_frequency": 1}),
    ("shampoo tau=10", "shampoo", {"precondition_frequency": 10}),
    ("adafactor", "adafactor", {}),
    ("galore r32 gap50", "galore", {"rank": 32, "update_proj_gap": 50}),
    ("golore r32 gap50", "golore", {"rank": 32, "update_proj_gap": 50}),
]
BASELINE = "adamw"


COMPILED = " (compiled step)"


class Training:
    """One row: its model, optimizer (built as asgo-train builds it) and fixed random batches."""

    def __init__(self, row: str, model_name: str, batch_size: int, device: torch.device,
                 model_overrides: dict | None = None, train_steps: int = 1000):
        compiled = row.endswith(COMPILED)
        _, name, overrides = next(v for v in VARIANTS if v[0] == row.removesuffix(COMPILED))
        torch.manual_seed(0)
        self.row, self.device, self.steps = row, device, 0
        self.model = build_model(model_name, vocab_size=65, dropout=0.0, **(model_overrides or {})).to(device)
        self.tokens = batch_size * self.model.config.block_size
        cfg = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "optimizer" / f"{name}.yaml"), overrides)
        self.opt = optimizer_from_config(self.model, cfg, train_steps)
        self.opt_step = torch.compile(self.opt.step, dynamic=True) if compiled else self.opt.step
        self.warmup = 12 if compiled else 0  # the compilations: step 1, then a graph per schedule decision
        g = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(65, (batch_size, self.model.config.block_size + 1), generator=g).to(device)
                        for _ in range(4)]
        self.step_times: list[float] = []
        self.opt_times: list[float] = []

    def step(self, timed: bool) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        xy = self.batches[self.steps % len(self.batches)]
        self.steps += 1
        sync()
        start = time.perf_counter()
        _, loss = self.model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        sync()
        mid = time.perf_counter()
        self.opt_step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        end = time.perf_counter()
        if timed:
            self.step_times.append(end - start)
            self.opt_times.append(end - mid)

    def result(self) -> dict:
        median = statistics.median(self.step_times)
        return {"optimizer": self.row, "median_s": median, "mean_s": statistics.fmean(self.step_times),
                "opt_median_s": statistics.median(self.opt_times), "tokens_per_s": self.tokens / median,
                "params": sum(p.numel() for p in self.model.parameters())}


def benchmark(model: str = "tiny", batch_size: int = 16, device: str = "cpu", warmup: int = 3, repeats: int = 20,
              rows: list[str] | None = None, model_overrides: dict | None = None) -> list[dict]:
    """Every row warmed up, then timed round-robin (one step of each row in turn), so that a
    change of machine load over the run weighs on every row alike."""
    device = torch.device(device)
    rows = rows or [v[0] for v in VARIANTS]
    if BASELINE not in rows:
        rows = [BASELINE, *rows]
    runs = [Training(row, model, batch_size, device, model_overrides) for row in rows]
    for run in runs:
        for _ in range(max(warmup, run.warmup)):
            run.step(timed=False)
    for _ in range(repeats):
        for run in runs:
            run.step(timed=True)
    results = [run.result() for run in runs]
    for r in results:
        print(f"  {r['optimizer']}: median {r['median_s'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    base = results[rows.index(BASELINE)]
    for r in results:
        r["median_x_adamw"] = r["median_s"] / base["median_s"]
        r["mean_x_adamw"] = r["mean_s"] / base["mean_s"]
        r["opt_share"] = r["opt_median_s"] / r["median_s"]
    return results


def format_table(results: list[dict]) -> str:
    lines = ["| optimizer | median step (ms) | x AdamW | mean step (ms) | x AdamW | optimizer.step() median (ms) "
             "| share of step | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['optimizer']} | {r['median_s'] * 1e3:.1f} | {r['median_x_adamw']:.2f} | "
                     f"{r['mean_s'] * 1e3:.1f} | {r['mean_x_adamw']:.2f} | {r['opt_median_s'] * 1e3:.1f} | "
                     f"{r['opt_share']:.0%} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def matches(row: str, pattern: str, rows: list[str]) -> bool:
    """``pattern`` names ``row`` exactly, or (when it is no row's exact name) is a substring of it."""
    return row == pattern if pattern in rows else pattern in row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "nanogpt", "gpt2"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated row names or substrings: keep these rows")
    parser.add_argument("--exclude", default="", help="comma-separated row names or substrings: drop these rows")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default torch's")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="1 layer, width 32, context 16, batch 2, 1 repeat")
    parser.add_argument("--compile", action="store_true", help="also each row with optimizer.step compiled")
    args = parser.parse_args(argv)

    rows = [v[0] for v in VARIANTS]
    if args.only:
        rows = [r for r in rows if any(matches(r, s, rows) for s in args.only.split(","))]
    if args.exclude:
        rows = [r for r in rows if not any(matches(r, s, rows) for s in args.exclude.split(","))]
    if args.compile:
        rows = [r for row in rows for r in (row, row + COMPILED)]
    overrides = None
    if args.smoke:
        overrides = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16}
        args.model, args.batch_size, args.warmup, args.repeats = "tiny", 2, 1, 1
    if args.smoke:
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"{'smoke' if args.smoke else args.model}, batch {args.batch_size}; {where}, torch {torch.__version__}; "
          f"warm-up {args.warmup}, repeats {args.repeats}", flush=True)
    results = benchmark(args.model, args.batch_size, args.device, args.warmup, args.repeats, rows, overrides)
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": str(device), "machine": where,
                                         "batch_size": args.batch_size, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
