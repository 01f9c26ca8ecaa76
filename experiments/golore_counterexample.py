"""Experiment 3: the GoLore paper's counter-example (He et al., ICML 2025, problem (1)).

    python experiments/golore_counterexample.py [--smoke] [--out docs/results]

X in R^{n x n}, n = 10, r = 4, sigma = 1 (the paper's exp/main.py)::

    A = [I_{n-r}, 0],   B = blockdiag(sigma randn(n-r, n-r), 0_{r x r})
    f(X) = 0.5 ||A X||_F^2 + <B, X>,   grad f = A^T A X + B   (only the top n-r rows)
    X_0 = [[sigma/2 I_{n-r}, 0]; sigma randn(r, n)],   f* = -0.5 ||B||_F^2

Noise, added to grad f at every step:

* ``paper``: xi = +-sigma blockdiag(0_{n-r}, I_r), fair coin. Once the true gradient's singular
  values fall below sigma, GaLore's top-r SVD basis spans the noise rows only and the top rows
  freeze: f - f* stalls at O(sigma^2).
* ``isotropic``: xi = sigma randn(n, n) / sqrt(n); the SVD basis is no longer biased towards a
  fixed noise subspace and GaLore should converge (the paper's isotropic-noise result).

Methods (all rank r, left projection, basis refreshed every ``tau`` steps): GaLore (SVD basis),
GoLore (random basis), GoLore@75% (GaLore for the first 25% of the steps), L.B. GaLore (GaLore
whose gradient at each refresh step averages ``K`` noise draws, the GoLore code's large batch at
projection time) and the full-rank inner optimizer (torch.optim.SGD / AdamW). Inner optimizers:
MSGD (momentum 0.9) and AdamW (weight decay 0). B and X_0 use seed 42 as the paper; the noise
and the random bases vary with the run seed. Writes golore_counterexample.{csv,md} (f*, and
f - f* at the start and at the end, mean and max over seeds) and golore_counterexample.png
(f - f* vs step, seed 0).
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch

from _common import parser, setup, write_table
from asgo import GaLore

METHODS = ["GaLore", "GoLore", "GoLore@75%", "L.B. GaLore", "full-rank"]
GOLORE_FRACTION = {"GaLore": 0.0, "GoLore": 1.0, "GoLore@75%": 0.75, "L.B. GaLore": 0.0}


class CounterExample:
    def __init__(self, noise: str = "paper", n: int = 10, r: int = 4, sigma: float = 1.0,
                 seed: int = 42, noise_seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n, self.r, self.sigma, self.noise_kind = n, r, sigma, noise
        top = n - r
        self.B = torch.zeros(n, n, dtype=torch.float64)
        self.B[:top, :top] = torch.randn(top, top, generator=g, dtype=torch.float64) * sigma
        X0_top = torch.cat([sigma / 2 * torch.eye(top), torch.zeros(top, r)], dim=1)
        self.X0 = torch.cat([X0_top, torch.randn(r, n, generator=g) * sigma]).double()
        self.noise_dir = torch.zeros(n, n, dtype=torch.float64)
        self.noise_dir[top:, top:] = sigma * torch.eye(r)
        self.f_star = -0.5 * self.B.square().sum().item()
        self.gen = torch.Generator().manual_seed(noise_seed)

    def gap(self, X: torch.Tensor) -> float:
        """f(X) - f*."""
        top = self.n - self.r
        return (0.5 * X[:top].square().sum() + (self.B * X).sum()).item() - self.f_star

    def stochastic_grad(self, X: torch.Tensor, batch: int = 1) -> torch.Tensor:
        """grad f(X) plus the mean of ``batch`` noise draws."""
        G = self.B.clone()
        G[: self.n - self.r] += X[: self.n - self.r]
        if self.noise_kind == "paper":
            signs = torch.randint(0, 2, (batch,), generator=self.gen, dtype=torch.float64) * 2 - 1
            return G + signs.mean() * self.noise_dir
        xi = torch.randn(batch, self.n, self.n, generator=self.gen, dtype=torch.float64)
        return G + self.sigma * xi.mean(0) / math.sqrt(self.n)


def make_optimizer(method: str, inner: str, params, lr: float, tau: int, steps: int, seed: int):
    if method == "full-rank":
        if inner == "msgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, eps=1e-6)
    return GaLore(params, lr=lr, rank=4, update_proj_gap=tau, proj_type="left",
                  inner="sgd" if inner == "msgd" else "adamw", momentum=0.9, eps=1e-6,
                  golore_fraction=GOLORE_FRACTION[method], total_steps=steps, seed=seed)


def run(method, inner, noise, steps, lr, tau, batch, seed, log_every):
    """Return f - f* every ``log_every`` steps (step 0 first)."""
    problem = CounterExample(noise, noise_seed=seed)
    X = torch.nn.Parameter(problem.X0.clone())
    opt = make_optimizer(method, inner, [X], lr, tau, steps, seed)
    gaps = [problem.gap(X.detach())]
    for t in range(steps):
        refresh = method == "L.B. GaLore" and t % tau == 0
        X.grad = problem.stochastic_grad(X.detach(), batch if refresh else 1)
        opt.step()
        if (t + 1) % log_every == 0:
            gaps.append(problem.gap(X.detach()))
    return gaps


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--tau", type=int, default=50, help="basis refresh period")
    p.add_argument("--batch", type=int, default=16, help="L.B. GaLore's batch at refresh steps")
    p.add_argument("--lr-msgd", type=float, default=1e-3)
    p.add_argument("--lr-adamw", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds = 1000, 1
    setup(args)
    log_every = max(1, args.steps // 200)
    lrs = {"msgd": args.lr_msgd, "adamw": args.lr_adamw}
    rows, curves = [], {}
    for noise in ["paper", "isotropic"]:
        for inner in ["msgd", "adamw"]:
            for method in METHODS:
                finals = []
                for seed in range(args.seeds):
                    gaps = run(method, inner, noise, args.steps, lrs[inner], args.tau, args.batch,
                               seed, log_every)
                    finals.append(gaps[-1])
                    if seed == 0:
                        curves[noise, inner, method] = gaps
                rows.append(dict(noise=noise, inner=inner, method=method, lr=lrs[inner],
                                 steps=args.steps, f_star=CounterExample().f_star,
                                 gap_start=curves[noise, inner, method][0],
                                 gap_final_mean=sum(finals) / len(finals), gap_final_max=max(finals)))
                print(f"{noise:9s} {inner:5s} {method:12s} f-f* at the end: "
                      f"mean {rows[-1]['gap_final_mean']:.3g} max {rows[-1]['gap_final_max']:.3g}", flush=True)
    print(write_table(rows, args.out / "golore_counterexample"))

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    x = [i * log_every for i in range(args.steps // log_every + 1)]
    panels = [(noise, inner) for noise in ["paper", "isotropic"] for inner in ["msgd", "adamw"]]
    for ax, (noise, inner) in zip(axes.flat, panels):
        for method in METHODS:
            ax.semilogy(x, [max(g, 1e-12) for g in curves[noise, inner, method]], label=method)
        ax.set_title(f"{noise} noise, inner {'MSGD' if inner == 'msgd' else 'AdamW'} (lr {lrs[inner]:g})")
        ax.set_ylabel("f(X) - f*  (floored at 1e-12)")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0, 0].legend()
    fig.suptitle(f"GoLore counter-example (n=10, r=4, sigma=1, tau={args.tau}, seed 0)")
    fig.tight_layout()
    fig.savefig(args.out / "golore_counterexample.png", dpi=110)
    return rows


if __name__ == "__main__":
    main()
