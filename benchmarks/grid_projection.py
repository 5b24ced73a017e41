"""Projected wall time of the 001 Fashion-MNIST grid on this machine, against its floor.

    python -m benchmarks.grid_projection                       # default sample, prints the tables
    python -m benchmarks.grid_projection --write               # ... and writes them into BENCHMARKS.md
    python -m benchmarks.grid_projection --steps 2 --batch-sizes 25 --gars mda average --fs 3 \\
        --attacks little --validate mda:25 --validate-steps 5  # a smoke run (seconds)
    python -m benchmarks.grid_projection --device cuda         # the projection on a GPU (falls back to CPU without one)

The grid is ``search_spaces/paper_fashion_mnist.yaml`` (every point validated with
``Space.validate``: 2,295 combinations, of which 270 are Bulyan at f = 6, which n = 15 cannot take,
so 2,025 runs of 300 steps). One process, one torch thread (``--threads``), as each Tune trial runs.

What is measured, all in this process:

- **step**: ``LocalEngine.step`` (the engine ``train()`` builds) for a stratified sample of cells:
  each batch size x each stratum (GAR, f, attack) of the grid (15 strata: MDA, Krum, median x
  f in {3, 6} x {little, empire}, Bulyan at f = 3, the averaging baseline at f = 0), the median
  of ``--steps`` timed steps after ``--warmup`` steps. Grid points whose cell is not sampled
  are predicted from the sampled ones (the step's excess over the floor interpolated linearly
  in b within the stratum, else taken from the nearest stratum: counted in the output).
- **floor**: the true floor of a step (issue 13), what no implementation of Algorithm 1 can
  skip: one plain forward + backward (mean loss, autograd, no clipping, no GAR) of the 001 MLP
  over the same h x b samples a step draws (h = n - f honest workers), the h x d Gaussian
  draws of the DP noise, and one read of the n x d matrix the server aggregates; same process,
  same kernels as the step; for every (h, b) of the grid, median of ``--floor-repeats``
  rounds spread over the run.
- **per run, fixed**: building the engine (``make_engine``: model, privacy plan; the dataset
  is cached per process and its first load counted once per concurrent process), one
  evaluation on the test set plus the privacy accounting ``train()`` does at every evaluation
  step (every ``eval_every`` = 10 steps), and the MLflow tracking of one run (the calls
  ``train()`` makes: run, params, config, per-step metrics in batches, final metrics, curves
  plot when the grid's ``tune.run_plots`` is on, as a tune trial does) into a temporary SQLite
  store.
- **validation**: complete runs through ``train()`` with MLflow tracking (``--validate``), whose
  measured wall is compared with the prediction of the same model.

Projection: the sum over all grid points of (build + steps x step + evaluations x evaluation +
MLflow), divided by the concurrent trials (``--concurrency``, default the number of cores on
CPU, each trial one thread; 1 on a GPU), plus one dataset load. Tune's own overhead per trial is
figure 5 (``benchmarks/tune_overhead.py``); ``--tune-overhead 0.05`` adds such a fraction. The
floor hours are the same sum with the floor step only (steps x floor), same concurrency.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "search_spaces" / "paper_fashion_mnist.yaml"
TITLE = "001 grid projection (benchmarks/grid_projection.py)"
TARGET_HOURS = 4.0  # issue 13 (issue 7: 5.0)
DEFAULT_GARS = ["mda", "krum", "median", "bulyan", "average"]


@dataclass(frozen=True)
class Stratum:
    gar: str
    f: int
    attack: str  # "none" when f = 0

    def label(self) -> str:
        return f"{self.gar} f={self.f} {self.attack}"


@dataclass
class Point:
    """One run of the grid, reduced to what its cost depends on."""

    stratum: Stratum
    b: int
    h: int  # honest workers
    steps: int
    eval_every: int
    raw: dict[str, Any]  # the config (ExperimentConfig keys), to build it

    @property
    def evals(self) -> int:
        return n_evals(self.steps, self.eval_every)


@dataclass
class Cell:
    stratum: Stratum
    b: int
    h: int
    step_s: list[float] = field(default_factory=list)
    build_s: float = math.nan
    eval_s: float = math.nan  # one evaluation + its privacy accounting
    metrics: list[dict[str, float]] = field(default_factory=list)

    @property
    def step(self) -> float:
        return statistics.median(self.step_s)


def n_evals(steps: int, eval_every: int) -> int:
    """Evaluation steps of a run, as train() does them: every eval_every steps and the last."""
    return steps // eval_every + (1 if steps % eval_every else 0)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------
def load_grid(path: Path) -> tuple[int, int, list[Point], bool]:
    """(combinations before validation, valid runs, the runs, whether the runs log a plot)."""
    from tuneguard.tune.space import Space

    space = Space.load(path)
    combos = len(space.grid_points()) * space.num_samples
    report = space.validate()
    points = []
    for pt in report.points or []:
        for spec in space.runs(pt):
            cfg = spec.cfg
            stratum = Stratum(cfg.gar.name, cfg.f, cfg.attack.name if cfg.f else "none")
            raw = space.config_raw(pt, None, None)
            points += [Point(stratum, cfg.batch_size, cfg.n_honest, cfg.steps, cfg.eval_every, raw)] * space.num_samples
    return combos, len(points), points, bool(getattr(space.tune, "run_plots", True))


def train_kwargs(plots: bool) -> dict[str, Any]:
    """``plots=`` for train() where it takes it (a tune trial passes ``tune.run_plots``)."""
    import inspect

    from tuneguard.training import train

    return {"plots": plots} if "plots" in inspect.signature(train).parameters else {}


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
class Floor:
    """The true floor: forward + backward of the 001 MLP over h x b training samples, h x d
    Gaussian draws, one read of the n x d matrix."""

    def __init__(self, raw: dict[str, Any], device):
        import torch

        from tuneguard.config import build_config
        from tuneguard.data import load_dataset
        from tuneguard.models import build_model

        cfg = build_config(raw)
        self.device = device
        self.model = build_model(cfg.model, seed=0).to(device)
        data = load_dataset(cfg.dataset, cfg.data_dir)
        self.x, self.y = data.train_x.to(device), data.train_y.to(device)
        self.loss = torch.nn.functional.cross_entropy
        self.times: dict[tuple[int, int], list[float]] = {}
        self.n, self.d = cfg.n_workers, sum(p.numel() for p in self.model.parameters())
        self.matrix = torch.randn(self.n, self.d, device=device)
        self.noise: dict[int, Any] = {}
        self.gen = torch.Generator(device=device).manual_seed(0)

    def once(self, h: int, b: int) -> float:
        import torch

        x, y = self.x[: h * b], self.y[: h * b]
        noise = self.noise.get(h)
        if noise is None:
            noise = self.noise[h] = torch.empty(h, self.d, device=self.device)
        _sync(self.device)
        t = time.perf_counter()
        self.model.zero_grad(set_to_none=True)
        self.loss(self.model(x), y).backward()
        noise.normal_(generator=self.gen)
        self.matrix.sum()
        _sync(self.device)
        return time.perf_counter() - t

    def round(self, keys: list[tuple[int, int]]) -> None:
        for h, b in keys:
            self.times.setdefault((h, b), []).append(self.once(h, b))

    def median(self, h: int, b: int) -> float:
        return statistics.median(self.times[h, b])


def one_time_costs(raw: dict[str, Any], uri: str, plots: bool) -> dict[str, float]:
    """Seconds of what a process pays once, at its first run: loading the dataset (cached per
    process), the first privacy accounting (imports, caches), the first plot (imports matplotlib;
    only when the grid's ``tune.run_plots`` is on), and creating the MLflow store (once per
    store; the tune job's driver does it)."""
    from tuneguard.config import build_config
    from tuneguard.data import load_dataset
    from tuneguard.privacy import spent
    from tuneguard.tracking import ensure_experiment

    cfg = build_config(raw)
    out = {}
    t = time.perf_counter()
    load_dataset(cfg.dataset, cfg.data_dir)
    out["dataset load"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        spent(1.0, 2.0, cfg.batch_size, 60_000, cfg.steps, cfg.privacy.delta, method=cfg.privacy.accountant)
    except ValueError:
        pass
    out["first accounting"] = time.perf_counter() - t
    if plots:
        t = time.perf_counter()
        from tuneguard.training.run import curves_figure

        curves_figure(cfg, [{"step": 1, "vn_sample": 1.0, "vn_submit": 1.0, "cross_accuracy": 0.5}])
        out["first plot"] = time.perf_counter() - t
    t = time.perf_counter()
    ensure_experiment(cfg.name, uri)
    out["MLflow store creation"] = time.perf_counter() - t
    return out


def measure_cell(point: Point, steps: int, warmup: int, device: str) -> Cell:
    from tuneguard.config import build_config
    from tuneguard.privacy import spent
    from tuneguard.training.run import make_engine

    cfg = build_config({**point.raw, "device": device})
    cell = Cell(point.stratum, point.b, point.h)
    t = time.perf_counter()
    engine = make_engine(cfg)
    cell.build_s = time.perf_counter() - t
    dev = engine.ctx.device
    try:
        state = engine.init_state()
        for i in range(warmup):
            state, _ = engine.step(state, i)
        for i in range(warmup, warmup + steps):
            _sync(dev)
            t = time.perf_counter()
            state, m = engine.step(state, i)
            _sync(dev)
            cell.step_s.append(time.perf_counter() - t)
            cell.metrics.append(m)
        # What train() adds at an evaluation step: the test-set evaluation and the accounting.
        t = time.perf_counter()
        engine.evaluate(state)
        plan = engine.plan
        if plan.sigma > 0 and cfg.clip is not None:
            try:
                spent(plan.sigma, cfg.clip, cfg.batch_size, plan.m, warmup + steps, cfg.privacy.delta,
                      method=cfg.privacy.accountant)
            except ValueError:
                pass
        _sync(dev)
        cell.eval_s = time.perf_counter() - t
    finally:
        engine.close()
    return cell


def mlflow_run_cost(raw: dict[str, Any], metrics: list[dict[str, float]], steps: int, eval_every: int,
                    uri: str, plots: bool) -> float:
    """Seconds of the MLflow tracking train() does for one run of ``steps`` steps (same calls:
    run with tags, params, config YAML, per-step metrics in batches, final metrics and tags,
    the curves plot when the grid's ``tune.run_plots`` asks for it, end), replayed with real
    step metrics into ``uri``."""
    from tuneguard.config import build_config
    from tuneguard.tracking import RunTracker
    from tuneguard.training.run import curves_figure

    cfg = build_config(raw)
    t = time.perf_counter()
    tracker = RunTracker(cfg.name, tracking_uri=uri, run_name="grid-projection-mlflow-replay",
                         tags={"tuneguard.kind": "train", "dataset": cfg.dataset,
                               "attack": cfg.attack.name if cfg.f else "none", "gar": cfg.gar.name,
                               "engine": cfg.engine})
    tracker.log_params(cfg.flat())
    tracker.log_text(cfg.to_yaml(), "config.yaml")
    history = []
    for s in range(1, steps + 1):
        m = dict(metrics[(s - 1) % len(metrics)])
        if s % eval_every == 0 or s == steps:
            m.update(cross_accuracy=0.5, test_loss=1.0, eps_spent=1.0)
        m["max_cross_accuracy"] = 0.5
        m["step"] = s
        history.append(m)
        tracker.log_metrics({k: v for k, v in m.items() if k != "step"}, step=s)
    tracker.log_metrics({"final_cross_accuracy": 0.5, "best_cross_accuracy": 0.5, "run_seconds": 1.0}, step=steps)
    tracker.set_tags({"tuneguard.status": "FINISHED", "tuneguard.message": "replay", "sigma": "1"})
    if plots:
        tracker.log_figure(curves_figure(cfg, history), "plots/curves.png")
    tracker.end("FINISHED")
    return time.perf_counter() - t


def validation_run(point: Point, steps: int, device: str, uri: str, plots: bool) -> float:
    """Wall seconds of one complete train() run with MLflow tracking."""
    from tuneguard.config import build_config
    from tuneguard.training import train

    cfg = build_config({**point.raw, "device": device, "steps": steps})
    t = time.perf_counter()
    result = train(cfg, tracking_uri=uri, run_name=f"grid-projection-validate-{point.stratum.gar}-b{point.b}",
                   **train_kwargs(plots))
    wall = time.perf_counter() - t
    if result.status != "FINISHED":
        print(f"  note: validation run ended {result.status}: {result.message}", flush=True)
    return wall


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class Predictor:
    """Step seconds of any grid point from the sampled cells: the excess of the step over the
    floor, interpolated linearly in b within a stratum (extrapolated from the two nearest
    sampled b, or constant with one), plus the floor at the point's (h, b)."""

    def __init__(self, cells: list[Cell], floor: Floor):
        self.floor = floor
        self.by_stratum: dict[Stratum, list[tuple[int, float]]] = {}
        for c in cells:
            excess = c.step - floor.median(c.h, c.b)
            self.by_stratum.setdefault(c.stratum, []).append((c.b, excess))
        for v in self.by_stratum.values():
            v.sort()
        self.kind: dict[str, int] = {"sampled": 0, "interpolated in b": 0, "from another stratum": 0}
        self.sampled = {(c.stratum, c.b) for c in cells}

    def _source(self, s: Stratum) -> Stratum:
        if s in self.by_stratum:
            return s
        cands = list(self.by_stratum)
        for pick in (lambda c: c.gar == s.gar and c.f == s.f,
                     lambda c: c.gar == s.gar,
                     lambda c: (c.f > 0) == (s.f > 0)):
            found = [c for c in cands if pick(c)]
            if found:
                return min(found, key=lambda c: (abs(c.f - s.f), c.attack != s.attack, c.gar))
        return cands[0]

    def excess(self, s: Stratum, b: int) -> float:
        pts = self.by_stratum[s]
        if len(pts) == 1:
            return pts[0][1]
        for (b0, e0), (b1, e1) in zip(pts, pts[1:], strict=False):
            if b0 <= b <= b1:
                return e0 + (e1 - e0) * (b - b0) / (b1 - b0)
        (b0, e0), (b1, e1) = (pts[0], pts[1]) if b < pts[0][0] else (pts[-2], pts[-1])
        return max(0.0, e0 + (e1 - e0) * (b - b0) / (b1 - b0))

    def step(self, p: Point, count: bool = False) -> float:
        src = self._source(p.stratum)
        if count:
            key = ("sampled" if (p.stratum, p.b) in self.sampled else
                   "interpolated in b" if src == p.stratum else "from another stratum")
            self.kind[key] += 1
        return self.floor.median(p.h, p.b) + self.excess(src, p.b)


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--space", default=str(GRID), help="the grid's search-space file")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per sampled cell")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per cell before timing")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="sampled b (default: all of the grid)")
    ap.add_argument("--gars", nargs="+", default=DEFAULT_GARS, help="sampled GARs")
    ap.add_argument("--fs", type=int, nargs="+", default=None, help="sampled f (default: all of the grid)")
    ap.add_argument("--attacks", nargs="+", default=None, help="sampled attacks (default: all of the grid)")
    ap.add_argument("--floor-repeats", type=int, default=5, help="rounds of floor measurements over every (h, b)")
    ap.add_argument("--validate", nargs="*", default=["mda:25", "median:300"],
                    help="complete train() runs with MLflow to check the prediction, as GAR:b (f = 3, little; "
                         "average: f = 0); none: --validate with no value")
    ap.add_argument("--validate-steps", type=int, default=None, help="steps of the validation runs (default: the grid's)")
    ap.add_argument("--mlflow-repeats", type=int, default=3, help="replays of one run's MLflow tracking (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Tune trial of 1 CPU: 1)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda (falls back to cpu, saying so, without one)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="trials at once for the projection (default: cores on cpu, 1 on cuda)")
    ap.add_argument("--tune-overhead", type=float, default=0.0,
                    help="fraction added for Tune's per-trial overhead (figure 5), e.g. 0.05; default 0")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    args = ap.parse_args(argv)
    args.floor_repeats = max(1, args.floor_repeats)
    args.steps = max(1, args.steps)

    import torch

    torch.set_num_threads(args.threads)
    device = args.device
    fallback_note = ""
    if device.startswith("cuda") and not torch.cuda.is_available():
        fallback_note = ("--device cuda asked, but CUDA is not available on this machine: measured on the CPU "
                         "instead (the projection below is for the CPU, not a GPU).")
        print(f"NOTE: {fallback_note}", flush=True)
        device = "cpu"
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    conc = args.concurrency or (1 if on_gpu else (os.cpu_count() or 1))
    os.environ.setdefault("MPLBACKEND", "Agg")
    tmp = Path(tempfile.mkdtemp(prefix="tg-gridproj-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    try:
        out = run(args, dev, conc, uri, fallback_note)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(out["text"])
    if args.json:
        Path(args.json).write_text(json.dumps(out["numbers"], indent=2, default=str))
    if args.write:
        from benchmarks._common import write_section

        title = TITLE if not on_gpu else TITLE.replace("projection", "projection on GPU")
        write_section(title, out["text"], "python -m benchmarks.grid_projection " + " ".join(sys.argv[1:]))


def run(args, dev, conc: int, uri: str, fallback_note: str) -> dict[str, Any]:
    t_all = time.perf_counter()
    t = time.perf_counter()
    combos, n_runs, points, plots = load_grid(Path(args.space))
    print(f"grid {args.space}: {combos} combinations, {n_runs} valid runs "
          f"({combos - n_runs} excluded by validation); enumerated in {time.perf_counter() - t:.1f} s", flush=True)
    once = one_time_costs(points[0].raw, uri, plots)
    print("once per process (each concurrent trial process pays them at its first run): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in once.items()), flush=True)

    # The sample: one representative point per (stratum, b).
    bs = sorted({p.b for p in points})
    want_b = set(args.batch_sizes) if args.batch_sizes else set(bs)
    reps: dict[tuple[Stratum, int], Point] = {}
    for p in points:
        s = p.stratum
        if (p.b in want_b and s.gar in args.gars and (args.fs is None or s.f in args.fs or s.f == 0)
                and (args.attacks is None or s.attack in args.attacks or s.f == 0)):
            reps.setdefault((s, p.b), p)
    sample = sorted(reps.values(), key=lambda p: (p.stratum.gar, p.stratum.f, p.stratum.attack, p.b))
    if not sample:
        raise SystemExit("the sample is empty: check --batch-sizes / --gars / --fs / --attacks against the grid")

    floor = Floor(points[0].raw | {"device": dev.type}, dev)
    hb = sorted({(p.h, p.b) for p in points})
    for h, b in hb:  # warm-up
        floor.once(h, b)
    rounds_at = {round(i * len(sample) / args.floor_repeats) for i in range(args.floor_repeats)}
    cells: list[Cell] = []
    n_rounds = 0
    for i, p in enumerate(sample):
        while i in rounds_at and n_rounds < args.floor_repeats:
            floor.round(hb)
            n_rounds += 1
            rounds_at.discard(i)
        c = measure_cell(p, args.steps, args.warmup, dev.type)
        cells.append(c)
        fl = floor.median(c.h, c.b)
        print(f"[{i + 1}/{len(sample)}] {c.stratum.label():20s} b={c.b:5d}: step {c.step * 1e3:8.2f} ms "
              f"(floor {fl * 1e3:7.2f} ms, {c.step / fl:5.2f}x), build {c.build_s * 1e3:6.1f} ms, "
              f"eval+accounting {c.eval_s * 1e3:6.1f} ms", flush=True)
    while n_rounds < args.floor_repeats:
        floor.round(hb)
        n_rounds += 1

    pred = Predictor(cells, floor)
    build_s = statistics.median(c.build_s for c in cells)
    eval_s = statistics.median(c.eval_s for c in cells)
    metrics = [m for c in cells for m in c.metrics]
    grid_steps = points[0].steps
    eval_every = points[0].eval_every
    mlf = [mlflow_run_cost(points[0].raw, metrics, grid_steps, eval_every, uri, plots)
           for _ in range(args.mlflow_repeats)]
    mlflow_s = statistics.median(mlf)
    print(f"MLflow tracking of one {grid_steps}-step run: {mlflow_s:.2f} s (median of {len(mlf)}: "
          + ", ".join(f"{x:.2f}" for x in mlf) + ")", flush=True)

    def run_cost(p: Point, steps: int | None = None, mlflow: float | None = None, count: bool = False) -> dict:
        n = steps or p.steps
        st = pred.step(p, count=count)
        return {"steps": n * st, "evals": n_evals(n, p.eval_every) * eval_s, "build": build_s,
                "mlflow": mlflow_s if mlflow is None else mlflow, "floor": n * floor.median(p.h, p.b),
                "step": st}

    # Validation: complete runs through train() with MLflow.
    vrows = []
    vsteps = args.validate_steps or grid_steps
    mlflow_v = mlflow_s
    if args.validate and vsteps != grid_steps:
        mlflow_v = statistics.median(mlflow_run_cost(points[0].raw, metrics, vsteps, eval_every, uri, plots)
                                     for _ in range(args.mlflow_repeats))
    for spec in args.validate or []:
        gar, _, b = spec.partition(":")
        want = Stratum(gar, 0, "none") if gar == "average" else Stratum(gar, 3, "little")
        match = [p for p in points if p.stratum == want and p.b == int(b)]
        if not match:
            print(f"  validate {spec}: no such grid point (GAR:b with f = 3, little), skipped", flush=True)
            continue
        p = match[0]
        cost = run_cost(p, vsteps, mlflow_v)
        predicted = cost["steps"] + cost["evals"] + cost["build"] + cost["mlflow"]
        measured = validation_run(p, vsteps, dev.type, uri, plots)
        vrows.append({"point": want.label(), "b": p.b, "steps": vsteps, "predicted_s": predicted, "measured_s": measured,
                      "error": measured / predicted - 1})
        print(f"validate {want.label()} b={p.b}, {vsteps} steps: predicted {predicted:.2f} s, measured "
              f"{measured:.2f} s ({measured / predicted - 1:+.1%})", flush=True)

    # Projection over every run of the grid.
    costs = [(p, run_cost(p, count=True)) for p in points]
    tot = {k: sum(c[k] for _, c in costs) for k in ("steps", "evals", "build", "mlflow", "floor")}
    run_total = tot["steps"] + tot["evals"] + tot["build"] + tot["mlflow"]
    once_s = sum(once.values())
    hours = (run_total / conc + once_s) * (1 + args.tune_overhead) / 3600
    floor_hours = tot["floor"] / conc / 3600

    text = report(args, dev, conc, combos, n_runs, points, cells, floor, costs, tot, hours, floor_hours,
                  once, build_s, eval_s, mlflow_s, vrows, pred, fallback_note, grid_steps, eval_every, plots)
    numbers = {
        "device": dev.type, "concurrency": conc, "combinations": combos, "runs": n_runs,
        "projected_hours": hours, "floor_hours": floor_hours, "ratio": hours / floor_hours,
        "target_hours": TARGET_HOURS, "once_s": once, "build_s": build_s, "eval_s": eval_s,
        "mlflow_s": mlflow_s, "run_plots": plots, "tune_overhead": args.tune_overhead, "predicted_from": pred.kind,
        "cells": [{"gar": c.stratum.gar, "f": c.stratum.f, "attack": c.stratum.attack, "b": c.b, "h": c.h,
                   "step_ms": c.step * 1e3, "floor_ms": floor.median(c.h, c.b) * 1e3,
                   "ratio": c.step / floor.median(c.h, c.b)} for c in cells],
        "per_b": per_b_rows(costs, conc), "validation": vrows, "seconds": time.perf_counter() - t_all,
    }
    return {"text": text, "numbers": numbers}


def per_b_rows(costs, conc: int) -> list[dict[str, float]]:
    rows = []
    for b in sorted({p.b for p, _ in costs}):
        at = [(p, c) for p, c in costs if p.b == b]
        step = statistics.mean(c["step"] for _, c in at)
        fl = statistics.mean(c["floor"] / p.steps for p, c in at)
        run = sum(c["steps"] + c["evals"] + c["build"] + c["mlflow"] for _, c in at)
        rows.append({"b": b, "runs": len(at), "step_ms": step * 1e3, "floor_ms": fl * 1e3, "ratio": step / fl,
                     "hours": run / conc / 3600, "floor_hours": sum(c["floor"] for _, c in at) / conc / 3600})
    return rows


def report(args, dev, conc, combos, n_runs, points, cells, floor, costs, tot, hours, floor_hours, once,
           build_s, eval_s, mlflow_s, vrows, pred, fallback_note, grid_steps, eval_every, plots) -> str:
    where = f"{conc} concurrent trial(s), {args.threads} torch thread(s) each, on {dev.type}"
    lines = []
    if fallback_note:
        lines += [f"**{fallback_note}**", ""]
    lines += [
        f"Grid `{Path(args.space).name}`: {combos:,} combinations, {n_runs:,} valid runs after validation "
        f"({combos - n_runs} excluded: Bulyan needs n >= 4f + 3), {grid_steps} steps each, evaluation every "
        f"{eval_every}. Projection for {where}. Sample: {len(cells)} cells (b x GAR x f x attack), median of "
        f"{args.steps} timed steps after {args.warmup} warm-up steps each; floor: median of {args.floor_repeats} "
        f"rounds over every (h, b). Grid runs predicted from: "
        + ", ".join(f"{k} {v}" for k, v in pred.kind.items()) + ".",
        "",
        "Per batch size (mean over the grid's runs at that b; h = 12, 9 or 15 honest workers):",
        "",
        "| b | runs | step (ms) | true floor (ms) | step / floor | projected h | floor h |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = per_b_rows(costs, conc)
    for r in rows:
        lines.append(f"| {r['b']} | {r['runs']} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | {r['ratio']:.2f}x | "
                     f"{r['hours']:.2f} | {r['floor_hours']:.2f} |")
    run_total = tot["steps"] + tot["evals"] + tot["build"] + tot["mlflow"]
    share = lambda x: f"{x / run_total:.1%}"  # noqa: E731
    h = lambda s: f"{s / conc / 3600:.2f}"  # noqa: E731
    meets = "yes" if hours <= TARGET_HOURS else "no"
    lines += [
        "",
        "Totals:",
        "",
        "| | hours | share | per run (s) |",
        "|---|---|---|---|",
        f"| steps (local engine, DP + attack + GAR + metrics) | {h(tot['steps'])} | {share(tot['steps'])} | "
        f"{tot['steps'] / n_runs:.2f} |",
        f"| evaluations + accounting ({n_evals(grid_steps, eval_every)} per run, {eval_s * 1e3:.1f} ms each) | "
        f"{h(tot['evals'])} | {share(tot['evals'])} | {tot['evals'] / n_runs:.2f} |",
        f"| engine build (model, privacy plan) | {h(tot['build'])} | {share(tot['build'])} | {build_s:.2f} |",
        f"| MLflow tracking ({'with' if plots else 'without'} the curves plot: tune.run_plots = "
        f"{str(plots).lower()}) | {h(tot['mlflow'])} | {share(tot['mlflow'])} | {mlflow_s:.2f} |",
        f"| once per process ({', '.join(f'{k} {v:.1f} s' for k, v in once.items())}) | "
        f"{sum(once.values()) / 3600:.2f} | - | - |",
    ]
    if args.tune_overhead:
        lines.append(f"| Tune overhead (--tune-overhead {args.tune_overhead:g}) | "
                     f"{hours - hours / (1 + args.tune_overhead):.2f} | - | - |")
    lines += [
        f"| **projected total** | **{hours:.2f}** | | {run_total / n_runs:.2f} |",
        f"| true floor (fwd+bwd of the same samples, h x d noise draws, one read of n x d; steps only) | {floor_hours:.2f} | | "
        f"{tot['floor'] / n_runs:.2f} |",
        f"| projected / floor | {hours / floor_hours:.2f}x | | |",
        f"| target | <= {TARGET_HOURS:g} h | meets: {meets} | |",
    ]
    strata = sorted({c.stratum for c in cells}, key=lambda s: (s.gar, s.f, s.attack))
    bs = sorted({c.b for c in cells})
    by = {(c.stratum, c.b): c for c in cells}
    lines += ["", "Sampled cells: step ms (step / floor):", "",
              "| GAR, f, attack | " + " | ".join(f"b = {b}" for b in bs) + " |",
              "|---|" + "---|" * len(bs)]
    for s in strata:
        cells_txt = []
        for b in bs:
            c = by.get((s, b))
            cells_txt.append(f"{c.step * 1e3:.1f} ({c.step / floor.median(c.h, c.b):.2f}x)" if c else "-")
        lines.append(f"| {s.label()} | " + " | ".join(cells_txt) + " |")
    if vrows:
        lines += ["", "Validation: complete `train()` runs with MLflow tracking, predicted by the same model:", "",
                  "| run | b | steps | predicted (s) | measured (s) | measured / predicted - 1 |", "|---|---|---|---|---|---|"]
        for v in vrows:
            lines.append(f"| {v['point']} | {v['b']} | {v['steps']} | {v['predicted_s']:.2f} | {v['measured_s']:.2f} | "
                         f"{v['error']:+.1%} |")
    lines += ["", f"Assumes {conc} trials side by side run each at the speed of one alone (one thread each, "
              "no memory-bandwidth contention) and Tune adds nothing per trial (figure 5 measures that). "
              f"1-minute load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
