"""The Python API: ``tuneguard.tune(space) -> TuneResults`` and ``tuneguard.train(config) -> RunResult``.

What the CLI does, as functions that return data instead of printing it::

    import tuneguard

    res = tuneguard.tune("search_spaces/quickstart.yaml", tune__num_samples=4)
    res.trials          # pandas DataFrame, one row per trial, best first
    res.best_config     # the searched point of the best trial
    res.frontier        # the accuracy-privacy Pareto front (eps_total, objective[, f]) as a DataFrame
    res.run_ids         # every MLflow run of the job
    run = tuneguard.train(res.export("best.yaml"))   # retrain the best: same seed, same numbers

Overrides are keyword arguments named ``section__key`` (``__`` for the dots of ``--set``):
``tune__num_samples=4``, ``base__steps=20``, ``search__lr=[0.1, 0.2]``. Heavy imports (Ray,
MLflow, torch, pandas) happen inside the functions, so ``import tuneguard`` stays light.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_JOB_ARGS = ("tracking_uri", "results_dir", "address", "concurrency", "num_cpus", "progress")


def _override_items(overrides: dict[str, Any]) -> list[str]:
    """``tune__num_samples=4`` -> ``tune.num_samples=4`` (the ``--set`` syntax; values as YAML)."""
    out = []
    for key, value in overrides.items():
        if "__" not in key:
            raise TypeError(f"tuneguard.tune() got an unexpected keyword {key!r}: overrides are section__key=value "
                            f"(e.g. tune__num_samples=4, base__steps=20); job options: {', '.join(_JOB_ARGS)}")
        text = json.dumps(value) if not isinstance(value, str) else value
        out.append(f"{key.replace('__', '.')}={text}")
    return out


@dataclass
class TuneResults:
    """What a tune job found, read back from its MLflow store (the same numbers as the report)."""

    job_id: str
    experiment: str
    tracking_uri: str
    results_dir: str
    parent_run_id: str
    objective: str
    trials: Any  # pandas.DataFrame
    frontier: Any  # pandas.DataFrame: the Pareto-optimal trials, by eps_total (see the objective)
    best_config: dict[str, Any] | None
    best_objective: float | None
    best_run_id: str | None
    run_ids: list[str] = field(default_factory=list)
    summary: Any = None  # tuneguard.tune.search.JobSummary

    def export(self, path: str | Path = "best.yaml", *, eps: float | None = None) -> Path:
        """Write the best config (within ``eps`` when given) as a file ``tuneguard.train`` runs."""
        from tuneguard.results.export import export

        return export(path, tracking_uri=self.tracking_uri, job=self.job_id, eps=eps)[0].path.resolve()


def tune(space: str | Path | Any, *, tracking_uri: str | None = None, results_dir: str | Path | None = None,
         address: str | None = None, concurrency: int | None = None, num_cpus: int | None = None,
         progress: bool = False, **overrides: Any) -> TuneResults:
    """Run a tune job on ``space`` (a path to a search-space YAML, a dict of its sections, or a
    :class:`~tuneguard.tune.space.Space`) and return :class:`TuneResults`. ``progress`` draws the
    live view (or plain lines off a terminal); off by default in the API."""
    from tuneguard.tune.search import start_job
    from tuneguard.tune.space import Space

    items = _override_items(overrides)
    if isinstance(space, Space):
        sp = Space.from_text(space.text, space.path, items) if items else space
    elif isinstance(space, dict):
        import yaml

        sp = Space.from_text(yaml.safe_dump(space, sort_keys=False), None, items)
    else:
        sp = Space.load(space, items)
    sp.validate()
    summary = start_job(sp, tracking_uri=tracking_uri, results_dir=results_dir, address=address,
                        concurrency=concurrency, progress=progress, num_cpus=num_cpus)
    res = results(summary.job_id, tracking_uri=summary.tracking_uri)
    res.summary = summary
    return res


def results(job: str | None = None, *, tracking_uri: str | None = None, experiment: str | None = None) -> TuneResults:
    """:class:`TuneResults` of a finished job (default: the latest in the store)."""
    import pandas as pd

    from tuneguard.results import schema
    from tuneguard.results.export import find_job
    from tuneguard.tracking import client, resolve_tracking_uri
    from tuneguard.tune.objectives import OBJECTIVES, pareto_front, pareto_front_f

    uri = resolve_tracking_uri(tracking_uri)
    cl = client(uri)
    parent = find_job(cl, job, experiment)
    job_id = parent.data.tags[schema.JOB]
    runs = cl.search_runs([parent.info.experiment_id], filter_string=schema.job_runs_filter(job_id),
                          max_results=50_000)
    by_trial: dict[str, list] = {}
    for r in runs:
        by_trial.setdefault(r.data.tags.get(schema.TRIAL, r.info.run_id), []).append(r)
    rows = []
    tolerated: dict[str, int] = {}  # trial -> the f its runs trained against (param f)
    for trial_id, trial_runs in by_trial.items():
        rep = next((r for r in trial_runs if r.data.tags.get(schema.REPRESENTATIVE) == "1"), trial_runs[0])
        m, t = rep.data.metrics, rep.data.tags
        tolerated[trial_id] = int(float(rep.data.params.get("f", 0) or 0))
        point = json.loads(t[schema.POINT]) if schema.POINT in t else {}
        rows.append({"trial": trial_id, "name": rep.info.run_name, "objective": m.get(schema.OBJECTIVE),
                     "eps_total": m.get(schema.EPS_TOTAL, math.inf if t.get(schema.REPRESENTATIVE) == "1" else None),
                     "max_cross_accuracy": schema.best_accuracy(m), "vn_bound_held_frac": m.get(schema.VN_HELD_FRAC),
                     "status": t.get(schema.STATUS, rep.info.status), "representative": t.get(schema.REPRESENTATIVE) == "1",
                     **point, "run_id": rep.info.run_id, "run_ids": sorted(r.info.run_id for r in trial_runs)})
    trials = pd.DataFrame(rows)
    if len(trials):
        trials = trials.sort_values(["representative", "objective"], ascending=False, na_position="last",
                                    ignore_index=True)
    scored = trials[trials["representative"]] if len(trials) else trials
    best = scored.iloc[0] if len(scored) else None
    objective = parent.data.tags.get(schema.OBJECTIVE_NAME, "max_cross_accuracy")
    pts = [(float(r.eps_total), float(r.objective), i) for i, r in scored.iterrows()
           if r.eps_total is not None and math.isfinite(float(r.eps_total)) and r.objective is not None]
    spec = OBJECTIVES.get(objective)
    if spec is not None and spec.maximises_f:  # three objectives: the f a trial tolerates counts too
        keep = [p[-1] for p in pareto_front_f([(e, o, tolerated[scored.loc[i, "trial"]], i) for e, o, i in pts])]
    else:
        keep = [i for _, _, i in pareto_front(pts)]
    frontier = scored.loc[keep].reset_index(drop=True) if keep else scored.iloc[0:0]
    point_keys = [k for k in trials.columns if k not in ("trial", "name", "objective", "eps_total", "max_cross_accuracy",
                                                          "vn_bound_held_frac", "status", "representative", "run_id",
                                                          "run_ids")]
    return TuneResults(
        job_id=job_id, experiment=cl.get_experiment(parent.info.experiment_id).name, tracking_uri=uri,
        results_dir=parent.data.tags.get(schema.RESULTS_DIR, ""), parent_run_id=parent.info.run_id,
        objective=objective, trials=trials, frontier=frontier,
        best_config=None if best is None else {k: _plain(best[k]) for k in point_keys if _present(best[k])},
        best_objective=None if best is None else float(best["objective"]),
        best_run_id=None if best is None else best["run_id"],
        run_ids=sorted(r.info.run_id for r in runs))


def _plain(v: Any) -> Any:
    """A pandas/numpy scalar as the Python value it holds (64.0, not np.float64(64.0))."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def _present(v: Any) -> bool:
    try:
        return not (v is None or (isinstance(v, float) and math.isnan(v)))
    except TypeError:
        return True


def train(config: str | Path | dict[str, Any] | Any, *, tracking_uri: str | None = None, track: bool = True,
          **overrides: Any):
    """Train one config (a YAML path, e.g. an export; a dict; or an ExperimentConfig) and return
    its :class:`~tuneguard.training.run.RunResult`. Overrides are keyword arguments with ``__``
    for dots (``gar__name="krum"``, ``steps=20``). A retrained export is tagged with the job,
    trial and run it reproduces, as with ``tuneguard train FILE``."""
    from tuneguard.config import ExperimentConfig, build_config, load_config
    from tuneguard.training import train as train_run

    ov = {k.replace("__", "."): v for k, v in overrides.items()}
    tags: dict[str, str] = {}
    if isinstance(config, ExperimentConfig):
        cfg = build_config(config.model_dump(mode="json"), ov) if ov else config
    elif isinstance(config, dict):
        cfg = build_config(config, ov)
    else:
        from tuneguard.results.export import provenance_tags

        cfg = load_config(config, ov)
        tags = provenance_tags(Path(config))
    return train_run(cfg, tracking_uri=tracking_uri, track=track, tags=tags or None)
