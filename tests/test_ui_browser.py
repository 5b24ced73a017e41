"""``tuneguard ui`` in a real browser: headless Chromium renders the MLflow UI (a React SPA) and
the rendered DOM lists the experiment, the tune job's run and a trial run with its VN-ratio
metrics. Screenshots go to test-artifacts/ (gitignored).

Needs Chromium (``apt-get install -y chromium``); skipped with that reason when it is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tuneguard.tracking import RunTracker

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browse(url: str, *, screenshot: Path | None = None, budget_ms: int = 30000) -> str:
    """The DOM after the page's JavaScript ran (or a screenshot of it)."""
    with tempfile.TemporaryDirectory(prefix="tg-chromium-") as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
               f"--virtual-time-budget={budget_ms}", "--window-size=1600,1000"]
        cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        res = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=120)
    if screenshot:
        assert screenshot.exists() and screenshot.stat().st_size > 10_000, res.stderr[-2000:]
        return ""
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture()
def store(tmp_path):
    """A store holding one tune job: the job run and two trial runs with per-step metrics."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = f"tg-ui-{uuid.uuid4().hex[:6]}"
    parent = RunTracker(exp, tracking_uri=uri, run_name="tune-uitest-job",
                        tags={"tuneguard.kind": "tune_job", "tuneguard.job": "uitest"})
    kids = []
    for name in ("a1b2c3d4-little", "a1b2c3d4-empire"):
        run = RunTracker(exp, tracking_uri=uri, run_name=name, parent_run_id=parent.run_id,
                         tags={"tuneguard.kind": "trial", "tuneguard.job": "uitest"})
        for step in range(1, 6):
            run.log_metrics({"vn_submit": 0.5 / step, "vn_bound": 0.2, "cross_accuracy": 0.1 * step}, step=step)
        run.end()
        kids.append(run)
    parent.log_metrics({"best_objective": 0.5}, step=1)
    parent.end()
    return uri, exp, parent, kids


def test_ui_lists_the_experiment_and_its_runs(store, tmp_path):
    uri, exp, parent, kids = store
    port = free_port()
    env = {**os.environ, "TUNEGUARD_HOME": str(tmp_path / "home")}
    exe = str(Path(sys.executable).with_name("tuneguard"))
    log = open(tmp_path / "ui.out", "w+")
    proc = subprocess.Popen([exe, "ui", "--tracking-uri", uri, "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            log.seek(0)
            if url in log.read():
                break
            assert proc.poll() is None, (tmp_path / "ui.out").read_text()
            time.sleep(0.5)
        else:
            pytest.fail("tuneguard ui did not print its URL within 120 s:\n" + (tmp_path / "ui.out").read_text())
        assert urllib.request.urlopen(f"{url}/health", timeout=5).read() == b"OK"

        home = browse(f"{url}/")
        assert exp in home, "the experiment is not listed on the MLflow home page"
        exp_id = parent.experiment_id
        runs = browse(f"{url}/#/experiments/{exp_id}/runs")
        assert "tune-uitest-job" in runs, "the tune job's run is not listed"
        trial = browse(f"{url}/#/experiments/{exp_id}/runs/{kids[0].run_id}")
        assert "a1b2c3d4-little" in trial and "vn_submit" in trial and "vn_bound" in trial

        ARTIFACTS.mkdir(exist_ok=True)
        browse(f"{url}/#/experiments/{exp_id}/runs", screenshot=ARTIFACTS / "ui_runs.png")
        browse(f"{url}/#/experiments/{exp_id}/runs/{kids[0].run_id}", screenshot=ARTIFACTS / "ui_trial_run.png")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    assert proc.returncode == 0, (tmp_path / "ui.out").read_text()
    assert "MLflow UI stopped" in (tmp_path / "ui.out").read_text()
    time.sleep(1.0)
    with pytest.raises(OSError):  # the server went with it
        urllib.request.urlopen(f"{url}/health", timeout=2)


@pytest.fixture()
def trained_job(tmp_path, data_dir):
    """A finished job's runs as ``tuneguard tune`` writes them, trained for real (tiny config):
    default run names, the VN-vs-bound figure, the experiment kind tag."""
    from tuneguard.config import build_config
    from tuneguard.training import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = f"tg-ui-job-{uuid.uuid4().hex[:6]}"
    parent = RunTracker(exp, tracking_uri=uri, run_name="tune-uijob",
                        tags={"tuneguard.kind": "tune_job", "tuneguard.job": "uijob"})
    cfg = build_config({"name": exp, "dataset": "mnist", "n_workers": 5, "f": 1, "attack": "little", "gar": "median",
                        "batch_size": 16, "lr": 0.1, "steps": 4, "eval_every": 2,
                        "privacy": {"mode": "per_step", "eps": 0.5}})
    res = train(cfg, tracking_uri=uri, tags={"tuneguard.kind": "trial", "tuneguard.job": "uijob"},
                parent_run_id=parent.run_id, plots=False)
    parent.end()
    return uri, exp, parent, res


def test_ui_opens_on_runs_with_descriptive_names_and_the_vn_figure(trained_job, tmp_path):
    from mlflow import MlflowClient

    uri, exp, parent, res = trained_job
    name = "median b=16 lr=0.10 little eps=0.5/step"
    cl = MlflowClient(uri)
    assert cl.get_run(res.run_id).info.run_name == name
    assert cl.get_experiment(parent.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    port = free_port()
    env = {**os.environ, "TUNEGUARD_HOME": str(tmp_path / "home")}
    log = open(tmp_path / "ui.out", "w+")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("tuneguard")), "ui", "--tracking-uri", uri,
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "tip:" not in (tmp_path / "ui.out").read_text():  # its last line
            assert proc.poll() is None, (tmp_path / "ui.out").read_text()
            time.sleep(0.5)
        # the experiment's own page (no /runs): the classic runs table, with the job's run (its
        # trials are nested under it), not MLflow 3's GenAI overview
        link = next(x.split(": ", 1)[1].strip() for x in (tmp_path / "ui.out").read_text().splitlines()
                    if x.strip().startswith(f"{exp}: "))  # the link `tuneguard ui` prints for the experiment
        landing = browse(link)
        assert "tune-uijob" in landing and "Run Name" in landing, "the experiment did not open on its runs"
        run_page = browse(f"{url}/#/experiments/{parent.experiment_id}/runs/{res.run_id}?workflowType=machine_learning")
        assert name in run_page, "the trial run does not show its descriptive name"
        page = browse(f"{url}/#/experiments/{parent.experiment_id}/runs/{res.run_id}/artifacts/plots/vn_vs_bound.png?workflowType=machine_learning")
        assert "vn_vs_bound.png" in page, "the run's VN-vs-bound figure is not listed"
        ARTIFACTS.mkdir(exist_ok=True)
        browse(f"{url}/#/experiments/{parent.experiment_id}/runs/{res.run_id}/artifacts/plots/vn_vs_bound.png?workflowType=machine_learning",
               screenshot=ARTIFACTS / "ui_vn_vs_bound.png")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
