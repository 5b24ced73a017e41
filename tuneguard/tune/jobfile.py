"""``job.json`` of a tune results dir: strict reading, the trust digest, and closing stale runs.

A results dir is trusted code. ``Tuner.restore`` unpickles the dir's ``tune/tuner.pkl`` (and
Tune's experiment-state and searcher-state snapshots hold pickled objects too): resuming a dir
runs whatever code those files carry. Resume therefore only dirs you (or tuneguard on your
behalf) wrote, exactly as you would only run your own scripts. As a guard, tuneguard records a
SHA-256 digest of ``tune/tuner.pkl`` and ``space.yaml`` in ``job.json`` when it creates the job
(Tune writes ``tuner.pkl`` once, when the Tuner is built), and ``--resume`` refuses a dir whose
files do not match it or whose ``job.json`` records none.

The tracking URI saved in ``job.json`` has any password or token masked (``user:***@host``);
``--resume`` of such a job needs ``--tracking-uri`` with the credentials again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tuneguard.results import schema

JOB_FILE = "job.json"
DIGEST_FILES = ("tune/tuner.pkl", "space.yaml")
MAX_JOB_FILE = 1024 * 1024

# field -> allowed types (bool is not an int here)
_FIELDS: dict[str, tuple[type, ...]] = {
    "job_id": (str,), "results_dir": (str,), "tracking_uri": (str,), "experiment": (str,),
    "parent_run_id": (str,), "study_name": (str,), "space_path": (str, type(None)),
    "created": (int, float), "checkpoint_every": (int,), "total_trials": (int,),
    "digest": (str, type(None)),
}


def _error(msg: str) -> Exception:
    from tuneguard.tune.search import ResumeError

    return ResumeError(msg)


def read_job_json(results_dir: Path) -> dict[str, Any]:
    """The fields of ``results_dir/job.json``, each checked for type; ResumeError naming the file
    and the field otherwise (a corrupt, truncated or foreign file)."""
    p = results_dir / JOB_FILE
    if not results_dir.is_dir():
        raise _error(f"--resume {results_dir}: not a directory; pass the results dir `tuneguard tune` printed")
    if not p.is_file():
        raise _error(f"{results_dir} is not a tuneguard tune results dir (no {JOB_FILE}); "
                     "pass the folder `tuneguard tune` printed (by default $TUNEGUARD_HOME/tune/<job id>)")
    try:
        if p.stat().st_size > MAX_JOB_FILE:
            raise _error(f"{p}: {p.stat().st_size:,} bytes, not a tuneguard job file (a few hundred bytes)")
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _error(f"{p} is not a tuneguard job file (not valid JSON: {err}); it is corrupt or was not "
                     "written by tuneguard") from None
    except OSError as err:
        raise _error(f"cannot read {p}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise _error(f"{p} is not a tuneguard job file (expected a JSON object, got {type(data).__name__})")
    missing = [k for k in _FIELDS if k not in data and k != "digest"]
    unknown = [k for k in data if k not in _FIELDS]
    if missing or unknown:
        raise _error(f"{p} is not a tuneguard job file: " + "; ".join(
            ([f"missing field(s) {', '.join(missing)}"] if missing else [])
            + ([f"unknown field(s) {', '.join(map(repr, unknown[:10]))}"] if unknown else [])))
    for k, types in _FIELDS.items():
        v = data.get(k)
        if isinstance(v, bool) or not isinstance(v, types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _error(f"{p}: field {k!r} must be {want}; got {type(v).__name__}")
    return data


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def job_digest(results_dir: Path) -> str:
    """SHA-256 over the files tuneguard writes once per job (:data:`DIGEST_FILES`)."""
    h = hashlib.sha256()
    for name in DIGEST_FILES:
        p = results_dir / name
        h.update(name.encode())
        h.update(_file_digest(p).encode() if p.is_file() else b"<missing>")
    return h.hexdigest()


def check_digest(results_dir: Path, recorded: str | None) -> None:
    """ResumeError unless the dir's files match the digest ``job.json`` recorded."""
    if not recorded:
        raise _error(
            f"{results_dir / JOB_FILE} records no digest of the job's files, so tuneguard cannot tell that it "
            "wrote them; refusing to resume (Tuner.restore unpickles tune/tuner.pkl: a results dir is trusted "
            "code). Start the job again with `tuneguard tune SPACE.yaml`")
    actual = job_digest(results_dir)
    if actual != recorded:
        raise _error(
            f"{results_dir}: {' / '.join(DIGEST_FILES)} do not match the digest in {JOB_FILE} (they were changed "
            "or replaced after tuneguard wrote them); refusing to resume, because Tuner.restore unpickles "
            "tune/tuner.pkl and a results dir is trusted code. Resume only dirs you created")


def close_stale_runs(tracking_uri: str, experiment: str, job_id: str, status: str = "KILLED",
                     reason: str = "") -> int:
    """End every run of the job (its trial runs and the job run) still RUNNING: left so by a
    driver that was killed, or by trials whose processes stopped with it. A trial that resumes
    from its checkpoint reopens its run. Returns how many were closed; never raises."""
    from mlflow.entities import RunTag

    from tuneguard.tracking import client

    closed = 0
    try:
        cl = client(tracking_uri)
        exp = cl.get_experiment_by_name(experiment)
        if exp is None:
            return 0
        flt = schema.tag_filter(job=job_id) + " and attributes.status = 'RUNNING'"
        for run in cl.search_runs([exp.experiment_id], filter_string=flt, max_results=50_000):
            try:
                tags = [RunTag(schema.STATUS, status)]
                if reason:
                    tags.append(RunTag(schema.MESSAGE, reason[:4000]))
                if run.data.tags.get(schema.KIND) != schema.KIND_TUNE_JOB:
                    cl.log_batch(run.info.run_id, tags=tags)
                cl.set_terminated(run.info.run_id, status=status)
                closed += 1
            except Exception:  # noqa: BLE001 - close what can be closed
                continue
    except Exception:  # noqa: BLE001 - bookkeeping must not hide the job's own outcome
        pass
    return closed
