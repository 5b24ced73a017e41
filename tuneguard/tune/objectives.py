"""Objectives of a tune job as a registry: one spec per objective, in this file only.

A spec says which runs a trial trains, how their numbers reduce to the trial's score(s), and
how trials compare (the Tune metrics and their modes, which Optuna turns into directions):

- ``max_cross_accuracy`` (001 Figure 2): one run per seed against the scenario's one attack;
  score = mean over seeds of the run's max cross-accuracy (max_t acc(theta_t) on the test set).
- ``worst_case``: one run per (attack of ``scenario.attacks``, seed);
  score = mean over seeds of min over attacks of the max cross-accuracy. The attack a user meets
  is not known in advance, so a config is as good as its worst attack.
- ``accuracy_vs_eps`` (multi-objective): the worst_case score (maximised) and the total epsilon
  the accountant says a worker spent, eps_total = max over the trial's runs of eps_spent
  (minimised). Users rarely know their budget in advance; this searches the privacy-robustness-
  accuracy trade-off instead, with Optuna's multi-objective TPE through Ray Tune's OptunaSearch
  (a list of metrics and modes), and the report draws the Pareto front. Search a privacy knob
  (``privacy.total_eps``, ``privacy.eps``, ``privacy.sigma`` or ``batch_size``) so eps varies.
- ``accuracy_eps_f`` (three objectives): accuracy_vs_eps, and also the tolerated number of
  Byzantine workers f_tolerated = the f the trial's config trained against (maximised; 0 for a
  trial that did not train). The accuracy already measures how well the config held up against
  those f workers, so the front answers "how accurate, at what privacy cost, against how many
  attackers". The space must search ``f`` (e.g. ``f: [1, 2, 3]``); combinations a GAR cannot
  take (median, MDA: n >= 2f + 1; Krum: n >= 2f + 3; Bulyan: n >= 4f + 3) are excluded as usual.

The reported Tune keys: OBJECTIVE ("objective", the accuracy score), EPS_TOTAL ("eps_total") and
F_TOLERATED ("f_tolerated"), on every report (Tune checks each searched metric is there); a
trial without DP has eps_total = inf (no guarantee).

The fronts (:func:`pareto_front`, :func:`pareto_front_f`, :func:`fronts_by_f`): a point p is
dominated when another q is at least as good on every objective and better on one,

    q dominates p  <=>  eps_q <= eps_p, acc_q >= acc_p, (f_q >= f_p,) and q != p on one of them,

and a front is the set of points nothing dominates. Of points equal on every objective, one is
kept (the first given). With f, points equal in (eps, accuracy) differ only in f, so the larger
f dominates: that is the tie rule of ``tuneguard export --eps`` as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tuneguard.results.schema import EPS_TOTAL, F_TOLERATED, OBJECTIVE


def _finite(x: Any, default: float = 0.0) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def mean_of_worst(values: dict[str, float], specs: Sequence[Any]) -> float:
    """Mean over seeds of the minimum over attacks (``values`` by run key; ``specs`` the trial's
    RunSpecs, with ``key`` and ``seed``). With one attack this is the mean over seeds."""
    by_seed: dict[Any, list[float]] = {}
    for s in specs:
        by_seed.setdefault(s.seed, []).append(_finite(values.get(s.key)))
    return sum(min(v) for v in by_seed.values()) / len(by_seed)


def eps_total(eps: dict[str, float | None]) -> float:
    """The trial's privacy cost: the largest total epsilon any of its runs spent (inf without DP)."""
    vals = [float(v) for v in eps.values() if v is not None and math.isfinite(float(v))]
    return max(vals) if vals else math.inf


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    description: str
    every_attack: bool  # True: one run per attack of scenario.attacks; False: the one attack
    metrics: tuple[str, ...]  # the Tune metrics a trial reports, compared in this order
    modes: tuple[str, ...]  # "max" / "min", one per metric
    reduce: Callable[[dict[str, float], Sequence[Any]], float] = mean_of_worst
    paper: str = ""

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

    def search_metric(self) -> str | list[str]:
        """OptunaSearch's ``metric`` (a list for multi-objective)."""
        return list(self.metrics) if self.multi else self.metrics[0]

    def search_mode(self) -> str | list[str]:
        return list(self.modes) if self.multi else self.modes[0]

    @property
    def maximises_f(self) -> bool:
        """Whether the tolerated f is an objective (the space must then search f)."""
        return F_TOLERATED in self.metrics


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    if spec.name in OBJECTIVES:
        raise ValueError(f"objective {spec.name!r} is registered twice")
    if len(spec.metrics) != len(spec.modes) or set(spec.modes) - {"max", "min"}:
        raise ValueError(f"objective {spec.name!r}: one mode (max|min) per metric")
    OBJECTIVES[spec.name] = spec
    return spec


register(ObjectiveSpec(
    "max_cross_accuracy", "max cross-accuracy against the scenario's attack, mean over seeds",
    every_attack=False, metrics=(OBJECTIVE,), modes=("max",), paper="001 Figure 2"))
register(ObjectiveSpec(
    "worst_case", "max cross-accuracy of the worst attack of scenario.attacks, mean over seeds",
    every_attack=True, metrics=(OBJECTIVE,), modes=("max",), paper="001 section 4 (attacks little, empire)"))
register(ObjectiveSpec(
    "accuracy_vs_eps", "Pareto front of worst-case max cross-accuracy (max) against total epsilon spent (min)",
    every_attack=True, metrics=(OBJECTIVE, EPS_TOTAL), modes=("max", "min"),
    paper="001 Theorem 1 (the privacy cost) x section 4 (robustness under attack)"))
register(ObjectiveSpec(
    "accuracy_eps_f", "Pareto front of worst-case max cross-accuracy (max), total epsilon spent (min) and the "
    "Byzantine workers f tolerated (max); the space searches f",
    every_attack=True, metrics=(OBJECTIVE, EPS_TOTAL, F_TOLERATED), modes=("max", "min", "max"),
    paper="001 Theorem 1 x section 4, with f in {3, 6} as in 001's grid"))


def get(name: str) -> ObjectiveSpec:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(OBJECTIVES)}") from None


def pareto_front(points: Sequence[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """The non-dominated (eps, accuracy, payload) points: no other point has eps <= and accuracy
    >= with one strictly better. Sorted by eps; accuracy then strictly increases along it."""
    front: list[tuple[float, float, Any]] = []
    for eps, acc, payload in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((eps, acc, payload))
    return front


def _dominates(q: tuple[float, float, int, Any], p: tuple[float, float, int, Any]) -> bool:
    """q at least as good as p on (eps min, accuracy max, f max) and better on one."""
    return q[0] <= p[0] and q[1] >= p[1] and q[2] >= p[2] and (q[0], q[1], q[2]) != (p[0], p[1], p[2])


def pareto_front_f(points: Sequence[tuple[float, float, int, Any]]) -> list[tuple[float, float, int, Any]]:
    """The non-dominated (eps, accuracy, f, payload) points under three objectives: eps (min),
    accuracy (max), f (max); of points equal on all three, the first given. Sorted by eps, then
    accuracy and f descending. Quadratic in the number of trials (a job has hundreds at most)."""
    front: list[tuple[float, float, int, Any]] = []
    for i, p in enumerate(points):
        if any(_dominates(q, p) for q in points):
            continue
        if any((q[0], q[1], q[2]) == (p[0], p[1], p[2]) for q in points[:i]):
            continue
        front.append(p)
    return sorted(front, key=lambda p: (p[0], -p[1], -p[2]))


def fronts_by_f(points: Sequence[tuple[float, float, int, Any]]) -> dict[int, list[tuple[float, float, int, Any]]]:
    """For each f level F of the points, the (eps, accuracy) front of the points that tolerate at
    least F Byzantine workers (f >= F): the trade-off open to a user who must tolerate F. Of
    points equal in (eps, accuracy), the one with the larger f stays. Every point of
    :func:`pareto_front_f` lies on the front of its own f level."""
    out: dict[int, list[tuple[float, float, int, Any]]] = {}
    for level in sorted({p[2] for p in points}):
        eligible = sorted((p for p in points if p[2] >= level), key=lambda p: -p[2])  # stable: larger f first on ties
        out[level] = [p for _, _, p in pareto_front([(p[0], p[1], p) for p in eligible])]
    return out
