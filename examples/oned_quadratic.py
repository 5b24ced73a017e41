"""Paper 003, Figure 1: signSGD and medianSGD stall at the median; noise moves them to the mean.

Three workers hold f_i(x) = (x - a_i)^2 / 2 with a = (1, 2, 10). The target
f(x) = (1/3) sum_i f_i(x) has its minimum at the mean 13/3; the worker gradients are
g_i(x) = x - a_i, so their median vanishes at x = 2 (the median of a) and the true gradient
there is 2 - 13/3 = -7/3. The four algorithms, each step with tuneguard's own GARs:

- signSGD (majority vote):  x <- x - lr * aggregate("sign_majority", g, 0)
- medianSGD:                x <- x - lr * aggregate("median", g, 0)
- noisy signSGD / noisy medianSGD (003 Algorithms 3 and 4): the same on g_i + b * xi_i,
  xi_i ~ N(0, 1) drawn independently per worker and step.

The paper uses lr = 0.001 and x0 = 0.0005; this example keeps x0 and takes lr = 0.01 so that
6,000 steps suffice. Each algorithm runs `chains` independent copies at once: the rules are
coordinate-wise, so the copies are the columns of one [3, chains] tensor (column j is a
1-D run with its own noise). With no noise all columns are the same run.

    python examples/oned_quadratic.py                      # writes docs/figures/reproduction/oned_quadratic.png
    python examples/oned_quadratic.py -o /tmp/oned.png --steps 3000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneguard.aggregators import aggregate

A = (1.0, 2.0, 10.0)
MEAN = sum(A) / len(A)  # 13/3: the minimiser of f
MEDIAN = sorted(A)[len(A) // 2]  # 2: where the median gradient vanishes
RULES = {"signSGD": "sign_majority", "medianSGD": "median"}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "reproduction" / "oned_quadratic.png"


@dataclass
class Trajectory:
    """x_t of every chain, t = 0..steps (row 0 is x0)."""

    algorithm: str  # "signSGD" | "medianSGD"
    noise: float  # the b of 003 (0: the plain algorithm)
    lr: float
    xs: torch.Tensor  # [steps + 1, chains], float64

    @property
    def label(self) -> str:
        return self.algorithm if self.noise == 0 else f"noisy {self.algorithm} (b={self.noise:g})"

    def tail_mean(self, frac: float = 0.25) -> float:
        """Mean of x over the last `frac` of the steps and over the chains (the point it settles at)."""
        k = max(1, int(round((self.xs.shape[0] - 1) * frac)))
        return float(self.xs[-k:].mean())

    def true_gradient(self) -> torch.Tensor:
        """|f'(x_t)| = |x_t - 13/3| of the chain-mean iterate, per step."""
        return (self.xs.mean(dim=1) - MEAN).abs()

    def median_gradient(self) -> torch.Tensor:
        """|median_i g_i(x_t)| = |x_t - 2| of the chain-mean iterate (noise-free gradients), per step."""
        return (self.xs.mean(dim=1) - MEDIAN).abs()


def run(algorithm: str, noise: float = 0.0, *, steps: int = 6000, lr: float = 0.01, chains: int = 32,
        x0: float = 0.0005, seed: int = 0, a: tuple[float, ...] = A) -> Trajectory:
    """One algorithm on the 1-D example; `algorithm` is "signSGD" or "medianSGD"."""
    rule = RULES[algorithm]
    gen = torch.Generator().manual_seed(seed)
    targets = torch.tensor(a, dtype=torch.float64).unsqueeze(1)  # [n, 1]
    x = torch.full((chains,), x0, dtype=torch.float64)
    xs = torch.empty(steps + 1, chains, dtype=torch.float64)
    xs[0] = x
    for t in range(steps):
        grads = x.unsqueeze(0) - targets  # [n, chains]: g_i(x) = x - a_i
        if noise > 0:
            grads = grads + noise * torch.randn(grads.shape, generator=gen, dtype=torch.float64)
        x = x - lr * aggregate(rule, grads, 0)
        xs[t + 1] = x
    return Trajectory(algorithm, float(noise), lr, xs)


def fixed_point(algorithm: str, noise: float, *, samples: int = 400_000, seed: int = 0,
                a: tuple[float, ...] = A) -> float:
    """Where the noisy algorithm's expected update vanishes (Monte Carlo + bisection on [median, mean]):
    medianSGD: E[median(x - a_i + b xi_i)] = 0; signSGD: P[median(x - a_i + b xi_i) > 0] = 1/2
    (003 Proposition 1: the majority vote's sign is the sign of the median for odd n)."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.tensor(a, dtype=torch.float64).unsqueeze(1)
    xi = noise * torch.randn(len(a), samples, generator=gen, dtype=torch.float64)
    lo, hi = min(a), max(a)
    mid = len(a) // 2
    for _ in range(40):
        x = (lo + hi) / 2
        med = (x - targets + xi).sort(dim=0).values[mid]  # odd n
        drift = float(med.mean()) if algorithm == "medianSGD" else float((med > 0).double().mean()) - 0.5
        lo, hi = (x, hi) if drift < 0 else (lo, x)
    return (lo + hi) / 2


def simulate(noises: tuple[float, ...] = (3.0, 10.0), **kw) -> list[Trajectory]:
    """Every algorithm, plain and with each noise level b."""
    return [run(alg, b, **kw) for alg in RULES for b in (0.0, *noises)]


def _smooth(y: torch.Tensor, k: int) -> torch.Tensor:
    """Trailing moving average over k steps (shorter at the start)."""
    c = torch.cat([y.new_zeros(1), y.cumsum(0)])
    idx = torch.arange(1, len(y) + 1)
    lo = (idx - k).clamp_min(0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot(trajs: list[Trajectory], out: Path) -> Path:
    """Two rows (x_t; |f'(x_t)|), one column per algorithm family; a small palette PNG."""
    import io

    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(9.5, 6.0), dpi=100, layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    colors = {0.0: "tab:red", 3.0: "tab:orange", 10.0: "tab:blue"}
    for col, alg in enumerate(RULES):
        top, bottom = axes[0][col], axes[1][col]
        for tr in (t for t in trajs if t.algorithm == alg):
            steps = range(tr.xs.shape[0])
            c = colors.get(tr.noise, None)
            top.plot(steps, tr.xs.mean(dim=1).numpy(), lw=1.3, color=c,
                     label=f"{tr.label}: settles at {tr.tail_mean():.2f}")
            bottom.plot(steps, _smooth(tr.true_gradient(), 100).numpy(), lw=1.3, color=c, label=tr.label)
        top.axhline(MEDIAN, color="k", ls=":", lw=1, label="median of a = 2")
        top.axhline(MEAN, color="k", ls="--", lw=1, label="mean of a = 13/3 (the optimum)")
        top.set_title(f"{alg} on f(x) = mean_i (x - a_i)^2 / 2, a = (1, 2, 10)", fontsize=9)
        top.set_ylabel("x_t (mean over chains)", fontsize=8)
        top.set_ylim(-0.2, 4.9)
        top.legend(fontsize=7, loc="lower right")
        bottom.axhline(MEAN - MEDIAN, color="k", ls=":", lw=1, label="7/3: |f'| at the median")
        bottom.set_ylim(0, 4.5)
        bottom.set_ylabel("|f'(x_t)| = |x_t - 13/3| (100-step mean)", fontsize=8)
        bottom.set_xlabel(f"iteration (lr = {trajs[0].lr:g}, x0 = 0.0005)", fontsize=8)
        bottom.legend(fontsize=7, loc="upper right")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT,
                                   dither=Image.Dither.NONE).save(out, format="PNG", optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--chains", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # [3, chains] tensors: threads only add overhead
    trajs = simulate(steps=args.steps, lr=args.lr, chains=args.chains, seed=args.seed)
    print(f"median of a = {MEDIAN:g}, mean of a = {MEAN:.4f}")
    print(f"{'algorithm':<28} {'settles at (last 25%)':>22} {'|f-prime| there':>16} {'predicted fixed point':>22}")
    for tr in trajs:
        x = tr.tail_mean()
        pred = MEDIAN if tr.noise == 0 else fixed_point(tr.algorithm, tr.noise)
        print(f"{tr.label:<28} {x:>22.3f} {abs(x - MEAN):>16.3f} {pred:>22.3f}")
    out = plot(trajs, args.output)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
