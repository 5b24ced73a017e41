"""The driver side of a tune job: a live terminal view of the trials, and the job's MLflow run
kept up to date as trials finish.

Both are Ray Tune callbacks built by the driver (:mod:`tuneguard.tune.search`) with what they
need: the job info, the space text and, for the view, the driver's :class:`DriverSettings`
(console, whether to draw, trials at once). They build their console, MLflow client and counters
in ``setup`` and never write back to the driver, which reads a job's outcome from Tune's own
``ResultGrid``. Tune pickles them into the experiment state; :mod:`tuneguard.tune.driver` makes a
resumed job (``Tuner.restore``) run with the resuming driver's own callbacks, not stale copies.

The view (instead of Tune's verbose tables): status counts, the best objective so far with its
config, the running trials with their step and objective, elapsed time and an ETA (mean trial
time x trials left / trials at once). On a terminal it is a ``rich.live.Live`` panel; elsewhere
(CI logs, pipes) plain lines, never wrapped: one per finished trial, and a status line (finished,
running, best so far, elapsed, ETA) every ``TUNEGUARD_PROGRESS_EVERY`` seconds (default 30), so
a log shows the job is alive at a steady rate.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from ray.tune import Callback

from tuneguard.results import schema
from tuneguard.tune.driver import DriverBound, DriverSettings


def plain_every_s() -> float:
    """Seconds between plain status lines off a terminal (``TUNEGUARD_PROGRESS_EVERY``)."""
    import os

    try:
        return max(0.0, float(os.environ.get("TUNEGUARD_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


def _space(text: str, path: str | None):
    from tuneguard.tune.space import Space

    return Space.from_text(text, path)


def _point(space, config: dict[str, Any]) -> dict[str, Any]:
    try:
        return space.decode((config or {}).get("point", config or {}))
    except Exception:  # noqa: BLE001 - display only
        return dict(config or {})


def _fmt_point(point: dict[str, Any], limit: int = 120) -> str:
    def short(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return json.dumps(v, separators=(",", ":"))
        return str(v)

    text = " ".join(f"{k}={short(v)}" for k, v in point.items())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def outcome(result: dict[str, Any] | None) -> str:
    """done | infeasible | excluded | stopped (ASHA) from a trial's last result."""
    from tuneguard.tune.trial_report import TrialReport

    return TrialReport.of(result).outcome


class ProgressView(DriverBound, Callback):
    """Live view of a tune job's trials (see the module docstring)."""

    slot = "progress"
    # A results dir written before DriverSettings existed unpickles its view without one (and
    # not as the resuming driver's): it then draws on stdout with the defaults.
    driver: DriverSettings = DriverSettings()

    def __init__(self, space_text: str, space_path: str | None, job_id: str, total: int,
                 driver: DriverSettings | None = None):
        self.space_text = space_text
        self.space_path = space_path
        self.job_id = job_id
        self.total = total
        self.driver = driver or DriverSettings()
        self._runtime: dict[str, Any] | None = None

    def plain_state(self) -> dict[str, Any]:
        return {**self.__dict__, "_runtime": None}

    # setup ----------------------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        from rich.console import Console

        console = self.driver.console or Console()
        self._runtime = {
            "console": console, "enabled": self.driver.progress, "conc": self.driver.concurrency or 1,
            "space": _space(self.space_text, self.space_path), "start": time.time(), "started": {},
            "durations": [], "latest": {}, "best": None, "live": None, "last_draw": 0.0, "outcomes": {},
            "last_line": time.time(),
        }
        rt = self._runtime
        if rt["enabled"] and console.is_terminal:
            from rich.live import Live

            rt["live"] = Live(self._render([]), console=console, refresh_per_second=2, transient=False)
            rt["live"].start()

    @property
    def rt(self) -> dict[str, Any]:
        if self._runtime is None:
            self.setup()
        assert self._runtime is not None
        return self._runtime

    # events -----------------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.rt["started"].setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        self.rt["latest"][trial.trial_id] = result
        self._draw(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        rt = self.rt
        r = trial.last_result or {}
        began = rt["started"].get(trial.trial_id)
        if began is not None:
            rt["durations"].append(time.time() - began)
        kind = outcome(r)
        rt["outcomes"][trial.trial_id] = kind
        point = _point(rt["space"], trial.config)
        if kind == "done":
            obj = float(r.get("objective", 0.0))
            if rt["best"] is None or obj > rt["best"][0]:
                rt["best"] = (obj, trial.trial_id, point)
        if rt["enabled"] and rt["live"] is None:
            what = {"done": f"objective {float(r.get('objective', 0.0)):.4f}",
                    "infeasible": f"infeasible: {r.get('reason', '')}",
                    "excluded": f"excluded: {r.get('reason', '')}",
                    "stopped": f"{_stopped_by(rt['space'])} at objective {float(r.get('objective', 0.0)):.4f}"}[kind]
            n = len({t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | {trial.trial_id})
            rt["console"].print(f"[{n}/{self.total}] trial {trial.trial_id} {what}  ({_fmt_point(point)})",
                                highlight=False, markup=False, soft_wrap=True)
        self._draw(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        rt = self.rt
        rt["outcomes"][trial.trial_id] = "error"
        if rt["enabled"]:
            msg = f"trial {trial.trial_id} failed; details: {trial.error_file or trial.path}"
            if rt["live"] is not None:
                rt["live"].console.print(f"[red]{msg}[/]", highlight=False)
            else:
                rt["console"].print(msg, highlight=False, markup=False)
        self._draw(trials, force=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._draw(trials)
        rt = self.rt
        if rt["enabled"] and rt["live"] is None and time.time() - rt["last_line"] >= plain_every_s():
            rt["last_line"] = time.time()
            rt["console"].print(self.status_line(trials), highlight=False, markup=False, soft_wrap=True)

    def status_line(self, trials: list) -> str:
        """The live view's head as one plain line (logs, pipes)."""
        rt = self.rt
        c = self.counts(trials)
        finished = c["done"] + c["infeasible"] + c["excluded"] + c["stopped"] + c["error"]
        best = rt["best"]
        best_txt = f"best {best[0]:.4f} (trial {best[1]})" if best else "best: none yet"
        return (f"[{finished}/{self.total}] {c['running']} running, {c['pending']} pending; {best_txt}; "
                f"elapsed {_fmt_time(time.time() - rt['start'])}, ETA {_fmt_time(self.eta(trials))}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        rt = self.rt
        if rt["live"] is not None:
            rt["live"].update(self._render(trials))
            rt["live"].stop()
            rt["live"] = None

    # drawing ----------------------------------------------------------------------------------
    def _draw(self, trials: list, force: bool = False) -> None:
        rt = self.rt
        if rt["live"] is None:
            return
        now = time.time()
        if not force and now - rt["last_draw"] < 0.5:
            return
        rt["last_draw"] = now
        rt["live"].update(self._render(trials))

    def counts(self, trials: list) -> dict[str, int]:
        rt = self.rt
        c = {"pending": 0, "running": 0, "done": 0, "infeasible": 0, "excluded": 0, "stopped": 0, "error": 0}
        for t in trials:
            if t.status == "RUNNING":
                c["running"] += 1
            elif t.status in ("PENDING", "PAUSED"):
                c["pending"] += 1
            elif t.status == "ERROR":
                c["error"] += 1
            else:
                c[rt["outcomes"].get(t.trial_id) or outcome(t.last_result)] += 1
        return c

    def eta(self, trials: list) -> float | None:
        rt = self.rt
        if not rt["durations"]:
            return None
        finished = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR"))
        left = max(0, self.total - finished)
        mean = sum(rt["durations"]) / len(rt["durations"])
        conc = max(1, rt["conc"], sum(1 for t in trials if t.status == "RUNNING"))
        return math.ceil(left / conc) * mean

    def _render(self, trials: list):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        rt = self.rt
        c = self.counts(trials)
        finished = c["done"] + c["infeasible"] + c["excluded"] + c["stopped"] + c["error"]
        head = Text.assemble(
            ("tuneguard tune ", "bold"), (self.job_id, "cyan"),
            f"   {finished}/{self.total} finished: {c['done']} done",
            *([f", {c['stopped']} stopped early"] if c["stopped"] else []),
            *([(f", {c['infeasible']} infeasible", "yellow")] if c["infeasible"] else []),
            *([(f", {c['excluded']} excluded", "yellow")] if c["excluded"] else []),
            *([(f", {c['error']} failed", "red")] if c["error"] else []),
            f" | {c['running']} running, {c['pending']} pending",
            f"   elapsed {_fmt_time(time.time() - rt['start'])}  ETA {_fmt_time(self.eta(trials))}",
        )
        parts: list[Any] = [head]
        best = rt["best"]
        if best:
            parts.append(Text.assemble(("best ", "bold green"), (f"{best[0]:.4f}", "bold green"),
                                       f"  trial {best[1]}  {_fmt_point(best[2])}"))
        else:
            parts.append(Text("best: no trial finished yet", style="dim"))
        running = [t for t in trials if t.status == "RUNNING"]
        if running:
            table = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
            for col in ("trial", "step", "objective", "config"):
                table.add_column(col)
            for t in running[:8]:
                r = rt["latest"].get(t.trial_id, {})
                obj = r.get("objective")
                table.add_row(t.trial_id, str(r.get("step", "-")), "-" if obj is None else f"{float(obj):.4f}",
                              _fmt_point(_point(rt["space"], t.config), 90))
            parts.append(table)
        return Group(*parts)


class JobTracker(DriverBound, Callback):
    """Keeps the job's MLflow run current: best objective so far (metric ``best_objective`` and
    tags ``best_run_id``, ``best_trial_id``, ``best_config``), trial counts, and closes the runs
    of trials ASHA stopped (their process is gone before they can)."""

    slot = "tracker"

    def __init__(self, tracking_uri: str, parent_run_id: str, space_text: str, space_path: str | None):
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.space_text = space_text
        self.space_path = space_path
        self._runtime: dict[str, Any] | None = None

    def plain_state(self) -> dict[str, Any]:
        # Tune writes this state into tuner.pkl on disk: no password or token in it. A resumed job
        # runs the resuming driver's tracker (tune/driver.py), built from the URI given again.
        from tuneguard.tracking import mask_uri

        return {**self.__dict__, "_runtime": None, "tracking_uri": mask_uri(self.tracking_uri)}

    def setup(self, **info: Any) -> None:
        from tuneguard.tracking import client

        cl = client(self.tracking_uri)
        best, finished = None, 0
        try:
            run = cl.get_run(self.parent_run_id)
            if "best_objective" in run.data.metrics:
                best = float(run.data.metrics["best_objective"])
            finished = int(run.data.metrics.get("trials_finished", 0))
        except Exception:  # noqa: BLE001 - the job must run even if the store hiccups
            pass
        self._runtime = {"client": cl, "best": best, "finished": finished,
                         "space": _space(self.space_text, self.space_path)}

    @property
    def rt(self) -> dict[str, Any]:
        if self._runtime is None:
            self.setup()
        assert self._runtime is not None
        return self._runtime

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        rt = self.rt
        r = trial.last_result or {}
        # distinct trials (a resumed job counts what finished before it, a replay counts once)
        rt["finished"] = len({t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | {trial.trial_id})
        cl = rt["client"]
        try:
            kind = outcome(r)
            if kind == "stopped":
                self._close_stopped(trial.trial_id, r)
            cl.log_metric(self.parent_run_id, "trials_finished", rt["finished"], step=rt["finished"])
            if kind == "done":
                obj = float(r.get("objective", 0.0))
                if rt["best"] is None or obj > rt["best"]:
                    rt["best"] = obj
                    point = _point(rt["space"], trial.config)
                    cl.log_metric(self.parent_run_id, "best_objective", obj, step=rt["finished"])
                    from mlflow.entities import RunTag

                    cl.log_batch(self.parent_run_id, tags=[
                        RunTag("best_run_id", str(r.get("best_run_id", ""))),
                        RunTag("best_trial_id", trial.trial_id),
                        RunTag("best_config", json.dumps(point, default=str)[:4000]),
                    ])
        except Exception:  # noqa: BLE001 - bookkeeping must not stop the job
            pass

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        try:
            self.rt["client"].set_tag(self.parent_run_id, f"error.{trial.trial_id}", str(trial.error_file)[:500])
        except Exception:  # noqa: BLE001
            pass

    def _close_stopped(self, trial_id: str, r: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        cl = self.rt["client"]
        ts = int(time.time() * 1000)
        parent = cl.get_run(self.parent_run_id)
        flt = f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and " + schema.tag_filter(trial=trial_id)
        for run in cl.search_runs([parent.info.experiment_id], filter_string=flt, max_results=1000):
            if run.info.status != "RUNNING":
                continue
            run_id = run.info.run_id
            cl.log_batch(run_id, metrics=[Metric("objective", float(r.get("objective", 0.0)), ts, int(r.get("step", 0)))],
                         tags=[RunTag(schema.STATUS, "STOPPED"),
                               RunTag(schema.MESSAGE, f"{_stopped_by(self.rt['space'])} at step {r.get('step')}")])
            cl.set_terminated(run_id, status="FINISHED")


def _stopped_by(space) -> str:
    """How a trial that reported but did not finish was stopped: only ASHA stops trials early."""
    return "stopped early (ASHA)" if space.tune.scheduler == "asha" else "stopped before its last step"
