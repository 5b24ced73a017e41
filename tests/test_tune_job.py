"""Tune jobs end to end: real Ray (one local cluster for the module, plus the subprocess
cluster of the resume test), real Optuna (SQLite), real MLflow (SQLite in tmp dirs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from procs import kill_matching
from typer.testing import CliRunner

from tuneguard.tune.search import start_job
from tuneguard.tune.space import Space

pytestmark = pytest.mark.slow


@pytest.fixture()
def ray_cluster(ray_local, data_dir):
    """The session's local Ray cluster (conftest); tune jobs reuse it and never shut it down."""
    return ray_local


def tiny(name: str, **sections) -> dict:
    raw = {
        "base": {"name": name, "dataset": "mnist", "n_workers": 5, "f": 1, "attack": "little", "steps": 4,
                 "eval_every": 2, "batch_size": 16, "momentum": 0.9, "lr": 0.2, "engine": "local"},
        "scenario": {"privacy": {"mode": "total", "total_eps": 4.0, "delta": 1e-5}},
        "search": {"gar": ["median", "krum"], "batch_size": {"logint": [8, 32]}},
        "tune": {"num_samples": 3, "seed": 0},
    }
    for key, value in sections.items():
        raw[key] = value
    return raw


def children(cl: MlflowClient, experiment: str, job_id: str) -> list:
    exp = cl.get_experiment_by_name(experiment)
    return cl.search_runs([exp.experiment_id], filter_string=f"tags.`tuneguard.job` = '{job_id}' "
                          "and tags.`tuneguard.kind` = 'trial'", max_results=1000)


def tune_results(results_dir: Path) -> dict[str, list[dict]]:
    """Every report of every trial, from Tune's result.json files."""
    out: dict[str, list[dict]] = {}
    for f in (results_dir / "tune").glob("*/result.json"):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["trial_id"], []).append(r)
    return out


# --------------------------------------------------------------------------------------------
def test_small_space_end_to_end(ray_cluster, tmp_path, tracking_uri):
    """Optuna search, every trial and its VN ratio in MLflow, the study on disk, and an export
    that `tuneguard train` accepts and that reproduces the best trial's numbers exactly."""
    name = f"tg-e2e-{uuid.uuid4().hex[:6]}"
    sp = Space.from_dict(tiny(name))
    sp.validate()
    rdir = tmp_path / "job"
    summary = start_job(sp, tracking_uri=tracking_uri, results_dir=rdir, progress=False)
    assert (summary.trials, summary.completed, summary.errored) == (3, 3, 0)

    cl = MlflowClient(tracking_uri)
    parent = cl.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tuneguard.kind"] == "tune_job" and parent.data.tags["tuneguard.job"] == summary.job_id
    assert parent.data.params["search.gar"] == '["median", "krum"]' and parent.data.params["base.steps"] == "4"
    assert {a.path for a in cl.list_artifacts(parent.info.run_id)} >= {"space.yaml", "scenario.json", "validation.txt"}
    assert parent.data.metrics["best_objective"] == pytest.approx(summary.best_objective)
    assert parent.data.tags["best_run_id"] == summary.best_run_id

    kids = children(cl, name, summary.job_id)
    assert len(kids) == 3 and len({k.data.tags["tuneguard.trial"] for k in kids}) == 3
    for k in kids:
        assert k.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert k.info.status == "FINISHED" and k.data.tags["tuneguard.status"] == "FINISHED"
        for key in ("vn_sample", "vn_submit", "train_loss"):
            assert [m.step for m in cl.get_metric_history(k.info.run_id, key)] == [1, 2, 3, 4], key
        # constants and running maxima: the first step and evaluation steps
        assert [m.step for m in cl.get_metric_history(k.info.run_id, "vn_bound")] == [1, 2, 4]
        assert [m.step for m in cl.get_metric_history(k.info.run_id, "cross_accuracy")] == [2, 4]
        assert [m.step for m in cl.get_metric_history(k.info.run_id, "eps_spent")] == [2, 4]
        assert k.data.metrics["eps_spent"] <= 4.0 + 1e-6
        assert k.data.metrics["objective"] == k.data.metrics["max_cross_accuracy"]  # one attack, one seed

    study = optuna.load_study(study_name=summary.job_id, storage=f"sqlite:///{rdir / 'optuna.db'}")
    assert len(study.trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted(t.value for t in study.trials) == sorted(k.data.metrics["objective"] for k in kids)
    assert study.best_value == pytest.approx(summary.best_objective)

    # export (default: the latest job in the store) -> a file `tuneguard train` runs
    from tuneguard.cli import app
    from tuneguard.config import load_config

    out = tmp_path / "best.yaml"
    res = CliRunner().invoke(app, ["export", "--tracking-uri", tracking_uri, "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(out.read_text())
    meta = doc["tuneguard_export"]
    assert meta["run_id"] == summary.best_run_id and meta["job"] == summary.job_id
    assert meta["score"] == pytest.approx(summary.best_objective)
    cfg = load_config(out)
    assert cfg.gar.name == summary.best_config["gar"] and cfg.batch_size == summary.best_config["batch_size"]
    res = CliRunner().invoke(app, ["train", str(out), "--no-track", "--json"])
    assert res.exit_code == 0, res.output
    again = json.loads([x for x in res.output.splitlines() if x.startswith("{")][-1])
    assert again["max_cross_accuracy"] == meta["max_cross_accuracy"]  # same seed, same numbers, exactly
    assert again["final_cross_accuracy"] == meta["final_cross_accuracy"]


# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worst_case_job(ray_local, data_dir, tmp_path_factory):
    """A grid over the per-step eps with a total budget: eps=0.05 fits (4 steps), eps=1.0 does
    not; each trial trains against little and empire (worst_case)."""
    tmp = tmp_path_factory.mktemp("worst")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    name = f"tg-worst-{uuid.uuid4().hex[:6]}"
    raw = tiny(name,
               scenario={"attacks": ["little", "empire"],
                         "privacy": {"mode": "total", "total_eps": 3.0, "adapt": "steps", "delta": 1e-5}},
               search={"privacy.eps": [0.05, 1.0], "gar": "median"},
               tune={"mode": "grid", "objective": "worst_case"})
    sp = Space.from_dict(raw)
    sp.validate()
    summary = start_job(sp, tracking_uri=uri, results_dir=tmp / "job", progress=False)
    return summary, uri, name, tmp / "job"


def test_worst_case_is_the_minimum_over_attacks(worst_case_job):
    summary, uri, name, rdir = worst_case_job
    cl = MlflowClient(uri)
    feasible = [k for k in children(cl, name, summary.job_id) if k.data.tags.get("tuneguard.infeasible") != "1"]
    assert sorted(k.data.tags["tuneguard.attack"] for k in feasible) == ["empire", "little"]
    assert len({k.data.tags["tuneguard.trial"] for k in feasible}) == 1
    best = {k.data.tags["tuneguard.attack"]: k.data.metrics["max_cross_accuracy"] for k in feasible}
    objective = min(best.values())
    assert all(k.data.metrics["objective"] == objective for k in feasible)
    [rep] = [k for k in feasible if k.data.tags.get("tuneguard.representative") == "1"]
    assert rep.data.metrics["max_cross_accuracy"] == objective
    assert summary.best_objective == objective and summary.best_run_id == rep.info.run_id

    # the runs of a trial train side by side in threads; each must match a run on its own
    from tuneguard.config import build_config
    from tuneguard.results.export import run_config
    from tuneguard.training import train

    for k in feasible:
        alone = train(build_config(run_config(cl, k.info.run_id)), track=False)
        assert alone.max_cross_accuracy == k.data.metrics["max_cross_accuracy"], k.data.tags["tuneguard.attack"]
        assert alone.final_cross_accuracy == k.data.metrics["final_cross_accuracy"]

    # intermediate reports (for ASHA): at each eval step, the min over attacks of the max so far
    trial_id = feasible[0].data.tags["tuneguard.trial"]
    reports = tune_results(rdir)[trial_id]
    hist = {k.data.tags["tuneguard.attack"]: {m.step: m.value for m in cl.get_metric_history(k.info.run_id, "max_cross_accuracy")}
            for k in feasible}
    steps = [r["step"] for r in reports if not r["trial_done"]]
    assert steps == [2, 4]
    for r in reports:
        if not r["trial_done"]:
            assert r["objective"] == pytest.approx(min(h[r["step"]] for h in hist.values()))
    assert reports[-1]["trial_done"] == 1 and reports[-1]["objective"] == pytest.approx(objective)


def test_infeasible_budget_is_reported_not_crashed(worst_case_job):
    summary, uri, name, rdir = worst_case_job
    assert (summary.trials, summary.completed, summary.errored, summary.infeasible) == (2, 2, 0, 1)
    cl = MlflowClient(uri)
    infeasible = [k for k in children(cl, name, summary.job_id) if k.data.tags.get("tuneguard.infeasible") == "1"]
    assert len(infeasible) == 2  # one run per attack, both tagged with the reason
    for k in infeasible:
        assert k.data.tags["tuneguard.status"] == "INFEASIBLE"
        assert "exceeds total eps=3.0" in k.data.tags["tuneguard.message"]
        assert k.data.params["privacy.eps"] == "1.0"
        assert "tuneguard.representative" not in k.data.tags
    [final] = [r for reports in tune_results(rdir).values() for r in reports if r.get("infeasible")]
    assert final["objective"] == 0.0 and final["trial_done"] == 1 and "exceeds total eps" in final["reason"]


def test_excluded_combination_is_reported_in_optuna_mode(ray_cluster, tmp_path, tracking_uri):
    """Bulyan cannot take n=5, f=1 (needs n >= 4f + 3): validation lists it, and a trial that
    samples it reports objective 0.0 with excluded=1, and an MLflow run says why, untrained."""
    name = f"tg-excl-{uuid.uuid4().hex[:6]}"
    sp = Space.from_dict(tiny(name, search={"gar": ["bulyan", "median"]}, tune={"num_samples": 2, "seed": 0}))
    report = sp.validate()
    assert [e.point for e in report.excluded] == [{"gar": "bulyan"}]
    summary = start_job(sp, tracking_uri=tracking_uri, results_dir=tmp_path / "job", progress=False)
    assert (summary.completed, summary.excluded, summary.errored) == (2, 1, 0)  # TPE seed 0: one of each
    assert summary.best_config == {"gar": "median"}
    cl = MlflowClient(tracking_uri)
    runs = {k.data.tags.get("tuneguard.status"): k for k in children(cl, name, summary.job_id)}
    assert set(runs) == {"EXCLUDED", "FINISHED"}
    excluded = runs["EXCLUDED"]
    assert "bulyan needs n >= 4f + 3" in excluded.data.tags["tuneguard.message"]
    assert excluded.data.metrics["objective"] == 0.0 and "vn_submit" not in excluded.data.metrics
    [final] = [r for rs in tune_results(tmp_path / "job").values() for r in rs if r.get("excluded")]
    assert final["objective"] == 0.0 and final["trial_done"] == 1


def test_asha_job_closes_the_runs_of_stopped_trials(ray_cluster, tmp_path, tracking_uri):
    name = f"tg-asha-{uuid.uuid4().hex[:6]}"
    raw = tiny(name, tune={"num_samples": 4, "seed": 0, "scheduler": "asha", "asha": {"grace_period": 1}})
    raw["base"].update(steps=8)
    sp = Space.from_dict(raw)
    sp.validate()
    summary = start_job(sp, tracking_uri=tracking_uri, results_dir=tmp_path / "job", progress=False)
    assert summary.errored == 0 and summary.completed + summary.stopped == 4 and summary.completed >= 1
    kids = children(MlflowClient(tracking_uri), name, summary.job_id)
    assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids)
    statuses = sorted(k.data.tags["tuneguard.status"] for k in kids)
    assert statuses.count("STOPPED") == summary.stopped and statuses.count("FINISHED") == summary.completed
    assert all("objective" in k.data.metrics for k in kids)


# --------------------------------------------------------------------------------------------
def test_resume_after_killing_the_driver(tmp_path, data_dir):
    """SIGKILL `tuneguard tune` once a trial finished; `--resume` completes the job without
    running any trial twice (Optuna study and MLflow runs counted by trial id)."""
    name = f"tg-resume-{uuid.uuid4().hex[:6]}"
    # Trials of a few seconds each: long enough to kill the driver while the second one runs.
    raw = tiny(name, tune={"num_samples": 3, "seed": 1, "checkpoint_every": 8})
    raw["base"].update(steps=160, eval_every=4)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(raw))
    rdir = tmp_path / "job"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray_tmp = tempfile.mkdtemp(prefix="tgr", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "TUNEGUARD_HOME": str(tmp_path / "home")}
    exe = [str(Path(sys.executable).with_name("tuneguard"))]
    common = ["--tracking-uri", uri, "--no-progress", "--num-cpus", "2", "--concurrency", "1"]
    log = open(tmp_path / "first.log", "w")
    try:
        proc = subprocess.Popen(exe + ["tune", str(space_file), "--results-dir", str(rdir), *common],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline:
            done = [r for reports in tune_results(rdir).values() if rdir.exists() for r in reports if r.get("trial_done")] \
                if rdir.exists() else []
            if done:
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished within 240 s:\n" + (tmp_path / "first.log").read_text())
        time.sleep(2.0)  # let the next trial start (it reuses the first one's process) and checkpoint
        assert proc.poll() is None, "the job finished before it could be killed; make the trials longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kill_matching(ray_tmp)

        job = json.loads((rdir / "job.json").read_text())
        study_url = f"sqlite:///{rdir / 'optuna.db'}"
        before = optuna.load_study(study_name=job["study_name"], storage=study_url)
        n_before = len([t for t in before.trials if t.state == optuna.trial.TrialState.COMPLETE])
        assert 1 <= n_before < 3

        res = subprocess.run(exe + ["tune", "--resume", str(rdir), *common], env=env, capture_output=True,
                             text=True, timeout=400)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        log.close()
        kill_matching(ray_tmp)

    study = optuna.load_study(study_name=job["study_name"], storage=study_url)
    states = [t.state for t in study.trials]
    # A suggestion the killed driver made after Tune's last snapshot is closed as FAIL (never
    # evaluated, or evaluated under a lost Tune record: then its MLflow runs are kept, tagged orphan)
    assert all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) for s in states), states
    complete = states.count(optuna.trial.TrialState.COMPLETE)
    cl = MlflowClient(uri)
    kids = children(cl, name, job["job_id"])
    trial_ids = [k.data.tags["tuneguard.trial"] for k in kids]
    assert len(trial_ids) == len(set(trial_ids)) == complete, (trial_ids, states)  # one run per trial, no repeats
    tune_ids = {k.data.tags["tuneguard.trial"] for k in kids if k.data.tags.get("tuneguard.orphan") != "1"}
    assert len(tune_ids) == 3, trial_ids
    # every finished trial's result reached the study, even one Tune finished after the restore
    told = {t.user_attrs.get("tuneguard_trial") for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert told == set(trial_ids), (told, trial_ids)
    assert all(k.info.status == "FINISHED" for k in kids)
    for k in kids:  # the interrupted trial continued its run from a checkpoint, or restarted it: no gaps
        assert {m.step for m in cl.get_metric_history(k.info.run_id, "train_loss")} == set(range(1, 161))
    reports = tune_results(rdir)  # (a lost trial's folder may linger; Tune's own trials all finished)
    assert tune_ids <= set(reports)
    assert all(any(r.get("trial_done") for r in reports[t]) for t in tune_ids)
    parent = cl.get_run(job["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 3


def test_runs_of_trials_tune_lost_are_reconciled(tracking_uri, tmp_path):
    """After a killed driver, trials started after Tune's last snapshot are unknown to the
    restored experiment: their unfinished runs are deleted, finished ones kept and tagged."""
    from tuneguard.tracking import RunTracker
    from tuneguard.tune.objective import RESULT_TAG
    from tuneguard.tune.search import JobInfo, reconcile_runs

    parent = RunTracker("tg-reconcile", tracking_uri=tracking_uri, tags={"tuneguard.kind": "tune_job"})
    runs = {}
    for trial, finished in (("known", True), ("lost-unfinished", False), ("lost-finished", True)):
        r = RunTracker("tg-reconcile", tracking_uri=tracking_uri, parent_run_id=parent.run_id,
                       tags={"tuneguard.kind": "trial", "tuneguard.job": "j1", "tuneguard.trial": trial})
        if finished:
            r.set_tags({RESULT_TAG: json.dumps({"objective": 0.5})})
            r.end()
        runs[trial] = r.run_id
    info = JobInfo("j1", str(tmp_path), tracking_uri, "tg-reconcile", parent.run_id, "j1", None, 0.0, 2, 1)
    assert reconcile_runs(info, {"known"}) == (1, 1)
    cl = MlflowClient(tracking_uri)
    assert cl.get_run(runs["lost-unfinished"]).info.lifecycle_stage == "deleted"
    assert cl.get_run(runs["lost-finished"]).data.tags["tuneguard.orphan"] == "1"
    assert "tuneguard.orphan" not in cl.get_run(runs["known"]).data.tags


def test_stale_study_trials_get_the_result_tune_saw(tmp_path):
    """A trial whose result reached Tune but not the study (driver killed in between) is told
    that result when the job ends; one Tune never ran is closed as FAIL."""
    from tuneguard.tune.search import OPTUNA_FILE, TRIAL_ATTR, close_stale_study_trials

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / OPTUNA_FILE}", direction="maximize")
    for tid in ("t_done", "t_lost"):
        study.ask().set_user_attr(TRIAL_ATTR, tid)
    assert close_stale_study_trials(tmp_path, "s", {"t_done": 0.75}) == 2
    by_id = {t.user_attrs[TRIAL_ATTR]: t for t in optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / OPTUNA_FILE}").trials}
    assert by_id["t_done"].state == optuna.trial.TrialState.COMPLETE and by_id["t_done"].value == 0.75
    assert by_id["t_lost"].state == optuna.trial.TrialState.FAIL
