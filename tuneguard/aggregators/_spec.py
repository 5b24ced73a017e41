"""Rule metadata: the :class:`AggregatorSpec` dataclass and the registry that refuses duplicates.

Every rule declares its requirement on ``(n, f)`` as ``n >= a f + b`` (plus, for a few rules,
an extra condition such as MDA's subset cap or a parameter range). ``check``, ``min_n``,
``max_f``, the CLI table, config validation and the VN-bound line in MLflow all read the same
object.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class Registry(dict[str, V], Generic[V]):
    """A ``dict`` from name to spec that refuses to register a name twice."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def __setitem__(self, key: str, value: V) -> None:
        if key in self:
            raise ValueError(f"{self.kind} {key!r} is already registered; names must be unique")
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:  # route through __setitem__
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: V) -> V:  # type: ignore[override]
        if key not in self:
            self[key] = default
        return self[key]

    def register(self, spec: V) -> V:
        self[spec.name] = spec  # type: ignore[attr-defined]
        return spec


class GarRequirementError(ValueError):
    """A rule or chain cannot run with these (n, f) or parameter values: its requirement fails.

    A ``ValueError`` (so existing ``except ValueError`` keep working); unknown rule or
    parameter names stay plain ``ValueError``. The message names the requirement and what
    would satisfy it.
    """


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def linear_requirement(a: int, b: int) -> str:
    """The text ``n >= a f + b`` with the obvious simplifications."""
    f_term = "f" if a == 1 else f"{a}f"
    if b == 0:
        return f"n >= {f_term}"
    return f"n >= {f_term} + {b}"


@dataclass(frozen=True)
class AggregatorSpec:
    """What one aggregation rule (or pre-aggregation wrapper) is, needs and guarantees.

    The requirement is ``n >= f_coef * f + n_const`` (``requirement`` holds it as text), plus
    ``extra_check(n, f, params) -> str | None`` for anything that is not linear (MDA's subset
    cap, parameter ranges). ``fn(vectors, f, **params)`` returns one vector ``[d]`` for a rule,
    and ``[output_n(n, params), d]`` vectors for a pre-aggregation wrapper (``is_pre``).
    """

    name: str
    fn: Callable[..., Any]
    f_coef: int
    n_const: int
    reference: str
    description: str
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    kappa_formula: str | None = None
    kappa_fn: Callable[[int, int], float] | None = field(default=None, repr=False)
    sign_based: bool = False
    is_pre: bool = False
    randomized: bool = False
    extra_requirement: str | None = None
    extra_check: Callable[[int, int, Mapping[str, Any]], str | None] | None = field(
        default=None, repr=False
    )
    output_n: Callable[[int, Mapping[str, Any]], int] | None = field(default=None, repr=False)
    requirement: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        text = linear_requirement(self.f_coef, self.n_const)
        if self.extra_requirement:
            text = f"{text}; {self.extra_requirement}"
        object.__setattr__(self, "requirement", text)
        if self.is_pre and self.output_n is None:
            raise ValueError(f"pre-aggregation wrapper {self.name!r} must declare output_n")

    def __reduce__(self) -> tuple[Any, ...]:
        # MappingProxyType does not pickle; rebuild from the constructor's arguments.
        return (_rebuild, (type(self), init_kwargs(self)))

    # -- (n, f) requirement -------------------------------------------------------------
    def _linear_ok(self, n: int, f: int) -> bool:
        return n >= self.f_coef * f + self.n_const

    def _problem(self, n: int, f: int, params: Mapping[str, Any]) -> str | None:
        if not self._linear_ok(n, f):
            return "linear"
        if self.extra_check is not None:
            return self.extra_check(n, f, params)
        return None

    def _ok(self, n: int, f: int) -> bool:
        return self._problem(n, f, self.params) is None

    def check(self, n: int, f: int, **params: Any) -> None:
        """Raise ValueError unless this rule accepts ``n`` vectors of which ``f`` Byzantine.

        ``params`` (optional, defaults otherwise) are checked too where the requirement
        depends on them, e.g. multi_krum's ``m``. Unknown parameter names are errors.
        """
        n = _check_count("n (number of vectors)", n)
        f = _check_count("f (number of Byzantine vectors)", f)
        if n < 1:
            raise ValueError(f"{self.name} needs at least one vector; got n={n}")
        if f < 0:
            raise ValueError(f"{self.name}: f must be >= 0; got f={f}")
        merged = self.merge_params(params)
        problem = self._problem(n, f, merged)
        if problem is None:
            return
        if problem != "linear":
            raise GarRequirementError(f"{self.name}: {problem}")
        hints = []
        max_f = self._max_f_or_none(n)
        hints.append(
            f"with n={n} use f <= {max_f}" if max_f is not None else f"no f works with n={n}"
        )
        min_n = self._min_n_or_none(f)
        if min_n is not None:
            hints.append(f"with f={f} use n >= {min_n}")
        hint = ", or ".join(hints)
        raise GarRequirementError(
            f"{self.name} needs {self.requirement}; got n={n}, f={f}. {hint[0].upper()}{hint[1:]}"
        )

    def merge_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``params``; an unknown name is a ValueError."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            valid = ", ".join(self.params) or "none"
            raise ValueError(
                f"{self.name} takes no parameter {', '.join(map(repr, unknown))}; "
                f"its parameters: {valid}"
            )
        return {**self.params, **params}

    def _max_f_or_none(self, n: int) -> int | None:
        f = (n - self.n_const) // self.f_coef if self.f_coef > 0 else n - 1
        f = min(f, n - 1)
        while f >= 0 and not self._ok(n, f):
            f -= 1
        return f if f >= 0 else None

    def _min_n_or_none(self, f: int) -> int | None:
        n = max(self.f_coef * f + self.n_const, f + 1, 1)
        # Past the linear bound only extra conditions can fail; MDA's cap only grows with n.
        return n if self._ok(n, f) else None

    def max_f(self, n: int) -> int:
        """The largest f this rule accepts with n vectors (ValueError if none)."""
        n = _check_count("n", n)
        f = self._max_f_or_none(n)
        if f is None:
            raise ValueError(f"{self.name} needs {self.requirement}: no f works with n={n}")
        return f

    def min_n(self, f: int) -> int:
        """The smallest n this rule accepts with f Byzantine vectors (ValueError if none)."""
        f = _check_count("f", f)
        if f < 0:
            raise ValueError(f"f must be >= 0; got f={f}")
        n = self._min_n_or_none(f)
        if n is None:
            raise ValueError(f"{self.name} needs {self.requirement}: no n works with f={f}")
        return n

    def kappa(self, n: int, f: int) -> float | None:
        """The VN constant kappa(n, f) where known (None otherwise); ValueError if (n, f) is
        not allowed."""
        self.check(n, f)
        if self.kappa_fn is None:
            return None
        return float(self.kappa_fn(n, f))


def init_kwargs(spec: Any) -> dict[str, Any]:
    """The constructor arguments of a spec dataclass, its params as a plain dict."""
    kwargs = {f.name: getattr(spec, f.name) for f in fields(spec) if f.init}
    kwargs["params"] = dict(kwargs["params"])
    return kwargs


def _rebuild(cls: type, kwargs: dict[str, Any]) -> Any:
    return cls(**kwargs)


AGGREGATORS: Registry[AggregatorSpec] = Registry("aggregation rule")


def register(spec: AggregatorSpec) -> AggregatorSpec:
    """Add a rule to :data:`AGGREGATORS` (a duplicate name is a ValueError)."""
    return AGGREGATORS.register(spec)


def kappa_krum(n: int, f: int) -> float:
    return math.sqrt(2 * (n - f + (f * (n - f - 2) + f**2 * (n - f - 1)) / (n - 2 * f - 2)))
