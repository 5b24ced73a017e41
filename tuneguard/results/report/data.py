"""What a report reads: the job's runs from MLflow and its Optuna study, as typed rows.

Every query to the store lives here (:mod:`.page` makes the client and hands it over);
:mod:`.figures` draws from these rows without touching the store. Where the numbers come from: each run's
params are its flattened config (strings in MLflow: ``gar.name``, ``batch_size``,
``privacy.eps`` ...); its score is the metric ``max_cross_accuracy`` (the running maximum; older
stores hold ``best_cross_accuracy``); the Optuna study is ``<tuneguard.results_dir tag>/optuna.db``
with the study name of ``job.json`` (the job id).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneguard.results import schema

MAX_VN_RUNS = 6  # GARs per attack panel of the VN figure
NOT_TRAINED = {"EXCLUDED", "INVALID", "INFEASIBLE"}


class ReportError(ValueError):
    """Nothing to report, or the store does not hold what was asked for."""


def num(s: Any) -> float | None:
    """A param (a string in MLflow) as a finite float, else None."""
    if s is None:
        return None
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(v: float | None) -> str:
    if v is None:
        return "?"
    return f"{v:g}"


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
@dataclass
class RunRow:
    """One MLflow run, flattened: params (strings), tags, latest metric values."""

    run_id: str
    name: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    start_time: int
    status: str

    @classmethod
    def of(cls, run) -> RunRow:
        return cls(run.info.run_id, run.info.run_name or "", dict(run.data.params), dict(run.data.tags),
                   dict(run.data.metrics), int(run.info.start_time or 0), run.info.status)

    def num(self, key: str) -> float | None:
        return num(self.params.get(key))

    @property
    def outcome(self) -> str:
        return self.tags.get(schema.STATUS, self.status)

    @property
    def score(self) -> float | None:
        """Max cross-accuracy of the run (None when it never evaluated or did not train)."""
        if self.outcome in NOT_TRAINED or self.tags.get(schema.EXCLUDED) == "1":
            return None
        for key in (schema.MAX_CROSS_ACCURACY, schema.LEGACY_BEST_CROSS_ACCURACY):
            v = self.metrics.get(key)
            if v is not None and math.isfinite(v):
                return float(v)
        return None

    @property
    def gar(self) -> str | None:
        return self.params.get("gar.name")

    @property
    def seed(self) -> str:
        return self.params.get("seed") or self.tags.get(schema.SEED) or "?"

    @property
    def attack_label(self) -> str:
        f = self.num("f")
        if f is not None and f == 0:
            return "no attack"
        return self.params.get("attack.name") or self.tags.get("attack") or "?"

    @property
    def f_label(self) -> str:
        f = self.num("f")
        return f"f={int(f)}" if f is not None else "f=?"

    @property
    def privacy_label(self) -> str:
        mode = self.params.get("privacy.mode")
        if mode == "per_step":
            return f"eps={fmt(self.num('privacy.eps'))}/step"
        if mode == "total":
            return f"eps={fmt(self.num('privacy.total_eps'))} total"
        if mode == "noise":
            return f"sigma={fmt(self.num('privacy.sigma'))}"
        if mode == "none":
            return "no DP"
        return "privacy ?"

    @property
    def partition_label(self) -> str:
        kind = self.params.get("partition.kind", "iid")
        if kind == "by_class":
            k = self.params.get("partition.classes_per_worker", "?")
            return f"by class ({k}/worker)"
        if kind == "dirichlet":
            return f"dirichlet (alpha={self.params.get('partition.alpha', '?')})"
        return kind


@dataclass
class Source:
    """The runs a report covers."""

    uri: str
    experiment: str
    experiment_id: str
    parent: RunRow | None
    job: str | None
    runs: list[RunRow]

    @property
    def objective_name(self) -> str | None:
        """The job's ``tune.objective`` (an entry of tuneguard.tune.objectives), if it has a job."""
        return self.parent.tags.get(schema.OBJECTIVE_NAME) if self.parent else None


def _search_all(cl, exp_ids: list[str], flt: str = "") -> list:
    out, token = [], None
    while True:
        page = cl.search_runs(exp_ids, filter_string=flt, max_results=1000, page_token=token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def load_source(cl, uri: str, job: str | None = None, experiment: str | None = None) -> Source:
    """The job's parent run and its trial runs; with only ``experiment`` and no tune job in it,
    the experiment's train/trial runs."""
    from tuneguard.results.export import ExportError, find_job

    try:
        parent = RunRow.of(find_job(cl, job, experiment))
    except ExportError as err:
        if job or not experiment or cl.get_experiment_by_name(experiment) is None:
            hint = "" if job or experiment else "; for runs of `tuneguard train`, pass --experiment NAME"
            raise ReportError(f"{err}{hint}") from None
        parent = None
    if parent is not None:
        exp_id = cl.get_run(parent.run_id).info.experiment_id
        job_id = parent.tags[schema.JOB]
        flt = schema.job_runs_filter(job_id)
        runs = [RunRow.of(r) for r in _search_all(cl, [exp_id], flt)]
        name = cl.get_experiment(exp_id).name
    else:
        assert experiment is not None
        exp = cl.get_experiment_by_name(experiment)
        exp_id, job_id, name = exp.experiment_id, None, experiment
        runs = [RunRow.of(r) for r in _search_all(cl, [exp_id])
                if r.data.tags.get(schema.KIND) in ("train", "trial")]
        if not runs:
            raise ReportError(f"experiment {experiment!r} holds no tuneguard runs (no tune job, no train/trial runs)")
    runs.sort(key=lambda r: r.start_time)
    return Source(uri, name, exp_id, parent, job_id, runs)


def trial_key(r: RunRow) -> str:
    return r.tags.get(schema.TRIAL) or r.run_id


def representatives(runs: list[RunRow]) -> list[RunRow]:
    """One run per trial: the one tagged representative (it carries the trial's objective); for
    runs outside a tune job, each run with its score as objective. Best first."""
    tagged = [r for r in runs if r.tags.get(schema.REPRESENTATIVE) == "1" and "objective" in r.metrics]
    if tagged:
        return sorted(tagged, key=lambda r: (-r.metrics["objective"], r.start_time))
    scored = [r for r in runs if r.score is not None]
    return sorted(scored, key=lambda r: (-(r.score or 0.0), r.start_time))


def objective_of(r: RunRow) -> float | None:
    v = r.metrics.get("objective")
    return float(v) if v is not None else r.score


# --------------------------------------------------------------------------------------------
# Step histories: the VN ratio
# --------------------------------------------------------------------------------------------
def history(cl, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a run's metric, finite values only, by step."""
    try:
        hist = cl.get_metric_history(run_id, key)
    except Exception:  # noqa: BLE001 - a missing metric is no data
        return []
    return sorted((int(m.step), float(m.value)) for m in hist if math.isfinite(m.value))


@dataclass
class VnLine:
    """One run's VN ratios over its steps (positive values only: the figure is log scale)."""

    run: RunRow
    sample: list[tuple[int, float]]
    submit: list[tuple[int, float]]
    bound: float | None  # 1/kappa of the run's GAR, None when the rule has no known constant


@dataclass
class VnData:
    """What the VN figure draws: per attack, each GAR's best run under it (001 Figure 5 compares
    GARs under one attack, so panels never mix attacks)."""

    attacks: list[str]  # every attack with a trained run that logged the VN ratio
    panels: list[tuple[str, list[VnLine]]] = field(default_factory=list)  # (attack, lines); at most max_panels


def vn_data(cl, runs: list[RunRow], max_panels: int) -> VnData:
    best: dict[str, dict[str, RunRow]] = defaultdict(dict)
    for r in runs:
        if r.gar and r.score is not None and (schema.VN_SUBMIT in r.metrics or schema.VN_SAMPLE in r.metrics):
            cur = best[r.attack_label].get(r.gar)
            if cur is None or r.score > (cur.score or 0.0):
                best[r.attack_label][r.gar] = r
    data = VnData(sorted(best))
    for attack in data.attacks[:max_panels]:
        chosen = sorted(best[attack].values(), key=lambda r: -(r.score or 0.0))[:MAX_VN_RUNS]
        lines = []
        for r in chosen:
            h = {k: [(st, v) for st, v in history(cl, r.run_id, k) if v > 0] for k in (schema.VN_SAMPLE, schema.VN_SUBMIT)}
            if h[schema.VN_SAMPLE] or h[schema.VN_SUBMIT]:
                lines.append(VnLine(r, h[schema.VN_SAMPLE], h[schema.VN_SUBMIT], r.metrics.get(schema.VN_BOUND)))
        if lines:
            data.panels.append((attack, sorted(lines, key=lambda x: x.run.gar or "")))
    return data


def held_fraction(cl, r: RunRow) -> tuple[float, int] | None:
    """(share of steps where vn_submit < vn_bound, number of steps) of a run; None when the run
    has no known bound or no VN values. Read from the run's vn_bound_held_frac metric, or
    recomputed from its vn_submit history (stores written before that metric existed)."""
    bound = r.metrics.get(schema.VN_BOUND)
    if bound is None or not bound > 0 or schema.VN_SUBMIT not in r.metrics:
        return None
    hist = history(cl, r.run_id, schema.VN_SUBMIT)
    if not hist:
        return None
    frac = r.metrics.get(schema.VN_HELD_FRAC)
    if frac is None:
        frac = sum(v < bound for _, v in hist) / len(hist)
    return float(frac), len(hist)


@dataclass
class HeldRow:
    """Whether 001's robustness condition vn_submit < 1/kappa held in one run, and how often."""

    run: RunRow
    frac: float  # share of steps where it held
    steps: int


def held_rows(cl, runs: list[RunRow]) -> list[HeldRow]:
    out = []
    for r in runs:
        held = held_fraction(cl, r)
        if held is not None:
            out.append(HeldRow(r, *held))
    return out


# --------------------------------------------------------------------------------------------
# The accuracy-privacy front
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrontPoint:
    """One trial on the trade-off: total epsilon (min), objective (max), tolerated f (max; the
    run's param f)."""

    eps: float
    objective: float
    run: RunRow
    f: int = 0


@dataclass
class Frontier:
    """The trials that logged a total epsilon, and the non-dominated ones among them; with
    ``by_f`` (objective accuracy_eps_f) under three objectives, plus one (eps, objective) front
    per f level of the trials with at least that f (see tuneguard.tune.objectives)."""

    points: list[FrontPoint]
    front: list[FrontPoint]  # by eps; 2 objectives: the objective strictly increases along it
    by_f: bool = False
    levels: dict[int, list[FrontPoint]] = field(default_factory=dict)  # by_f: f -> front of trials with f' >= f


def maximises_f(objective_name: str | None) -> bool:
    """Whether a job's objective (its tuneguard.objective_name tag) maximises the tolerated f."""
    from tuneguard.tune.objectives import OBJECTIVES

    spec = OBJECTIVES.get(objective_name or "")
    return spec is not None and spec.maximises_f


def frontier(runs: list[RunRow], by_f: bool = False) -> Frontier:
    """Each trial (its representative run) that logged a total epsilon and has an objective, and
    the Pareto front of (eps_total min, objective max[, f max]) over them."""
    from tuneguard.tune.objectives import fronts_by_f, pareto_front, pareto_front_f

    pts = [FrontPoint(r.metrics[schema.EPS_TOTAL], float(objective_of(r) or 0.0), r, int(r.num("f") or 0))
           for r in representatives(runs) if schema.EPS_TOTAL in r.metrics and objective_of(r) is not None]
    if not by_f:
        return Frontier(pts, [p for _, _, p in pareto_front([(p.eps, p.objective, p) for p in pts])])
    quads = [(p.eps, p.objective, p.f, p) for p in pts]
    levels = {f: [q[3] for q in front] for f, front in fronts_by_f(quads).items()}
    return Frontier(pts, [q[3] for q in pareto_front_f(quads)], True, levels)


# --------------------------------------------------------------------------------------------
# The Optuna study
# --------------------------------------------------------------------------------------------
@dataclass
class SearchData:
    """The search, as the progress and importance figures need it."""

    where: str  # where the study came from, or why there is none (a sentence)
    objective: str  # the objective's name, for axis labels
    has_study: bool
    trials: list[tuple[int, float]] = field(default_factory=list)  # study: (number + 1, values[0]) of completed trials
    other: int = 0  # study trials pruned, failed or running
    reps: list[float] = field(default_factory=list)  # no study: the objective of each trial in start order
    importances: dict[str, float] | None = None
    importance_error: str | None = None  # why Optuna could not compute them


def load_study(source: Source, storage: str | None, study_name: str | None) -> tuple[Any | None, str]:
    """(the Optuna study, or None, and a sentence on where it came from or why there is none)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is None:
        rdir = source.parent.tags.get(schema.RESULTS_DIR) if source.parent else None
        if not rdir:
            why = ("these runs belong to no tune job" if source.parent is None
                   else "the job's run has no tuneguard.results_dir tag")
            return None, f"no Optuna study is recorded ({why}); pass --optuna-storage (and --study) to use one"
        db = Path(rdir) / "optuna.db"
        if not db.is_file():
            return None, (f"the job's results dir {rdir} holds no optuna.db (a grid job searches without Optuna, or "
                          "the results dir is on another machine)")
        storage = f"sqlite:///{db}"
        if study_name is None:
            try:
                study_name = json.loads((Path(rdir) / "job.json").read_text()).get("study_name")
            except (OSError, ValueError):
                study_name = None
            study_name = study_name or source.job
    try:
        if study_name is None:
            names = [s.study_name for s in optuna.study.get_all_study_summaries(storage)]
            if len(names) != 1:
                return None, f"{storage} holds {len(names)} studies ({', '.join(names) or 'none'}); pass --study NAME"
            study_name = names[0]
        return optuna.load_study(study_name=study_name, storage=storage), f"Optuna study {study_name!r} in {storage}"
    except Exception as err:  # noqa: BLE001 - a report without the study is still a report
        return None, f"could not load Optuna study {study_name!r} from {storage}: {type(err).__name__}: {err}"


def search_data(source: Source, storage: str | None, study_name: str | None) -> SearchData:
    """The study's completed trials (values[0] is the objective, accuracy, for single- and
    multi-objective studies alike) and Optuna's fANOVA importances for it; without a study, the
    MLflow trials' objectives in start order."""
    study, where = load_study(source, storage, study_name)
    data = SearchData(where, source.objective_name or "objective", study is not None)
    if study is None:
        reps = [r for r in representatives(source.runs) if objective_of(r) is not None]
        reps.sort(key=lambda r: r.start_time)
        data.reps = [float(objective_of(r)) for r in reps]
        return data
    import optuna

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.values]
    data.trials = [(t.number + 1, float(t.values[0])) for t in complete]
    data.other = len(trials) - len(complete)
    if len(complete) >= 2:
        try:
            data.importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(n_trees=32, seed=0),
                target=(lambda t: t.values[0]) if len(study.directions) > 1 else None)
        except Exception as err:  # noqa: BLE001 - e.g. a single distinct value per parameter
            data.importance_error = f"{type(err).__name__}: {err}"
    return data
