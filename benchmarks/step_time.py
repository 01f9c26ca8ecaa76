"""Optimizer ``step()`` time and state memory on a GPT's hidden matrices, as ratios to torch AdamW.

    python benchmarks/step_time.py --model nanogpt            # 6 layers, 384 wide (CPU default)
    python benchmarks/step_time.py --model gpt2 --device cuda
    python benchmarks/step_time.py --model gpt2 --exclude shampoo --repeats 3   # CPU: skip the slow ones
    python benchmarks/step_time.py --smoke                    # tiny shapes, one repeat (the tests)

Timed: the hidden 2-D weights of the harness model (attention q/k/v/o and MLP, shapes taken from
``asgo.harness.models.build_model(model)`` and routed by ``asgo.routing.route_parameters``, so
ASGO gets its head-wise Q/K groups exactly as ``asgo.build_optimizer`` would give them); those are
what a matrix optimizer updates. Embeddings, norms and biases go to AdamW in every configuration
and are left out. Every optimizer uses the hyper-parameters of its harness config
(``src/asgo/harness/conf/optimizer/<name>.yaml``) plus the variant's overrides, against
``torch.optim.AdamW`` with the adamw config's settings, all measured in the same run.

Per optimizer: ``--warmup`` steps (state allocation, first roots), then ``--repeats`` timed steps
with fixed random gradients. ``median`` is the typical step; ``mean`` over the repeats amortises
periodic work (``--repeats`` defaults to a multiple of 10, so an every-10-steps root refresh is
counted in proportion). GaLore's/GoLore's basis refresh comes every ``update_proj_gap=200``
steps, which no short run amortises, so the ``refresh every step`` rows time the refresh itself:
amortised cost at gap g ~ median + (refresh - median) / g.
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

import asgo
from asgo.routing import route_parameters

CONF = Path(asgo.__file__).parent / "harness" / "conf" / "optimizer"
MODELS = ("tiny", "nanogpt", "gpt2", "gpt2-large")

# (row name, optimizer config name, overrides of that config)
VARIANTS: list[tuple[str, str, dict]] = [
    ("adamw", "adamw", {}),
    ("asgo tau=1", "asgo", {"precondition_frequency": 1}),
    ("asgo tau=10", "asgo", {"precondition_frequency": 10}),
    ("dasgo", "dasgo", {}),
    ("muon", "muon", {}),
    ("shampoo tau=1", "shampoo", {"precondition_frequency": 1}),
    ("shampoo tau=10", "shampoo", {"precondition_frequency": 10}),
    ("adafactor", "adafactor", {}),
    ("galore r128 gap200", "galore", {}),
    ("galore r128 refresh every step", "galore", {"update_proj_gap": 1}),
    ("golore r128 gap200", "golore", {"golore_fraction": 1.0}),
    ("golore r128 refresh every step", "golore", {"golore_fraction": 1.0, "update_proj_gap": 1}),
]
BASELINE = "adamw"


def config_settings(name: str, overrides: dict) -> dict:
    """The optimizer's keyword arguments from its harness config, with ``overrides``."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)
    cfg.pop("name")
    for key in ("adamw", "headwise", "routes"):  # build_optimizer's, not the optimizer's
        cfg.pop(key, None)
    settings = {"lr": cfg.pop("learning_rate"), **cfg, **overrides}
    for key in ("betas",):
        if key in settings:
            settings[key] = tuple(settings[key])
    if settings.get("total_steps", 0) is None:
        settings["total_steps"] = 10_000
    return settings


def hidden_matrices(model: str, vocab_size: int = 65) -> list[tuple[tuple[int, ...], int]]:
    """(shape, num_heads for ASGO) of every hidden matrix of the harness model ``model``."""
    from asgo.harness.models import build_model

    with torch.device("meta"):
        net = build_model(model, vocab_size=vocab_size)
    return [(tuple(r.param.shape), r.num_heads) for r in route_parameters(net, "asgo") if r.role == "matrix"]


def make_optimizer(row: str, params: list[torch.nn.Parameter], heads: list[int]) -> torch.optim.Optimizer:
    _, name, overrides = next(v for v in VARIANTS if v[0] == row)
    settings = config_settings(name, overrides)
    if name == "adamw":
        return torch.optim.AdamW(params, **settings)
    groups: dict[int, list] = {}
    for p, h in zip(params, heads):
        groups.setdefault(h if name == "asgo" else 1, []).append(p)
    param_groups = [{"params": ps, **({"num_heads": h} if h > 1 else {})} for h, ps in groups.items()]
    return asgo.routing.OPTIMIZERS[name](param_groups, **settings)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


def time_steps(row: str, matrices, device: torch.device, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, device=device) * 0.02) for shape, _ in matrices]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    opt = make_optimizer(row, params, [h for _, h in matrices])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        for p, g in zip(params, grads):
            p.grad = g
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"optimizer": row, "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "state_bytes": state_bytes(opt)}


def meta_state_bytes(row: str, matrices) -> dict:
    """State bytes only, from one step on meta tensors (no memory, no time): for the rows too slow
    to time on this machine (``--state-only``)."""
    params = [torch.nn.Parameter(torch.empty(shape, device="meta")) for shape, _ in matrices]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = make_optimizer(row, params, [h for _, h in matrices])
    opt.step()
    return {"optimizer": row, "median_s": None, "mean_s": None, "state_bytes": state_bytes(opt)}


def benchmark(model: str, device: str = "cpu", warmup: int = 3, repeats: int = 20,
              rows: list[str] | None = None, matrices=None, state_only: tuple[str, ...] = ()) -> list[dict]:
    """Time every optimizer row on ``model``'s hidden matrices; ratios against torch AdamW.
    Rows containing a ``state_only`` substring get their state bytes only (meta dry step)."""
    device = torch.device(device)
    matrices = matrices or hidden_matrices(model)
    rows = rows or [v[0] for v in VARIANTS]
    if BASELINE not in rows:
        rows = [BASELINE, *rows]
    results = []
    for row in rows:
        if row != BASELINE and any(s in row for s in state_only):
            results.append(meta_state_bytes(row, matrices))
            continue
        results.append(time_steps(row, matrices, device, warmup, repeats))
        print(f"  {row}: median {results[-1]['median_s'] * 1e3:.2f} ms", file=sys.stderr, flush=True)
    base = results[rows.index(BASELINE)]
    for r in results:
        timed = r["median_s"] is not None
        r["median_x_adamw"] = r["median_s"] / base["median_s"] if timed else None
        r["mean_x_adamw"] = r["mean_s"] / base["mean_s"] if timed else None
        r["state_x_adamw"] = r["state_bytes"] / base["state_bytes"]
    return results


def format_table(results: list[dict]) -> str:
    lines = ["| optimizer | median step (ms) | x AdamW | mean step (ms) | x AdamW | state (MiB) | x AdamW |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["median_s"] is None:
            times = "not timed | - | not timed | -"
        else:
            times = (f"{r['median_s'] * 1e3:.2f} | {r['median_x_adamw']:.2f} | "
                     f"{r['mean_s'] * 1e3:.2f} | {r['mean_x_adamw']:.2f}")
        lines.append(f"| {r['optimizer']} | {times} | {r['state_bytes'] / 2**20:.2f} | {r['state_x_adamw']:.2f} |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    return f"{where}, torch {torch.__version__}, Python {platform.python_version()}"


def matches(row: str, pattern: str, rows: list[str]) -> bool:
    """``pattern`` names ``row`` exactly, or (when it is no row's exact name) is a substring of it."""
    return row == pattern if pattern in rows else pattern in row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="nanogpt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated row names or substrings: keep these rows")
    parser.add_argument("--exclude", default="", help="comma-separated row names or substrings: drop these rows")
    parser.add_argument("--state-only", default="",
                        help="comma-separated substrings: rows whose state bytes are reported without timing")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default torch's")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="two 32x48 matrices, 1 warm-up, 1 repeat")
    args = parser.parse_args(argv)

    rows = [v[0] for v in VARIANTS]
    if args.only:
        rows = [r for r in rows if any(matches(r, s, rows) for s in args.only.split(","))]
    if args.exclude:
        rows = [r for r in rows if not any(matches(r, s, rows) for s in args.exclude.split(","))]
    if args.smoke:
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    matrices = None
    if args.smoke:
        matrices, args.warmup, args.repeats = [((32, 48), 1), ((48, 32), 1)], 1, 1
    else:
        matrices = hidden_matrices(args.model)
    n_params = sum(torch.Size(s).numel() for s, _ in matrices)
    print(f"{'smoke' if args.smoke else args.model}: {len(matrices)} hidden matrices, {n_params / 1e6:.2f}M "
          f"parameters; {machine(device)}; warm-up {args.warmup}, repeats {args.repeats}", flush=True)
    state_only = tuple(x for x in args.state_only.split(",") if x)
    results = benchmark(args.model, args.device, args.warmup, args.repeats, rows, matrices, state_only)
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": str(device), "machine": machine(device),
                                         "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
