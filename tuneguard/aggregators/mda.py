"""Minimum-diameter averaging (MDA): exact search over the subsets of size n - f."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._geometry import geometry
from ._spec import AggregatorSpec, register

MAX_SEARCH = 50_000_000
"""MDA refuses (in ``check``) an exact search larger than this: the number of excluded f-sets,
C(n, f), times the number of candidate pairs each is checked against, f(n-1) - f(f-1)/2 + 1.

At the cap one call takes one to two seconds on 2 CPU cores; the search is exact, so
there is no approximate fallback. n = 15 needs at most 6,435 x 78 (f = 7).
"""

# Elements per chunk of the subset search: bounds the temporaries to a few tens of MiB.
_CHUNK_ELEMENTS = 1 << 22
# Up to this n an f-set is an int64 bitmask and "pair touches E" is one bitwise AND.
_BITMASK_MAX_N = 62
# Up to this many (f-set, lead pair) checks the smallest-diameter sets come from one [sets,
# pairs] table instead of the pair-by-pair filter.
_ONE_SHOT = 1 << 16


def search_size(n: int, f: int) -> int:
    """Subsets times candidate pairs that the exact MDA search checks."""
    return math.comb(n, f) * _lead_pairs(n, f)


def _lead_pairs(n: int, f: int) -> int:
    # At most f(n-1) - f(f-1)/2 pairs touch an f-set, so one of that many + 1 longest is free.
    return f * (n - 1) - f * (f - 1) // 2 + 1


@functools.lru_cache(maxsize=8)
def _exclusion_sets(n: int, f: int) -> Tensor:
    """All f-subsets of range(n), lexicographic, as a compact ``[C(n, f), f]`` CPU tensor.

    Built level by level with tensor ops (no Python loop over subsets): a prefix of size m
    whose last element is ``l`` gets children ``l + 1 .. n - f + m``.
    """
    if f == 0:
        return torch.zeros((1, 0), dtype=torch.int64)
    cur = torch.arange(n - f + 1, dtype=torch.int64)[:, None]
    for m in range(1, f):
        last = cur[:, -1]
        count = n - f + m - last
        total = int(count.sum())
        starts = count.cumsum(0) - count
        within = torch.arange(total) - starts.repeat_interleave(count)
        new = last.repeat_interleave(count) + 1 + within
        cur = torch.cat([cur.repeat_interleave(count, dim=0), new[:, None]], dim=1)
    return cur.to(torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32)


@functools.lru_cache(maxsize=8)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs i < j, row-major (``np.triu_indices(n, 1)``)."""
    return np.triu_indices(n, 1)


@functools.lru_cache(maxsize=8)
def _exclusion_masks(n: int, f: int) -> tuple[np.ndarray, np.ndarray]:
    """The f-sets ``[C(n, f), f]`` and their int64 bitmasks (n <= 62), as numpy arrays."""
    sets = _exclusion_sets(n, f).long().numpy()
    return sets, (np.int64(1) << sets).sum(axis=1)


def mda(vectors: Tensor, f: int) -> Tensor:
    r"""Minimum-diameter averaging (El Mhamdi et al., ICML 2018; paper 001, Appendix B.2).

    .. math::
        S^* = \arg\min_{S \subset \{1..n\},\, |S| = n - f}\; \max_{i, j \in S} \|g_i - g_j\|,
        \qquad \mathrm{MDA} = \frac{1}{n - f} \sum_{i \in S^*} g_i

    Needs :math:`n \ge 2f + 1` and a search no larger than :data:`MAX_SEARCH`.

    Exact and vectorised: instead of the kept sets we enumerate the excluded f-sets E (same
    count). With the pairs sorted by decreasing distance, the diameter of the complement of E
    is the distance of the first pair with neither end in E; at most f(n-1) - f(f-1)/2 pairs
    touch E, so only that many + 1 leading pairs are ever looked at. The f-sets come from a
    cached index tensor. For n <= 62 they are int64 bitmasks ("pair touches E" is one AND)
    and the search filters them pair by pair, keeping those that touch every pair so far,
    until none is left (:func:`_smallest_diameter_sets`): no branch-and-bound, so isotropic
    inputs (DP noise) cost the same as any other. Larger n checks all sets against all lead
    pairs, in chunks. Ties in diameter (they happen: excluding either
    end of the longest pair may leave the same diameter) go to the smaller sum of squared
    distances inside the kept set, then to the smaller sum of coordinates, then to the
    lexicographically first E.
    Non-finite vectors are at infinite distance from all others and so always excluded while
    at most f are non-finite.
    """
    n = vectors.shape[0]
    if f == 0:
        return vectors.mean(dim=0)
    device = vectors.device
    geo = geometry(vectors)
    # The search runs on the [n, n] distances as numpy arrays (CPU copies): each of its small
    # steps costs a few microseconds there, several times less than a torch op's dispatch.
    sq = geo.sqdist.detach().cpu().numpy()
    row_sum = geo.row_sum.detach().cpu().numpy()
    pi, pj = _pairs(n)
    pair_d = sq[pi, pj]
    order = np.argsort(-pair_d, kind="stable")[: _lead_pairs(n, f)]
    pa, pb, pd = pi[order], pj[order], pair_d[order]

    if n <= _BITMASK_MAX_N:
        sets_np, masks = _exclusion_masks(n, f)
        pair_bits = (np.int64(1) << pa) | (np.int64(1) << pb)
        tied = _smallest_diameter_sets(masks, pair_bits, pd)
        j = _break_tie(sq, row_sum, sets_np[tied])[2] if tied.size > 1 else 0
        return _mean_without(vectors, sets_np[tied[j]], bool(geo.bad.any()))

    # Larger n: every set against every lead pair, in chunks, on the input's device.
    sets = _exclusion_sets(n, f).to(device)
    pa_t, pb_t = torch.from_numpy(pa).to(device), torch.from_numpy(pb).to(device)
    pd_t = torch.from_numpy(pd).to(device)
    zero = torch.zeros((), dtype=pd_t.dtype, device=device)
    chunk = max(1, _CHUNK_ELEMENTS // max(pd.size, n))
    best: tuple[float, float, float, int] | None = None  # (diameter, *tie keys, index)
    for offset in range(0, sets.shape[0], chunk):
        stop = min(offset + chunk, sets.shape[0])
        excluded = torch.zeros((stop - offset, n), dtype=torch.bool, device=device)
        excluded.scatter_(1, sets[offset:stop].long(), True)
        covered = excluded[:, pa_t] | excluded[:, pb_t]
        diam = torch.where(covered, zero, pd_t).amax(dim=1)
        low = float(diam.min())
        tied_t = (diam == low).nonzero().squeeze(1)
        if best is not None and low > best[0]:
            continue
        spread, coord_sum, j = _break_tie(sq, row_sum, sets[tied_t + offset].long().cpu().numpy())
        candidate = (low, spread, coord_sum, int(tied_t[j]) + offset)
        # Strict comparisons keep the earliest subset on exact ties across chunks.
        if best is None or candidate[:-1] < best[:-1]:
            best = candidate
    assert best is not None
    return _mean_without(vectors, sets[best[-1]].long().cpu().numpy(), bool(geo.bad.any()))


def _mean_without(vectors: Tensor, excluded_set: np.ndarray, any_bad: bool) -> Tensor:
    """Mean of the rows not in ``excluded_set``: one weighted sum over all n rows (weight
    1 / (n - f) on the kept ones, a matrix-vector product: one read of the rows, no copy of
    the kept ones). When some row is non-finite (0 * NaN would be NaN) the kept rows are
    gathered and averaged instead."""
    n = vectors.shape[0]
    out = set(excluded_set.tolist())
    keep = [i for i in range(n) if i not in out]
    if any_bad:
        return vectors.index_select(0, torch.tensor(keep, device=vectors.device)).mean(dim=0)
    weights = [1.0 / len(keep) if i not in out else 0.0 for i in range(n)]
    return torch.tensor(weights, dtype=vectors.dtype, device=vectors.device) @ vectors


def _smallest_diameter_sets(masks: np.ndarray, pair_bits: np.ndarray, pd: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the excluded f-sets whose kept sets have the smallest diameter.

    The diameter of a kept set is the distance of the first pair, in decreasing order, that its
    excluded set E does not touch; the best E touch the longest prefix of pairs. So filter:
    keep the sets that touch pair 0, then pair 1, ... until none is left at some pair k. The
    winners then all have diameter pd[k]: the sets still alive before the first pair at that
    same distance (equal distances are ties, whichever of them a set misses first). With DP
    noise the inputs look isotropic and no pruning bound helps, but the alive sets shrink
    geometrically, so this touches a few times C(n, f) masks instead of C(n, f) x the lead
    pairs of the one-shot scan.
    """
    if masks.size * pair_bits.size <= _ONE_SHOT:
        # Few sets x pairs (n = 15, f = 3: 455 x 40): the same selection from one table. A
        # set's first untouched pair is where the filter would drop it; the winners are the
        # sets that outlive every pair before the first one at the last such pair's distance.
        first_miss = ((masks[:, None] & pair_bits) == 0).argmax(axis=1)  # every set misses one
        start = int((pd > pd[first_miss.max()]).sum())
        return np.flatnonzero(first_miss >= start)
    alive = np.arange(masks.size)
    alive_masks = masks
    history = [alive]
    for k in range(pair_bits.size):
        keep = (alive_masks & pair_bits[k]) != 0
        if not keep.any():
            start = k
            while start > 0 and pd[start - 1] == pd[k]:
                start -= 1
            return history[start]
        alive, alive_masks = alive[keep], alive_masks[keep]
        history.append(alive)
    raise AssertionError("some f-set touched every lead pair: _lead_pairs is wrong")


def _break_tie(sqdist: np.ndarray, row_sum: np.ndarray, excluded_sets: np.ndarray) -> tuple[float, float, int]:
    """Among kept sets (complements of ``excluded_sets`` ``[t, f]``) tied on diameter: the one
    with the smallest sum of squared distances inside, then the smallest sum of coordinates
    (which separates equal groups of duplicates), then the first. Returns its two keys and
    its position. On the [n, n] distances and [n] row sums (float64, CPU). Each sum runs over
    its values in increasing order, sequentially, so two kept sets holding the same multiset
    of vectors (copies swapped) tie exactly and go to the first."""
    n = sqdist.shape[0]
    t = excluded_sets.shape[0]
    finite = np.where(np.isfinite(sqdist), sqdist, 0.0)
    kept = np.array([[i for i in range(n) if i not in out] for out in map(set, excluded_sets.tolist())])
    iu, ju = _pairs(kept.shape[1])
    spread = np.cumsum(np.sort(finite[kept[:, iu], kept[:, ju]], axis=1), axis=1)[:, -1]
    coord = np.cumsum(np.sort(row_sum[kept], axis=1), axis=1)[:, -1]
    j = int(np.lexsort((np.arange(t), coord, spread))[0])
    return float(spread[j]), float(coord[j]), j


def kappa_mda(n: int, f: int) -> float:
    return math.sqrt(8) * f / (n - f)


def _check_cap(n: int, f: int, params: Mapping[str, Any]) -> str | None:
    size = search_size(n, f)
    if size > MAX_SEARCH:
        return (
            f"with n={n}, f={f} the exact search checks C({n}, {f}) = {math.comb(n, f):,} subsets "
            f"x {_lead_pairs(n, f)} pairs = {size:,}, above the cap of {MAX_SEARCH:,} "
            "(tuneguard.aggregators.mda.MAX_SEARCH); use krum, multi_krum, median, "
            "trimmed_mean or geometric_median, or a smaller f"
        )
    return None


register(
    AggregatorSpec(
        name="mda",
        fn=mda,
        f_coef=2,
        n_const=1,
        extra_requirement=f"C(n, f) x (f(n-1) - f(f-1)/2 + 1) <= {MAX_SEARCH:,} (exact search)",
        extra_check=_check_cap,
        kappa_formula="sqrt(8) f / (n - f)",
        kappa_fn=kappa_mda,
        reference="El Mhamdi et al., ICML 2018; paper 001 App. B.2",
        description="average of the n - f vectors with the smallest diameter (exact search)",
    )
)
