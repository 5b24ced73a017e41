"""Your own model and your own data in a tuneguard tune job.

    python examples/custom_model.py            # a 2-trial tune job, about a minute on 2 cores
    PYTHONPATH=examples tuneguard train configs/mnist_001.yaml \\
        --set model=custom_model:GNNet --set model_params.width=8 \\
        --set dataset=custom_model:stripes --set f=0 --set attack=none --set privacy.mode=none

A model is named by import path ``package.module:callable`` and built as
``callable(input_shape, num_classes, **model_params)``; a dataset callable returns train and
test tensors (or torch datasets). Both are imported again in every process that trains (Ray
Tune trials, Ray actors), so the module must be importable there: install your package, or put
its folder on ``PYTHONPATH`` before Ray starts (as the commands above do for this file; Ray
workers of a local cluster inherit the environment of the process that starts it).

``GNNet`` uses GroupNorm, not BatchNorm: BatchNorm mixes the examples of a batch, so DP-SGD's
per-example clipping is undefined for it and tuneguard refuses it, naming the layer.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


class GNNet(nn.Module):
    """Two 3x3 convs with GroupNorm and (in-place) ReLU, global average pooling, a Linear head.

    Every parameter sits in a Conv2d, GroupNorm or Linear layer, so tuneguard clips it on the
    fast path (ghost norms + book-keeping), without per-example gradients.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 8, groups: int = 2) -> None:
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(groups, 2 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def stripes(n: int = 1800, size: int = 12, classes: int = 4, noise: float = 0.5, seed: int = 0):
    """A generated image dataset, no files needed: class k is a grating at angle k pi / classes
    with a random phase, plus Gaussian noise. Returns (train_x, train_y, test_x, test_y), the
    last sixth held out."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = y.float() * math.pi / classes
    phase = torch.rand(n, generator=g) * 2 * math.pi
    wave = torch.cos(
        (xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]) * 1.2 + phase[:, None, None]
    )
    x = (wave + noise * torch.randn(n, size, size, generator=g)).unsqueeze(1)
    cut = n - n // 6
    return x[:cut], y[:cut], x[cut:], y[cut:]


SPACE = {
    "description": "custom model + custom data: GNNet on generated stripes, n=5, f=1",
    "base": {
        "name": "tuneguard-custom-model",
        "dataset": "custom_model:stripes",
        "dataset_params": {"n": 1800},
        "model": "custom_model:GNNet",
        "n_workers": 5,
        "steps": 30,
        "eval_every": 10,
        "momentum": 0.9,
        "clip": 1.0,
        "engine": "local",
    },
    "scenario": {"f": 1, "attacks": ["little"], "privacy": {"mode": "total", "total_eps": 8.0, "delta": 1e-5}},
    "search": {
        "model_params.width": [4, 8],
        "lr": {"loguniform": [0.05, 0.5]},
        "batch_size": {"logint": [16, 64]},
    },
    "tune": {"mode": "optuna", "num_samples": 2, "seed": 0, "scheduler": "none"},
}


def main() -> None:
    from tuneguard.tune.search import start_job
    from tuneguard.tune.space import Space

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # this process imports custom_model ...
        sys.path.insert(0, here)
    # ... and so must the Ray workers that run the trials: they inherit this environment
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    space = Space.from_dict(SPACE)
    space.validate()
    summary = start_job(space, progress=False)
    print(f"{summary.completed}/{summary.trials} trials completed; best: {summary.best_config}")


if __name__ == "__main__":
    main()
