"""Search-space files: the format, parsing, and validation before anything runs.

A search space is a YAML mapping with five sections (docs/search_spaces.md has the full
reference and examples)::

    description: free text
    base:        # any ExperimentConfig keys: the config every trial starts from
      dataset: mnist
      n_workers: 7
    scenario:    # the threat model and the budget the search must live with
      f: 1                       # Byzantine workers (a search parameter may override it)
      attacks: [little, empire]  # worst_case: every trial trains once per attack
      privacy: {mode: total, total_eps: 2.0, delta: 1.0e-5}
    search:      # parameters: dotted ExperimentConfig paths (or the --set short names)
      batch_size: {logint: [8, 64]}
      gar: [mda, krum, multi_krum]           # a bare list is a choice
      gar.params.m: {int: [2, 4], when: {gar: multi_krum}}
      lr: 0.3                                # a scalar is a constant
    tune:
      mode: optuna        # or grid (search may then be a list of grids: their union)
      num_samples: 6
      objective: worst_case

Parameter kinds: ``choice`` (list), ``uniform`` / ``loguniform`` ([low, high], optional
``step`` for uniform), ``int`` / ``logint`` ([low, high], optional ``step`` for int), ``const``
(any value, also a mapping). ``when: {param: value or [values]}`` makes a parameter exist only
when another (discrete) parameter takes one of the given values.

Validation (:meth:`Space.validate`) runs before Ray starts: every parameter path must exist in
ExperimentConfig; every combination the space can produce (each categorical combination x each
range endpoint x each attack of the scenario) is built with ``build_config``. A combination that
fails only because the chosen GAR cannot take (n, f) (Bulyan needs n >= 4f + 3) is *excluded*
and listed in the report: grid mode drops it, optuna mode reports such a trial with objective
0.0 and ``excluded: 1`` without training. Any other failure is an error that names the
parameter values and the reason.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tuneguard.config import (
    MAX_SEED,
    MAX_STEPS,
    SHORT_NAMES,
    ConfigError,
    ExperimentConfig,
    RuleConfig,
    apply_overrides,
    build_config,
    check_text,
)
from tuneguard.safeyaml import YamlError, short

KINDS = ("const", "choice", "uniform", "loguniform", "int", "logint")
RANGE_KINDS = ("uniform", "loguniform", "int", "logint")
SECTIONS = ("description", "base", "scenario", "search", "tune")
RULE_KEYS = ("gar", "attack")  # a mapping value at these keys replaces the whole rule
MAX_COMBINATIONS = 200_000


class SpaceError(ConfigError):
    """A search space that cannot run; the message names the section, the key and the fix."""


class Excluded(ValueError):
    """A combination the chosen GAR cannot take (its (n, f) requirement); not an error."""


# --------------------------------------------------------------------------------------------
# Sections with fixed keys
# --------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # strict: numbers are numbers, booleans booleans (see tuneguard.config._Strict); no inf/nan.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class AshaSettings(_Strict):
    grace_period: int = Field(2, ge=1, le=MAX_STEPS, description="evaluation reports a trial runs before ASHA may stop it")
    reduction_factor: int = Field(2, ge=2, le=1000)


# The engine of a tune job whose space names none: Ray actors, the mission's shape (a parameter
# server and worker actors per trial). Since steps between same-node actors go through shared
# memory, the quickstart job costs ~1.25x the single-process engine on 2 cores (issue 12's bar:
# 1.3x; BENCHMARKS.md, "Tune job per engine").
DEFAULT_TUNE_ENGINE = "actors"


class TuneSettings(_Strict):
    """The ``tune`` section."""

    mode: Literal["optuna", "grid"] = "optuna"
    num_samples: int | None = Field(None, ge=1, le=100_000, description="optuna: trials (default 8); grid: repeats of the grid (default 1)")
    concurrency: int | None = Field(None, ge=1, le=10_000, description="trials at once; default max(1, cluster CPUs // CPUs per trial)")
    scheduler: Literal["none", "asha"] = "none"
    asha: AshaSettings = Field(default_factory=AshaSettings)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of Optuna's TPE sampler")
    seeds: list[int] | None = Field(None, description="training seeds each config runs with; the objective averages them")
    objective: str = Field("max_cross_accuracy", description="an entry of tuneguard.tune.objectives.OBJECTIVES: "
                           "max_cross_accuracy | worst_case | accuracy_vs_eps (Pareto front, multi-objective) | "
                           "accuracy_eps_f (also maximises the tolerated f, which the search must vary)")
    engine: Literal["local", "actors"] | None = Field(
        None, description="overrides base.engine; when neither is set, tune jobs use Ray actors")
    cpus_per_trial: float = Field(1.0, gt=0, le=4096, description="CPUs a trial reserves in all (actors: shared by "
                                  "the trainable and its actors, one worker actor per whole CPU)")
    max_failures: int = Field(1, ge=0, le=1000, description="times a failed trial is retried from its checkpoint")
    stop_after_identical_failures: int = Field(
        3, ge=0, le=100_000, description="stop the job once this many trials failed with the same error (0: never)")
    ship_data: bool = Field(False, description="load the data once where the job starts and ship the arrays to the "
                            "trials through Ray's object store (clusters without a shared filesystem)")
    log_best_model: bool = Field(True, description="at the end, retrain the best run (same seed, same numbers) and "
                                 "log its model with mlflow.pytorch (artifact model of that run)")
    run_plots: bool = Field(False, description="log each run's curves figure (plots/curves.png): ~1 s of matplotlib per run")
    checkpoint_every: int | None = Field(None, ge=1, le=MAX_STEPS, description="steps between trial checkpoints; default ~4 per run")
    n_startup_trials: int | None = Field(None, ge=1, le=100_000, description="random trials before TPE; default max(2, min(10, num_samples // 2))")

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        from tuneguard.tune.objectives import OBJECTIVES

        if v not in OBJECTIVES:
            raise ValueError(f"tune.objective {v!r} is not an objective; allowed: {', '.join(OBJECTIVES)} "
                             "(tuneguard/tune/objectives.py)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(not 0 <= s <= MAX_SEED for s in v):
            raise ValueError(f"tune.seeds must be integers in [0, {MAX_SEED}]; got {short(v)}")
        if v is not None and len(v) > 1000:
            raise ValueError(f"tune.seeds lists {len(v)} seeds; at most 1000")
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"tune.seeds must be a non-empty list of distinct integers; got {short(v)}")
        return v


class Scenario(_Strict):
    """The ``scenario`` section: who attacks, how, and the privacy budget."""

    f: int | None = Field(None, ge=0, le=100_000, description="Byzantine workers; else base.f (or a search parameter)")
    attacks: list[str | dict[str, Any]] | None = Field(None, description="the attack set (worst_case: one run per attack)")
    privacy: dict[str, Any] | None = Field(None, description="the budget, merged over base.privacy")

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("scenario.attacks must list at least one attack (or be left out)")
        names = []
        for a in v:
            try:
                names.append(RuleConfig.model_validate(a).name)
            except ValidationError as err:
                raise ValueError(f"scenario.attacks: {short(a)} is not an attack (a name or {{name, params}}): {err}") from None
        if len(set(names)) != len(names):
            raise ValueError(f"scenario.attacks lists an attack twice: {names}")
        return v


def _pydantic_message(section: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join([section, *(str(p) for p in e["loc"])])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {short(e['input'], 80)})"
        lines.append(f"{loc}: {msg}")
    return "\n  ".join(lines)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
def _is_primitive(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _same(a: Any, b: Any) -> bool:
    """Equal as search values: 3 == 3.0, but True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b


def _label(v: Any) -> Any:
    return yaml.safe_dump(v, default_flow_style=True, sort_keys=True).strip()


@dataclass(frozen=True)
class Param:
    """One search parameter. ``name`` is the key as written (the Tune/Optuna parameter name);
    ``path`` the ExperimentConfig path it sets."""

    name: str
    path: str
    kind: str
    values: tuple = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    when: tuple[tuple[str, tuple], ...] = ()

    # Optuna's categorical values must be primitives; mappings are offered by their YAML label.
    @property
    def labels(self) -> list[Any]:
        if all(_is_primitive(v) for v in self.values):
            return list(self.values)
        return [_label(v) for v in self.values]

    def decode(self, raw: Any, *, strict: bool = False) -> Any:
        """A Tune config value (a label) -> the parameter's value. ``strict``: a const accepts
        only its own value (to tell apart grids that give one name different consts)."""
        if self.kind == "const":
            if strict and not self.accepts(raw):
                raise SpaceError(f"search.{self.name}: {short(raw)} is not its value {short(self.values[0])}")
            return self.values[0]
        if self.kind == "choice":
            labels = self.labels
            for lab, v in zip(labels, self.values, strict=True):
                if lab == raw or (isinstance(raw, float) and isinstance(lab, int | float) and lab == raw):
                    return v
            if raw in self.values:
                return raw
            raise SpaceError(f"search.{self.name}: {short(raw)} is not one of its choices {short(self.values)}")
        if self.kind in ("int", "logint"):
            return int(raw)
        return float(raw)

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (a value or its label) is one this parameter can take."""
        if self.kind in ("const", "choice"):
            return any(_same(value, v) or _same(value, lab) for v, lab in zip(self.values, self.labels, strict=True))
        try:
            x = float(value)
        except (TypeError, ValueError):
            return False
        return self.low <= x <= self.high

    def encode(self, value: Any) -> Any:
        """The Tune config value of ``value``: itself, or a label for non-primitive choices."""
        if self.kind != "choice" or all(_is_primitive(x) for x in self.values):
            return value
        return _label(value)

    def active(self, point: dict[str, Any]) -> bool:
        return all(n in point and _matches(point[n], allowed) for n, allowed in self.when)

    def candidates(self) -> list[Any]:
        """What validation tries: every choice, or a range's two endpoints."""
        if self.kind in ("const", "choice"):
            return list(self.values)
        if self.kind in ("int", "logint"):
            lo, hi = int(self.low), int(self.high)
            if self.step:
                hi = lo + (hi - lo) // int(self.step) * int(self.step)
            return sorted({lo, hi})
        return sorted({float(self.low), float(self.high)})

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for this parameter (returns the Tune config value: a label)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.labels)
        if self.kind == "uniform":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step)
        if self.kind == "loguniform":
            return trial.suggest_float(self.name, self.low, self.high, log=True)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1))
        if self.kind == "logint":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=True)
        raise AssertionError(self.kind)

    def describe(self) -> str:
        if self.kind == "const":
            text = f"= {self.values[0]!r}"
        elif self.kind == "choice":
            text = "in {" + ", ".join(map(str, self.values)) + "}"
        else:
            text = f"{self.kind}[{self.low:g}, {self.high:g}]" + (f" step {self.step:g}" if self.step else "")
        if self.when:
            text += "  when " + ", ".join(f"{n} in {list(v)}" for n, v in self.when)
        return f"{self.name} {text}"


def _matches(value: Any, allowed: tuple) -> bool:
    return any(value == a for a in allowed)


def _canonical(name: str) -> str:
    return SHORT_NAMES.get(name, name)


def check_path(path: str) -> str | None:
    """What is wrong with a dotted ExperimentConfig path, or None when it exists."""
    from tuneguard.config import _valid_keys

    parts = path.split(".")
    model: type[BaseModel] = ExperimentConfig
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        fields = model.model_fields
        if part not in fields:
            valid = ", ".join(_valid_keys(tuple(parts[:i]))) or ", ".join(sorted(fields))
            where = f" under {here!r}" if here else ""
            return f"unknown config key {part!r}{where}; valid keys{where}: {valid}"
        if model is RuleConfig and part == "params":
            return None  # any rule parameter; the rule checks them
        if model is ExperimentConfig and part in ("model_params", "dataset_params"):
            return None  # any builder argument; config validation checks them against the builder
        ann = fields[part].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
            continue
        if i != len(parts) - 1:
            return f"{'.'.join(parts[: i + 1])!r} is a value, it has no key {parts[i + 1]!r}"
    return None


_KIND_ALIASES = {"loguniform": "loguniform", "log_uniform": "loguniform", "log-int": "logint", "log_int": "logint",
                 "logint": "logint", "int": "int", "uniform": "uniform", "choice": "choice", "const": "const",
                 "grid": "choice", "values": "choice"}


def parse_param(name: str, spec: Any, where: str) -> Param:
    """One entry of ``search``: a scalar (const), a list (choice) or a mapping with one kind key."""
    if not isinstance(name, str) or not name:
        raise SpaceError(f"{where}: parameter names must be dotted config paths; got {short(name, 80)}")
    if isinstance(spec, list):
        spec = {"choice": spec}
    elif not isinstance(spec, dict) or (set(spec) & {"name", "params", "kind"} and not set(spec) & set(_KIND_ALIASES)):
        spec = {"const": spec}
    explicit = spec.get("path")
    if explicit is not None and not isinstance(explicit, str):
        raise SpaceError(f"{where}.{name}.path: expected a dotted config path; got {short(explicit, 80)}")
    path = _canonical(explicit or name)
    problem = check_path(path)
    if problem:
        raise SpaceError(f"{where}.{name}: {problem}" + ("" if explicit else
                         "; a parameter named otherwise needs `path: <config path>`"))
    kinds = [k for k in spec if k in _KIND_ALIASES]
    extra = set(spec) - set(kinds) - {"when", "step", "path"}
    if len(kinds) != 1 or extra:
        raise SpaceError(
            f"{where}.{name}: expected one of {', '.join(KINDS)} (plus optional when/step/path); got keys {sorted(spec)}. "
            "A mapping constant is written {const: {...}}"
        )
    kind_key = kinds[0]
    kind = _KIND_ALIASES[kind_key]
    arg = spec[kind_key]
    step = spec.get("step")
    when = _parse_when(spec.get("when"), f"{where}.{name}.when")
    if kind == "const":
        return Param(name, path, "const", (arg,), when=when)
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise SpaceError(f"{where}.{name}: a choice needs a non-empty list of values; got {short(arg)}")
        keys = [json.dumps(v, sort_keys=True, default=str) for v in arg]
        if len(set(keys)) != len(keys):
            raise SpaceError(f"{where}.{name}: a choice lists a value twice: {short(arg)}")
        if step is not None:
            raise SpaceError(f"{where}.{name}: step applies to uniform and int ranges only")
        return Param(name, path, "choice", tuple(arg), when=when)
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(x, int | float) and not isinstance(x, bool) for x in arg)):
        raise SpaceError(f"{where}.{name}: {kind_key} takes [low, high] numbers; got {short(arg)}")
    low, high = arg
    if not all(math.isfinite(x) for x in arg):
        raise SpaceError(f"{where}.{name}: {kind_key} takes finite [low, high]; got {short(arg)}")
    if max(abs(low), abs(high)) > 1e15:
        raise SpaceError(f"{where}.{name}: {kind_key} bounds must be within +-1e15; got {short(arg)}")
    if not low < high:
        raise SpaceError(f"{where}.{name}: {kind_key} needs low < high; got [{low}, {high}]")
    if kind in ("loguniform", "logint") and low <= 0:
        raise SpaceError(f"{where}.{name}: {kind_key} needs low > 0 (log scale); got {low}")
    if kind in ("int", "logint") and not (float(low).is_integer() and float(high).is_integer()):
        raise SpaceError(f"{where}.{name}: {kind_key} bounds must be integers; got [{low}, {high}]")
    if step is not None:
        if kind not in ("uniform", "int"):
            raise SpaceError(f"{where}.{name}: step applies to uniform and int ranges only (Optuna cannot step a log scale)")
        if not (isinstance(step, int | float) and not isinstance(step, bool) and math.isfinite(step) and step > 0) or (kind == "int" and not float(step).is_integer()):
            raise SpaceError(f"{where}.{name}: step must be a positive {'integer' if kind == 'int' else 'number'}; got {short(step, 60)}")
    return Param(name, path, kind, (), float(low), float(high), None if step is None else float(step), when)


def _parse_when(when: Any, where: str) -> tuple[tuple[str, tuple], ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise SpaceError(f"{where}: expected a mapping {{param: value or [values]}}; got {short(when)}")
    out = []
    for n, v in when.items():
        vals = tuple(v) if isinstance(v, list) else (v,)
        out.append((str(n), vals))
    return tuple(out)


def parse_search(search: Any, where: str = "search") -> list[Param]:
    if search is None:
        return []
    if not isinstance(search, dict):
        raise SpaceError(f"{where}: expected a mapping of parameter -> spec; got {type(search).__name__}")
    params = [parse_param(str(k), v, where) for k, v in search.items()]
    by_name = {p.name: p for p in params}
    canon: dict[str, str] = {}
    for p in params:
        if p.path in canon:
            other = by_name[canon[p.path]]
            if not (p.when and other.when):  # alternatives for one path must both be conditional
                raise SpaceError(f"{where}: {canon[p.path]!r} and {p.name!r} both set config path {p.path!r}; "
                                 "alternatives for one path need `when` conditions that exclude each other")
            continue
        canon[p.path] = p.name
    for p in params:
        for n, allowed in p.when:
            target = by_name.get(n) or by_name.get(canon.get(_canonical(n), ""), None)
            if target is None:
                raise SpaceError(f"{where}.{p.name}.when: {n!r} is not a parameter of this search; conditions name another parameter")
            if target.kind not in ("choice", "const"):
                raise SpaceError(f"{where}.{p.name}.when: {n!r} is a {target.kind} range; conditions need a choice parameter")
            missing = [a for a in allowed if not _matches(a, target.values)]
            if missing:
                raise SpaceError(f"{where}.{p.name}.when: {n!r} never takes {short(missing)}; its values are {short(list(target.values))}")
    # Normalise condition names to the parameter names as written, then order: conditions first.
    fixed = []
    for p in params:
        when = tuple(((n if n in by_name else canon[_canonical(n)]), a) for n, a in p.when)
        fixed.append(Param(p.name, p.path, p.kind, p.values, p.low, p.high, p.step, when))
    return _topo(fixed, where)


def _topo(params: list[Param], where: str) -> list[Param]:
    done: list[Param] = []
    names: set[str] = set()
    pending = list(params)
    while pending:
        ready = [p for p in pending if all(n in names for n, _ in p.when)]
        if not ready:
            raise SpaceError(f"{where}: conditions form a cycle among {[p.name for p in pending]}")
        for p in ready:
            done.append(p)
            names.add(p.name)
            pending.remove(p)
    return done


def expand(params: list[Param], *, cap: int = MAX_COMBINATIONS) -> list[dict[str, Any]]:
    """Every combination of candidate values (choices x range endpoints), conditions applied."""
    points: list[dict[str, Any]] = [{}]
    for p in params:
        nxt = []
        for pt in points:
            if not p.active(pt):
                nxt.append(pt)
                continue
            nxt.extend({**pt, p.name: v} for v in p.candidates())
        points = nxt
        if len(points) > cap:
            raise SpaceError(
                f"the space has more than {cap} combinations of choices and range endpoints to check; "
                "split it into several spaces or use ranges instead of long choice lists"
            )
    return points


# --------------------------------------------------------------------------------------------
# Applying a point to a config
# --------------------------------------------------------------------------------------------
def _set(raw: dict[str, Any], name: str, value: Any) -> None:
    path = _canonical(name)
    head = path.split(".")[0]
    if name in RULE_KEYS or path in (f"{k}.name" for k in RULE_KEYS):
        rule = name.split(".")[0]
        if isinstance(value, dict):
            raw[rule] = copy.deepcopy(value)
            return
        current = raw.get(rule)
        current_name = current.get("name") if isinstance(current, dict) else current
        if current_name != value:  # another rule: the base's parameters were for the old one
            raw[rule] = {"name": value}
            return
    if isinstance(value, dict) and head not in RULE_KEYS:
        node = raw
        parts = path.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str):
                child = {"kind" if part == "partition" else "name": child}
            node[part] = child if isinstance(child, dict) else {}
            node = node[part]
        last = node.get(parts[-1])
        if isinstance(last, str) and parts[-1] == "partition":
            last = {"kind": last}
        node[parts[-1]] = _merge(last if isinstance(last, dict) else {}, value)
        return
    raw.update(apply_overrides(raw, {name: value}))


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _depth(name: str, value: Any) -> int:
    if name in RULE_KEYS and isinstance(value, dict):
        return 0
    return _canonical(name).count(".")


def apply_point(base: dict[str, Any], point: dict[str, Any], params: list[Param] | None = None) -> dict[str, Any]:
    """``base`` with the point's values set; ``params`` maps names to config paths (else the
    names are the paths)."""
    raw = copy.deepcopy(base)
    if params:
        by_name = {p.name: p for p in params}
        paths: dict[str, str] = {}
        renamed = {}
        for name, value in point.items():
            path = by_name[name].path if name in by_name else name
            if path in paths:
                raise SpaceError(f"search: {paths[path]!r} and {name!r} are both active and both set {path!r}; "
                                 "make their `when` conditions exclude each other")
            paths[path] = name
            renamed[path if name in by_name and by_name[name].path != _canonical(name) else name] = value
        point = renamed
    for name in sorted(point, key=lambda n: _depth(n, point[n])):
        _set(raw, name, point[name])
    return raw


def gar_problem(raw: dict[str, Any]) -> tuple[str | None, str | None]:
    """(exclusion reason, error) for the GAR of a raw config: the reason is set when the rule
    exists, takes the given parameters, and only its (n, f) requirement fails."""
    from tuneguard.aggregators import GarRequirementError, build_gar, resolve

    gar = raw.get("gar", ExperimentConfig.model_fields["gar"].default_factory())
    if isinstance(gar, RuleConfig):
        gar = gar.model_dump()
    name, params = (gar, {}) if isinstance(gar, str) else (gar.get("name"), dict(gar.get("params") or {}))
    n = raw.get("n_workers", ExperimentConfig.model_fields["n_workers"].default)
    f = raw.get("f", ExperimentConfig.model_fields["f"].default)
    if not isinstance(name, str) or not isinstance(n, int) or not isinstance(f, int):
        return None, None
    try:
        chain = resolve(name)
    except (ValueError, KeyError) as err:
        return None, str(err)
    known: set[str] = set()
    for spec in chain:
        known |= set(getattr(spec, "params", {}) or {})
    unknown = set(params) - known
    if unknown:
        return None, f"gar {name!r} takes parameters {sorted(known) or 'none'}; unknown: {sorted(unknown)}"
    try:
        build_gar(name, n, f, **params)  # the Gar a run would build, checked the same way
    except GarRequirementError as err:
        return str(err), None
    except ValueError as err:
        return None, str(err)
    return None, None


# --------------------------------------------------------------------------------------------
# The space
# --------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One training run of a trial: the config with one attack of the scenario and one seed."""

    key: str
    attack: str
    seed: int
    cfg: ExperimentConfig


@dataclass
class Exclusion:
    point: dict[str, Any]
    reason: str


@dataclass
class ValidationReport:
    checked: int = 0
    excluded: list[Exclusion] = field(default_factory=list)
    points: list[dict[str, Any]] | None = None  # grid mode: the points that will run

    def lines(self, mode: str) -> list[str]:
        out = [f"checked {self.checked} combination(s) of choices and range endpoints: all build valid configs"
               if not self.excluded else
               f"checked {self.checked} combination(s) of choices and range endpoints; {len(self.excluded)} excluded:"]
        groups: dict[str, list[dict]] = defaultdict(list)
        for ex in self.excluded:
            groups[ex.reason].append(ex.point)
        for reason, pts in groups.items():
            common = _common(pts)
            what = ", ".join(f"{k}={v}" for k, v in common.items()) or "various combinations"
            out.append(f"  - {len(pts)} with {what}: {reason}")
        if self.excluded:
            out.append("    grid mode: removed from the grid" if mode == "grid" else
                       "    optuna mode: a trial that samples one reports objective 0.0 (excluded: 1) without training")
        if self.points is not None:
            out.append(f"grid: {len(self.points)} point(s) will run")
        return out


def _common(points: list[dict[str, Any]]) -> dict[str, Any]:
    if not points:
        return {}
    keys = set(points[0])
    for p in points[1:]:
        keys &= set(p)
    return {k: points[0][k] for k in sorted(keys) if all(p[k] == points[0][k] for p in points)}


@dataclass
class Space:
    raw: dict[str, Any]
    text: str
    path: str | None
    base: dict[str, Any]
    scenario: Scenario
    tune: TuneSettings
    grids: list[list[Param]]
    report: ValidationReport | None = None

    # construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> Space:
        from tuneguard.safeyaml import read_text

        p = Path(path)
        try:
            text = read_text(p, "search space file")
        except YamlError as err:
            raise SpaceError(str(err)) from None
        return cls.from_text(text, str(p.resolve()), overrides)

    @classmethod
    def from_text(cls, text: str, path: str | None = None, overrides: list[str] | None = None) -> Space:
        from tuneguard.safeyaml import loads

        where = path or "search space"
        try:
            raw = loads(text, where)
        except YamlError as err:
            raise SpaceError(str(err)) from None
        if raw is None or raw == {}:
            raise SpaceError(f"{where}: the search space is empty; it needs at least a `search` (or `base`) "
                             f"section (sections: {', '.join(SECTIONS)}; see docs/search_spaces.md)")
        if not isinstance(raw, dict):
            raise SpaceError(f"{where}: expected a mapping with sections {', '.join(SECTIONS)}; "
                             f"got a {type(raw).__name__}")
        for item in overrides or []:
            _set_dotted(raw, item)
        if overrides:  # the text trials and --resume read back must hold the overrides
            text = f"# {path or 'search space'} with --set {' '.join(overrides)}\n" + yaml.safe_dump(raw, sort_keys=False)
        return cls.from_dict(raw, text=text, path=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, text: str | None = None, path: str | None = None) -> Space:
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            names = short(sorted(str(k) for k in unknown))
            raise SpaceError(f"{path or 'search space'}: unknown section(s) {names}; valid: {', '.join(SECTIONS)}")
        if raw.get("description") is not None and not isinstance(raw["description"], str):
            raise SpaceError(f"{path or 'search space'}: description must be text; got a {type(raw['description']).__name__}")
        base = raw.get("base") or {}
        if not isinstance(base, dict):
            raise SpaceError("base: expected a mapping of ExperimentConfig keys")
        try:
            scenario = Scenario.model_validate(raw.get("scenario") or {})
        except ValidationError as err:
            raise SpaceError("invalid scenario:\n  " + _pydantic_message("scenario", err)) from None
        try:
            tune = TuneSettings.model_validate(raw.get("tune") or {})
        except ValidationError as err:
            raise SpaceError("invalid tune settings:\n  " + _pydantic_message("tune", err)) from None
        search = raw.get("search")
        if isinstance(search, list):
            if tune.mode != "grid":
                raise SpaceError("search: a list of grids needs tune.mode: grid (optuna mode takes one mapping)")
            grids = [parse_search(g, f"search[{i}]") for i, g in enumerate(search)]
            if not grids:
                raise SpaceError("search: the list of grids is empty")
        else:
            grids = [parse_search(search)]
        if tune.mode == "grid":
            for i, grid in enumerate(grids):
                for p in grid:
                    if p.kind in RANGE_KINDS:
                        where = f"search[{i}]" if isinstance(search, list) else "search"
                        raise SpaceError(f"{where}.{p.name}: grid mode takes lists of values, not a {p.kind} range")
        space = cls(raw, text if text is not None else yaml.safe_dump(raw, sort_keys=False), path,
                    base, scenario, tune, grids)
        space._check_objective()
        return space

    def _check_objective(self) -> None:
        names = {p.path for grid in self.grids for p in grid}
        attacks = self.scenario.attacks
        spec = self.objective
        if spec.multi and self.tune.mode == "optuna" and self.tune.scheduler == "asha":
            raise SpaceError(f"tune.objective {spec.name} is multi-objective; ASHA stops trials on one metric, so "
                             "use tune.scheduler: none")
        if spec.maximises_f:
            fs = {v for grid in self.grids for p in grid if p.path == "f" for v in p.candidates()}
            if len(fs) < 2:
                raise SpaceError(
                    f"tune.objective {spec.name} maximises the tolerated number of Byzantine workers f, so the search "
                    f"must vary f; {'it only takes f = ' + str(next(iter(fs))) if fs else 'f is not searched'}. Add "
                    "e.g. search: {f: [1, 2, 3]} (each GAR excludes the f it cannot take: median and MDA need "
                    "n >= 2f + 1, Krum n >= 2f + 3, Bulyan n >= 4f + 3), or use objective: accuracy_vs_eps")
        if spec.every_attack and (attacks or self.tune.objective == "worst_case"):
            if not attacks:
                raise SpaceError("tune.objective: worst_case needs the attack set in scenario.attacks (two or more attacks)")
            if "attack.name" in names or any(n.startswith("attack.") for n in names):
                raise SpaceError(f"search: {spec.name} trains every config against each attack in scenario.attacks; "
                                 "do not search over attack as well")
        elif attacks and len(attacks) > 1:
            raise SpaceError(
                f"scenario.attacks lists {len(attacks)} attacks but tune.objective is max_cross_accuracy, which trains "
                "against one; use objective: worst_case, or search over attack (search: {attack: [...]})"
            )
        if self.tune.seeds is not None and "seed" in names:
            raise SpaceError("tune.seeds and a search parameter 'seed' both set the training seed; keep one")

    # derived --------------------------------------------------------------------------------
    @property
    def params(self) -> list[Param]:
        return self.grids[0]

    @property
    def name(self) -> str:
        return str(self.base.get("name", ExperimentConfig.model_fields["name"].default))

    def base_raw(self) -> dict[str, Any]:
        raw = copy.deepcopy(self.base)
        if self.tune.engine:
            raw["engine"] = self.tune.engine
        elif "engine" not in raw:
            raw["engine"] = DEFAULT_TUNE_ENGINE
        if self.scenario.f is not None:
            raw["f"] = self.scenario.f
        if self.scenario.privacy:
            prev = raw.get("privacy") or {}
            raw["privacy"] = _merge(prev if isinstance(prev, dict) else {}, self.scenario.privacy)
        if self.scenario.attacks and len(self.scenario.attacks) == 1:
            raw["attack"] = copy.deepcopy(self.scenario.attacks[0])
        return raw

    @property
    def num_samples(self) -> int:
        return self.tune.num_samples or (1 if self.tune.mode == "grid" else 8)

    @property
    def seeds(self) -> list[int | None]:
        return list(self.tune.seeds) if self.tune.seeds else [None]

    @property
    def objective(self):
        """The :class:`~tuneguard.tune.objectives.ObjectiveSpec` of ``tune.objective``."""
        from tuneguard.tune.objectives import get

        return get(self.tune.objective)

    @property
    def attack_set(self) -> list[Any]:
        if self.objective.every_attack and self.scenario.attacks:
            return list(self.scenario.attacks)
        return [None]

    def total_trials(self) -> int:
        if self.tune.mode == "grid":
            pts = self.report.points if self.report and self.report.points is not None else self.grid_points()
            return len(pts) * self.num_samples
        return self.num_samples

    def representative_config(self) -> ExperimentConfig:
        """A config of the space (first valid combination) for resources and schedules."""
        pts = self.report.points if self.report and self.report.points else None
        for pt in pts or expand(self.params)[:1000]:
            try:
                return self.runs(pt)[0].cfg
            except (Excluded, ConfigError):
                continue
        return build_config(self.base_raw())

    # combinations ---------------------------------------------------------------------------
    def grid_points(self) -> list[dict[str, Any]]:
        seen, out = set(), []
        for grid in self.grids:
            for pt in expand(grid):
                key = json.dumps(pt, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    out.append(pt)
        return out

    def config_raw(self, point: dict[str, Any], attack: Any = None, seed: int | None = None) -> dict[str, Any]:
        raw = apply_point(self.base_raw(), point, [p for grid in self.grids for p in grid])
        if attack is not None:
            raw["attack"] = copy.deepcopy(attack)
        if seed is not None:
            raw["seed"] = seed
        return raw

    def runs(self, point: dict[str, Any]) -> list[RunSpec]:
        """The training runs of one trial (one per attack of the set x seed); raises Excluded
        when the GAR cannot take the combination, ConfigError when the config is invalid."""
        out = []
        for seed in self.seeds:
            for attack in self.attack_set:
                raw = self.config_raw(point, attack, seed)
                try:
                    cfg = build_config(raw)
                except ConfigError as err:
                    reason, _ = gar_problem(raw)
                    if reason:
                        raise Excluded(reason) from None
                    raise ConfigError(f"{_point_text(point)}: {err}") from None
                attack_name = cfg.attack.name if cfg.f else "none"
                key = attack_name if len(self.seeds) == 1 else f"{attack_name}-s{cfg.seed}"
                out.append(RunSpec(key, attack_name, cfg.seed, cfg))
        return out

    def decode(self, config: dict[str, Any]) -> dict[str, Any]:
        """A Tune trial config (labels) -> the point (values), for the parameters of this space.

        With a list of grids, one name may mean different things in different grids (``f: [3,
        6]`` in one, ``f: 0`` in another): the point is decoded by the first grid that holds all
        its parameters and accepts every value (a const only its own value).
        """
        names = {p.name for grid in self.grids for p in grid}
        items = {k: v for k, v in config.items() if k in names}
        error: SpaceError | None = None
        for grid in self._grids_for(items):
            by_name = {p.name: p for p in grid}
            try:
                return {k: by_name[k].decode(v, strict=True) for k, v in items.items()}
            except SpaceError as err:
                error = err
        raise error or SpaceError(f"no grid of the search holds the parameters {sorted(items)}")

    def encode(self, point: dict[str, Any]) -> dict[str, Any]:
        names = {p.name for grid in self.grids for p in grid}
        items = {k: v for k, v in point.items() if k in names}
        for grid in self._grids_for(items):
            by_name = {p.name: p for p in grid}
            if all(by_name[k].accepts(v) for k, v in items.items()):
                return {k: by_name[k].encode(v) for k, v in items.items()}
        raise SpaceError(f"the point {short(point)} is not a point of any grid of the search")

    def _grids_for(self, items: dict[str, Any]) -> list[list[Param]]:
        return [grid for grid in self.grids if set(items) <= {p.name for p in grid}]

    # validation -----------------------------------------------------------------------------
    def validate(self) -> ValidationReport:
        """Check every combination before anything runs; raise SpaceError on real errors."""
        self._check_data_dirs()
        try:
            build_config(self.base_raw())
        except ConfigError as err:
            reason, _ = gar_problem(self.base_raw())
            if not reason and not self.params:
                raise SpaceError(f"base + scenario: {err}") from None
        points = self.grid_points() if self.tune.mode == "grid" else expand(self.params)
        report = ValidationReport(checked=len(points))
        errors: list[str] = []
        ok_points = []
        for pt in points:
            try:
                self.runs(pt)
                ok_points.append(pt)
            except Excluded as ex:
                report.excluded.append(Exclusion(pt, str(ex)))
            except ConfigError as err:
                errors.append(str(err))
                if len(errors) >= 5:
                    break
        if errors:
            more = "" if len(errors) < 5 else "\n  (first 5 shown)"
            raise SpaceError("the search space produces invalid configs:\n  " + "\n  ".join(errors) + more)
        if not ok_points:
            reasons = sorted({ex.reason for ex in report.excluded})
            raise SpaceError("no combination of this search space can run; every one is excluded:\n  " + "\n  ".join(reasons))
        if self.tune.mode == "grid":
            report.points = ok_points
        self.report = report
        return report

    def _check_data_dirs(self) -> None:
        """A data_dir that does not exist fails every trial; say so before anything starts."""
        where = self.path or "search space"
        found: list[tuple[str, Any]] = []
        if "data_dir" in self.base:
            found.append(("base.data_dir", self.base["data_dir"]))
        for grid in self.grids:
            for p in grid:
                if p.path == "data_dir":
                    found.extend((f"search.{p.name}", v) for v in p.values)
        for field_name, value in found:
            if value is None:
                continue
            if not isinstance(value, str):
                raise SpaceError(f"{where}: {field_name} must be a directory path; got {short(value, 80)}")
            try:
                check_text(value, field_name, max_len=4096)
            except ValueError as err:
                raise SpaceError(f"{where}: {err}") from None
            d = Path(value).expanduser()
            if not d.is_dir():
                what = "is not a directory" if d.exists() else "does not exist"
                raise SpaceError(
                    f"{where}: {field_name}={short(value, 200)} {what}; every trial would fail to load its "
                    "dataset. Give the torchvision data root (the folder holding MNIST/ or FashionMNIST/), "
                    "or leave data_dir out to use $TUNEGUARD_DATA_DIR"
                )
        env = os.environ.get("TUNEGUARD_DATA_DIR")
        if env and not found and not Path(env).expanduser().is_dir():
            raise SpaceError(f"TUNEGUARD_DATA_DIR={short(env, 200)} is not a directory; every trial would fail to "
                             "load its dataset. Point it at the torchvision data root, or set base.data_dir")

    def describe(self) -> list[str]:
        t = self.tune
        lines = [f"mode {t.mode}, objective {t.objective}, scheduler {t.scheduler}, "
                 f"{self.total_trials() if self.report else self.num_samples} trial(s)"]
        if self.attack_set != [None]:
            lines.append("attack set: " + ", ".join(RuleConfig.model_validate(a).name for a in self.attack_set))
        if t.seeds:
            lines.append(f"training seeds: {t.seeds} (objective averaged over them)")
        for i, grid in enumerate(self.grids):
            if len(self.grids) > 1:
                lines.append(f"grid {i}:")
            lines.extend(f"  {p.describe()}" for p in grid)
        return lines

    def flat_params(self) -> dict[str, Any]:
        """The space file flattened to dotted keys (MLflow params of the job run)."""
        out: dict[str, Any] = {}

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict) and node:
                for k, v in node.items():
                    walk(v, f"{prefix}.{k}" if prefix else str(k))
            elif isinstance(node, list) and node and any(isinstance(x, dict) for x in node) and prefix == "search":
                for i, v in enumerate(node):  # grids of a union: search.0.batch_size, ...
                    walk(v, f"{prefix}.{i}")
            else:
                out[prefix] = json.dumps(node, default=str) if isinstance(node, list | dict) else node

        walk({k: v for k, v in self.raw.items() if k != "description"}, "")
        return out


def _set_dotted(raw: dict[str, Any], item: str) -> None:
    """``--set section.key=value`` on the raw space (e.g. tune.num_samples=4, base.steps=20)."""
    if "=" not in item:
        raise SpaceError(f"--set expects section.key=value; got {short(item, 80)}")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if parts[0] not in SECTIONS or len(parts) < 2:
        raise SpaceError(f"--set {key}: start with a section ({', '.join(s for s in SECTIONS if s != 'description')})")
    from tuneguard.safeyaml import scalar

    try:
        check_text(key.strip(), "--set key")
        value = scalar(text)
    except (YamlError, ValueError) as err:
        raise SpaceError(f"--set {short(key.strip(), 60)}: {err}") from None
    node = raw
    if parts[0] == "search":  # search keys are dotted paths themselves: search.<param>=...
        node = raw.setdefault("search", {})
        if not isinstance(node, dict):
            raise SpaceError("--set search.X: the search section is a list of grids; edit the file instead")
        node[".".join(parts[1:])] = value
        return
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _point_text(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "the base config"


def n_reports(steps: int, eval_every: int) -> int:
    """Evaluation reports a run of ``steps`` steps makes (every eval_every steps and the last)."""
    return steps // eval_every + (1 if steps % eval_every else 0)
