"""``tuneguard export``: ranking, the file format ``train`` accepts, job selection, errors.

The jobs here are written straight into a real MLflow SQLite store with the tags and artifacts
a tune job leaves (tests/test_tune_job.py exports from a real job and retrains the result)."""

from __future__ import annotations

import time

import pytest
import yaml
from typer.testing import CliRunner

from tuneguard.config import build_config, load_config
from tuneguard.results.export import ExportError, export
from tuneguard.tracking import RunTracker


def make_job(uri: str, experiment: str, job_id: str, trials: list[dict]) -> str:
    """A parent run and, per trial, its runs: dicts with objective, gar, batch_size, and
    optionally attack/representative/infeasible/f/eps_total."""
    parent = RunTracker(experiment, tracking_uri=uri, run_name=f"tune-{job_id}",
                        tags={"tuneguard.kind": "tune_job", "tuneguard.job": job_id})
    for i, t in enumerate(trials):
        cfg = build_config({"dataset": "mnist", "n_workers": 7, "f": t.get("f", 1), "steps": 5, "gar": t["gar"],
                            "batch_size": t["batch_size"], "attack": t.get("attack", "little"),
                            "privacy": {"mode": "total", "total_eps": 2.0}, "seed": 3})
        tags = {"tuneguard.kind": "trial", "tuneguard.job": job_id, "tuneguard.trial": t.get("trial", f"t{i}"),
                "tuneguard.attack": cfg.attack.name, "tuneguard.seed": "3",
                "tuneguard.objective_name": "worst_case"}
        if t.get("representative", True):
            tags["tuneguard.representative"] = "1"
        if t.get("infeasible"):
            tags["tuneguard.infeasible"] = "1"
            tags.pop("tuneguard.representative", None)
        run = RunTracker(experiment, tracking_uri=uri, run_name=f"trial-{i}", parent_run_id=parent.run_id, tags=tags)
        run.log_params(cfg.flat())
        run.log_text(cfg.to_yaml(), "config.yaml")
        run.log_metrics({"objective": t["objective"], "best_cross_accuracy": t.get("best", t["objective"]),
                         "final_cross_accuracy": t.get("final", t["objective"] - 0.01),
                         **({"eps_total": t["eps_total"]} if "eps_total" in t else {})}, step=5)
        run.end()
    parent.end()
    return parent.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tracking_uri = f"sqlite:///{tmp_path_factory.mktemp('export') / 'mlflow.db'}"
    make_job(tracking_uri, "exp-a", "job-old", [
        {"objective": 0.99, "gar": "krum", "batch_size": 8},
    ])
    time.sleep(0.05)  # distinct start times: job-new is the latest
    make_job(tracking_uri, "exp-b", "job-new", [
        {"objective": 0.50, "gar": "median", "batch_size": 16, "trial": "a"},
        {"objective": 0.80, "gar": "mda", "batch_size": 32, "trial": "b"},
        {"objective": 0.95, "gar": "mda", "batch_size": 32, "trial": "b", "attack": "empire",
         "representative": False, "best": 0.95},
        {"objective": 0.70, "gar": "median", "batch_size": 64, "trial": "c"},
        {"objective": 0.0, "gar": "krum", "batch_size": 8, "trial": "d", "infeasible": True},
    ])
    return tracking_uri


def test_default_is_the_latest_job_and_its_best_trial(store, tmp_path):
    [e] = export(tmp_path / "best.yaml", tracking_uri=store)
    doc = yaml.safe_load((tmp_path / "best.yaml").read_text())
    meta, cfg = doc["tuneguard_export"], doc["config"]
    assert meta["job"] == "job-new" and meta["rank"] == 1 and meta["score"] == 0.80
    assert meta["trial_id"] == "b" and meta["objective"] == "worst_case" and meta["seed"] == 3
    assert sorted(r["attack"] for r in meta["runs"]) == ["empire", "little"]  # both runs of the trial
    assert cfg["gar"] == {"name": "mda", "params": {}} and cfg["batch_size"] == 32
    # types restored from the config artifact (MLflow params are strings)
    assert isinstance(cfg["lr"], float) and cfg["clip"] == 2.0 and cfg["privacy"]["total_eps"] == 2.0
    loaded = load_config(tmp_path / "best.yaml")
    assert loaded.model_dump(mode="json") == cfg
    assert e.run_id == meta["run_id"]


def test_top_k_writes_one_file_per_config_in_rank_order(store, tmp_path):
    written = export(tmp_path / "best.yaml", tracking_uri=store, top=5)
    # 3 feasible trials (the infeasible one and the non-representative run are skipped)
    assert [w.path.name for w in written] == ["best.yaml", "best-2.yaml", "best-3.yaml"]
    assert [w.score for w in written] == [0.80, 0.70, 0.50]
    for w in written:
        cfg = load_config(w.path)
        assert cfg.batch_size == w.config["batch_size"]
        assert yaml.safe_load(w.path.read_text())["tuneguard_export"]["rank"] == w.rank


def test_job_and_experiment_selection(store, tmp_path):
    [e] = export(tmp_path / "old.yaml", tracking_uri=store, job="job-old")
    assert e.score == 0.99 and e.config["gar"]["name"] == "krum"
    [e] = export(tmp_path / "a.yaml", tracking_uri=store, experiment="exp-a")
    assert e.score == 0.99


def test_errors_say_what_is_missing(store, tmp_path, tracking_uri):
    with pytest.raises(ExportError, match="no tune job 'nope'"):
        export(tmp_path / "x.yaml", tracking_uri=store, job="nope")
    with pytest.raises(ExportError, match="no MLflow experiment 'zzz'.*exp-a"):
        export(tmp_path / "x.yaml", tracking_uri=store, experiment="zzz")
    make_job(tracking_uri, "exp-c", "job-empty", [{"objective": 0.0, "gar": "krum", "batch_size": 8, "infeasible": True}])
    with pytest.raises(ExportError, match="no completed, feasible trial"):
        export(tmp_path / "x.yaml", tracking_uri=tracking_uri)


def test_eps_budget_takes_the_most_accurate_within_it_and_the_larger_f_on_ties(tracking_uri, tmp_path):
    """accuracy_eps_f: within eps <= 2, trials b (f = 1) and c (f = 2) tie at 0.70; c tolerates
    more attackers, so it wins; d is more accurate but over budget. Without f in the tie, the
    more private of two equally accurate trials wins (the one on the Pareto front)."""
    make_job(tracking_uri, "exp-f", "job-f", [
        {"objective": 0.60, "gar": "median", "batch_size": 16, "trial": "a", "f": 2, "eps_total": 0.5},
        {"objective": 0.70, "gar": "median", "batch_size": 16, "trial": "b", "f": 1, "eps_total": 1.0},
        {"objective": 0.70, "gar": "median", "batch_size": 32, "trial": "c", "f": 2, "eps_total": 1.5},
        {"objective": 0.90, "gar": "median", "batch_size": 64, "trial": "d", "f": 2, "eps_total": 8.0},
        {"objective": 0.70, "gar": "median", "batch_size": 32, "trial": "e", "f": 1, "eps_total": 0.8},
    ])
    written = export(tmp_path / "f.yaml", tracking_uri=tracking_uri, eps=2.0, top=4)
    assert [w.trial_id for w in written] == ["c", "e", "b", "a"]  # 0.70 f=2; 0.70 f=1 eps 0.8 < 1.0; 0.60
    assert written[0].config["f"] == 2 and written[0].eps_total == 1.5
    assert [w.trial_id for w in export(tmp_path / "all.yaml", tracking_uri=tracking_uri, top=2)] == ["d", "c"]


def test_cli(store, tmp_path):
    from tuneguard.cli import app

    out = tmp_path / "best.yaml"
    res = CliRunner().invoke(app, ["export", "--tracking-uri", store, "-o", str(out), "--top", "2"])
    assert res.exit_code == 0, res.output
    assert out.exists() and (tmp_path / "best-2.yaml").exists()
    assert "rank 1: score 0.8000" in res.output
    res = CliRunner().invoke(app, ["export", "--tracking-uri", store, "--job", "missing", "-o", str(out)])
    assert res.exit_code == 2 and "no tune job 'missing'" in res.output and "Traceback" not in res.output
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    res = CliRunner().invoke(app, ["export", "--tracking-uri", empty, "-o", str(out)])
    assert res.exit_code == 2 and "tune job" in res.output
