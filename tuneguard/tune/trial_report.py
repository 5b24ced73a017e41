"""What a trial reports to Ray Tune, typed: one dataclass instead of dicts spelled in three files.

The trainable (:mod:`tuneguard.tune.objective`) builds a :class:`TrialReport` at every evaluation
step and at the end and hands ``report.to_tune()`` to ``tune.report``; the driver side (the
job summary, the progress view, the MLflow job tracker) reads Tune's results back with
:meth:`TrialReport.of`. Tune needs a flat dict of numbers and strings; the searched metrics are
``objective`` and, for multi-objective entries, ``eps_total`` and ``f_tolerated`` (see
tune/objectives.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrialReport:
    objective: float  # the objective's accuracy score so far (mean over seeds of min over attacks)
    step: int = 0
    eps_total: float = math.inf  # the trial's privacy cost (accuracy_vs_eps minimises it)
    f_tolerated: int = 0  # the Byzantine workers its config trained against (accuracy_eps_f maximises it)
    trial_done: int = 0  # 1 on the final report
    infeasible: int = 0  # the privacy budget cannot be met by this config
    excluded: int = 0  # a combination the GAR cannot take (or an invalid config)
    reason: str = ""  # why infeasible / excluded
    cross_accuracy: float | None = None  # the worst run's latest accuracy
    max_cross_accuracy: float | None = None  # the representative run's max cross-accuracy (final)
    worst_attack: str | None = None
    eps_spent: float | None = None
    vn_submit: float | None = None
    diverged: int | None = None
    run_ids: str = ""  # the trial's MLflow runs, comma-separated
    best_run_id: str = ""  # the run that carries the trial's score (representative)

    def to_tune(self) -> dict[str, Any]:
        """The dict for ``tune.report`` (None fields left out: Tune stores numbers and strings)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def of(cls, result: dict[str, Any] | None) -> TrialReport:
        """A Tune result (or a stored one) read back; keys Tune adds are ignored."""
        r = result or {}
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in r.items() if k in names and k != "objective"},
                     objective=float(r.get("objective", 0.0) or 0.0))

    @property
    def outcome(self) -> str:
        """done | infeasible | excluded | stopped (ASHA, or an interrupt)."""
        if self.excluded:
            return "excluded"
        if self.infeasible:
            return "infeasible"
        return "done" if self.trial_done else "stopped"

    @property
    def scored(self) -> bool:
        """A finished, feasible trial whose objective counts."""
        return bool(self.trial_done) and not self.infeasible and not self.excluded
