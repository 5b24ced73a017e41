"""``tuneguard report``: figures and an HTML page for a tune job, read back from MLflow."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneguard.cli.common import console, err_console, fail


def report(
    output: Path = typer.Option(Path("report"), "--output", "-o", help="folder to write index.html and the PNG figures to"),
    job: str = typer.Option(None, "--job", help="tune job id (default: the latest job in the store)"),
    experiment: str = typer.Option(None, "--experiment", help="MLflow experiment: its latest job, else all its runs"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store; default sqlite:///$TUNEGUARD_HOME/mlflow.db"),
    optuna_storage: str = typer.Option(None, "--optuna-storage", help="Optuna storage (URL or optuna.db path); "
                                       "default: optuna.db in the job's results dir"),
    study: str = typer.Option(None, "--study", help="Optuna study name (default: the job id)"),
    no_log: bool = typer.Option(False, "--no-log", help="do not log the report as artifacts of the job's MLflow run"),
) -> None:
    """Write an HTML report with figures of a tune job: accuracy vs batch size per GAR, VN ratio
    against the GAR's bound, search progress and parameter importance, and 003's perturbation study.

    Open OUTPUT/index.html in a browser; the files are also logged to the job's MLflow run under report/.
    """
    from tuneguard.results.report import ReportError, generate_report

    try:
        rep = generate_report(tracking_uri, job, experiment, output, optuna_storage=optuna_storage, study=study,
                              log_artifacts=not no_log)
    except ReportError as err:
        fail(str(err))
    if rep.job:
        console.print(f"report of tune job {rep.job}: {rep.n_trials} trial(s), {rep.n_runs} run(s)", highlight=False)
    else:
        console.print(f"report of experiment {rep.experiment} (no tune job): {rep.n_runs} run(s)", highlight=False)
    if rep.best_run_id:
        console.print(f"best: {rep.best_score:.4f}  run {rep.best_run_id}", highlight=False)
    for p in rep.figures:
        console.print(f"  figure {p}", highlight=False)
    for sec in rep.sections:
        for note in sec.notes:
            console.print(f"  [yellow]note[/] ({sec.title}): {note}", highlight=False)
    if rep.artifacts_logged:
        console.print(f"logged to MLflow run {rep.parent_run_id} under report/", highlight=False)
    elif rep.artifact_error:
        err_console.print(f"[yellow]warning:[/] could not log the report to run {rep.parent_run_id}: {rep.artifact_error}",
                          highlight=False)
    console.print(f"open [bold]{rep.index.resolve()}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
