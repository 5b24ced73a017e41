"""A tune job's overhead: wall time of N trials against the time their training loops took.

    python -m benchmarks.tune_overhead                      # 4 trials x 300 steps, 3 repeats, prints
    python -m benchmarks.tune_overhead --write              # ... and writes the tables into BENCHMARKS.md
    python -m benchmarks.tune_overhead --steps 6 --eval-every 3 --batch-sizes 25 --repeats 1   # smoke run

The job is a real tuneguard tune job started through the library call the CLI makes
(``tuneguard.tune.search.start_job``): grid mode over points of the 001 Fashion-MNIST setting
(``search_spaces/paper_fashion_mnist.yaml``'s base: n = 15, f = 3, the ``little`` attack, DP per
step eps = 0.2 with Theorem 1, 300 steps, evaluation every 10, local engine) at small-to-medium
batch sizes (``--batch-sizes`` x ``--gars``), a private local Ray cluster, a fresh MLflow SQLite
store and results dir in a temporary folder (removed afterwards). Concurrency 1 by default.

Training time of a trial: its training loop (steps, evaluations, in-loop metric logging), from
the MLflow timestamps of its per-step metrics: t(last step) - t(first step) + one median step
interval. ``run_seconds`` (``RunResult.seconds``, what ``train()`` logs to MLflow) adds the
run's set-up (MLflow run and params, engine build: data, model, privacy plan).

    overhead = (wall x concurrency - sum of training loops) / sum of training loops

with wall = Ray start + the job (``start_job``) + Ray shutdown; also without Ray's start and
shutdown (a job on a running cluster). Target: at most 10 % for 300-step trials. The wall is
split from the timestamps (MLflow runs and metrics, Tune's result records) into job set-up,
time outside any trial (Tune scheduling, trial process start), trial set-up, run set-up,
loop, run finish (final metrics, the curves plot if ``tune.run_plots``) and trial finish (scoring,
last report). Trainable start and end come from Tune's ``time_this_iter_s`` / ``time_total_s``
(accurate to a few ms, so a short segment can read slightly negative).

Reference, same configs in this process (one torch thread, as a trial has): ``train(cfg,
track=False)`` and ``train(cfg)`` with MLflow into the same kind of store, so the cost of the
logging shows on its own. Each repeat runs the references and the job; the tables give the
median over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "search_spaces" / "paper_fashion_mnist.yaml"
TITLE = "Tune job overhead (benchmarks/tune_overhead.py)"
TARGET = 0.10
STEP_KEY = "train_loss"  # a metric train() logs at every step


def make_space(args, name: str):
    import yaml

    from tuneguard.tune.space import Space

    base = dict(yaml.safe_load(GRID.read_text())["base"])
    base.update(name=name, steps=args.steps, eval_every=args.eval_every, engine="local")
    raw = {
        "description": "benchmarks/tune_overhead.py: 001 Fashion-MNIST points",
        "base": base,
        "search": {"batch_size": list(args.batch_sizes), "gar": list(args.gars), "f": args.f,
                   "attack": args.attack, "privacy.eps": args.eps, "seed": 1},
        "tune": {"mode": "grid", "scheduler": "none", "max_failures": 0, "concurrency": args.concurrency},
    }
    if args.run_plots:
        raw["tune"]["run_plots"] = True
    space = Space.from_dict(raw)
    space.validate()
    return space


def loop_seconds(times: list[float], eval_every: int) -> tuple[float, float]:
    """(training-loop seconds, one-time excess of the first evaluation step) from the wall-clock
    times of each step's metrics (steps 1..S).

    The loop is t(S) - t(1) + one median step interval. A process's first evaluation also pays
    one-time costs (imports and caches of the privacy accounting): the excess of that step's interval
    over the median of the other evaluation steps' intervals is returned separately, and taken
    out of the loop (it is process start-up, not training)."""
    if len(times) < 2:
        return 0.0, 0.0
    diffs = [b - a for a, b in zip(times, times[1:], strict=False)]  # diffs[i]: step i + 2
    loop = times[-1] - times[0] + statistics.median(diffs)
    steps = len(times)
    evals = [s for s in range(2, steps + 1) if s % eval_every == 0 or s == steps]
    if not evals:
        return loop, 0.0
    first = diffs[evals[0] - 2]
    others = [diffs[s - 2] for s in evals[1:]] or [statistics.median(diffs)]
    excess = max(0.0, first - statistics.median(others))
    return loop - excess, excess


# --------------------------------------------------------------------------------------------
# In-process reference
# --------------------------------------------------------------------------------------------
def references(cfgs, uri: str, plots: bool) -> dict[str, dict[str, float]]:
    """Each config through train() in this process, untracked then with MLflow (interleaved, so
    load from other jobs hits both alike), after one untimed warm-up run that pays the one-time
    imports and caches (accounting, MLflow, matplotlib)."""
    import inspect

    from tuneguard.training import train

    # as a trial calls it: the curves plot only when the space's tune.run_plots asks for it
    extra = {"plots": plots} if "plots" in inspect.signature(train).parameters else {}
    warm = cfgs[0].model_copy(update={"steps": min(cfgs[0].steps, cfgs[0].eval_every)})
    train(warm, tracking_uri=uri, run_name="tune-overhead-warm-up", **extra)
    out = {k: {"wall": 0.0, "seconds": 0.0, "loop": 0.0, "runs": 0} for k in ("untracked", "tracked")}
    for cfg in cfgs:
        for key, track in (("untracked", False), ("tracked", True)):
            stamps: list[float] = []
            t = time.time()
            res = train(cfg, track=track, tracking_uri=uri if track else None, run_name="tune-overhead-reference",
                        callback=lambda m, st=stamps: st.append(time.time()), **extra)
            o = out[key]
            o["wall"] += time.time() - t
            o["seconds"] += res.seconds
            o["loop"] += loop_seconds(stamps, cfg.eval_every)[0]
            o["runs"] += 1
    return out


# --------------------------------------------------------------------------------------------
# The tune job
# --------------------------------------------------------------------------------------------
def tune_records(results_dir: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in (results_dir / "tune").glob("*/result.json"):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["trial_id"], []).append(r)
    return out


def tune_job(space, args, tmp: Path, uri: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    from tuneguard.raycluster import connect
    from tuneguard.tune.search import start_job

    rdir = tmp / "job"
    t0 = time.time()
    conn = connect(num_cpus=args.num_cpus or os.cpu_count(), log_to_driver=False, logging_level="ERROR",
                   _temp_dir=str(tmp / "ray"))
    t1 = time.time()
    try:
        summary = start_job(space, tracking_uri=uri, results_dir=rdir, concurrency=args.concurrency, progress=False)
        t2 = time.time()
    finally:
        conn.close()
    t3 = time.time()
    if summary.completed != summary.trials or summary.errored:
        raise RuntimeError(f"tune job: {summary.completed}/{summary.trials} trials completed, {summary.errored} errored "
                           f"(results in {summary.results_dir})")
    cl = MlflowClient(uri)
    parent = cl.get_run(summary.parent_run_id)
    exp = cl.get_experiment_by_name(space.name)
    runs = cl.search_runs([exp.experiment_id], filter_string=f"tags.`tuneguard.job` = '{summary.job_id}' and "
                          "tags.`tuneguard.kind` = 'trial'", max_results=10_000)
    records = tune_records(rdir)
    trials = []
    for r in runs:
        hist = sorted(cl.get_metric_history(r.info.run_id, STEP_KEY), key=lambda m: m.step)
        stamps = [m.timestamp / 1e3 for m in hist]
        loop, first_eval = loop_seconds(stamps, args.eval_every)
        first_step = stamps[0] if stamps else r.info.start_time / 1e3
        diffs = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        loop_start = first_step - (statistics.median(diffs) if diffs else 0.0)
        recs = records.get(r.data.tags.get("tuneguard.trial", ""), [])
        # The trainable started time_this_iter_s before its first report, which follows the
        # first evaluation step's metrics; it ended time_total_s after it started.
        ev = sorted(cl.get_metric_history(r.info.run_id, "cross_accuracy"), key=lambda m: m.step)
        if recs and ev:
            t_start = ev[0].timestamp / 1e3 - float(recs[0]["time_this_iter_s"])
            t_end = t_start + float(recs[-1]["time_total_s"])
        else:
            t_start, t_end = r.info.start_time / 1e3, r.info.end_time / 1e3
        trials.append({
            "trial": r.data.tags.get("tuneguard.trial"), "b": int(r.data.params.get("batch_size", 0)),
            "gar": r.data.tags.get("gar"), "loop": loop, "first_eval": first_eval,
            "run_seconds": r.data.metrics.get("run_seconds", float("nan")),
            "trainable_start": t_start, "run_start": r.info.start_time / 1e3, "loop_start": loop_start,
            "loop_end": stamps[-1] if stamps else loop_start, "run_end": r.info.end_time / 1e3, "trainable_end": t_end,
        })
    trials.sort(key=lambda x: x["run_start"])
    c = args.concurrency
    seg = {
        "trial set-up (imports on a process's first trial, space, MLflow lookup)":
            sum(x["run_start"] - x["trainable_start"] for x in trials),
        "run set-up (MLflow run + params, engine: data, model, privacy plan)":
            sum(x["loop_start"] - x["run_start"] for x in trials),
        "training loops": sum(x["loop"] for x in trials),
        "one-time excess of a process's first evaluation step (imports, caches)":
            sum(x["first_eval"] for x in trials),
        "run finish (final metrics, plot if tune.run_plots, MLflow end)":
            sum(x["run_end"] - x["loop_end"] for x in trials),
        "trial finish (scoring, tags, last report)": sum(x["trainable_end"] - x["run_end"] for x in trials),
    }
    job_setup = parent.info.start_time / 1e3 - t1
    spans = sum(x["trainable_end"] - x["trainable_start"] for x in trials)
    # Marginal cost of one more trial in a long sequential job: trials after the first, each
    # from the end of the previous trial to its own end (scheduling, set-up, loop, finish).
    marginal = None
    if c == 1 and len(trials) > 1:
        later = trials[1:]
        cost = sum(x["trainable_end"] - p["trainable_end"] for p, x in zip(trials, later, strict=False))
        marginal = cost / sum(x["loop"] for x in later) - 1
    return {
        "marginal": marginal,
        "ray_start": t1 - t0, "job": t2 - t1, "ray_stop": t3 - t2, "job_setup": job_setup,
        "outside": (t2 - t1 - job_setup) * c - spans, "segments": seg, "trials": trials,
        "loop": seg["training loops"], "run_seconds": sum(x["run_seconds"] for x in trials),
        "job_id": summary.job_id, "n": len(trials),
    }


# --------------------------------------------------------------------------------------------
def one_repeat(args, i: int) -> dict[str, Any]:
    import torch

    from tuneguard.data import load_dataset

    tmp = Path(tempfile.mkdtemp(prefix="tgb-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["TUNEGUARD_HOME"] = str(tmp / "home")
    try:
        space = make_space(args, f"tg-bench-tune-overhead-{secrets.token_hex(3)}")
        cfgs = [spec.cfg for p in space.report.points for spec in space.runs(p)]
        torch.set_num_threads(1)
        load_dataset(cfgs[0].dataset, cfgs[0].data_dir)  # the reference's runs then find it loaded
        from tuneguard.tracking import ensure_experiment

        ensure_experiment(space.name, uri)  # the store exists, as it does after a first job
        out: dict[str, Any] = {"trials": len(cfgs)}
        if not args.no_reference:
            ref = references(cfgs, uri, bool(getattr(space.tune, "run_plots", True)))
            out["ref_untracked"], out["ref_tracked"] = ref["untracked"], ref["tracked"]
            print(f"  repeat {i}: in-process train(track=False): {ref['untracked']['wall']:.1f} s wall, loops "
                  f"{ref['untracked']['loop']:.1f} s; train() with MLflow: {ref['tracked']['wall']:.1f} s wall, "
                  f"loops {ref['tracked']['loop']:.1f} s", flush=True)
        job = tune_job(space, args, tmp, uri)
        out["job"] = job
        total = job["ray_start"] + job["job"] + job["ray_stop"]
        print(f"  repeat {i}: tune job: Ray start {job['ray_start']:.1f} s, job {job['job']:.1f} s, Ray stop "
              f"{job['ray_stop']:.1f} s; training loops {job['loop']:.1f} s -> overhead "
              f"{total * args.concurrency / job['loop'] - 1:+.1%}", flush=True)
        return out
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"  kept {tmp}", flush=True)


def med(xs) -> float:
    return statistics.median(list(xs))


def report(args, reps: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    c = args.concurrency
    jobs = [r["job"] for r in reps]
    loop = med(j["loop"] for j in jobs)
    total = [j["ray_start"] + j["job"] + j["ray_stop"] for j in jobs]
    ovh = [t * c / j["loop"] - 1 for t, j in zip(total, jobs, strict=True)]
    ovh_job = [j["job"] * c / j["loop"] - 1 for j in jobs]
    ovh_rs = [t * c / j["run_seconds"] - 1 for t, j in zip(total, jobs, strict=True)]
    n = reps[0]["trials"]
    fmt = lambda xs: f"{med(xs):+.1%}" + (" (" + ", ".join(f"{x:+.1%}" for x in xs) + ")" if len(xs) > 1 else "")  # noqa: E731
    meets = "yes" if med(ovh) <= TARGET else "no"
    lines = [
        f"{n} trials (b in {list(args.batch_sizes)} x GAR in {list(args.gars)}; f = {args.f}, `{args.attack}`, DP eps = "
        f"{args.eps} per step, {args.steps} steps, evaluation every {args.eval_every}, local engine), grid mode, "
        f"concurrency {c}, private local Ray cluster of {args.num_cpus or os.cpu_count()} CPUs, MLflow SQLite in a "
        f"temporary folder. Median of {len(reps)} repeat(s) (values of each repeat in brackets).",
        "",
        "| | seconds | vs training loops |",
        "|---|---|---|",
        f"| sum of the trials' training loops (MLflow step timestamps) | {loop:.1f} | 1.00x |",
        f"| sum of the trials' `run_seconds` (train()'s RunResult.seconds) | {med(j['run_seconds'] for j in jobs):.1f} | "
        f"{med(j['run_seconds'] / j['loop'] for j in jobs):.2f}x |",
        f"| tune job wall: Ray start + `start_job` + Ray shutdown | {med(total):.1f} | "
        f"{med(t / j['loop'] for t, j in zip(total, jobs, strict=True)):.2f}x |",
        f"| **overhead = wall x {c} / loops - 1** (target <= {TARGET:.0%}) | **{fmt(ovh)}** | meets: {meets} |",
        f"| overhead without Ray start/shutdown (a running cluster) | {fmt(ovh_job)} | "
        f"meets: {'yes' if med(ovh_job) <= TARGET else 'no'} |",
        f"| overhead against the sum of `run_seconds` | {fmt(ovh_rs)} | |",
    ]
    marg = [j["marginal"] for j in jobs if j["marginal"] is not None]
    if marg:
        lines.append(f"| marginal overhead of one more trial (trials after the first: from the previous trial's end "
                     f"to its own, vs its loop) | {fmt(marg)} | meets: {'yes' if med(marg) <= TARGET else 'no'} |")
    if "ref_untracked" in reps[0]:
        ru = [r["ref_untracked"] for r in reps]
        rt = [r["ref_tracked"] for r in reps]
        lines += [
            f"| reference: same configs in-process, `train(cfg, track=False)`, wall | {med(r['wall'] for r in ru):.1f} | "
            f"{med(r['wall'] for r in ru) / loop:.2f}x |",
            f"| reference: its training loops | {med(r['loop'] for r in ru):.1f} | {med(r['loop'] for r in ru) / loop:.2f}x |",
            f"| reference: same configs in-process, `train(cfg)` with MLflow, wall | {med(r['wall'] for r in rt):.1f} | "
            f"{med(r['wall'] for r in rt) / loop:.2f}x |",
            f"| MLflow logging per run (tracked - untracked, in-process) | "
            f"{med((b['wall'] - a['wall']) / a['runs'] for a, b in zip(ru, rt, strict=True)):.2f} | |",
            f"| tune job wall / in-process untracked wall | | "
            f"{med(t / r['wall'] for t, r in zip(total, ru, strict=True)):.2f}x |",
        ]
    lines += ["", "Where the wall goes (seconds, median over repeats; per-trial rows summed over trials; with "
              f"concurrency {c} the trial rows are trial-seconds, compared with wall x {c}):", "",
              "| part | seconds | share of wall x concurrency |", "|---|---|---|"]
    wallc = med(t * c for t in total)
    parts = [("Ray start (private local cluster)", [j["ray_start"] * c for j in jobs]),
             ("job set-up (validation, results dir, MLflow parent run)", [j["job_setup"] * c for j in jobs])]
    parts += [(k, [j["segments"][k] for j in jobs]) for k in jobs[0]["segments"]]
    parts += [("outside any trial (Tune scheduling, trial process start, result handling, job end)",
               [j["outside"] for j in jobs]),
              ("Ray shutdown", [j["ray_stop"] * c for j in jobs])]
    for name, xs in parts:
        lines.append(f"| {name} | {med(xs):.2f} | {med(xs) / wallc:.1%} |")
    lines += ["", "Per trial (last repeat): seconds", "",
              "| b | GAR | trial set-up | run set-up | loop | run finish | trial finish | run_seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for x in jobs[-1]["trials"]:
        lines.append(f"| {x['b']} | {x['gar']} | {x['run_start'] - x['trainable_start']:.2f} | "
                     f"{x['loop_start'] - x['run_start']:.2f} | {x['loop']:.2f} | {x['run_end'] - x['loop_end']:.2f} | "
                     f"{x['trainable_end'] - x['run_end']:.2f} | {x['run_seconds']:.2f} |")
    lines += ["", f"1-minute load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."]
    numbers = {"overhead": med(ovh), "overhead_no_ray": med(ovh_job), "marginal": med(marg) if marg else None, "overhead_vs_run_seconds": med(ovh_rs),
               "loop_s": loop, "wall_s": med(total), "concurrency": c, "trials": n, "repeats": reps}
    return "\n".join(lines), numbers


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[25, 50, 150, 300])
    ap.add_argument("--gars", nargs="+", default=["mda"])
    ap.add_argument("--f", type=int, default=3)
    ap.add_argument("--attack", default="little")
    ap.add_argument("--eps", type=float, default=0.2, help="DP eps per step")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=1, help="trials at once (overhead uses wall x concurrency)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private Ray cluster (default: all cores)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the whole measurement (median)")
    ap.add_argument("--run-plots", action="store_true", help="tune.run_plots: each run logs its curves plot")
    ap.add_argument("--no-reference", action="store_true", help="skip the in-process train() references")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (MLflow store, Tune results)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    args = ap.parse_args(argv)

    data = os.environ.get("TUNEGUARD_DATA_DIR")
    if data:  # trials run in their own working dirs, and Ray's workers inherit this before it starts
        os.environ["TUNEGUARD_DATA_DIR"] = str(Path(data).expanduser().resolve())
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    token_dir = None
    if not os.environ.get("RAY_AUTH_TOKEN_PATH") and not os.environ.get("RAY_AUTH_TOKEN"):
        # keep Ray's auth token out of ~/.ray (tuneguard.raycluster.connect creates the file)
        token_dir = tempfile.mkdtemp(prefix="tgb-token-")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(token_dir) / "ray_auth_token")
    try:
        reps = []
        for i in range(1, args.repeats + 1):
            print(f"repeat {i}/{args.repeats}", flush=True)
            reps.append(one_repeat(args, i))
    finally:
        if token_dir:
            shutil.rmtree(token_dir, ignore_errors=True)
    text, numbers = report(args, reps)
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2, default=str))
    if args.write:
        from benchmarks._common import write_section

        write_section(TITLE, text, "python -m benchmarks.tune_overhead " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
