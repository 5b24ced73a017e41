"""The report's figures: each function takes typed rows from :mod:`.data` and a folder, draws one
PNG there and returns the :class:`Section` that shows it (or says why there is nothing to draw).
No MLflow or Optuna calls here: what a figure needs is read before it is drawn.

- ``accuracy_vs_batch.png``: max cross-accuracy against the batch size, one line per GAR, one
  panel per (attack, f, privacy budget), as 001 Figure 2: the line is the mean over seeds, the
  band the min-max over seeds;
- ``vn_ratio.png``: the VN ratio (sample and submit) over the steps of the best run of each GAR
  under each attack, against that GAR's bound 1/kappa (dashed), log scale, as 001 Figure 5;
- ``search_progress.png`` and ``param_importance.png``: the objective of each trial and the best
  so far, and Optuna's parameter importances (fANOVA);
- ``perturbation.png``: for 003-style runs (``sign_majority`` / ``median`` with a
  ``perturbation`` b), accuracy against b, with the b = 0 runs as dashed reference lines;
- ``pareto_front.png``: objective against total epsilon and the non-dominated trials; with the
  ``accuracy_eps_f`` objective, one front per tolerated f (see :func:`pareto`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from tuneguard.results.axes import style_axes
from tuneguard.results.report.data import Frontier, RunRow, SearchData, VnData, fmt

DPI = 100
MAX_PANELS = 12
FIGURE_FILES = ("accuracy_vs_batch.png", "vn_ratio.png", "search_progress.png", "param_importance.png",
                "perturbation.png", "pareto_front.png")
PERTURBATION_GARS = ("sign_majority", "median")


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
    html: list[str] = field(default_factory=list)  # already escaped: statements and tables (see page.py)


# --------------------------------------------------------------------------------------------
# Drawing helpers
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


def colors(names: Iterable[str]) -> dict[str, Any]:
    """One tab10 colour per name (GAR), the same in every figure of a report."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(sorted(set(names)))}


def _spread(values_by_seed: dict[str, list[float]]) -> tuple[float, float, float, int]:
    """Per seed the best value; then (mean, min, max, n seeds) over seeds."""
    best = [max(v) for v in values_by_seed.values() if v]
    return mean(best), min(best), max(best), len(best)


def _value_axis(ax, xs: list[float], log: bool | None = None, fmt: str = "g") -> None:
    """Log x scale when asked or when the values span 4x or more; ticks at the values when few,
    labelled with the format spec ``fmt`` (".3g" for measured values such as an eps spent)."""
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
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:{fmt}}"))
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


# --------------------------------------------------------------------------------------------
# 001 Figure 2: accuracy against the batch size
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# 001 Figure 5: the VN ratio against the bound
# --------------------------------------------------------------------------------------------
def vn_ratio(data: VnData, out: Path, colors: dict[str, Any]) -> Section:
    """One panel per attack (001 Figure 5 compares GARs under one attack): in each, every GAR's
    best run under that attack, its submitted VN ratio (solid), its sample ratio (dotted) and its
    bound 1/kappa (dashed, same colour). Panels never mix attacks."""
    sec = Section("vn", "VN ratio against the GAR's bound, per attack")
    if not data.attacks:
        sec.notes.append("No trained run logged the VN ratio (metrics vn_sample / vn_submit), so there is nothing to "
                         "plot.")
        return sec
    from matplotlib.ticker import MaxNLocator

    if len(data.attacks) > MAX_PANELS:
        sec.notes.append(f"{len(data.attacks)} attacks; the first {MAX_PANELS} are shown.")
    if not data.panels:
        sec.notes.append("The runs' VN-ratio histories hold no positive finite values, so there is nothing to plot.")
        return sec
    panels = data.panels
    ncols = min(3, len(panels))
    fig = _new_figure(4.6 * ncols, 3.4 * math.ceil(len(panels) / ncols) + 0.3)
    described = []
    for ax, (attack, lines) in zip(_grid(fig, len(panels), ncols), panels, strict=True):
        values: list[float] = []
        for line in lines:
            r, bound = line.run, line.bound
            c = colors[r.gar]
            if line.sample:
                ax.plot(*zip(*line.sample, strict=True), ":", lw=1.1, color=c, alpha=0.8)
            if line.submit:
                ax.plot(*zip(*line.submit, strict=True), "-", lw=1.5, color=c,
                        label=f"{r.gar} b={fmt(r.num('batch_size'))}")
            if bound is not None and bound > 0:
                ax.axhline(bound, color=c, ls="--", lw=1.1)
                values.append(bound)
            values += [v for _, v in line.sample] + [v for _, v in line.submit]
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


# --------------------------------------------------------------------------------------------
# The search: progress and parameter importance
# --------------------------------------------------------------------------------------------
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


def search(data: SearchData, out: Path) -> Section:
    sec = Section("search", "Search progress and parameter importance")
    objective, where = data.objective, data.where
    if data.has_study:
        if data.trials:
            _progress_plot([n for n, _ in data.trials], [v for _, v in data.trials], out / "search_progress.png",
                           "trial, in the order the search asked for it (1 = first)", objective)
            sec.figures.append(Figure("search_progress.png", (
                f"Search progress: the objective ({objective}) of each completed trial (grey) and the best so far "
                f"(blue), by trial number; from the {where}. {len(data.trials)} completed trial(s)"
                f"{f', {data.other} pruned, failed or running' if data.other else ''}.")))
        else:
            sec.notes.append(f"The {where} has no completed trial yet, so there is no search progress to plot.")
    elif data.reps:
        _progress_plot(list(range(1, len(data.reps) + 1)), data.reps, out / "search_progress.png",
                       "trial (in start order)", objective)
        sec.figures.append(Figure("search_progress.png", (
            f"Search progress: the objective of each trial (grey; one representative MLflow run per trial) and "
            f"the best so far (blue), in start order. From MLflow: {where}.")))
    else:
        sec.notes.append(f"No trial has an objective yet, and {where}; so there is no search progress to plot.")
    if not data.has_study:
        sec.notes.append(f"Parameter importance needs the Optuna study: {where}.")
        return sec
    if len(data.trials) < 2:
        sec.notes.append(f"Parameter importance needs at least 2 completed Optuna trials; the study has {len(data.trials)}.")
        return sec
    if data.importance_error is not None:
        sec.notes.append(f"Optuna could not compute parameter importances: {data.importance_error}")
        return sec
    imp = data.importances or {}
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
        f"Parameter importance: the share of the objective's variance across the {len(data.trials)} completed trials "
        "that each searched parameter explains (Optuna's fANOVA evaluator, seed 0). With few trials these numbers "
        "are rough.")))
    return sec


# --------------------------------------------------------------------------------------------
# Paper 003: the perturbation b
# --------------------------------------------------------------------------------------------
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
# The accuracy-privacy trade-off
# --------------------------------------------------------------------------------------------
def pareto(data: Frontier, out: Path) -> Section:
    """The accuracy-privacy trade-off: each trial's objective (worst-case max cross-accuracy)
    against its total epsilon, and the non-dominated trials (the front a user picks a budget on;
    ``tuneguard export --eps E`` takes the most accurate point with eps <= E)."""
    if data.by_f:
        return _pareto_by_f(data, out)
    sec = Section("pareto", "Accuracy against privacy: the Pareto front")
    pts, front = data.points, data.front
    if len({p.eps for p in pts}) < 2:
        sec.notes.append("Fewer than two trials with different total epsilon (metric eps_total, logged by tune "
                         "jobs with DP), so there is no trade-off to draw; tune.objective: accuracy_vs_eps searches it.")
        return sec
    fig = _new_figure(6.0, 3.6)
    ax = fig.subplots()
    ax.scatter([p.eps for p in pts], [p.objective for p in pts], s=16, color="0.6", label="trial", zorder=2)
    ax.step([p.eps for p in front], [p.objective for p in front], where="post", color="C3", lw=1.8, zorder=3)
    ax.scatter([p.eps for p in front], [p.objective for p in front], s=30, color="C3", label="Pareto front", zorder=4)
    if max(p.eps for p in pts) / max(min(p.eps for p in pts), 1e-12) >= 10:
        ax.set_xscale("log")
    style_axes(ax, "total epsilon spent per worker (lower = more private)", "objective (max cross-accuracy)", legend_loc="lower right")
    _save(fig, out / "pareto_front.png")
    sec.figures.append(Figure("pareto_front.png", (
        f"Each trial's objective against the total epsilon its runs spent (accountant, delta of the config); red, "
        f"the {len(front)} trial(s) no other trial beats on both. Pick a budget on the x axis; "
        "`tuneguard export --eps E` writes the most accurate trial within it.")))
    return sec


def _pareto_by_f(data: Frontier, out: Path) -> Section:
    """Three objectives (``accuracy_eps_f``) on one chart: objective against total epsilon, one
    colour per tolerated f. For each f level F, a step line: the front of the trials that
    tolerate at least F Byzantine workers (the trade-off open to a user who must tolerate F; it
    can only move down and right as F grows). Trials on the three-objective front are ringed."""
    from matplotlib import colormaps

    sec = Section("pareto", "Accuracy against privacy and robustness: the Pareto front, per tolerated f")
    pts = data.points
    if len({(p.eps, p.f) for p in pts}) < 2:
        sec.notes.append("Fewer than two trials that differ in total epsilon or f (metric eps_total, param f), so "
                         "there is no trade-off to draw; tune.objective: accuracy_eps_f searches it.")
        return sec
    levels = sorted(data.levels)
    cmap = colormaps["viridis"]  # dark = small f, light = large f; 0.15..0.85 keeps both ends readable
    color = {f: cmap(0.15 + 0.7 * i / max(1, len(levels) - 1)) for i, f in enumerate(levels)}
    fig = _new_figure(6.4, 3.8)
    ax = fig.subplots()
    for f in levels:
        mine = [p for p in pts if p.f == f]
        ax.scatter([p.eps for p in mine], [p.objective for p in mine], s=16, color=color[f], alpha=0.55, zorder=2)
        line = data.levels[f]
        ax.step([p.eps for p in line], [p.objective for p in line], where="post", color=color[f], lw=1.8, zorder=3,
                label=f"front of trials with f >= {f}")
    ax.scatter([p.eps for p in data.front], [p.objective for p in data.front], s=46, facecolors="none",
               edgecolors="black", lw=1.1, label="Pareto front (eps, objective, f)", zorder=4)
    _value_axis(ax, [p.eps for p in pts], fmt=".3g")  # log when eps spans 4x or more; ticks at the budgets when few
    style_axes(ax, "total epsilon spent per worker (lower = more private)", "objective (max cross-accuracy)")
    _save(fig, out / "pareto_front.png")
    sec.figures.append(Figure("pareto_front.png", (
        "Each trial's objective against the total epsilon its runs spent (accountant, delta of the config), coloured "
        "by the number of Byzantine workers f it trained against (dark: few, light: many). Each step line is the "
        "front of the trials with at least that f: the best accuracy for each budget when you must tolerate f "
        f"attackers. Ringed: the {len(data.front)} trial(s) no other trial beats on all three of eps, accuracy "
        "and f. `tuneguard export --eps E` writes the most accurate trial within the budget (the larger f on ties).")))
    return sec
