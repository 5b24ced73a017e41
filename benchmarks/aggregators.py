"""Time every aggregation rule at the paper's size: n = 15 workers, d = 79,510 (MLP 784-100-10).

    python -m benchmarks.aggregators                  # both tables, written to BENCHMARKS.md
    python -m benchmarks.aggregators --n 51 --fs 3,12 # a larger cluster: its own section
    python -m benchmarks.aggregators --repeats 10 --no-write
    python -m benchmarks.aggregators --device cuda --no-write
    PYTHONPATH=/path/to/byzfl python -m benchmarks.aggregators   # adds the ByzFL column

Inputs: n - f honest-like float32 vectors (a shared mean plus noise) and f Byzantine ones from
the ``little`` attack. A third table uses isotropic inputs: n i.i.d. N(0, I) vectors, what the
honest submissions look like once DP noise dominates; branch-and-bound searches (MDA) prune
nothing there. Where ByzFL (optional, ``pip install byzfl``; a benchmark-only dependency) can
be imported, each table gets a ByzFL column for the rules it implements with the same
definition, timed in the same rounds (interleaved), and the ratio ours / ByzFL. Each rule runs a few warm-up calls, then we report the median (and the
minimum) over the repeats; the repeats go round all rules in turn, so load from other jobs
spreads evenly. On CPU there are two tables: torch's default thread count (what the targets
refer to: under 10 ms per call, 30 ms for geometric_median and bulyan, at n = 15) and one
thread.
Combinations that the rule's ``check`` refuses are listed as skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tuneguard.aggregators import AGGREGATORS, aggregate, check_rule
from tuneguard.attacks import craft

from ._common import write_section

TITLE = "Aggregation rules (benchmarks/aggregators.py)"
SLOW_TARGET_MS = {"geometric_median": 30.0, "bulyan": 30.0}
TARGET_MS = 10.0


def inputs(n: int, f: int, d: int, device: str = "cpu", seed: int = 0, kind: str = "little") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "isotropic":
        return torch.randn(n, d, generator=gen).to(device)
    mean = torch.randn(d, generator=gen) * 0.05
    honest = mean + 0.02 * torch.randn(n - f, d, generator=gen)
    return torch.cat([honest, craft("little", honest, f)]).to(device)


#: our rule (or variant) -> how to run it; variants pin parameters for a like-for-like ByzFL row
VARIANTS = {
    "centered_clipping (start 0, tau fixed)": (
        "centered_clipping", lambda x: {"start": torch.zeros(x.shape[1], dtype=x.dtype, device=x.device),
                                        "tau": float(x.norm(dim=1).median()), "iterations": 3}),
}


def _ours(name: str, x: torch.Tensor, f: int):
    rule, params = VARIANTS[name] if name in VARIANTS else (name, lambda x: {})
    kwargs = params(x)
    return lambda: aggregate(rule, x, f, **kwargs)


def byzfl_call(name: str, x: torch.Tensor, f: int):
    """ByzFL's implementation of the same definition, or None (not installed, or no match).

    ByzFL 0.0.11 Krum, MultiKrum (n - f lowest), MDA, Median, TrMean and NNM follow the same
    definitions as ours; its CenteredClipping starts at 0 (passing a start raises TypeError
    there) with a fixed tau, hence the variant row with start 0 and the same tau, L = 3.
    """
    try:
        from byzfl.aggregators import aggregators as A
        from byzfl.aggregators import preaggregators as P
    except ImportError:
        return None
    if name == "centered_clipping (start 0, tau fixed)":
        tau = float(x.norm(dim=1).median())
        return lambda: A.CenteredClipping(L=3, tau=tau)(x)
    simple = {"average": lambda: A.Average(), "median": lambda: A.Median(), "trimmed_mean": lambda: A.TrMean(f),
              "krum": lambda: A.Krum(f), "multi_krum": lambda: A.MultiKrum(f), "mda": lambda: A.MDA(f)}
    if name in simple:
        rule = simple[name]()
        return lambda: rule(x)
    if name == "nnm+krum":
        nnm, krum = P.NNM(f), A.Krum(f)
        return lambda: krum(nnm(x))
    return None


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def time_rules(
    cases: list[tuple[str, torch.Tensor, int]],
    repeats: int,
    loads: list[float],
    warmup: int = 3,
    calls: list | None = None,
) -> list[list[float]]:
    """Seconds per call for each (rule, inputs, f), or for each callable of ``calls`` when
    given (same order). Rounds go over all cases in turn, so a burst of load from other jobs
    hits every rule alike instead of one. Appends the 1-minute load average of each round to
    ``loads``. A callable slower than 0.5 s (ByzFL's MDA enumerates subsets in Python) is
    timed in the first 3 rounds only."""
    if calls is None:
        calls = [_ours(name, x, f) for name, x, f in cases]
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for r in range(repeats):
        loads.append(os.getloadavg()[0])
        for i, call in enumerate(calls):
            if call is None or (r >= 3 and times[i] and min(times[i]) > 0.5):
                continue
            x = cases[i][1]
            _sync(x)
            start = time.perf_counter()
            call()
            _sync(x)
            times[i].append(time.perf_counter() - start)
    return times


def _byzfl_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("byzfl")
    except metadata.PackageNotFoundError:
        try:
            import byzfl  # noqa: F401  (on PYTHONPATH without metadata)

            return "(version unknown)"
        except ImportError:
            return "not installed"


def _target(name: str, n: int) -> float | None:
    """The issue's latency targets are for the paper's n = 15; other n are measured only."""
    return SLOW_TARGET_MS.get(name, TARGET_MS) if n == 15 else None


def table(
    rules: list[str], fs: list[int], n: int, d: int, repeats: int, device: str = "cpu", kind: str = "little"
) -> tuple[str, list[float], list[str]]:
    """Markdown table of median (min) ms per rule and f; the load seen; the skipped cases.
    With ByzFL importable, a ByzFL column per f (median ms and ours / ByzFL, both timed in the
    same rounds)."""
    results: dict[tuple[str, int], str] = {}
    theirs: dict[tuple[str, int], str] = {}
    verdicts: dict[str, list[tuple[bool, bool]]] = {name: [] for name in rules}
    skipped = []
    cases = []
    for f in fs:
        x = inputs(n, f, d, device, kind=kind)
        for name in rules:
            rule = VARIANTS[name][0] if name in VARIANTS else name
            try:
                check_rule(rule, n, f)
            except ValueError as err:
                results[name, f] = "skipped"
                skipped.append(f"{name} at f={f}: {err}")
                continue
            cases.append((name, x, f))
    ours = [_ours(name, x, f) for name, x, f in cases]
    byzfl = [byzfl_call(name, x, f) if device == "cpu" else None for name, x, f in cases]
    with_byzfl = any(c is not None for c in byzfl)
    loads: list[float] = []
    times = time_rules(cases + [c for c, b in zip(cases, byzfl, strict=True) if b is not None], repeats, loads,
                       calls=ours + [b for b in byzfl if b is not None])
    ours_times, byzfl_times = times[: len(cases)], iter(times[len(cases):])
    for (name, _, f), t, b in zip(cases, ours_times, byzfl, strict=True):
        med, best = statistics.median(t) * 1e3, min(t) * 1e3
        target = _target(name, n) if kind == "little" else None
        if target is not None:
            verdicts[name].append((med < target, best < target))
        results[name, f] = f"{med:.2f} ({best:.2f})"
        line = f"{name:20s} f={f}: median {med:7.2f} ms, min {best:7.2f} ms"
        if b is not None:
            bt = next(byzfl_times)
            bmed = statistics.median(bt) * 1e3
            theirs[name, f] = f"{bmed:.2f} ({med / bmed:.2f}x)"
            line += f"; ByzFL median {bmed:7.2f} ms ({len(bt)} calls), ours/ByzFL {med / bmed:.2f}x"
        print(line, flush=True)
    cols = [f"f = {f}: median (min) ms" for f in fs]
    if with_byzfl:
        cols += [f"f = {f}: ByzFL median ms (ours / ByzFL)" for f in fs]
    head = "| rule | " + " | ".join(cols) + (" | target ms | meets target: median / min |" if kind == "little" else " |")
    lines = [head, "|" + "---|" * (len(cols) + (3 if kind == "little" else 1))]
    for name in rules:
        cells = [results[name, f] for f in fs]
        if with_byzfl:
            cells += [theirs.get((name, f), "-") for f in fs]
        row = f"| {name} | {' | '.join(cells)} |"
        if kind == "little":
            target = _target(name, n)
            ok = verdicts[name]
            verdict = " / ".join(
                ("yes" if all(v[i] for v in ok) else "no") if ok else "-" for i in (0, 1)
            )
            row += f" {'-' if target is None else f'{target:g}'} | {verdict} |"
        lines.append(row)
    return "\n".join(lines), loads, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=15)
    parser.add_argument("--d", type=int, default=79_510)
    parser.add_argument("--fs", default="3,6", help="comma-separated values of f")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--no-single-thread", action="store_true", help="skip the second table (1 torch thread)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then only one table)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
    parser.add_argument("--no-isotropic", action="store_true", help="skip the isotropic-input table")
    args = parser.parse_args()
    fs = [int(v) for v in args.fs.split(",")]
    rules = [name for name, spec in AGGREGATORS.items() if not spec.is_pre]
    rules += ["nnm+krum", "bucketing+median", *VARIANTS]

    default_threads = torch.get_num_threads()
    main_table, loads, skipped = table(rules, fs, args.n, args.d, args.repeats, args.device)
    parts = [
        f"Default threads ({default_threads}), the configuration the targets refer to:"
        if args.device == "cpu"
        else f"On {args.device}:",
        main_table,
    ]
    if not args.no_single_thread and args.device == "cpu":
        torch.set_num_threads(1)
        one_table, more_loads, _ = table(rules, fs, args.n, args.d, args.repeats)
        torch.set_num_threads(default_threads)
        loads += more_loads
        parts += [
            "One torch thread (as inside a Ray actor with num_cpus=1; also less disturbed by "
            "other jobs, since no op waits for a second thread):",
            one_table,
        ]
    if not args.no_isotropic:
        iso_table, more_loads, _ = table(rules, fs, args.n, args.d, args.repeats, args.device, kind="isotropic")
        loads += more_loads
        parts += [
            f"Isotropic inputs, default threads ({default_threads}): n i.i.d. N(0, I) vectors, as honest "
            "submissions look once DP noise dominates (nothing for a pruning search to prune):",
            iso_table,
        ]
    parts += [
        f"n = {args.n}, d = {args.d:,}, float32 on {args.device}; {args.repeats} timed calls per cell after "
        f"3 warm-up calls, the rounds going over all rules in turn; n - f honest-like vectors "
        "plus f from the `little` attack. Targets (n = 15 only): 10 ms per call, 30 ms for "
        "geometric_median and bulyan. ByzFL columns (where shown): ByzFL "
        f"{_byzfl_version()} timed in the same rounds as ours (calls slower than 0.5 s: 3 rounds).",
        f"1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f} on "
        f"{os.cpu_count()} cores. Other jobs on a shared machine inflate the medians (with two "
        "threads an op waits for its descheduled thread); the minimum is close to the cost on "
        "an idle machine.",
    ]
    if skipped:
        parts.append("Skipped (the rule's check refuses them): " + "; ".join(skipped) + ".")
    body = "\n\n".join(parts)
    print()
    print(body)
    if not args.no_write:
        command = "python -m benchmarks.aggregators"
        command += f" --n {args.n}" if args.n != 15 else ""
        command += f" --fs {args.fs}" if args.fs != "3,6" else ""
        command += f" --repeats {args.repeats}" if args.repeats != 30 else ""
        command += f" --device {args.device}" if args.device != "cpu" else ""
        title = TITLE if args.n == 15 else f"Aggregation rules at n = {args.n} (benchmarks/aggregators.py)"
        write_section(title, body, command)


if __name__ == "__main__":
    main()
