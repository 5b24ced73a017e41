"""The VN ratio from groups' moments (what worker actors send) equals the one from the rows."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneguard.training.metrics import Moments, honest_metrics, vn_ratio


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), d=st.integers(1, 40), seed=st.integers(0, 10_000),
       repeat=st.booleans())
def test_combined_moments_give_the_rows_vn_ratio(sizes, d, seed, repeat):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64) + 0.5
    if repeat:  # identical rows (as identical attack or duplicated workers give): zero spread inside groups
        rows[: sizes[0]] = rows[0].clone()
    parts, start = [], 0
    for k in sizes:
        parts.append(Moments.of(rows[start:start + k]))
        start += k
    m = Moments.combine(parts)
    assert m.k == rows.shape[0]
    assert torch.allclose(m.mean, rows.mean(0), atol=1e-12)
    by_rows = vn_ratio(rows)
    by_moments = m.spread / float(m.mean.norm()) if m.k >= 2 else math.nan
    if math.isnan(by_rows):
        assert math.isnan(by_moments)
    else:
        assert by_moments == pytest.approx(by_rows, rel=1e-9, abs=1e-12)


def test_honest_metrics_take_rows_or_moments():
    g = torch.Generator().manual_seed(3)
    sample, submit = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)
    ones = torch.ones(6)
    a = honest_metrics(sample, submit, ones, ones, ones)
    b = honest_metrics(Moments.combine([Moments.of(sample[:2]), Moments.of(sample[2:])]), submit, ones, ones, ones)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5), k


def test_submit_moments_share_the_attacks_pass_only_inside_a_step():
    """The local engine computes the honest rows' deviations once a step (the little attack,
    then the submit VN ratio). Inside ``shared()`` the same unchanged tensor gets the kept
    result; an in-place change, another tensor, or a call outside the block recomputes."""
    from tuneguard import _rowstats
    from tuneguard.attacks import craft

    g = torch.Generator().manual_seed(5)
    rows = torch.randn(7, 300, generator=g) * 0.1 + torch.randn(300, generator=g)
    first = _rowstats.row_deviations(rows)
    assert first is not _rowstats.row_deviations(rows)
    with _rowstats.shared():
        byz = craft("little", rows, 2)
        kept = _rowstats.row_deviations(rows)
        assert kept is _rowstats.row_deviations(rows)
        assert torch.equal(byz, craft("little", rows.clone(), 2))  # same vectors as a fresh pass
        m = Moments.of_deviations(rows)
        assert m.m2 == pytest.approx(Moments.of(rows).m2, rel=1e-5)
        assert m.m2 == pytest.approx(float(((rows.double() - rows.double().mean(0)) ** 2).sum()), rel=1e-6)
        rows.mul_(2.0)
        assert _rowstats.row_deviations(rows) is not kept
    assert torch.equal(craft("little", rows, 2), craft("little", rows.clone(), 2))
