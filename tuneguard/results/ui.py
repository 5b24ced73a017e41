"""``tuneguard ui``: the MLflow UI over tuneguard's store, started lean and stopped cleanly.

It runs ``mlflow server`` with the SQLite store as ``--backend-store-uri`` and the artifact root
tuneguard writes next to it (``$TUNEGUARD_HOME/artifacts``) as ``--default-artifact-root``, one
uvicorn worker (``-w 1``) and no job runner (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``): on a
laptop that is ~0.5 GB and ~6 s to ``/health`` instead of ~3 GB and ~15 s. The server runs in
its own process group; stopping sends SIGTERM to the group (SIGKILL after a grace period), on
every exit path: Ctrl-C or SIGTERM while it starts, a start-up timeout, an error, normal exit.

Listening on every interface (``--host 0.0.0.0``) serves an unauthenticated MLflow, writes
included, to whoever reaches the port: the command warns, and passes MLflow's
``--allowed-hosts`` (the Host headers the server answers) and ``--cors-allowed-origins`` (the web
origins that may call it) as the user names them (default: this machine's name and addresses).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# The MLflow 3.17 UI picks its view from a global "workflow type" (GenAI or Model training), kept
# in the browser's localStorage and defaulting to GenAI, so an experiment opens on the GenAI
# overview (traces, evaluation runs, an assistant) whatever the experiment's mlflow.experimentKind
# tag says. This query parameter selects "Model training" for the page it is on: every link
# tuneguard prints carries it, so the experiment opens on its runs table.
CLASSIC_VIEW = "workflowType=machine_learning"


def experiment_url(url: str, experiment_id: str | None = None) -> str:
    """The UI link of an experiment's runs (or of the experiment list) in the classic view."""
    route = f"/experiments/{experiment_id}" if experiment_id else "/experiments"
    return f"{url}/#{route}?{CLASSIC_VIEW}"


class UIError(RuntimeError):
    """The server could not start (port taken, not a SQLite store, ...)."""


PUBLIC_HOSTS = ("0.0.0.0", "::", "[::]")


def is_public(host: str) -> bool:
    """Whether ``host`` listens beyond this machine (all interfaces, or a non-loopback address)."""
    if host in PUBLIC_HOSTS:
        return True
    import ipaddress

    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host not in ("localhost",)


def reachable_hosts() -> list[str]:
    """Names and addresses this machine is reachable at (for --allowed-hosts and the URL)."""
    import socket

    names: list[str] = []
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names:
            names.append(name)
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, family=socket.AF_INET):
            addr = info[4][0]
            if addr not in names and not addr.startswith("127."):
                names.append(addr)
    except OSError:
        pass
    try:  # the address of the default route's interface (no packet is sent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))
            addr = sock.getsockname()[0]
            if addr not in names and not addr.startswith("127."):
                names.append(addr)
    except OSError:
        pass
    return names


def check_host_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise UIError(f"--port {port} is not a port; allowed: 1-65535")
    if not host or any(c.isspace() or ord(c) < 32 for c in host) or len(host) > 253:
        raise UIError(f"--host {host!r} is not a host name or address")


def server_command(tracking_uri: str, host: str, port: int, workers: int = 1, *,
                   allowed_hosts: list[str] | None = None, cors_origins: list[str] | None = None) -> list[str]:
    from tuneguard.tracking import _artifact_root, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if not uri.startswith("sqlite:///"):
        raise UIError(f"{uri} is not a SQLite store: a tracking server already serves its own UI; open it in a browser")
    root = _artifact_root(uri)
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
    out = cmd + ["server", "--backend-store-uri", uri, "--default-artifact-root", str(root),
                 "--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:
        out += ["--allowed-hosts", ",".join(allowed_hosts)]
    if cors_origins:
        out += ["--cors-allowed-origins", ",".join(cors_origins)]
    return out


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log_path: Path
    dashboard: Server | None = None  # optuna-dashboard started next to it (tuneguard ui --optuna)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; also when the
        leader has already exited (its uvicorn workers may not have)."""
        p = self.process
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            p.poll()
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            p.poll()
            if not group_alive(p.pid):
                return
            time.sleep(0.1)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _health(url: str, path: str = "/health") -> bool:
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def optuna_command(storage: str, host: str, port: int) -> list[str]:
    """optuna-dashboard over a job's study storage (its console script: the package has no
    ``__main__``, see shared/notes)."""
    exe = Path(sys.executable).with_name("optuna-dashboard")
    if not exe.exists():
        import shutil

        found = shutil.which("optuna-dashboard")
        if not found:
            raise UIError("optuna-dashboard is not installed; `pip install optuna-dashboard` (a tuneguard dependency)")
        exe = Path(found)
    return [str(exe), storage, "--host", host, "--port", str(port)]


def start_optuna(storage: str, *, host: str = "127.0.0.1", port: int = 8080, timeout: float = 60.0,
                 log_path: str | Path | None = None) -> Server:
    """Start optuna-dashboard on ``storage`` (e.g. ``sqlite:////abs/optuna.db``) and wait until its
    API answers; the same process-group handling as :func:`start`. Its page is ``URL/dashboard/``."""
    from tuneguard.tracking import tuneguard_home

    check_host_port(host, port)
    local = "127.0.0.1" if host in PUBLIC_HOSTS else host
    url = f"http://{local}:{port}"
    if _health(url, "/api/studies"):
        raise UIError(f"something already answers on {url}; choose another --optuna-port")
    log = Path(log_path) if log_path else tuneguard_home() / "optuna-dashboard.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(optuna_command(storage, host, port), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(proc, url, log)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UIError(f"optuna-dashboard exited with code {proc.returncode}; its log ({log}):\n"
                              f"{log.read_text()[-3000:]}")
            if _health(url, "/api/studies"):
                return server
            time.sleep(0.5)
        raise UIError(f"optuna-dashboard did not answer {url} within {timeout:.0f} s; see {log}")
    except BaseException:
        server.stop()
        raise


def job_study(tracking_uri: str | None, job: str | None = None) -> tuple[str, str, str]:
    """(job id, study storage URL, study name) of a tune job (default: the latest): its Optuna
    study is ``<results dir>/optuna.db`` (tag tuneguard.results_dir), named after the job."""
    from tuneguard.results import schema
    from tuneguard.results.export import ExportError, find_job
    from tuneguard.tracking import client

    try:
        parent = find_job(client(tracking_uri), job)
    except ExportError as err:
        raise UIError(str(err)) from None
    job_id = parent.data.tags[schema.JOB]
    rdir = parent.data.tags.get(schema.RESULTS_DIR)
    db = Path(rdir) / "optuna.db" if rdir else None
    if db is None or not db.is_file():
        raise UIError(f"tune job {job_id} has no Optuna study on this machine ({db or 'no results dir recorded'}); a grid "
                      "job searches without Optuna")
    return job_id, f"sqlite:///{db}", job_id


def start(tracking_uri: str | None = None, *, host: str = "127.0.0.1", port: int = 5000, workers: int = 1,
          timeout: float = 90.0, log_path: str | Path | None = None, allowed_hosts: list[str] | None = None,
          cors_origins: list[str] | None = None) -> Server:
    """Start the server and wait until ``/health`` answers; raise UIError with its log otherwise.
    Whatever stops the wait (Ctrl-C, SIGTERM raised as KeyboardInterrupt, a timeout, an error),
    the server's whole process group is stopped before this returns or raises."""
    from tuneguard.tracking import default_tracking_uri, tuneguard_home

    check_host_port(host, port)
    uri = tracking_uri or default_tracking_uri()
    cmd = server_command(uri, host, port, workers, allowed_hosts=allowed_hosts, cors_origins=cors_origins)
    local = "127.0.0.1" if host in PUBLIC_HOSTS else host
    url = f"http://{local}:{port}" if ":" not in local else f"http://[{local.strip('[]')}]:{port}"
    if _health(url):
        raise UIError(f"something already answers on {url}; choose another --port")
    log = Path(log_path) if log_path else tuneguard_home() / "ui.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(proc, url, log)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text()[-3000:]
                raise UIError(f"mlflow server exited with code {proc.returncode} before answering; its log ({log}):\n{tail}")
            if _health(url):
                return server
            time.sleep(0.5)
        raise UIError(f"mlflow server did not answer {url}/health within {timeout:.0f} s; see {log}")
    except BaseException:
        server.stop()  # the whole group: mlflow server, uvicorn and its workers
        raise


def serve(tracking_uri: str | None = None, *, host: str = "127.0.0.1", port: int = 5000, workers: int = 1,
          on_ready=None, allowed_hosts: list[str] | None = None, cors_origins: list[str] | None = None,
          optuna_storage: str | None = None, optuna_port: int | None = None) -> None:
    """Start, report the URL through ``on_ready(server)``, and run until Ctrl-C or SIGTERM. The
    signal handlers are in place before the server starts, so a signal during start-up stops it
    too (see :func:`start`)."""
    stop_requested = False

    def _terminate(signum, frame):  # SIGTERM / SIGHUP to us: stop the server like Ctrl-C
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    server = dashboard = None
    try:
        server = start(tracking_uri, host=host, port=port, workers=workers, allowed_hosts=allowed_hosts,
                       cors_origins=cors_origins)
        if optuna_storage:
            dashboard = start_optuna(optuna_storage, host=host, port=optuna_port or port + 1)
            server.dashboard = dashboard
        if on_ready:
            on_ready(server)
        while server.process.poll() is None:
            time.sleep(0.5)
        if not stop_requested:
            raise UIError(f"mlflow server stopped by itself (code {server.process.returncode}); see {server.log_path}")
    except KeyboardInterrupt:
        pass
    finally:
        if dashboard is not None:
            dashboard.stop()
        if server is not None:
            server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
