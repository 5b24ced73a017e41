"""The Python API and the multi-objective (accuracy_vs_eps) search, end to end, through the
README's own example: the block under ``<!-- api-example -->`` runs as written, on a tiny space
(3 trials of one 6-step run each) in place of search_spaces/frontier.yaml."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("<!-- api-example -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]


def tiny_frontier(name: str) -> dict:
    # Optuna's seeded start (seed 0) asks total eps 1.5 and 64 first: two points that differ in
    # privacy, so the front has two trials and the budget 2.0 of the README splits them.
    return {
        "base": {"name": name, "dataset": "mnist", "n_workers": 5, "f": 1, "attack": "little", "steps": 6,
                 "eval_every": 3, "batch_size": 32, "momentum": 0.9, "lr": 0.2, "engine": "local", "gar": "median"},
        "scenario": {"privacy": {"mode": "total", "total_eps": 4.0, "delta": 1e-5}},
        "search": {"privacy.total_eps": [0.5, 1.5, 64.0]},
        "tune": {"num_samples": 3, "seed": 0, "objective": "accuracy_vs_eps"},
    }


@pytest.fixture(scope="module")
def example(ray_local, data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    space = tmp / "frontier.yaml"
    space.write_text(yaml.safe_dump(tiny_frontier(f"tg-api-{uuid.uuid4().hex[:6]}"), sort_keys=False))
    code = readme_example()
    for old, new in (('"search_spaces/frontier.yaml"', repr(str(space))), ("tune__num_samples=12", "tune__num_samples=3")):
        assert old in code, f"the README example no longer says {old}"
        code = code.replace(old, new)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(tmp)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        ns: dict = {}
        exec(compile(code, "README.md (api-example)", "exec"), ns)  # noqa: S102 - the README's own code
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    return {**ns, "tmp": tmp, "uri": uri}


def test_readme_example_returns_trials_best_config_and_a_reproducing_retrain(example):
    res, run = example["res"], example["run"]
    assert len(res.trials) == 3 and {"name", "objective", "eps_total", "run_id", "run_ids"} <= set(res.trials.columns)
    assert res.trials["objective"].is_monotonic_decreasing
    assert res.best_objective == res.trials["objective"].max() and "privacy.total_eps" in res.best_config
    assert set(res.trials["run_id"]) <= set(res.run_ids)
    assert all(n.startswith("median b=32 lr=0.20 little") for n in res.trials["name"])  # descriptive run names
    doc = yaml.safe_load(Path(example["path"]).read_text())["tuneguard_export"]
    assert doc["eps_total"] <= 2.0 and doc["eps_budget"] == 2.0
    assert run.max_cross_accuracy == doc["max_cross_accuracy"]  # same seed, same numbers, exactly
    tags = MlflowClient(example["uri"]).get_run(run.run_id).data.tags
    assert (tags["tuneguard.reproduces_job"], tags["tuneguard.reproduces_trial"], tags["tuneguard.reproduces_run"]) == (
        res.job_id, doc["trial_id"], doc["run_id"])


def test_multi_objective_front_report_and_export_within_budget(example, tmp_path):
    from tuneguard.cli import app
    from tuneguard.results.report import generate_report

    res = example["res"]
    study = optuna.load_study(study_name=res.job_id, storage=f"sqlite:///{Path(res.results_dir) / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert len(study.best_trials) >= 2 and all(len(t.values) == 2 for t in study.best_trials)
    # each Optuna trial names its tuneguard trial and MLflow runs (optuna-dashboard shows them)
    by_trial = dict(zip(res.trials["trial"], res.trials["run_ids"], strict=True))
    for t in study.trials:
        assert set(t.user_attrs["mlflow_run_ids"].split(",")) == set(by_trial[t.user_attrs["tuneguard_trial"]])
    job_tags = MlflowClient(example["uri"]).get_run(res.parent_run_id).data.tags
    never = all(f == 0 for f in res.trials["vn_bound_held_frac"])
    assert job_tags["tuneguard.bound_never_held"] == ("1" if never else "0")  # the job run says it too
    # the best model, logged with mlflow.pytorch on the best run
    import mlflow.pytorch

    best = job_tags["tuneguard.best_model_run"]  # a best trial's run (two may tie: same point, same numbers)
    assert best in set(res.trials[res.trials["objective"] == res.best_objective]["run_id"])
    mlflow.set_tracking_uri(example["uri"])
    model = mlflow.pytorch.load_model(f"runs:/{best}/model")
    assert sum(p.numel() for p in model.parameters()) == 79_510  # 001's MLP 784-100-10
    front = res.frontier
    assert len(front) >= 2 and front["eps_total"].is_monotonic_increasing and front["objective"].is_monotonic_increasing
    within = front[front["eps_total"] <= 2.0]
    rep = generate_report(example["uri"], job=res.job_id, out_dir=tmp_path / "report", log_artifacts=False)
    page = rep.index.read_text()
    assert (tmp_path / "report" / "pareto_front.png").is_file() and page.count("</tr>", page.index('id="front"')) >= 3

    out = tmp_path / "eps.yaml"
    cli = CliRunner().invoke(app, ["export", "--tracking-uri", example["uri"], "--job", res.job_id, "--eps", "2.0",
                                   "-o", str(out)])
    assert cli.exit_code == 0, cli.output
    meta = yaml.safe_load(out.read_text())["tuneguard_export"]
    assert meta["eps_total"] <= 2.0 and meta["run_id"] == within.iloc[-1]["run_id"]
    cli = CliRunner().invoke(app, ["export", "--tracking-uri", example["uri"], "--job", res.job_id, "--eps", "0.01",
                                   "-o", str(out)])
    assert cli.exit_code != 0 and "smallest total epsilon" in cli.output and not math.isnan(meta["score"])


def test_three_objectives_front_per_f_report_and_export(ray_local, data_dir, tmp_path):
    """accuracy_eps_f end to end on a tiny space: f in {1, 2} of 5 workers (median takes both)
    and two budgets. Optuna's study maximises accuracy and f and minimises eps; the report draws
    a front per f; export --eps takes the most accurate trial within the budget, larger f on ties."""
    import tuneguard
    from tuneguard.cli import app
    from tuneguard.results.report import generate_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = tiny_frontier(f"tg-api-f-{uuid.uuid4().hex[:6]}")
    space["search"] = {"f": [1, 2], "privacy.total_eps": [1.5, 64.0]}
    space["tune"].update(objective="accuracy_eps_f", num_samples=4, log_best_model=False)
    res = tuneguard.tune(space, tracking_uri=uri, results_dir=tmp_path / "job")
    assert res.summary.completed == 4 and res.objective == "accuracy_eps_f"

    study = optuna.load_study(study_name=res.job_id, storage=f"sqlite:///{tmp_path / 'job' / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MAXIMIZE"]
    trials = res.trials.set_index("trial")
    for t in study.trials:  # the third value is the f the trial trained against
        row = trials.loc[t.user_attrs["tuneguard_trial"]]
        assert t.values[2] == t.params["f"] == row["f"] and t.values[0] == pytest.approx(row["objective"])

    pts = [(r.eps_total, r.objective, r.f) for r in res.trials.itertuples()]
    front = {(r.eps_total, r.objective, r.f) for r in res.frontier.itertuples()}
    assert front and "f" in res.frontier.columns
    for p in pts:  # the API's frontier is exactly the non-dominated set under the three objectives
        beaten = any(q[0] <= p[0] and q[1] >= p[1] and q[2] >= p[2] and q != p for q in pts)
        assert beaten == (p not in front), (p, front)

    rep = generate_report(uri, job=res.job_id, out_dir=tmp_path / "report", log_artifacts=False)
    page = rep.index.read_text()
    # Optuna's seeded start (seed 0) asks (f 2, eps 1.5) and (f 2, eps 64) first: a trade-off to draw
    assert len({(p[0], p[2]) for p in pts}) >= 2 and (tmp_path / "report" / "pareto_front.png").is_file()
    table = page[page.index('<table id="front">'):]
    assert "per tolerated f" in page and "<th>f</th>" in table
    assert table[:table.index("</table>")].count("<tr>") == len(front) + 1  # header + one row per front trial

    within = [r for r in res.trials.itertuples() if r.eps_total <= 2.0]
    assert within, "Optuna asked for no budget-1.5 trial; change tune.seed"
    expected = min(within, key=lambda r: (-r.objective, -r.f, r.eps_total))
    out = tmp_path / "eps.yaml"
    cli = CliRunner().invoke(app, ["export", "--tracking-uri", uri, "--job", res.job_id, "--eps", "2.0", "-o", str(out)])
    assert cli.exit_code == 0, cli.output
    meta = yaml.safe_load(out.read_text())["tuneguard_export"]
    assert meta["run_id"] == expected.run_id and meta["eps_total"] <= 2.0
