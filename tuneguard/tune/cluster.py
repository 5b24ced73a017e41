"""What a tune job needs from every node of its Ray cluster, checked before any trial starts.

Trials (and the actors they start) run on whichever node Ray picks, in processes that did not
inherit the launching shell's environment when the cluster was started elsewhere (``ray start
--head``). So a job:

1. ships its settings: every ``TUNEGUARD_*`` and ``MLFLOW_*`` variable of the launching process
   (directories made absolute) goes to every worker process as Ray's job-level
   ``runtime_env["env_vars"]`` (:func:`job_env`);
2. runs a pre-flight check (:func:`preflight`): one tiny Ray task pinned to each alive node
   loads each dataset the space uses, as a trial there would, and checks that the MLflow store
   is reachable (a SQLite file's folder exists and is writable there; a server answers). A node
   that fails stops the job before any trial starts, with one error naming the node, what it
   lacks and the fixes;
3. or, with ``tune.ship_data`` (``--ship-data``), loads the data once in the launching process
   and ships the arrays through Ray's object store (:func:`ship_datasets`): trials never read
   the disk, which is what clusters without a shared filesystem need.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIXES = ("TUNEGUARD_", "MLFLOW_")
_DIR_VARS = ("TUNEGUARD_DATA_DIR", "TUNEGUARD_HOME")


class PreflightError(RuntimeError):
    """A node of the cluster cannot run the job's trials; the message says which and why."""


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The settings every trial and actor process gets: this process's ``TUNEGUARD_*`` and
    ``MLFLOW_*`` variables (``TUNEGUARD_DATA_DIR`` / ``TUNEGUARD_HOME`` made absolute), plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    for k in _DIR_VARS:
        if env.get(k):
            env[k] = str(Path(env[k]).expanduser().resolve())
    env.update(extra or {})
    return env


DataSpec = tuple[str, "str | None", dict]  # (dataset, data_dir, dataset_params)


def data_key(dataset: str, data_dir: str | None, params: dict | None = None) -> str:
    """How a shipped dataset is looked up: by name, the config's ``data_dir`` and ``dataset_params``."""
    return json.dumps([dataset, data_dir or "", dict(params or {})], sort_keys=True, default=str)


def datasets_of(space) -> list[DataSpec]:
    """(dataset, data_dir, dataset_params) the space's trials may load: the base's, and every
    value of a searched ``dataset`` / ``data_dir``. A searched ``dataset_params.*`` key cannot be
    enumerated here: with ``tune.ship_data`` that is an error (:func:`ship_datasets`)."""
    from tuneguard.config import ExperimentConfig

    base = space.base_raw()
    names = {base.get("dataset", ExperimentConfig.model_fields["dataset"].default)}
    dirs = {base.get("data_dir")}
    params = dict(base.get("dataset_params") or {})
    for grid in space.grids:
        for p in grid:
            if p.path == "dataset" and p.kind in ("choice", "const"):
                names.update(p.values)
            if p.path == "data_dir" and p.kind in ("choice", "const"):
                dirs.update(p.values)
    return sorted(((str(n), d, params) for n in names for d in dirs), key=lambda x: (x[0], x[1] or ""))


def searched_dataset_params(space) -> list[str]:
    return sorted({p.name for grid in space.grids for p in grid if p.path.startswith("dataset_params")})


# Data shipping ----------------------------------------------------------------------------------
def ship_datasets(space) -> dict[str, Any]:
    """Load each dataset of ``space`` here and put it in the object store once: {data_key: ObjectRef}."""
    import ray

    from tuneguard.data import load_dataset
    from tuneguard.training.actors.remote import dataset_to_numpy

    searched = searched_dataset_params(space)
    if searched:
        raise PreflightError(f"tune.ship_data ships the datasets before the search starts, but the space searches "
                             f"{', '.join(searched)}; fix those values in base.dataset_params, or drop --ship-data")
    return {data_key(name, d, p): ray.put(dataset_to_numpy(load_dataset(name, d, p))) for name, d, p in datasets_of(space)}


# Pre-flight -----------------------------------------------------------------------------------
@dataclass
class NodeReport:
    node_id: str
    address: str
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"node {self.address} (id {self.node_id[:12]})"


def _check_node(pairs: list[DataSpec], tracking_uri: str) -> dict[str, Any]:
    """Runs on one node: what a trial there would load and where it would log."""
    import ray

    problems, checked = [], []
    for name, d, params in pairs:
        try:
            from tuneguard.data import load_dataset, resolve_data_dir

            root = resolve_data_dir(d)[0]
            load_dataset(name, d, params)
            checked.append(f"{name} under {root}")
        except Exception as err:  # noqa: BLE001 - reported, with its text, to the launcher
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problems.append(f"dataset {name!r} cannot be loaded there: {first}")
    problem = store_problem(tracking_uri)
    if problem:
        problems.append(problem)
    else:
        from tuneguard.tracking import mask_uri

        checked.append(f"MLflow store {mask_uri(tracking_uri)}")
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "problems": problems, "checked": checked}


def store_problem(tracking_uri: str) -> str | None:
    """Why this process (on some node) could not log to ``tracking_uri``; None when it can.

    :func:`tuneguard.tracking.check_tracking_uri` decides, except that a SQLite store's folder
    must already exist here: the launcher created it, so a node that lacks it does not share
    that filesystem, and creating it would split the store in two."""
    from tuneguard.tracking import TrackingError, check_tracking_uri

    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            return (f"the MLflow store {tracking_uri} is a SQLite file in {folder}, which does not exist there "
                    "(a SQLite store works only where every node sees that path: use a shared folder or an "
                    "MLflow server, --tracking-uri http://HOST:PORT)")
    try:
        check_tracking_uri(tracking_uri)
    except TrackingError as err:
        return f"{err} (checked there)"
    return None


def preflight(pairs: list[DataSpec], tracking_uri: str, *, timeout_s: float = 180.0) -> list[NodeReport]:
    """Check every alive node (one task each, pinned there, no CPU reserved); raise
    :class:`PreflightError` naming each node that cannot run trials. ``pairs``: the datasets to
    load ((name, data_dir, params); none when the data is shipped)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    check = ray.remote(num_cpus=0, max_retries=0)(_check_node)
    refs = {n["NodeID"]: check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(pairs, tracking_uri) for n in nodes}
    reports = []
    for n in nodes:
        rep = NodeReport(n["NodeID"], n.get("NodeManagerAddress", "?"))
        try:
            out = ray.get(refs[n["NodeID"]], timeout=timeout_s)
            rep.problems, rep.checked = out["problems"], out["checked"]
        except Exception as err:  # noqa: BLE001
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            rep.problems.append(f"the check could not run there: {first}")
        reports.append(rep)
    bad = [r for r in reports if r.problems]
    if bad:
        lines = [f"pre-flight: {len(bad)} of {len(reports)} node(s) of the Ray cluster cannot run this job's trials; "
                 "nothing was started."]
        for r in bad:
            lines += [f"  {r.label}:"] + [f"    - {p}" for p in r.problems]
        lines += [
            "Fix one of:",
            "  - put the data at the same path on every node (a shared filesystem), or point every node at its "
            "copy: --data-dir PATH (or base.data_dir / TUNEGUARD_DATA_DIR, shipped to the trials);",
            "  - let tuneguard ship the arrays through Ray's object store: --ship-data (tune.ship_data: true); "
            "trials then never read the disk;",
            "  - for the MLflow store, a path every node sees or an MLflow server (--tracking-uri http://HOST:PORT).",
        ]
        raise PreflightError("\n".join(lines))
    return reports
