"""Models and datasets given to tuneguard by import path (``plugin_fixtures:NAME``) in tests."""

from __future__ import annotations

import torch
from torch import nn


def bn_net(input_shape, num_classes):
    """A CNN with BatchNorm: must be refused, naming ``features.1``."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(c, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Flatten(), nn.LazyLinear(num_classes),
    )


def prelu_net(input_shape, num_classes, hidden: int = 8):
    """PReLU has a parameter and no ghost-norm rule: the generic path, with a notice."""
    d = 1
    for v in input_shape:
        d *= v
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.PReLU(), nn.Linear(hidden, num_classes))


def wrong_output(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes + 1))


def blobs(n: int = 600, dim: int = 5, classes: int = 3, seed: int = 0):
    """Gaussian blobs as (train, test) TensorDatasets: a vector-input dataset."""
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    cut = n - n // 5
    ds = torch.utils.data.TensorDataset
    return ds(x[:cut], y[:cut]), ds(x[cut:], y[cut:])
