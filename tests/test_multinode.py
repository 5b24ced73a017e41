"""Tune jobs on multi-node Ray clusters, simulated on this machine:

- ``ray.cluster_utils.Cluster`` (a head and a worker node): an ``engine: actors`` job whose
  actors land on both nodes and give the local engine's numbers (tests/multinode_job.py, run as
  a script so that its cluster is the only Ray of its process);
- a cluster started with ``ray start --head`` and joined by address with ``tuneguard tune
  --address``, whose second node runs in its own mount namespace where the dataset folder is
  empty ("data only on the head"): the pre-flight check stops the job before any trial starts,
  naming that node, and ``--ship-data`` then runs the job with trials on both nodes.

Every Ray process these tests start is stopped by them (by PID, never ``ray stop``, which would
also stop the test session's own cluster).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from procs import kill_matching

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **extra}


def test_actors_spread_over_two_nodes_with_local_numbers(tmp_path, data_dir):
    out = subprocess.run([sys.executable, str(REPO / "tests" / "multinode_job.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=_env(), cwd=tmp_path)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    rep = json.loads(line.removeprefix("RESULT "))
    assert rep["completed"] == rep["trials"] == 2 and len(rep["nodes"]) == 2
    assert len(rep["runs"]) == 2
    for run in rep["runs"]:
        assert run["actor_nodes"] == "2", run  # placement spread: the server (trainable) and its actors on both nodes
        assert run["transport"] == "object_store", run  # actors off the server's node: no shared memory
        for key, values in run["actors"].items():
            assert values == pytest.approx(run["local"][key], rel=1e-5, abs=1e-6), key


# ray start --head, joined by address ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt && true"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture()
def two_node_cluster(tmp_path, data_dir):
    """`ray start --head` (1 CPU) and a second node (1 CPU) that cannot see ``data_dir``."""
    if not _can_unshare():
        pytest.skip("needs `unshare -m` (mount namespaces) to hide the data from one node")
    temp = Path("/tmp") / f"tgray{os.getpid()}"  # Ray's socket paths must stay short
    port = _free_port()
    common = ["--num-cpus", "1", "--temp-dir", str(temp), "--disable-usage-stats",
              "--object-store-memory", str(300 * 1024**2)]
    head = subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard=false",
                           "--dashboard-agent-listen-port", str(_free_port()), *common],
                          capture_output=True, text=True, timeout=180, env=_env())
    assert head.returncode == 0, head.stdout + head.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    worker_cmd = (f"mount --bind {empty} {Path(data_dir).resolve()} && exec {RAY} start --address 127.0.0.1:{port} "
                  f"--block --dashboard-agent-listen-port {_free_port()} " + " ".join(common))
    worker = subprocess.Popen(["unshare", "-m", "sh", "-c", worker_cmd], env=_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        probe = (f"import ray; ray.init(address='127.0.0.1:{port}', log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        while True:
            alive = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=120)
            if alive.stdout.strip().endswith("2"):
                break
            assert time.time() < deadline, "the second node did not join: " + alive.stdout + alive.stderr[-2000:]
            time.sleep(2)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        kill_matching(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def test_data_only_on_the_head_preflight_then_ship_data(two_node_cluster, tmp_path, data_dir):
    space = {
        "base": {"name": "datahead", "dataset": "mnist", "n_workers": 3, "f": 0, "attack": "none", "gar": "average",
                 "steps": 2, "eval_every": 2, "batch_size": 8, "lr": 0.1, "privacy": {"mode": "none"}},
        "search": {"seed": [1, 2]},
        "tune": {"mode": "grid", "concurrency": 2},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [str(Path(sys.executable).with_name("tuneguard")), "tune", str(path), "--address", two_node_cluster,
           "--tracking-uri", uri, "--no-progress"]
    env = _env(TUNEGUARD_DATA_DIR=str(Path(data_dir).resolve()), COLUMNS="200")
    start = time.time()
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    text = bad.stdout + bad.stderr
    assert bad.returncode == 2, text[-3000:]
    assert "pre-flight: 1 of 2 node(s)" in text and "dataset 'mnist' cannot be loaded there" in text, text[-3000:]
    assert "--ship-data" in text and "Traceback" not in text
    assert time.time() - start < 300
    cl = MlflowClient(uri)
    job = cl.search_runs([cl.get_experiment_by_name("datahead").experiment_id])[0]
    assert job.info.status == "FAILED" and job.data.tags["tuneguard.status"] == "FAILED"

    good = subprocess.run([*cmd, "--ship-data"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert good.returncode == 0, (good.stdout + good.stderr)[-3000:]
    assert "2/2 trials completed" in good.stdout
    exp = cl.get_experiment_by_name("datahead").experiment_id
    runs = cl.search_runs([exp], filter_string="tags.`tuneguard.kind` = 'trial'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["tuneguard.node"] for r in runs}) == 2, "the trials did not use both nodes"
