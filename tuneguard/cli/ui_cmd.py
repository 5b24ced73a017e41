"""``tuneguard ui``: the MLflow UI over tuneguard's store (see dashboards/README.md)."""

from __future__ import annotations

import typer

from tuneguard.cli.common import console, err_console, fail
from tuneguard.results import schema


def ui(
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="SQLite store; default sqlite:///$TUNEGUARD_HOME/mlflow.db"),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on; 0.0.0.0 serves everyone who "
                             "reaches the port (unauthenticated, writes included): see --allowed-hosts"),
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="port to listen on (1-65535)"),
    workers: int = typer.Option(1, "--workers", "-w", min=1, max=64, help="uvicorn workers"),
    allowed_hosts: str = typer.Option(None, "--allowed-hosts", help="comma-separated Host headers the server answers "
                                      "(with a public --host; default: this machine's names and addresses)"),
    cors_origins: str = typer.Option(None, "--cors-allowed-origins", help="comma-separated web origins allowed to "
                                     "call the server (with a public --host; default: the URLs of --allowed-hosts)"),
    optuna: bool = typer.Option(False, "--optuna", help="also start optuna-dashboard on a tune job's Optuna study "
                                "(trials carry their tuneguard trial id and MLflow run ids)"),
    job: str = typer.Option(None, "--job", help="with --optuna: the tune job (default: the latest)"),
    optuna_port: int = typer.Option(None, "--optuna-port", min=1, max=65535, help="optuna-dashboard port "
                                    "(default: --port + 1)"),
) -> None:
    """Start the MLflow UI (lean: one worker, no job runner), print its URL, stop on Ctrl-C.

    With --optuna, optuna-dashboard runs next to it on the job's study."""
    from tuneguard.results.ui import (
        UIError,
        check_host_port,
        experiment_url,
        is_public,
        job_study,
        reachable_hosts,
        serve,
    )
    from tuneguard.tracking import mask_uri, resolve_tracking_uri

    try:
        check_host_port(host, port)
    except UIError as err:
        fail(str(err))
    uri = resolve_tracking_uri(tracking_uri)
    storage = study_job = None
    if optuna:
        try:
            study_job, storage, _ = job_study(uri, job)
        except UIError as err:
            fail(str(err))
    hosts = _split(allowed_hosts)
    origins = _split(cors_origins)
    public = is_public(host)
    if public:
        names = hosts or [h for h in reachable_hosts() if h] or [host]
        hosts = hosts or [*names, "localhost", "127.0.0.1"]
        hosts = [f"{h}:{port}" if ":" not in h and not h.startswith("[") else h for h in hosts] + \
            [h for h in hosts if ":" not in h]
        origins = origins or [f"http://{h}" for h in hosts if ":" in h and not h.startswith("[")]
        err_console.print(
            f"[bold yellow]warning:[/] --host {host} serves the MLflow UI and API to anyone who can reach port "
            f"{port}, without authentication, writes included (runs can be changed or deleted). Allowed Host "
            f"headers: {', '.join(hosts)}; CORS origins: {', '.join(origins)}. Use --host 127.0.0.1 (and an SSH "
            "tunnel) unless this network is trusted.", highlight=False)
    elif hosts or origins:
        err_console.print("[yellow]note:[/] --allowed-hosts / --cors-allowed-origins matter only with a public --host",
                          highlight=False)

    def ready(server) -> None:
        url = server.url
        if public:
            names = [h for h in reachable_hosts() if h] or [host]
            url = f"http://{names[-1]}:{port}"
        console.print(f"MLflow UI for {mask_uri(uri)} at {experiment_url(url)}  (Ctrl-C to stop; log: "
                      f"{server.log_path})", highlight=False, markup=False, soft_wrap=True)
        if public and url != server.url:
            console.print(f"  on this machine: {server.url}", highlight=False, markup=False)
        for name, link in _job_links(uri, url):
            console.print(f"  {name}: {link}", highlight=False, markup=False)
        if server.dashboard is not None:
            console.print(f"optuna-dashboard for tune job {study_job} at {server.dashboard.url}/dashboard/  "
                          f"(log: {server.dashboard.log_path})", highlight=False, markup=False, soft_wrap=True)
        console.print(f"tip: an experiment opens on its runs, named by GAR, batch size, lr and attack; filter with "
                      f"{schema.tag_filter(kind=schema.KIND_TRIAL)} and compare runs; each run's "
                      "plots/vn_vs_bound.png shows why it won or lost; see dashboards/README.md", highlight=False,
                      markup=False, soft_wrap=True)
        import sys

        sys.stdout.flush()

    try:
        serve(uri, host=host, port=port, workers=workers, on_ready=ready,
              allowed_hosts=hosts if public else None, cors_origins=origins if public else None,
              optuna_storage=storage, optuna_port=optuna_port)
    except UIError as err:
        fail(str(err))
    console.print("MLflow UI stopped")


def _split(text: str | None) -> list[str]:
    if not text:
        return []
    out = [x.strip() for x in text.split(",") if x.strip()]
    for x in out:
        if any(c.isspace() or ord(c) < 32 for c in x):
            fail(f"--allowed-hosts / --cors-allowed-origins: {x!r} contains spaces or control characters")
    return out


def _job_links(uri: str, url: str, limit: int = 5) -> list[tuple[str, str]]:
    """The runs pages of the experiments holding the latest tune jobs."""
    from tuneguard.results.ui import experiment_url

    try:
        from tuneguard.tracking import client

        cl = client(uri)
        ids = [e.experiment_id for e in cl.search_experiments()]
        if not ids:
            return []
        jobs = cl.search_runs(ids, filter_string=schema.tag_filter(kind=schema.KIND_TUNE_JOB),
                              order_by=["attributes.start_time DESC"], max_results=50)
    except Exception:  # noqa: BLE001 - links are a convenience
        return []
    out, seen = [], set()
    for run in jobs:
        eid = run.info.experiment_id
        if eid not in seen:
            seen.add(eid)
            out.append((cl.get_experiment(eid).name, experiment_url(url, eid)))
    return out[:limit]


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)
