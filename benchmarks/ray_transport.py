"""What moving one actor-engine step's data costs in Ray itself, without any training: the data
flow of a step (theta out to two worker actors, their [6, d] rows back, a third actor reading
both) as plain actor tasks against the same flow as a Ray compiled graph, and what a compiled
graph's actors burn while they wait for the next step.

Why it exists: issue 12 asks for an actor step within 1.5x of the local step at b = 25, where
the local step is ~20-30 ms on the reference 2-core VM. This script measures the floor the
transport alone sets, and records why the engine does not use compiled graphs (their readers
busy-wait: on a machine whose cores the actors share, the waiting steals the computing).

    python -m benchmarks.ray_transport [--rounds 60] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import ray

D = 79_510  # the parameters of mlp_001
ROWS = 6  # honest workers per worker actor (the quickstart's and the default layout's)


@ray.remote(num_cpus=0.1)
class Node:
    def pid(self) -> int:
        return os.getpid()

    def noop(self, *_):
        return 1

    def rows(self, *_):
        """A worker actor's output: the submitted rows (also the momentum) and one [d] moment."""
        return {"submit": np.ones((ROWS, D), np.float32), "sample_mean": np.ones(D, np.float32)}

    def read(self, *outputs):
        """The Byzantine actor: reads every honest row, answers f = 1 row."""
        return np.stack([o["submit"].mean(0) for o in outputs if isinstance(o, dict)])[:1]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _median_ms(fn, rounds: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(rounds: int) -> dict[str, float]:
    from ray.dag import InputNode, MultiOutputNode

    a, b, c = Node.remote(), Node.remote(), Node.remote()
    pids = ray.get([x.pid.remote() for x in (a, b, c)])
    theta = np.ones(D, np.float32)
    prev: list = [None, None]

    def task_step() -> None:
        ref = ray.put(theta)
        honest = [a.rows.remote(ref, prev[0]), b.rows.remote(ref, prev[1])]
        byz = c.read.remote(*honest)
        ray.get(honest)
        ray.get(byz)
        prev[:] = honest

    out = {"noop call (ms)": _median_ms(lambda: ray.get(a.noop.remote()), rounds),
           "tasks: one step's data flow (ms)": _median_ms(task_step, rounds)}
    with InputNode() as inp:
        h = [a.rows.bind(inp), b.rows.bind(inp)]
        dag = MultiOutputNode([*h, c.read.bind(*h)])
    graph = dag.experimental_compile()
    try:
        def graph_step() -> None:
            res = ray.get(graph.execute(theta), timeout=60)
            del res  # outputs are views of the channels' buffers: hold none across steps

        out["compiled graph: one step's data flow (ms)"] = _median_ms(graph_step, rounds)
        before = [_cpu_seconds(p) for p in pids]
        time.sleep(3.0)
        after = [_cpu_seconds(p) for p in pids]
        out["compiled graph: CPU of one idle actor (cores)"] = statistics.mean(
            (y - x) / 3.0 for x, y in zip(before, after, strict=True))
    finally:
        graph.teardown()
    before = [_cpu_seconds(p) for p in pids]
    time.sleep(3.0)
    after = [_cpu_seconds(p) for p in pids]
    out["plain actor: CPU of one idle actor (cores)"] = statistics.mean(
        (y - x) / 3.0 for x, y in zip(before, after, strict=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    ray.init(num_cpus=2, logging_level="ERROR", include_dashboard=False)
    try:
        res = measure(args.rounds)
    finally:
        ray.shutdown()
    rows = ["| what | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in res.items()]
    body = "\n".join(rows) + (
        f"\n\nPayload: theta [{D}] float32 out, [{ROWS}, {D}] + [{D}] float32 back from each of two "
        f"worker actors, a third actor reading both. Load average (1 min) before/after: "
        f"{load0:.1f} / {os.getloadavg()[0]:.1f}.\n")
    print(body)
    if args.write:
        from benchmarks._common import write_section

        write_section("Ray transport (benchmarks/ray_transport.py)", body,
                      f"python -m benchmarks.ray_transport --rounds {args.rounds} --write", __doc__)


if __name__ == "__main__":
    main()
