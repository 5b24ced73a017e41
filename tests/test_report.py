"""``tuneguard report``: figures and HTML from a real MLflow SQLite store.

The job here is laid out as ``tuneguard tune`` lays it out (a parent run tagged tune_job with its
results dir, trial runs trained by :func:`tuneguard.training.train` under it, an Optuna study in
``<results dir>/optuna.db`` named after the job), with tiny configs: a Tune job would cost tens of
seconds for the same runs. tests/test_report_browser.py renders the same report in Chromium.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tuneguard.cli import app
from tuneguard.results.report import FIGURE_FILES, ReportError, build_report, generate_report
from tuneguard.tracking import RunTracker, client

EXP = "tg-report-test"
JOB = "20260101-000000-beef"
_BUILT: dict[str, dict] = {}

# (gar, batch_size, seed, extra config)
RUNS = [
    ("median", 8, 1, {}), ("median", 16, 1, {}), ("median", 16, 2, {}),
    ("krum", 8, 1, {}), ("krum", 16, 1, {}),
    ("sign_majority", 16, 1, {"perturbation": 0.05}), ("sign_majority", 16, 1, {"perturbation": 0.0}),
]


def _config(gar: str, b: int, seed: int, extra: dict):
    from tuneguard.config import build_config

    raw = {"name": EXP, "dataset": "mnist", "n_workers": 7, "f": 1, "attack": "little", "gar": gar, "batch_size": b,
           "steps": 4, "eval_every": 2, "seed": seed, "momentum": 0.9, "privacy": {"mode": "per_step", "eps": 0.5}}
    if gar == "sign_majority":  # 003: no attack, no clipping, no DP noise, no momentum
        raw.update(f=0, attack="none", clip=None, privacy={"mode": "none"}, momentum=0.0, lr=0.01)
    return build_config({**raw, **extra})


def make_store(base: Path) -> dict:
    """A tune job with trained trial runs, an excluded trial and its Optuna study (memoised per
    process so both report test files share one store)."""
    if "store" in _BUILT:
        return _BUILT["store"]
    import optuna

    from tuneguard.training import train

    uri = f"sqlite:///{base / 'mlflow.db'}"
    rdir = base / "tune" / JOB
    rdir.mkdir(parents=True)
    parent = RunTracker(EXP, tracking_uri=uri, run_name=f"tune-{JOB}",
                        tags={"tuneguard.kind": "tune_job", "tuneguard.job": JOB, "tuneguard.status": "RUNNING",
                              "tuneguard.objective_name": "max_cross_accuracy", "tuneguard.results_dir": str(rdir)})
    (rdir / "job.json").write_text(json.dumps({"job_id": JOB, "study_name": JOB}))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{rdir / 'optuna.db'}", study_name=JOB, direction="maximize")
    dists = {"gar": optuna.distributions.CategoricalDistribution(["median", "krum", "sign_majority"]),
             "batch_size": optuna.distributions.IntDistribution(8, 16, log=True)}
    cl = client(uri)
    scores = {}
    for i, (gar, b, seed, extra) in enumerate(RUNS):
        cfg = _config(gar, b, seed, extra)
        trial = f"trial{i:02d}"
        point = {"gar": gar, "batch_size": b, **extra}
        tags = {"tuneguard.kind": "trial", "tuneguard.job": JOB, "tuneguard.trial": trial,
                "tuneguard.attack": cfg.attack.name, "tuneguard.seed": str(seed), "tuneguard.run_key": f"s{seed}",
                "tuneguard.objective_name": "max_cross_accuracy", "tuneguard.point": json.dumps(point)}
        res = train(cfg, tracking_uri=uri, run_name=trial, tags=tags, parent_run_id=parent.run_id)
        assert res.status == "FINISHED", res.message
        cl.log_metric(res.run_id, "objective", res.max_cross_accuracy, step=res.steps)  # as objective._finish
        cl.set_tag(res.run_id, "tuneguard.representative", "1")
        scores[res.run_id] = res.max_cross_accuracy
        study.add_trial(optuna.trial.create_trial(params={"gar": gar, "batch_size": b}, distributions=dists,
                                                  value=res.max_cross_accuracy))
    excluded = RunTracker(EXP, tracking_uri=uri, run_name="trial99", parent_run_id=parent.run_id,
                          tags={"tuneguard.kind": "trial", "tuneguard.job": JOB, "tuneguard.trial": "trial99",
                                "tuneguard.status": "EXCLUDED", "tuneguard.excluded": "1"})
    excluded.log_params({"gar.name": "bulyan", "batch_size": 8})
    excluded.log_metrics({"objective": 0.0}, step=0)
    excluded.end()
    parent.set_tags({"tuneguard.status": "FINISHED"})
    parent.end()
    best = max(scores, key=lambda k: (scores[k], k))
    _BUILT["store"] = {"uri": uri, "parent": parent.run_id, "scores": scores, "best": best, "base": base}
    return _BUILT["store"]


def built_report(base: Path) -> dict:
    """The store plus its report in ``<base>/report`` (built once per process, in the first
    caller's ``base``)."""
    if "report" not in _BUILT:
        store = make_store(base)
        rep = generate_report(store["uri"], out_dir=base / "report")
        _BUILT["report"] = {**store, "report": rep}
    return _BUILT["report"]


@pytest.fixture(scope="module")
def built(data_dir, tmp_path_factory):
    return built_report(tmp_path_factory.mktemp("report-job"))


def test_report_html_figures_summary_and_artifacts(built):
    rep = built["report"]
    index = rep.index
    assert index == rep.out_dir / "index.html" and index.is_file()
    page = index.read_text()
    pngs = sorted(p.name for p in rep.out_dir.glob("*.png"))
    # every figure has data in this store
    assert pngs == sorted(set(FIGURE_FILES) - {"pareto_front.png"}), rep.skipped  # no eps_total here
    for name in pngs:
        assert f'src="{name}"' in page
        p = rep.out_dir / name
        assert 0 < p.stat().st_size < 1_000_000
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200
    assert page.count("<figcaption>") == len(pngs)
    # summary: job, trial count (7 trained + 1 excluded), best run
    assert JOB in page and "8 trial(s), 8 run(s)" in page
    assert f'<code id="best-run-id">{built["best"]}</code>' in page
    assert rep.best_run_id == built["best"] and rep.best_score == pytest.approx(built["scores"][built["best"]])
    assert "1 excluded" in page
    # artifacts on the job's run
    assert rep.artifacts_logged and rep.parent_run_id == built["parent"]
    logged = {a.path for a in client(built["uri"]).list_artifacts(built["parent"], "report")}
    assert logged == {"report/index.html", *(f"report/{n}" for n in pngs)}


def test_build_report_returns_index_and_cli_matches(built, tmp_path):
    path = build_report(built["uri"], JOB, None, tmp_path / "lib", log_artifacts=False)
    assert path == tmp_path / "lib" / "index.html" and path.is_file()
    res = CliRunner().invoke(app, ["report", "--tracking-uri", built["uri"], "--experiment", EXP, "--no-log",
                                   "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert f"report of tune job {JOB}: 8 trial(s)" in res.output and built["best"] in res.output
    assert (tmp_path / "cli" / "index.html").is_file() and (tmp_path / "cli" / "vn_ratio.png").is_file()


def test_bad_input_is_one_clear_error(built, tmp_path):
    uri = built["uri"]
    with pytest.raises(ReportError, match="no tune job 'nope'"):
        build_report(uri, "nope", out_dir=tmp_path / "r")
    with pytest.raises(ReportError, match="no MLflow experiment 'nope'"):
        build_report(uri, experiment="nope", out_dir=tmp_path / "r")
    with pytest.raises(ReportError, match="no such file"):
        build_report(uri, out_dir=tmp_path / "r", optuna_storage=str(tmp_path / "missing.db"))
    for args in (["--job", "nope"], ["--experiment", "nope"]):
        res = CliRunner().invoke(app, ["report", "--tracking-uri", uri, "-o", str(tmp_path / "c"), *args])
        assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output, res.output


def test_panels_without_data_are_skipped_with_a_reason(tmp_path):
    """A job whose runs logged only final accuracies, without VN ratio, Optuna study or 003 runs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = RunTracker("tg-report-sparse", tracking_uri=uri, run_name="tune-sparse",
                        tags={"tuneguard.kind": "tune_job", "tuneguard.job": "sparse"})
    for i, (gar, b, acc) in enumerate([("mda", 32, 0.61), ("mda", 64, 0.72)]):
        run = RunTracker("tg-report-sparse", tracking_uri=uri, parent_run_id=parent.run_id,
                         tags={"tuneguard.kind": "trial", "tuneguard.job": "sparse", "tuneguard.trial": f"t{i}",
                               "tuneguard.representative": "1"})
        run.log_params({"gar.name": gar, "batch_size": b, "f": 3, "attack.name": "empire", "privacy.mode": "per_step",
                        "privacy.eps": 0.1, "seed": 1, "dataset": "mnist"})
        run.log_metrics({"best_cross_accuracy": acc, "objective": acc}, step=10)
        run.end()
    parent.end()
    rep = generate_report(uri, out_dir=tmp_path / "out")
    assert [p.name for p in rep.figures] == ["accuracy_vs_batch.png", "search_progress.png"]
    page = rep.index.read_text()
    assert page.count("<img ") == 2
    assert "No trained run logged the VN ratio" in page
    assert "Parameter importance needs the Optuna study" in page
    assert "No sign_majority or median run with a perturbation b &gt; 0" in page
    assert rep.best_score == pytest.approx(0.72)
    # a second report into the same folder leaves no stale figure behind
    (tmp_path / "out" / "vn_ratio.png").write_bytes(b"stale")
    generate_report(uri, out_dir=tmp_path / "out", log_artifacts=False)
    assert not (tmp_path / "out" / "vn_ratio.png").exists()
    # a study with one completed trial: progress from it, importance skipped with a note
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = tmp_path / "study.db"
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="s1", direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.1}, value=0.5,
                                              distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1)}))
    rep = generate_report(uri, out_dir=tmp_path / "one", optuna_storage=str(db), log_artifacts=False)
    assert "search_progress.png" in [p.name for p in rep.figures]
    assert "needs at least 2 completed Optuna trials; the study has 1" in rep.index.read_text()


def test_report_says_plainly_when_the_bound_never_held(built):
    """DP noise (eps = 0.5 per step, b <= 16) keeps the submitted VN ratio above the bound at every
    step (001's finding): each run records it and the report says so, with what it means."""
    cl = client(built["uri"])
    for run_id in built["scores"]:
        m = cl.get_run(run_id).data.metrics
        if "vn_bound" in m:  # median, krum (sign_majority has no known bound)
            assert m["vn_bound_held_frac"] == 0.0 and m["vn_submit_over_bound_median"] > 1
            assert 0.0 <= m["noise_share_mean"] <= 1.0
    page = built["report"].index.read_text()
    assert 'id="bound-never-held"' in page and "001&#x27;s central finding" in page
    assert 'id="bound-held"' not in page and '<table id="why">' in page


def test_report_does_not_claim_never_held_when_it_held(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = RunTracker("tg-report-held", tracking_uri=uri, tags={"tuneguard.kind": "tune_job", "tuneguard.job": "held"})
    run = RunTracker("tg-report-held", tracking_uri=uri, parent_run_id=parent.run_id,
                     tags={"tuneguard.kind": "trial", "tuneguard.job": "held", "tuneguard.trial": "t0",
                           "tuneguard.representative": "1"})
    run.log_params({"gar.name": "median", "batch_size": 500, "f": 1, "attack.name": "little", "seed": 1})
    for step, vn in enumerate([0.3, 0.5, 0.35, 0.6], start=1):  # under the bound 0.41 at half the steps
        run.log_metrics({"vn_submit": vn, "vn_sample": vn, "vn_bound": 0.41, "max_cross_accuracy": 0.8,
                         "objective": 0.8}, step=step)
    run.end()
    parent.end()
    page = generate_report(uri, out_dir=tmp_path / "out").index.read_text()
    assert 'id="bound-held"' in page and "held in 1 of 1 run(s)" in page and "50%" in page
    assert "bound-never-held" not in page


def test_ui_optuna_serves_the_jobs_study_next_to_mlflow(built, tmp_path):
    """`tuneguard ui --optuna`: optuna-dashboard on the job's study (found through the job run's
    results dir), both servers stopped by one Ctrl-C."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ui.out"
    with open(out, "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("tuneguard")), "ui", "--tracking-uri", built["uri"],
                                 "--port", str(port), "--optuna"], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TUNEGUARD_HOME": str(tmp_path / "home")}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "optuna-dashboard for tune job" not in out.read_text():
            assert proc.poll() is None and time.time() < deadline, out.read_text()
            time.sleep(0.5)
        studies = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/api/studies", timeout=5).read())
        assert [s["study_name"] for s in studies["study_summaries"]] == [JOB]
        assert f"http://127.0.0.1:{port + 1}/dashboard/" in out.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # leave no server behind (its own session: kill them all)
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, out.read_text()
    for p in (port, port + 1):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{p}/", timeout=2)
