"""The report of a tune job: PNG figures and one self-contained HTML page, read back from MLflow.

``tuneguard report -o DIR`` (or :func:`build_report`) writes ``DIR/index.html`` and, where the
store holds the data for them:

- ``accuracy_vs_batch.png``: max cross-accuracy against the batch size, one line per GAR, one
  panel per (attack, f, privacy budget), as 001 Figure 2: the line is the mean over seeds, the
  band the min-max over seeds;
- ``vn_ratio.png``: the VN ratio (sample and submit) over the steps of the best run of each GAR,
  against that GAR's bound 1/kappa (dashed), log scale, as 001 Figure 5;
- ``search_progress.png`` and ``param_importance.png``: the objective of each trial and the best
  so far, and Optuna's parameter importances (fANOVA), from the job's Optuna study (search
  progress falls back to the MLflow runs when there is no study, e.g. a grid job);
- ``perturbation.png``: for 003-style runs (``sign_majority`` / ``median`` with a
  ``perturbation`` b), accuracy against b, with the b = 0 runs as dashed reference lines.

A figure without data is left out and the page says why. Where the data come from: each run's
params are its flattened config (strings in MLflow: ``gar.name``, ``batch_size``, ``privacy.eps``
...); its score is the metric ``max_cross_accuracy`` (the running maximum; older stores hold
``best_cross_accuracy``); the Optuna study is ``<tuneguard.results_dir tag>/optuna.db`` with the
study name of ``job.json`` (the job id). When the job has a parent run, the report's files are
also logged to it as artifacts under ``report/``.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from tuneguard.results import schema
from tuneguard.results.axes import style_axes

DPI = 100
MAX_PANELS = 12
MAX_VN_RUNS = 6
MAX_TOP = 10
FIGURE_FILES = ("accuracy_vs_batch.png", "vn_ratio.png", "search_progress.png", "param_importance.png",
                "perturbation.png", "pareto_front.png")
PERTURBATION_GARS = ("sign_majority", "median")
NOT_TRAINED = {"EXCLUDED", "INVALID", "INFEASIBLE"}


class ReportError(ValueError):
    """Nothing to report, or the store does not hold what was asked for."""


# --------------------------------------------------------------------------------------------
# What the store holds
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
        return _num(self.params.get(key))

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
            return f"eps={_fmt(self.num('privacy.eps'))}/step"
        if mode == "total":
            return f"eps={_fmt(self.num('privacy.total_eps'))} total"
        if mode == "noise":
            return f"sigma={_fmt(self.num('privacy.sigma'))}"
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
class Figure:
    file: str
    caption: str


@dataclass
class Section:
    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)  # already escaped: statements and tables


@dataclass
class Report:
    """What :func:`generate_report` wrote."""

    index: Path
    out_dir: Path
    job: str | None
    experiment: str
    parent_run_id: str | None
    n_runs: int
    n_trials: int
    best_run_id: str | None
    best_score: float | None
    sections: list[Section]
    artifacts_logged: bool = False
    artifact_error: str | None = None

    @property
    def figures(self) -> list[Path]:
        return [self.out_dir / f.file for s in self.sections for f in s.figures]

    @property
    def skipped(self) -> dict[str, str]:
        return {s.title: " ".join(s.notes) for s in self.sections if not s.figures and s.notes}


@dataclass
class Source:
    """The runs a report covers."""

    uri: str
    experiment: str
    experiment_id: str
    parent: RunRow | None
    job: str | None
    runs: list[RunRow]


def _num(s: Any) -> float | None:
    if s is None:
        return None
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(v: float | None) -> str:
    if v is None:
        return "?"
    return f"{v:g}"



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


def _trial_key(r: RunRow) -> str:
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
# Figures
# --------------------------------------------------------------------------------------------
def _new_figure(w: float, h: float):
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(w, h), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> None:
    """PNG with a 256-colour palette: a third of the size of matplotlib's RGBA output, same look."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png", facecolor="white")
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, format="PNG", optimize=True)


def _grid(fig, n: int, ncols: int = 3):
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return flat[:n]


def _colors(names: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(sorted(set(names)))}


def _spread(values_by_seed: dict[str, list[float]]) -> tuple[float, float, float, int]:
    """Per seed the best value; then (mean, min, max, n seeds) over seeds."""
    best = [max(v) for v in values_by_seed.values() if v]
    return mean(best), min(best), max(best), len(best)


def _value_axis(ax, xs: list[float], log: bool | None = None) -> None:
    """Log x scale when asked or when the values span 4x or more; ticks at the values when few."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    if not xs:
        return
    logx = bool(log or (log is None and max(xs) / max(min(xs), 1e-12) >= 4))
    if logx:
        ax.set_xscale("log")
    pos = (lambda v: math.log(max(v, 1e-12))) if logx else (lambda v: v)  # noqa: E731
    span = (pos(max(xs)) - pos(min(xs))) or 1.0
    ticks: list[float] = []
    for x in sorted(set(xs)):  # labels closer than ~6% of the axis overlap ("38" "41" read "3841")
        if not ticks or (pos(x) - pos(ticks[-1])) / span >= 0.06:
            ticks.append(x)
    if len(ticks) <= 8:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())


def _plain_log_y(ax, values: list[float]) -> None:
    """Log y axis labelled 0.5, 1, 2 (not 5x10^-1); minor ticks labelled when it spans < 1.5 decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    pos = [v for v in values if v > 0]
    short = bool(pos) and math.log10(max(pos) / min(pos)) < 1.5
    ax.yaxis.set_minor_formatter(plain if short else NullFormatter())


def accuracy_vs_batch(runs: list[RunRow], out: Path, colors: dict[str, Any]) -> Section:
    sec = Section("accuracy", "Max cross-accuracy vs batch size")
    pts = [r for r in runs if r.score is not None and r.num("batch_size") is not None and r.gar]
    if not pts:
        sec.notes.append("No run has both a cross-accuracy (metric max_cross_accuracy) and a "
                         "batch_size param yet, so there is nothing to plot.")
        return sec
    datasets = {r.params.get("dataset") for r in pts}
    panels: dict[tuple, dict[str, dict[float, dict[str, list[float]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for r in pts:
        key = ((r.params.get("dataset"),) if len(datasets) > 1 else ()) + (r.attack_label, r.f_label, r.privacy_label)
        panels[key][r.gar][r.num("batch_size")][r.seed].append(r.score)
    keys = sorted(panels, key=lambda k: tuple(map(str, k)))
    if len(keys) > MAX_PANELS:
        sec.notes.append(f"{len(keys)} (attack, f, privacy) combinations; the first {MAX_PANELS} are shown.")
        keys = keys[:MAX_PANELS]
    ncols = min(3, len(keys))
    fig = _new_figure(4.2 * ncols, 3.2 * math.ceil(len(keys) / ncols) + 0.3)
    multi_seed = False
    for ax, key in zip(_grid(fig, len(keys)), keys, strict=True):
        allx: list[float] = []
        top = 0.0
        for gar in sorted(panels[key]):
            by_b = panels[key][gar]
            xs = sorted(by_b)
            stats = [_spread(by_b[b]) for b in xs]
            m, lo, hi = [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats]
            multi_seed |= any(s[3] > 1 for s in stats)
            ax.plot(xs, m, marker="o", ms=4, lw=1.5, color=colors[gar], label=gar)
            if any(h > low for h, low in zip(hi, lo, strict=True)):
                ax.fill_between(xs, lo, hi, color=colors[gar], alpha=0.18, lw=0)
            allx += xs
            top = max(top, *hi)
        _value_axis(ax, allx)
        ax.set_ylim(0, min(1.0, top * 1.15 + 0.02))
        ax.set_title(", ".join(str(k) for k in key), fontsize=9)
        ax.set_xlabel("batch size b", fontsize=8)
        ax.set_ylabel("max cross-accuracy", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    _save(fig, out / "accuracy_vs_batch.png")
    band = ("the band spans the min to max over seeds" if multi_seed
            else "one seed per point here, so there is no band (with several seeds it spans min to max)")
    sec.figures.append(Figure("accuracy_vs_batch.png", (
        f"Max cross-accuracy (each run's best top-1 test accuracy over its steps) against the batch size b, one line "
        f"per GAR and one panel per (attack, f, privacy budget), as in 001 Figure 2. For each seed the best run at "
        f"that b counts (the best over any other searched parameter, such as lr). The line is the mean over seeds and "
        f"{band}. {len(pts)} runs.")))
    return sec


def _history(cl, run_id: str, key: str) -> list[tuple[int, float]]:
    try:
        hist = cl.get_metric_history(run_id, key)
    except Exception:  # noqa: BLE001 - a missing metric is no data
        return []
    return sorted((int(m.step), float(m.value)) for m in hist if math.isfinite(m.value))


def vn_ratio(cl, runs: list[RunRow], out: Path, colors: dict[str, Any]) -> Section:
    """One panel per attack (001 Figure 5 compares GARs under one attack): in each, every GAR's
    best run under that attack, its submitted VN ratio (solid), its sample ratio (dotted) and its
    bound 1/kappa (dashed, same colour). Panels never mix attacks."""
    sec = Section("vn", "VN ratio against the GAR's bound, per attack")
    best: dict[str, dict[str, RunRow]] = defaultdict(dict)
    for r in runs:
        if r.gar and r.score is not None and (schema.VN_SUBMIT in r.metrics or schema.VN_SAMPLE in r.metrics):
            cur = best[r.attack_label].get(r.gar)
            if cur is None or r.score > (cur.score or 0.0):
                best[r.attack_label][r.gar] = r
    if not best:
        sec.notes.append("No trained run logged the VN ratio (metrics vn_sample / vn_submit), so there is nothing to "
                         "plot.")
        return sec
    from matplotlib.ticker import MaxNLocator

    attacks = sorted(best)
    if len(attacks) > MAX_PANELS:
        sec.notes.append(f"{len(attacks)} attacks; the first {MAX_PANELS} are shown.")
        attacks = attacks[:MAX_PANELS]
    panels = []
    for attack in attacks:
        chosen = sorted(best[attack].values(), key=lambda r: -(r.score or 0.0))[:MAX_VN_RUNS]
        lines = []
        for r in chosen:
            h = {k: [(st, v) for st, v in _history(cl, r.run_id, k) if v > 0] for k in (schema.VN_SAMPLE, schema.VN_SUBMIT)}
            if h[schema.VN_SAMPLE] or h[schema.VN_SUBMIT]:
                lines.append((r, h, r.metrics.get(schema.VN_BOUND)))
        if lines:
            panels.append((attack, sorted(lines, key=lambda x: x[0].gar or "")))
    if not panels:
        sec.notes.append("The runs' VN-ratio histories hold no positive finite values, so there is nothing to plot.")
        return sec
    ncols = min(3, len(panels))
    fig = _new_figure(4.6 * ncols, 3.4 * math.ceil(len(panels) / ncols) + 0.3)
    described = []
    for ax, (attack, lines) in zip(_grid(fig, len(panels), ncols), panels, strict=True):
        values: list[float] = []
        for r, h, bound in lines:
            c = colors[r.gar]
            if h[schema.VN_SAMPLE]:
                ax.plot(*zip(*h[schema.VN_SAMPLE], strict=True), ":", lw=1.1, color=c, alpha=0.8)
            if h[schema.VN_SUBMIT]:
                ax.plot(*zip(*h[schema.VN_SUBMIT], strict=True), "-", lw=1.5, color=c,
                        label=f"{r.gar} b={_fmt(r.num('batch_size'))}")
            if bound is not None and bound > 0:
                ax.axhline(bound, color=c, ls="--", lw=1.1)
                values.append(bound)
            values += [v for k in h for _, v in h[k]]
            described.append(f"{attack}, {r.gar}: run {r.run_id} (max cross-accuracy {r.score:.4f}"
                             f"{'' if bound else '; no known VN bound for this rule'})")
        _plain_log_y(ax, values)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"attack: {attack}", fontsize=9)
        style_axes(ax, "step", "VN ratio", legend_fontsize=6.5)
    _save(fig, out / "vn_ratio.png")
    sec.figures.append(Figure("vn_ratio.png", (
        "VN ratio sqrt(E||G - EG||^2) / ||EG|| of the honest workers' vectors over the steps, as in 001 Figure 5, "
        "one panel per attack and, in it, each GAR's best run under that attack: solid, what the workers submit "
        "(noise and momentum included); dotted, the clipped batch gradients before noise (sample); dashed, the "
        "GAR's bound 1/kappa(n, f) in the same colour. A GAR's guarantee holds only while its solid line is under "
        "its dashed line. Log scale. Runs: " + "; ".join(described) + ".")))
    return sec


def held_fraction(cl, r: RunRow) -> tuple[float, int] | None:
    """(share of steps where vn_submit < vn_bound, number of steps) of a run; None when the run
    has no known bound or no VN values. Read from the run's vn_bound_held_frac metric, or
    recomputed from its vn_submit history (stores written before that metric existed)."""
    bound = r.metrics.get(schema.VN_BOUND)
    if bound is None or not bound > 0 or schema.VN_SUBMIT not in r.metrics:
        return None
    hist = _history(cl, r.run_id, schema.VN_SUBMIT)
    if not hist:
        return None
    frac = r.metrics.get(schema.VN_HELD_FRAC)
    if frac is None:
        frac = sum(v < bound for _, v in hist) / len(hist)
    return float(frac), len(hist)


NEVER_HELD = ("The VN bound never held in this job: in none of the {steps} logged steps of its {runs} run(s) with a "
              "known bound was the submitted VN ratio under the GAR's bound 1/kappa (the submitted ratio was "
              "{ratio} times the bound, median over runs). This is paper 001's central finding: the DP noise spreads "
              "the honest workers' vectors so much that the robust GAR's guarantee (Theorem 1's condition) does "
              "not apply. The winner below is the configuration that trained best without that guarantee, not one "
              "that satisfied it; to get it back, raise the batch size or the privacy budget (less noise per "
              "vector), or choose a GAR with a larger bound.")


def bound_section(cl, runs: list[RunRow]) -> Section:
    """Why the winner won: did any run keep 001's robustness condition VN < 1/kappa?"""
    sec = Section("why", "Why: did the robustness condition hold?")
    rows = []
    for r in runs:
        held = held_fraction(cl, r)
        if held is not None:
            rows.append((r, *held))
    if not rows:
        sec.notes.append("No trained run has both a VN ratio and a known VN bound, so whether 001's condition held "
                         "cannot be said.")
        return sec
    ratios = [r.metrics[schema.VN_OVER_BOUND_MEDIAN] for r, _, _ in rows if schema.VN_OVER_BOUND_MEDIAN in r.metrics]
    ratio = f"{sorted(ratios)[len(ratios) // 2]:.2g}" if ratios else "more than 1"
    steps = sum(n for _, _, n in rows)
    if all(frac == 0 for _, frac, _ in rows):
        sec.html.append(f'<p class="verdict" id="bound-never-held">{_e(NEVER_HELD.format(steps=steps, runs=len(rows), ratio=ratio))}</p>')
    else:
        some = [(r, frac) for r, frac, _ in rows if frac > 0]
        sec.html.append(f'<p class="verdict" id="bound-held">The VN bound held in {len(some)} of {len(rows)} run(s) '
                        f"with a known bound (at {max(f for _, f in some):.0%} of the steps at best): in those runs "
                        "the GAR's robustness guarantee (001 Theorem 1) applied at least part of the time.</p>")
    top = sorted(rows, key=lambda x: -(x[0].score or 0.0))[:MAX_TOP]
    out = ['<table id="why"><tr><th>run</th><th>max cross-acc.</th><th>bound held (share of steps)</th>'
           "<th>vn_submit / bound (median)</th><th>noise share of the variance (mean)</th></tr>"]
    for r, frac, _ in top:
        over, share = r.metrics.get(schema.VN_OVER_BOUND_MEDIAN), r.metrics.get(schema.NOISE_SHARE_MEAN)
        out.append(f"<tr><td>{_e(r.name or r.run_id)}</td><td>{r.score:.4f}</td><td>{frac:.0%}</td>"
                   f"<td>{'' if over is None else f'{over:.3g}'}</td><td>{'' if share is None else f'{share:.0%}'}</td></tr>")
    out.append("</table>")
    sec.html.append("\n".join(out))
    sec.html.append('<p class="muted">bound held: the share of steps with vn_submit &lt; 1/kappa; noise share: '
                    "1 - Var(sample) / Var(submit), how much of the spread the GAR sees the DP noise (and momentum) "
                    "adds to the batch gradients' own.</p>")
    return sec


def pareto(runs: list[RunRow], out: Path) -> Section:
    """The accuracy-privacy trade-off: each trial's objective (worst-case max cross-accuracy)
    against its total epsilon, and the non-dominated trials (the front a user picks a budget on;
    ``tuneguard export --eps E`` takes the most accurate point with eps <= E)."""
    from tuneguard.tune.objectives import pareto_front

    sec = Section("pareto", "Accuracy against privacy: the Pareto front")
    pts = [(r.metrics[schema.EPS_TOTAL], float(objective_of(r) or 0.0), r) for r in representatives(runs)
           if schema.EPS_TOTAL in r.metrics and objective_of(r) is not None]
    if len({p[0] for p in pts}) < 2:
        sec.notes.append("Fewer than two trials with different total epsilon (metric eps_total, logged by tune "
                         "jobs with DP), so there is no trade-off to draw; tune.objective: accuracy_vs_eps searches it.")
        return sec
    front = pareto_front(pts)
    fig = _new_figure(6.0, 3.6)
    ax = fig.subplots()
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=16, color="0.6", label="trial", zorder=2)
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="C3", lw=1.8, zorder=3)
    ax.scatter([p[0] for p in front], [p[1] for p in front], s=30, color="C3", label="Pareto front", zorder=4)
    if max(p[0] for p in pts) / max(min(p[0] for p in pts), 1e-12) >= 10:
        ax.set_xscale("log")
    style_axes(ax, "total epsilon spent per worker (lower = more private)", "objective (max cross-accuracy)", legend_loc="lower right")
    _save(fig, out / "pareto_front.png")
    sec.figures.append(Figure("pareto_front.png", (
        f"Each trial's objective against the total epsilon its runs spent (accountant, delta of the config); red, "
        f"the {len(front)} trial(s) no other trial beats on both. Pick a budget on the x axis; "
        "`tuneguard export --eps E` writes the most accurate trial within it.")))
    rows = ['<table id="front"><tr><th>total eps</th><th>objective</th><th>config</th><th>run id</th></tr>']
    for eps, acc, r in front:
        rows.append(f"<tr><td>{eps:.4g}</td><td>{acc:.4f}</td><td>{_e(_key_config(r))}</td>"
                    f"<td><code>{_e(r.run_id)}</code></td></tr>")
    rows.append("</table>")
    sec.html.append("\n".join(rows))
    return sec


def _study(source: Source, storage: str | None, study_name: str | None) -> tuple[Any | None, str]:
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


def _progress_plot(xs: list[int], ys: list[float], path: Path, xlabel: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(6.0, 3.4)
    ax = fig.subplots()
    ax.scatter(xs, ys, s=14, color="0.55", label="trial", zorder=2)
    best, run = [], -math.inf
    for y in ys:
        run = max(run, y)
        best.append(run)
    ax.step(xs, best, where="post", color="C0", lw=1.8, label="best so far", zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(which="both", labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def search(source: Source, out: Path, storage: str | None, study_name: str | None) -> Section:
    sec = Section("search", "Search progress and parameter importance")
    study, where = _study(source, storage, study_name)
    objective = (source.parent.tags.get(schema.OBJECTIVE_NAME) if source.parent else None) or "objective"
    complete = []
    if study is not None:
        import optuna

        trials = study.get_trials(deepcopy=False)
        # values[0] is the objective (accuracy) for single- and multi-objective studies alike.
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.values]
        other = len(trials) - len(complete)
        if complete:
            _progress_plot([t.number + 1 for t in complete], [float(t.values[0]) for t in complete],
                           out / "search_progress.png", "trial, in the order the search asked for it (1 = first)",
                           objective)
            sec.figures.append(Figure("search_progress.png", (
                f"Search progress: the objective ({objective}) of each completed trial (grey) and the best so far "
                f"(blue), by trial number; from the {where}. {len(complete)} completed trial(s)"
                f"{f', {other} pruned, failed or running' if other else ''}.")))
        else:
            sec.notes.append(f"The {where} has no completed trial yet, so there is no search progress to plot.")
    else:
        reps = [r for r in representatives(source.runs) if objective_of(r) is not None]
        reps.sort(key=lambda r: r.start_time)
        if reps:
            _progress_plot(list(range(1, len(reps) + 1)), [float(objective_of(r)) for r in reps],
                           out / "search_progress.png", "trial (in start order)", objective)
            sec.figures.append(Figure("search_progress.png", (
                f"Search progress: the objective of each trial (grey; one representative MLflow run per trial) and "
                f"the best so far (blue), in start order. From MLflow: {where}.")))
        else:
            sec.notes.append(f"No trial has an objective yet, and {where}; so there is no search progress to plot.")
    if study is None:
        sec.notes.append(f"Parameter importance needs the Optuna study: {where}.")
        return sec
    if len(complete) < 2:
        sec.notes.append(f"Parameter importance needs at least 2 completed Optuna trials; the study has {len(complete)}.")
        return sec
    try:
        import optuna

        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(n_trees=32, seed=0),
            target=(lambda t: t.values[0]) if len(study.directions) > 1 else None)
    except Exception as err:  # noqa: BLE001 - e.g. a single distinct value per parameter
        sec.notes.append(f"Optuna could not compute parameter importances: {type(err).__name__}: {err}")
        return sec
    if not imp:
        sec.notes.append("Optuna found no parameter that varies across the completed trials, so there are no "
                         "importances to plot.")
        return sec
    names = list(imp)[::-1]
    fig = _new_figure(6.0, max(2.2, 0.9 + 0.32 * len(names)))
    ax = fig.subplots()
    ax.barh(names, [imp[n] for n in names], color="C0")
    for i, n in enumerate(names):
        ax.text(imp[n], i, f" {imp[n]:.2f}", va="center", fontsize=7)
    ax.set_xlim(0, max(imp.values()) * 1.2 or 1)
    ax.set_xlabel(f"importance for {objective} (fANOVA, sums to 1)", fontsize=8)
    ax.tick_params(which="both", labelsize=7)
    ax.grid(alpha=0.3, axis="x")
    _save(fig, out / "param_importance.png")
    sec.figures.append(Figure("param_importance.png", (
        f"Parameter importance: the share of the objective's variance across the {len(complete)} completed trials "
        "that each searched parameter explains (Optuna's fANOVA evaluator, seed 0). With few trials these numbers "
        "are rough.")))
    return sec


def perturbation(runs: list[RunRow], out: Path, colors: dict[str, Any]) -> Section:
    sec = Section("perturbation", "003: accuracy with and without the perturbation b")
    pts = [r for r in runs if r.gar in PERTURBATION_GARS and r.num("perturbation") is not None and r.score is not None]
    panels: dict[tuple, list[RunRow]] = defaultdict(list)
    for r in pts:
        panels[(r.params.get("dataset", "?"), r.partition_label, r.attack_label, r.f_label, r.privacy_label)].append(r)
    panels = {k: v for k, v in panels.items() if any((r.num("perturbation") or 0) > 0 for r in v)}
    if not panels:
        sec.notes.append("No sign_majority or median run with a perturbation b > 0 (paper 003's noisy signSGD / "
                         "medianSGD), so there is nothing to compare.")
        return sec
    keys = sorted(panels)[:MAX_PANELS]
    ncols = min(2, len(keys))
    fig = _new_figure(5.0 * ncols, 3.4 * math.ceil(len(keys) / ncols) + 0.3)
    for ax, key in zip(_grid(fig, len(keys), ncols), keys, strict=True):
        by_gar: dict[str, dict[float, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for r in panels[key]:
            by_gar[r.gar][r.num("perturbation")][r.seed].append(r.score)
        top = 0.0
        allb: list[float] = []
        for gar in sorted(by_gar):
            bs = sorted(b for b in by_gar[gar] if b > 0)
            allb += bs
            if bs:
                stats = [_spread(by_gar[gar][b]) for b in bs]
                ax.plot(bs, [s[0] for s in stats], marker="o", ms=4, color=colors[gar], label=f"{gar}, b > 0")
                lo, hi = [s[1] for s in stats], [s[2] for s in stats]
                if any(h > low for h, low in zip(hi, lo, strict=True)):
                    ax.fill_between(bs, lo, hi, color=colors[gar], alpha=0.18, lw=0)
                top = max(top, *hi)
            if 0.0 in by_gar[gar]:
                m0 = _spread(by_gar[gar][0.0])[0]
                ax.axhline(m0, color=colors[gar], ls="--", lw=1.2, label=f"{gar}, b = 0 ({m0:.3f})")
                top = max(top, m0)
        _value_axis(ax, allb, log=True)
        ax.set_ylim(0, min(1.0, top * 1.15 + 0.02))
        ax.set_title(", ".join(key), fontsize=8)
        style_axes(ax, "perturbation b (std of the noise added to each local gradient)", "max cross-accuracy")
    _save(fig, out / "perturbation.png")
    sec.figures.append(Figure("perturbation.png", (
        "Paper 003: max cross-accuracy of noisy signSGD (sign_majority) and noisy medianSGD (median) against the "
        "perturbation b (log scale; each worker adds b * N(0, I) to its local gradient), one panel per data "
        "partition, attack and privacy setting. Markers: mean over seeds of each seed's best run at that b (band: "
        "min-max over seeds); dashed: the same GAR without perturbation (b = 0). "
        f"{len(pts)} runs.")))
    return sec


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1280px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }}
h1 {{ font-size: 1.5em; margin-bottom: 0.2em; }}
h2 {{ font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }}
table {{ border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }}
code {{ font-size: 0.92em; background: #f4f4f4; padding: 0 0.2em; }}
figure {{ margin: 1em 0; }}
figure img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ font-size: 0.9em; color: #444; max-width: 60em; }}
p.note {{ color: #8a5a00; background: #fff8e6; border-left: 3px solid #e0a800; padding: 0.3em 0.6em; }}
.muted {{ color: #777; font-size: 0.85em; }}
p.verdict {{ background: #eef4ff; border-left: 3px solid #3366cc; padding: 0.4em 0.7em; max-width: 60em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="muted">{subtitle}</p>
{body}
<script>
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesTotal = String(imgs.length);
  document.body.dataset.imagesLoaded = String(imgs.filter(function (i) {{
    return i.complete && i.naturalWidth > 0; }}).length);
}});
</script>
</body>
</html>
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _key_config(r: RunRow) -> str:
    parts = [f"gar={r.gar}"]
    gp = r.params.get("gar.params")
    if gp and gp not in ("{}", "null"):
        parts[0] += f" {gp}"
    for key in ("batch_size", "lr", "momentum", "clip", "perturbation"):
        if key in r.params:  # searched floats print as 0.1 / 0.0031, not with 17 digits
            v = _num(r.params[key])
            parts.append(f"{key}={r.params[key] if v is None or v == int(v) else f'{v:.3g}'}")
    parts += [r.f_label, f"n={r.params.get('n_workers', '?')}", r.privacy_label, f"attack={r.attack_label}"]
    return ", ".join(parts)


def _summary_html(source: Source, reps: list[RunRow], stats: dict[str, int], n_trials: int) -> str:
    rows: list[tuple[str, str]] = []
    p = source.parent
    rows.append(("Job", f"<code>{_e(source.job)}</code>" if source.job else "(no tune job: runs of the experiment)"))
    rows.append(("Experiment", _e(source.experiment)))
    rows.append(("Tracking URI", f"<code>{_e(source.uri)}</code>"))
    if p is not None:
        rows.append(("Job run", f"<code>{_e(p.run_id)}</code> ({_e(p.tags.get(schema.STATUS, p.status))})"))
        rows.append(("Objective", _e(p.tags.get(schema.OBJECTIVE_NAME, "max_cross_accuracy"))))
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(stats.items()))
    rows.append(("Trials", f"{n_trials} trial(s), {len(source.runs)} run(s){f' ({_e(counts)})' if counts else ''}"))
    if reps:
        b = reps[0]
        score = objective_of(b)
        rows.append(("Best score", f"{score:.4f}" if score is not None else "?"))
        rows.append(("Best run id", f"<code id=\"best-run-id\">{_e(b.run_id)}</code>"
                     + (f" (trial {_e(b.tags[schema.TRIAL])})" if schema.TRIAL in b.tags else "")))
        rows.append(("Best config", _e(_key_config(b))))
        if schema.POINT in b.tags:
            rows.append(("Searched point", f"<code>{_e(b.tags[schema.POINT])}</code>"))
        if source.job:
            rows.append(("Reproduce", f"<code>tuneguard export --job {_e(source.job)} -o best.yaml &amp;&amp; "
                                      "tuneguard train best.yaml</code>"))
    else:
        rows.append(("Best", "no completed, scored trial yet"))
    out = ["<h2>Summary</h2>", '<table id="summary">']
    out += [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows]
    out.append("</table>")
    if len(reps) > 1:
        out.append(f"<h3>Top {min(MAX_TOP, len(reps))} trials</h3>")
        out.append('<table id="top"><tr><th>#</th><th>score</th><th>max cross-acc.</th><th>config</th>'
                   "<th>run id</th></tr>")
        for i, r in enumerate(reps[:MAX_TOP], start=1):
            score, acc = objective_of(r), r.score
            out.append(f"<tr><td>{i}</td><td>{'' if score is None else f'{score:.4f}'}</td>"
                       f"<td>{'' if acc is None else f'{acc:.4f}'}</td><td>{_e(_key_config(r))}</td>"
                       f"<td><code>{_e(r.run_id)}</code></td></tr>")
        out.append("</table>")
    return "\n".join(out)


def _section_html(sec: Section) -> str:
    out = [f'<section id="{_e(sec.key)}">', f"<h2>{_e(sec.title)}</h2>"]
    out += [f'<p class="note">{_e(n)}</p>' for n in sec.notes]
    out += sec.html
    for f in sec.figures:
        out.append(f'<figure><img src="{_e(f.file)}" alt="{_e(sec.title)}"><figcaption>{_e(f.caption)}</figcaption>'
                   "</figure>")
    out.append("</section>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def generate_report(
    tracking_uri: str | None = None,
    job: str | None = None,
    experiment: str | None = None,
    out_dir: str | Path = "report",
    *,
    optuna_storage: str | None = None,
    study: str | None = None,
    log_artifacts: bool = True,
) -> Report:
    """Write the report of a tune job (default: the latest job in the store) to ``out_dir``."""
    from tuneguard.tracking import client as make_client
    from tuneguard.tracking import resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if optuna_storage and "://" not in optuna_storage:  # a path to an optuna.db
        if not Path(optuna_storage).is_file():
            raise ReportError(f"--optuna-storage {optuna_storage}: no such file (pass an optuna.db path or a "
                              "storage URL such as sqlite:///path/optuna.db)")
        optuna_storage = f"sqlite:///{Path(optuna_storage).resolve()}"
    uri = resolve_tracking_uri(tracking_uri)
    cl = make_client(uri)
    source = load_source(cl, uri, job, experiment)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"-o {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_FILES:  # no stale figure from an earlier report
        (out / name).unlink(missing_ok=True)

    trained = [r for r in source.runs if r.score is not None]
    colors = _colors(r.gar for r in source.runs if r.gar)
    sections = [bound_section(cl, trained), accuracy_vs_batch(trained, out, colors), vn_ratio(cl, trained, out, colors),
                search(source, out, optuna_storage, study), perturbation(trained, out, colors), pareto(source.runs, out)]

    reps = representatives(source.runs)
    stats: dict[str, int] = defaultdict(int)
    for r in source.runs:
        stats[r.outcome] += 1
    n_trials = len({_trial_key(r) for r in source.runs})
    what = f"tune job {source.job}" if source.job else f"experiment {source.experiment}"
    subtitle = f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by <code>tuneguard report</code> from {_e(uri)}."
    if source.parent is not None and log_artifacts:
        subtitle += f" Also logged as artifacts <code>report/</code> of run <code>{_e(source.parent.run_id)}</code>."
    body = "\n".join([_summary_html(source, reps, stats, n_trials), *(_section_html(s) for s in sections)])
    index = out / "index.html"
    index.write_text(PAGE.format(title=_e(f"tuneguard report: {what}"), subtitle=subtitle, body=body), encoding="utf-8")

    report = Report(index, out, source.job, source.experiment, source.parent.run_id if source.parent else None,
                    len(source.runs), n_trials, reps[0].run_id if reps else None,
                    objective_of(reps[0]) if reps else None, sections)
    if source.parent is not None and log_artifacts:
        try:
            for p in [index, *report.figures]:
                cl.log_artifact(source.parent.run_id, str(p), "report")
            report.artifacts_logged = True
        except Exception as err:  # noqa: BLE001 - the files on disk are the report; say what failed
            report.artifact_error = f"{type(err).__name__}: {err}"
    return report


def build_report(
    tracking_uri: str | None = None,
    job: str | None = None,
    experiment: str | None = None,
    out_dir: str | Path = "report",
    *,
    optuna_storage: str | None = None,
    study: str | None = None,
    log_artifacts: bool = True,
) -> Path:
    """Write the report (see the module docstring) and return the path of its ``index.html``.

    Raises :class:`ReportError` for a job or experiment the store does not hold, or no runs.
    """
    return generate_report(tracking_uri, job, experiment, out_dir, optuna_storage=optuna_storage, study=study,
                           log_artifacts=log_artifacts).index
