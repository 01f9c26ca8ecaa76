"""Peak extra memory of one optimizer ``step()``, as a ratio to the parameter bytes, with and
without the bucket cap (``max_bucket_bytes``).

    python benchmarks/memory.py                     # 32 matrices of 512 x 512 (32 MiB), CPU
    python benchmarks/memory.py --count 64 --rows 768 --cols 768 --caps 4 16 64
    python benchmarks/memory.py --device cuda
    python benchmarks/memory.py --smoke             # tiny shapes (the tests)

Measured: the most bytes allocated at once during one ``step()`` beyond those allocated when it
began (parameters, gradients and state already exist: a warm-up step comes first). On CUDA,
``torch.cuda.max_memory_allocated``; on the CPU, every allocation and free that torch's profiler
records (``profile_memory=True``), summed in time order: exact, whatever the allocator caches.
The step measured is a root step for ASGO and Shampoo (``precondition_frequency=1``), their
costliest. ``x params`` is the peak over the parameters' bytes; ``ms`` one unprofiled step.

Rows: ``asgo.Muon``, ``asgo.ASGO``, ``asgo.Shampoo``, ``asgo.DASGO`` with ``max_bucket_bytes``
None (one bucket per shape: everything batched), each ``--caps`` value (MiB) and the default;
``torch.optim.AdamW`` and ``torch.optim.Muon`` for comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

import torch

import asgo
from asgo.optim._base import DEFAULT_MAX_BUCKET_BYTES

MiB = 2**20
OURS: dict[str, Callable] = {
    "muon": lambda params, cap: asgo.Muon(params, max_bucket_bytes=cap),
    "asgo": lambda params, cap: asgo.ASGO(params, max_bucket_bytes=cap),
    "shampoo": lambda params, cap: asgo.Shampoo(params, max_bucket_bytes=cap),
    "dasgo": lambda params, cap: asgo.DASGO(params, max_bucket_bytes=cap),
}
TORCH: dict[str, Callable] = {
    "torch.optim.AdamW": lambda params: torch.optim.AdamW(params),
    "torch.optim.Muon": lambda params: torch.optim.Muon(params),
}


def _allocations(events):
    for e in events:
        if e.tag == torch._C._profiler._EventType.Allocation:
            yield e.start_time_ns, e.extra_fields.alloc_size
        yield from _allocations(e.children)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The most bytes allocated at once while ``fn()`` runs, beyond those allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    tree = prof.profiler.kineto_results.experimental_event_tree()
    live = peak = 0
    for _, size in sorted(_allocations(tree)):
        live += size
        peak = max(peak, live)
    return peak


def problem(count: int, rows: int, cols: int, device: torch.device, seed: int = 0):
    """``count`` parameters of ``rows x cols`` and their gradients (scale 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(rows, cols, generator=g).to(device)) for _ in range(count)]
    for p in params:
        p.grad = (torch.randn(rows, cols, generator=g) * 1e-3).to(device)
    return params


def measure(make: Callable, args: argparse.Namespace, device: torch.device) -> dict:
    params = problem(args.count, args.rows, args.cols, device)
    opt = make(params)
    opt.step()  # state and first roots
    peak = peak_extra_bytes(opt.step, device)
    start = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return dict(peak_bytes=peak, x_params=peak / param_bytes, ms=seconds * 1e3)


def caps_of(args: argparse.Namespace) -> list[int | None]:
    caps = [None, *(int(c * MiB) for c in args.caps)]
    return caps + ([DEFAULT_MAX_BUCKET_BYTES] if DEFAULT_MAX_BUCKET_BYTES not in caps else [])


def size_label(nbytes: float) -> str:
    return f"{nbytes / MiB:g} MiB" if nbytes >= MiB else f"{nbytes / 1024:g} KiB"


def cap_label(cap: int | None) -> str:
    if cap is None:
        return "none"
    return size_label(cap) + (" (default)" if cap == DEFAULT_MAX_BUCKET_BYTES else "")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--caps", type=float, nargs="*", default=[4.0], help="caps in MiB")
    parser.add_argument("--optimizers", nargs="*", default=[*OURS, *TORCH])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="8 matrices of 32 x 48, caps 8 KiB")
    args = parser.parse_args(argv)
    if args.smoke:
        args.count, args.rows, args.cols, args.caps = 8, 32, 48, [8 / 1024]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    param_bytes = args.count * args.rows * args.cols * 4
    print(f"{args.count} matrices of {args.rows} x {args.cols} float32 ({size_label(param_bytes)}), "
          f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| optimizer | max_bucket_bytes | peak extra MiB | x params | ms/step |")
    print("|---|---|---|---|---|")
    results = []
    for name in args.optimizers:
        rows = ([(cap_label(cap), lambda ps, cap=cap: OURS[name](ps, cap)) for cap in caps_of(args)]
                if name in OURS else [("-", TORCH[name])])
        for label, make in rows:
            r = dict(optimizer=name, max_bucket_bytes=label, **measure(make, args, device))
            print(f"| {name} | {label} | {r['peak_bytes'] / MiB:.1f} | {r['x_params']:.2f} | "
                  f"{r['ms']:.0f} |", flush=True)
            results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(count=args.count, rows=args.rows, cols=args.cols, device=str(device),
                           threads=torch.get_num_threads(), torch=torch.__version__,
                           machine=platform.machine(), results=results), f, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
