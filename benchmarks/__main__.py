"""Run every benchmark figure, one after another, each in its own process, and write BENCHMARKS.md.

    python -m benchmarks                       # every figure; each writes its section of BENCHMARKS.md
    python -m benchmarks --quick               # smoke run: tiny repeats and steps, writes nothing
    python -m benchmarks --only aggregators tune_overhead --no-write
    python -m benchmarks --list                # the figures and their exact commands

Each figure runs as ``python -m benchmarks.<script> ...`` in a fresh process, so torch thread
settings, Ray clusters and memory do not carry from one to the next. Output streams through
with a progress line per figure; a figure that fails is reported and the others still run (the
exit status is then 1). The aggregation rules run twice, at n = 15 and n = 51, each into its
own section. ``grid_projection_gpu`` runs only where CUDA is available.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Figure:
    name: str
    number: int
    what: str
    module: str
    full: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)
    write_flag: str | None = "--write"  # added when writing
    no_write_flag: str | None = None  # added when not writing (scripts that write by default)
    needs_cuda: bool = False
    group: str = ""

    def args(self, quick: bool, write: bool) -> list[str]:
        out = list(self.quick if quick else self.full)
        if write:
            if self.write_flag:
                out.append(self.write_flag)
        elif self.no_write_flag:
            out.append(self.no_write_flag)
        return out

    def command(self, quick: bool, write: bool) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args(quick, write)]


FIGURES = [
    Figure("clipping", 1, "DP gradients vs the non-private floor, the generic path and Opacus (b = 25..1500)",
           "benchmarks.clipping", quick=["--batches", "25", "--repeats", "3", "--slow-repeats", "1"]),
    Figure("train_step", 2, "one full local-engine step per GAR and attack vs the floor", "benchmarks.train_step",
           quick=["--steps", "2", "--repeats", "1", "--batch-sizes", "25", "--gars", "mda", "--attacks", "none"]),
    Figure("aggregators", 3, "GAR latencies at n = 15, d = 79,510", "benchmarks.aggregators",
           full=["--n", "15"], quick=["--n", "15", "--repeats", "2", "--no-single-thread"],
           write_flag=None, no_write_flag="--no-write", group="aggregators"),
    Figure("aggregators_n51", 3, "GAR latencies at n = 51, d = 79,510 (f = 3 and 12, the largest f Bulyan takes)",
           "benchmarks.aggregators", full=["--n", "51", "--fs", "3,12"],
           quick=["--n", "51", "--fs", "3,12", "--repeats", "1", "--no-single-thread"],
           write_flag=None, no_write_flag="--no-write", group="aggregators"),
    Figure("actor_overhead", 4, "actor engine vs local engine", "benchmarks.actor_overhead",
           quick=["--steps", "1", "--repeats", "1", "--batch-sizes", "50"]),
    Figure("ray_transport", 4, "one step's data flow in Ray alone: actor tasks vs a compiled graph, and what "
           "idle compiled-graph actors burn", "benchmarks.ray_transport", quick=["--rounds", "5"]),
    Figure("tune_overhead", 5, "a tune job's wall time vs the sum of its trials' training time",
           "benchmarks.tune_overhead",
           quick=["--steps", "6", "--eval-every", "3", "--batch-sizes", "25", "50", "--repeats", "1"]),
    Figure("grid_projection", 6, "the 001 Fashion-MNIST grid: sampled cost, projected hours vs the floor",
           "benchmarks.grid_projection", group="grid_projection",
           quick=["--steps", "2", "--warmup", "1", "--batch-sizes", "25", "--gars", "mda", "average", "--fs", "3",
                  "--attacks", "little", "--validate", "mda:25", "--validate-steps", "5", "--floor-repeats", "1",
                  "--mlflow-repeats", "1"]),
    Figure("engine_job", 7, "the quickstart tune job on the actor engine vs the local engine (wall, actor "
           "start-ups, peak memory)", "benchmarks.engine_job",
           quick=["--repeats", "1", "--set", "base.steps=10", "--set", "tune.num_samples=2"]),
    Figure("grid_projection_gpu", 6, "the same projection on the GPU (only where CUDA is available)",
           "benchmarks.grid_projection", full=["--device", "cuda"], group="grid_projection", needs_cuda=True,
           quick=["--device", "cuda", "--steps", "2", "--warmup", "1", "--batch-sizes", "25", "--gars", "mda",
                  "--fs", "3", "--attacks", "little", "--validate", "--floor-repeats", "1", "--mlflow-repeats", "1"]),
]


def select(names: list[str] | None) -> list[Figure]:
    if not names:
        return list(FIGURES)
    known = {f.name for f in FIGURES} | {f.group for f in FIGURES if f.group}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}; valid: {', '.join(sorted(known))}")
    return [f for f in FIGURES if f.name in names or (f.group and f.group in names)]


def cuda_available() -> bool:
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True).returncode == 0


def run_figure(fig: Figure, cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd`` with its output streamed through; (exit status, the output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()
    return proc.wait(), "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny repeats/steps; never writes BENCHMARKS.md")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these figures (names or groups; see --list)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    ap.add_argument("--stop-on-failure", action="store_true", help="stop at the first figure that fails")
    ap.add_argument("--list", action="store_true", help="list the figures and their commands, run nothing")
    args = ap.parse_args(argv)
    write = not (args.quick or args.no_write)
    figures = select(args.only)
    if args.list:
        for f in FIGURES:
            print(f"{f.name} (figure {f.number}): {f.what}")
            print("    full:  " + " ".join(["python", "-m", f.module, *f.args(False, True)]))
            print("    quick: " + " ".join(["python", "-m", f.module, *f.args(True, False)]))
        return 0
    if not os.environ.get("TUNEGUARD_DATA_DIR"):
        print("note: TUNEGUARD_DATA_DIR is not set; the figures that load Fashion-MNIST look in "
              "~/.cache/tuneguard/datasets", flush=True)
    mode = "quick (smoke run, nothing written)" if args.quick else ("writing BENCHMARKS.md" if write else "printing only")
    print(f"benchmarks: {len(figures)} figure(s), {mode}", flush=True)
    has_cuda = cuda_available() if any(f.needs_cuda for f in figures) else False
    results: list[tuple[Figure, str, float]] = []
    start = time.time()
    for i, fig in enumerate(figures, 1):
        cmd = fig.command(args.quick, write)
        shown = " ".join(["python", "-m", fig.module, *fig.args(args.quick, write)])
        if fig.needs_cuda and not has_cuda:
            print(f"\n[{i}/{len(figures)}] {fig.name} (figure {fig.number}): skipped, no CUDA device here", flush=True)
            results.append((fig, "skipped (no GPU)", 0.0))
            continue
        print(f"\n[{i}/{len(figures)}] {fig.name} (figure {fig.number}): {fig.what}\n$ {shown}", flush=True)
        t = time.time()
        code, output = run_figure(fig, cmd)
        took = time.time() - t
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"[{i}/{len(figures)}] {fig.name}: {status} in {took:.0f} s (total {time.time() - start:.0f} s)",
              flush=True)
        results.append((fig, status, took))
        if code != 0 and args.stop_on_failure:
            break
    print("\nsummary:")
    for fig, status, took in results:
        print(f"  {fig.name:22s} figure {fig.number}  {status:20s} {took:7.0f} s")
    print(f"  total {time.time() - start:.0f} s" + ("; BENCHMARKS.md updated" if write else ""))
    return 0 if all(s == "ok" or s.startswith("skipped") for _, s, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
