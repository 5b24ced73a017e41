"""Krum, Multi-Krum and Bulyan (over Krum): selection by neighbour distances."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._geometry import _BLOCK, Geometry, geometry, order_statistics
from ._spec import AggregatorSpec, kappa_krum, register

_KAPPA_KRUM_TEXT = "sqrt(2 (n - f + (f (n-f-2) + f^2 (n-f-1)) / (n - 2f - 2)))"


def _krum_order(sqdist: np.ndarray, row_sum: np.ndarray, f: int, alive: np.ndarray | None = None) -> np.ndarray:
    """Indices from best to worst Krum score.

    Score of an (alive) row: sum of squared distances to its r - f - 2 nearest *other* alive
    rows, r = number of alive rows, summed in increasing order (so equal multisets of distances
    give equal scores). Ties (certain when r - f - 2 = 1: two mutually nearest vectors score
    the same) go to the smaller sum of squared distances to all alive others, then to the
    smaller coordinate sum (equal groups of duplicates tie on everything else), then to the
    lower index: the rule stays permutation-invariant. Infinite scores are clamped to the
    largest finite value so that an alive row always ranks before a dead one.

    On the [n, n] squared distances and [n] row sums as float64 numpy arrays
    (:func:`_small_geometry`): a few microseconds per operation where torch spends several
    times that dispatching each small op, which Bulyan's n - 2f - 2 rounds used to pay ~25
    times per round.
    """
    n = sqdist.shape[0]
    big = np.finfo(np.float64).max
    if np.isfinite(sqdist).all():
        # No bad row: the same scores in fewer array operations, the alive rows among
        # themselves only (Bulyan's rounds call this n - 2f - 2 times a step).
        idx = None if alive is None else np.flatnonzero(alive)
        d = sqdist.copy() if idx is None else sqdist[np.ix_(idx, idx)]
        np.fill_diagonal(d, 0.0)
        total = d.sum(axis=1)
        np.fill_diagonal(d, np.inf)
        scores = np.cumsum(np.sort(d, axis=1)[:, : d.shape[0] - f - 2], axis=1)[:, -1]
        order = np.lexsort((row_sum if idx is None else row_sum[idx], total, scores))
        return order if idx is None else idx[order]
    if alive is None:
        r = n
        d = sqdist.copy()
    else:
        r = int(alive.sum())
        d = np.where(alive[:, None] & alive[None, :], sqdist, np.inf)
    np.fill_diagonal(d, np.inf)
    nearest = np.sort(d, axis=1)[:, : r - f - 2]
    scores = np.minimum(np.cumsum(nearest, axis=1)[:, -1], big)
    total = np.where(np.isfinite(d), d, 0.0).sum(axis=1)
    total = np.minimum(np.where(np.isfinite(nearest).all(axis=1), total, np.inf), big)
    if alive is not None:
        scores = np.where(alive, scores, np.inf)
    return np.lexsort((row_sum, total, scores))  # the last key first; stable: lower index last


def _small_geometry(geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """The squared distances and row sums as float64 numpy arrays (CPU copies of [n, n], [n])."""
    return geo.sqdist.detach().cpu().numpy(), geo.row_sum.detach().cpu().numpy()


def krum(vectors: Tensor, f: int) -> Tensor:
    r"""Krum (Blanchard et al., NeurIPS 2017; paper 001, Appendix B.1).

    .. math::
        s_i = \sum_{j \in N_i} \|g_i - g_j\|^2, \qquad \mathrm{Krum} = g_{i^*},\;
        i^* = \arg\min_i s_i

    where :math:`N_i` holds the :math:`n - f - 2` vectors closest to :math:`g_i` other than
    itself. Needs :math:`n \ge 2f + 3`. Ties go to the smaller sum of squared distances to all
    others, then to the smaller coordinate sum, then to the lower index. Vectors holding a NaN or
    Inf are at infinite distance from all others, so they are never selected while at most f
    vectors are non-finite.
    """
    geo = geometry(vectors)
    return vectors[int(_krum_order(*_small_geometry(geo), f)[0])].clone()


def multi_krum(vectors: Tensor, f: int, m: int | None = None) -> Tensor:
    r"""Multi-Krum (Blanchard et al., NeurIPS 2017; El Mhamdi et al., ICML 2018).

    .. math:: \mathrm{MultiKrum}_m = \frac{1}{m} \sum_{i \in S_m} g_i

    where :math:`S_m` holds the m vectors with the lowest Krum scores :math:`s_i` (scores
    computed once, on all n vectors; ties as in Krum). ``m`` defaults to :math:`n - f`; ``m = 1`` is Krum.
    Needs :math:`n \ge 2f + 3` and :math:`1 \le m \le n - f`.
    """
    n = vectors.shape[0]
    m = n - f if m is None else m
    geo = geometry(vectors)
    chosen = torch.from_numpy(_krum_order(*_small_geometry(geo), f)[:m]).to(vectors.device)
    return vectors[chosen].mean(dim=0)


def bulyan(vectors: Tensor, f: int) -> Tensor:
    r"""Bulyan over Krum (El Mhamdi et al., ICML 2018; paper 001, Appendix B.4).

    Stage 1: apply Krum :math:`\theta = n - 2f - 2` times, each time on the vectors not yet
    selected (neighbour count :math:`r - f - 2` for r remaining vectors), and move the winner to
    the selected set :math:`P` (:math:`|P| = \theta`). Stage 2, per coordinate k:

    .. math::
        \mathrm{Bulyan}[k] = \frac{1}{\beta} \sum_{p \in B_k} p[k], \qquad
        \beta = \theta - 2f = n - 4f - 2

    where :math:`B_k` holds the :math:`\beta` vectors of P whose k-th coordinate is closest to
    :math:`\mathrm{median}_{p \in P}\, p[k]` (mean of the two middle values when
    :math:`\theta` is even). Needs :math:`n \ge 4f + 3`.

    Ties in distance to the median (repeated values, which identical attack rows make common,
    or two values at the same distance on either side) are broken towards the lower value:
    :math:`B_k` is the first :math:`\beta` of the sorted values stably re-sorted by distance.
    The output depends only on the multiset of selected values, so the rule stays
    permutation-invariant.

    The distance matrix is computed once; every Krum round re-scores a masked sub-matrix.
    Stage 2 needs no sort by distance: the :math:`\beta`-th smallest distance :math:`r` is the
    smallest reach (farther end's distance) of the :math:`2f + 1` windows of :math:`\beta`
    consecutive sorted values, and :math:`B_k` holds every value closer than :math:`r` plus
    the lowest values at distance exactly :math:`r` to fill :math:`\beta` places.
    """
    n = vectors.shape[0]
    theta, beta = n - 2 * f - 2, n - 4 * f - 2
    geo = geometry(vectors)
    sqdist, row_sum = _small_geometry(geo)
    alive = np.ones(n, dtype=bool)
    selected = []
    for _ in range(theta):
        winner = int(_krum_order(sqdist, row_sum, f, alive)[0])
        selected.append(winner)
        alive[winner] = False
    if beta == theta:
        return vectors.index_select(0, torch.tensor(selected, device=vectors.device)).mean(dim=0)
    if beta == 1 and theta % 2 == 1:  # n = 4f + 3: the one value closest to the median is it
        return order_statistics(vectors, (theta // 2,), rows=selected)[0]
    srt = order_statistics(vectors, tuple(range(theta)), rows=selected)
    out = torch.empty_like(srt[0])
    for start in range(0, srt.shape[1], _BLOCK):
        block = srt[:, start : start + _BLOCK]
        out[start : start + _BLOCK] = _mean_closest_to_median(block, beta)
    return out


def _mean_closest_to_median(srt: Tensor, beta: int) -> Tensor:
    """Per column of the sorted ``srt`` ``[theta, d]``, the mean of the beta values closest to
    the median, ties in distance to the lower value (a stable sort of ``srt`` by distance).

    Why not "the window whose farther end is closest": with repeated values several windows
    share the smallest reach, and the lowest of them may hold a value at distance r where a
    higher one holds a closer value instead (sorted [0, 0, 1, 1.5, 5], beta = 3: the windows
    [0, 0, 1] and [0, 1, 1.5] both reach 1, only the second is the three closest). The reach
    still gives the beta-th smallest distance r exactly; the selection is then made by
    counting. Windows are scanned in Python (there are only 2f + 1): an argmin or a sort along
    dim 0 is slow on CPU.
    """
    theta = srt.shape[0]
    lo, hi = (theta - 1) // 2, theta // 2
    med = srt[lo] if lo == hi else 0.5 * srt[lo] + 0.5 * srt[hi]
    # |x - med| along sorted x falls then rises, so a window's farthest value is one of its
    # ends, and the smallest reach over windows is the beta-th smallest distance (exactly: a
    # - b == -(b - a) in floating point, so both sides compute the same distances).
    r = None
    for s in range(theta - beta + 1):
        reach = torch.maximum(med - srt[s], srt[s + beta - 1] - med)
        r = reach if r is None else torch.minimum(r, reach)
    dist = (srt - med).abs_()
    closer = dist < r
    zero = torch.zeros((), dtype=srt.dtype, device=srt.device)
    total = torch.where(closer, srt, zero).sum(dim=0)
    # The places left after the strictly closer values go to values at distance exactly r,
    # lowest first (they sit at med - r below the median, med + r above it).
    left = beta - closer.sum(dim=0)
    at_r = dist == r
    take = at_r & (at_r.cumsum(dim=0) <= left)
    total += torch.where(take, srt, zero).sum(dim=0)
    return total / beta


def _check_m(n: int, f: int, params: Mapping[str, Any]) -> str | None:
    m = params.get("m")
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n - f:
        return f"m must be an integer with 1 <= m <= n - f = {n - f}; got m={m!r}"
    return None


register(
    AggregatorSpec(
        name="krum",
        fn=krum,
        f_coef=2,
        n_const=3,
        kappa_formula=_KAPPA_KRUM_TEXT,
        kappa_fn=kappa_krum,
        reference="Blanchard et al., NeurIPS 2017; paper 001 App. B.1",
        description="the vector with the smallest sum of squared distances to its n-f-2 nearest others",
    )
)
register(
    AggregatorSpec(
        name="multi_krum",
        fn=multi_krum,
        f_coef=2,
        n_const=3,
        params={"m": None},
        extra_requirement="1 <= m <= n - f (m=None means n - f)",
        extra_check=_check_m,
        reference="Blanchard et al., NeurIPS 2017; El Mhamdi et al., ICML 2018",
        description="average of the m vectors with the lowest Krum scores (m defaults to n - f)",
    )
)
register(
    AggregatorSpec(
        name="bulyan",
        fn=bulyan,
        f_coef=4,
        n_const=3,
        kappa_formula=_KAPPA_KRUM_TEXT + " (as Krum)",
        kappa_fn=kappa_krum,
        reference="El Mhamdi et al., ICML 2018; paper 001 App. B.4",
        description="Krum n-2f-2 times without replacement, then per coordinate the mean of the "
        "n-4f-2 values closest to the median of the selected set",
    )
)
