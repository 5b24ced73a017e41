"""``tuneguard export``: the best configs of a tune job, as files ``tuneguard train`` runs."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneguard.cli.common import console, fail


def export(
    output: Path = typer.Option(Path("best.yaml"), "--output", "-o", help="file to write (rank 1); --top K adds NAME-2.yaml ... NAME-K.yaml"),
    job: str = typer.Option(None, "--job", help="tune job id (default: the latest job in the store)"),
    experiment: str = typer.Option(None, "--experiment", help="MLflow experiment: the latest job in it"),
    top: int = typer.Option(1, "--top", "-k", min=1, help="how many of the best trials to export"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store; default sqlite:///$TUNEGUARD_HOME/mlflow.db"),
    eps: float = typer.Option(None, "--eps", help="privacy budget: the most accurate trials whose total epsilon "
                              "spent is at most this (a point of the accuracy-privacy front)"),
) -> None:
    """Write the best configs of a tune job as files `tuneguard train` runs.

    Ranked by the job's objective; each file holds the config (read from the run's config.yaml
    artifact) plus its score and MLflow run ids. `tuneguard train FILE` retrains it with the same
    seed and numbers.
    """
    from tuneguard.results.export import ExportError
    from tuneguard.results.export import export as do_export

    try:
        written = do_export(output, tracking_uri=tracking_uri, job=job, experiment=experiment, top=top, eps=eps)
    except ExportError as err:
        fail(str(err))
    for e in written:
        gar = e.config["gar"]["name"]
        eps = f" eps_total={e.eps_total:.4g}" if e.eps_total is not None else ""
        console.print(f"rank {e.rank}: score {e.score:.4f}  gar={gar} batch_size={e.config['batch_size']} "
                      f"seed={e.config['seed']}{eps}  run {e.run_id} -> [bold]{e.path}[/]", highlight=False)
    if len(written) < top:
        console.print(f"[yellow]only {len(written)} completed, feasible trial(s) to export[/]")
    console.print(f"retrain the best: tuneguard train {written[0].path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
