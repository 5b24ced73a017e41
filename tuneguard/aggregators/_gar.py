"""A rule or chain resolved, routed and checked once: the :class:`Gar` object of a run.

>>> gar = build_gar("bucketing+krum", n=15, f=3, s=2)   # raises GarRequirementError once
>>> gar.randomized, gar.kappa(), gar.vn_bound()
>>> R = gar(vectors, generator=step_generator)           # vectors: Tensor[15, d]

A training run builds its Gar once (``build_gar(cfg)`` takes an experiment config) and uses it
for every step: the server's aggregation, the GAR-aware attack, the VN bound. Side rules read
the Gar's metadata (``randomized``, ``sign_based``, ``kappa``), never the stage names.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from ._chain import _check_vectors, _plan
from ._spec import AggregatorSpec


class Gar:
    """A rule or chain with its (n, f) and parameters, checked once.

    Attributes: ``name`` (as given, e.g. ``"nnm+krum"``), ``n``, ``f``, ``params`` (the
    parameters as given, read-only), ``specs`` (the stages, first first), ``stage_params``
    (each stage's parameters, defaults filled in), ``counts`` (how many vectors each stage
    sees: bucketing hands ``ceil(n / s)`` on).

    ``gar(vectors, generator=None)`` aggregates ``vectors`` ``[n, d]`` into ``[d]`` exactly as
    ``aggregate(name, vectors, f, **params)`` does, without re-checking the rule.
    ``generator`` goes to the stages that draw randomness (bucketing's shuffle); ``None``
    keeps the one in ``params`` (or the stage's documented default seed). Deterministic rules
    draw nothing, so they ignore it.
    """

    __slots__ = ("name", "n", "f", "params", "specs", "stage_params", "counts", "_random_stages")

    def __init__(self, name: str, n: int, f: int, params: Mapping[str, Any] | None = None) -> None:
        params = dict(params or {})
        specs, stage_params = _plan(name, n, f, params)  # names, parameters, every requirement
        counts = [n]
        for spec, p in zip(specs[:-1], stage_params[:-1], strict=True):
            assert spec.output_n is not None
            counts.append(spec.output_n(counts[-1], p))
        self.name = name
        self.n, self.f = n, f
        self.params = MappingProxyType(params)
        self.specs: tuple[AggregatorSpec, ...] = tuple(specs)
        self.stage_params = tuple(MappingProxyType(p) for p in stage_params)
        self.counts = tuple(counts)
        self._random_stages = tuple(i for i, s in enumerate(specs) if s.randomized)

    # -- metadata ----------------------------------------------------------------------
    @property
    def rule(self) -> AggregatorSpec:
        """The final rule's spec (the stages before it are pre-aggregation wrappers)."""
        return self.specs[-1]

    @property
    def randomized(self) -> bool:
        """True when some stage draws randomness (it then takes the step's generator)."""
        return bool(self._random_stages)

    @property
    def sign_based(self) -> bool:
        """True when the output is a sign vector (signSGD majority vote): update with lr * R."""
        return self.rule.sign_based

    def kappa(self, n: int | None = None, f: int | None = None) -> float | None:
        """The VN constant of the final rule at the number of vectors it sees (None where not
        known). Defaults to this Gar's (n, f); other values are checked like a new build."""
        if n is None and f is None:
            return self.rule.kappa(self.counts[-1], self.f)
        return Gar(self.name, self.n if n is None else n, self.f if f is None else f, self.params).kappa()

    def vn_bound(self) -> float | None:
        """1 / kappa: the VN ratio under which the rule's guarantee holds (None if unknown)."""
        kappa = self.kappa()
        return None if kappa is None or kappa <= 0 else 1.0 / kappa

    def with_f(self, f: int) -> Gar:
        """The same rule and parameters with another f (checked)."""
        return self if f == self.f else Gar(self.name, self.n, f, self.params)

    # -- aggregation -------------------------------------------------------------------
    def __call__(self, vectors: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_vectors(vectors)
        if vectors.shape[0] != self.n:
            raise ValueError(
                f"{self.name!r} was built for n={self.n} vectors; got {vectors.shape[0]}. "
                f"Build another with build_gar({self.name!r}, n={vectors.shape[0]}, f={self.f}, ...)"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        with torch.no_grad():
            x = vectors
            for i, (spec, p) in enumerate(zip(self.specs, self.stage_params, strict=True)):
                if generator is not None and i in self._random_stages:
                    x = spec.fn(x, self.f, **{**p, "generator": generator})
                else:
                    x = spec.fn(x, self.f, **p)
        return x

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"Gar({self.name!r}, n={self.n}, f={self.f}{extra})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Gar, (self.name, self.n, self.f, dict(self.params)))


def build_gar(rule: Any, n: int | None = None, f: int | None = None, **params: Any) -> Gar:
    """Build the :class:`Gar` of a rule or chain name, or of an experiment config.

    ``build_gar("nnm+krum", n=15, f=3)``; ``build_gar(cfg)`` reads ``cfg.gar.name``,
    ``cfg.gar.params``, ``cfg.n_workers`` and ``cfg.f`` (a :class:`~tuneguard.config.ExperimentConfig`).
    Raises :class:`GarRequirementError` when (n, f) or a parameter value breaks a stage's
    requirement (the message says what would work), ``ValueError`` for unknown names.
    """
    if not isinstance(rule, str) and hasattr(rule, "gar") and hasattr(rule, "n_workers"):
        if n is not None or f is not None or params:
            raise ValueError("build_gar(cfg) takes n, f and the parameters from the config; pass none")
        return Gar(rule.gar.name, rule.n_workers, rule.f, dict(rule.gar.params))
    if n is None or f is None:
        raise ValueError(f"build_gar({rule!r}, n=..., f=...): n and f are required with a rule name")
    return Gar(rule, n, f, params)
