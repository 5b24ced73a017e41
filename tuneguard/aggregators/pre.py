"""Pre-aggregation wrappers: they map n vectors to n' vectors for the next stage of a chain.

A chain is written ``"pre+...+rule"``, e.g. ``"nnm+krum"`` or ``"bucketing+nnm+mda"``; see
:func:`tuneguard.aggregators.aggregate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._geometry import geometry
from ._spec import AggregatorSpec, register

DEFAULT_BUCKETING_SEED = 0
"""Seed of the generator bucketing uses when none is given (same shuffle every call)."""


def nnm(vectors: Tensor, f: int) -> Tensor:
    r"""Nearest-neighbour mixing (Allouah et al., AISTATS 2023, "Fixing by mixing: a recipe
    for optimal Byzantine ML under heterogeneity").

    .. math:: \tilde g_i = \frac{1}{n - f} \sum_{j \in N_i} g_j

    where :math:`N_i` holds the :math:`n - f` vectors closest to :math:`g_i`, itself included
    (ties in distance go to the lower index, so identical inputs get identical outputs).
    Returns n vectors; the next stage sees the same n and f. Needs
    :math:`n \ge 2f + 1`. A non-finite input is infinitely far from the others, so it is in
    no finite vector's neighbourhood; it is passed on unchanged (still non-finite) for the next
    rule to discard.
    """
    n = vectors.shape[0]
    geo = geometry(vectors)
    d = geo.sqdist.clone()
    d.fill_diagonal_(-1.0)  # a vector is always its own neighbour, even among duplicates
    # A stable sort, not topk: topk does not order ties, and identical rows then picked
    # different neighbours among equidistant ones (so got different outputs).
    nbrs = torch.sort(d, dim=1, stable=True).indices[:, : n - f]
    mix = torch.zeros((n, n), dtype=vectors.dtype, device=vectors.device)
    mix.scatter_(1, nbrs, 1.0 / (n - f))
    if not bool(geo.bad.any()):
        return mix @ vectors
    # Matmul would spread 0 * NaN = NaN: mix the cleaned rows, then restore the bad ones.
    clean = torch.where(
        geo.bad[:, None], torch.zeros((), dtype=vectors.dtype, device=vectors.device), vectors
    )
    return torch.where(geo.bad[:, None], vectors, mix @ clean)


def bucketing(
    vectors: Tensor, f: int, s: int = 2, generator: torch.Generator | None = None
) -> Tensor:
    r"""Bucketing (Karimireddy, He & Jaggi, ICLR 2022, "Byzantine-robust learning on
    heterogeneous datasets via bucketing", Algorithm 1).

    .. math::
        y_b = \frac{1}{|B_b|} \sum_{i \in B_b} g_{\pi(i)}, \qquad
        B_b = \{(b-1)s + 1, \dots, \min(bs, n)\}, \quad b = 1..\lceil n/s \rceil

    with :math:`\pi` a uniformly random permutation drawn from ``generator``. Returns
    :math:`n' = \lceil n/s \rceil` bucket means (the last bucket, if smaller, is averaged over
    its own size). The next stage gets :math:`n'` vectors and the **same f**: the shuffle does
    not stop the f Byzantine vectors from landing in f different buckets, and the paper's
    guarantee is for the inner rule tolerating a fraction :math:`s f / n` of bad inputs, i.e.
    f out of :math:`n/s`. ``generator=None`` uses a fresh generator seeded
    :data:`DEFAULT_BUCKETING_SEED` (the same shuffle on every call); the engine passes one
    derived from (seed, step). A bucket holding a non-finite vector is non-finite; at most f
    buckets are.
    """
    n = vectors.shape[0]
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_BUCKETING_SEED)
    perm = torch.randperm(n, generator=generator, device=generator.device).to(vectors.device)
    buckets = math.ceil(n / s)
    ids = torch.arange(n, device=vectors.device) // s
    sums = torch.zeros((buckets, vectors.shape[1]), dtype=vectors.dtype, device=vectors.device)
    sums.index_add_(0, ids, vectors[perm])
    counts = torch.bincount(ids, minlength=buckets).to(vectors.dtype)
    return sums / counts[:, None]


def _same_n(n: int, params: Mapping[str, Any]) -> int:
    return n


def _bucket_count(n: int, params: Mapping[str, Any]) -> int:
    return math.ceil(n / params["s"])


def _check_bucketing(n: int, f: int, p: Mapping[str, Any]) -> str | None:
    s, gen = p["s"], p["generator"]
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        return f"s (bucket size) must be a positive integer; got {s!r}"
    if gen is not None and not isinstance(gen, torch.Generator):
        return f"generator must be a torch.Generator or None; got {type(gen).__name__}"
    return None


register(
    AggregatorSpec(
        name="nnm",
        fn=nnm,
        f_coef=2,
        n_const=1,
        is_pre=True,
        output_n=_same_n,
        reference="Allouah et al., AISTATS 2023 (Fixing by Mixing)",
        description="pre-aggregation: each vector becomes the mean of its n - f nearest (itself included)",
    )
)
register(
    AggregatorSpec(
        name="bucketing",
        fn=bucketing,
        f_coef=1,
        n_const=1,
        params={"s": 2, "generator": None},
        extra_requirement="the next stage sees ceil(n/s) vectors and the same f",
        extra_check=_check_bucketing,
        is_pre=True,
        randomized=True,
        output_n=_bucket_count,
        reference="Karimireddy, He & Jaggi, ICLR 2022 (bucketing)",
        description="pre-aggregation: means of ceil(n/s) random buckets of size s; "
        "generator=None means seed 0",
    )
)
