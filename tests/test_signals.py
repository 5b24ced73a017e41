"""Issue 15, records that tell the truth: SIGINT / SIGTERM to `train` and `tune` leave no MLflow
run RUNNING, and three `train` processes starting at once on a fresh SQLite store all succeed.

Real processes (``python -m tuneguard.cli`` in subprocesses, real signals), a real MLflow SQLite
store in a tmp dir, a private Ray cluster per `tune` process (its temp dir marks its processes,
which are killed by PID at the end if anything is left).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from procs import kill_matching

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "mnist_001.yaml")
SMALL = ["--set", "dataset=mnist", "--set", "n_workers=5", "--set", "f=1", "--set", "gar=median",
         "--set", "batch_size=8", "--set", "eval_every=50"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "TUNEGUARD_HOME": str(tmp_path / "home"), **extra}


def _runs(uri: str, experiment: str) -> list:
    cl = MlflowClient(uri)
    exp = cl.get_experiment_by_name(experiment)
    return [] if exp is None else cl.search_runs([exp.experiment_id], max_results=1000)


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return
        except Exception:  # noqa: BLE001 - the store may not exist yet
            pass
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


# --- train ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_train_ends_its_run_killed(tmp_path, data_dir, sig, code):
    name = f"tg-sig-{uuid.uuid4().hex[:6]}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tuneguard.cli", "train", CONFIG, *SMALL,
                                 "--set", "steps=200000", "--set", f"name={name}", "--tracking-uri", uri],
                                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=_env(tmp_path))
        try:
            # the run exists and has logged a first batch of step metrics: training is under way
            _wait_for(lambda: any("train_loss" in r.data.metrics for r in _runs(uri, name)), proc, log, 180,
                      "step metrics in MLflow")
            proc.send_signal(sig)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert proc.returncode == code, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    runs = _runs(uri, name)
    assert len(runs) == 1
    assert runs[0].info.status == "KILLED", runs[0].info.status
    assert runs[0].data.tags.get("tuneguard.status") == "KILLED"


def test_error_before_the_loop_ends_the_run_failed(tmp_path, tracking_uri):
    """A failure after the MLflow run was created but before training (here: the data dir holds
    no dataset) ends the run FAILED, not RUNNING."""
    from tuneguard.config import build_config
    from tuneguard.training import train

    empty = tmp_path / "no-data"
    empty.mkdir()
    name = f"tg-fail-{uuid.uuid4().hex[:6]}"
    cfg = build_config({}, ["dataset=mnist", f"data_dir={empty}", f"name={name}", "steps=2"])
    with pytest.raises(Exception):  # noqa: B017 - DataNotFoundError, whichever layer raises it
        train(cfg, tracking_uri=tracking_uri)
    runs = _runs(tracking_uri, name)
    assert [r.info.status for r in runs] == ["FAILED"]


# --- tune -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_tune_leaves_no_running_run(tmp_path, data_dir, sig):
    name = f"tg-tsig-{uuid.uuid4().hex[:6]}"
    space = {
        "base": {"name": name, "dataset": "mnist", "n_workers": 5, "f": 1, "attack": "little", "gar": "median",
                 "steps": 100000, "eval_every": 20, "batch_size": 8, "lr": 0.2, "engine": "local"},
        "search": {"momentum": [0.0, 0.5]},
        "tune": {"mode": "grid", "checkpoint_every": 100},
    }
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray_tmp = tempfile.mkdtemp(prefix="tgs", dir="/tmp")
    log = tmp_path / "tune.log"
    env = _env(tmp_path, RAY_TMPDIR=ray_tmp)
    try:
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "tuneguard.cli", "tune", str(space_file), "--tracking-uri",
                                     uri, "--results-dir", str(tmp_path / "job"), "--no-progress", "--num-cpus", "2",
                                     "--concurrency", "1"],
                                    cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)

            def trial_running() -> bool:
                return any(r.data.tags.get("tuneguard.kind") == "trial" and r.info.status == "RUNNING"
                           and "train_loss" in r.data.metrics for r in _runs(uri, name))

            _wait_for(trial_running, proc, log, 300, "running trial with step metrics")
            proc.send_signal(sig)
            try:
                proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        kill_matching(ray_tmp)
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    runs = _runs(uri, name)
    statuses = {r.data.tags.get("tuneguard.kind"): r.info.status for r in runs}
    assert runs and not [r for r in runs if r.info.status == "RUNNING"], [(r.data.tags.get("tuneguard.kind"),
                                                                           r.info.status) for r in runs]
    assert statuses.get("tune_job") == "KILLED" and statuses.get("trial") == "KILLED", statuses
    assert "continue:  tuneguard tune --resume" in text
    assert "stopped early (ASHA)" not in text  # scheduler none


# --- the fresh-store race ---------------------------------------------------------------------
def test_three_trains_on_a_fresh_store(tmp_path, data_dir):
    """Three `train` processes start at once on a SQLite store that does not exist yet: the store
    is created once (under a file lock) and all three runs finish."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    name = f"tg-fresh-{uuid.uuid4().hex[:6]}"
    procs = [subprocess.Popen([sys.executable, "-m", "tuneguard.cli", "train", CONFIG, *SMALL, "--set", "steps=2",
                               "--set", f"seed={i}", "--set", f"name={name}", "--tracking-uri", uri, "--json"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(tmp_path))
             for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "already exists" not in err
    runs = _runs(uri, name)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
