"""The objective registry: one spec per objective, the Pareto front, and what a space may ask."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tuneguard.tune.objectives import (
    OBJECTIVES,
    ObjectiveSpec,
    eps_total,
    fronts_by_f,
    pareto_front,
    pareto_front_f,
    register,
)
from tuneguard.tune.space import Space, SpaceError

REPO = Path(__file__).resolve().parents[1]


def test_registry_holds_the_objectives_with_their_metrics_and_modes():
    assert list(OBJECTIVES) == ["max_cross_accuracy", "worst_case", "accuracy_vs_eps", "accuracy_eps_f"]
    assert OBJECTIVES["worst_case"].every_attack and not OBJECTIVES["max_cross_accuracy"].every_attack
    multi = OBJECTIVES["accuracy_vs_eps"]
    assert multi.multi and multi.search_metric() == ["objective", "eps_total"] and multi.search_mode() == ["max", "min"]
    assert OBJECTIVES["worst_case"].search_metric() == "objective"
    three = OBJECTIVES["accuracy_eps_f"]
    assert three.every_attack and three.maximises_f and not multi.maximises_f
    assert three.search_metric() == ["objective", "eps_total", "f_tolerated"] and three.search_mode() == ["max", "min", "max"]
    with pytest.raises(ValueError, match="registered twice"):
        register(ObjectiveSpec("worst_case", "", True, ("objective",), ("max",)))
    assert eps_total({"a": 1.5, "b": 2.0, "c": None}) == 2.0 and eps_total({"a": None}) == math.inf


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    pts = [(1.0, 0.5, "a"), (2.0, 0.4, "b"), (2.0, 0.7, "c"), (4.0, 0.7, "d"), (8.0, 0.9, "e"), (math.inf, 0.95, "f")]
    front = pareto_front(pts)
    assert [p[2] for p in front] == ["a", "c", "e", "f"]
    for eps, acc, _ in front:  # nothing beats a front point on both
        assert not any(e <= eps and a >= acc and (e, a) != (eps, acc) for e, a, _ in pts)


def test_three_objective_front_keeps_the_non_dominated_and_breaks_ties_toward_larger_f():
    # (eps, accuracy, f, name)
    pts = [(1.0, 0.5, 1, "a"), (1.0, 0.5, 2, "b"),  # tie in (eps, acc): the larger f dominates
           (2.0, 0.7, 1, "c"), (2.0, 0.7, 1, "c2"),  # equal on all three: the first stays
           (2.0, 0.6, 3, "d"),  # less accurate than c, but tolerates more: on the front
           (4.0, 0.6, 2, "e"),  # d beats it on all three
           (8.0, 0.9, 1, "f"), (8.0, 0.4, 3, "g")]  # g: d is cheaper, as accurate, as robust
    front = pareto_front_f(pts)
    assert [p[3] for p in front] == ["b", "c", "d", "f"]
    for p in front:  # nothing beats a front point on all three
        assert not any(q[0] <= p[0] and q[1] >= p[1] and q[2] >= p[2] and q[:3] != p[:3] for q in pts)
    for p in pts:  # and every other point is beaten by one
        if p not in front and p[3] != "c2":
            assert any(q[0] <= p[0] and q[1] >= p[1] and q[2] >= p[2] and q[:3] != p[:3] for q in front), p
    levels = fronts_by_f(pts)
    assert sorted(levels) == [1, 2, 3]
    assert [p[3] for p in levels[1]] == ["b", "c", "f"]  # every trial counts; the tie goes to f = 2
    assert [p[3] for p in levels[2]] == ["b", "d"]  # trials with f >= 2 only
    assert [p[3] for p in levels[3]] == ["d"]
    for level, line in levels.items():  # each level's front only holds trials that tolerate it
        assert all(p[2] >= level for p in line) and [p[1] for p in line] == sorted({p[1] for p in line})
    assert {p[3] for p in front} <= {p[3] for line in levels.values() for p in line}


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


def test_accuracy_eps_f_needs_a_search_over_f():
    with pytest.raises(SpaceError, match="must vary f; f is not searched.*search: {f: \\[1, 2, 3\\]}"):
        Space.from_dict(space(objective="accuracy_eps_f"))
    with pytest.raises(SpaceError, match="it only takes f = 2"):
        Space.from_dict({**space(objective="accuracy_eps_f"), "search": {"f": 2, "privacy.total_eps": [1.0, 8.0]}})
    ok = Space.from_dict({**space(objective="accuracy_eps_f"), "search": {"f": {"int": [1, 2]}, "gar": ["median", "krum"],
                                                                           "privacy.total_eps": [1.0, 8.0]}})
    report = ok.validate()  # n = 5: krum (n >= 2f + 3) cannot take f = 2, excluded; median can
    assert [ex.point["f"] for ex in report.excluded] == [2, 2] and {ex.point["gar"] for ex in report.excluded} == {"krum"}
    shipped = Space.load(REPO / "search_spaces" / "frontier_f.yaml")
    assert shipped.objective.name == "accuracy_eps_f" and shipped.validate().excluded == []
    assert {p.name for p in shipped.params} >= {"f", "privacy.total_eps"} and shipped.attack_set == ["little", "empire"]
