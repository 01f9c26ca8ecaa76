"""Optimizer ``step()`` time and state memory on a GPT's hidden matrices, as ratios to torch AdamW.

    python benchmarks/step_time.py --model nanogpt            # 6 layers, 384 wide (CPU default)
    python benchmarks/step_time.py --model nanogpt --threads 1 --only "asgo,muon,authors"   # ASGO's rows
    python benchmarks/step_time.py --model gpt2 --device cuda
    python benchmarks/step_time.py --model gpt2 --exclude shampoo --repeats 3   # CPU: skip the slow ones
    python benchmarks/step_time.py --smoke                    # tiny shapes, one repeat (the tests)
    python benchmarks/step_time.py --shapes 1536x384,384x1536,384x384 --threads 1 --only "asgo tau=1,shampoo tau=1"

Timed: the hidden 2-D weights of the harness model (attention q/k/v/o and MLP, shapes taken from
``asgo.harness.models.build_model(model)`` and routed by ``asgo.routing.route_parameters``, so
ASGO gets its head-wise Q/K groups exactly as ``asgo.build_optimizer`` would give them); those are
what a matrix optimizer updates. Embeddings, norms and biases go to AdamW in every configuration
and are left out. Every optimizer uses the hyper-parameters of its harness config
(``src/asgo/harness/conf/optimizer/<name>.yaml``) plus the variant's overrides, against
``torch.optim.AdamW`` with the adamw config's settings, all measured in the same run.

ASGO's own baselines (``AUTHORS_ROWS``) take every matrix whole, as the authors' code does (no
head-wise split): ``authors' loop tau=1`` is :class:`AuthorsLoopASGO`, a plain transcription of
the authors' step (float32, one parameter at a time, their Polar Express root every step), and
``asgo tau=1 official unsplit`` is ``asgo.ASGO(compat='official')`` on the same matrices, the same
maths batched. Muon runs with torch's bfloat16 Newton-Schulz (``muon``) and in float32
(``muon fp32 NS``), since a CPU without bfloat16 matrix units runs bfloat16 matmuls slowly.

Per optimizer: ``--warmup`` steps (state allocation, first roots), then ``--repeats`` timed steps
with fixed random gradients. ``median`` is the typical step; ``mean`` over the repeats amortises
periodic work (``--repeats`` defaults to a multiple of 10, so an every-10-steps root refresh is
counted in proportion; a multiple of 5 and 10 for tau = 5). ``cpu`` is the median CPU time of the
process per step (``time.process_time``), which other processes on a shared machine inflate less
than wall time. The ratios of ASGO's rows to AdamW, Muon and the authors' loop are printed
after the table, all from this one run. GaLore's/GoLore's basis refresh comes every ``update_proj_gap=200``
steps, which no short run amortises, so the ``refresh every step`` rows time the refresh itself:
amortised cost at gap g ~ median + (refresh - median) / g.
"""

from __future__ import annotations

import argparse
import json
import math
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
    ("asgo tau=1 polar_express", "asgo", {"precondition_frequency": 1, "root_method": "polar_express"}),
    ("asgo tau=5", "asgo", {"precondition_frequency": 5}),
    ("asgo tau=10", "asgo", {"precondition_frequency": 10}),
    ("dasgo", "dasgo", {}),
    ("muon", "muon", {}),
    ("muon fp32 NS", "muon", {"ns_dtype": torch.float32}),
    ("shampoo tau=1", "shampoo", {"precondition_frequency": 1}),
    ("shampoo tau=10", "shampoo", {"precondition_frequency": 10}),
    ("adafactor", "adafactor", {}),
    ("galore r128 gap200", "galore", {}),
    ("galore r128 refresh every step", "galore", {"update_proj_gap": 1}),
    ("golore r128 gap200", "golore", {"golore_fraction": 1.0}),
    ("golore r128 refresh every step", "golore", {"golore_fraction": 1.0, "update_proj_gap": 1}),
]
BASELINE = "adamw"
AUTHORS_ROWS = ["authors' loop tau=1", "asgo tau=1 official unsplit"]
# (numerator, denominator) rows of the printed ratios
RATIOS = [(a, b) for a in ("asgo tau=1", "asgo tau=1 polar_express", "asgo tau=5", "asgo tau=1 official unsplit")
          for b in ("adamw", "muon", "muon fp32 NS", "authors' loop tau=1")]
RATIOS += [("shampoo tau=1", "asgo tau=1")]


class AuthorsLoopASGO(torch.optim.Optimizer):
    """The ASGO authors' step, parameter by parameter in float32, transcribed as
    ``tests/optim/test_asgo.py::official_asgo_step_fp32`` (``asgo.ASGO(compat='official')``'s
    maths)::

        M.lerp_(G, 1 - beta1); V.mul_(beta2).add_(P, alpha=1 - beta2)   # P = G G^T or G^T G (smaller side)
        Q = PolarExpress(V)   # c = 1.01 ||V + eps I||_F, Y = V / c, Z = I; root_steps coupled steps; Z / sqrt(c)
        Q = I if Q is not finite;  U = Q M (m < n) or M Q;  U *= update_rms sqrt(mn) / ||U||_F
        W.mul_(1 - lr wd).sub_(lr U)

    with the root every ``precondition_frequency`` steps (theirs: every step)."""

    def __init__(self, params, lr, momentum, beta2, eps, weight_decay, root_steps=10, update_rms=0.2,
                 precondition_frequency=1):
        super().__init__(params, dict(lr=lr, momentum=momentum, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                      root_steps=root_steps, update_rms=update_rms,
                                      precondition_frequency=precondition_frequency))

    @staticmethod
    def inverse_root(V: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
        eye = torch.eye(V.shape[0], dtype=V.dtype)
        c = 1.01 * torch.linalg.norm(V + eps * eye)
        Y, Z = V / c, eye.clone()
        for a, b, cc in asgo.linalg.polar_express_coefficients(steps):
            ZY = Z @ Y
            B = b * ZY + cc * ZY @ ZY
            Y = a * Y + Y @ B
            Z = a * Z + B @ Z
        return Z / c.sqrt()

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                G, (m, n), state = p.grad, p.shape, self.state[p]
                if not state:
                    s = min(m, n)
                    state.update(step=0, M=torch.zeros_like(p), V=torch.zeros(s, s), Q=torch.eye(s))
                state["step"] += 1
                state["M"].lerp_(G, 1 - group["momentum"])
                state["V"].mul_(group["beta2"]).add_(G @ G.T if m < n else G.T @ G, alpha=1 - group["beta2"])
                if (state["step"] - 1) % group["precondition_frequency"] == 0:
                    Q = self.inverse_root(state["V"], group["eps"], group["root_steps"])
                    state["Q"] = Q if torch.isfinite(Q).all() else torch.eye(Q.shape[0])
                U = state["Q"] @ state["M"] if m < n else state["M"] @ state["Q"]
                U = U * group["update_rms"] * math.sqrt(m * n) / U.norm().item()
                p.mul_(1 - group["lr"] * group["weight_decay"]).sub_(group["lr"] * U)


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
    if row in AUTHORS_ROWS:
        settings = config_settings("asgo", {"precondition_frequency": 1})
        if row.startswith("authors"):
            return AuthorsLoopASGO(params, **{k: settings[k] for k in (
                "lr", "momentum", "beta2", "eps", "weight_decay", "root_steps", "update_rms",
                "precondition_frequency")})
        return asgo.ASGO(params, **{**settings, "compat": "official"})
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
    times, cpu = [], []
    for i in range(warmup + repeats):
        for p, g in zip(params, grads):
            p.grad = g
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"optimizer": row, "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "cpu_median_s": statistics.median(cpu), "state_bytes": state_bytes(opt)}


def meta_state_bytes(row: str, matrices) -> dict:
    """State bytes only, from one step on meta tensors (no memory, no time): for the rows too slow
    to time on this machine (``--state-only``)."""
    params = [torch.nn.Parameter(torch.empty(shape, device="meta")) for shape, _ in matrices]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = make_optimizer(row, params, [h for _, h in matrices])
    opt.step()
    return {"optimizer": row, "median_s": None, "mean_s": None, "cpu_median_s": None,
            "state_bytes": state_bytes(opt)}


def benchmark(model: str, device: str = "cpu", warmup: int = 3, repeats: int = 20,
              rows: list[str] | None = None, matrices=None, state_only: tuple[str, ...] = ()) -> list[dict]:
    """Time every optimizer row on ``model``'s hidden matrices; ratios against torch AdamW.
    Rows containing a ``state_only`` substring get their state bytes only (meta dry step)."""
    device = torch.device(device)
    matrices = matrices or hidden_matrices(model)
    rows = rows or [v[0] for v in VARIANTS] + AUTHORS_ROWS
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
        r["cpu_x_adamw"] = r["cpu_median_s"] / base["cpu_median_s"] if timed else None
        r["state_x_adamw"] = r["state_bytes"] / base["state_bytes"]
    return results


def format_table(results: list[dict]) -> str:
    lines = ["| optimizer | median step (ms) | x AdamW | mean step (ms) | x AdamW | cpu median (ms) | x AdamW "
             "| state (MiB) | x AdamW |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["median_s"] is None:
            times = "not timed | - | not timed | - | not timed | -"
        else:
            times = (f"{r['median_s'] * 1e3:.2f} | {r['median_x_adamw']:.2f} | "
                     f"{r['mean_s'] * 1e3:.2f} | {r['mean_x_adamw']:.2f} | "
                     f"{r['cpu_median_s'] * 1e3:.2f} | {r['cpu_x_adamw']:.2f}")
        lines.append(f"| {r['optimizer']} | {times} | {r['state_bytes'] / 2**20:.2f} | {r['state_x_adamw']:.2f} |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[dict]:
    """The ``RATIOS`` whose two rows were both timed in this run: medians (wall and cpu) and means."""
    by = {r["optimizer"]: r for r in results if r["median_s"] is not None}
    return [{"row": a, "over": b, **{k: by[a][k] / by[b][k] for k in ("median_s", "cpu_median_s", "mean_s")}}
            for a, b in RATIOS if a in by and b in by]


def format_ratios(rows: list[dict]) -> str:
    lines = ["| ratio (this run) | median | cpu median | mean |", "|---|---|---|---|"]
    lines += [f"| {r['row']} / {r['over']} | {r['median_s']:.2f} | {r['cpu_median_s']:.2f} | {r['mean_s']:.2f} |"
              for r in rows]
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
    parser.add_argument("--shapes", default="", help="comma-separated MxN matrices (one head each) "
                        "instead of the model's, e.g. 1536x384,384x1536,384x384")
    args = parser.parse_args(argv)

    rows = [v[0] for v in VARIANTS] + AUTHORS_ROWS
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
    elif args.shapes:
        matrices = [(tuple(int(d) for d in s.split("x")), 1) for s in args.shapes.split(",")]
    else:
        matrices = hidden_matrices(args.model)
    n_params = sum(torch.Size(s).numel() for s, _ in matrices)
    print(f"{'smoke' if args.smoke else args.shapes or args.model}: {len(matrices)} hidden matrices, {n_params / 1e6:.2f}M "
          f"parameters; {machine(device)}; warm-up {args.warmup}, repeats {args.repeats}", flush=True)
    state_only = tuple(x for x in args.state_only.split(",") if x)
    results = benchmark(args.model, args.device, args.warmup, args.repeats, rows, matrices, state_only)
    print(format_table(results))
    measured = ratios(results)
    if measured:
        print(format_ratios(measured))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": str(device), "machine": machine(device),
                                         "results": results, "ratios": measured}, indent=2))
    return results


if __name__ == "__main__":
    main()
