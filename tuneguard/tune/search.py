"""A tune job: a search space -> Ray Tune (OptunaSearch or a grid, optional ASHA) -> MLflow.

One job is::

    results dir  $TUNEGUARD_HOME/tune/<job id>/   (absolute; --results-dir to choose)
        job.json       job id, tracking URI, MLflow parent run, study name, settings
        space.yaml     the space file as given (resume reads it back)
        optuna.db      the Optuna study (RDBStorage, SQLite), study name = job id
        tune/          the Ray Tune experiment (Tuner.restore reads it)
    MLflow             one parent run (tags tuneguard.kind=tune_job, tuneguard.job=<id>) in the
                       experiment ``base.name``; one child run per trial and attack (and seed)

Search: optuna mode uses ``OptunaSearch`` with a define-by-run space (conditional parameters)
and a seeded ``TPESampler(multivariate=True, group=True)``; grid mode runs every valid point of
the grid(s) once (``tune.grid_search`` over the validated points, no Optuna). ``scheduler:
asha`` adds ``ASHAScheduler`` on the objective, in evaluation reports.

Resources: a trial with ``engine: local`` reserves one bundle of ``tune.cpus_per_trial`` CPUs
(default 1); with ``engine: actors`` it reserves :func:`tuneguard.training.actors.trial_resources`
(bundle 0 for the trial, one per actor). Concurrency defaults to ``max(1, cluster CPUs // CPUs per
trial)``; ``tune.concurrency`` or ``--concurrency`` caps it.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tuneguard.results import schema
from tuneguard.tune.driver import DriverSettings
from tuneguard.tune.objective import JobContext
from tuneguard.tune.space import Space, SpaceError, n_reports

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 must mean quiet; we draw our own view
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Snapshot the experiment state every 2 s (Ray's "auto" waits >= 10 s): after a killed driver,
# Tune restores the last snapshot, and trials started after it are lost (see reconcile_runs).
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
# Tune logs every trial's traceback; a job prints the first error once (FailureGuard, summary).
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")

TUNE_DIR = "tune"
JOB_FILE = "job.json"
SPACE_FILE = "space.yaml"
OPTUNA_FILE = "optuna.db"


class ResumeError(ValueError):
    """A results dir that cannot be resumed; the message says why."""


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def default_results_dir(job_id: str) -> Path:
    from tuneguard.tracking import tuneguard_home

    return tuneguard_home() / "tune" / job_id


@dataclass
class JobInfo:
    """What job.json holds."""

    job_id: str
    results_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    study_name: str
    space_path: str | None
    created: float
    checkpoint_every: int
    total_trials: int
    digest: str | None = None  # of the files tuneguard writes once (see tune/jobfile.py)

    def save(self) -> None:
        from tuneguard.tracking import mask_uri

        data = {**asdict(self), "tracking_uri": mask_uri(self.tracking_uri)}  # no credentials on disk
        Path(self.results_dir, JOB_FILE).write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, results_dir: Path) -> JobInfo:
        from tuneguard.tune.jobfile import read_job_json

        return cls(**read_job_json(results_dir))


@dataclass
class JobSummary:
    job_id: str
    results_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: int
    completed: int
    errored: int
    infeasible: int
    excluded: int
    best_objective: float | None
    best_config: dict[str, Any] | None
    best_run_id: str | None
    seconds: float
    interrupted: bool = False
    stopped: int = 0  # reported but did not finish: stopped early by ASHA, or cut by an interrupt
    scheduler: str = "none"
    failed: bool = False  # no trial completed and at least one failed: the job failed
    first_error: str | None = None  # the first failed trial's error (its last traceback line)
    first_error_trial: str | None = None
    stop_reason: str | None = None  # why the job stopped before its last trial, if it did
    bound_never_held: bool | None = None  # no run kept vn_submit < 1/kappa (001's finding); None: unknown


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------
class _SpaceFromText:
    """Holds a space as its YAML text and parses it lazily: these callables are pickled (into
    the searcher state, to Tune's trial runners), and the text pickles small and safely."""

    def __init__(self, space_text: str, space_path: str | None):
        self.space_text = space_text
        self.space_path = space_path
        self._space: Space | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"space_text": self.space_text, "space_path": self.space_path, "_space": None}

    @property
    def space(self) -> Space:
        if self._space is None:
            self._space = Space.from_text(self.space_text, self.space_path)
        return self._space


class DefineByRun(_SpaceFromText):
    """Optuna define-by-run space (picklable: OptunaSearch pickles it in its searcher state)."""

    def __call__(self, trial) -> dict[str, Any]:
        point: dict[str, Any] = {}
        consts: dict[str, Any] = {}
        for p in self.space.params:
            if not p.active(point):
                continue
            if p.kind == "const":
                point[p.name] = p.values[0]
                consts[p.name] = self.space.encode({p.name: p.values[0]})[p.name]
            else:
                label = p.suggest(trial)
                point[p.name] = p.decode(label)
        return consts


class TrialResources(_SpaceFromText):
    """``tune.with_resources`` callable: the placement group of one trial's config."""

    def __call__(self, config: dict[str, Any]):
        from ray.tune import PlacementGroupFactory

        space = self.space
        try:
            specs = space.runs(space.decode(config.get("point", config)))
        except (ValueError, KeyError):
            specs = []
        if specs and specs[0].cfg.engine == "actors":
            from tuneguard.training.actors import trial_resources

            # The runs of an actors trial go one after another through the same warm actors.
            return trial_resources(specs[0].cfg, trial_cpus=space.tune.cpus_per_trial)
        return PlacementGroupFactory([{"CPU": space.tune.cpus_per_trial}])


def absolute_uri(uri: str) -> str:
    """A SQLite URI with an absolute path (Tune runs trials in their own working directories)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def cpus_of(pgf) -> float:
    return float(sum(b.get("CPU", 0.0) for b in pgf.bundles))


def default_checkpoint_every(space: Space) -> int:
    """~4 checkpoints per run, on evaluation steps (a checkpoint rides on the next report)."""
    if space.tune.checkpoint_every:
        return space.tune.checkpoint_every
    cfg = space.representative_config()
    evals = max(1, n_reports(cfg.steps, cfg.eval_every))
    return cfg.eval_every * max(1, evals // 4)


def _trainable(space: Space, job: JobContext):
    from ray import tune

    from tuneguard.tune.objective import trial

    return tune.with_resources(tune.with_parameters(trial, job=job), TrialResources(space.text, space.path))


def _concurrency(space: Space, override: int | None) -> tuple[int, float, float]:
    """(concurrency, cluster CPUs, CPUs per trial)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    cfg = space.representative_config()
    sample = space.encode(space.report.points[0]) if space.tune.mode == "grid" and space.report and space.report.points else {}
    per_trial = cpus_of(TrialResources(space.text, space.path)({"point": sample} if sample else {})) if sample else None
    if per_trial is None:
        if cfg.engine == "actors":
            from tuneguard.training.actors import trial_resources

            per_trial = cpus_of(trial_resources(cfg, trial_cpus=space.tune.cpus_per_trial))
        else:
            per_trial = space.tune.cpus_per_trial
    auto = max(1, int(cpus // per_trial + 1e-9))
    chosen = override or space.tune.concurrency or auto
    return max(1, min(chosen, space.total_trials())), cpus, per_trial


def _search_alg(space: Space, results_dir: Path, study_name: str):
    if space.tune.mode == "grid":
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    n = space.num_samples
    startup = space.tune.n_startup_trials or max(2, min(10, n // 2))
    import warnings

    spec = space.objective
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if spec.multi:
            # Multi-objective TPE (MOTPE): Optuna's multivariate/group TPE is single-objective only.
            sampler = optuna.samplers.TPESampler(seed=space.tune.seed, n_startup_trials=startup)
        else:
            sampler = optuna.samplers.TPESampler(seed=space.tune.seed, multivariate=True, group=True,
                                                 n_startup_trials=startup)
    storage = optuna.storages.RDBStorage(f"sqlite:///{results_dir / OPTUNA_FILE}")
    # A list of metrics and modes makes Ray's OptunaSearch create a study with one direction each.
    return ResumableOptunaSearch(DefineByRun(space.text, space.path), metric=spec.search_metric(),
                                 mode=spec.search_mode(), sampler=sampler, storage=storage, study_name=study_name)


try:  # a module-level class, so the searcher state pickles
    from ray.tune.search.optuna import OptunaSearch as _OptunaSearch
except ImportError:  # pragma: no cover - optuna missing
    _OptunaSearch = object  # type: ignore[assignment,misc]


class ResumableOptunaSearch(_OptunaSearch):  # type: ignore[misc,valid-type]
    """OptunaSearch that survives a killed driver.

    - Every Optuna trial carries its Tune trial id (user attribute ``TRIAL_ATTR``), written to
      the study when it is asked, so a result can find its Optuna trial whatever the searcher's
      pickled state missed.
    - After the driver dies, Tune restores its last experiment snapshot; a trial that finished
      after it runs again (it re-reports its stored result, see objective.py) while the study
      already holds it as COMPLETE. Optuna refuses to update a finished trial; that report is
      then ignored instead of failing the job.
    - A restored trial the searcher's snapshot does not know is looked up in the study by its
      Tune trial id instead of raising ``KeyError``.
    """

    def suggest(self, trial_id: str):
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr(TRIAL_ATTR, trial_id)
        return params

    def _known(self, trial_id: str) -> bool:
        if trial_id in self._ot_trials:
            return True
        import optuna

        for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.user_attrs.get(TRIAL_ATTR) == trial_id:
                self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, t._trial_id)
                return True
        return False

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        import optuna

        if not self._known(trial_id):
            return
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Link the Optuna trial to what users see elsewhere (optuna-dashboard shows user
        attributes): the tuneguard (Ray Tune) trial id, its MLflow run ids and the run that
        carries its score."""
        if not self._known(trial_id):
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in getattr(self, "_completed_trials", set()):
            try:
                ot_trial.set_user_attr(TRIAL_ATTR, trial_id)
                if result:
                    ot_trial.set_user_attr("mlflow_run_ids", str(result.get("run_ids", "")))
                    ot_trial.set_user_attr("mlflow_best_run_id", str(result.get("best_run_id", "")))
            except Exception:  # noqa: BLE001 - a finished (replayed) trial takes no attributes
                pass
        super().on_trial_complete(trial_id, result, error)


TRIAL_ATTR = "tuneguard_trial"  # Optuna user attribute: the Tune trial id


def close_stale_study_trials(results_dir: Path, study_name: str,
                             finished: dict[str, float | list[float]] | None = None) -> int:
    """Close the Optuna trials still RUNNING once a job has ended. One whose Tune trial finished
    (``finished``: Tune trial id -> its value, or values for a multi-objective study) gets them: its result reached Tune but not
    the study (the driver died between the two). The others were asked by a driver that died
    before Tune recorded them, so never evaluated: FAIL. Returns how many were closed."""
    import optuna

    path = results_dir / OPTUNA_FILE
    if not path.exists():
        return 0
    finished = finished or {}
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{path}")
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        value = finished.get(t.user_attrs.get(TRIAL_ATTR, ""))
        if value is not None:
            study.tell(t.number, value)
        else:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def _scheduler(space: Space):
    if space.tune.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    cfg = space.representative_config()
    reports = n_reports(cfg.steps, cfg.eval_every)
    return ASHAScheduler(time_attr="training_iteration", max_t=2 * reports + 2,
                         grace_period=space.tune.asha.grace_period, reduction_factor=space.tune.asha.reduction_factor)


def _param_space(space: Space) -> dict[str, Any]:
    if space.tune.mode != "grid":
        return {}
    from ray import tune

    assert space.report is not None and space.report.points is not None
    return {"point": tune.grid_search([space.encode(p) for p in space.report.points])}


def _callbacks(space: Space, info: JobInfo, driver: DriverSettings):
    from tuneguard.tune.progress import JobTracker, ProgressView

    return [JobTracker(info.tracking_uri, info.parent_run_id, space.text, space.path),
            ProgressView(space.text, space.path, info.job_id, info.total_trials, driver)]


def ran_to_the_end(grid, total: int) -> bool:
    """Whether Tune ran all ``total`` trials of a job to the end (TERMINATED or ERROR), read from
    the ``ResultGrid`` of ``fit()`` (after a restore it holds the restored trials too). Ctrl-C
    or SIGTERM makes ``fit()`` return early, with trials still pending or running."""
    return grid is not None and len(grid) >= total and grid.num_terminated + grid.num_errors == len(grid)


def tune_trial_ids(grid) -> set[str] | None:
    """The Tune trial ids of a job's ``ResultGrid`` (every result carries ``trial_id``, reported or
    not); None when unknown."""
    if grid is None:
        return None
    ids = {(r.metrics or {}).get("trial_id") for r in grid}
    return None if None in ids else {str(i) for i in ids}


# --------------------------------------------------------------------------------------------
# Start and resume
# --------------------------------------------------------------------------------------------
def start_job(
    space: Space,
    *,
    tracking_uri: str | None = None,
    results_dir: str | Path | None = None,
    address: str | None = None,
    concurrency: int | None = None,
    progress: bool = True,
    console=None,
    num_cpus: int | None = None,
) -> JobSummary:
    """Validate (if not yet), create the job (results dir, MLflow parent run) and run it."""
    from tuneguard.tracking import RunTracker, resolve_tracking_uri

    env_dir = os.environ.get("TUNEGUARD_DATA_DIR")
    if env_dir and not Path(env_dir).expanduser().is_absolute():
        # Trials run in their own working dirs; a Ray cluster started after this inherits it.
        os.environ["TUNEGUARD_DATA_DIR"] = str(Path(env_dir).expanduser().resolve())
    data_dir = space.base.get("data_dir")
    if isinstance(data_dir, str) and not Path(data_dir).expanduser().is_absolute():
        # Tune runs each trial in its own directory: a relative path would not resolve there.
        space = Space.from_text(space.text, space.path, [f"base.data_dir={Path(data_dir).expanduser().resolve()}"])
    if space.report is None:
        space.validate()
    job_id = new_job_id()
    rdir = Path(results_dir).expanduser().resolve() if results_dir else default_results_dir(job_id)
    if (rdir / JOB_FILE).exists():
        raise SpaceError(f"{rdir} already holds a tune job; resume it with --resume {rdir} or choose another --results-dir")
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / SPACE_FILE).write_text(space.text)
    uri = absolute_uri(resolve_tracking_uri(tracking_uri))
    parent = RunTracker(space.name, tracking_uri=uri, run_name=f"tune-{job_id}",
                        tags={schema.KIND: schema.KIND_TUNE_JOB, schema.JOB: job_id,
                              schema.SPACE: Path(space.path).name if space.path else "space.yaml",
                              schema.OBJECTIVE_NAME: space.tune.objective,
                              schema.RESULTS_DIR: str(rdir), schema.STATUS: "RUNNING",
                              "mlflow.note.content": _note(space, job_id, rdir)})
    try:
        parent.log_params(space.flat_params())
        parent.log_text(space.text, "space.yaml")
        parent.log_dict({"scenario": space.scenario.model_dump(), "objective": space.tune.objective,
                         "attack_set": space.attack_set, "seeds": space.seeds, "mode": space.tune.mode,
                         "total_trials": space.total_trials()}, "scenario.json")
        assert space.report is not None
        parent.log_text("\n".join(space.report.lines(space.tune.mode)) + "\n", "validation.txt")
        info = JobInfo(job_id=job_id, results_dir=str(rdir), tracking_uri=uri, experiment=space.name,
                       parent_run_id=parent.run_id, study_name=job_id, space_path=space.path, created=time.time(),
                       checkpoint_every=default_checkpoint_every(space), total_trials=space.total_trials())
        info.save()
    except KeyboardInterrupt:
        parent.end_quietly("KILLED", "interrupted before the first trial")
        raise
    except BaseException as err:
        parent.end_quietly("FAILED", f"{type(err).__name__}: {err}")
        raise
    return _run(space, info, address=address, concurrency=concurrency, progress=progress, console=console,
                num_cpus=num_cpus, restore=False)


def resume_job(
    results_dir: str | Path,
    *,
    tracking_uri: str | None = None,
    address: str | None = None,
    concurrency: int | None = None,
    progress: bool = True,
    console=None,
    num_cpus: int | None = None,
) -> JobSummary:
    """Continue an interrupted job: finished trials are kept, unfinished and errored ones resume
    from their checkpoints (same MLflow runs), the Optuna study and searcher state carry on."""
    rdir = Path(results_dir).expanduser().resolve()
    info = JobInfo.load(rdir)
    _check_resumable(rdir, info, tracking_uri)
    if tracking_uri:
        info.tracking_uri = absolute_uri(tracking_uri)
    space = Space.from_text((rdir / SPACE_FILE).read_text(), info.space_path)
    space.validate()
    from ray.tune import Tuner

    if not Tuner.can_restore(str(rdir / TUNE_DIR)):
        raise ResumeError(f"{rdir / TUNE_DIR} holds no Tune experiment state (the job stopped before its first "
                          "trial started); start the job again with `tuneguard tune SPACE.yaml`")
    from tuneguard.tracking import client, mask_uri
    from tuneguard.tune.jobfile import close_stale_runs

    try:
        client(info.tracking_uri).get_run(info.parent_run_id)
    except Exception as err:  # noqa: BLE001
        raise ResumeError(f"the job's MLflow run {info.parent_run_id} is not in {mask_uri(info.tracking_uri)}: "
                          f"{str(err)[:300]}; pass the store it used with --tracking-uri") from None
    # Runs a killed driver left RUNNING end KILLED; trials that resume reopen theirs.
    close_stale_runs(info.tracking_uri, info.experiment, info.job_id, "KILLED",
                     "left RUNNING by an interrupted driver; closed by --resume")
    client(info.tracking_uri).update_run(info.parent_run_id, status="RUNNING")
    return _run(space, info, address=address, concurrency=concurrency, progress=progress, console=console,
                num_cpus=num_cpus, restore=True)


def _check_resumable(rdir: Path, info: JobInfo, tracking_uri: str | None) -> None:
    """Refuse a dir tuneguard did not write (digest, see tune/jobfile.py), and a masked URI."""
    from tuneguard.tune.jobfile import check_digest

    check_digest(rdir, info.digest)
    if "***@" in info.tracking_uri and not tracking_uri:
        raise ResumeError(f"the job's tracking URI {info.tracking_uri} held credentials, which job.json does not "
                          "keep; pass it again with --tracking-uri")


def _run(space: Space, info: JobInfo, *, address, concurrency, progress, console, num_cpus,
         restore: bool) -> JobSummary:
    """:func:`_run_job`; on an error the job's MLflow runs end FAILED (KILLED when interrupted),
    never RUNNING."""
    from tuneguard.tune.jobfile import close_stale_runs

    try:
        summary = _run_job(space, info, address=address, concurrency=concurrency, progress=progress,
                           console=console, num_cpus=num_cpus, restore=restore)
    except KeyboardInterrupt:
        _end_job_run(info, "KILLED", "INTERRUPTED")
        close_stale_runs(info.tracking_uri, info.experiment, info.job_id, "KILLED", "the tune driver was interrupted")
        raise
    except BaseException as err:
        _end_job_run(info, "FAILED", "FAILED", f"{type(err).__name__}: {err}")
        close_stale_runs(info.tracking_uri, info.experiment, info.job_id, "FAILED",
                         f"the tune driver failed: {type(err).__name__}: {err}")
        raise
    if summary.interrupted:  # trials cut by Ctrl-C / SIGTERM: their processes are gone
        close_stale_runs(info.tracking_uri, info.experiment, info.job_id, "KILLED",
                         "the tune job was interrupted; --resume continues this run")
    return summary


def _end_job_run(info: JobInfo, status: str, tag: str, message: str = "") -> None:
    try:
        from tuneguard.tracking import client

        cl = client(info.tracking_uri)
        cl.set_tag(info.parent_run_id, schema.STATUS, tag)
        if message:
            cl.set_tag(info.parent_run_id, schema.MESSAGE, message[:4000])
        cl.set_terminated(info.parent_run_id, status=status)
    except Exception:  # noqa: BLE001 - the original error is what matters
        pass


def _run_job(space: Space, info: JobInfo, *, address, concurrency, progress, console, num_cpus,
             restore: bool) -> JobSummary:
    from ray import tune
    from ray.tune import Tuner

    from tuneguard.raycluster import connect
    from tuneguard.tracking import client

    rdir = Path(info.results_dir)
    job = JobContext(job_id=info.job_id, tracking_uri=info.tracking_uri, parent_run_id=info.parent_run_id,
                     experiment=info.experiment, space_text=space.text, space_path=space.path,
                     checkpoint_every=info.checkpoint_every)
    from tuneguard.tune.cluster import (
        datasets_of,
        job_env,
        preflight,
        ship_datasets,
    )
    from tuneguard.tune.failures import FailureGuard

    start = time.time()
    env_dir = os.environ.get("TUNEGUARD_DATA_DIR")
    if env_dir and not Path(env_dir).expanduser().is_absolute():  # trials run in their own dirs
        os.environ["TUNEGUARD_DATA_DIR"] = str(Path(env_dir).expanduser().resolve())
    # Trials and actors may run on other nodes, in processes that never saw this shell: they get
    # its TUNEGUARD_* / MLFLOW_* settings through the job's runtime_env.
    conn = connect(address, num_cpus=num_cpus, logging_level="ERROR", runtime_env={"env_vars": job_env()})
    interrupted = False
    grid = None
    guard = FailureGuard(space.tune.stop_after_identical_failures)
    try:
        pairs = datasets_of(space)
        if console is not None and space.tune.ship_data:
            console.print("[dim]shipping the data through Ray's object store (tune.ship_data)[/]")
        # Raises PreflightError before any trial starts; _run then ends the job run FAILED.
        preflight([] if space.tune.ship_data else pairs, info.tracking_uri)
        if space.tune.ship_data:
            job = replace(job, data_refs=ship_datasets(space))
        conc, cluster_cpus, per_trial = _concurrency(space, concurrency)
        if console is not None:
            console.print(f"[dim]ray: {cluster_cpus:g} CPUs, {per_trial:g} per trial -> up to {conc} trial(s) at once; "
                          f"engine {space.representative_config().engine}[/]")
        trainable = _trainable(space, job)
        # Ray is up by now and has put its own SIGTERM handler in place: restore the CLI's
        # (SIGTERM stops the job like Ctrl-C, see tuneguard/cli/signals.py).
        from tuneguard.cli.signals import reassert

        reassert()
        callbacks = [*_callbacks(space, info, DriverSettings(console, progress, conc)), guard]
        run_config = tune.RunConfig(
            name=TUNE_DIR, storage_path=str(rdir), verbose=0, callbacks=callbacks, stop=guard,
            failure_config=tune.FailureConfig(max_failures=space.tune.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        )
        if restore:
            # The run config comes back from the experiment state; its callbacks unpickle as
            # these, this driver's own (see tuneguard/tune/driver.py).
            from tuneguard.tune.driver import restoring

            with restoring(callbacks):
                tuner = Tuner.restore(str(rdir / TUNE_DIR), trainable=trainable, resume_errored=True)
        else:
            tuner = Tuner(
                trainable,
                param_space=_param_space(space),
                tune_config=tune.TuneConfig(
                    metric="objective", mode="max", search_alg=_search_alg(space, rdir, info.study_name),
                    scheduler=_scheduler(space), num_samples=space.num_samples, max_concurrent_trials=conc,
                    # A finished trial's process runs the next one: no new torch import, the dataset
                    # stays loaded (data.load_dataset caches it per process) and, with the actor
                    # engine, so do the trial's actors (warm pool). Not with ASHA: a stopped trial's
                    # process is still inside tune.report and cannot be reset.
                    reuse_actors=space.tune.scheduler == "none",
                ),
                run_config=run_config,
            )
            # Tune wrote tune/tuner.pkl just now, once: record what --resume may unpickle.
            from tuneguard.tune.jobfile import job_digest

            info.digest = job_digest(rdir)
            info.save()
        try:
            grid = tuner.fit()
        except KeyboardInterrupt:
            interrupted = True
        # Ctrl-C: Tune saves its state and returns normally, with unfinished trials.
        # A job the failure guard stopped is finished (failed), not interrupted.
        interrupted = interrupted or (not ran_to_the_end(grid, info.total_trials) and guard.reason is None)
    finally:
        conn.close()
    if not interrupted:
        if space.tune.mode == "optuna":
            close_stale_study_trials(rdir, info.study_name, _finished_values(grid, space.objective.search_metric()))
        trial_ids = tune_trial_ids(grid)
        if trial_ids is not None:
            reconcile_runs(info, trial_ids)
    summary = _summarise(space, info, grid, time.time() - start, interrupted)
    summary.stop_reason = guard.reason
    if guard.first is not None and summary.first_error is None:
        from tuneguard.tune.failures import headline

        summary.first_error_trial, summary.first_error = guard.first[0], headline(guard.first[1])
    summary.failed = not interrupted and summary.completed == 0 and (summary.errored > 0 or guard.reason is not None)
    status = "INTERRUPTED" if interrupted else "FAILED" if summary.failed else "FINISHED"
    cl = client(info.tracking_uri)
    try:
        cl.set_tag(info.parent_run_id, schema.STATUS, status)
        if summary.failed or summary.stop_reason:
            cl.set_tag(info.parent_run_id, schema.MESSAGE,
                       (summary.stop_reason or f"every trial failed; the first: {summary.first_error}")[:4000])
        from tuneguard.tracking import mask_uri

        summary.bound_never_held = bound_verdict(cl, info)
        if summary.bound_never_held is not None:
            cl.set_tag(info.parent_run_id, schema.BOUND_NEVER_HELD, "1" if summary.bound_never_held else "0")
        cl.log_dict(info.parent_run_id, {**asdict(summary), "tracking_uri": mask_uri(summary.tracking_uri)},
                    "summary.json")
        if space.tune.log_best_model and summary.best_run_id and not interrupted:
            log_best_model(cl, info, summary.best_run_id)
        cl.set_terminated(info.parent_run_id, status={"INTERRUPTED": "KILLED"}.get(status, status))
    except Exception:  # noqa: BLE001 - the summary must still print
        pass
    return summary


def _finished_values(grid, metric: str | list[str]) -> dict[str, float | list[float]]:
    """Tune trial id -> the values its study trial takes (the searcher's ``metric``, a list for a
    multi-objective space), for the trials that reported their end."""
    names = metric if isinstance(metric, list) else [metric]
    out: dict[str, float | list[float]] = {}
    for r in grid or ():
        m = r.metrics or {}
        if m.get("trial_done") and m.get("trial_id") is not None and all(m.get(k) is not None for k in names):
            values = [float(m[k]) for k in names]
            out[str(m["trial_id"])] = values if isinstance(metric, list) else values[0]
    return out


def log_best_model(cl, info: JobInfo, run_id: str) -> None:
    """Log the job's best model with ``mlflow.pytorch`` (artifact ``model`` of its best run; the
    job run's tag ``tuneguard.best_model_run`` points at it). Trials keep no weights, so the best
    run's exact config is retrained here on the local engine: same seed, same numbers (DESIGN,
    "one step, one source of truth"), one run's cost at the end of a job. Never fails the job."""
    try:
        import mlflow
        import mlflow.pytorch
        import torch

        from tuneguard.config import build_config
        from tuneguard.results.export import run_config
        from tuneguard.training import train

        cfg = build_config({**run_config(cl, run_id), "engine": "local"})
        res = train(cfg, track=False, keep_model=True, plots=False)
        if res.model is None:
            return
        mlflow.set_tracking_uri(info.tracking_uri)
        mlflow.start_run(run_id=run_id)
        try:
            # Explicit requirements: MLflow would otherwise load the model in a subprocess to infer
            # them. "pickle", not MLflow 3's default pt2 (torch.export): ~1.7 s instead of ~7 s here,
            # and load_model gives back the same nn.Module class.
            import logging

            # MLflow warns about pickle on every save; the choice is deliberate (above).
            log = logging.getLogger("mlflow.pytorch")
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                mlflow.pytorch.log_model(res.model.cpu(), name="model", serialization_format="pickle",
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
            finally:
                log.setLevel(level)
        finally:  # the run keeps its own outcome (FINISHED), whatever happened to the logging
            mlflow.end_run(status="FINISHED")
        cl.set_tag(info.parent_run_id, schema.BEST_MODEL_RUN, run_id)
    except Exception as err:  # noqa: BLE001 - the job's results stand without the model
        cl.set_tag(info.parent_run_id, schema.BEST_MODEL_RUN, f"not logged: {type(err).__name__}: {err}"[:500])


def bound_verdict(cl, info: JobInfo) -> bool | None:
    """Whether the VN bound never held in any run of the job (001's finding under DP: the GAR's
    robustness condition vn_submit < 1/kappa fails at every step); None when no run has a bound."""
    exp = cl.get_experiment_by_name(info.experiment)
    if exp is None:
        return None
    fracs = [r.data.metrics[schema.VN_HELD_FRAC]
             for r in cl.search_runs([exp.experiment_id], filter_string=schema.job_runs_filter(info.job_id),
                                     max_results=50_000)
             if schema.VN_HELD_FRAC in r.data.metrics]
    return None if not fracs else all(f == 0 for f in fracs)


def reconcile_runs(info: JobInfo, trial_ids: set[str]) -> tuple[int, int]:
    """MLflow runs of trials Tune does not know: a killed driver's trials that started after its
    last experiment snapshot (their Tune records are lost; the searcher suggests again). An
    unfinished one is deleted (MLflow soft delete); one that finished (its result is stored) is
    kept and tagged ``tuneguard.orphan = 1``. Returns (deleted, kept)."""
    from tuneguard.tracking import client

    deleted = kept = 0
    try:
        cl = client(info.tracking_uri)
        exp = cl.get_experiment_by_name(info.experiment)
        if exp is None:
            return 0, 0
        flt = schema.job_runs_filter(info.job_id)
        for run in cl.search_runs([exp.experiment_id], filter_string=flt, max_results=50_000):
            if run.data.tags.get(schema.TRIAL) in trial_ids:
                continue
            from tuneguard.tune.objective import RESULT_TAG

            if RESULT_TAG in run.data.tags:
                cl.set_tag(run.info.run_id, schema.ORPHAN, "1")
                kept += 1
            else:
                cl.delete_run(run.info.run_id)
                deleted += 1
        if deleted or kept:
            cl.set_tag(info.parent_run_id, schema.ORPHAN_RUNS, f"deleted {deleted} unfinished, kept {kept} finished")
    except Exception:  # noqa: BLE001 - bookkeeping must not fail the job
        pass
    return deleted, kept


def _summarise(space: Space, info: JobInfo, grid, seconds: float, interrupted: bool) -> JobSummary:
    from tuneguard.tune.trial_report import TrialReport

    completed = errored = infeasible = excluded = stopped = 0
    first_error: str | None = None
    best: tuple[float, dict, str] | None = None
    trials = 0
    if grid is not None:
        for r in grid:
            trials += 1
            m = r.metrics or {}
            if r.error is not None:
                errored += 1
                if first_error is None:
                    from tuneguard.tune.failures import headline

                    first_error = headline(str(r.error))
                continue
            rep = TrialReport.of(m)
            if rep.trial_done:
                completed += 1
            elif m:
                stopped += 1
            infeasible += int(rep.infeasible or 0)
            excluded += int(rep.excluded or 0)
            if rep.scored and (best is None or rep.objective > best[0]):
                best = (rep.objective, space.decode((r.config or {}).get("point", r.config or {})), rep.best_run_id)
    return JobSummary(info.job_id, info.results_dir, info.tracking_uri, info.experiment, info.parent_run_id, trials,
                      completed, errored, infeasible, excluded, best[0] if best else None, best[1] if best else None,
                      best[2] if best else None, seconds, interrupted, stopped, space.tune.scheduler,
                      first_error=first_error)


def _note(space: Space, job_id: str, rdir: Path) -> str:
    lines = [f"tuneguard tune job `{job_id}`", "", *[f"    {x}" for x in space.describe()], "",
             f"Results dir: `{rdir}`", f"Resume: `tuneguard tune --resume {rdir}`",
             f"Export the best config: `tuneguard export --job {job_id} -o best.yaml`"]
    return "\n".join(lines)
