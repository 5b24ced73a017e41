"""The report of a tune job: PNG figures and one self-contained HTML page, read back from MLflow.

``tuneguard report -o DIR`` (or :func:`build_report`) writes ``DIR/index.html`` and, where the
store holds the data for them, the figures of :mod:`.figures` (``accuracy_vs_batch.png``,
``vn_ratio.png``, ``search_progress.png``, ``param_importance.png``, ``perturbation.png``,
``pareto_front.png``). A figure without data is left out and the page says why. When the job
has a parent run, the report's files are also logged to it as artifacts under ``report/``.

Three modules, one job each:

- :mod:`.data` reads the store (MLflow runs, metric histories, the Optuna study) into typed rows;
- :mod:`.figures` draws those rows, one PNG and one :class:`Section` per figure, no store calls;
- :mod:`.page` assembles them: the summary, the "why" verdict, the tables and ``index.html``.
"""

from __future__ import annotations

from tuneguard.results.report.data import (
    ReportError,
    RunRow,
    Source,
    held_fraction,
    load_source,
    objective_of,
    representatives,
)
from tuneguard.results.report.figures import FIGURE_FILES, Figure, Section
from tuneguard.results.report.page import Report, build_report, generate_report

__all__ = ["FIGURE_FILES", "Figure", "Report", "ReportError", "RunRow", "Section", "Source", "build_report",
           "generate_report", "held_fraction", "load_source", "objective_of", "representatives"]
