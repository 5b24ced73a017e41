"""Shared numerics: non-finite rows, coordinate-wise order statistics, pairwise geometry.

Conventions every rule relies on:

- A *bad* row is a vector whose sum is not finite (it holds a NaN or an Inf, or is so large
  that its sum overflows). Distance-based rules place bad rows at distance +inf from every
  other vector, so they are never selected while at most f rows are bad.
- Coordinate-wise rules replace each NaN by +inf or -inf, alternating in the order the NaNs
  appear in that coordinate. The multiset of values per coordinate therefore depends only on
  how many NaNs it holds (permutation invariance is kept), and NaNs land in the tails that
  median and trimmed mean discard.
- Pairwise squared distances come from one Gram matrix ``|a|^2 + |b|^2 - 2 a.b``, computed
  in float64 and not centred. The rounding error of an entry scales with the norms of the two
  vectors involved only, so Byzantine vectors at 1e6 do not blur the distances between honest
  ones (centring at the mean would: it drags every honest vector towards them). A common
  offset m costs about 1e-16 |m|^2, far below the float32 resolution of the inputs themselves.
  Repeated rows (the copies every vector attack sends) share one Gram row, computed once:
  copies sit at distance exactly 0 from each other, so ties among them are exact.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

# Above this many rows (or off CPU) a full torch.sort beats the sorting network.
_NETWORK_MAX_N = 32
# Column block of the sorting network: below torch's parallel grain (32768 elements); in
# numpy (single-threaded) a block whose rows stay in L2.
_BLOCK = 32_000
_NUMPY_BLOCK = 16_384
# Below this many multiply-adds the Gram matrix is computed without BLAS.
_SMALL_GRAM = 1 << 18
# Columns per block of the chunked float64 Gram matrix (a [16, 4096] float64 block is 512 KiB).
_GRAM_BLOCK = 4096


def bad_rows(x: Tensor) -> Tensor:
    """Bool ``[n]``: rows holding a NaN/Inf (or overflowing when summed)."""
    return ~torch.isfinite(x.sum(dim=1))


@functools.lru_cache(maxsize=256)
def _sorting_network(n: int, keep: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort on n inputs, pruned to the comparators that the output
    positions ``keep`` depend on. Each comparator (a, b), a < b, puts the min at a."""
    p = 1
    while p < n:
        p *= 2

    comps: list[tuple[int, int]] = []

    def merge(lo: int, length: int, r: int) -> None:
        step = 2 * r
        if step < length:
            merge(lo, length, step)
            merge(lo + r, length, step)
            comps.extend((i, i + r) for i in range(lo + r, lo + length - r, step))
        else:
            comps.append((lo, lo + r))

    def sort(lo: int, length: int) -> None:
        if length > 1:
            half = length // 2
            sort(lo, half)
            sort(lo + half, half)
            merge(lo, length, 1)

    sort(0, p)
    # Inputs past n act as +inf padding: comparators touching them never move anything.
    comps = [(a, b) for a, b in comps if b < n]
    needed = set(keep)
    pruned: list[tuple[int, int]] = []
    for a, b in reversed(comps):
        if a in needed or b in needed:
            pruned.append((a, b))
            needed.update((a, b))
    return tuple(reversed(pruned))


@functools.lru_cache(maxsize=256)
def _live_comparators(n: int, keep: tuple[int, ...]) -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators of :func:`_sorting_network` with which of their two outputs is read later
    (``(a, b, need_min, need_max)``): a selection reads only some of them (the median of 15
    computes 84 of the 98 minima and maxima)."""
    live = set(keep)
    out = []
    for a, b in reversed(_sorting_network(n, keep)):
        out.append((a, b, a in live, b in live))
        live.update((a, b))
    return tuple(reversed(out))


def order_statistics(x: Tensor, positions: tuple[int, ...], rows: list[int] | None = None) -> Tensor:
    """Rows ``positions`` of ``x`` sorted along dim 0: ``[len(positions), d]``. ``rows``: sort
    only these rows of ``x`` (as ``x[rows]`` would, without gathering them first).

    ``x`` must hold no NaN. On CPU with few rows a pruned sorting network (elementwise
    min/max over whole rows) is several times faster than torch.sort along dim 0. It runs on
    column blocks, each of its ~100 small ops on one thread: on a busy machine a two-thread op
    waits for the descheduled thread, and the network was then ten times slower. The ops run
    in numpy where the dtype allows: a numpy min/max on a 16k-column block costs less than a
    torch op's dispatch alone (median of 15 rows of 79,510: 1.5-2.0 vs 2.4 ms; exact either
    way, a minimum is a minimum).
    """
    d = x.shape[1]
    n = x.shape[0] if rows is None else len(rows)
    if x.device.type != "cpu" or n > _NETWORK_MAX_N:
        return torch.sort(x if rows is None else x[rows], dim=0).values[list(positions)]
    comps = _live_comparators(n, tuple(sorted(set(positions))))
    pick = list(range(x.shape[0])) if rows is None else list(rows)
    if x.dtype in (torch.float32, torch.float64, torch.float16):
        src = x.detach().numpy()
        out_np = np.empty((len(positions), d), dtype=src.dtype)
        _network(lambda block: [block[i] for i in pick], np.minimum, np.maximum, src, out_np, comps, positions,
                 _NUMPY_BLOCK)
        return torch.from_numpy(out_np)
    out = torch.empty((len(positions), d), dtype=x.dtype)
    _network(lambda block: [block[i] for i in pick], torch.minimum, torch.maximum, x, out, comps, positions, _BLOCK)
    return out


def _network(rows_of: Any, minimum: Any, maximum: Any, x: Any, out: Any,
             comps: tuple[tuple[int, int, bool, bool], ...], positions: tuple[int, ...], block: int) -> None:
    """Run the comparators on column blocks of ``x`` (numpy arrays or torch tensors alike),
    writing rows ``positions`` of the sorted block into ``out``."""
    for start in range(0, x.shape[1], block):
        rows = rows_of(x[:, start : start + block])
        for a, b, need_lo, need_hi in comps:
            lo = minimum(rows[a], rows[b]) if need_lo else None
            if need_hi:
                rows[b] = maximum(rows[a], rows[b])
            if need_lo:
                rows[a] = lo
        for i, p in enumerate(positions):
            out[i, start : start + block] = rows[p]


def nan_to_tails(x: Tensor, bad: Tensor | None = None) -> Tensor:
    """Replace NaNs by +inf, -inf, +inf, ... in their order down each coordinate."""
    if bad is None:
        bad = bad_rows(x)
    if not bool(bad.any()):
        return x
    idx = bad.nonzero().squeeze(1)
    sub = x[idx]
    nan = torch.isnan(sub)
    if not bool(nan.any()):
        return x
    rank = nan.to(torch.int32).cumsum(0)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    sub = torch.where(nan, torch.where(rank % 2 == 1, inf, -inf), sub)
    out = x.clone()
    out[idx] = sub
    return out


def coordinate_median(x: Tensor) -> Tensor:
    """Coordinate-wise median; for an even count the mean of the two middle values.
    ``x`` must hold no NaN (see :func:`nan_to_tails`)."""
    n = x.shape[0]
    lo, hi = (n - 1) // 2, n // 2
    if lo == hi:
        return order_statistics(x, (lo,))[0]
    mid = order_statistics(x, (lo, hi))
    return 0.5 * mid[0] + 0.5 * mid[1]


class Geometry(NamedTuple):
    """Pairwise geometry of n vectors, computed once and shared by selection rules."""

    center: Tensor | None  # [d], input dtype: the origin of y (None: 0)
    y: Tensor  # [n, d], input dtype: vectors minus center, bad rows set to 0
    gram: Tensor  # [n, n] float64: y y^T, bad rows/cols set to 0
    sqdist: Tensor  # [n, n] float64: squared distances, +inf to or from a bad row, 0 diagonal
    bad: Tensor  # [n] bool
    row_sum: Tensor  # [n] float64: sum of each input's coordinates, a last-resort tie-break


def geometry(x: Tensor, center: Tensor | None = None, *, gram_dtype: torch.dtype = torch.float64) -> Geometry:
    """Gram matrix of ``x - center`` (``center=None``: of ``x``) and squared distances.

    ``gram_dtype``: the product is accumulated in float64 by default (see the module notes);
    ``x.dtype`` computes it in the input precision (one BLAS call, no float64 copies) for rules
    whose centre sits among the inputs, where nothing cancels (centered clipping). The matrix
    is stored in float64 either way."""
    row_sum = x.sum(dim=1)
    bad = ~torch.isfinite(row_sum)
    any_bad = bool(bad.any())
    clean = (
        torch.where(bad[:, None], torch.zeros((), dtype=x.dtype, device=x.device), x)
        if any_bad
        else x
    )
    y = clean
    if center is not None:
        y = clean - center
        if any_bad:
            y = torch.where(bad[:, None], torch.zeros((), dtype=x.dtype, device=x.device), y)
    n, d = y.shape
    if gram_dtype == y.dtype and y.dtype != torch.float64 and n * n * d > _SMALL_GRAM:
        gram = (y @ y.T).to(torch.float64)
    elif n * n * d > _SMALL_GRAM and (first := _first_copies(x, row_sum)) is not None:
        # Repeated rows (every vector attack sends f identical ones) share one Gram row: the
        # product runs on the distinct rows only ((13/15)^2 of the work for f = 3), and copies
        # are exactly at distance 0 from each other.
        distinct = sorted(set(first))
        slot = {r: i for i, r in enumerate(distinct)}
        index = torch.tensor([slot[r] for r in first], device=x.device)
        lo, hi = distinct[0], distinct[-1] + 1
        # attack rows come last: the distinct rows are then a leading block (a view, no copy)
        gram = _gram64(y[lo:hi] if hi - lo == len(distinct) else y[distinct])[index][:, index]
    else:
        gram = _gram64(y)
    if x.device.type == "cpu":
        return _finish_cpu(center, x, y, gram, bad, row_sum)
    gram = 0.5 * (gram + gram.T)  # exactly symmetric, so tied distances compare equal
    sq = gram.diagonal()
    # A finite vector whose squared norm overflows (or nearly) is as unusable as a NaN one.
    huge = ~torch.isfinite(sq) | (sq > torch.finfo(torch.float64).max / 8)
    if bool(huge.any()):
        bad = bad | huge
        keep = (~bad).to(torch.float64)
        gram = torch.where(
            keep[:, None] * keep[None, :] > 0,
            gram,
            torch.zeros((), dtype=torch.float64, device=x.device),
        )
        sq = gram.diagonal()
        y = torch.where(bad[:, None], torch.zeros((), dtype=x.dtype, device=x.device), y)
    sqdist = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min_(0.0)
    sqdist.fill_diagonal_(0.0)
    if bool(bad.any()):
        inf = torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
        sqdist = torch.where(bad[:, None] | bad[None, :], inf, sqdist)
        sqdist.fill_diagonal_(0.0)
    row_sum = torch.where(bad, torch.zeros((), dtype=row_sum.dtype, device=x.device), row_sum)
    return Geometry(center, y, gram, sqdist, bad, row_sum.to(torch.float64))


def _finish_cpu(center: Tensor | None, x: Tensor, y: Tensor, gram: Tensor, bad: Tensor, row_sum: Tensor) -> Geometry:
    """The rest of :func:`geometry` on CPU: the same float64 arithmetic on the [n, n] matrices,
    in numpy (a dozen small torch ops cost ~0.5 ms a call in dispatch alone); the outputs are
    torch tensors sharing the arrays' memory."""
    g = gram.numpy()
    b = bad.numpy().copy()
    g = 0.5 * (g + g.T)  # exactly symmetric, so tied distances compare equal
    sq = np.diagonal(g)
    # A finite vector whose squared norm overflows (or nearly) is as unusable as a NaN one.
    huge = ~np.isfinite(sq) | (sq > np.finfo(np.float64).max / 8)
    if huge.any():
        b |= huge
        g = np.where(~b[:, None] & ~b[None, :], g, 0.0)
        sq = np.diagonal(g)
        y = torch.where(torch.from_numpy(b)[:, None], torch.zeros((), dtype=x.dtype), y)
    sqdist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    np.fill_diagonal(sqdist, 0.0)
    if b.any():
        sqdist = np.where(b[:, None] | b[None, :], np.inf, sqdist)
        np.fill_diagonal(sqdist, 0.0)
    rows = np.where(b, 0.0, row_sum.numpy().astype(np.float64))
    return Geometry(center, y, torch.from_numpy(g), torch.from_numpy(sqdist), torch.from_numpy(b), torch.from_numpy(rows))


def _first_copies(x: Tensor, row_sum: Tensor) -> list[int] | None:
    """For each row of ``x``, the first row equal to it (itself when none is); None when the
    rows are all distinct. Candidates share a finite row sum (one small read of ``row_sum``);
    each is then compared in full, so distinct rows with equal sums stay distinct."""
    sums = row_sum.tolist()
    first = list(range(len(sums)))
    seen: dict[float, list[int]] = {}
    found = False
    # on CPU numpy compares two rows about twice as fast as torch.equal
    rows = x.detach().numpy() if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) else None
    for i, s in enumerate(sums):
        if s != s or s in (float("inf"), float("-inf")):
            continue
        for j in seen.setdefault(s, []):
            if np.array_equal(rows[i], rows[j]) if rows is not None else torch.equal(x[i], x[j]):
                first[i], found = j, True
                break
        else:
            seen[s].append(i)
    return first if found else None


def _gram64(y: Tensor) -> Tensor:
    """``y y^T`` accumulated in float64, ``y`` in any float dtype."""
    n, d = y.shape
    if n * n * d <= _SMALL_GRAM:
        # Small problems: a broadcast product stays single-threaded, whereas BLAS spins up its
        # thread pool for microseconds of work (ms on a busy machine).
        y64 = y.to(torch.float64)
        return (y64[:, None, :] * y64[None, :, :]).sum(dim=-1)
    if y.dtype == torch.float64 or y.device.type != "cpu":
        y64 = y.to(torch.float64)
        return y64 @ y64.T
    # On CPU, column blocks converted while they sit in cache: a float64 copy of the whole of
    # y costs a pass over 2x its memory, as much as the product itself ([15, 79510]: 4.2 ms
    # chunked vs 6.9 ms whole on the busy 2-core box, 1 thread).
    src = y.detach().numpy() if y.dtype in (torch.float32, torch.float16) else None
    limiter = _numpy_blas() if src is not None else None
    if limiter is not None:
        return torch.from_numpy(_gram64_syrk(src, limiter))
    gram = torch.zeros((n, n), dtype=torch.float64, device=y.device)
    block = torch.empty((n, min(d, _GRAM_BLOCK)), dtype=torch.float64, device=y.device)
    for start in range(0, d, _GRAM_BLOCK):
        part = y[:, start : start + _GRAM_BLOCK]
        c = block[:, : part.shape[1]]
        c.copy_(part)
        gram.addmm_(c, c.T)
    return gram


def _gram64_syrk(src: np.ndarray, limiter: Any) -> np.ndarray:
    """``src src^T`` in float64 by column blocks, with numpy: it converts a strided float32
    block ~2x faster than torch's ``copy_``, and ``c @ c.T`` runs BLAS's symmetric rank-k
    update (syrk: one triangle, half the multiply-adds of torch's general product). Measured
    on [13, 79510], 1 thread, the busy 2-core box: 1.9 vs 2.5 ms (min), ~25% less. numpy's
    BLAS (OpenBLAS) keeps its own thread pool: it runs with torch's thread count here, as
    every other product of a step does (at n = 51 it otherwise took both cores, 18x slower
    in wall time on a loaded box)."""
    n, d = src.shape
    gram = np.zeros((n, n))
    block = np.empty((n, min(d, _GRAM_BLOCK)))
    with limiter.limit(limits=torch.get_num_threads()):
        for start in range(0, d, _GRAM_BLOCK):
            width = min(_GRAM_BLOCK, d - start)
            # the last, narrower block in its own array: a strided view would not take syrk
            c = block if width == block.shape[1] else np.empty((n, width))
            c[...] = src[:, start : start + width]
            gram += c @ c.T
    return gram


@functools.lru_cache(maxsize=1)
def _numpy_blas() -> Any:
    """threadpoolctl's handle on numpy's BLAS when it is OpenBLAS (numpy's wheels ship it);
    None otherwise (the Gram product then stays in torch)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    blas = ThreadpoolController().select(user_api="blas", internal_api="openblas")
    return blas if blas.lib_controllers else None


def distances_from_combination(gram: Tensor, coef: Tensor) -> Tensor:
    """``|y_i - Y^T coef|`` for every i, using only the Gram matrix (no pass over d)."""
    g_coef = gram @ coef
    sq = gram.diagonal() - 2.0 * g_coef + coef @ g_coef
    return sq.clamp_min(0.0).sqrt()


def combine(geo: Geometry, coef: Tensor) -> Tensor:
    """``center + Y^T coef`` in the input dtype (bad rows of Y are zero)."""
    out = coef.to(geo.y.dtype) @ geo.y
    return out if geo.center is None else geo.center + out
