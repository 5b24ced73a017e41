"""Robust gradient aggregation rules (GARs) and their registry.

>>> from tuneguard.aggregators import aggregate, AGGREGATORS
>>> out = aggregate("krum", vectors, f=3)                    # vectors: Tensor[n, d]
>>> out = aggregate("bucketing+median", vectors, f=3, s=2)   # chain: pre-aggregation + rule
>>> AGGREGATORS["bulyan"].check(n=15, f=3); AGGREGATORS["mda"].kappa(15, 3)
>>> gar = build_gar("nnm+krum", n=15, f=3)   # checked once; gar(vectors), gar.kappa()

Rules: average, krum, multi_krum, mda, median, trimmed_mean, geometric_median, bulyan,
centered_clipping, sign_majority; pre-aggregation wrappers: nnm, bucketing (chain them with
``+``). Definitions follow paper 001 Appendix B and ``DESIGN.md`` ("Pinned definitions").
Adding a rule is one function plus one ``register(AggregatorSpec(...))`` next to it, in a
module imported below.

Non-finite inputs: a vector with a NaN or Inf never crashes a rule, and no robust rule outputs
NaN or Inf while at most f inputs are non-finite (see :mod:`._geometry` for how); average
propagates them.
"""

# Importing a rule module registers its rules; this order is the order `tuneguard list` shows.
# isort: off
from . import mean  # noqa: F401
from . import krum  # noqa: F401
from . import mda  # noqa: F401
from . import coordinate  # noqa: F401
from . import geometric  # noqa: F401
from . import pre  # noqa: F401

# isort: on
from ._chain import aggregate, chain_kappa, check_rule, resolve
from ._gar import Gar, build_gar
from ._spec import AGGREGATORS, AggregatorSpec, GarRequirementError, Registry, register

__all__ = [
    "AGGREGATORS",
    "AggregatorSpec",
    "Gar",
    "GarRequirementError",
    "build_gar",
    "chain_kappa",
    "Registry",
    "aggregate",
    "check_rule",
    "register",
    "resolve",
]
