"""Optimizer step time and state memory on a GPT's hidden matrices, as ratios to torch AdamW.

    python benchmarks/step_time.py --model nanogpt            # 6 layers, 384 wide (CPU default)
    python benchmarks/step_time.py --model gpt2 --device cuda

Only the hidden 2-D weights (attention q/k/v/o and MLP) are timed: those are what a matrix
optimizer updates; embeddings, norms and biases go to AdamW in every configuration. Each
optimizer's median ``step()`` time over ``--repeats`` (after ``--warmup``) is divided by AdamW's
median measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import asgo

MODELS = {"nanogpt": (6, 384), "gpt2": (12, 768), "tiny": (4, 128)}


def hidden_matrix_shapes(layers: int, width: int) -> list[tuple[int, int]]:
    per_layer = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    return per_layer * layers


def optimizers() -> dict:
    return {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "asgo (tau=1)": lambda ps: asgo.ASGO(ps),
        "asgo (tau=10)": lambda ps: asgo.ASGO(ps, precondition_frequency=10),
        "asgo newton_schulz (tau=1)": lambda ps: asgo.ASGO(ps, root_method="newton_schulz"),
        "asgo eigh (tau=1)": lambda ps: asgo.ASGO(ps, root_method="eigh"),
        "dasgo": lambda ps: asgo.DASGO(ps),
    }


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


def time_steps(make, shapes, device, warmup: int, repeats: int) -> tuple[float, int]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make(params)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), state_bytes(opt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="nanogpt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    device = torch.device(args.device)
    layers, width = MODELS[args.model]
    shapes = hidden_matrix_shapes(layers, width)
    n_params = sum(a * b for a, b in shapes)
    print(f"{args.model}: {len(shapes)} hidden matrices, {n_params / 1e6:.2f}M parameters, "
          f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    results = {name: time_steps(make, shapes, device, args.warmup, args.repeats)
               for name, make in optimizers().items()}
    base_time, base_bytes = results["adamw"]
    print(f"\n| optimizer | step (ms) | x AdamW | state (MiB) | x AdamW |\n|---|---|---|---|---|")
    for name, (t, b) in results.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / base_time:.2f} | {b / 2**20:.1f} | {b / base_bytes:.2f} |")


if __name__ == "__main__":
    main()
