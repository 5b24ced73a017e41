"""One training run end to end: build the engine, loop over steps, evaluate, track in MLflow."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneguard.aggregators import build_gar
from tuneguard.config import ExperimentConfig
from tuneguard.results import schema
from tuneguard.results.axes import style_axes
from tuneguard.training.metrics import bound_summary, vn_bound

StepCallback = Callable[[dict[str, Any]], None]
CheckpointFn = Callable[[dict[str, Any]], None]


@dataclass
class RunResult:
    status: str  # FINISHED | DIVERGED | INFEASIBLE | FAILED
    message: str
    steps: int  # steps completed
    planned_steps: int
    max_cross_accuracy: float
    final_cross_accuracy: float
    sigma: float
    eps_spent: float | None
    run_id: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    engine_info: dict[str, str] = field(default_factory=dict)  # engine facts for the MLflow run's tags
    model: Any = None  # the trained torch model, with train(keep_model=True) on the local engine

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("history", "engine_info", "model")}


def make_engine(cfg: ExperimentConfig, worker_groups: Sequence[Sequence[int]] | None = None, data: Any = None):
    """The engine ``cfg.engine`` names (:data:`tuneguard.training.engine.ENGINES`)."""
    from tuneguard.training.engine import make_engine as _make

    return _make(cfg, worker_groups, data)


def train(
    cfg: ExperimentConfig,
    *,
    tracking_uri: str | None = None,
    track: bool = True,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    callback: StepCallback | None = None,
    engine=None,
    worker_groups: Sequence[Sequence[int]] | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    checkpoint_every: int = 0,
    resume: dict[str, Any] | None = None,
    plots: bool = True,
    data: Any = None,
    keep_model: bool = False,
) -> RunResult:
    """Run ``cfg`` to completion (or divergence) and return its numbers.

    ``callback`` receives each step's metrics dict (after logging). With ``track`` the run is an
    MLflow run: params (the flattened config), per-step metrics in batches, the config YAML and
    a plot of accuracy and VN-ratio curves as artifacts, tags for dataset / attack / gar.

    ``checkpoint_fn`` receives, every ``checkpoint_every`` steps, a dict (CPU tensors and plain
    values) from which ``train(..., resume=that_dict)`` continues the same run, the same MLflow
    run included, with the same numbers as an uninterrupted run.
    """
    from tuneguard.training.plan import InfeasibleBudget

    start = time.perf_counter()
    tracker = None
    # Everything after the MLflow run exists is inside this try: an error (or Ctrl-C / SIGTERM,
    # which the CLI turns into KeyboardInterrupt) at any point, logging params included, ends
    # the run FAILED (KILLED), never leaving it RUNNING.
    try:
        if track and resume and resume.get("run_id"):
            from tuneguard.tracking import RunTracker

            tracker = RunTracker(cfg.name, tracking_uri=tracking_uri, run_id=resume["run_id"])
        elif track:
            from tuneguard.tracking import RunTracker

            tracker = RunTracker(
                cfg.name, tracking_uri=tracking_uri, run_name=run_name or schema.run_name(cfg),
                parent_run_id=parent_run_id,
                tags={schema.KIND: schema.KIND_TRAIN, "dataset": cfg.dataset, "attack": cfg.attack.name if cfg.f else "none",
                      "gar": cfg.gar.name, "engine": cfg.engine, **(tags or {})},
            )
            tracker.log_params(cfg.flat())
            tracker.log_text(cfg.to_yaml(), "config.yaml")
        try:
            own_engine = engine is None
            engine = engine or make_engine(cfg, worker_groups, data)
        except InfeasibleBudget as err:
            result = RunResult("INFEASIBLE", str(err), 0, 0, math.nan, math.nan, math.nan, None,
                               tracker.run_id if tracker else None)
            if tracker:
                tracker.set_tags({schema.STATUS: "INFEASIBLE", schema.MESSAGE: str(err)[:4000]})
                tracker.end("FINISHED")
            return result
        try:
            result = _loop(cfg, engine, tracker, callback, checkpoint_fn, checkpoint_every, resume, keep_model)
            result.engine_info = engine_info(engine)
        except BaseException:
            if tracker:  # a lost actor's restarts are part of the failed run's record
                tracker.set_tags(engine_info(engine))
            raise
        finally:
            if own_engine:
                engine.close()
        result.seconds = time.perf_counter() - start
        if tracker:
            _finish_tracking(tracker, cfg, result, plots)
    except KeyboardInterrupt as err:
        if tracker:
            tracker.end_quietly("KILLED", f"interrupted ({type(err).__name__}: {err})" if str(err) else "interrupted")
        raise
    except BaseException as err:
        if tracker:
            tracker.end_quietly("FAILED", f"{type(err).__name__}: {err}")
        raise
    return result


def _loop(cfg: ExperimentConfig, engine, tracker, callback: StepCallback | None,
          checkpoint_fn: CheckpointFn | None, checkpoint_every: int, resume: dict[str, Any] | None,
          keep_model: bool = False) -> RunResult:
    ctx_plan = engine.plan
    steps = ctx_plan.steps
    bound = vn_bound(build_gar(cfg))
    history: list[dict[str, Any]] = []
    max_acc, acc = -math.inf, math.nan
    eps_spent = None
    first = 0
    if resume:
        state = engine.import_state(resume["state"])
        first, history = resume["step"], list(resume["history"])
        evals = [h["cross_accuracy"] for h in history if "cross_accuracy" in h]
        if evals:
            max_acc, acc = max(evals), evals[-1]
    else:
        state = engine.init_state()
    status, message = "FINISHED", f"completed {steps} steps"
    for t in range(first, steps):
        s = t + 1
        state, m = engine.step(state, t)
        m["step"] = s
        if bound is not None:
            m["vn_bound"] = bound
            if math.isfinite(m.get("vn_submit", math.nan)) and bound > 0:
                m[schema.VN_OVER_BOUND] = m["vn_submit"] / bound  # > 1: the GAR's guarantee does not hold
        diverged = not math.isfinite(m.get("param_norm", 0.0))
        if s % cfg.eval_every == 0 or s == steps or diverged:
            if not diverged:
                acc, test_loss = engine.evaluate(state)
                max_acc = max(max_acc, acc)
                m.update(cross_accuracy=acc, test_loss=test_loss)
            eps_spent = _eps_spent(cfg, ctx_plan, s)
            if eps_spent is not None:
                m["eps_spent"] = eps_spent
        if max_acc > -math.inf:
            m["max_cross_accuracy"] = max_acc
        history.append(m)
        if tracker:
            # The bound is a constant and the running maximum moves only when an evaluation
            # does: logged at evaluation steps only, a fifth fewer rows for the store to write.
            at_eval = "cross_accuracy" in m or s == steps or s == 1
            tracker.log_metrics({k: v for k, v in m.items() if k != "step" and (at_eval or k not in _EVAL_STEP_ONLY)},
                                step=s)
        if callback:
            callback(m)
        if checkpoint_fn and checkpoint_every and s % checkpoint_every == 0 and s < steps and not diverged:
            if tracker:
                tracker.flush()
            checkpoint_fn({"step": s, "state": engine.export_state(state), "history": list(history),
                           "run_id": tracker.run_id if tracker else None})
        if diverged:
            status = "DIVERGED"
            message = f"model parameters became non-finite at step {s} (lr={cfg.lr}, gar={cfg.gar.name}); run stopped"
            break
    done = history[-1]["step"] if history else 0
    result = RunResult(status, message, done, steps, max_acc if max_acc > -math.inf else math.nan, acc,
                       ctx_plan.sigma, eps_spent, tracker.run_id if tracker else None, history)
    ctx = getattr(engine, "ctx", None)  # the local engine holds the model in this process
    if keep_model and ctx is not None and status == "FINISHED":
        ctx.set_params(state.theta)
        result.model = ctx.model
    return result


_EVAL_STEP_ONLY = frozenset({"vn_bound", "max_cross_accuracy"})


def _eps_spent(cfg: ExperimentConfig, plan, steps: int) -> float | None:
    if plan.sigma <= 0 or cfg.clip is None:
        return None
    from tuneguard.privacy import spent

    method = cfg.privacy.accountant
    try:
        return float(spent(plan.sigma, cfg.clip, cfg.batch_size, plan.m, steps, cfg.privacy.delta, method=method).eps)
    except ValueError:
        return None


def engine_info(engine) -> dict[str, str]:
    """What an engine reports about itself for the run's MLflow tags: for the actor engine, the
    actor restarts of the run (with the log), whether its actors were warm, their start-up time."""
    info: dict[str, str] = {}
    log = getattr(engine, "restart_log", None)
    if log is not None:
        info[schema.ACTOR_RESTARTS] = str(len(log))
        if log:
            info[schema.ACTOR_RESTART_LOG] = "\n".join(log)[:4000]
    if getattr(engine, "reused", None) is not None and hasattr(engine, "pool"):
        info[schema.ACTORS_WARM] = "1" if engine.reused else "0"
        if engine.pool is not None:
            info[schema.ACTOR_NODES] = str(len(set(engine.nodes())))
            info[schema.ACTOR_POOL] = engine.pool.name_prefix
        transport = getattr(engine, "transport", None)
        if transport:
            info[schema.ACTOR_TRANSPORT] = transport
        startup = getattr(engine, "startup_seconds", math.nan)
        if math.isfinite(startup):
            info[schema.ACTOR_STARTUP_S] = f"{startup:.3f}"
    return info


def _finish_tracking(tracker, cfg: ExperimentConfig, result: RunResult, plots: bool = True,
                     vn_plot: bool = True) -> None:
    metrics = {schema.FINAL_CROSS_ACCURACY: result.final_cross_accuracy,
               schema.MAX_CROSS_ACCURACY: result.max_cross_accuracy, schema.RUN_SECONDS: result.seconds,
               **bound_summary(result.history, result.history[0].get("vn_bound") if result.history else None)}
    if schema.ACTOR_RESTARTS in result.engine_info:
        metrics["actor_restarts"] = float(result.engine_info[schema.ACTOR_RESTARTS])
    tracker.log_metrics(metrics, step=result.steps)
    tracker.set_tags({schema.STATUS: result.status, schema.MESSAGE: result.message[:4000],
                      "sigma": f"{result.sigma:.6g}", **result.engine_info})
    try:
        if plots:
            tracker.log_figure(curves_figure(cfg, result.history), "plots/curves.png")
        if vn_plot and any("vn_submit" in h for h in result.history):
            tracker.log_figure(vn_figure(cfg, result.history, metrics.get(schema.VN_HELD_FRAC)), VN_FIGURE)
    except Exception as err:  # a plot must never fail a finished run
        tracker.set_tags({schema.PLOT_ERROR: str(err)[:500]})
    # A diverged run is an outcome (its status tag says so), not a crash of tuneguard.
    tracker.end("FINISHED")


VN_FIGURE = "plots/vn_vs_bound.png"


def vn_figure(cfg: ExperimentConfig, history: list[dict[str, Any]], held: float | None = None):
    """The run's "why" on one chart (MLflow cannot put two metrics on one chart by default): the
    VN ratio sqrt(E||G - EG||^2) / ||EG|| of the honest vectors, sample (before noise) and
    submit (what reaches the GAR), against the GAR's bound 1/kappa (001 Eq. 37, Figure 5). The
    guarantee holds only while the submit line is under the bound. A bare matplotlib Figure at
    low DPI (no pyplot state, ~0.1 s), so every tracked run can afford it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.2), dpi=80)
    ax = fig.subplots()
    steps = [h["step"] for h in history]
    for key, style, label in (("vn_sample", ":", "sample (clipped, before noise)"),
                              ("vn_submit", "-", "submit (what reaches the GAR)")):
        ax.plot(steps, [h.get(key, math.nan) for h in history], style, lw=1.3, label=label)
    bound = history[0].get("vn_bound") if history else None
    if bound:
        ax.axhline(bound, color="k", ls="--", lw=1.1, label=f"bound 1/kappa = {bound:.3g}")
    ax.set_yscale("log")
    style_axes(ax, "step", "VN ratio")
    why = ("no known bound for this rule" if not bound else
           "bound never held: no robustness guarantee (001)" if held == 0 else
           f"bound held at {held:.0%} of steps" if held is not None else "")
    attack = cfg.attack.name if cfg.f else "no attack"
    ax.set_title(f"{cfg.gar.name} b={cfg.batch_size} lr={cfg.lr:.3g} {attack}: {why}", fontsize=8)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.15, top=0.89)
    return fig


def curves_figure(cfg: ExperimentConfig, history: list[dict[str, Any]]):
    """Cross-accuracy and VN ratio (sample, submit, bound) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ev = [h for h in history if "cross_accuracy" in h]
    ax1.plot([h["step"] for h in ev], [h["cross_accuracy"] for h in ev], marker=".", label="cross-accuracy")
    ax1.set_xlabel("step")
    ax1.set_ylabel("top-1 test accuracy")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    steps = [h["step"] for h in history]
    for key, style in (("vn_sample", "-"), ("vn_submit", "-")):
        ax2.plot(steps, [h.get(key, math.nan) for h in history], style, label=key)
    if history and "vn_bound" in history[0]:
        ax2.axhline(history[0]["vn_bound"], color="k", ls="--", label=f"1/kappa ({cfg.gar.name})")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("VN ratio")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{cfg.dataset} {cfg.gar.name} vs {cfg.attack.name if cfg.f else 'no attack'} (f={cfg.f}), b={cfg.batch_size}")
    # Fixed margins: tight_layout measures every tick label, a third of the figure's cost.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.87, wspace=0.25)
    plt.close(fig)
    return fig
