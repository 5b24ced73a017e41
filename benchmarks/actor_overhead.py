"""Seconds per step of the Ray actor engine against the local engine, same config.

    python -m benchmarks.actor_overhead [--steps 5] [--repeats 9] [--batch-sizes 25 500] [--write]

Setting (001): Fashion-MNIST, n = 15, f = 3, MDA, ``little``, DP per step (eps 0.2, Theorem 1),
worker momentum 0.99, the 001 MLP. Engines: the local engine (all 12 honest workers in one
batched pass, torch's default threads), the actor engine with one worker per actor (12 worker
actors) and with the default grouping (one worker actor per core). Actors reserve 0.1 CPU each
so that 14 of them fit a 2-CPU private cluster. Timed rounds alternate between the engines so
machine noise hits all alike; the median round and the best round (the least disturbed by other
processes on a shared machine) are reported. ``local (1 thread)`` is the local engine with one
torch thread, the compute each actor gets.

The actor engine's steps go through shared memory here (all actors on this node); the phase
table times the object-store path (``actors.transport: object_store``, for actors on other
nodes) one hop at a time.

Also: the actor engine's start-up (constructor: dataset put + actors started and ready; the Ray
cluster itself is started once, before) and the memory of each actor process (PSS: shared pages
divided among the processes that map them, so the object-store dataset counts once in total;
USS: private memory), from /proc/<pid>/smaps_rollup.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

from benchmarks._common import write_section
from tuneguard.config import build_config
from tuneguard.raycluster import connect
from tuneguard.training.actors import ActorEngine
from tuneguard.training.actors.layout import available_cpus
from tuneguard.training.context import build_context
from tuneguard.training.local import LocalEngine


def config(b: int, engine: str, wpa: int | None):
    return build_config(dict(dataset="fashion_mnist", batch_size=b, gar="mda", attack="little",
                             privacy={"mode": "per_step", "eps": 0.2}, engine=engine,
                             actors={"workers_per_actor": wpa, "cpus_per_actor": 0.1}))


class Timed:
    def __init__(self, label: str, engine, wpa: str, startup: float | None, threads: int | None = None):
        self.label, self.engine, self.wpa, self.startup, self.threads = label, engine, wpa, startup, threads
        self.state = engine.init_state()
        self.t = 0
        self.rounds: list[float] = []

    def run(self, steps: int) -> float:
        default = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            start = time.perf_counter()
            for _ in range(steps):
                self.state, _ = self.engine.step(self.state, self.t)
                self.t += 1
            return (time.perf_counter() - start) / steps
        finally:
            torch.set_num_threads(default)


def _inside(handle, method: str, *args):
    """Run ``method`` inside the actor and return the seconds it took there."""
    def timed(self, *a):
        import time as _time

        t0 = _time.perf_counter()
        getattr(self, method)(*a)
        return _time.perf_counter() - t0
    return handle.__ray_call__.remote(timed, *args)


def phase_profile(engine: ActorEngine, state, t0: int, steps: int) -> dict[str, tuple[float, float]]:
    """Per phase of a step, run one at a time: (round trip seen by the driver, time inside the
    actor), median ms. The difference is what the hop costs: task dispatch, object-store
    transfer, waiting for a core. The server is this process (no hop): its row is its whole
    work, reading the outputs, stacking, honest metrics, GAR, update."""
    import ray

    from tuneguard.training.actors.remote import to_tensor
    from tuneguard.training.server import server_step

    workers = [s for s in engine._slots if s.kind == "workers"]
    byz = engine._byz_slot()
    h = engine.cfg.n_honest
    run = engine.run_key
    rows: dict[str, list[tuple[float, float]]] = {"workers": [], "byzantine": [], "server": []}
    for t in range(t0, t0 + steps):
        theta = ray.put(state.theta.numpy())
        a = time.perf_counter()
        hon = [s.handle.round.remote(run, theta, state.honest[i], t) for i, s in enumerate(workers)]
        ray.wait(hon, num_returns=len(hon))
        rt = time.perf_counter() - a
        inside = max(ray.get([_inside(s.handle, "round", run, theta, state.honest[i], t) for i, s in enumerate(workers)]))
        rows["workers"].append((rt, inside))
        a = time.perf_counter()
        bref = byz.handle.craft.remote(run, t, None, None, *hon)
        ray.wait([bref])
        rows["byzantine"].append((time.perf_counter() - a, ray.get(_inside(byz.handle, "craft", run, t, None, None, *hon))))
        a = time.perf_counter()
        honest, summary, stack = engine._honest(ray.get(hon))
        stack[h:].copy_(to_tensor(ray.get(bref)["vectors"], stack.device))
        new_theta, _ = server_step(engine.ctx, state.theta, honest, None, t, summary=summary, stacked=stack)
        rt = time.perf_counter() - a
        rows["server"].append((rt, rt))
        state = type(state)(new_theta, hon, None)
    return {k: (statistics.median(r for r, _ in v) * 1e3, statistics.median(i for _, i in v) * 1e3)
            for k, v in rows.items()}


def measure(b: int, steps: int, repeats: int) -> list[dict]:
    ctx = build_context(config(b, "local", None))
    local = Timed(f"local ({torch.get_num_threads()} threads)", LocalEngine(ctx), "12 (one pass)", None)
    engines = [local, Timed("local (1 thread)", LocalEngine(ctx), "12 (one pass)", None, threads=1)]
    for wpa in (1, None):
        t0 = time.perf_counter()
        eng = ActorEngine(config(b, "actors", wpa), warm=False)  # two engines live at once
        startup = time.perf_counter() - t0
        sizes = sorted({len(g) for g in eng.layout.groups})
        label = f"actors, {len(eng.layout.groups)} worker actors"
        engines.append(Timed(label, eng, "/".join(map(str, sizes)) + (" (default)" if wpa is None else ""), startup))
    try:
        for e in engines:  # warm-up: first calls, allocator, object-store mappings
            e.run(2)
        for _ in range(repeats):
            for e in engines:
                e.rounds.append(e.run(steps))
        rows = []
        base, base_min = statistics.median(local.rounds), min(local.rounds)
        for e in engines:
            sec, best = statistics.median(e.rounds), min(e.rounds)
            row = {"b": b, "engine": e.label, "wpa": e.wpa, "step_ms": sec * 1e3, "ratio": sec / base,
                   "best_ms": best * 1e3, "best_ratio": best / base_min,
                   "overhead_ms": (best - base_min) * 1e3, "startup_s": e.startup, "mem": None}
            if isinstance(e.engine, ActorEngine):
                steps_seen = list(e.engine.timeline)  # the timed rounds' shared-memory steps
                if steps_seen:
                    row["timeline"] = {k: statistics.median(x.get(k, 0.0) for x in steps_seen) for k in steps_seen[0]}
                row["transport"] = e.engine.transport
                row["phases"] = phase_profile(e.engine, e.state, e.t, 5)
                mem = e.engine.actor_memory()
                row["mem"] = {
                    "actors": len(mem),
                    "pss": statistics.mean(m["pss"] for m in mem.values()),
                    "uss": statistics.mean(m["uss"] for m in mem.values()),
                    "rss": statistics.mean(m["rss"] for m in mem.values()),
                    "pss_total": sum(m["pss"] for m in mem.values()),
                }
            rows.append(row)
        return rows
    finally:
        for e in engines:
            e.engine.close()


def _ray_worker_niceness() -> str:
    return os.environ.get("RAY_worker_niceness", "15 (Ray's default)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[25, 500])
    ap.add_argument("--nice", type=int, default=0,
                    help="raise this process's niceness first (15: the niceness Ray gives its workers)")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    if args.nice:
        os.nice(args.nice)
    t0 = time.perf_counter()
    conn = connect(num_cpus=available_cpus())
    ray_start = time.perf_counter() - t0
    load_before = os.getloadavg()
    try:
        rows = [r for b in args.batch_sizes for r in measure(b, args.steps, args.repeats)]
    finally:
        conn.close()
    load_after = os.getloadavg()
    lines = ["| b | engine | workers/actor | s/step (median) | vs local | s/step (best round) | vs local | "
             "overhead/step (best) | start-up | PSS/actor | USS/actor | PSS all actors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["mem"]
        mem = (f"{m['pss']:.0f} MB | {m['uss']:.0f} MB | {m['pss_total'] / 1024:.2f} GB ({m['actors']} actors)"
               if m else "- | - | -")
        start = f"{r['startup_s']:.1f} s" if r["startup_s"] is not None else "-"
        lines.append(f"| {r['b']} | {r['engine']} | {r['wpa']} | {r['step_ms'] / 1e3:.4f} | {r['ratio']:.2f}x | "
                     f"{r['best_ms'] / 1e3:.4f} | {r['best_ratio']:.2f}x | {r['overhead_ms']:+.1f} ms | {start} | {mem} |")
    lines += ["", "Where a shared-memory actor step goes (the engine's own timeline of the timed steps, median ms; "
              "start: until the last worker actor began; workers: the slowest one's compute; gather: until the "
              "server read the last reply; Byzantine: its wake-up, crafting (in brackets) and reply, overlapping "
              "the server's honest metrics; server: GAR, update, metrics):", "",
              "| b | engine | transport | start | workers | gather | Byzantine (craft) | server | step |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tl = r.get("timeline")
        if tl:
            lines.append(f"| {r['b']} | {r['engine']} | {r['transport']} | {tl['start']:.1f} | {tl['workers']:.1f} | "
                         f"{tl['gather']:.1f} | {tl['byzantine']:.1f} ({tl.get('craft', 0.0):.1f}) | {tl['server']:.1f} | "
                         f"{tl['step']:.1f} |")
    lines += ["", "Where an object-store actor step goes (`actors.transport: object_store`; phases run one at a time; median ms: round trip seen by the driver / "
              "time inside the actor; the server is the driver itself, its row is its whole work: reading the outputs, stacking, honest metrics, GAR, update):", "",
              "| b | engine | honest workers | Byzantine craft | server update |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("phases"):
            ph = r["phases"]
            lines.append(f"| {r['b']} | {r['engine']} | " + " | ".join(
                f"{ph[k][0]:.1f} / {ph[k][1]:.1f}" for k in ("workers", "byzantine", "server")) + " |")
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += ["", f"Private Ray cluster start: {ray_start:.1f} s. Driver peak RSS (holds the local engine's "
              f"dataset too): {driver_mb:.0f} MB. Load average (1 min) before/after: {load_before[0]:.1f} / "
              f"{load_after[0]:.1f} on {os.cpu_count()} cores. Niceness: this process (local engine, driver) "
              f"{os.nice(0)}, Ray workers (actors) {_ray_worker_niceness()}."]
    table = "\n".join(lines)
    print(table)
    if args.write:
        cmd = ("python -m benchmarks.actor_overhead --steps {} --repeats {} --batch-sizes {}{} --write"
               .format(args.steps, args.repeats, " ".join(map(str, args.batch_sizes)),
                       f" --nice {args.nice}" if args.nice else ""))
        write_section("Actor engine (benchmarks/actor_overhead.py)", table, cmd, __doc__)


if __name__ == "__main__":
    main()
