"""Rule names, chains ``pre+...+rule``, parameter routing and the public ``aggregate``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._spec import AGGREGATORS, AggregatorSpec


def _valid_names() -> str:
    rules = [s.name for s in AGGREGATORS.values() if not s.is_pre]
    pres = [s.name for s in AGGREGATORS.values() if s.is_pre]
    return f"rules: {', '.join(rules)}; pre-aggregation wrappers (as 'pre+rule'): {', '.join(pres)}"


def resolve(name: str) -> list[AggregatorSpec]:
    """The specs of a rule or chain name, first stage first.

    ``"krum"`` -> [krum]; ``"bucketing+nnm+mda"`` -> [bucketing, nnm, mda]. Every stage but the
    last must be a pre-aggregation wrapper (nnm, bucketing) and the last a rule. Names are
    case-sensitive; spaces around ``+`` are ignored.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"aggregation rule name must be a non-empty string; got {name!r}. Valid {_valid_names()}"
        )
    parts = [p.strip() for p in name.split("+")]
    specs = []
    for part in parts:
        if part not in AGGREGATORS:
            raise ValueError(
                f"unknown aggregation rule {part!r} in {name!r}. Valid {_valid_names()}"
            )
        specs.append(AGGREGATORS[part])
    for spec in specs[:-1]:
        if not spec.is_pre:
            raise ValueError(
                f"in {name!r}, {spec.name!r} is a rule, not a pre-aggregation wrapper: only the "
                f"last stage of a chain may be a rule. Valid {_valid_names()}"
            )
    if specs[-1].is_pre:
        raise ValueError(
            f"{name!r} ends with the pre-aggregation wrapper {specs[-1].name!r}; a chain must end "
            f"with a rule, e.g. '{name}+krum'. Valid {_valid_names()}"
        )
    return specs


def _route(name: str, specs: list[AggregatorSpec], params: dict[str, Any]) -> list[dict[str, Any]]:
    """Send each parameter to the one stage that declares it; unknown or ambiguous is an error."""
    routed: list[dict[str, Any]] = [{} for _ in specs]
    for key, value in params.items():
        owners = [i for i, s in enumerate(specs) if key in s.params]
        if not owners:
            declared = [f"{s.name}: {', '.join(s.params)}" for s in specs if s.params]
            valid = "; ".join(declared) if declared else "none"
            raise ValueError(f"{name!r} takes no parameter {key!r}; valid parameters: {valid}")
        if len(owners) > 1:
            raise ValueError(
                f"parameter {key!r} is ambiguous in {name!r}: declared by several stages "
                f"({', '.join(specs[i].name for i in owners)})"
            )
        routed[owners[0]][key] = value
    return [spec.merge_params(p) for spec, p in zip(specs, routed, strict=True)]


def _plan(
    name: str, n: int, f: int, params: dict[str, Any]
) -> tuple[list[AggregatorSpec], list[dict[str, Any]]]:
    specs = resolve(name)
    stage_params = _route(name, specs, params)
    count = n
    for i, (spec, p) in enumerate(zip(specs, stage_params, strict=True)):
        try:
            spec.check(count, f, **p)
        except ValueError as err:
            if i == 0:
                raise
            before = "+".join(s.name for s in specs[:i])
            raise type(err)(
                f"{err} (in {name!r}: after {before}, {spec.name} sees n={count} vectors out of {n})"
            ) from None
        if spec.is_pre:
            assert spec.output_n is not None
            count = spec.output_n(count, p)
    return specs, stage_params


def check_rule(name: str, n: int, f: int, **params: Any) -> None:
    """Raise ValueError unless ``aggregate(name, vectors[n, d], f, **params)`` is valid:
    names, parameter names and values, and every stage's requirement on (n, f)."""
    _plan(name, n, f, params)


def _check_vectors(vectors: Any) -> None:
    if not isinstance(vectors, Tensor):
        raise ValueError(
            f"vectors must be a torch.Tensor of shape [n, d]; got {type(vectors).__name__}"
        )
    if vectors.dim() != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise ValueError(
            f"vectors must have shape [n, d] with n, d >= 1; got {tuple(vectors.shape)}"
        )
    if not vectors.is_floating_point():
        raise ValueError(f"vectors must have a floating dtype; got {vectors.dtype}")


def aggregate(name: str, vectors: Tensor, f: int, **params: Any) -> Tensor:
    """Aggregate ``vectors`` ``[n, d]`` (f of them possibly Byzantine) into one vector ``[d]``.

    ``name`` is a rule (``"krum"``) or a chain ``"pre+...+rule"`` whose first stages are
    pre-aggregation wrappers applied in order: ``"nnm+krum"``, ``"bucketing+median"``,
    ``"bucketing+nnm+mda"``. Every stage receives the same f; bucketing passes
    ``ceil(n/s)`` vectors on, and each stage checks its requirement on the count it receives.
    Parameters go by name to the stage that declares them (bucketing's ``s`` and
    ``generator``, multi_krum's ``m``, ...); an unknown or ambiguous name is a ValueError,
    never silently dropped. Runs on the input's device and dtype, without autograd.
    """
    _check_vectors(vectors)
    specs, stage_params = _plan(name, vectors.shape[0], f, params)
    with torch.no_grad():
        x = vectors
        for spec, p in zip(specs, stage_params, strict=True):
            x = spec.fn(x, f, **p)
    return x


def chain_kappa(name: str, n: int, f: int, **params: Any) -> float | None:
    """The VN constant kappa of a rule or chain: the final rule's kappa at the number of vectors
    it actually sees (``bucketing`` with bucket size s hands ceil(n / s) vectors on)."""
    specs, stage_params = _plan(name, n, f, dict(params))
    count = n
    for spec, p in zip(specs[:-1], stage_params[:-1], strict=True):
        assert spec.output_n is not None
        count = spec.output_n(count, p)
    return specs[-1].kappa(count, f)
