"""A whole tune job on each engine: the quickstart space with ``engine: actors`` vs ``engine: local``.

    python -m benchmarks.engine_job [--repeats 3] [--space search_spaces/quickstart.yaml] [--write]
    python -m benchmarks.engine_job --repeats 1 --set base.steps=10 --set tune.num_samples=2   # smoke run

Each job is ``tuneguard tune SPACE --set tune.engine=E`` in a fresh process (its own private Ray
cluster, a fresh MLflow SQLite store and results dir in a temporary folder), same space, same
Optuna seed; the engines alternate (local, actors, local, actors, ...) so machine noise hits
both alike. Reported per engine (median over repeats): the job's wall time (the process, Ray's
start and stop included), its ratio to the local engine, the actor pools started per job and
the runs that found them warm (the runs' MLflow tag ``tuneguard.actor_pool``: a pool's first run
boots it), that first run's actor start-up, and the job's peak memory: the largest sum over the job's processes (the
CLI, Ray's processes, trial processes, actors) of their PSS (shared pages divided among the
processes mapping them, so the object-store dataset counts once), sampled every 0.5 s from
/proc.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tuneguard.results import schema

REPO = Path(__file__).resolve().parents[1]
TITLE = "Tune job per engine (benchmarks/engine_job.py)"


def _pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _session_pids(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (this job's TUNEGUARD_HOME): the CLI, and
    every Ray process it started (they inherit its environment)."""
    out = []
    needle = marker.encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes():
                out.append(int(pid))
        except OSError:
            continue
    return out


class PeakMemory(threading.Thread):
    def __init__(self, marker: str):
        super().__init__(daemon=True)
        self.marker, self.peak, self.done = marker, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, sum(_pss_mb(p) for p in _session_pids(self.marker)))
            self.done.wait(0.5)


def run_job(engine: str, space: str, sets: list[str]) -> dict:
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix=f"tg-engine-{engine}-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "TUNEGUARD_HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(Path(tmp) / "token")}
        cmd = [str(Path(sys.executable).with_name("tuneguard")), "tune", space, "--no-progress",
               "--set", f"tune.engine={engine}", *[x for s in sets for x in ("--set", s)]]
        mem = PeakMemory(str(home))
        mem.start()
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        wall = time.perf_counter() - start
        mem.done.set()
        mem.join()
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        cl = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        runs = [r for e in cl.search_experiments() for r in
                cl.search_runs([e.experiment_id], filter_string="tags.`tuneguard.kind` = 'trial'", max_results=1000)]
        # A pool's first run waited for its actors to boot (its start-up); the others found them warm.
        first: dict[str, object] = {}
        for r in sorted(runs, key=lambda r: r.info.start_time):
            pool = r.data.tags.get(schema.ACTOR_POOL)
            if pool is not None:
                first.setdefault(pool, r)
        startups = [float(r.data.tags[schema.ACTOR_STARTUP_S]) for r in first.values()
                    if schema.ACTOR_STARTUP_S in r.data.tags]
        pooled = sum(1 for r in runs if schema.ACTOR_POOL in r.data.tags)
        best = [ln for ln in out.stdout.splitlines() if ln.startswith("best objective")]
        return {"engine": engine, "wall": wall, "runs": len(runs), "pools": len(first),
                "warm_runs": pooled - len(first), "startup": statistics.median(startups) if startups else None,
                "peak_mb": mem.peak, "best": best[0] if best else ""}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--space", default="search_spaces/quickstart.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for both jobs")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows: dict[str, list[dict]] = {"local": [], "actors": []}
    for i in range(args.repeats):
        for engine in ("local", "actors"):
            r = run_job(engine, args.space, args.sets)
            rows[engine].append(r)
            print(f"[{i + 1}/{args.repeats}] {engine}: {r['wall']:.1f} s, {r['runs']} runs, {r['pools']} actor pool(s) "
                  f"started, peak {r['peak_mb']:.0f} MB", flush=True)
    load_after = os.getloadavg()[0]
    base = statistics.median(r["wall"] for r in rows["local"])
    lines = ["| engine | job wall (median) | vs local | walls | runs/job | actor pools started/job | "
             "runs on warm actors/job | first-run actor start-up | peak memory (PSS, all processes) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for engine, rs in rows.items():
        wall = statistics.median(r["wall"] for r in rs)
        start = [r["startup"] for r in rs if r["startup"] is not None]
        walls = ", ".join(f"{r['wall']:.0f}" for r in rs)
        lines.append(
            f"| {engine} | {wall:.1f} s | {wall / base:.2f}x | {walls} s | "
            f"{statistics.median(r['runs'] for r in rs):.0f} | "
            + (f"{statistics.median(r['pools'] for r in rs):.0f} | {statistics.median(r['warm_runs'] for r in rs):.0f} | "
               + (f"{statistics.median(start):.1f} s |" if start else "- |") if engine == "actors" else "- | - | - |")
            + f" {statistics.median(r['peak_mb'] for r in rs) / 1024:.2f} GB |")
    lines += ["", f"Space: `{args.space}`" + (f" with {' '.join('--set ' + s for s in args.sets)}" if args.sets else "")
              + f". Load average (1 min) before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores."]
    table = "\n".join(lines)
    print(table)
    if args.write:
        from benchmarks._common import write_section

        cmd = "python -m benchmarks.engine_job " + " ".join(a for a in (argv or sys.argv[1:]))
        write_section(TITLE, table, cmd.strip(), __doc__)


if __name__ == "__main__":
    main()
