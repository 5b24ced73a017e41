"""Models: the papers' built-ins, user models by import path, and the checks every model passes
before a run.

``model:`` in a config is either a built-in name (:data:`MODELS`) or an import path
``package.module:callable``. Either way the model is built as

    builder(input_shape, num_classes, **model_params) -> nn.Module

with ``input_shape`` (e.g. ``(1, 28, 28)``) and ``num_classes`` read from the dataset, never
from constants. A user callable (a function or an ``nn.Module`` class) must live in a module
importable on every node that trains: installed in the environment, or on ``PYTHONPATH`` (Ray
workers import it again in their own processes, from the same import path).

Built-ins:

- ``mlp_001``: Flatten, Linear(d_in, 100), ReLU, Linear(100, C) (paper 001; d = 79,510 on MNIST)
- ``mlp_003``: the same with 128 hidden units (paper 003)
- ``logreg``: multinomial logistic regression, Linear(d_in, C)
- ``cnn``: a tiny two-conv net (stride 2, no pooling)
- ``convnet``: the DP-SGD CNN of Papernot et al. 2021 / Opacus' MNIST example (two 2-stride
  convs with 2x2 max-pool, a 32-unit hidden layer; tanh by default)
- ``resnet_gn``: a small ResNet (He et al. 2016) with GroupNorm in place of BatchNorm (Wu & He
  2018), the usual DP replacement (Kurakin et al. 2022; De et al. 2022)

Validation (:func:`validate_model`): layers whose output mixes the examples of a batch
(BatchNorm) are refused, because a per-example gradient, and so DP clipping, is undefined for
them; layers the fast per-example clipping path does not know make the run use the generic
path, announced by one line saying which layer and what it costs.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from tuneguard.aggregators._spec import Registry

log = logging.getLogger("tuneguard")


class ModelError(ValueError):
    """A model that cannot be used; the message names the model, the layer and the fix."""


# Registry ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One built-in model: ``build(input_shape, num_classes, **params)`` and its metadata.

    ``params`` maps each accepted parameter to its default (``model_params`` may override them;
    any other key is an error naming the accepted ones).
    """

    name: str
    build: Callable[..., nn.Module] = field(repr=False)
    description: str
    reference: str = ""
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


MODELS: Registry[ModelSpec] = Registry("model")


def _flat_in(input_shape: Sequence[int]) -> int:
    return math.prod(input_shape)


def _mlp(hidden: int) -> Callable[..., nn.Module]:
    def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(_flat_in(input_shape), hidden), nn.ReLU(),
                             nn.Linear(hidden, num_classes))

    return build


def _logreg(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_in(input_shape), num_classes))


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ModelError(
            f"model {name!r} needs image inputs [channels, height, width]; the dataset's examples have "
            f"shape {tuple(input_shape)}. Use an MLP (mlp_001, logreg) or your own model (model: pkg.module:fn)"
        )
    c, h, w = (int(v) for v in input_shape)
    return c, h, w


def _cnn(input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (8, 16)) -> nn.Module:
    c, h, w = _image_shape("cnn", input_shape)
    c1, c2 = (int(v) for v in channels)
    for _ in range(2):
        h, w = _conv_out(h, 5, 2), _conv_out(w, 5, 2)
    if h < 1 or w < 1:
        raise ModelError(f"model 'cnn' needs images of at least 13x13 pixels; got {tuple(input_shape)}")
    return nn.Sequential(
        nn.Conv2d(c, c1, 5, stride=2), nn.ReLU(), nn.Conv2d(c1, c2, 5, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(c2 * h * w, num_classes),
    )


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _activation(model: str, name: str) -> Callable[[], nn.Module]:
    if name not in _ACTIVATIONS:
        raise ModelError(f"model {model!r}: model_params.activation={name!r} is not known; use one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _convnet(input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32), hidden: int = 32,
             activation: str = "tanh") -> nn.Module:
    """Conv(c1, 8, stride 2, pad 3) - act - MaxPool(2, 1) - Conv(c2, 4, stride 2) - act - MaxPool(2, 1)
    - Linear(hidden) - act - Linear(C): 26,010 parameters on MNIST with the defaults."""
    c, h, w = _image_shape("convnet", input_shape)
    c1, c2 = (int(v) for v in channels)
    act = _activation("convnet", activation)
    for k, s, p in ((8, 2, 3), (2, 1, 0), (4, 2, 0), (2, 1, 0)):
        h, w = _conv_out(h, k, s, p), _conv_out(w, k, s, p)
    if h < 1 or w < 1:
        raise ModelError(f"model 'convnet' needs images of at least 14x14 pixels; got {tuple(input_shape)}")
    return nn.Sequential(
        nn.Conv2d(c, c1, 8, stride=2, padding=3), act(), nn.MaxPool2d(2, 1),
        nn.Conv2d(c1, c2, 4, stride=2), act(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(c2 * h * w, hidden), act(), nn.Linear(hidden, num_classes),
    )


class _BasicBlock(nn.Module):
    """He et al. 2016's basic block with GroupNorm: conv-GN-ReLU-conv-GN, plus the (projected)
    input, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.GroupNorm(min(groups, c_out), c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _resnet_gn(input_shape: Sequence[int], num_classes: int, width: int = 16, blocks: Sequence[int] = (1, 1, 1),
               groups: int = 4) -> nn.Module:
    """Stem conv 3x3 (width) + GN + ReLU; stages of basic blocks with widths width * 2^s (stride 2
    from the second stage); global average pooling; Linear(C)."""
    c, _, _ = _image_shape("resnet_gn", input_shape)
    layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.GroupNorm(min(groups, width), width), nn.ReLU()]
    c_in = width
    for s, n_blocks in enumerate(int(v) for v in blocks):
        c_out = width * 2**s
        for i in range(n_blocks):
            layers.append(_BasicBlock(c_in, c_out, 2 if (s > 0 and i == 0) else 1, groups))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


for _spec in (
    ModelSpec("mlp_001", _mlp(100), "MLP d_in-100-C with ReLU (d = 79,510 on MNIST)", "paper 001, section 4.1"),
    ModelSpec("mlp_003", _mlp(128), "MLP d_in-128-C with ReLU", "paper 003"),
    ModelSpec("logreg", _logreg, "multinomial logistic regression d_in-C"),
    ModelSpec("cnn", _cnn, "tiny CNN: two 5x5 stride-2 convs with ReLU, then Linear", params={"channels": [8, 16]}),
    ModelSpec("convnet", _convnet, "DP-SGD CNN: 2 convs + max-pool, hidden layer (26k parameters on MNIST)",
              "Papernot et al. 2021 (tempered sigmoids), Opacus' MNIST example",
              params={"channels": [16, 32], "hidden": 32, "activation": "tanh"}),
    ModelSpec("resnet_gn", _resnet_gn, "small ResNet with GroupNorm (basic blocks, global average pooling)",
              "He et al. 2016; GroupNorm: Wu & He 2018", params={"width": 16, "blocks": [1, 1, 1], "groups": 4}),
):
    MODELS.register(_spec)


# Import paths -----------------------------------------------------------------------------------
def is_import_path(name: str) -> bool:
    """``package.module:attr`` (the ``torchvision:`` prefix of datasets excepted by the caller)."""
    mod, sep, attr = name.partition(":")
    return bool(sep) and bool(mod) and bool(attr) and all(p.isidentifier() for p in mod.split(".")) and all(
        p.isidentifier() for p in attr.split(".")
    )


def resolve_callable(path: str, field_name: str) -> Callable[..., Any]:
    """The callable ``package.module:attr`` names, or a ValueError naming the field and the fix."""
    if not is_import_path(path):
        raise ValueError(f"{field_name}={path!r} is not an import path; write it as package.module:callable")
    mod_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as err:
        raise ValueError(
            f"{field_name}={path!r}: module {mod_name!r} cannot be imported ({type(err).__name__}: {err}). "
            "It must be importable on every node that trains: install it (pip install -e .) or put its "
            "folder on PYTHONPATH (Ray workers import it again in their own processes)"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{field_name}={path!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{field_name}={path!r} names a {type(obj).__name__}, not a callable")
    return obj


def check_model_name(name: str) -> str:
    """``name`` if it is a built-in or a resolvable import path, else a ValueError saying what is allowed."""
    if name in MODELS:
        return name
    if ":" in name:
        resolve_callable(name, "model")
        return name
    raise ValueError(
        f"model={name!r} is not a built-in model ({', '.join(MODELS)}) nor an import path "
        "package.module:callable returning an nn.Module"
    )


def check_model_params(name: str, params: Mapping[str, Any]) -> None:
    """Built-ins take the parameters their spec lists; an import path's callable is checked
    against its signature (a ``**kwargs`` callable takes anything)."""
    if name in MODELS:
        unknown = sorted(set(params) - set(MODELS[name].params))
        if unknown:
            allowed = ", ".join(f"{k} (default {v!r})" for k, v in MODELS[name].params.items()) or "none"
            raise ValueError(f"model {name!r} takes model_params {allowed}; unknown: {unknown}")
        return
    fn = resolve_callable(name, "model")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust the call
        return
    try:
        sig.bind(None, None, **params)
    except TypeError as err:
        raise ValueError(
            f"model {name!r} is called as {name.partition(':')[2]}(input_shape, num_classes, **model_params); "
            f"with model_params {dict(params)} that call fails: {err}"
        ) from None


# Building ---------------------------------------------------------------------------------------
# User builders initialise from torch's global RNG: it is seeded under this lock inside
# fork_rng, so two runs built at once in one process (threads of a Tune trial) cannot interleave
# their draws, and the caller's global RNG state is left as it was.
_GLOBAL_RNG = threading.Lock()


def build_model(
    name: str,
    seed: int = 0,
    *,
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    params: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A freshly initialised model; the initialisation depends on ``seed`` only.

    Built-ins draw from a local generator (:func:`_init`); a user callable runs with torch's
    global RNG seeded by ``seed`` (and restored afterwards). The defaults of ``input_shape`` /
    ``num_classes`` are MNIST's.
    """
    params = dict(params or {})
    shape = tuple(int(v) for v in input_shape)
    check_model_params(name, params)
    if name in MODELS:
        spec = MODELS[name]
        model = spec.build(shape, int(num_classes), **{**spec.params, **params})
        _init(model, torch.Generator().manual_seed(seed))
        return model
    fn = resolve_callable(name, "model")
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = fn(shape, int(num_classes), **params)
        except ModelError:
            raise
        except Exception as err:
            raise ModelError(
                f"model {name!r} failed to build for input_shape={shape}, num_classes={num_classes}, "
                f"model_params={params}: {type(err).__name__}: {err}"
            ) from err
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r} returned a {type(model).__name__}; it must return a torch.nn.Module")
    return model


def _init(model: nn.Module, generator: torch.Generator) -> None:
    """torch's default Linear/Conv initialisation (Kaiming-uniform with a = sqrt(5), biases
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))), drawn from a local generator: seeding the global one
    would make two runs initialised at once in one process (threads of a Tune trial) race."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)


# Validation -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCheck:
    """What :func:`validate_model` found: the parameter count, and why the fast clipping path
    cannot run (None when it can)."""

    num_parameters: int
    fallback: str | None


def validate_model(model: nn.Module, name: str, input_shape: Sequence[int], num_classes: int) -> ModelCheck:
    """Refuse what cannot be trained with per-example clipping; say which clipping path runs.

    - BatchNorm (any ``_BatchNorm``, SyncBatchNorm included) normalises with statistics of the
      whole batch: example i's output depends on the other examples, so there is no per-example
      gradient to clip. Refused, naming the layer, with GroupNorm as the fix (what Opacus'
      ``ModuleValidator.fix`` substitutes).
    - the model must map a batch [N, *input_shape] to logits [N, num_classes].
    """
    from tuneguard.privacy.clipping import fast_path_blocker

    for path, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            c = getattr(mod, "num_features", "C")
            raise ModelError(
                f"model {name!r}: layer {path or '<root>'!r} ({type(mod).__name__}) normalises with the "
                "statistics of the whole batch, so each example's output depends on the others: per-example "
                "gradients, and DP-SGD clipping, are undefined. Replace it with "
                f"nn.GroupNorm(num_groups, {c}) (e.g. nn.GroupNorm(min(32, {c}), {c})), or nn.LayerNorm"
            )
    n_params = sum(p.numel() for p in model.parameters())
    if n_params == 0:
        raise ModelError(f"model {name!r} has no parameters to train")
    shape = tuple(int(v) for v in input_shape)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape, dtype=dtype, device=device))
    except Exception as err:
        raise ModelError(
            f"model {name!r} fails on a batch of the dataset's inputs [N, {', '.join(map(str, shape))}]: "
            f"{type(err).__name__}: {err}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model {name!r} must return logits [N, num_classes] = [N, {num_classes}] for inputs "
            f"[N, {', '.join(map(str, shape))}]; it returned {got}"
        )
    return ModelCheck(n_params, fast_path_blocker(model))


_NOTICED: set[str] = set()


def notice_fallback(name: str, fallback: str) -> None:
    """One line, once per process and model: which layer keeps the model off the fast path."""
    key = f"{name}|{fallback}"
    if key not in _NOTICED:
        _NOTICED.add(key)
        log.warning("model %r: %s", name, fallback)


def build_checked(
    name: str, seed: int, input_shape: Sequence[int], num_classes: int, params: Mapping[str, Any] | None = None
) -> nn.Module:
    """:func:`build_model` then :func:`validate_model` (announcing a generic-path fallback)."""
    model = build_model(name, seed, input_shape=input_shape, num_classes=num_classes, params=params)
    check = validate_model(model, name, input_shape, num_classes)
    if check.fallback:
        notice_fallback(name, check.fallback)
    return model


@functools.lru_cache(maxsize=64)
def _check_cached(name: str, params_json: str, input_shape: tuple[int, ...], num_classes: int) -> ModelCheck:
    model = build_model(name, 0, input_shape=input_shape, num_classes=num_classes, params=json.loads(params_json))
    return validate_model(model, name, input_shape, num_classes)


def check_model(name: str, params: Mapping[str, Any], input_shape: Sequence[int], num_classes: int) -> ModelCheck:
    """Build (on CPU, seed 0) and validate, cached per (model, params, shape): what config
    validation runs when the dataset's shape is known before loading it."""
    key = json.dumps(dict(params), sort_keys=True, default=str)
    return _check_cached(name, key, tuple(int(v) for v in input_shape), int(num_classes))


# Flat parameters --------------------------------------------------------------------------------
def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """Move the model's parameters into one contiguous vector and make them views of it.

    Updating the returned vector in place updates the model; this is what lets the step work on
    a plain ``Tensor[d]`` while torch modules keep working unchanged.
    """
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset : offset + n].view_as(p)
        offset += n
    return flat


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
