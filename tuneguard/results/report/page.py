"""The report's HTML page and its assembly: read the store (:mod:`.data`), draw the figures
(:mod:`.figures`), and write ``index.html`` around them: the summary, the "why" verdict and
table, each section with its figure, caption and notes, the Pareto front's table.
"""

from __future__ import annotations

import html
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneguard.results import schema
from tuneguard.results.report import data, figures
from tuneguard.results.report.data import (
    HeldRow,
    ReportError,
    RunRow,
    Source,
    objective_of,
    representatives,
)
from tuneguard.results.report.figures import FIGURE_FILES, Section

MAX_TOP = 10


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
            v = data.num(r.params[key])
            parts.append(f"{key}={r.params[key] if v is None or v == int(v) else f'{v:.3g}'}")
    parts += [r.f_label, f"n={r.params.get('n_workers', '?')}", r.privacy_label, f"attack={r.attack_label}"]
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Why: did 001's robustness condition hold?
# --------------------------------------------------------------------------------------------
NEVER_HELD = ("The VN bound never held in this job: in none of the {steps} logged steps of its {runs} run(s) with a "
              "known bound was the submitted VN ratio under the GAR's bound 1/kappa (the submitted ratio was "
              "{ratio} times the bound, median over runs). This is paper 001's central finding: the DP noise spreads "
              "the honest workers' vectors so much that the robust GAR's guarantee (Theorem 1's condition) does "
              "not apply. The winner below is the configuration that trained best without that guarantee, not one "
              "that satisfied it; to get it back, raise the batch size or the privacy budget (less noise per "
              "vector), or choose a GAR with a larger bound.")


def bound_section(rows: list[HeldRow]) -> Section:
    """Why the winner won: did any run keep 001's robustness condition VN < 1/kappa?"""
    sec = Section("why", "Why: did the robustness condition hold?")
    if not rows:
        sec.notes.append("No trained run has both a VN ratio and a known VN bound, so whether 001's condition held "
                         "cannot be said.")
        return sec
    ratios = [h.run.metrics[schema.VN_OVER_BOUND_MEDIAN] for h in rows if schema.VN_OVER_BOUND_MEDIAN in h.run.metrics]
    ratio = f"{sorted(ratios)[len(ratios) // 2]:.2g}" if ratios else "more than 1"
    steps = sum(h.steps for h in rows)
    if all(h.frac == 0 for h in rows):
        sec.html.append(f'<p class="verdict" id="bound-never-held">{_e(NEVER_HELD.format(steps=steps, runs=len(rows), ratio=ratio))}</p>')
    else:
        some = [h for h in rows if h.frac > 0]
        sec.html.append(f'<p class="verdict" id="bound-held">The VN bound held in {len(some)} of {len(rows)} run(s) '
                        f"with a known bound (at {max(h.frac for h in some):.0%} of the steps at best): in those runs "
                        "the GAR's robustness guarantee (001 Theorem 1) applied at least part of the time.</p>")
    top = sorted(rows, key=lambda h: -(h.run.score or 0.0))[:MAX_TOP]
    out = ['<table id="why"><tr><th>run</th><th>max cross-acc.</th><th>bound held (share of steps)</th>'
           "<th>vn_submit / bound (median)</th><th>noise share of the variance (mean)</th></tr>"]
    for h in top:
        r = h.run
        over, share = r.metrics.get(schema.VN_OVER_BOUND_MEDIAN), r.metrics.get(schema.NOISE_SHARE_MEAN)
        out.append(f"<tr><td>{_e(r.name or r.run_id)}</td><td>{r.score:.4f}</td><td>{h.frac:.0%}</td>"
                   f"<td>{'' if over is None else f'{over:.3g}'}</td><td>{'' if share is None else f'{share:.0%}'}</td></tr>")
    out.append("</table>")
    sec.html.append("\n".join(out))
    sec.html.append('<p class="muted">bound held: the share of steps with vn_submit &lt; 1/kappa; noise share: '
                    "1 - Var(sample) / Var(submit), how much of the spread the GAR sees the DP noise (and momentum) "
                    "adds to the batch gradients' own.</p>")
    return sec


# --------------------------------------------------------------------------------------------
# The Pareto front's table
# --------------------------------------------------------------------------------------------
def pareto_section(front: data.Frontier, out: Path) -> Section:
    """The front's figure (:func:`figures.pareto`) and, under it, its trials as a table."""
    sec = figures.pareto(front, out)
    if not sec.figures:
        return sec
    f_col = "<th>f</th>" if front.by_f else ""
    rows = [f'<table id="front"><tr><th>total eps</th><th>objective</th>{f_col}<th>config</th><th>run id</th></tr>']
    for p in front.front:
        f_cell = f"<td>{p.f}</td>" if front.by_f else ""
        rows.append(f"<tr><td>{p.eps:.4g}</td><td>{p.objective:.4f}</td>{f_cell}<td>{_e(_key_config(p.run))}</td>"
                    f"<td><code>{_e(p.run.run_id)}</code></td></tr>")
    rows.append("</table>")
    sec.html.append("\n".join(rows))
    return sec


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
    source = data.load_source(cl, uri, job, experiment)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"-o {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_FILES:  # no stale figure from an earlier report
        (out / name).unlink(missing_ok=True)

    trained = [r for r in source.runs if r.score is not None]
    colors = figures.colors(r.gar for r in source.runs if r.gar)
    sections = [bound_section(data.held_rows(cl, trained)),
                figures.accuracy_vs_batch(trained, out, colors),
                figures.vn_ratio(data.vn_data(cl, trained, figures.MAX_PANELS), out, colors),
                figures.search(data.search_data(source, optuna_storage, study), out),
                figures.perturbation(trained, out, colors),
                pareto_section(data.frontier(source.runs, data.maximises_f(source.objective_name)), out)]

    reps = representatives(source.runs)
    stats: dict[str, int] = defaultdict(int)
    for r in source.runs:
        stats[r.outcome] += 1
    n_trials = len({data.trial_key(r) for r in source.runs})
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
    """Write the report (see :mod:`tuneguard.results.report`) and return the path of its
    ``index.html``.

    Raises :class:`ReportError` for a job or experiment the store does not hold, or no runs.
    """
    return generate_report(tracking_uri, job, experiment, out_dir, optuna_storage=optuna_storage, study=study,
                           log_artifacts=log_artifacts).index
