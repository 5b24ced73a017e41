"""The names tuneguard writes to MLflow: every ``tuneguard.*`` tag, every metric, and the filters
that find a job's runs. Writers (training, tune) and readers (export, report, ui, the Python API)
import these constants, so a name changes in one place and the two sides cannot drift.

Runs of a store::

    tune_job   one per ``tuneguard tune`` job (tags KIND=tune_job, JOB, RESULTS_DIR, ...)
    trial      one per (trial, attack, seed) of a job, nested under the job's run
    train      one per ``tuneguard train`` (a retrained export adds REPRODUCES_*)

The "why" metrics (paper 001, Theorem 1 and Eq. 37): a GAR F with constant kappa_F(n, f)
guarantees progress while the honest workers' VN ratio

    VN_t = sqrt(E||G - E G||^2) / ||E G||

stays below ``1 / kappa_F``. 001's finding is that DP noise keeps the submitted ratio above the
bound at every practical batch size. Per run tuneguard logs, at the end:

- VN_HELD_FRAC = #{t : vn_submit_t < vn_bound} / #{t}: the share of steps where the bound held;
- VN_OVER_BOUND per step = vn_submit_t / vn_bound (> 1: no guarantee), VN_OVER_BOUND_MEDIAN its
  median over the run;
- NOISE_SHARE per step = 1 - Var(sample) / Var(submit), the part of the submitted vectors' spread
  that the DP noise (and momentum) adds to the batch gradients' own; NOISE_SHARE_MEAN its mean.
"""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "tuneguard."

# ---- tags -----------------------------------------------------------------------------------
KIND = "tuneguard.kind"  # tune_job | trial | train
JOB = "tuneguard.job"  # the job id
TRIAL = "tuneguard.trial"  # the Ray Tune trial id
ATTACK = "tuneguard.attack"
SEED = "tuneguard.seed"
RUN_KEY = "tuneguard.run_key"  # which of a trial's runs (attack, seed)
OBJECTIVE_NAME = "tuneguard.objective_name"  # an entry of tuneguard.tune.objectives.OBJECTIVES
POINT = "tuneguard.point"  # the searched point, JSON
NODE = "tuneguard.node"  # the Ray node a trial ran on
STATUS = "tuneguard.status"  # FINISHED | DIVERGED | INFEASIBLE | EXCLUDED | INVALID | STOPPED | ...
MESSAGE = "tuneguard.message"
EXCLUDED = "tuneguard.excluded"
INFEASIBLE = "tuneguard.infeasible"
REPRESENTATIVE = "tuneguard.representative"  # "1" on the run that carries its trial's objective
TRIAL_OBJECTIVE = "tuneguard.trial_objective"
TRIAL_RESULT = "tuneguard.trial_result"  # the trial's final Tune report, JSON, on each of its runs
RESULTS_DIR = "tuneguard.results_dir"
SPACE = "tuneguard.space"
ORPHAN = "tuneguard.orphan"
ORPHAN_RUNS = "tuneguard.orphan_runs"
PLOT_ERROR = "tuneguard.plot_error"
ACTOR_RESTARTS = "tuneguard.actor_restarts"
ACTOR_RESTART_LOG = "tuneguard.actor_restart_log"
ACTORS_WARM = "tuneguard.actors_warm"
ACTOR_NODES = "tuneguard.actor_nodes"
ACTOR_STARTUP_S = "tuneguard.actor_startup_s"
ACTOR_TRANSPORT = "tuneguard.actor_transport"  # shared_memory | object_store | both, with step counts
ACTOR_POOL = "tuneguard.actor_pool"  # which pool of warm actors a run used (its name prefix)
BOUND_NEVER_HELD = "tuneguard.bound_never_held"  # on a job run: "1" when no run's bound ever held
REPRODUCES_JOB = "tuneguard.reproduces_job"  # on a retrained run: the job, trial and run it reproduces
REPRODUCES_TRIAL = "tuneguard.reproduces_trial"
REPRODUCES_RUN = "tuneguard.reproduces_run"
BEST_MODEL_RUN = "tuneguard.best_model_run"  # on a job run: the run whose model is logged

KIND_TUNE_JOB = "tune_job"
KIND_TRIAL = "trial"
KIND_TRAIN = "train"

# MLflow's own tag that makes the UI open an experiment on its classic runs view (MLflow 3
# otherwise may open a new experiment in the GenAI view); value "custom_model_development".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"

# ---- metrics --------------------------------------------------------------------------------
OBJECTIVE = "objective"
CROSS_ACCURACY = "cross_accuracy"
# One name for one quantity: the running max of the cross-accuracy, per step; its last value is
# the run's best (001 Figure 2). Stores written before this module also hold LEGACY_BEST.
MAX_CROSS_ACCURACY = "max_cross_accuracy"
LEGACY_BEST_CROSS_ACCURACY = "best_cross_accuracy"
FINAL_CROSS_ACCURACY = "final_cross_accuracy"
EPS_SPENT = "eps_spent"
EPS_TOTAL = "eps_total"  # a trial's privacy cost: max over its runs of eps_spent (accuracy_vs_eps)
# A trial's robustness: the Byzantine workers f its config trained against (accuracy_eps_f
# maximises it; 0 for a trial that did not train). On MLflow runs it is the param ``f``.
F_TOLERATED = "f_tolerated"
RUN_SECONDS = "run_seconds"
ACTOR_RESTARTS_METRIC = "actor_restarts"
VN_SAMPLE = "vn_sample"
VN_SUBMIT = "vn_submit"
VN_BOUND = "vn_bound"
VN_OVER_BOUND = "vn_submit_over_bound"
VN_OVER_BOUND_MEDIAN = "vn_submit_over_bound_median"
VN_HELD_FRAC = "vn_bound_held_frac"
NOISE_SHARE = "noise_share"
NOISE_SHARE_MEAN = "noise_share_mean"


def best_accuracy(metrics: dict[str, float]) -> float | None:
    """A run's max cross-accuracy from its latest metrics (old stores: the legacy name)."""
    for key in (MAX_CROSS_ACCURACY, LEGACY_BEST_CROSS_ACCURACY):
        if key in metrics:
            return metrics[key]
    return None


# ---- query helpers --------------------------------------------------------------------------
def _q(value: str) -> str:
    return str(value).replace("'", "\\'")


def tag_filter(**tags: str | None) -> str:
    """An MLflow ``filter_string`` on tuneguard tags: ``tag_filter(job="x", kind="trial")`` is
    ``tags.`tuneguard.job` = 'x' and tags.`tuneguard.kind` = 'trial'`` (None values are left out;
    backticks because the keys hold dots)."""
    parts = [f"tags.`{PREFIX}{k}` = '{_q(v)}'" for k, v in tags.items() if v is not None]
    return " and ".join(parts)


def job_runs_filter(job: str, kind: str | None = KIND_TRIAL, trial: str | None = None) -> str:
    return tag_filter(job=job, kind=kind, trial=trial)


def names() -> Iterable[str]:
    """Every tag name this module owns (a test checks no other ``tuneguard.*`` literal exists)."""
    return [v for k, v in globals().items() if k.isupper() and isinstance(v, str) and v.startswith(PREFIX)]


# ---- run names ------------------------------------------------------------------------------
def _lr(lr: float) -> str:
    return f"{lr:.2f}" if lr >= 0.01 else f"{lr:.2g}"


def run_name(cfg, *, seed: bool = False) -> str:
    """What a run is called in the MLflow UI: the searched quantities a user compares, in the
    order of 001's Figure 2 panels, e.g. ``median b=126 lr=0.10 little eps=4`` (the privacy budget
    last; ``+ s2`` with ``seed``, for spaces with several seeds). ``cfg`` is an :class:`~tuneguard.config.ExperimentConfig`."""
    attack = cfg.attack.name if cfg.f else "no-attack"
    name = f"{cfg.gar.name} b={cfg.batch_size} lr={_lr(cfg.lr)} {attack}"
    p = cfg.privacy  # the privacy side, so trials of an accuracy-privacy search differ by name
    if p.mode == "total":
        name += f" eps={p.total_eps:g}"
    elif p.mode == "per_step":
        name += f" eps={p.eps:g}/step"
    elif p.mode == "noise" and p.sigma is not None:
        name += f" sigma={p.sigma:g}"
    return f"{name} s{cfg.seed}" if seed else name
