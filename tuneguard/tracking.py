"""MLflow: one run per training run, per-step metrics in batches, config and plots as artifacts.

The default store is a local SQLite file, set explicitly (MLflow 3 refuses a bare ``./mlruns``):
``sqlite:///$TUNEGUARD_HOME/mlflow.db`` with ``TUNEGUARD_HOME`` defaulting to
``./tuneguard-runs``. ``MLFLOW_TRACKING_URI`` or an explicit ``tracking_uri`` override it.

Metrics are buffered and sent with ``MlflowClient.log_batch`` (one request per ``flush_every``
steps, not one per metric): against a tracking server that is the difference between seconds
and minutes per run (see ``shared/notes``).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from tuneguard.results import schema

# MLflow draws a progress bar on stderr for every artifact it downloads (a run's config.yaml):
# noise in the output of tune jobs and exports. A user's own setting wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PARAM_MAX_LEN = 6000
REACH_TIMEOUT_S = 5.0
DB_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy stores MLflow supports besides sqlite
_SQLITE_MAGIC = b"SQLite format 3\x00"


class TrackingError(ValueError):
    """A tracking URI tuneguard cannot use; the message says which, why, and what is allowed."""


def tuneguard_home() -> Path:
    return Path(os.environ.get("TUNEGUARD_HOME", "tuneguard-runs")).expanduser().resolve()


def default_tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{tuneguard_home() / 'mlflow.db'}"


def mask_uri(uri: str | None) -> str:
    """``uri`` with any password or token replaced by ``***`` (``http://user:***@host``,
    ``http://***@host``): what tuneguard prints and saves."""
    if not uri or "@" not in uri:
        return uri or ""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, _ = userinfo.partition(":")
    masked = f"{user}:***@{hostport}" if sep and user else f"***@{hostport}"
    return urllib.parse.urlunsplit(parts._replace(netloc=masked))


def has_credentials(uri: str | None) -> bool:
    return bool(uri) and mask_uri(uri) != uri


_CHECKED: set[str] = set()
_CHECK_LOCK = threading.Lock()


def _sqlite_path(uri: str) -> Path:
    rest = uri.removeprefix("sqlite:///")
    rest = rest.split("?", 1)[0]
    if not rest or rest == ":memory:" or rest.startswith(":memory:"):
        raise TrackingError(f"tracking URI {uri!r}: an in-memory SQLite store keeps nothing; give a file, "
                            "e.g. sqlite:///$TUNEGUARD_HOME/mlflow.db")
    return Path(urllib.parse.unquote(rest)).expanduser()


def _check_sqlite(uri: str) -> None:
    db = _sqlite_path(uri)
    if "\x00" in str(db):
        raise TrackingError(f"tracking URI {uri!r}: the path contains a NUL byte")
    parent = db.parent
    if db.exists():
        if db.is_dir():
            raise TrackingError(f"tracking URI {uri!r}: {db} is a directory; the SQLite store is a file "
                                f"(e.g. sqlite:///{db / 'mlflow.db'})")
        try:
            with open(db, "rb") as fh:
                head = fh.read(16)
        except OSError as err:
            raise TrackingError(f"tracking URI {uri!r}: cannot read {db}: {err.strerror or err}") from None
        if head and head != _SQLITE_MAGIC:
            raise TrackingError(f"tracking URI {uri!r}: {db} exists and is not a SQLite database; "
                                "point --tracking-uri at a new file or an MLflow SQLite store")
        if not os.access(db, os.W_OK):
            raise TrackingError(f"tracking URI {uri!r}: {db} is not writable")
        return
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise TrackingError(f"tracking URI {uri!r}: {probe} is a file, so {db} cannot be created under it")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingError(f"tracking URI {uri!r}: cannot create the folder {parent}: "
                            f"{err.strerror or err}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrackingError(f"tracking URI {uri!r}: the folder {parent} is not writable, so the store "
                            f"{db.name} cannot be created there")


def _check_http(uri: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    import urllib.error
    import urllib.request

    shown = mask_uri(uri)
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as err:
        raise TrackingError(f"tracking URI {shown!r} is not a valid URL ({err})") from None
    if not parts.hostname:
        raise TrackingError(f"tracking URI {shown!r} names no host; expected http(s)://HOST[:PORT]")
    if port == 0:
        raise TrackingError(f"tracking URI {shown!r}: port 0 is not a port; expected 1-65535")
    url = uri.rstrip("/") + "/health"
    req = urllib.request.Request(url, method="GET")
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s):  # noqa: S310 - http(s) only, checked above
            return
    except urllib.error.HTTPError:
        return  # something that speaks HTTP answers (auth or routing decide the rest)
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        waited = time.monotonic() - start
        raise TrackingError(
            f"no MLflow server answers at {shown} ({reason}; checked for {waited:.1f} s). Start it "
            f"(`mlflow server --host HOST --port PORT` or `tuneguard ui`), fix --tracking-uri / "
            "MLFLOW_TRACKING_URI, or leave both unset for the local SQLite store"
        ) from None


def check_tracking_uri(uri: str, *, reach: bool = True) -> None:
    """Raise :class:`TrackingError` unless ``uri`` is a store tuneguard can use: ``sqlite:///PATH``
    (a SQLite file that is one, or can be created), ``http(s)://HOST[:PORT]`` that answers within
    a few seconds (``reach``), or a SQLAlchemy database URI (postgresql, mysql, mssql)."""
    shown = mask_uri(uri)
    if not isinstance(uri, str) or not uri.strip():
        raise TrackingError("the tracking URI is empty; expected sqlite:///PATH or http(s)://HOST:PORT")
    if any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise TrackingError(f"tracking URI {shown!r} contains control characters")
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if uri.startswith("sqlite:///"):
        _check_sqlite(uri)
    elif scheme == "sqlite":
        raise TrackingError(f"tracking URI {shown!r}: a SQLite URI is sqlite:///relative/path.db or "
                            "sqlite:////absolute/path.db (three or four slashes)")
    elif scheme in ("http", "https"):
        if reach:
            _check_http(uri)
    elif scheme.split("+")[0] in DB_SCHEMES or scheme.startswith("databricks"):
        return
    elif scheme == "file" or uri.startswith(("/", ".", "~")) or (not scheme and "/" in uri):
        raise TrackingError(
            f"tracking URI {shown!r}: MLflow 3 no longer writes a plain folder store; use a SQLite store "
            "(sqlite:///PATH/mlflow.db) or a tracking server (http://HOST:PORT)")
    else:
        raise TrackingError(
            f"tracking URI {shown!r} is not a store tuneguard can use; allowed: sqlite:///PATH, "
            f"http(s)://HOST:PORT, or a database URI ({', '.join(DB_SCHEMES)})")


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI to use (``uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite store under
    ``$TUNEGUARD_HOME``), checked once per process (:func:`check_tracking_uri`); a SQLite store is
    created, or upgraded, once under a file lock (:func:`ensure_store`)."""
    uri = uri or default_tracking_uri()
    if uri in _CHECKED:
        return uri
    with _CHECK_LOCK:
        if uri not in _CHECKED:
            check_tracking_uri(uri)
            if uri.startswith("sqlite:///"):
                ensure_store(uri)
            _CHECKED.add(uri)
    return uri


def ensure_store(uri: str) -> None:
    """Create (or migrate) a SQLite store once, holding an exclusive lock on ``<db>.lock``.

    MLflow creates a fresh store's tables in whichever process opens it first; two processes
    doing it at once (two jobs, three ``train`` runs) race and all but one fail with "table ...
    already exists". Under the lock the first creates the tables and the others find them.
    """
    import fcntl

    db = _sqlite_path(uri)
    lock = db.with_name(db.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise TrackingError(f"tracking URI {uri!r}: cannot create the lock file {lock}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        from mlflow import MlflowClient

        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - one clear line instead of SQLAlchemy's traceback
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrackingError(f"tracking URI {uri!r}: the SQLite store {db} cannot be opened as an "
                                f"MLflow store ({type(err).__name__}: {first[:500]})") from None
    finally:
        os.close(fd)  # closing releases the lock


def _artifact_root(uri: str) -> str | None:
    """Artifacts next to a SQLite store; a server decides its own root."""
    if uri.startswith("sqlite:///"):
        return (_sqlite_path(uri).resolve().parent / "artifacts").as_uri()
    return None


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def artifact_dir_name(experiment: str) -> str:
    """The folder (under the artifact root) of an experiment's artifacts. Names never steer
    paths: a name that is not a plain file name (``../../x``, ``a/b``, ``..``, spaces, unicode)
    becomes a sanitised slug plus a digest of the name."""
    if _SAFE_NAME.match(experiment) and ".." not in experiment:
        return experiment
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", experiment).strip("_")[:40] or "experiment"
    return f"{slug}-{hashlib.sha256(experiment.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def client(uri: str | None = None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The experiment id for ``name``, created if missing (safe against concurrent creators).

    It is tagged ``mlflow.experimentKind = custom_model_development`` (a training experiment):
    MLflow UIs without the GenAI / Model training switch open it on its runs; with the switch
    (3.17), the links ``tuneguard ui`` prints select the view (see tuneguard/results/ui.py)."""
    from mlflow.exceptions import MlflowException

    cl = client(uri)
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        if schema.EXPERIMENT_KIND_TAG not in exp.tags:
            _set_kind(cl, exp.experiment_id)
        return exp.experiment_id
    root = _artifact_root(resolve_tracking_uri(uri))
    try:
        return cl.create_experiment(name, artifact_location=f"{root}/{artifact_dir_name(name)}" if root else None,
                                    tags={schema.EXPERIMENT_KIND_TAG: schema.EXPERIMENT_KIND_TRAINING})
    except MlflowException:  # another trial created it first
        exp = cl.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _set_kind(cl, experiment_id: str) -> None:
    try:
        cl.set_experiment_tag(experiment_id, schema.EXPERIMENT_KIND_TAG, schema.EXPERIMENT_KIND_TRAINING)
    except Exception:  # noqa: BLE001 - the view is a convenience; a read-only store still works
        pass


class RunTracker:
    """One MLflow run, written through ``MlflowClient`` (no global active run, so it is safe in
    Ray actors and Tune trials running side by side)."""

    def __init__(
        self,
        experiment: str,
        *,
        tracking_uri: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        flush_every: int = 50,
    ):
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        self.uri = resolve_tracking_uri(tracking_uri)
        self.client = client(self.uri)
        self.flush_every = flush_every
        self._buffer: list = []
        self._pending_steps = 0
        if run_id is not None:  # resume an existing run (a restarted Tune trial)
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.experiment_id = self.client.get_run(run_id).info.experiment_id
            return
        self.experiment_id = ensure_experiment(experiment, self.uri)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id

    # params / tags ------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # metrics --------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer one step's metrics; NaN/inf are dropped (MLflow stores them poorly)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None or isinstance(v, bool):
                continue
            v = float(v)
            if math.isfinite(v):
                self._buffer.append(Metric(k, v, ts, step))
        self._pending_steps += 1
        if self._pending_steps >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self.client.log_batch(self.run_id, metrics=self._buffer)
        self._buffer, self._pending_steps = [], 0

    # artifacts ------------------------------------------------------------------------------
    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_dict(self, obj: Any, path: str) -> None:
        self.client.log_dict(self.run_id, obj, path)

    def log_figure(self, fig, path: str) -> None:
        self.client.log_figure(self.run_id, fig, path)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
        self.ended = True

    def end_quietly(self, status: str, message: str = "") -> None:
        """End the run ``status`` (KILLED / FAILED) on an error path: flush what can be flushed,
        record why, and never raise (the original error is what the caller reports)."""
        if getattr(self, "ended", False):
            return
        try:
            self.flush()
        except Exception:  # noqa: BLE001
            self._buffer = []
        try:
            tags = {schema.STATUS: status}
            if message:
                tags[schema.MESSAGE] = message[:4000]
            self.set_tags(tags)
        except Exception:  # noqa: BLE001
            pass
        try:
            self.client.set_terminated(self.run_id, status=status)
            self.ended = True
        except Exception:  # noqa: BLE001
            pass


def _param_str(v: Any) -> str:
    s = "null" if v is None else str(v)
    return s if len(s) <= PARAM_MAX_LEN else s[: PARAM_MAX_LEN - 3] + "..."
