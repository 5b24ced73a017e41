"""``tuneguard tune SPACE.yaml``: search a space with Ray Tune + Optuna, every trial in MLflow."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneguard.cli.common import console, err_console, fail, strict_json


def tune(
    space: Path = typer.Argument(None, help="search space YAML (see search_spaces/ and docs/search_spaces.md)"),
    resume: Path = typer.Option(None, "--resume", help="continue the interrupted job in this results dir"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a space key: section.key=value "
                                   "(e.g. tune.num_samples=4, base.steps=20, search.lr=0.1)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store; default sqlite:///$TUNEGUARD_HOME/mlflow.db"),
    address: str = typer.Option(None, "--address", help="Ray cluster address (else RAY_ADDRESS, else a private local cluster)"),
    results_dir: Path = typer.Option(None, "--results-dir", help="default $TUNEGUARD_HOME/tune/<job id>"),
    concurrency: int = typer.Option(None, "--concurrency", min=1, help="trials at once (default: cluster CPUs // CPUs per trial)"),
    num_cpus: int = typer.Option(None, "--num-cpus", min=1, help="CPUs of the private local Ray cluster (default: all)"),
    data_dir: str = typer.Option(None, "--data-dir", help="torchvision data root for every trial (sets base.data_dir)"),
    ship_data: bool = typer.Option(False, "--ship-data", help="load the data here and ship it to the trials through "
                                   "Ray's object store (clusters without a shared filesystem; sets tune.ship_data)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the space and print the plan; run nothing"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no live view and no per-trial lines: only the plan and the final summary"),
    as_json: bool = typer.Option(False, "--json", help="print the job summary as JSON at the end"),
) -> None:
    """Search a space (batch size, GAR, noise, ...) for the best cross-accuracy under attack and a privacy budget.

    Every trial and its VN ratio go to MLflow (one run per trial and attack, under one run for
    the job). Ctrl-C stops the job; --resume RESULTS_DIR continues it.
    Space format: docs/search_spaces.md.
    """
    import logging

    import mlflow  # noqa: F401 - configures its loggers on import; quiet them after

    from tuneguard.config import ConfigError
    from tuneguard.raycluster import RayConnectError
    from tuneguard.tune.cluster import PreflightError
    from tuneguard.tune.search import ResumeError, resume_job, start_job
    from tuneguard.tune.space import Space

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "Creating initial MLflow database tables"
    if (space is None) == (resume is None):
        fail("give a search space file, or --resume RESULTS_DIR (not both)")
    out = err_console if as_json else console
    from tuneguard.cli.signals import forward_as_sigint

    try:
        if resume is not None:
            if set_ or data_dir or dry_run or results_dir or ship_data:
                fail("--resume continues the job as it was: --set, --data-dir, --ship-data, --results-dir and "
                     "--dry-run do not apply")
            out.print(f"resuming the tune job in {resume}", highlight=False, markup=False)
            with forward_as_sigint():
                summary = resume_job(resume, tracking_uri=tracking_uri, address=address, concurrency=concurrency,
                                     progress=not no_progress, console=out, num_cpus=num_cpus)
        else:
            overrides = (list(set_) + ([f"base.data_dir={data_dir}"] if data_dir else [])
                         + (["tune.ship_data=true"] if ship_data else []))
            sp = Space.load(space, overrides)
            report = sp.validate()
            out.print(f"{space}: " + (sp.raw.get("description") or ""), highlight=False, markup=False)
            for line in sp.describe():
                out.print(f"  {line}", highlight=False, markup=False)
            for line in report.lines(sp.tune.mode):
                out.print(f"  {line}", highlight=False, markup=False)
            if dry_run:
                out.print("[green]the space is valid[/] (dry run: nothing started)")
                return
            from tuneguard.tracking import resolve_tracking_uri

            resolve_tracking_uri(tracking_uri)  # fail within seconds on a store that cannot work
            if results_dir is not None:
                _check_results_dir(results_dir)
            with forward_as_sigint():
                summary = start_job(sp, tracking_uri=tracking_uri, results_dir=results_dir, address=address,
                                    concurrency=concurrency, progress=not no_progress, console=out, num_cpus=num_cpus)
    except (ConfigError, ResumeError, RayConnectError, PreflightError) as err:
        fail(str(err))
    _print_summary(summary, out)
    if as_json:
        from dataclasses import asdict

        from tuneguard.tracking import mask_uri

        print(strict_json({**asdict(summary), "tracking_uri": mask_uri(summary.tracking_uri)}))
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.failed:
        raise typer.Exit(1)


def _check_results_dir(path: Path) -> None:
    p = path.expanduser()
    if p.exists() and not p.is_dir():
        fail(f"--results-dir {p} is a file; give a folder (created if missing)")
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        fail(f"--results-dir {p}: {probe} is a file, so the folder cannot be created")
    import os

    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        fail(f"--results-dir {p}: {probe} is not writable")


def _print_summary(s, out) -> None:
    from tuneguard.tracking import mask_uri

    out.print()
    status = "[yellow]interrupted[/]" if s.interrupted else "[red]failed[/]" if s.failed else "[green]finished[/]"
    out.print(f"job [bold]{s.job_id}[/] {status} in {s.seconds:.0f} s: {s.completed}/{s.trials} trials completed"
              + (f", {s.stopped} {_stopped_words(s)}" if s.stopped else "")
              + (f", {s.infeasible} infeasible" if s.infeasible else "")
              + (f", {s.excluded} excluded" if s.excluded else "")
              + (f", [red]{s.errored} failed[/]" if s.errored else ""), highlight=False)
    if s.first_error:
        out.print(f"[red]first error[/] (trial {s.first_error_trial or '?'}): {s.first_error}", highlight=False)
    if s.stop_reason:
        out.print(f"[yellow]stopped early:[/] {s.stop_reason}", highlight=False)
    if s.failed:
        out.print(f"results: {s.results_dir} (each trial's error.txt has its traceback)", highlight=False)
        out.print(f"browse:    tuneguard ui --tracking-uri {s.tracking_uri}", highlight=False)
        return
    if s.best_objective is not None:
        cfg = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (s.best_config or {}).items())
        out.print(f"best objective [bold green]{s.best_objective:.4f}[/]  {cfg}  (MLflow run {s.best_run_id})", highlight=False)
    if s.bound_never_held:
        out.print("why: the VN bound never held in this job: the DP noise keeps the submitted VN ratio above the "
                  "GAR's bound 1/kappa at every step (paper 001's finding), so the winner trained best without the "
                  "GAR's robustness guarantee; `tuneguard report` shows by how much", highlight=False, markup=False)
    out.print(f"results: {s.results_dir}", highlight=False)
    if s.interrupted:
        out.print(f"continue:  tuneguard tune --resume {s.results_dir}", highlight=False)
    uri = mask_uri(s.tracking_uri)
    out.print(f"browse:    tuneguard ui --tracking-uri {uri}", highlight=False, markup=False)
    out.print(f"export:    tuneguard export --job {s.job_id} --tracking-uri {uri} -o best.yaml", highlight=False,
              markup=False)
    out.print(f"report:    tuneguard report --job {s.job_id} --tracking-uri {uri} -o report/", highlight=False,
              markup=False)


def _stopped_words(s) -> str:
    """Trials that reported but did not finish: ASHA's early stops, or (no scheduler, or the job
    was interrupted) trials cut short."""
    if getattr(s, "scheduler", "none") == "asha" and not s.interrupted:
        return "stopped early (ASHA)"
    if getattr(s, "scheduler", "none") == "asha":
        return "stopped early (ASHA) or cut by the interrupt"
    return "unfinished (cut by the interrupt)" if s.interrupted else "unfinished"


def register(app: typer.Typer) -> None:
    app.command("tune")(tune)
