"""The trainable: one Tune trial = one point of the search space, trained and scored.

A trial trains its config once per (seed, attack) of the space (``max_cross_accuracy``: one
attack; ``worst_case``: every attack of ``scenario.attacks``), each run a :func:`train` call with
its own MLflow run nested under the job's run. The runs go in lockstep, one thread each: they
meet at every evaluation step, where the trial reports to Tune

    objective(step) = mean over seeds of ( min over attacks of max cross-accuracy up to step )

so ASHA compares trials on the worst case so far, and nothing is reported between evaluations.

Outcomes that are not errors:

- a combination the GAR cannot take (:class:`~tuneguard.tune.space.Excluded`): reported at once
  with ``objective = 0.0, excluded = 1``, recorded as an MLflow run with status EXCLUDED;
- a privacy budget the config cannot meet (``InfeasibleBudget``; RunResult status INFEASIBLE):
  ``objective = 0.0, infeasible = 1`` and the reason, in Tune and as MLflow tags, so the
  searcher learns the region is bad and the job goes on;
- a diverged run: its max cross-accuracy so far (0.0 if it never evaluated).

Checkpoints: ``train(checkpoint_fn=...)`` hands a resumable dict every ``checkpoint_every``
steps; the trial saves the set (one per run, or the finished run's summary) with ``torch.save``
in a Tune checkpoint at the next report. A retried or restored trial reloads it and passes each
dict to ``train(resume=...)``, which continues the same MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from tuneguard.results import schema
from tuneguard.tune.objectives import _finite
from tuneguard.tune.trial_report import TrialReport

CHECKPOINT_FILE = "trial.pt"
RESULT_TAG = schema.TRIAL_RESULT  # the trial's final Tune report, JSON, on each of its runs


@dataclass(frozen=True)
class JobContext:
    """What every trial of a job needs; passed with ``tune.with_parameters`` (not in the config)."""

    job_id: str
    tracking_uri: str
    parent_run_id: str
    experiment: str
    space_text: str
    space_path: str | None
    checkpoint_every: int
    data_refs: dict[str, Any] | None = None  # tune.ship_data: cluster.data_key -> ObjectRef of the packed dataset


class _Aborted(BaseException):
    """Raised inside a run's callback when a sibling run failed: the run ends as FAILED."""


class Lockstep:
    """Runs of one trial meet at evaluation steps; the trial's thread reports between meetings."""

    def __init__(self, keys: list[str]):
        self.keys = list(keys)  # runs started so far
        self.cond = threading.Condition()
        self.arrived: dict[str, dict[str, Any]] = {}
        self.latest: dict[str, dict[str, Any]] = {}
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        self.ckpts: dict[str, dict[str, Any]] = {}
        self.generation = 0
        self.aborted = False

    def add(self, key: str) -> None:
        with self.cond:
            self.keys.append(key)

    # run threads ---------------------------------------------------------------------------
    def arrive(self, key: str, metrics: dict[str, Any]) -> None:
        with self.cond:
            self.latest[key] = metrics
            self.arrived[key] = metrics
            gen = self.generation
            self.cond.notify_all()
            while self.generation == gen and not self.aborted:
                self.cond.wait()
            if self.aborted:
                raise _Aborted()

    def note(self, key: str, metrics: dict[str, Any]) -> None:
        with self.cond:
            self.latest[key] = metrics

    def checkpoint(self, key: str, state: dict[str, Any]) -> None:
        with self.cond:
            self.ckpts[key] = state

    def finish(self, key: str, result: Any = None, error: BaseException | None = None) -> None:
        with self.cond:
            if error is not None:
                self.errors[key] = error
            else:
                self.results[key] = result
            self.cond.notify_all()

    # trial thread ---------------------------------------------------------------------------
    def wait(self) -> bool:
        """Block until every started run has arrived or finished; False when all have finished."""
        with self.cond:
            while not all(k in self.arrived or k in self.results or k in self.errors for k in self.keys):
                self.cond.wait()
            return bool(self.arrived)

    def release(self) -> None:
        with self.cond:
            self.arrived.clear()
            self.generation += 1
            self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()


def aggregate(values: dict[str, float], specs) -> float:
    """Mean over seeds of the minimum over attacks (each run's value by run key); the reduction
    of every registered objective (:mod:`tuneguard.tune.objectives`)."""
    from tuneguard.tune.objectives import mean_of_worst

    return mean_of_worst(values, specs)


def trial(config: dict[str, Any], job: JobContext | None = None) -> None:
    """The Tune function trainable (wrapped with ``tune.with_parameters(trial, job=...)``)."""
    import torch
    from ray import tune

    from tuneguard.config import ConfigError
    from tuneguard.tune.space import Excluded, Space

    assert job is not None, "wrap with tune.with_parameters(trial, job=JobContext(...))"
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
    space = Space.from_text(job.space_text, job.space_path)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    point = space.decode(config.get("point", config))  # grid mode: {point: {...}}
    existing = _existing_runs(job, trial_id)
    # A trial Tune replays after a driver crash (it finished after the last experiment snapshot)
    # reports its stored result instead of training again.
    stored = {r.data.tags.get(schema.RUN_KEY, ""): json.loads(r.data.tags[RESULT_TAG])
              for r in existing if RESULT_TAG in r.data.tags}
    try:
        specs = space.runs(point)
    except (Excluded, ConfigError) as err:
        if stored:
            tune.report(next(iter(stored.values())))
            return
        kind = "EXCLUDED" if isinstance(err, Excluded) else "INVALID"
        report = TrialReport(objective=0.0, excluded=1, trial_done=1, reason=str(err)[:500])
        report.run_ids = _record_outcome(job, trial_id, point, kind, str(err), report.to_tune())
        tune.report(report.to_tune())
        return
    if specs and all(s.key in stored for s in specs):
        tune.report(stored[specs[0].key])
        return

    # Actor engine: the trial's actors boot (torch imports, seconds) while the runs are set up.
    from tuneguard.training.actors.engine import prewarm

    try:
        warm_pool = prewarm(specs[0].cfg) if specs else None
    except Exception:  # noqa: BLE001 - the run's own engine start reports the problem in context
        warm_pool = None
    try:
        _run_trial(job, space, trial_id, point, specs, existing, tune, torch)
    finally:
        if warm_pool is not None:
            from tuneguard.training.actors.pool import release

            release(warm_pool)


def _run_trial(job: JobContext, space, trial_id: str, point: dict[str, Any], specs, existing, tune, torch) -> None:
    """Train the trial's runs side by side and report (the body of :func:`trial`)."""
    saved = _load_checkpoint()
    done: dict[str, dict[str, Any]] = {k: v["done"] for k, v in saved.items() if "done" in v}
    resume = {k: v["resume"] for k, v in saved.items() if "resume" in v}
    live = [s for s in specs if s.key not in done]
    _drop_unfinished_attempts(job, existing, [s.key for s in live if s.key not in resume],
                              {v.get("run_id") for v in (*done.values(), *resume.values())})
    # The runs of a trial go side by side (threads; on the actor engine through the same warm
    # actors, which hold one context per run), meeting at evaluation steps.
    lock = Lockstep([])
    run_ids: dict[str, str] = {k: v.get("run_id") or "" for k, v in done.items()}
    run_ids.update({k: v.get("run_id") or "" for k, v in resume.items()})

    def run(spec) -> None:
        from tuneguard.training import train

        def on_step(m: dict[str, Any]) -> None:
            if "cross_accuracy" in m:
                lock.arrive(spec.key, dict(m))
            else:
                lock.note(spec.key, dict(m))

        def on_checkpoint(d: dict[str, Any]) -> None:
            lock.checkpoint(spec.key, {**d, "history": list(d["history"])})
            run_ids[spec.key] = d.get("run_id") or run_ids.get(spec.key, "")

        name = schema.run_name(spec.cfg, seed=len(space.seeds) > 1)
        tags = {schema.KIND: schema.KIND_TRIAL, schema.JOB: job.job_id, schema.TRIAL: trial_id,
                schema.ATTACK: spec.attack, schema.SEED: str(spec.seed),
                schema.RUN_KEY: spec.key, schema.OBJECTIVE_NAME: space.tune.objective,
                schema.POINT: _point_json(point), schema.NODE: _node_id()}
        try:
            data = None
            if job.data_refs:
                from tuneguard.tune.cluster import data_key

                data = job.data_refs[data_key(spec.cfg.dataset, spec.cfg.data_dir, spec.cfg.dataset_params)]
            result = train(spec.cfg, tracking_uri=job.tracking_uri, run_name=name, tags=tags,
                           parent_run_id=job.parent_run_id, callback=on_step, checkpoint_fn=on_checkpoint,
                           checkpoint_every=job.checkpoint_every, resume=resume.get(spec.key),
                           plots=space.tune.run_plots, data=data)
        except BaseException as err:  # noqa: BLE001 - handed to the trial thread
            lock.finish(spec.key, error=err)
            return
        run_ids[spec.key] = result.run_id or run_ids.get(spec.key, "")
        lock.finish(spec.key, result=result)

    threads: list[threading.Thread] = []

    def start(spec) -> None:
        lock.add(spec.key)
        t = threading.Thread(target=run, args=(spec,), name=f"tuneguard-{spec.key}", daemon=True)
        threads.append(t)
        t.start()

    # Runs start one at a time: the next starts when the previous has reached its first
    # evaluation (and waits there). Building a run
    # (data, model init) then never overlaps another run's: model initialisation seeds torch's
    # global generator, which threads share, and the numbers must not depend on the timing.
    pending = list(live)
    if pending:
        start(pending.pop(0))
    saved_marker: tuple | None = None
    try:
        while True:
            arrived = lock.wait()
            if lock.errors:
                break
            if pending:
                start(pending.pop(0))
                continue
            if not arrived:
                break
            if not pending:
                metrics = _intermediate(lock, specs, done)
                metrics["run_ids"] = ",".join(v for v in run_ids.values() if v)
                ck_state, marker = _checkpoint_set(lock, done, live)
                if ck_state is not None and marker != saved_marker:
                    with tempfile.TemporaryDirectory() as d:
                        torch.save(ck_state, os.path.join(d, CHECKPOINT_FILE))
                        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
                    saved_marker = marker
                else:
                    tune.report(metrics)
            lock.release()
    finally:
        if lock.errors:
            lock.abort()
        for t in threads:
            t.join(timeout=600)
    if lock.errors:
        key, err = next(iter(lock.errors.items()))
        raise RuntimeError(f"run {key!r} of trial {trial_id} failed: {type(err).__name__}: {err}") from err

    summaries = dict(done)
    for key, res in lock.results.items():
        summaries[key] = _summary(res)
    _finish(job, space, specs, summaries, run_ids)


def _intermediate(lock: Lockstep, specs, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    best, acc, eps, vn = {}, {}, {}, {}
    step = 0
    for s in specs:  # the step of this report: the furthest run still going
        if s.key not in done and s.key not in lock.results and s.key in lock.latest:
            step = max(step, int(lock.latest[s.key].get("step", 0)))
    for s in specs:
        m = lock.latest.get(s.key, {})
        finished = done.get(s.key) or (_summary(lock.results[s.key]) if s.key in lock.results else None)
        if finished is not None:  # what that run had reached by this step
            best[s.key], acc[s.key] = _at_step(finished, step)
            continue
        best[s.key], acc[s.key] = m.get("max_cross_accuracy"), m.get("cross_accuracy")
        if m.get("eps_spent") is not None:
            eps[s.key] = m["eps_spent"]
        if m.get("vn_submit") is not None:
            vn[s.key] = m["vn_submit"]
    from tuneguard.tune.objectives import eps_total

    worst = min(specs, key=lambda s: _finite(best.get(s.key)))
    out = TrialReport(
        objective=aggregate(best, specs), cross_accuracy=min(_finite(v) for v in acc.values()), step=step,
        worst_attack=worst.attack, eps_spent=max(_finite(v) for v in eps.values()) if eps else None,
        # Tune checks every report carries each searched metric
        eps_total=eps_total(eps), f_tolerated=specs[0].cfg.f,
        vn_submit=_finite(vn[worst.key], math.nan) if worst.key in vn else None)
    return out.to_tune()


def _at_step(summary: dict[str, Any], step: int) -> tuple[float, float]:
    """(max cross-accuracy, cross-accuracy) a finished run had reached at ``step``."""
    trace = [(s, a) for s, a in summary.get("evals", []) if s <= step] if step else []
    if not trace:
        if step and summary.get("evals"):
            return math.nan, math.nan
        return summary["max_cross_accuracy"], summary["final_cross_accuracy"]
    return max(a for _, a in trace), trace[-1][1]


def _checkpoint_set(lock: Lockstep, done, live) -> tuple[dict[str, Any] | None, tuple | None]:
    """Every started run's latest resumable state (or its finished summary) when they share
    one step; runs not started yet are left out (they start from scratch on resume)."""
    state: dict[str, dict[str, Any]] = {k: {"done": v} for k, v in done.items()}
    steps = set()
    for s in live:
        if s.key not in lock.keys:
            continue
        if s.key in lock.results:
            state[s.key] = {"done": _summary(lock.results[s.key])}
        elif s.key in lock.ckpts:
            state[s.key] = {"resume": lock.ckpts[s.key]}
            steps.add(lock.ckpts[s.key]["step"])
        else:
            return None, None
    if len(steps) > 1:
        return None, None
    marker = (next(iter(steps)) if steps else -1, sum("done" in v for v in state.values()))
    return {"version": 1, "runs": state}, marker


def _load_checkpoint() -> dict[str, dict[str, Any]]:
    import torch
    from ray import tune

    ck = tune.get_checkpoint()
    if ck is None:
        return {}
    with ck.as_directory() as d:
        path = os.path.join(d, CHECKPOINT_FILE)
        if not os.path.exists(path):
            return {}
        # tuneguard's own file: tensors, dicts, lists and numbers only (no pickled code).
        data = torch.load(path, map_location="cpu", weights_only=True)
    return dict(data.get("runs", {}))


def _summary(res) -> dict[str, Any]:
    evals = [(int(h["step"]), float(h["cross_accuracy"])) for h in res.history if "cross_accuracy" in h]
    return {"status": res.status, "message": res.message, "steps": res.steps, "planned_steps": res.planned_steps,
            "max_cross_accuracy": res.max_cross_accuracy, "final_cross_accuracy": res.final_cross_accuracy,
            "sigma": res.sigma, "eps_spent": res.eps_spent, "run_id": res.run_id, "evals": evals}


def _finish(job: JobContext, space, specs, summaries: dict[str, dict[str, Any]], run_ids: dict[str, str]) -> None:
    """Score the trial, tag its runs, and make the final report."""
    from ray import tune

    from tuneguard.tracking import client

    infeasible = [s for s in specs if summaries[s.key]["status"] == "INFEASIBLE"]
    best = {s.key: summaries[s.key]["max_cross_accuracy"] for s in specs}
    final = {s.key: summaries[s.key]["final_cross_accuracy"] for s in specs}
    first_seed = specs[0].seed
    rep = min((s for s in specs if s.seed == first_seed), key=lambda s: _finite(best[s.key]))
    from tuneguard.tune.objectives import EPS_TOTAL, eps_total

    eps = [summaries[s.key]["eps_spent"] for s in specs if summaries[s.key]["eps_spent"] is not None]
    report = TrialReport(
        objective=0.0 if infeasible else aggregate(best, specs), max_cross_accuracy=_finite(best[rep.key]),
        cross_accuracy=min(_finite(v) for v in final.values()), infeasible=1 if infeasible else 0, trial_done=1,
        step=max(int(summaries[s.key]["steps"]) for s in specs), worst_attack=rep.attack,
        reason=summaries[infeasible[0].key]["message"][:500] if infeasible else "",
        run_ids=",".join(summaries[s.key]["run_id"] or "" for s in specs),
        best_run_id="" if infeasible else (summaries[rep.key]["run_id"] or ""),
        eps_spent=max(eps) if eps else None,
        diverged=sum(summaries[s.key]["status"] == "DIVERGED" for s in specs),
        # The privacy side of the trial (accuracy_vs_eps minimises it): inf without DP or when infeasible.
        eps_total=math.inf if infeasible else eps_total({s.key: summaries[s.key]["eps_spent"] for s in specs}),
        # Its robustness side (accuracy_eps_f maximises it): the f its runs trained against (one f
        # per trial: attacks and seeds vary, f does not); none when it could not train.
        f_tolerated=0 if infeasible else specs[0].cfg.f)
    metrics = report.to_tune()
    cl = client(job.tracking_uri)
    from mlflow.entities import Metric, RunTag

    ts = _now_ms()
    for s in specs:
        run_id = summaries[s.key]["run_id"]
        if not run_id:
            continue
        tags = [RunTag(schema.TRIAL_OBJECTIVE, f"{metrics['objective']:.6g}"),
                RunTag(RESULT_TAG, json.dumps(metrics, default=str))]
        if infeasible:
            tags.append(RunTag(schema.INFEASIBLE, "1"))
        if s.key == rep.key and not infeasible:
            tags.append(RunTag(schema.REPRESENTATIVE, "1"))
        try:
            step = int(summaries[s.key]["steps"])
            logged = [Metric(schema.OBJECTIVE, float(metrics["objective"]), ts, step)]
            if math.isfinite(metrics[EPS_TOTAL]):
                logged.append(Metric(schema.EPS_TOTAL, float(metrics[EPS_TOTAL]), ts, step))
            cl.log_batch(run_id, metrics=logged, tags=tags)
        except Exception:  # noqa: BLE001 - scoring must reach Tune even if MLflow hiccups
            pass
    tune.report(metrics)


def _existing_runs(job: JobContext, trial_id: str) -> list:
    """The MLflow runs an earlier attempt of this trial created (none on a first attempt)."""
    from tuneguard.tracking import client

    try:
        cl = client(job.tracking_uri)
        exp = cl.get_experiment_by_name(job.experiment)
        if exp is None:
            return []
        flt = schema.job_runs_filter(job.job_id, kind=None, trial=trial_id)
        return list(cl.search_runs([exp.experiment_id], filter_string=flt, max_results=1000))
    except Exception:  # noqa: BLE001 - bookkeeping must not fail the trial
        return []


def _drop_unfinished_attempts(job: JobContext, existing: list, keys: list[str], keep: set) -> None:
    """A retried or restored trial restarts these runs from scratch: delete (MLflow soft delete)
    the runs an earlier attempt left unfinished for them, so each trial keeps one run per attack."""
    stale = [r.info.run_id for r in existing
             if r.data.tags.get(schema.RUN_KEY) in keys and r.info.run_id not in keep]
    if not stale:
        return
    from tuneguard.tracking import client

    try:
        cl = client(job.tracking_uri)
        for run_id in stale:
            cl.delete_run(run_id)
    except Exception:  # noqa: BLE001 - bookkeeping must not fail the trial
        pass


def _record_outcome(job: JobContext, trial_id: str, point: dict[str, Any], status: str, message: str,
                    report: dict[str, Any]) -> str:
    """An MLflow run for a trial that does not train (excluded or invalid combination)."""
    from tuneguard.tracking import RunTracker

    try:
        tr = RunTracker(job.experiment, tracking_uri=job.tracking_uri, run_name=trial_id, parent_run_id=job.parent_run_id,
                        tags={schema.KIND: schema.KIND_TRIAL, schema.JOB: job.job_id, schema.TRIAL: trial_id,
                              schema.STATUS: status, schema.MESSAGE: message[:4000],
                              schema.EXCLUDED: "1", schema.POINT: _point_json(point)})
        tr.log_params({k: v for k, v in point.items()})
        tr.log_metrics({"objective": 0.0}, step=0)
        tr.set_tags({RESULT_TAG: json.dumps({**report, "run_ids": tr.run_id})})
        tr.end("FINISHED")
        return tr.run_id
    except Exception:  # noqa: BLE001
        return ""


def _node_id() -> str:
    """The Ray node this trial runs on."""
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        return ""


def _point_json(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True, default=str)[:4000]


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
