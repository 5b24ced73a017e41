"""A tune job on a two-node Ray cluster simulated on this machine (``ray.cluster_utils.Cluster``:
a head and a worker node, 1 CPU each), run as a script by tests/test_multinode.py so that its
Ray cluster is the only one in the process.

    python tests/multinode_job.py OUT_DIR

Prints one JSON line: per run, the nodes its actors ran on, and its step metrics next to those of
the same config trained by the local engine in this process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SPACE = {
    "base": {"name": "multinode", "dataset": "mnist", "n_workers": 4, "f": 1, "attack": "little", "gar": "median",
             "steps": 4, "eval_every": 2, "momentum": 0.9, "lr": 0.2, "engine": "actors",
             "privacy": {"mode": "per_step", "eps": 0.5},
             "actors": {"placement": "spread"}},
    "search": {"batch_size": [8, 16]},
    "tune": {"mode": "grid", "cpus_per_trial": 1.0, "concurrency": 2},
}


def main(out: Path) -> dict:
    import ray
    from mlflow import MlflowClient
    from ray.cluster_utils import Cluster

    from tuneguard.config import build_config
    from tuneguard.training import train
    from tuneguard.tune.search import start_job
    from tuneguard.tune.space import Space

    node = {"num_cpus": 1, "object_store_memory": 300 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    try:
        summary = start_job(Space.from_dict(SPACE), address=cluster.address, tracking_uri=uri,
                            results_dir=out / "job", progress=False)
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
        cluster.shutdown()
    cl = MlflowClient(uri)
    exp = cl.get_experiment_by_name("multinode")
    runs = cl.search_runs([exp.experiment_id], filter_string=f"tags.`tuneguard.job` = '{summary.job_id}' "
                          "and tags.`tuneguard.kind` = 'trial'")
    report = {"completed": summary.completed, "trials": summary.trials, "nodes": nodes, "runs": []}
    for r in runs:
        cfg = build_config({**SPACE["base"], "batch_size": int(r.data.params["batch_size"]), "engine": "local"})
        ref = train(cfg, track=False)
        hist = {k: [m.value for m in sorted(cl.get_metric_history(r.info.run_id, k), key=lambda m: m.step)]
                for k in ("param_norm", "vn_submit", "cross_accuracy")}
        report["runs"].append({
            "batch_size": cfg.batch_size, "actor_nodes": r.data.tags.get("tuneguard.actor_nodes"),
            "transport": r.data.tags.get("tuneguard.actor_transport"),
            "trial_node": r.data.tags.get("tuneguard.node"), "actors": hist,
            "local": {k: [h[k] for h in ref.history if k in h] for k in hist},
        })
    return report


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(Path(sys.argv[1]))), flush=True)
