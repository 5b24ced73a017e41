"""The objective registry: one spec per objective, the Pareto front, and what a space may ask."""

from __future__ import annotations

import math

import pytest

from tuneguard.tune.objectives import OBJECTIVES, ObjectiveSpec, eps_total, pareto_front, register
from tuneguard.tune.space import Space, SpaceError


def test_registry_holds_the_objectives_with_their_metrics_and_modes():
    assert list(OBJECTIVES) == ["max_cross_accuracy", "worst_case", "accuracy_vs_eps"]
    assert OBJECTIVES["worst_case"].every_attack and not OBJECTIVES["max_cross_accuracy"].every_attack
    multi = OBJECTIVES["accuracy_vs_eps"]
    assert multi.multi and multi.search_metric() == ["objective", "eps_total"] and multi.search_mode() == ["max", "min"]
    assert OBJECTIVES["worst_case"].search_metric() == "objective"
    with pytest.raises(ValueError, match="registered twice"):
        register(ObjectiveSpec("worst_case", "", True, ("objective",), ("max",)))
    assert eps_total({"a": 1.5, "b": 2.0, "c": None}) == 2.0 and eps_total({"a": None}) == math.inf


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    pts = [(1.0, 0.5, "a"), (2.0, 0.4, "b"), (2.0, 0.7, "c"), (4.0, 0.7, "d"), (8.0, 0.9, "e"), (math.inf, 0.95, "f")]
    front = pareto_front(pts)
    assert [p[2] for p in front] == ["a", "c", "e", "f"]
    for eps, acc, _ in front:  # nothing beats a front point on both
        assert not any(e <= eps and a >= acc and (e, a) != (eps, acc) for e, a, _ in pts)


def space(**tune) -> dict:
    return {"base": {"dataset": "mnist", "n_workers": 5, "f": 1, "attack": "little", "steps": 4, "eval_every": 2},
            "scenario": {"privacy": {"mode": "total", "total_eps": 4.0}},
            "search": {"privacy.total_eps": [1.0, 8.0]}, "tune": tune}


def test_space_names_the_objectives_and_refuses_asha_with_two_metrics():
    with pytest.raises(SpaceError, match="allowed: max_cross_accuracy, worst_case, accuracy_vs_eps"):
        Space.from_dict(space(objective="pareto"))
    with pytest.raises(SpaceError, match="multi-objective.*scheduler: none"):
        Space.from_dict(space(objective="accuracy_vs_eps", scheduler="asha"))
    sp = Space.from_dict(space(objective="accuracy_vs_eps"))
    assert sp.objective.name == "accuracy_vs_eps" and sp.attack_set == [None]  # one attack: the base's
