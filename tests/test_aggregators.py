"""Aggregation rules: definitions on hand-built inputs, properties, robustness, errors.

Everything goes through the public API (``aggregate``, ``AGGREGATORS``, ``check_rule``,
``resolve`` and the spec objects).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneguard.aggregators import (
    AGGREGATORS,
    AggregatorSpec,
    Gar,
    GarRequirementError,
    aggregate,
    build_gar,
    chain_kappa,
    check_rule,
    resolve,
)
from tuneguard.attacks import craft

RULES = [name for name, spec in AGGREGATORS.items() if not spec.is_pre]
ROBUST = [name for name in RULES if name != "average"]
CHAINS = ["nnm+krum", "nnm+median", "bucketing+median", "bucketing+nnm+mda"]
DETERMINISTIC = RULES + ["nnm+krum", "nnm+median", "nnm+mda"]
EQUIVARIANT = [
    "average",
    "krum",
    "multi_krum",
    "mda",
    "median",
    "trimmed_mean",
    "bulyan",
    "geometric_median",
    "centered_clipping",
    "nnm+krum",
    "nnm+median",
    "bucketing+median",
]
PROPERTY = settings(max_examples=12, deadline=None)


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def max_f(name: str, n: int) -> int:
    return max(f for f in range(n) if _allowed(name, n, f))


def _allowed(name: str, n: int, f: int) -> bool:
    try:
        check_rule(name, n, f)
    except ValueError:
        return False
    return True


def min_n(name: str, f: int) -> int:
    return min(n for n in range(1, 8 * f + 20) if _allowed(name, n, f))


# ---------------------------------------------------------------------------------------
# Registry and metadata


def test_registry_has_every_pinned_rule_and_refuses_duplicates():
    expected = {
        "average", "krum", "multi_krum", "mda", "median", "trimmed_mean", "geometric_median",
        "bulyan", "centered_clipping", "sign_majority", "nnm", "bucketing",
    }  # fmt: skip
    assert expected <= set(AGGREGATORS)
    before = dict(AGGREGATORS)
    with pytest.raises(ValueError, match="already registered"):
        AGGREGATORS.register(AGGREGATORS["krum"])
    with pytest.raises(ValueError, match="already registered"):
        AGGREGATORS["median"] = AGGREGATORS["krum"]
    assert dict(AGGREGATORS) == before
    assert all(isinstance(s, AggregatorSpec) for s in AGGREGATORS.values())
    assert {n for n, s in AGGREGATORS.items() if s.sign_based} == {"sign_majority"}
    assert {n for n, s in AGGREGATORS.items() if s.is_pre} == {"nnm", "bucketing"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        AGGREGATORS["krum"].name = "x"  # type: ignore[misc]


def test_specs_pickle():
    for spec in AGGREGATORS.values():
        assert pickle.loads(pickle.dumps(spec)) == spec
    assert dict(pickle.loads(pickle.dumps(AGGREGATORS))) == dict(AGGREGATORS)


def test_kappa_matches_design():
    def krum_kappa(n, f):
        return math.sqrt(2 * (n - f + (f * (n - f - 2) + f**2 * (n - f - 1)) / (n - 2 * f - 2)))

    for n, f in [(15, 3), (15, 6), (9, 3), (20, 1)]:
        assert AGGREGATORS["krum"].kappa(n, f) == pytest.approx(krum_kappa(n, f))
        assert AGGREGATORS["mda"].kappa(n, f) == pytest.approx(math.sqrt(8) * f / (n - f))
        assert AGGREGATORS["median"].kappa(n, f) == pytest.approx(math.sqrt(n - f))
    assert AGGREGATORS["bulyan"].kappa(15, 3) == pytest.approx(krum_kappa(15, 3))
    assert AGGREGATORS["krum"].kappa(15, 3) == pytest.approx(7.8, abs=0.05)
    for name in ("average", "trimmed_mean", "geometric_median", "centered_clipping"):
        assert AGGREGATORS[name].kappa(15, 3) is None
    with pytest.raises(ValueError, match="bulyan needs n >= 4f \\+ 3"):
        AGGREGATORS["bulyan"].kappa(15, 6)


def test_requirements_min_n_and_max_f():
    req = {s.name: s.requirement for s in AGGREGATORS.values()}
    assert req["krum"] == "n >= 2f + 3"
    assert req["bulyan"] == "n >= 4f + 3"
    assert req["median"] == req["trimmed_mean"] == "n >= 2f + 1"
    assert req["mda"].startswith("n >= 2f + 1")
    spec = AGGREGATORS
    assert (spec["krum"].min_n(3), spec["krum"].max_f(15)) == (9, 6)
    assert (spec["bulyan"].min_n(3), spec["bulyan"].max_f(15)) == (15, 3)
    assert (spec["median"].max_f(15), spec["mda"].max_f(15), spec["average"].max_f(15)) == (
        7,
        7,
        14,
    )
    for s in AGGREGATORS.values():
        for n in (3, 9, 15):
            if s._max_f_or_none(n) is not None:
                s.check(n, s.max_f(n))
                with pytest.raises(ValueError):
                    s.check(n, s.max_f(n) + 1)
        s.check(s.min_n(2), 2)
    with pytest.raises(ValueError, match="no f works with n=2"):
        AGGREGATORS["krum"].max_f(2)


def test_mda_search_cap_is_checked_before_any_work():
    from tuneguard.aggregators.mda import MAX_SEARCH, search_size

    with pytest.raises(ValueError, match=r"C\(40, 19\).*cap.*krum"):
        AGGREGATORS["mda"].check(40, 19)
    cap_f = AGGREGATORS["mda"].max_f(40)
    assert cap_f < 19 and search_size(40, cap_f) <= MAX_SEARCH < search_size(40, cap_f + 1)
    assert search_size(15, 7) == math.comb(15, 7) * 78
    with pytest.raises(ValueError, match="cap"):
        aggregate("mda", torch.zeros(40, 2), 19)


@pytest.mark.parametrize("name", [s for s in AGGREGATORS])
def test_check_names_rule_requirement_and_values(name):
    spec = AGGREGATORS[name]
    f = 3
    n = spec.min_n(f) - 1
    with pytest.raises(ValueError) as err:
        spec.check(n, f)
    msg = str(err.value)
    assert name in msg and spec.requirement.split(";")[0] in msg
    assert f"n={n}" in msg and f"f={f}" in msg and f"n >= {n + 1}" in msg
    with pytest.raises(ValueError):
        spec.check(5, -1)
    with pytest.raises(ValueError):
        spec.check(5.0, 1)  # type: ignore[arg-type]


def test_krum_error_message_says_what_would_work():
    with pytest.raises(ValueError) as err:
        AGGREGATORS["krum"].check(7, 3)
    assert str(err.value) == (
        "krum needs n >= 2f + 3; got n=7, f=3. With n=7 use f <= 2, or with f=3 use n >= 9"
    )
    with pytest.raises(ValueError, match="krum needs n >= 2f \\+ 3; got n=7, f=3"):
        aggregate("krum", torch.zeros(7, 4), 3)


def test_unknown_rule_and_param_errors_list_valid_ones():
    x = torch.randn(9, 4)
    with pytest.raises(ValueError, match="unknown aggregation rule 'krumm'.*krum.*median.*nnm"):
        aggregate("krumm", x, 1)
    with pytest.raises(ValueError, match="'krum' takes no parameter 'm'; valid parameters: none"):
        aggregate("krum", x, 1, m=3)
    with pytest.raises(
        ValueError, match="valid parameters: bucketing: s, generator; multi_krum: m"
    ):
        aggregate("bucketing+multi_krum", x, 1, mm=3)
    with pytest.raises(ValueError, match="takes no parameter 's'"):
        aggregate("nnm+krum", x, 1, s=2)
    with pytest.raises(ValueError, match="takes no parameter"):
        AGGREGATORS["median"].check(9, 1, tau=1.0)
    with pytest.raises(ValueError, match="m must be an integer with 1 <= m <= n - f = 8"):
        aggregate("multi_krum", x, 1, m=0)
    with pytest.raises(ValueError, match="bucket size"):
        aggregate("bucketing+median", x, 1, s=0)
    with pytest.raises(ValueError, match="tol must be a positive number"):
        aggregate("geometric_median", x, 1, tol=-1.0)
    with pytest.raises(ValueError, match="shape \\[n, d\\]"):
        aggregate("median", torch.zeros(5), 1)
    with pytest.raises(ValueError, match="floating dtype"):
        aggregate("median", torch.zeros(5, 2, dtype=torch.int64), 1)


def test_chains_resolve_route_params_and_check_each_stage():
    assert [s.name for s in resolve("bucketing+nnm+mda")] == ["bucketing", "nnm", "mda"]
    assert [s.name for s in resolve(" nnm + krum ")] == ["nnm", "krum"]
    for bad, why in [
        ("krum+nnm", "only the last stage"),
        ("nnm", "must end with a rule"),
        ("nnm+", "unknown aggregation rule ''"),
        ("median+krum", "only the last stage"),
    ]:
        with pytest.raises(ValueError, match=why):
            resolve(bad)
    # Bucketing hands ceil(15/2) = 8 vectors and the same f to Krum, which needs 2f + 3.
    with pytest.raises(ValueError, match=r"krum needs n >= 2f \+ 3; got n=8, f=3.*sees n=8"):
        check_rule("bucketing+krum", 15, 3)
    check_rule("bucketing+krum", 15, 2)
    check_rule("bucketing+median", 15, 3, s=2)
    with pytest.raises(ValueError):
        check_rule("bucketing+median", 15, 3, s=3)  # 5 vectors, median needs 7
    x = torch.randn(15, 6, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    out = aggregate("bucketing+multi_krum", x, 1, s=2, m=2, generator=gen)
    assert out.shape == (6,)


# ---------------------------------------------------------------------------------------
# Definitions on hand-built inputs


def test_krum_uses_n_minus_f_minus_2_neighbours():
    # n = 5, f = 1. With 2 neighbours (n-f-2) the scores are 5, 2, 5, 16.25, 20.5: x=1 wins.
    # With 3 neighbours (n-f-1) they would be 41, 27, 21, ...: x=2 would win.
    x = t64([[0.0], [1.0], [2.0], [6.0], [6.5]])
    assert aggregate("krum", x, 1).tolist() == [1.0]


def test_multi_krum_averages_the_m_lowest_scores():
    # f = 1, scores (2 neighbours): 7.25, 3.25, 8.5, 12.5, 16.25 -> order 1, 0, 2.5, 6, 6.5.
    x = t64([[0.0], [1.0], [2.5], [6.0], [6.5]])
    assert aggregate("multi_krum", x, 1, m=1).item() == pytest.approx(1.0)
    assert aggregate("multi_krum", x, 1, m=2).item() == pytest.approx(0.5)
    assert aggregate("multi_krum", x, 1, m=3).item() == pytest.approx(3.5 / 3)
    assert aggregate("multi_krum", x, 1).item() == pytest.approx(9.5 / 4)  # m = n - f
    assert torch.equal(aggregate("multi_krum", x, 1, m=1), aggregate("krum", x, 1))


def test_mda_averages_the_subset_of_smallest_diameter():
    # n = 5, f = 2: 3-subsets; {1, 3, 3.5} has diameter 2.5, every other one more.
    x = t64([[0.0], [1.0], [3.0], [3.5], [10.0]])
    assert aggregate("mda", x, 2).item() == pytest.approx(7.5 / 3)


def test_mda_matches_brute_force_on_n15_f6():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(15, 7, generator=gen, dtype=torch.float64)
    x[:3] += 4.0
    dist = torch.cdist(x, x).tolist()
    best = min(
        itertools.combinations(range(15), 9),
        key=lambda s: max(dist[i][j] for i, j in itertools.combinations(s, 2)),
    )
    assert torch.allclose(aggregate("mda", x, 6), x[list(best)].mean(0))


def _reference_krum_rounds(x: torch.Tensor, f: int, rounds: int) -> list[int]:
    """Krum ``rounds`` times without replacement, from the definition (numpy, float64): score =
    sum of squared distances to the r - f - 2 nearest other remaining rows; ties (documented in
    krum) to the smaller sum over all remaining others, the smaller coordinate sum, the lower
    index."""
    rows = x.double().numpy()
    sq = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
    remaining, chosen = list(range(len(rows))), []
    for _ in range(rounds):
        r = len(remaining)

        def key(i: int, r: int = r) -> tuple[float, float, float, int]:
            others = [sq[i, j] for j in remaining if j != i]
            return (sum(sorted(others)[: r - f - 2]), sum(others), float(rows[i].sum()), i)

        winner = min(remaining, key=key)
        chosen.append(winner)
        remaining.remove(winner)
    return chosen


def _reference_bulyan(x: torch.Tensor, f: int) -> tuple[list[int], list[float]]:
    """Bulyan by its definition (El Mhamdi et al. 2018; 001 App. B.4): Krum n - 2f - 2 times,
    then per coordinate the mean of the beta values closest to the median of the selected set,
    ties in distance to the lower value (a stable sort of the sorted values by distance)."""
    n = x.shape[0]
    chosen = _reference_krum_rounds(x, f, n - 2 * f - 2)
    beta = n - 4 * f - 2
    out = []
    for k in range(x.shape[1]):
        values = sorted(float(x[i, k]) for i in chosen)
        med = statistics.median(values)
        out.append(sum(sorted(values, key=lambda v: abs(v - med))[:beta]) / beta)
    return chosen, out


def test_bulyan_two_stages():
    # n = 9, f = 1: stage 1 runs Krum 5 times and keeps P = {v4, v3, v5, v1, v2}: v0, though
    # close to the cluster, is left out with v6, v7, v8. Stage 2 keeps beta = 3 values per
    # coordinate: coordinate 0 of P sorted is 0.2 0.25 0.3 0.9 1.0 (median 0.3 -> lower
    # window, mean 0.25); coordinate 1 is 0.1 0.3 0.9 0.95 1.0 (median 0.9 -> upper window,
    # mean 0.95).
    x = t64([
        [0.0, 0.0], [0.2, 1.0], [0.25, 0.1], [0.3, 0.9], [1.0, 0.95],
        [0.9, 0.3], [2.0, 2.0], [3.0, -1.0], [40.0, 40.0],
    ])  # fmt: skip
    chosen, expected = _reference_bulyan(x, 1)
    assert sorted(chosen) == [1, 2, 3, 4, 5]
    out = aggregate("bulyan", x, 1)
    assert torch.allclose(out, t64([0.25, 0.95]))
    assert torch.allclose(out, t64(expected))
    assert not torch.allclose(out, x[chosen].mean(0))
    assert not torch.allclose(out, x[chosen].median(0).values)


def test_bulyan_matches_reference_on_random_inputs():
    gen = torch.Generator().manual_seed(5)
    for n, f in [(11, 2), (15, 3), (12, 1)]:
        x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
        x[:f] *= 20
        assert torch.allclose(aggregate("bulyan", x, f), t64(_reference_bulyan(x, f)[1]))


def test_bulyan_takes_the_beta_closest_values_not_the_lowest_window_of_equal_reach():
    # n = 9, f = 1: theta = 5, beta = 3. Five cluster rows (coordinate 0 = 0, 0, 1, 1.5, 5) and
    # four far rows (1000 along their own axis): stage 1 keeps the cluster. Coordinate 0 of P:
    # median 1, distances 1, 1, 0, 0.5, 4, so the three closest are 1, 1.5 and one 0: mean
    # 2.5 / 3. The windows [0, 0, 1] and [0, 1, 1.5] both reach 1; taking the lower one gave
    # 1 / 3, a value the definition never produces.
    x = torch.zeros(9, 5, dtype=torch.float64)
    x[:5, 0] = t64([0.0, 1.5, 0.0, 5.0, 1.0])
    for k in range(4):
        x[5 + k, 1 + k] = 1000.0
    chosen, expected = _reference_bulyan(x, 1)
    assert sorted(chosen) == [0, 1, 2, 3, 4]
    out = aggregate("bulyan", x, 1)
    assert out.tolist() == pytest.approx([2.5 / 3, 0.0, 0.0, 0.0, 0.0], abs=1e-15)
    assert out.tolist() == pytest.approx(expected, abs=1e-15)
    # Mirrored, the two 0s become -0s above the median: the closest three are -1, -1.5, -0.
    assert aggregate("bulyan", -x, 1).tolist() == pytest.approx([-2.5 / 3, 0, 0, 0, 0], abs=1e-15)


def test_bulyan_boundary_tie_goes_to_the_lower_value():
    # n = 9, f = 1, beta = 3, stage 1 keeps the five cluster rows. Coordinate 0 of P is
    # 1, 2, 3, 5, 6 (median 3): after 3 and 2 the third place is tied between 1 and 5 (distance
    # 2): the lower, 1, is taken: mean 2. Coordinate 1 is 0, 0, 2, 4, 4 (median 2): two places
    # after 2, four values at distance 2: the two 0s: mean 2/3. Mirroring the input mirrors the
    # values but not the rule (the lower value is still preferred): -5 and -4, -4 are taken.
    x = torch.zeros(9, 6, dtype=torch.float64)
    x[:5, 0] = t64([5.0, 1.0, 3.0, 6.0, 2.0])
    x[:5, 1] = t64([4.0, 0.0, 2.0, 4.0, 0.0])
    for k in range(4):
        x[5 + k, 2 + k] = 1000.0
    chosen, expected = _reference_bulyan(x, 1)
    assert sorted(chosen) == [0, 1, 2, 3, 4]
    out = aggregate("bulyan", x, 1)
    assert out[:2].tolist() == pytest.approx([2.0, 2.0 / 3], abs=1e-15)
    assert out.tolist() == pytest.approx(expected, abs=1e-15)
    assert aggregate("bulyan", -x, 1)[:2].tolist() == pytest.approx([-10 / 3, -10 / 3], abs=1e-15)


def test_bulyan_with_identical_attack_rows_matches_the_definition():
    # The case that showed the bug: n = 25, f = 5, five identical `little` rows (every vector
    # attack sends identical rows), d = 1,000.
    gen = torch.Generator().manual_seed(13)
    honest = torch.randn(20, 1000, generator=gen, dtype=torch.float64)
    x = torch.cat([honest, craft("little", honest, 5)])
    chosen, expected = _reference_bulyan(x, 5)
    assert set(range(20, 25)) <= set(chosen)  # the attackers are selected: ties in stage 2
    assert torch.allclose(aggregate("bulyan", x, 5), t64(expected), rtol=0, atol=1e-12)


@st.composite
def _rows_with_repeats(draw, min_f: int = 1, max_f: int = 2, extra_n: int = 4):
    """Small-integer rows drawn from a pool, so rows repeat and distances tie exactly."""
    f = draw(st.integers(min_f, max_f))
    n = draw(st.integers(4 * f + 3, 4 * f + 3 + extra_n))
    d = draw(st.integers(1, 5))
    pool = draw(st.lists(st.lists(st.integers(-3, 3), min_size=d, max_size=d), min_size=1, max_size=n))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
    return t64([pool[i] for i in picks]), f


@settings(max_examples=60, deadline=None)
@given(case=_rows_with_repeats())
def test_bulyan_matches_the_definition_with_repeated_values_and_ties(case):
    x, f = case
    out = aggregate("bulyan", x, f)
    assert out.tolist() == pytest.approx(_reference_bulyan(x, f)[1], abs=1e-12)
    # float32 input: same selection (integers are exact), same output to float32 rounding.
    assert torch.allclose(aggregate("bulyan", x.float(), f).double(), out, atol=1e-6)


def _reference_mda(x: torch.Tensor, f: int) -> torch.Tensor:
    """MDA by brute force over the kept (n - f)-sets, ties as documented: the smaller sum of
    squared distances inside, then the smaller coordinate sum, then the lexicographically
    first excluded set (numpy, float64)."""
    rows = x.double().numpy()
    n = len(rows)
    sq = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
    best_key, best = None, None
    for excl in itertools.combinations(range(n), f):  # lexicographic: first wins exact ties
        kept = [i for i in range(n) if i not in excl]
        pairs = [sq[i, j] for i, j in itertools.combinations(kept, 2)]
        key = (max(pairs, default=0.0), sum(pairs), float(rows[kept].sum()))
        if best_key is None or key < best_key:
            best_key, best = key, kept
    return x[best].mean(0)


def test_mda_on_isotropic_input_matches_brute_force():
    # DP noise makes honest vectors look like isotropic Gaussians: nothing to prune.
    gen = torch.Generator().manual_seed(4)
    for f in (3, 6):
        x = torch.randn(15, 50, generator=gen, dtype=torch.float64)
        assert torch.allclose(aggregate("mda", x, f), _reference_mda(x, f), rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(case=_rows_with_repeats(min_f=1, max_f=3, extra_n=2))
def test_mda_matches_brute_force_with_repeated_rows_and_tied_distances(case):
    x, f = case
    assert torch.allclose(aggregate("mda", x, f), _reference_mda(x, f), rtol=0, atol=1e-12)


def test_trimmed_mean_cuts_f_on_each_side_per_coordinate():
    x = t64([[1, -100], [2, 0], [3, 1], [4, 2], [100, 3]])
    assert aggregate("trimmed_mean", x, 1).tolist() == pytest.approx([3.0, 1.0])
    assert aggregate("trimmed_mean", x, 2).tolist() == pytest.approx([3.0, 1.0])
    assert aggregate("trimmed_mean", x, 0).tolist() == pytest.approx(x.mean(0).tolist())
    y = t64([[0], [1], [2], [10], [11], [50], [-40]])
    assert aggregate("trimmed_mean", y, 2).item() == pytest.approx(13 / 3)


def test_median_odd_and_even():
    x = t64([[5, -1], [1, 2], [3, 7], [100, 0], [2, 2]])
    assert aggregate("median", x, 2).tolist() == [3.0, 2.0]
    assert aggregate("median", x[:4], 1).tolist() == [4.0, 1.0]  # mean of the two middle


@pytest.mark.parametrize("n", [1, 2, 3, 7, 15, 16, 31, 33, 40])
def test_median_and_trimmed_mean_agree_with_sorting(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 50, generator=gen)
    s = x.sort(0).values
    assert torch.allclose(aggregate("median", x, 0), 0.5 * s[(n - 1) // 2] + 0.5 * s[n // 2])
    f = (n - 1) // 2
    assert torch.allclose(aggregate("trimmed_mean", x, f), s[f : n - f].mean(0), atol=1e-6)


def test_geometric_median_first_order_optimality():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64) * torch.tensor(
        [1, 2, 3, 4, 5.0], dtype=torch.float64
    )
    z = aggregate("geometric_median", x, 4, tol=1e-14, max_iter=5000, eps=1e-12)
    diff = x - z
    units = diff / diff.norm(dim=1, keepdim=True)
    assert units.sum(0).norm() < 1e-4
    # It is not the mean or the coordinate median.
    assert not torch.allclose(z, x.mean(0)) and not torch.allclose(z, x.median(0).values)


def test_centered_clipping_step_and_fixed_point():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    start = torch.full((6,), 0.3, dtype=torch.float64)

    def clipped(v, tau):
        d = x - v
        return d * torch.clamp(tau / d.norm(dim=1, keepdim=True), max=1.0)

    one = aggregate("centered_clipping", x, 2, tau=0.7, iterations=1, start=start)
    assert torch.allclose(one, start + clipped(start, 0.7).mean(0))
    v = aggregate("centered_clipping", x, 2, tau=0.7, iterations=400)
    assert clipped(v, 0.7).sum(0).norm() < 1e-8
    # Default tau: the median distance from the start (the coordinate median).
    med = x.median(0).values
    tau = (x - med).norm(dim=1).median()
    assert torch.allclose(
        aggregate("centered_clipping", x, 2, iterations=1), med + clipped(med, tau).mean(0)
    )
    with pytest.raises(ValueError, match="start must be a tensor of shape"):
        aggregate("centered_clipping", x, 2, start=torch.zeros(3))


def test_sign_majority_votes_signs():
    x = t64([[1, -2, 0, 5], [3, -1, -1, -5], [-1, 5, -2, float("nan")]])
    assert aggregate("sign_majority", x, 1).tolist() == [1.0, -1.0, -1.0, 0.0]
    assert AGGREGATORS["sign_majority"].sign_based


def test_nnm_mixes_each_vector_with_its_n_minus_f_nearest():
    nnm = AGGREGATORS["nnm"].fn
    x = t64([[0.0], [1.0], [2.0], [10.0]])
    assert nnm(x, 1).flatten().tolist() == pytest.approx([1.0, 1.0, 1.0, 13 / 3])
    assert aggregate("nnm+average", x, 1).item() == pytest.approx((3 + 13 / 3) / 4)
    # Duplicates: each vector still counts itself.
    y = t64([[0.0], [0.0], [0.0], [9.0], [9.0]])
    assert nnm(y, 2).flatten().tolist() == pytest.approx([0.0, 0.0, 0.0, 6.0, 6.0])


def _reference_nnm(x: torch.Tensor, f: int) -> list[list[float]]:
    """NNM by its definition (Allouah et al. 2023): each row becomes the mean of its n - f
    nearest rows, itself first, ties in distance to the lower index (numpy, float64)."""
    rows = x.double().numpy()
    n = len(rows)
    sq = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
    out = []
    for i in range(n):
        nbrs = sorted(range(n), key=lambda j: (j != i, sq[i, j], j))[: n - f]
        out.append(rows[nbrs].mean(0).tolist())
    return out


def test_nnm_breaks_ties_by_index():
    # n = 5, f = 2: three neighbours each, itself included. Row 0 is at distance 1 from rows 1,
    # 2 and 3: it takes 1 and 2, the lower indices: (0 + 1 - 1) / 3. Row 2 has row 0 nearest,
    # then rows 1 and 3 tied (distance 2): row 1. Rows 1 and 3 are identical and take each
    # other and row 0; row 4 takes rows 1 and 3 (tied with each other, nothing else closer).
    x = t64([[0.0], [1.0], [-1.0], [1.0], [5.0]])
    out = AGGREGATORS["nnm"].fn(x, 2).flatten().tolist()
    assert out == pytest.approx([0.0, 2 / 3, 0.0, 2 / 3, 7 / 3])
    assert out == pytest.approx([r[0] for r in _reference_nnm(x, 2)])


@settings(max_examples=60, deadline=None)
@given(case=_rows_with_repeats(min_f=0, max_f=3))
def test_nnm_matches_the_definition_and_identical_rows_mix_identically(case):
    x, f = case
    out = AGGREGATORS["nnm"].fn(x, f)
    assert torch.allclose(out, t64(_reference_nnm(x, f)), rtol=0, atol=1e-12)
    # Identical rows pick the same neighbours (or equal-valued ones): the same vector, up to
    # the rounding of the matrix product (BLAS may round rows of one product differently).
    scale = 1e-14 * (1.0 + float(x.abs().max()))
    for i, j in itertools.combinations(range(x.shape[0]), 2):
        if torch.equal(x[i], x[j]):
            assert torch.allclose(out[i], out[j], rtol=0, atol=scale)


def test_bucketing_averages_random_buckets_of_size_s():
    bucketing = AGGREGATORS["bucketing"].fn
    x = torch.eye(5, dtype=torch.float64)
    out = bucketing(x, 1, s=2, generator=torch.Generator().manual_seed(7))
    assert out.shape == (3, 5)
    # Each bucket mean shows its members: sizes 2, 2, 1 partitioning the 5 inputs.
    members = [sorted(torch.nonzero(row).flatten().tolist()) for row in out]
    assert sorted(len(m) for m in members) == [1, 2, 2]
    assert sorted(sum(members, [])) == [0, 1, 2, 3, 4]
    for row, m in zip(out, members, strict=True):
        assert torch.allclose(row[m], torch.full((len(m),), 1.0 / len(m), dtype=torch.float64))
    again = bucketing(x, 1, s=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, again)
    default = bucketing(x, 1, s=2)  # documented: a generator seeded 0
    assert torch.equal(default, bucketing(x, 1, s=2, generator=torch.Generator().manual_seed(0)))
    shuffles = {
        tuple(map(tuple, bucketing(x, 1, s=2, generator=torch.Generator().manual_seed(k)).tolist()))
        for k in range(8)
    }
    assert len(shuffles) > 1
    assert bucketing(x, 1, s=1, generator=torch.Generator().manual_seed(1)).shape == (5, 5)


# ---------------------------------------------------------------------------------------
# Properties


@st.composite
def cases(draw, name: str):
    f = draw(st.integers(0, 3))
    n0 = min_n(name, f)
    n = draw(st.integers(n0, n0 + 5))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64) * draw(
        st.sampled_from([0.01, 1.0, 100.0])
    )
    x[: draw(st.integers(0, f))] += 50.0
    return x, f, gen


@pytest.mark.parametrize("name", DETERMINISTIC)
@PROPERTY
@given(data=st.data())
def test_permutation_invariance(name, data):
    x, f, gen = data.draw(cases(name))
    perm = torch.randperm(x.shape[0], generator=gen)
    a, b = aggregate(name, x, f), aggregate(name, x[perm], f)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * float(x.abs().max()))


@pytest.mark.parametrize("name", EQUIVARIANT)
@PROPERTY
@given(data=st.data())
def test_translation_equivariance(name, data):
    x, f, gen = data.draw(cases(name))
    shift = torch.randn(x.shape[1], generator=gen, dtype=torch.float64) * 10
    a, b = aggregate(name, x, f), aggregate(name, x + shift, f)
    assert torch.allclose(a + shift, b, rtol=1e-7, atol=1e-7 * (float(x.abs().max()) + 10))


def _honest_and_outliers(n: int, f: int, d: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    honest = 5.0 + torch.randn(n - f, d, generator=gen, dtype=torch.float64)
    byz = torch.full((f, d), 1e6, dtype=torch.float64)
    return honest, torch.cat([byz, honest])


@pytest.mark.parametrize("name", [r for r in ROBUST if r != "sign_majority"] + CHAINS)
def test_robust_at_max_f_against_far_outliers(name):
    n = 15
    f = AGGREGATORS[name].max_f(n) if name in AGGREGATORS else max_f(name, n)
    honest, x = _honest_and_outliers(n, f)
    mean = honest.mean(0)
    spread = (honest - mean).norm(dim=1).max()
    out = aggregate(name, x, f)
    assert (out - mean).norm() < 4 * spread, (name, f)
    assert (aggregate("average", x, f) - mean).norm() > 1e4 * spread


def test_sign_majority_robust_at_max_f():
    f = AGGREGATORS["sign_majority"].max_f(15)
    honest, x = _honest_and_outliers(15, f)
    x[:f] = -1e6  # the outliers vote against the honest signs
    assert torch.equal(aggregate("sign_majority", x, f), torch.ones(40, dtype=torch.float64))


@pytest.mark.parametrize("name", ROBUST + CHAINS)
def test_every_defence_changes_the_output_under_little(name):
    gen = torch.Generator().manual_seed(1)
    honest = torch.randn(12, 30, generator=gen) + 1.0
    x = torch.cat([honest, craft("little", honest, 3)])
    assert not torch.allclose(aggregate(name, x, 3), aggregate("average", x, 3), atol=1e-4)


def _poisoned(kind: str, n: int, f: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=gen)
    values = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
    if kind in values:
        x[:f] = values[kind]
    elif kind == "mixed":  # whole NaN rows, +-Inf rows, one NaN coordinate among finite ones
        for i in range(f):
            x[i] = [float("nan"), float("inf"), float("-inf")][i % 3]
        x[f - 1] = torch.randn(20, generator=gen)
        x[f - 1, 3] = float("nan")
    return x


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "mixed"])
@pytest.mark.parametrize("name", ROBUST + CHAINS)
def test_non_finite_inputs_give_finite_output(name, kind):
    n = 15
    for f in sorted({1, max_f(name, n)}):
        x = _poisoned(kind, n, f)
        out = aggregate(name, x, f)
        assert torch.isfinite(out).all(), (name, kind, f)
        assert torch.isfinite(aggregate(name, x[torch.randperm(n)], f)).all()


def test_attack_vectors_nan_and_inf_through_every_rule():
    gen = torch.Generator().manual_seed(9)
    honest = torch.randn(12, 16, generator=gen)
    for attack in ("nan", "inf"):
        x = torch.cat([craft(attack, honest, 3), honest])
        for name in ROBUST + CHAINS:
            assert torch.isfinite(aggregate(name, x, 3)).all(), (name, attack)
        assert not torch.isfinite(aggregate("average", x, 3)).all()


def test_float32_far_outliers_do_not_break_distances():
    # Honest vectors 1e-3 apart around 1e3, outliers at 1e6: the Gram trick without robust
    # centring would lose the honest distances to cancellation.
    gen = torch.Generator().manual_seed(0)
    honest = 1e3 + 1e-3 * torch.randn(12, 500, generator=gen)
    x = torch.cat([torch.full((3, 500), 1e6), honest])
    ref = aggregate("krum", x.double(), 3)
    assert torch.equal(aggregate("krum", x, 3), ref.float())
    assert torch.allclose(
        aggregate("mda", x, 3).double(), aggregate("mda", x.double(), 3), atol=1e-4
    )


@pytest.mark.parametrize("iterations", [2, 3, 4, 5, 8])
def test_centered_clipping_iterates_the_definition(iterations):
    # Few iterations run matrix-free, more through the Gram matrix: both must be the formula,
    # iterated plainly here, with a NaN row contributing nothing and a far one clipped.
    gen = torch.Generator().manual_seed(iterations)
    x = torch.randn(13, 40, generator=gen, dtype=torch.float64)
    x[0] = float("nan")
    x[1] = 1e6
    start = x[2:].median(0).values
    v = start.clone()
    for _ in range(iterations):
        d = x[1:] - v
        v = v + (d * torch.clamp(0.9 / d.norm(dim=1, keepdim=True), max=1.0)).sum(0) / 13
    got = aggregate("centered_clipping", x, 3, tau=0.9, iterations=iterations, start=start)
    assert torch.allclose(got, v, rtol=0, atol=1e-12)


def test_float32_centered_clipping_matches_float64():
    # Its Gram matrix is computed in the input precision (centred on the start): the output
    # must stay within float32 rounding of the float64 computation, with far outliers and a
    # large common offset (honest vectors 1e-2 apart around 1e3), at the size where BLAS runs.
    gen = torch.Generator().manual_seed(1)
    honest = 1e3 + 1e-2 * torch.randn(12, 3000, generator=gen)
    for byz in (torch.full((3, 3000), 1e6), honest[:3] + 0.5):
        x = torch.cat([byz, honest])
        for params in ({}, {"tau": 0.05, "iterations": 5}):
            out = aggregate("centered_clipping", x, 3, **params)
            ref = aggregate("centered_clipping", x.double(), 3, **params)
            assert out.dtype == torch.float32
            assert torch.allclose(out.double(), ref, rtol=0, atol=2e-4)  # float32 ulp at 1e3: 6e-5
            assert float((ref - 1e3).abs().max()) < 1.0  # the outliers are clipped away


def test_dtype_and_device_follow_the_input():
    x = torch.randn(15, 8, dtype=torch.float32)
    for name in RULES + CHAINS:
        out = aggregate(name, x, 3 if name != "bulyan" else 2)
        assert out.dtype == torch.float32 and out.shape == (8,), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(15, 1000, generator=gen, dtype=torch.float64)
    x[0] = float("nan")
    for name in ROBUST + CHAINS:
        cpu = aggregate(name, x, 3)
        gpu = aggregate(name, x.cuda(), 3)  # bucketing: the same default CPU generator
        assert gpu.device.type == "cuda"
        assert torch.allclose(cpu, gpu.cpu(), atol=1e-8), name


@pytest.mark.parametrize("d", [4096, 10_001])
def test_blocked_float32_gram_matches_float64(d):
    """Large float32 inputs take the column-blocked float64 Gram path (model-sized d): the
    distances must match a float64 computation on the same values, and the selection rules
    must pick what they pick on the float64 copy, Byzantine rows at 1e6 included."""
    from tuneguard.aggregators._geometry import geometry

    gen = torch.Generator().manual_seed(3)
    honest = 3.0 + 0.01 * torch.randn(12, d, generator=gen)
    x = torch.cat([honest, torch.full((3, d), 1e6)])
    x64 = x.to(torch.float64)
    ref = x64 @ x64.T
    got = geometry(x).gram
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref, rtol=1e-12, atol=0.0)
    for name in ("mda", "krum", "multi_krum", "bulyan"):
        assert torch.allclose(aggregate(name, x, 3).to(torch.float64), aggregate(name, x64, 3), rtol=0, atol=1e-6), name


def test_repeated_rows_share_one_gram_row_and_sit_at_distance_zero():
    """Model-sized inputs with repeated rows (attack rows, a copied worker) compute the Gram
    matrix on the distinct rows: the matrix must be the full product's, copies exactly at
    distance 0, and rows that merely share a coordinate sum (a permuted row) kept apart."""
    from tuneguard.aggregators._geometry import geometry

    gen = torch.Generator().manual_seed(8)
    d = 5000
    x = torch.randn(15, d, generator=gen)
    x[4] = x[1]  # a copy in the middle: the distinct rows are not a leading block
    x[12:] = x[11]  # attack-like copies at the end
    x[9] = x[8].flip(0)  # the same sum, not the same row
    x[7] = float("nan")  # a bad row next to copies
    x64 = torch.where(torch.isnan(x), 0.0, x).double()
    geo = geometry(x)
    assert torch.allclose(geo.gram, x64 @ x64.T, rtol=1e-12, atol=1e-9)
    for i, j in ((1, 4), (11, 12), (11, 14), (12, 13)):
        assert geo.sqdist[i, j] == 0 and geo.sqdist[j, i] == 0
    assert geo.sqdist[8, 9] > 0 and torch.isinf(geo.sqdist[7, :7]).all()
    for name in ("mda", "krum", "multi_krum", "bulyan", "nnm+krum"):
        f = 2 if name == "bulyan" else 3
        assert torch.allclose(aggregate(name, x, f).double(), aggregate(name, x.double(), f), rtol=0, atol=1e-6), name
    # Rows repeated in groups (NNM's outputs: rows with the same neighbours are equal) at a
    # model-sized d, a far row among them: MDA must break its exact ties by the definition.
    # Rounding noise on the distance between two copies (a Gram matrix of all rows) made it
    # pick a set 0.017 away from the brute-force one on this input.
    from tuneguard.aggregators.pre import nnm

    z = torch.randn(19, 2000, generator=torch.Generator().manual_seed(1))
    z[0] = float("nan")
    y = nnm(z, 2)
    y[0] = 1e6
    assert len(set(map(tuple, y.tolist()))) == 7  # 19 rows, 7 distinct
    assert torch.allclose(aggregate("mda", y, 2).double(), _reference_mda(y, 2).double(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Gar: a rule or chain built once


@pytest.mark.parametrize("name", RULES + CHAINS)
def test_gar_aggregates_as_aggregate_does(name):
    n, f = 15, 2 if name == "bulyan" else 3
    x = torch.randn(n, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gar = build_gar(name, n=n, f=f)
    assert torch.equal(gar(x), aggregate(name, x, f))
    assert gar.kappa() == chain_kappa(name, n, f)
    assert gar.randomized == any(s.randomized for s in resolve(name))
    assert gar.sign_based == resolve(name)[-1].sign_based
    if gar.randomized:  # the step's generator goes to the shuffle; same draw as aggregate's
        again = gar(x, generator=torch.Generator().manual_seed(11))
        assert torch.equal(again, aggregate(name, x, f, generator=torch.Generator().manual_seed(11)))
        assert not torch.equal(again, gar(x, generator=torch.Generator().manual_seed(12)))


def test_gar_checks_once_with_a_typed_error_and_keeps_its_metadata():
    with pytest.raises(GarRequirementError, match="krum needs n >= 2f \\+ 3; got n=7, f=3. With n=7 use f <= 2"):
        build_gar("nnm+krum", n=7, f=3)
    with pytest.raises(GarRequirementError, match="after bucketing, krum sees n=4 vectors out of 7"):
        build_gar("bucketing+krum", n=7, f=1, s=2)
    with pytest.raises(GarRequirementError, match="m must be an integer with 1 <= m <= n - f"):
        build_gar("multi_krum", n=9, f=2, m=8)
    assert issubclass(GarRequirementError, ValueError)
    for bad, message in (("krumm", "unknown aggregation rule"), ("krum", "takes no parameter 's'")):
        with pytest.raises(ValueError, match=message) as err:
            build_gar(bad, n=9, f=2, s=2)
        assert not isinstance(err.value, GarRequirementError)
    gar = build_gar("bucketing+krum", n=15, f=2, s=2)
    assert (gar.name, gar.n, gar.f, dict(gar.params)) == ("bucketing+krum", 15, 2, {"s": 2})
    assert [s.name for s in gar.specs] == ["bucketing", "krum"] and gar.counts == (15, 8)
    assert gar.kappa() == AGGREGATORS["krum"].kappa(8, 2) and gar.vn_bound() == 1 / gar.kappa()
    assert gar.kappa(15, 1) == chain_kappa("bucketing+krum", 15, 1, s=2)
    assert gar.with_f(1).f == 1 and gar.with_f(2) is gar
    assert build_gar("geometric_median", n=9, f=2).kappa() is None
    with pytest.raises(ValueError, match="built for n=15 vectors; got 14"):
        gar(torch.zeros(14, 3))
    back = pickle.loads(pickle.dumps(gar))
    assert isinstance(back, Gar) and (back.name, back.n, back.f, dict(back.params)) == ("bucketing+krum", 15, 2, {"s": 2})


def test_build_gar_from_an_experiment_config():
    from tuneguard.config import build_config

    cfg = build_config({"n_workers": 15, "f": 2, "gar": {"name": "bucketing+median", "params": {"s": 3}}})
    gar = build_gar(cfg)
    assert (gar.name, gar.n, gar.f, dict(gar.params)) == ("bucketing+median", 15, 2, {"s": 3})
    with pytest.raises(ValueError, match="takes n, f and the parameters from the config"):
        build_gar(cfg, n=15)
