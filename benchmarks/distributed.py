"""Owner-compute (``process_group=``): per-rank optimizer compute, LPT load balance and bytes
communicated per step, at world sizes N = 1, 2, 4, with gloo on CPU.

    python benchmarks/distributed.py                                 # nanoGPT, N = 1,2,4: asgo tau=1, tau=10, muon
    python benchmarks/distributed.py --only "asgo tau=1" --world-sizes 1,4 --json out.json
    python benchmarks/distributed.py --only shampoo --warmup 1 --repeats 2   # slow on CPU
    python benchmarks/distributed.py --smoke                         # tiny shapes, N = 1,2, one repeat (the tests)

The script starts itself under ``torchrun --standalone --nproc_per_node=N`` for each N (gloo,
``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` in every process); started by torchrun it
is the worker (started by hand under torchrun, rank 0 prints that N's table). Every rank builds
the same matrices (the hidden matrices of the harness model, shapes and routing from
``benchmarks/step_time.py``'s ``hidden_matrices``, so ASGO gets its head-wise Q/K groups) and the
same fixed random gradients, and steps the optimizer of each row (its harness config plus the
row's overrides, as in ``step_time.py``) with ``process_group=dist.group.WORLD``.

Per step, after a barrier, each rank measures:

- ``step``: the wall time of ``opt.step()``;
- ``collective``: the wall time of ``asgo.optim._distributed.all_gather_updates`` (wrapped where
  ``asgo.optim._base`` calls it): packing, the ``all_gather_into_tensor``, unpacking, and the wait
  for the slowest rank;
- ``compute`` = step - collective: this rank's collect / compute / commit on the matrices it owns,
  plus the elementwise apply on every parameter (not divided by N). As wall time, and as the main
  thread's CPU time (``time.thread_time``), which does not count time the process waits for a
  core: with N processes on fewer than N cores, the wall time of a rank includes its turns off
  the CPU, its CPU time does not;
- bytes: the buffers of the collective. Per (device, dtype) one ``all_gather_into_tensor`` of width
  ``w`` = the largest rank's directions + one flag per parameter: this rank sends ``w`` elements
  and receives ``N w``. (On the wire a ring all-gather moves ``(N - 1) w`` each way per rank.)

Per row and N: compute as the per-rank mean over the timed steps (periodic root refreshes
counted in proportion), then the max over ranks; its ratio to N = 1; the LPT load (sum of
``matrix_cost`` of the matrices each rank owns) as max/mean, and max/total (the compute ratio
LPT predicts); the bytes per step over the parameter bytes. Targets: compute at N = 4 at most
0.35x N = 1 (judged on CPU time, see above), load max/mean at most 1.1, bytes per step at most 2x
the parameter bytes (for N > 1; at N = 1 the collective is a local copy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402  (benchmarks/ is not a package)

import asgo  # noqa: E402
import asgo.optim._base as _base  # noqa: E402
from asgo.optim._distributed import matrix_cost  # noqa: E402

# the rows of step_time.VARIANTS whose optimizer takes a process group
ROWS = [row for row, name, _ in step_time.VARIANTS if name not in ("adamw", "adafactor")]
DEFAULT_ROWS = ["asgo tau=1", "asgo tau=10", "muon"]
SMOKE_MATRICES = [((32, 48), 1), ((48, 32), 1), ((32, 32), 2), ((16, 32), 1), ((32, 16), 2)]
TARGET_COMPUTE, TARGET_LOAD, TARGET_COMM = 0.35, 1.1, 2.0


def make_optimizer(row: str, params, heads: list[int], process_group) -> torch.optim.Optimizer:
    """``step_time.make_optimizer`` (same config, same head-wise groups) with a process group."""
    _, name, overrides = next(v for v in step_time.VARIANTS if v[0] == row)
    settings = step_time.config_settings(name, overrides)
    groups: dict[int, list] = {}
    for p, h in zip(params, heads):
        groups.setdefault(h if name == "asgo" else 1, []).append(p)
    param_groups = [{"params": ps, **({"num_heads": h} if h > 1 else {})} for h, ps in groups.items()]
    return asgo.routing.OPTIMIZERS[name](param_groups, process_group=process_group, **settings)


# --- the worker (under torchrun) -----------------------------------------------------------------


class Collective:
    """Wraps ``all_gather_updates``: its wall and CPU time and the bytes of its buffers."""

    def __init__(self, inner):
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        self.wall = self.cpu = 0.0
        self.sent = self.received = self.calls = 0
        self.started = self.ended = None  # (wall, cpu) at the first call's start, the last's end

    def __call__(self, mine, expected, group):
        world = dist.get_world_size(group)
        widths = defaultdict(lambda: [0] * world)
        for e in expected:
            widths[e.device, e.dtype][e.owner] += e.numel + 1
        for (_, dtype), sizes in widths.items():
            size = torch.empty((), dtype=dtype).element_size()
            self.sent += max(sizes) * size
            self.received += world * max(sizes) * size
            self.calls += 1
        w0, c0 = time.perf_counter(), time.thread_time()
        out = self.inner(mine, expected, group)
        w1, c1 = time.perf_counter(), time.thread_time()
        self.wall += w1 - w0
        self.cpu += c1 - c0
        self.started = self.started or (w0, c0)
        self.ended = (w1, c1)
        return out


def measure(row: str, matrices, warmup: int, repeats: int, collective: Collective) -> dict:
    """This rank's numbers for one optimizer row."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same parameters and gradients on every rank
    params = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape, _ in matrices]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    opt = make_optimizer(row, params, [h for _, h in matrices], dist.group.WORLD)
    loads = [0.0] * world
    for group in opt.param_groups:
        for p in group["params"]:
            loads[opt._owners[p]] += matrix_cost(opt.layouts(p, group))
    steps = defaultdict(list)
    for i in range(warmup + repeats):
        for p, g in zip(params, grads):
            p.grad = g
        collective.reset()
        dist.barrier()
        w0, c0 = time.perf_counter(), time.thread_time()
        opt.step()
        wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
        if i < warmup:
            continue
        steps["step_s"].append(wall)
        steps["gather_s"].append(collective.wall)
        steps["compute_s"].append(wall - collective.wall)
        steps["compute_cpu_s"].append(cpu - collective.cpu)
        # before the collective: collect, compute and commit on the owned matrices; after it:
        # the apply on every parameter (zero and all if the collective was not called)
        started, ended = collective.started or (w0 + wall, c0 + cpu), collective.ended or (w0 + wall, c0 + cpu)
        steps["owned_cpu_s"].append(started[1] - c0)
        steps["apply_cpu_s"].append(c0 + cpu - ended[1])
        steps["sent_bytes"].append(collective.sent)
        steps["received_bytes"].append(collective.received)
    dist.barrier()
    return {"rank": rank, "loads": loads,
            "owned": sum(opt.owns(p) for p in params),
            "state_bytes": step_time.state_bytes(opt),
            **{f"{k}_mean": statistics.fmean(v) for k, v in steps.items()},
            **{f"{k}_median": statistics.median(v) for k, v in steps.items()}}


def worker(args) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    matrices = SMOKE_MATRICES if args.smoke else step_time.hidden_matrices(args.model)
    collective = Collective(_base.all_gather_updates)
    _base.all_gather_updates = collective  # what MatrixOptimizer._exchange calls
    results = []
    for row in args.rows:
        t0 = time.perf_counter()
        mine = measure(row, matrices, args.warmup, args.repeats, collective)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        results.append({"optimizer": row, "world_size": world, "ranks": everyone})
        if rank == 0:
            print(f"  N={world} {row}: step {mine['step_s_mean'] * 1e3:.1f} ms on rank 0 "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if rank == 0 and args.worker_out:
        Path(args.worker_out).write_text(json.dumps(results))
    elif rank == 0:  # started by hand under torchrun: this N only, no ratios to N = 1 unless N = 1
        param_bytes = sum(torch.Size(s).numel() for s, _ in matrices) * 4
        print(format_table(summarise(results, param_bytes)), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort a normal interpreter exit on a loaded machine


# --- the launcher ----------------------------------------------------------------------------


def launch(world: int, argv: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(__file__).resolve()), *argv, "--worker-out", str(out)]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun with {world} processes failed ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    sys.stderr.write("".join(line + "\n" for line in done.stderr.splitlines() if line.startswith("  N=")))
    return json.loads(out.read_text())


def summarise(raw: list[dict], param_bytes: int) -> list[dict]:
    """One row per optimizer and world size, ratios against the same optimizer at N = 1."""
    rows = []
    for r in raw:
        ranks, world = r["ranks"], r["world_size"]
        loads = ranks[0]["loads"]
        sent, received = ranks[0]["sent_bytes_mean"], ranks[0]["received_bytes_mean"]
        rows.append({
            "optimizer": r["optimizer"], "world_size": world,
            "compute_cpu_s": max(k["compute_cpu_s_mean"] for k in ranks),
            "compute_s": max(k["compute_s_mean"] for k in ranks),
            "compute_cpu_median_s": max(k["compute_cpu_s_median"] for k in ranks),
            "compute_median_s": max(k["compute_s_median"] for k in ranks),
            "compute_cpu_per_rank_s": [k["compute_cpu_s_mean"] for k in ranks],
            "compute_per_rank_s": [k["compute_s_mean"] for k in ranks],
            "owned_cpu_s": max(k["owned_cpu_s_mean"] for k in ranks),
            "apply_cpu_s": max(k["apply_cpu_s_mean"] for k in ranks),
            "step_s": max(k["step_s_mean"] for k in ranks),
            "gather_s": max(k["gather_s_mean"] for k in ranks),
            "loads": loads,
            "load_max_over_mean": max(loads) / statistics.fmean(loads),
            "lpt_predicted_ratio": max(loads) / sum(loads),
            "owned_per_rank": [k["owned"] for k in ranks],
            "state_bytes_per_rank": [k["state_bytes"] for k in ranks],
            "sent_bytes": sent, "received_bytes": received,
            "ring_bytes_each_way": received / world * (world - 1),
            "param_bytes": param_bytes,
            "comm_over_params": (sent + received) / param_bytes,
        })
    base = {r["optimizer"]: r for r in rows if r["world_size"] == 1}
    for r in rows:
        b = base.get(r["optimizer"])
        r["compute_cpu_x_n1"] = r["compute_cpu_s"] / b["compute_cpu_s"] if b else None
        r["compute_x_n1"] = r["compute_s"] / b["compute_s"] if b else None
        checks = []
        if r["world_size"] >= 4:
            ok = r["compute_cpu_x_n1"] is not None and r["compute_cpu_x_n1"] <= TARGET_COMPUTE
            checks.append(("compute", ok))
        if r["world_size"] > 1:
            checks.append(("load", r["load_max_over_mean"] <= TARGET_LOAD))
            checks.append(("comm", r["comm_over_params"] <= TARGET_COMM))
        r["targets"] = {name: ok for name, ok in checks}
    return rows


def verdict(r: dict) -> str:
    if not r["targets"]:
        return "-"
    failed = [name for name, ok in r["targets"].items() if not ok]
    return "PASS" if not failed else "FAIL " + ", ".join(failed)


def format_table(rows: list[dict]) -> str:
    def x(v):
        return "-" if v is None else f"{v:.2f}"

    lines = ["| optimizer | N | compute CPU ms (max rank) | x N=1 | compute wall ms (max rank) | x N=1 "
             "| LPT max/total | step ms | collective ms | load max/mean | MiB / step (sent + recv) "
             "| x param bytes | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['world_size']} | {r['compute_cpu_s'] * 1e3:.1f} | {x(r['compute_cpu_x_n1'])} "
            f"| {r['compute_s'] * 1e3:.1f} | {x(r['compute_x_n1'])} | {r['lpt_predicted_ratio']:.3f} "
            f"| {r['step_s'] * 1e3:.1f} | {r['gather_s'] * 1e3:.1f} | {r['load_max_over_mean']:.3f} "
            f"| {(r['sent_bytes'] + r['received_bytes']) / 2**20:.2f} | {r['comm_over_params']:.3f} | {verdict(r)} |")
    return "\n".join(lines)


def format_split(rows: list[dict]) -> str:
    """Where the compute goes (each column's max over ranks, so the parts need not add up)."""
    lines = ["| optimizer | N | owned matrices, before the collective (CPU ms) | apply, after it (CPU ms) "
             "| collective wall ms | matrices per rank | state MiB per rank (max) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['world_size']} | {r['owned_cpu_s'] * 1e3:.1f} "
                     f"| {r['apply_cpu_s'] * 1e3:.1f} | {r['gather_s'] * 1e3:.1f} "
                     f"| {'/'.join(map(str, r['owned_per_rank']))} "
                     f"| {max(r['state_bytes_per_rank']) / 2**20:.2f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{cpu}, {os.cpu_count()} cores, one thread per process, gloo; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=step_time.MODELS, default="nanogpt")
    parser.add_argument("--world-sizes", help="comma-separated N (default 1,2,4; --smoke 1,2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (a multiple of 10 amortises tau=10)")
    parser.add_argument("--only", default="", help="comma-separated row names or substrings "
                        f"(default {','.join(DEFAULT_ROWS)}; rows: {', '.join(ROWS)})")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="five tiny matrices, N = 1,2, 1 warm-up, 1 repeat")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rows = ([r for r in ROWS if any(step_time.matches(r, s, ROWS) for s in args.only.split(","))]
                 if args.only else DEFAULT_ROWS)
    if not args.rows:
        parser.error(f"--only {args.only!r} names no row; rows: {', '.join(ROWS)}")
    if args.smoke:
        args.warmup, args.repeats = 1, 1
    if args.worker_out is not None or "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun
        worker(args)
        return []

    worlds = [int(n) for n in (args.world_sizes or ("1,2" if args.smoke else "1,2,4")).split(",")]
    if 1 not in worlds:
        worlds = [1, *worlds]  # the ratios need N = 1
    matrices = SMOKE_MATRICES if args.smoke else step_time.hidden_matrices(args.model)
    param_bytes = sum(torch.Size(s).numel() for s, _ in matrices) * 4  # float32
    label = "smoke" if args.smoke else args.model
    load_before = os.getloadavg()
    print(f"{label}: {len(matrices)} hidden matrices, {param_bytes / 4 / 1e6:.2f}M parameters "
          f"({param_bytes / 2**20:.2f} MiB); {machine()}; N = {','.join(map(str, worlds))}; "
          f"warm-up {args.warmup}, repeats {args.repeats}; load average {load_before[0]:.2f}", flush=True)
    forwarded = ["--model", args.model, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                 "--only", ",".join(args.rows), *(["--smoke"] if args.smoke else [])]
    raw = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            if world > (os.cpu_count() or 1):
                print(f"  N={world}: {world} processes share {os.cpu_count()} cores (oversubscribed)",
                      file=sys.stderr, flush=True)
            raw += launch(world, forwarded, Path(tmp) / f"n{world}.json")
    rows = summarise(raw, param_bytes)
    rows.sort(key=lambda r: (args.rows.index(r["optimizer"]), r["world_size"]))
    load_after = os.getloadavg()
    print(format_table(rows))
    print()
    print(format_split(rows))
    print(f"wall clock {time.perf_counter() - start:.0f} s; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")
    if args.json:
        args.json.write_text(json.dumps({
            "model": label, "machine": machine(), "world_sizes": worlds, "warmup": args.warmup,
            "repeats": args.repeats, "param_bytes": param_bytes, "load_average": [load_before, load_after],
            "targets": {"compute_cpu_x_n1_at_n4": TARGET_COMPUTE, "load_max_over_mean": TARGET_LOAD,
                        "comm_over_params": TARGET_COMM},
            "results": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
