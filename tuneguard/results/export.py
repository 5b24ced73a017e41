"""Export the best configs of a tune job as experiment configs ``tuneguard train`` runs.

Where the numbers come from: every trial tags one of its MLflow runs as its representative
(``tuneguard.representative = 1``; for worst_case the run of the worst attack, first seed) and
logs the trial's ``objective`` on it. Export ranks those runs by ``objective`` (ties: the larger
tolerated f, then the smaller total epsilon, then the earlier trial) and reads each one's
``config.yaml`` artifact (the exact config the run trained, types intact; MLflow params
are strings), validated again with :func:`tuneguard.config.build_config`.

File format (``tuneguard train`` and :func:`tuneguard.config.load_config` accept it as is)::

    tuneguard_export:          # provenance and scores, ignored by train
      job: 20260101-120000-ab12
      rank: 1
      objective: worst_case
      score: 0.912             # the trial's objective
      max_cross_accuracy: 0.912
      final_cross_accuracy: 0.905
      run_id: ...              # the run whose config follows; train reproduces its numbers
      trial_id: ...
      runs: [{run_id, attack, seed, max_cross_accuracy}, ...]
    config: {...}              # a complete ExperimentConfig

``--top K`` writes K files: ``best.yaml`` (rank 1), ``best-2.yaml``, ... ``best-K.yaml``.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuneguard.results import schema


class ExportError(ValueError):
    """Nothing to export, or the store does not hold what was asked for."""


@dataclass
class Exported:
    path: Path
    rank: int
    score: float
    run_id: str
    trial_id: str
    config: dict[str, Any]
    eps_total: float | None = None  # the trial's total epsilon (metric eps_total), when logged



def find_job(client, job: str | None = None, experiment: str | None = None):
    """The parent run of a tune job: by id, else the latest job (of ``experiment`` if given)."""
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ExportError(f"no MLflow experiment {experiment!r} in this store; experiments: {', '.join(names) or 'none'}")
        exp_ids = [exp.experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        raise ExportError("the MLflow store holds no experiments; run `tuneguard tune SPACE.yaml` first")
    flt = schema.tag_filter(kind=schema.KIND_TUNE_JOB, job=job or None)
    runs = client.search_runs(exp_ids, filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        what = f"tune job {job!r}" if job else "tune job"
        where = f" in experiment {experiment!r}" if experiment else ""
        raise ExportError(f"no {what}{where} in this MLflow store (is --tracking-uri the store the job used?)")
    return runs[0]


def rank_key(run) -> tuple:
    """How export ranks a job's trials (their representative runs), best first: the objective
    (higher), then, on a tie, the tolerated f (higher: as accurate against more attackers, see
    the ``accuracy_eps_f`` objective), then the total epsilon (lower: as accurate for less
    privacy spent; the trial on the Pareto front), then the start time (earlier)."""
    m = run.data.metrics
    try:
        f = int(float(run.data.params.get("f", 0)))
    except ValueError:
        f = 0
    eps = m.get(schema.EPS_TOTAL)
    return (-m["objective"], -f, math.inf if eps is None else eps, run.info.start_time or 0)


def best_runs(client, parent, top: int, eps: float | None = None) -> list:
    """The representative runs of the job's feasible, completed trials, best first (:func:`rank_key`);
    with ``eps``, only trials whose total epsilon (metric eps_total) is within that budget."""
    job = parent.data.tags[schema.JOB]
    flt = schema.tag_filter(job=job, kind=schema.KIND_TRIAL, representative="1")
    if eps is not None:
        flt += f" and metrics.{schema.EPS_TOTAL} <= {float(eps)!r}"
    # Every candidate, not the first `top` by objective: the tie rules need the tied ones too.
    runs = client.search_runs([parent.info.experiment_id], filter_string=flt, max_results=50_000)
    return sorted((r for r in runs if "objective" in r.data.metrics), key=rank_key)[:max(top, 1)]


def trial_runs(client, parent, trial_id: str) -> list:
    job = parent.data.tags[schema.JOB]
    flt = schema.job_runs_filter(job, kind=None, trial=trial_id)
    return client.search_runs([parent.info.experiment_id], filter_string=flt, max_results=1000)


def run_config(client, run_id: str) -> dict[str, Any]:
    """The config a run trained, from its ``config.yaml`` artifact, validated."""
    from tuneguard.config import build_config

    with tempfile.TemporaryDirectory() as d:
        try:
            local = client.download_artifacts(run_id, "config.yaml", d)
        except Exception as err:  # noqa: BLE001
            raise ExportError(f"run {run_id} has no readable config.yaml artifact: {err}") from None
        raw = yaml.safe_load(Path(local).read_text())
    return build_config(raw).model_dump(mode="json")


def check_output(out: Path) -> None:
    """ExportError unless ``out`` can be written as a file: not a folder, its folder creatable and
    writable (checked before the store is read, so a typo fails at once)."""
    import os

    if str(out) in ("", ".") or out.is_dir():
        raise ExportError(f"-o {out} is a directory; give a file name, e.g. -o {Path(out) / 'best.yaml'}")
    if out.exists() and not os.access(out, os.W_OK):
        raise ExportError(f"-o {out}: the file exists and is not writable")
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ExportError(f"-o {out}: {probe} is a file, so {out.parent} cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"-o {out}: the folder {probe} is not writable")


def output_paths(out: Path, k: int) -> list[Path]:
    return [out if i == 1 else out.with_name(f"{out.stem}-{i}{out.suffix or '.yaml'}") for i in range(1, k + 1)]


def export(out: str | Path, *, tracking_uri: str | None = None, job: str | None = None,
           experiment: str | None = None, top: int = 1, eps: float | None = None) -> list[Exported]:
    """Write the ``top`` best configs of a job; returns what was written. With ``eps``: the most
    accurate trials whose total epsilon spent is at most ``eps`` (a point of the job's
    accuracy-privacy front, see the ``accuracy_vs_eps`` objective); of equally accurate ones the
    one tolerating the larger f, then the one spending less (:func:`rank_key`)."""
    from tuneguard.tracking import client as make_client
    from tuneguard.tracking import mask_uri, resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if top < 1:
        raise ExportError(f"--top must be >= 1; got {top}")
    check_output(Path(out))
    uri = resolve_tracking_uri(tracking_uri)
    cl = make_client(uri)
    parent = find_job(cl, job, experiment)
    job_id = parent.data.tags[schema.JOB]
    if eps is not None and not (eps > 0):
        raise ExportError(f"--eps must be a positive privacy budget; got {eps}")
    runs = best_runs(cl, parent, top, eps)
    if not runs and eps is not None:
        spent = sorted(r.data.metrics[schema.EPS_TOTAL] for r in best_runs(cl, parent, 10_000)
                       if schema.EPS_TOTAL in r.data.metrics)
        hint = (f"the smallest total epsilon any trial spent is {spent[0]:.4g}; raise --eps to at least that"
                if spent else "its trials recorded no eps_total (a job without DP, or from before tuneguard logged it)")
        raise ExportError(f"tune job {job_id} has no trial within the budget eps <= {eps:g}: {hint}")
    if not runs:
        raise ExportError(f"tune job {job_id} has no completed, feasible trial yet (nothing to export)")
    paths = output_paths(Path(out), len(runs))
    written = []
    for rank, (run, path) in enumerate(zip(runs, paths, strict=True), start=1):
        tags, metrics = run.data.tags, run.data.metrics
        trial_id = tags.get(schema.TRIAL, "")
        cfg = run_config(cl, run.info.run_id)
        siblings = trial_runs(cl, parent, trial_id) if trial_id else [run]
        meta = {
            "version": 1,
            "job": job_id,
            "experiment": cl.get_experiment(parent.info.experiment_id).name,
            "tracking_uri": mask_uri(uri),  # never credentials in a file
            "rank": rank,
            "objective": tags.get(schema.OBJECTIVE_NAME, "max_cross_accuracy"),
            "score": float(metrics["objective"]),
            "max_cross_accuracy": schema.best_accuracy(metrics),
            "final_cross_accuracy": metrics.get("final_cross_accuracy"),
            "eps_total": metrics.get(schema.EPS_TOTAL),
            "eps_budget": eps,
            "run_id": run.info.run_id,
            "trial_id": trial_id,
            "attack": tags.get(schema.ATTACK),
            "seed": cfg.get("seed"),
            "runs": sorted(({"run_id": r.info.run_id, "attack": r.data.tags.get(schema.ATTACK),
                             "seed": int(r.data.tags.get(schema.SEED, cfg.get("seed", 0))),
                             "max_cross_accuracy": schema.best_accuracy(r.data.metrics)}
                            for r in siblings), key=lambda x: (x["seed"], str(x["attack"]))),
            "reproduce": f"tuneguard train {path.name}",
        }
        header = (f"# tuneguard export: rank {rank} of tune job {job_id} ({meta['objective']} = {meta['score']:.4f}).\n"
                  f"# `tuneguard train {path}` retrains run {run.info.run_id} with the same seed and numbers.\n")
        try:
            if path.is_dir():
                raise ExportError(f"{path} is a directory; choose another -o")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(header + yaml.safe_dump({"tuneguard_export": meta, "config": cfg}, sort_keys=False))
        except OSError as err:
            raise ExportError(f"cannot write {path}: {err.strerror or err}") from None
        written.append(Exported(path, rank, meta["score"], run.info.run_id, trial_id, cfg, meta["eps_total"]))
    return written


def provenance_tags(path: Path) -> dict[str, str]:
    """Tags linking a retrained run to what it reproduces, from a ``tuneguard export`` file's
    ``tuneguard_export`` block (job, trial, run); nothing for a plain config."""
    from tuneguard.safeyaml import load_file

    try:
        raw = load_file(path)
    except Exception:  # noqa: BLE001 - load_config has already said what is wrong with the file
        return {}
    meta = raw.get("tuneguard_export") if isinstance(raw, dict) else None
    if not isinstance(meta, dict):
        return {}
    tags = {schema.REPRODUCES_JOB: meta.get("job"), schema.REPRODUCES_TRIAL: meta.get("trial_id"),
            schema.REPRODUCES_RUN: meta.get("run_id")}
    return {k: str(v) for k, v in tags.items() if v}
