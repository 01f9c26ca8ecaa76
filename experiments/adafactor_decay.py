"""Experiment 4 (matrix half): Adafactor's decay rate c, after Hong & Lin (NeurIPS 2025).

    python experiments/adafactor_decay.py [--smoke] [--out docs/results] [--noise minibatch|gaussian]

asgo.Adafactor is their Algorithm 1 (no momentum): beta2_1 = 1/2, beta2_k = 1 - k^(-c) for
k >= 2, step rho_k = rho_0 k^(-p), update clipping eta_k = rho_k / max(1, RMS(U_k) / d_k).
Grid: c in {0.5, ..., 1.0}; p = 0 (constant step) and p = 1/2 (decaying), each at three rho_0,
without clipping; at the middle rho_0 also with constant d = 1 and with the time-varying
d_k = k^(c / (2 (alpha - 1))), alpha = ``--clip-alpha``.

Problem: robust (Cauchy-loss) matrix regression, smooth, non-convex, with bounded gradients::

    f(X) = mean_ij log(1 + (A X B - Y)_ij^2),   X in R^{32 x 16},  X_0 = 0
    A in R^{64 x 32} with column scales logspace(-1, 1) (rows of grad f differ ~100x),
    B in R^{16 x 48},  Y = A X* B + 0.1 N(0, 1) + 10% outliers of scale 10

Stochastic gradients (``--noise``): ``minibatch`` (default) is the gradient of the loss on a
random subset of the 64 x 48 residual entries, each kept with probability q (``--q``) and
reweighted by 1/q: unbiased and almost surely bounded, as the analysis assumes; ``gaussian`` adds
sigma g_0 (s t^T) * N(0, 1) to grad f, g_0 the RMS entry of grad f(X_0) and s, t fixed
log-normal row and column scales. The analysis bounds (1/T) sum_k ||grad f(X_k)||^2 by
O~(T^(1/2 - c)) (c = 1 best; the ICLR version's statement, docs/papers.md). Reported, mean and
std over seeds (noise draws; the problem is fixed), with grad2_k = ||grad f(X_k)||^2 /
||grad f(X_0)||^2: ``mean_k grad2`` (that average), ``final grad2`` and ``final f`` (means over
the last 10% of steps). Writes adafactor_decay[_gaussian].{csv,md} and .png.
"""

from __future__ import annotations

import statistics

import matplotlib.pyplot as plt
import torch

from _common import parser, setup, write_table
from asgo import Adafactor

CS = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


class CauchyRegression:
    def __init__(self, noise: str, q: float, sigma: float, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        self.A = rnd(64, 32) * torch.logspace(-1, 1, 32, dtype=torch.float64) / 32**0.5
        self.B = rnd(16, 48) / 16**0.5
        outliers = (torch.rand(64, 48, generator=g, dtype=torch.float64) < 0.1) * 10 * rnd(64, 48)
        self.Y = self.A @ rnd(32, 16) @ self.B + 0.1 * rnd(64, 48) + outliers
        self.X0 = torch.zeros(32, 16, dtype=torch.float64)
        self.noise, self.q = noise, q
        g0 = self.grad(self.X0)
        self.noise_scale = sigma * g0.norm() / g0.numel() ** 0.5 * torch.outer(
            (0.5 * rnd(32)).exp(), (0.5 * rnd(16)).exp())

    def loss(self, X):
        return torch.log1p((self.A @ X @ self.B - self.Y).square()).mean().item()

    def grad(self, X, weights=1.0):
        R = self.A @ X @ self.B - self.Y
        return self.A.T @ (weights * 2 * R / (1 + R.square())) @ self.B.T / R.numel()

    def stochastic_grad(self, X, gen):
        if self.noise == "minibatch":
            keep = torch.rand(self.Y.shape, generator=gen, dtype=X.dtype) < self.q
            return self.grad(X, keep / self.q)
        return self.grad(X) + self.noise_scale * torch.randn(X.shape, generator=gen, dtype=X.dtype)


def run(problem, c, lr, lr_decay, clip, clip_alpha, steps, seed):
    """Return ||grad f(X_k)||^2 for k = 0..steps-1 and f at every step."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.nn.Parameter(problem.X0.clone())
    opt = Adafactor([X], lr=lr, c=c, lr_decay=lr_decay, clip_threshold=None if clip == "none" else 1.0,
                    clip_alpha=clip_alpha if clip == "d_k" else None)
    sq_norms, losses = [], []
    for _ in range(steps):
        sq_norms.append(problem.grad(X.detach()).square().sum().item())
        X.grad = problem.stochastic_grad(X.detach(), gen)
        opt.step()
        losses.append(problem.loss(X.detach()))
    return sq_norms, losses


def mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--noise", choices=["minibatch", "gaussian"], default="minibatch")
    p.add_argument("--q", type=float, default=0.02, help="minibatch: fraction of entries per step")
    p.add_argument("--sigma", type=float, default=1.0, help="gaussian: noise RMS / RMS grad f(X_0)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs-constant", type=float, nargs=3, default=[3e-3, 1e-2, 3e-2], help="rho_0, p = 0")
    p.add_argument("--lrs-decaying", type=float, nargs=3, default=[3e-2, 1e-1, 3e-1], help="rho_0, p = 1/2")
    p.add_argument("--clip-alpha", type=float, default=4.0)
    args = p.parse_args(argv)
    cs = CS
    if args.smoke:
        args.steps, args.seeds, cs = 50, 1, [0.5, 1.0]
    setup(args)
    problem = CauchyRegression(args.noise, args.q, args.sigma)
    g0 = problem.grad(problem.X0).square().sum().item()
    schedules = {0.0: args.lrs_constant, 0.5: args.lrs_decaying}
    configs = [(p_, lr, clip) for p_, lrs in schedules.items() for lr in lrs
               for clip in ["none", "d=1", "d_k"] if clip == "none" or lr == lrs[1]]
    tail = max(1, args.steps // 10)
    rows, curves = [], {}
    for p_, lr, clip in configs:
        for c in cs:
            avg, final, loss = [], [], []
            for seed in range(args.seeds):
                sq, f = run(problem, c, lr, p_, clip, args.clip_alpha, args.steps, seed)
                avg.append(statistics.fmean(sq) / g0)
                final.append(statistics.fmean(sq[-tail:]) / g0)
                loss.append(statistics.fmean(f[-tail:]))
                if seed == 0 and clip == "none" and lr == schedules[p_][1]:
                    curves[p_, c] = [x / g0 for x in sq]
            (am, asd), (fm, fsd), (lm, lsd) = mean_std(avg), mean_std(final), mean_std(loss)
            rows.append({"p": p_, "rho_0": lr, "clipping": clip, "c": c, "mean_k grad2": am,
                         "sd(mean_k)": asd, "final grad2": fm, "sd(final)": fsd, "final f": lm, "sd(f)": lsd})
            print(f"p={p_:g} rho_0={lr:g} clip={clip:4s} c={c:.1f}: mean_k |g|^2 {am:.3g}+-{asd:.2g}, "
                  f"final |g|^2 {fm:.3g}+-{fsd:.2g}, final f {lm:.4g}+-{lsd:.2g}", flush=True)
    print(f"f(X_0) = {problem.loss(problem.X0):.4g}")
    name = "adafactor_decay" + ("" if args.noise == "minibatch" else f"_{args.noise}")
    print(write_table(rows, args.out / name))

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for col, (p_, lrs) in enumerate(schedules.items()):
        ax = axes[0, col]
        for lr, clip in [(lr, "none") for lr in lrs] + [(lrs[1], "d=1"), (lrs[1], "d_k")]:
            sel = [r for r in rows if r["p"] == p_ and r["rho_0"] == lr and r["clipping"] == clip]
            style = {"none": "-o", "d=1": "--s", "d_k": ":d"}[clip]
            color = {"none": f"C{lrs.index(lr)}", "d=1": "C3", "d_k": "C4"}[clip]
            ax.errorbar([r["c"] for r in sel], [r["final grad2"] for r in sel],
                        yerr=[r["sd(final)"] for r in sel], fmt=style, capsize=3, color=color,
                        label=f"rho_0={lr:g}, clip {clip}")
        ax.set_yscale("log")
        ax.set_xlabel("c  (beta2_k = 1 - k^-c)")
        ax.set_ylabel("final |grad f|^2 / |grad f(X_0)|^2")
        step = "rho_k = rho_0 (constant)" if p_ == 0 else f"rho_k = rho_0 k^-{p_:g}"
        ax.set_title(f"{step}: last 10% of {args.steps} steps, mean+-sd of {args.seeds} seeds", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
        ax = axes[1, col]
        window = max(1, args.steps // 50)
        for i, c in enumerate(cs):
            sq = curves[p_, c]
            ks = range(0, len(sq), window)
            ax.loglog([k + 1 for k in ks], [statistics.fmean(sq[k:k + window]) for k in ks],
                      color=plt.cm.viridis(i / max(1, len(cs) - 1)), label=f"c = {c:g}")
        ax.set_xlabel("step k")
        ax.set_ylabel("|grad f(X_k)|^2 / |grad f(X_0)|^2")
        ax.set_title(f"rho_0 = {lrs[1]:g}, p = {p_:g}, no clipping, seed 0, means over {window} steps",
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    noise = f"minibatch q={args.q:g}" if args.noise == "minibatch" else f"gaussian sigma={args.sigma:g}"
    fig.suptitle(f"Adafactor (Hong & Lin Alg. 1), noisy Cauchy-loss matrix regression ({noise} noise)")
    fig.tight_layout()
    fig.savefig(args.out / f"{name}.png", dpi=110)
    return rows


if __name__ == "__main__":
    main()
