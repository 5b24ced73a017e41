"""A job whose trials fail: one clear error, a FAILED job run, a non-zero exit, and an early stop
when trials keep failing the same way (real Ray, Tune and MLflow)."""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

pytestmark = pytest.mark.slow


def failing_space(name: str) -> dict:
    # Every step of the actor engine takes longer than 1 ms: the worker actor "hangs", is
    # restarted once, hangs again, and the run stops with WorkerLost. A real failure mode that
    # every trial shares, as a broken cluster would be.
    return {
        "base": {"name": name, "dataset": "mnist", "n_workers": 2, "f": 0, "attack": "none", "gar": "average",
                 "steps": 3, "eval_every": 3, "batch_size": 8, "privacy": {"mode": "none"}, "engine": "actors",
                 "actors": {"step_timeout_s": 0.001}},
        "search": {"seed": [1, 2, 3, 4, 5]},
        "tune": {"mode": "grid", "concurrency": 1, "max_failures": 0, "stop_after_identical_failures": 2},
    }


def test_all_trials_failing_fails_the_job_once_and_stops_early(ray_local, data_dir, tmp_path, tracking_uri):
    from tuneguard.cli import app

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(failing_space("failing")))
    res = CliRunner().invoke(app, ["tune", str(path), "--tracking-uri", tracking_uri, "--no-progress",
                                   "--results-dir", str(tmp_path / "job")], env={"COLUMNS": "300"})
    out = res.output
    assert res.exit_code == 1, out
    assert "failed" in out and "0/" in out
    assert out.count("first error") == 1 and "actors.step_timeout_s" in out
    assert "stopped early: 2 trials failed with the same error" in out
    assert "Traceback" not in out and "tuneguard export" not in out
    cl = MlflowClient(tracking_uri)
    exp = cl.get_experiment_by_name("failing")
    job = cl.search_runs([exp.experiment_id], filter_string="tags.`tuneguard.kind` = 'tune_job'")[0]
    assert job.info.status == "FAILED" and job.data.tags["tuneguard.status"] == "FAILED"
    assert "same error" in job.data.tags["tuneguard.message"]
    trials = cl.search_runs([exp.experiment_id], filter_string="tags.`tuneguard.kind` = 'trial'")
    assert 2 <= len({r.data.tags["tuneguard.trial"] for r in trials}) < 5  # stopped before the 5th
    assert all(r.info.status == "FAILED" for r in trials)
    # The restarts the actor engine made are on each failed run.
    assert all(int(r.data.tags.get("tuneguard.actor_restarts", "0")) >= 1 for r in trials)


def test_failures_alike_share_a_signature_whatever_their_ids():
    from tuneguard.tune.failures import headline, signature

    a = ("Traceback (most recent call last):\n  File 'x.py', line 3\n"
         "RuntimeError: run 'none' of trial ec608_00000 failed: step 1: actor 0 at 10.0.0.3:6379 died\n")
    b = a.replace("ec608_00000", "ab12c_00004").replace("10.0.0.3", "10.0.0.7").replace("step 1", "step 12")
    assert headline(a).startswith("RuntimeError: run 'none'")
    assert signature(a) == signature(b)
    assert signature(a) != signature(a.replace("died", "hung"))
