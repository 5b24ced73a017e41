"""Datasets, 001's preprocessing, worker partitions and per-step batch sampling.

``dataset:`` in a config is one of

- a built-in (:data:`DATASETS`): ``mnist``, ``fashion_mnist`` with 001's preprocessing (MNIST
  normalised with mean 0.1307, std 0.3081; Fashion-MNIST's train set doubled with horizontally
  flipped images), read straight from torchvision's IDX files;
- ``torchvision:NAME``: any torchvision dataset class (``torchvision:CIFAR10``,
  ``torchvision:EMNIST`` with ``dataset_params: {split: digits}``, ``torchvision:FakeData``),
  built with ``dataset_params`` for train and test (``train=True/False`` or
  ``split="train"/"test"``, whichever the class takes; a class with neither is split 5:1 with a
  fixed seed). Images become float tensors in [0, 1], standardised per channel with the train
  set's mean and std. Files are downloaded when they are absent and the data directory allows
  it (see below; ``dataset_params: {download: true}`` forces it);
- ``package.module:callable``: called with ``dataset_params`` (plus ``root=`` the data
  directory when it takes a ``root`` or ``data_dir`` argument). It returns
  ``(train_x, train_y, test_x, test_y)`` tensors / arrays, or ``(train, test)`` torch datasets
  of ``(x, label)`` items, or a :class:`Dataset`. Its preprocessing is kept as is (uint8 images
  are scaled to [0, 1]). The module must be importable on every node (installed, or on
  ``PYTHONPATH``); the data are loaded once per job by the driver and shipped to Ray actors.

Input shape and number of classes come from the data (``Dataset.input_shape``,
``Dataset.num_classes``: the largest label + 1), never from constants.

Data live as tensors on the training device: no DataLoader, no per-step copies. The data
directory is, in order: an explicit ``data_dir``, ``$TUNEGUARD_DATA_DIR``, then a user cache
dir (``$XDG_CACHE_HOME/tuneguard/datasets``) where torchvision may download.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneguard.aggregators._spec import Registry

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_TV_NAMES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
TORCHVISION_PREFIX = "torchvision:"


class DataNotFoundError(RuntimeError):
    """The dataset is not on disk and could not be downloaded."""


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names it and what is expected."""


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in dataset: what it is, its shape and size after preprocessing, and the paper
    whose preprocessing it follows. Config validation reads the shape to build and check the
    model before any run."""

    name: str
    description: str
    torchvision_class: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_size: int
    preprocessing: str
    reference: str = ""


DATASETS: Registry[DatasetSpec] = Registry("dataset")
DATASETS.register(DatasetSpec(
    "mnist", "handwritten digits, 28x28 grey", "MNIST", (1, 28, 28), 10, 60_000,
    "pixels in [0, 1], normalised with mean 0.1307, std 0.3081", "paper 001, section 4.1",
))
DATASETS.register(DatasetSpec(
    "fashion_mnist", "Zalando clothing images, 28x28 grey", "FashionMNIST", (1, 28, 28), 10, 120_000,
    "pixels in [0, 1]; train set expanded with horizontally flipped images", "paper 001, section 4.1",
))


@dataclass(frozen=True)
class Dataset:
    """Preprocessed tensors: inputs [N, *input_shape] (float32, or integer token ids), labels [N] int64."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @functools.cached_property
    def num_classes(self) -> int:
        """The largest label + 1, over train and test: derived from the data the same way in
        every process (Ray actors rebuild the Dataset from its tensors)."""
        top = max(int(self.train_y.max()), int(self.test_y.max()) if self.test_y.numel() else 0)
        return top + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def to(self, device: str | torch.device) -> Dataset:
        return Dataset(self.name, *(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tuneguard" / "datasets"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The torchvision root to use and whether downloading there is allowed."""
    if data_dir:
        return Path(data_dir).expanduser(), False
    env = os.environ.get("TUNEGUARD_DATA_DIR")
    if env:
        return Path(env).expanduser(), False
    return default_cache_dir(), True


# Names and parameters ---------------------------------------------------------------------------
_TV_CLASS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_dataset_name(name: str) -> str:
    """``name`` if it names a dataset tuneguard can load, else a ValueError saying what is allowed.

    Built-ins and import paths are checked fully (the module is imported); ``torchvision:NAME``
    is checked against torchvision's dataset classes (importing torchvision once, ~3 s).
    """
    if name in DATASETS:
        return name
    if name.startswith(TORCHVISION_PREFIX):
        _torchvision_class(name)
        return name
    if ":" in name:
        from tuneguard.models import resolve_callable

        resolve_callable(name, "dataset")
        return name
    raise ValueError(
        f"dataset={name!r} is not a built-in ({', '.join(DATASETS)}), a torchvision dataset "
        "(torchvision:CIFAR10, torchvision:EMNIST, ...) nor an import path package.module:callable"
    )


def _torchvision_class(name: str) -> Any:
    cls_name = name[len(TORCHVISION_PREFIX):]
    if not _TV_CLASS.match(cls_name):
        raise ValueError(f"dataset={name!r}: write torchvision:ClassName, e.g. torchvision:CIFAR10")
    try:
        import torchvision.datasets as tvd
    except ImportError as err:
        raise ValueError(f"dataset={name!r} needs torchvision ({err}); pip install torchvision") from None
    cls = getattr(tvd, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.utils.data.Dataset)):
        valid = sorted(k for k, v in vars(tvd).items() if isinstance(v, type) and issubclass(v, torch.utils.data.Dataset)
                       and not k.startswith("_") and k not in ("VisionDataset", "DatasetFolder", "ImageFolder"))
        raise ValueError(f"dataset={name!r}: torchvision.datasets has no dataset class {cls_name!r}; "
                         f"classes: {', '.join(valid)}")
    return cls


#: arguments tuneguard sets itself when building a torchvision dataset
_TV_MANAGED = ("root", "train", "transform", "target_transform")


def check_dataset_params(name: str, params: Mapping[str, Any]) -> None:
    """Built-ins take no parameters; a torchvision class / a callable is checked against its
    signature."""
    if name in DATASETS:
        if params:
            raise ValueError(f"dataset {name!r} takes no dataset_params (got {sorted(params)}); "
                             f"its preprocessing is fixed: {DATASETS[name].preprocessing}")
        return
    if name.startswith(TORCHVISION_PREFIX):
        fn, managed = _torchvision_class(name), _TV_MANAGED
    else:
        from tuneguard.models import resolve_callable

        fn, managed = resolve_callable(name, "dataset"), ()
    bad = sorted(set(params) & set(managed))
    if bad:
        raise ValueError(f"dataset {name!r}: dataset_params {bad} are set by tuneguard (train/test, root, "
                         "transforms); use data_dir for the root")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    unknown = sorted(k for k in params if k not in sig.parameters and k != "download")
    if unknown and not accepts_kwargs:
        allowed = [k for k in sig.parameters if k not in managed and k != "self"]
        raise ValueError(f"dataset {name!r} takes dataset_params {', '.join(allowed) or 'none'}; unknown: {unknown}")


# Loading ----------------------------------------------------------------------------------------
def load_dataset(name: str, data_dir: str | os.PathLike | None = None, params: Mapping[str, Any] | None = None) -> Dataset:
    """Load and preprocess a dataset (CPU tensors; cached per process). See the module docstring."""
    root, may_download = resolve_data_dir(data_dir)
    key = json.dumps(dict(params or {}), sort_keys=True, default=str)
    return _load_cached(name, str(root.resolve()), may_download, key)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, root: str, may_download: bool, params_json: str = "{}") -> Dataset:
    params = json.loads(params_json)
    if name in DATASETS:
        check_dataset_params(name, params)
        return _load_builtin(name, root, may_download)
    if name.startswith(TORCHVISION_PREFIX):
        return _load_torchvision(name, root, may_download, params)
    if ":" in name:
        return _load_callable(name, root, params)
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}, torchvision:NAME, package.module:callable")


def _load_builtin(name: str, root: str, may_download: bool) -> Dataset:
    train_x, train_y, test_x, test_y = _raw_tensors(name, root, may_download)
    train_x, test_x = _to_float(train_x), _to_float(test_x)
    if name == "mnist":
        train_x = (train_x - MNIST_MEAN) / MNIST_STD
        test_x = (test_x - MNIST_MEAN) / MNIST_STD
    else:
        train_x = torch.cat([train_x, train_x.flip(-1)])
        train_y = torch.cat([train_y, train_y])
    return Dataset(name, train_x.contiguous(), train_y.long(), test_x.contiguous(), test_y.long())


def _load_torchvision(name: str, root: str, may_download: bool, params: dict[str, Any]) -> Dataset:
    check_dataset_params(name, params)
    cls = _torchvision_class(name)
    sig = inspect.signature(cls)
    params = dict(params)
    download = params.pop("download", None)
    if download is None:
        download = may_download

    def build(split: str | None) -> Any:
        kw = dict(params)
        if "root" in sig.parameters:
            kw["root"] = root
        if split is not None:
            if "train" in sig.parameters:
                kw["train"] = split == "train"
            elif "split" in sig.parameters and "split" not in params:
                kw["split"] = split
        if "download" in sig.parameters:
            kw["download"] = bool(download)
        try:
            return cls(**kw)
        except (RuntimeError, FileNotFoundError, OSError) as err:
            hint = (
                f"{name} ({split or 'all'}) could not be loaded from {root}: {type(err).__name__}: {err}\n"
                "Point tuneguard at a folder holding it in torchvision's layout with --data-dir or the "
                "TUNEGUARD_DATA_DIR environment variable, or run once with network access (no data_dir "
                f"set: torchvision downloads into {default_cache_dir()}; or dataset_params: {{download: true}})."
            )
            raise DataNotFoundError(hint) from None

    splits_known = "train" in sig.parameters or ("split" in sig.parameters and "split" not in params)
    if splits_known:
        train_x, train_y = _items_to_tensors(build("train"), name)
        test_x, test_y = _items_to_tensors(build("test"), name)
    else:
        # no train/test argument (FakeData, or `split` pinned by the user): a fixed 5:1 split
        x, y = _items_to_tensors(build(None), name)
        perm = torch.from_numpy(np.random.default_rng(np.random.SeedSequence([0xDA7A, len(y)])).permutation(len(y)))
        cut = len(y) - max(1, len(y) // 6)
        train_x, train_y, test_x, test_y = x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
    # per-channel standardisation with the train set's statistics (channel = dim 1)
    dims = [0] + list(range(2, train_x.dim()))
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    return Dataset(name, train_x.contiguous(), train_y, test_x.contiguous(), test_y)


def _items_to_tensors(ds: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A torch dataset of (image, label) items as [N, C, H, W] float32 in [0, 1] and [N] int64.

    torchvision's MNIST family and CIFAR keep all images in ``data``: read them at once instead of
    decoding N PIL images one by one (minutes for CIFAR-10 on two cores)."""
    import torchvision.datasets as tvd

    if isinstance(ds, tvd.MNIST) and isinstance(ds.data, torch.Tensor):
        return _to_float(ds.data), torch.as_tensor(ds.targets).long()
    if isinstance(ds, tvd.CIFAR10) and isinstance(ds.data, np.ndarray):  # CIFAR100 subclasses it
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255.0)
        return x.contiguous(), torch.as_tensor(ds.targets).long()
    return _generic_items(ds, name)


def _generic_items(ds: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise DataError(f"dataset {name!r}: item {i} is a {type(item).__name__}; expected (input, label) pairs")
        x, y = item[0], item[1]
        xs.append(_as_tensor(x))
        if isinstance(y, torch.Tensor):
            y = y.item() if y.numel() == 1 else y
        if isinstance(y, (np.integer,)):
            y = int(y)
        if not isinstance(y, int):
            raise DataError(f"dataset {name!r}: item {i} has label {y!r}; tuneguard trains classifiers on integer labels")
        ys.append(y)
    if not xs:
        raise DataError(f"dataset {name!r} is empty")
    shapes = {tuple(t.shape) for t in xs}
    if len(shapes) != 1:
        raise DataError(f"dataset {name!r}: inputs have different shapes {sorted(shapes)[:3]}; give them one shape")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def _as_tensor(x: Any) -> torch.Tensor:
    """One input as a tensor: PIL images and uint8 arrays become float [C, H, W] in [0, 1]."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:  # a PIL image
            from torchvision.transforms.functional import pil_to_tensor

            t = pil_to_tensor(x)
        except (ImportError, TypeError) as err:
            raise DataError(f"cannot turn a {type(x).__name__} input into a tensor ({err})") from None
    if t.dtype == torch.uint8:
        t = t.float().div_(255.0)
    return t


def _load_callable(name: str, root: str, params: dict[str, Any]) -> Dataset:
    from tuneguard.models import resolve_callable

    check_dataset_params(name, params)
    fn = resolve_callable(name, "dataset")
    kw = dict(params)
    try:
        sig = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        sig = {}
    for key in ("root", "data_dir"):
        if key in sig and key not in kw:
            kw[key] = root
    result = fn(**kw)
    if isinstance(result, Dataset):
        return _checked(name, result.train_x, result.train_y, result.test_x, result.test_y)
    if isinstance(result, (tuple, list)) and len(result) == 4:
        tx, ty, vx, vy = (_as_array_tensor(t) for t in result)
        return _checked(name, tx, ty, vx, vy)
    if isinstance(result, (tuple, list)) and len(result) == 2:
        (tx, ty), (vx, vy) = (_split_tensors(part, name) for part in result)
        return _checked(name, tx, ty, vx, vy)
    raise DataError(
        f"dataset {name!r} returned a {type(result).__name__}; return (train_x, train_y, test_x, test_y), "
        "(train_dataset, test_dataset) or a tuneguard.data.Dataset"
    )


def _as_array_tensor(t: Any) -> torch.Tensor:
    t = torch.as_tensor(t) if not isinstance(t, torch.Tensor) else t
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t


def _split_tensors(part: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(part, torch.utils.data.TensorDataset):
        x, y = part.tensors[0], part.tensors[1]
        return _as_array_tensor(x), torch.as_tensor(y)
    if isinstance(part, (tuple, list)) and len(part) == 2:
        return _as_array_tensor(part[0]), torch.as_tensor(part[1])
    return _generic_items(part, name)


def _checked(name: str, tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor) -> Dataset:
    for what, x, y in (("train", tx, ty), ("test", vx, vy)):
        if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise DataError(f"dataset {name!r}: {what} inputs {tuple(x.shape)} and labels {tuple(y.shape)} must be "
                            "[N, *input_shape] and [N] with the same N")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"dataset {name!r}: {what} labels have dtype {y.dtype}; integer class labels are needed")
        if y.numel() and int(y.min()) < 0:
            raise DataError(f"dataset {name!r}: {what} labels must be >= 0 (got {int(y.min())})")
    if tx.shape[1:] != vx.shape[1:]:
        raise DataError(f"dataset {name!r}: train inputs {tuple(tx.shape[1:])} and test inputs {tuple(vx.shape[1:])} differ")
    if tx.is_floating_point():
        tx, vx = tx.float(), vx.float()
    return Dataset(name, tx.contiguous(), ty.long(), vx.contiguous(), vy.long())


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _raw_tensors(name: str, root: str, may_download: bool) -> tuple[torch.Tensor, ...]:
    """The four IDX arrays as uint8 tensors.

    Uncompressed IDX files in torchvision's layout are read directly: importing torchvision costs
    ~3 s per process (it pulls in torch._dynamo), which every Ray actor and Tune trial would pay.
    torchvision is only used to download (and unpack) missing files.
    """
    raw = Path(root) / _TV_NAMES[name] / "raw"
    if not all((raw / f).is_file() for f in _IDX_FILES):
        _download(name, root, may_download)
    return tuple(torch.from_numpy(_read_idx(raw / f)) for f in _IDX_FILES)


def _download(name: str, root: str, may_download: bool) -> None:
    hint = (
        f"{_TV_NAMES[name]} not found under {root}.\n"
        f"Point tuneguard at a folder holding {_TV_NAMES[name]}/raw/*-ubyte (uncompressed IDX files, "
        "torchvision layout) with --data-dir or the TUNEGUARD_DATA_DIR environment variable, "
        f"or run once with network access so torchvision downloads it into {default_cache_dir()}."
    )
    if not may_download:
        raise DataNotFoundError(hint)
    import torchvision

    try:
        getattr(torchvision.datasets, _TV_NAMES[name])(root, train=True, download=True)
        getattr(torchvision.datasets, _TV_NAMES[name])(root, train=False, download=True)
    except Exception as err:  # torchvision raises RuntimeError / URLError depending on the cause
        raise DataNotFoundError(f"{hint}\n(download failed: {type(err).__name__}: {err})") from None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's format: magic, big-endian dims, then uint8 data)."""
    data = path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataNotFoundError(f"{path} is not an uncompressed uint8 IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataNotFoundError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(*dims).copy()


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0).unsqueeze(1)


# Partitions ------------------------------------------------------------------------------------
def partition(
    labels: torch.Tensor,
    n_workers: int,
    kind: str = "iid",
    *,
    classes_per_worker: int = 1,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[torch.Tensor] | None:
    """Split example indices across ``n_workers`` honest workers.

    Returns None for ``iid`` (001: every worker samples from the whole train set), else one
    index tensor per worker. ``by_class`` (003): worker i holds classes
    ``{(i k + j) mod C : j < k}`` (C classes); the examples of a class are split evenly among the workers
    holding it. ``dirichlet``: for each class, proportions over workers ~ Dir(alpha).
    """
    if kind == "iid":
        return None
    y = labels.cpu().numpy()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A]))
    n_classes = int(y.max()) + 1
    shards: list[list[np.ndarray]] = [[] for _ in range(n_workers)]
    if kind == "by_class":
        holders: dict[int, list[int]] = {c: [] for c in range(n_classes)}
        for w in range(n_workers):
            for j in range(classes_per_worker):
                holders[(w * classes_per_worker + j) % n_classes].append(w)
        for c, ws in holders.items():
            if not ws:
                continue
            idx = rng.permutation(np.flatnonzero(y == c))
            for w, part in zip(ws, np.array_split(idx, len(ws)), strict=True):
                shards[w].append(part)
    elif kind == "dirichlet":
        for c in range(n_classes):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_workers)) * len(idx)).astype(int)[:-1]
            for w, part in enumerate(np.split(idx, cuts)):
                shards[w].append(part)
    else:
        raise ValueError(f"unknown partition kind {kind!r}; valid: iid, by_class, dirichlet")
    out = [torch.from_numpy(np.sort(np.concatenate(s)) if s else np.empty(0, np.int64)) for s in shards]
    return out


# Randomness ------------------------------------------------------------------------------------
# Streams are keyed by (seed, purpose, worker, step) so a worker's numbers do not depend on how
# workers are grouped into batches or actors.
PURPOSE_BATCH, PURPOSE_NOISE, PURPOSE_ATTACK, PURPOSE_PERTURB, PURPOSE_GAR = 1, 2, 3, 4, 5


def stream_seed(seed: int, purpose: int, worker: int, step: int) -> int:
    """A 63-bit seed for the stream (seed, purpose, worker, step): numpy's
    ``SeedSequence([seed, purpose, worker, step]).generate_state(1, uint64)[0] >> 1``."""
    return stream_seeds(seed, purpose, [worker], step)[0]


def stream_seeds(seed: int, purpose: int, workers: Sequence[int], step: int) -> list[int]:
    """:func:`stream_seed` of each worker. For keys whose four fields fit 32 bits (every key a
    run makes) SeedSequence's hash runs as plain integer arithmetic (:func:`_hash_key`), about
    half the time of building a SeedSequence object (~25 us; a step builds one per honest
    worker for its noise); larger fields go through numpy's SeedSequence itself.
    tests/test_training.py checks both against numpy."""
    if 0 <= seed <= _MASK32 and 0 <= purpose <= _MASK32 and 0 <= step <= _MASK32:
        return [_hash_key(seed, purpose, w, step) if 0 <= w <= _MASK32 else _numpy_seed(seed, purpose, w, step)
                for w in workers]
    return [_numpy_seed(seed, purpose, w, step) for w in workers]


def _numpy_seed(seed: int, purpose: int, worker: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, purpose, worker, step]).generate_state(1, np.uint64)[0] >> 1)


# numpy.random.SeedSequence's constants (numpy/random/bit_generator.pyx; after M.E. O'Neill's
# seed_seq_fe, https://www.pcg-random.org/posts/developing-a-seed_seq-alternative.html)
_MASK32 = 0xFFFF_FFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0_D7E5, 0x931E_8875, 0x8B51_F9DD, 0x58F3_8DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01_F9DD, 0x4973_F715
# The hash constant steps the same way whatever the data (4 + 12 hashmix calls for a pool of 4
# words), so its values are fixed: call i xors with _HASH_A[i] and multiplies by _HASH_A[i + 1].
_HASH_A = tuple((_INIT_A * pow(_MULT_A, i, 1 << 32)) & _MASK32 for i in range(17))
_HASH_B = tuple((_INIT_B * pow(_MULT_B, i, 1 << 32)) & _MASK32 for i in range(3))
_MIX_ORDER = tuple((src, dst) for src in range(4) for dst in range(4) if src != dst)


def _hash_key(*words: int) -> int:
    """``SeedSequence(list(words)).generate_state(1, uint64)[0] >> 1`` for four 32-bit words (an
    entropy of exactly the pool size, so each word enters the pool once): hashmix each word
    into the pool, mix every pool word into every other, then draw two 32-bit words, low first.
    Python integers masked to 32 bits; the steps as in numpy's bit_generator.pyx."""
    pool = []
    for i, w in enumerate(words):
        v = ((w ^ _HASH_A[i]) * _HASH_A[i + 1]) & _MASK32
        pool.append(v ^ (v >> 16))
    for i, (src, dst) in enumerate(_MIX_ORDER, start=4):
        v = ((pool[src] ^ _HASH_A[i]) * _HASH_A[i + 1]) & _MASK32
        v ^= v >> 16
        mixed = (_MIX_MULT_L * pool[dst] - _MIX_MULT_R * v) & _MASK32
        pool[dst] = mixed ^ (mixed >> 16)
    lo = ((pool[0] ^ _HASH_B[0]) * _HASH_B[1]) & _MASK32
    hi = ((pool[1] ^ _HASH_B[1]) * _HASH_B[2]) & _MASK32
    return (((hi ^ (hi >> 16)) << 32) | (lo ^ (lo >> 16))) >> 1


def sample_batch(m: int, b: int, seed: int, worker: int, step: int) -> np.ndarray:
    """b indices drawn without replacement from range(m) (001: subsampling without replacement).

    numpy's Generator.choice uses a set-based draw for b << m, so this costs O(b), not O(m).
    The generator is Philox keyed directly by (seed, purpose, worker, step): a counter-based
    generator gives independent streams for distinct keys (Salmon et al., SC 2011) without
    hashing a seed first. default_rng(stream_seed(...)) hashed twice (two SeedSequences): 111
    vs 53 us per worker and step, ~0.7 ms of a b = 25 step with 12 workers. The Philox object
    is built once per thread and re-keyed (:func:`_keyed_generator`): the same stream as a
    fresh ``Philox(key=...)``, without the OS entropy a new one reads for a seed it ignores.
    """
    return _keyed_generator(_philox_key(seed, PURPOSE_BATCH, worker, step)).choice(m, size=b, replace=False)


def _philox_key(seed: int, purpose: int, worker: int, step: int) -> list[int]:
    """Philox's 128-bit key: the seed (mod 2^64) in one word, purpose | worker | step packed in
    the other (8, 24 and 32 bits); fields too large for that go through stream_seed instead."""
    if 0 <= purpose < 1 << 8 and 0 <= worker < 1 << 24 and 0 <= step < 1 << 32:
        return [seed % (1 << 64), (purpose << 56) | (worker << 32) | step]
    return [seed % (1 << 64), stream_seed(seed, purpose, worker, step)]


_PHILOX = threading.local()
_ZEROS4 = np.zeros(4, dtype=np.uint64)


def _keyed_generator(key: list[int]) -> np.random.Generator:
    """This thread's numpy Generator on Philox, reset to ``key`` and counter 0: it then draws
    exactly what ``np.random.Generator(np.random.Philox(key=key))`` draws (buffered words
    dropped), at half the cost of building one (tests/test_training.py checks the equality)."""
    gen = getattr(_PHILOX, "generator", None)
    if gen is None:
        gen = _PHILOX.generator = np.random.Generator(np.random.Philox(key=[0, 0]))
    gen.bit_generator.state = {
        "bit_generator": "Philox",
        # converted as Philox(key=...) converts it (np.asarray, then uint64), so that a key
        # numpy reads through float64 (a word above 2^63 next to one below) stays the same
        "state": {"counter": _ZEROS4, "key": np.asarray(key).astype(np.uint64)},
        "buffer": _ZEROS4,
        "buffer_pos": 4,
        "has_uint32": 0,
        "uinteger": 0,
    }
    return gen


def torch_generator(seed: int, purpose: int, worker: int, step: int, device: str | torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded :func:`stream_seed` (seed, purpose, worker, step)."""
    return torch_generators(seed, purpose, [worker], step, device)[0]


def torch_generators(seed: int, purpose: int, workers: Sequence[int], step: int,
                     device: str | torch.device) -> list[torch.Generator]:
    """:func:`torch_generator` of each worker (the same generators; the seeds hashed together)."""
    out = []
    for s in stream_seeds(seed, purpose, workers, step):
        g = torch.Generator(device=device)
        g.manual_seed(s)
        out.append(g)
    return out
