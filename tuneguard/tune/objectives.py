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

The reported Tune keys: OBJECTIVE ("objective", the accuracy score) always, EPS_TOTAL
("eps_total") for multi-objective entries; a trial without DP has eps_total = inf (no guarantee).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tuneguard.results.schema import EPS_TOTAL, OBJECTIVE


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
