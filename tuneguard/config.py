"""The typed experiment config: one training run of Algorithm 1 (paper 001), with the options of
paper 003.

Every field has a default taken from 001 section 4.1 (DESIGN.md "The paper's setting"), so an
empty YAML file is the paper's Fashion-MNIST setting with f = 3, MDA, ``little``, b = 25 and a
per-step epsilon of 0.2. Unknown keys are errors, and so are combinations that cannot run
(Krum with n < 2f + 3, f >= n, a batch larger than a worker's data, eps <= 0, ...); each error
names the field, the value and what is allowed.

Short names for ``--set`` (they work whatever the nesting): see :data:`SHORT_NAMES`.
"""

from __future__ import annotations

import copy
import math
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneguard.safeyaml import YamlError, short

# Training-set sizes of the built-in datasets before any partition (the 001 preprocessing
# doubles Fashion-MNIST's train set with flipped images); other datasets' sizes are known once
# loaded. Read from tuneguard.data.DATASETS.
TRAIN_SIZES = {"mnist": 60_000, "fashion_mnist": 120_000}


class ConfigError(ValueError):
    """A config that cannot run; the message names the field, the value and what is allowed."""


# Hard bounds: far beyond any sensible run, short of "trains forever" or "allocates the world".
MAX_STEPS = 10_000_000
MAX_WORKERS = 100_000
MAX_BATCH = 10_000_000
MAX_SEED = 2**63 - 1
MAX_NAME_LEN = 250
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]{1,3})?)$")


def check_text(value: str, field: str, *, max_len: int = MAX_NAME_LEN) -> str:
    """Refuse control and invisible formatting characters (NUL, newlines, bidi overrides such as
    U+202E) in names and paths: they hide what a name really is in tables, logs and paths."""
    if len(value) > max_len:
        raise ValueError(f"{field} is {len(value)} characters long; at most {max_len} allowed")
    for i, ch in enumerate(value):
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            raise ValueError(
                f"{field} contains the control/format character U+{ord(ch):04X} at position {i}; "
                "names and paths may hold printable characters only"
            )
    return value


class _Strict(BaseModel):
    # strict: numbers must be numbers and booleans booleans (YAML `true` is not 1, "5" is not 5;
    # an int is accepted where a float is expected); allow_inf_nan=False: .inf / .nan refused.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class RuleConfig(_Strict):
    """A registry entry with its parameters. In YAML ``gar: krum`` is short for ``gar: {name: krum}``."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _name_text(cls, v: str) -> str:
        return check_text(v, "name")

    @field_validator("params")
    @classmethod
    def _finite_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k, x in v.items():
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError(f"parameter {k!r} must be finite; got {x}")
        return v


class PrivacyConfig(_Strict):
    """How much noise honest workers add to their clipped batch mean (Algorithm 1, step 2).

    mode:
      - ``per_step``: each step is (eps, delta)-DP per worker; the noise std comes from
        ``calibration`` (``theorem1``: 001 Theorem 1, ``analytic``: Balle & Wang 2018 + the same
        amplification lemma, tight).
      - ``noise``: a given noise std ``sigma`` on the clipped batch mean.
      - ``total``: a total (total_eps, delta) budget over the run. ``adapt: noise`` derives the
        noise for the configured number of steps; ``adapt: steps`` keeps the per-step ``eps``
        calibration and runs as many steps as the budget allows, capped at ``steps`` (001 D.2).
      - ``none``: no noise (clipping still applies when ``clip`` is set).
    """

    mode: Literal["per_step", "noise", "total", "none"] = "per_step"
    eps: float = Field(0.2, description="per-step, per-worker epsilon (modes per_step, total+adapt=steps)")
    delta: float = Field(1e-5, description="delta: per step in per_step mode, total in total mode")
    calibration: Literal["theorem1", "analytic"] = "theorem1"
    sigma: float | None = Field(None, description="noise std on the clipped batch mean (mode noise)")
    total_eps: float | None = Field(None, description="total epsilon budget (mode total)")
    adapt: Literal["noise", "steps"] = "noise"
    accountant: Literal["rdp_wor", "rdp", "prv", "advanced", "best"] = Field(
        "rdp_wor",
        description="total-budget accounting: rdp_wor (RDP for fixed-size sampling without replacement, "
        "matches the engine), advanced (composition), rdp / prv (Opacus; assume Poisson sampling), "
        "best (tightest whose sampling assumption holds)",
    )

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1); got {self.delta}")
        if self.mode in ("per_step",) or (self.mode == "total" and self.adapt == "steps"):
            if not self.eps > 0:
                raise ValueError(f"privacy.eps must be > 0; got {self.eps}")
        if self.mode == "noise" and (self.sigma is None or not self.sigma > 0):
            raise ValueError(f"privacy.sigma must be > 0 in mode 'noise'; got {self.sigma}")
        if self.mode == "total" and (self.total_eps is None or not self.total_eps > 0):
            raise ValueError(f"privacy.total_eps must be > 0 in mode 'total'; got {self.total_eps}")
        return self


class PartitionConfig(_Strict):
    """How the training set is split across honest workers.

    ``iid``: every worker samples from the whole train set (as 001). ``by_class``: each worker
    holds ``classes_per_worker`` classes (as 003). ``dirichlet``: per-class proportions drawn
    from Dirichlet(``alpha``).
    """

    kind: Literal["iid", "by_class", "dirichlet"] = "iid"
    classes_per_worker: int = Field(1, ge=1, description="checked against the dataset's number of classes")
    alpha: float = Field(0.5, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value


class ActorsConfig(_Strict):
    """Settings of the Ray actor engine (``engine: actors``)."""

    workers_per_actor: int | None = Field(
        None, ge=1, description="honest workers computed by one actor; None: chosen for the machine"
    )
    cpus_per_actor: float | None = Field(
        None, gt=0, le=1024, description="fractional CPUs each actor reserves; None: 0.25 outside Tune, and in a "
        "tune job an equal share of tune.cpus_per_trial for the trainable and each actor")
    step_timeout_s: float = Field(120.0, gt=0, le=86_400, description="seconds a step may take before it is retried")
    max_restarts: int = Field(2, ge=0, le=1000, description="times a dead worker actor is restarted")
    address: str | None = Field(None, description="Ray address; None: RAY_ADDRESS, else a private local cluster")
    placement: Literal["pack", "spread"] = Field(
        "pack", description="where a run's actors go: pack (as few nodes as possible) or spread (over the nodes)")
    transport: Literal["auto", "object_store"] = Field(
        "auto", description="how a step's vectors travel: auto (shared memory and a socket per actor when every "
        "actor runs on the server's node, CPU, Linux; else Ray's object store) or object_store (always Ray's)")

    @field_validator("address")
    @classmethod
    def _address_text(cls, v: str | None) -> str | None:
        return None if v is None else check_text(v, "actors.address", max_len=1000)


class ExperimentConfig(_Strict):
    """One training run. Defaults: the 001 Fashion-MNIST setting (DESIGN.md)."""

    name: str = Field("tuneguard", description="MLflow experiment name")
    # --- data and model (tuneguard.data, tuneguard.models) ---
    dataset: str = Field(
        "fashion_mnist",
        description="mnist | fashion_mnist | torchvision:NAME (e.g. torchvision:CIFAR10) | package.module:callable",
    )
    dataset_params: dict[str, Any] = Field(
        default_factory=dict, description="arguments of the torchvision class or the callable (e.g. split: digits)"
    )
    data_dir: str | None = Field(None, description="torchvision root; else TUNEGUARD_DATA_DIR, else a cache dir")
    model: str = Field(
        "mlp_001", description="built-in (mlp_001, mlp_003, logreg, cnn, convnet, resnet_gn) or package.module:callable"
    )
    model_params: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the model builder (built-ins: see `tuneguard list`)"
    )
    n_workers: int = Field(15, ge=1, le=MAX_WORKERS, description="n: all workers, honest and Byzantine")
    f: int = Field(3, ge=0, description="number of Byzantine workers")
    attack: RuleConfig = Field(default_factory=lambda: RuleConfig(name="little"))
    gar: RuleConfig = Field(default_factory=lambda: RuleConfig(name="mda"))
    batch_size: int = Field(25, ge=1, le=MAX_BATCH, description="b: examples per honest worker per step")
    steps: int = Field(300, ge=1, le=MAX_STEPS, description="training steps T (the cap when the budget adapts T)")
    lr: float = Field(0.5, gt=0)
    momentum: float = Field(0.99, ge=0, lt=1, description="worker momentum beta")
    dampening: float = Field(0.0, ge=0, le=1, description="m_t = beta m_{t-1} + (1 - dampening) g_t")
    weight_decay: float = Field(1e-4, ge=0, description="l2 factor added to the server's update")
    clip: float | None = Field(2.0, description="per-example L2 clipping norm C; None: no clipping")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    perturbation: float = Field(0.0, ge=0, description="003: std b of N(0, b^2) added to each local gradient")
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    eval_every: int = Field(10, ge=1, le=MAX_STEPS, description="test-set evaluation period, in steps")
    seed: int = Field(1, ge=0, le=MAX_SEED)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    engine: Literal["local", "actors"] = "local"
    actors: ActorsConfig = Field(default_factory=ActorsConfig)

    @field_validator("dataset")
    @classmethod
    def _dataset_known(cls, v: str) -> str:
        from tuneguard.data import check_dataset_name

        return check_dataset_name(v)

    @field_validator("model")
    @classmethod
    def _model_known(cls, v: str) -> str:
        from tuneguard.models import check_model_name

        return check_model_name(v)

    def _check_data_and_model(self) -> None:
        """Parameters against what the dataset / model takes; when the dataset's shape is known
        without loading it (built-ins), the model is built and validated here, before any run."""
        from tuneguard.data import DATASETS, check_dataset_params
        from tuneguard.models import check_model, check_model_params

        check_dataset_params(self.dataset, self.dataset_params)
        check_model_params(self.model, self.model_params)
        spec = DATASETS.get(self.dataset)
        if spec is not None:
            check_model(self.model, self.model_params, spec.input_shape, spec.num_classes)
        if spec is not None and self.partition.kind == "by_class" and self.partition.classes_per_worker > spec.num_classes:
            raise ValueError(
                f"partition.classes_per_worker={self.partition.classes_per_worker} exceeds the "
                f"{spec.num_classes} classes of {self.dataset}"
            )

    @field_validator("clip")
    @classmethod
    def _clip_positive(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"clip must be > 0 (or null for no clipping); got {v}")
        return v

    @field_validator("name")
    @classmethod
    def _name_text(cls, v: str) -> str:
        check_text(v, "name")
        if not v.strip():
            raise ValueError("name must not be empty (it names the MLflow experiment)")
        return v

    @field_validator("data_dir")
    @classmethod
    def _data_dir_text(cls, v: str | None) -> str | None:
        return None if v is None else check_text(v, "data_dir", max_len=4096)

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not DEVICE_RE.match(v):
            raise ValueError(f"device {short(v, 60)} is not a device; allowed: auto, cpu, cuda, cuda:N, mps")
        return v

    @model_validator(mode="after")
    def _check_combinations(self) -> ExperimentConfig:
        if self.f >= self.n_workers:
            raise ValueError(f"f must be < n_workers; got f={self.f}, n_workers={self.n_workers}")
        if self.attack.name == "none" and self.f != 0:
            raise ValueError(f"attack 'none' means no Byzantine workers: set f=0 (got f={self.f})")
        if self.privacy.mode != "none" and self.clip is None:
            raise ValueError(
                f"privacy.mode={self.privacy.mode!r} needs per-example clipping (clip > 0): the noise is "
                "calibrated to the clipped sensitivity 2C/b; set clip or privacy.mode: none"
            )
        if self.partition.kind == "iid" and self.dataset in TRAIN_SIZES:
            m = TRAIN_SIZES[self.dataset]
            if self.batch_size > m:
                raise ValueError(f"batch_size={self.batch_size} exceeds the {m} examples each worker holds")
        self._check_data_and_model()
        self._check_registries()
        self._check_memory()
        return self

    def _check_memory(self) -> None:
        need = estimate_memory(self)
        total = physical_memory()
        if total and need > 0.8 * total:
            raise ValueError(
                f"n_workers={self.n_workers}, batch_size={self.batch_size} with model {self.model!r} needs about "
                f"{_gib(need)} of memory for the workers' vectors and batches, more than 80% of this machine's "
                f"{_gib(total)}; use fewer workers or a smaller batch"
            )

    def _check_registries(self) -> None:
        from tuneguard.aggregators import check_rule
        from tuneguard.attacks import ATTACKS

        try:
            check_rule(self.gar.name, self.n_workers, self.f, **self.gar.params)
        except TypeError as err:  # a parameter of the wrong type reached a comparison
            raise ValueError(f"gar {self.gar.name!r}: a parameter has the wrong type ({err}); "
                             f"given params: {short(self.gar.params)}") from None
        if self.attack.name != "none" and self.attack.name not in ATTACKS:
            raise ValueError(
                f"unknown attack {self.attack.name!r}; valid: none, {', '.join(sorted(ATTACKS))}"
            )
        if self.attack.name in ATTACKS:
            spec = ATTACKS[self.attack.name]
            unknown = set(self.attack.params) - set(spec.params)
            if unknown:
                raise ValueError(
                    f"attack {self.attack.name!r} takes parameters {sorted(spec.params) or 'none'}; "
                    f"unknown: {short(sorted(unknown))}"
                )
            for key, value in self.attack.params.items():
                _check_param_type(f"attack.params.{key}", value, spec.params[key])
            params = dict(self.attack.params)
            if "gar" in spec.params and "gar" not in params:  # GAR-aware attacks target the run's GAR
                params["gar"] = self.gar.name
            try:
                spec.check(self.n_honest, self.f, **params)
            except TypeError as err:
                raise ValueError(f"attack {self.attack.name!r}: a parameter has the wrong type ({err}); "
                                 f"given params: {short(self.attack.params)}") from None

    # Derived quantities --------------------------------------------------------------------
    @property
    def n_honest(self) -> int:
        return self.n_workers - self.f

    def resolved_device(self) -> str:
        """The torch device this process trains on; ConfigError when ``device`` names one this
        machine does not have."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        check_device_available(self.device)
        return self.device

    def flat(self) -> dict[str, Any]:
        """The config as dotted keys, for MLflow params and ``--set``."""
        return _flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_MODEL_SIZES = {"mlp_001": 79_510, "mlp_003": 101_770, "logreg": 7_850, "cnn": 5_994}


def check_device_available(device: str) -> None:
    """ConfigError unless this process can use ``device`` (cpu, cuda[:N], mps; auto always can)."""
    import torch

    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if n == 0:
            raise ConfigError(f"device={device!r} but this machine has no usable CUDA GPU "
                              "(torch.cuda.is_available() is False); use device: auto or cpu")
        if index >= n:
            raise ConfigError(f"device={device!r} but this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
    elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device='mps' but Apple's MPS backend is not available here; use device: auto or cpu")


def estimate_memory(cfg: ExperimentConfig) -> int:
    """Bytes a run needs beyond the dataset, roughly: per worker a few float32 vectors of the
    model's size d (gradient, momentum, submission, the GAR's copy) and its batch; the GAR's
    pairwise distances (n x n) for distance-based rules."""
    d = _MODEL_SIZES.get(cfg.model, 100_000)
    n = cfg.n_workers
    vectors = 4 * n * d * 4
    batches = 4 * n * cfg.batch_size * 784 * 2
    pairwise = 8 * n * n
    return vectors + batches + pairwise


def physical_memory() -> int | None:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _check_param_type(field: str, value: Any, default: Any) -> None:
    """A rule parameter must have the type of its default (numbers: a real, finite number)."""
    if default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        want = "true or false"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        want = "a finite number"
    elif isinstance(default, str):
        ok = isinstance(value, str)
        want = "a string"
    else:
        return
    if not ok:
        raise ValueError(f"{field} must be {want} (default {default!r}); got {short(value, 80)}")


# Short names for --set: they work whatever the nesting.
SHORT_NAMES = {
    "gar": "gar.name",
    "attack": "attack.name",
    "eps": "privacy.eps",
    "sigma": "privacy.sigma",
    "workers_per_actor": "actors.workers_per_actor",
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("params",):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _parse_value(text: str) -> Any:
    """YAML scalar parsing, so ``--set clip=null``, ``--set lr=0.1`` and ``--set lr=1e-3`` get
    their types (see :mod:`tuneguard.safeyaml`: ``1e30`` is a float, as users write it)."""
    from tuneguard.safeyaml import scalar

    try:
        return scalar(text)
    except YamlError as err:
        raise ConfigError(str(err)) from None


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted paths or short names) to a raw config dict."""
    out = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    for key, value in items:
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set: {short(key, 80)} is not a config key (dotted path like privacy.eps or a short "
                              f"name: {', '.join(SHORT_NAMES)})")
        try:
            check_text(key, "--set key")
        except ValueError as err:
            raise ConfigError(f"--set: {err}") from None
        path = SHORT_NAMES.get(key, key).split(".")
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if isinstance(child, str) and part in ("gar", "attack", "partition"):
                child = {"kind" if part == "partition" else "name": child}
            if child is None:
                # --set attack.params.zeta=2 on a config that names no attack: the default rule's
                default = ExperimentConfig.model_fields.get(part) if i == 0 else None
                child = {"name": default.get_default(call_default_factory=True).name} \
                    if default is not None and part in ("gar", "attack") else {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"--set {key}: {where} is a value ({short(child, 60)}), it has no key {path[i + 1]!r}")
            node[part] = child
            node = child
        node[path[-1]] = value
    return out


def _split(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value; got {item!r}")
    key, _, value = item.partition("=")
    try:
        return key.strip(), _parse_value(value.strip())
    except ConfigError as err:
        raise ConfigError(f"--set {short(key.strip(), 60)}: {err}") from None


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = e["loc"][:-1]
            valid = _valid_keys(parent)
            if valid:
                msg += f"; valid keys here: {', '.join(valid)}"
        elif "input" in e and e["type"] != "value_error" and not isinstance(e["input"], dict):
            msg += f" (got {short(e['input'], 80)})"
        lines.append(f"{short_loc(loc)}: {msg}")
        if len(lines) >= 10:
            lines.append(f"... and {len(err.errors()) - 10} more")
            break
    return "invalid config:\n  " + "\n  ".join(lines)


def short_loc(loc: str, limit: int = 120) -> str:
    return loc if len(loc) <= limit else loc[: limit - 3] + "..."


def _valid_keys(path: tuple) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def build_config(raw: dict[str, Any] | None = None, overrides: dict[str, Any] | list[str] | None = None,
                 *, source: str | None = None) -> ExperimentConfig:
    """Validate a raw dict (+ overrides) into an :class:`ExperimentConfig`, or raise ConfigError.
    ``source`` (a file name) starts the error message."""
    data = apply_overrides(raw or {}, overrides or {})
    head = f"{source}: invalid config" if source else "invalid config"
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(head + _format_error(err).removeprefix("invalid config")) from None
    except (ValueError, TypeError) as err:  # registry checks raise plain ValueErrors with full messages
        raise ConfigError(f"{head}: {err}") from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config; see :func:`build_config`."""
    from tuneguard.safeyaml import load_file

    p = Path(path)
    try:
        raw = load_file(p, "config file")
    except YamlError as err:
        raise ConfigError(str(err)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys (e.g. `lr: 0.5`), got a {type(raw).__name__}")
    # An exported file holds {config: {...}, score: ..., run_id: ...}; accept it as is.
    if "config" in raw and isinstance(raw["config"], dict) and "tuneguard_export" in raw:
        raw = raw["config"]
    return build_config(raw, overrides, source=str(p))
