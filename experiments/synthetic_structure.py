"""Experiment 2: where ASGO's structure assumptions pay off, on a matrix quadratic.

    python experiments/synthetic_structure.py [--smoke] [--out docs/results]

W in R^{m x n} (m = 32 < n = 64, so ASGO preconditions the m side), float64::

    f(W) = 0.5 tr((W - W*)^T H (W - W*)),   grad f = H (W - W*)
    H = Q diag(lambda) Q^T,  Q a random rotation,  lambda = 4 equal blocks of eigenvalues
        spread^(-j/3) (j = 0..3) times U(0.5, 1),  so lambda_max / lambda_min ~ 2 spread
    W_0 - W* = Q diag(lambda)^(-1/2) Q^T Z,  Z a random rank-r m x n matrix

The Hessian of vec(W) is I_n (x) H: block diagonal, one m x m block per column, and H has four
eigen-blocks whose scales differ by ``spread``. The row space of W - W* never changes under any
optimizer below, so every gradient has rank <= r. The H^(-1/2) factor gives every eigen-block an
equal share of f(W_0) in expectation, so the flat directions matter. The ASGO abstract claims
gains from low-rank gradients and block-diagonal Hessians; the rotation Q hides the structure
from Adam's diagonal.

Optimizers (weight decay 0, otherwise each one's defaults): SGD with momentum 0.9, torch Adam
(betas 0.9/0.999), asgo.Shampoo (Adam grafting, roots every step) and asgo.ASGO with
``update_rms=None`` (the plain V^(-1/2) M step; the authors' fixed-RMS update cannot converge on
a quadratic at a constant learning rate), roots every step, at the authors' beta2 = 0.8 and at
Adam's 0.999. Constant learning rates; each optimizer runs ``--steps`` steps at every learning
rate of its grid and the table reports the final f / f(W_0) at the best one. Two sweeps: rank at
spread 1 and at the largest spread; spread at rank 1 and at full rank (r = m). Writes
synthetic_structure.{csv,md} and synthetic_structure.png.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch

from _common import parser, setup, write_table
from asgo import ASGO, Shampoo

M, N = 32, 64
OPTIMIZERS = {
    "SGD": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "Adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "Shampoo": lambda p, lr: Shampoo(p, lr=lr, weight_decay=0.0),
    "ASGO b2=0.8": lambda p, lr: ASGO(p, lr=lr, weight_decay=0.0, update_rms=None),
    "ASGO b2=0.999": lambda p, lr: ASGO(p, lr=lr, weight_decay=0.0, update_rms=None, beta2=0.999),
}
SGD_LRS = [10 ** (k / 2) for k in range(-3, 3)]  # 0.03 .. 10; lambda_max(H) <= 1
ADAPTIVE_LRS = [10 ** (k / 2) for k in range(-6, 3)]  # 1e-3 .. 10


def quadratic(rank: int, spread: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    scales = torch.tensor([spread ** (-j / 3) for j in range(4)], dtype=torch.float64)
    lam = scales.repeat_interleave(M // 4) * (0.5 + 0.5 * torch.rand(M, generator=g, dtype=torch.float64))
    Q = torch.linalg.qr(rnd(M, M))[0]
    H = (Q * lam) @ Q.T
    D0 = (Q * lam.rsqrt()) @ Q.T @ rnd(M, rank) @ rnd(rank, N)
    D0 *= math.sqrt(M * N) / D0.norm()
    W_star = rnd(M, N)
    loss = lambda W: 0.5 * ((W - W_star) * (H @ (W - W_star))).sum().item()  # noqa: E731
    grad = lambda W: H @ (W - W_star)  # noqa: E731
    return W_star + D0, loss, grad


def final_ratio(name: str, lr: float, problem, steps: int) -> float:
    W0, loss, grad = problem
    W = torch.nn.Parameter(W0.clone())
    opt = OPTIMIZERS[name]([W], lr)
    for _ in range(steps):
        W.grad = grad(W.detach())
        opt.step()
    r = loss(W.detach()) / loss(W0)
    return r if math.isfinite(r) else math.inf


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--spreads", type=float, nargs="+", default=[1, 10, 100, 1e3, 1e4])
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.ranks, args.spreads = 40, [1, 32], [1e4]
    setup(args)
    lo, hi = min(args.spreads), max(args.spreads)
    settings = sorted({(r, s) for r in args.ranks for s in (lo, hi)}
                      | {(r, s) for s in args.spreads for r in (min(args.ranks), M)})
    rows = []
    for rank, spread in settings:
        problem = quadratic(rank, spread)
        row = dict(rank=rank, spread=spread)
        for name in OPTIMIZERS:
            lrs = SGD_LRS if name == "SGD" else ADAPTIVE_LRS
            ratios = {lr: final_ratio(name, lr, problem, args.steps) for lr in lrs}
            best = min(ratios, key=ratios.get)
            edge = " (grid edge)" if best in (lrs[0], lrs[-1]) else ""
            row[name], row[f"{name} lr"] = ratios[best], f"{best:.3g}{edge}"
        best_other = min(row[k] for k in ("SGD", "Adam", "Shampoo"))
        for name in ("ASGO b2=0.8", "ASGO b2=0.999"):
            row[f"{name} / best other"] = row[name] / best_other
        rows.append(row)
        print(", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    print(write_table(rows, args.out / "synthetic_structure"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    sweeps = [(axes[0], "rank", "spread", "gradient rank r", (lo, hi)),
              (axes[1], "spread", "rank", "block-scale spread", (min(args.ranks), M))]
    for ax, x_key, fixed_key, xlabel, fixed_values in sweeps:
        for fixed, style in zip(fixed_values, ["-", "--"]):
            sel = sorted((r for r in rows if r[fixed_key] == fixed), key=lambda r: r[x_key])
            for i, name in enumerate(OPTIMIZERS):
                ax.loglog([r[x_key] for r in sel], [max(r[name], 1e-16) for r in sel], style, color=f"C{i}",
                          marker="o", label=name if style == "-" else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"f / f(W_0) after {args.steps} steps (best lr)")
        ax.set_title(f"{x_key} sweep: solid {fixed_key} {fixed_values[0]:g}, "
                     f"dashed {fixed_key} {fixed_values[1]:g}")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Rotated block-scaled quadratic, W {M}x{N}: final loss at each optimizer's best lr")
    fig.tight_layout()
    fig.savefig(args.out / "synthetic_structure.png", dpi=110)
    return rows


if __name__ == "__main__":
    main()
