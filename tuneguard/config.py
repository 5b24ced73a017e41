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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Training-set sizes of the built-in datasets before any partition (the 001 preprocessing
# doubles Fashion-MNIST's train set with flipped images); other datasets' sizes are known once
# loaded. Read from tuneguard.data.DATASETS.
TRAIN_SIZES = {"mnist": 60_000, "fashion_mnist": 120_000}


class ConfigError(ValueError):
    """A config that cannot run; the message names the field, the value and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuleConfig(_Strict):
    """A registry entry with its parameters. In YAML ``gar: krum`` is short for ``gar: {name: krum}``."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


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
    cpus_per_actor: float = Field(0.25, gt=0, description="fractional CPUs each actor reserves")
    step_timeout_s: float = Field(120.0, gt=0, description="seconds a step may take before it is retried")
    max_restarts: int = Field(2, ge=0, description="times a dead worker actor is restarted")
    address: str | None = Field(None, description="Ray address; None: RAY_ADDRESS, else a private local cluster")


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
    n_workers: int = Field(15, ge=1, description="n: all workers, honest and Byzantine")
    f: int = Field(3, ge=0, description="number of Byzantine workers")
    attack: RuleConfig = Field(default_factory=lambda: RuleConfig(name="little"))
    gar: RuleConfig = Field(default_factory=lambda: RuleConfig(name="mda"))
    batch_size: int = Field(25, ge=1, description="b: examples per honest worker per step")
    steps: int = Field(300, ge=1, description="training steps T (the cap when the budget adapts T)")
    lr: float = Field(0.5, gt=0)
    momentum: float = Field(0.99, ge=0, lt=1, description="worker momentum beta")
    dampening: float = Field(0.0, ge=0, le=1, description="m_t = beta m_{t-1} + (1 - dampening) g_t")
    weight_decay: float = Field(1e-4, ge=0, description="l2 factor added to the server's update")
    clip: float | None = Field(2.0, description="per-example L2 clipping norm C; None: no clipping")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    perturbation: float = Field(0.0, ge=0, description="003: std b of N(0, b^2) added to each local gradient")
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    eval_every: int = Field(10, ge=1, description="test-set evaluation period, in steps")
    seed: int = 1
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
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
        return self

    def _check_registries(self) -> None:
        from tuneguard.aggregators import check_rule
        from tuneguard.attacks import ATTACKS

        check_rule(self.gar.name, self.n_workers, self.f, **self.gar.params)
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
                    f"unknown: {sorted(unknown)}"
                )

    # Derived quantities --------------------------------------------------------------------
    @property
    def n_honest(self) -> int:
        return self.n_workers - self.f

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def flat(self) -> dict[str, Any]:
        """The config as dotted keys, for MLflow params and ``--set``."""
        return _flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


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
    """YAML scalar parsing, so ``--set clip=null`` and ``--set lr=0.1`` get their types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted paths or short names) to a raw config dict."""
    out = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    for key, value in items:
        path = SHORT_NAMES.get(key, key).split(".")
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part in ("gar", "attack", "partition"):
                child = {"kind" if part == "partition" else "name": child}
            if child is None:
                child = {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return out


def _split(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value; got {item!r}")
    key, _, value = item.partition("=")
    return key.strip(), _parse_value(value.strip())


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
            msg += f" (got {e['input']!r})"
        lines.append(f"{loc}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _valid_keys(path: tuple) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def build_config(raw: dict[str, Any] | None = None, overrides: dict[str, Any] | list[str] | None = None) -> ExperimentConfig:
    """Validate a raw dict (+ overrides) into an :class:`ExperimentConfig`, or raise ConfigError."""
    data = apply_overrides(raw or {}, overrides or {})
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    except ValueError as err:  # registry checks raise plain ValueErrors with full messages
        raise ConfigError(f"invalid config: {err}") from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config; see :func:`build_config`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys, got {type(raw).__name__}")
    # An exported file holds {config: {...}, score: ..., run_id: ...}; accept it as is.
    if "config" in raw and isinstance(raw["config"], dict) and "tuneguard_export" in raw:
        raw = raw["config"]
    return build_config(raw, overrides)
