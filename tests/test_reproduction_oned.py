"""Paper 003, Figure 1 (examples/oned_quadratic.py): on f_i(x) = (x - a_i)^2 / 2, a = (1, 2, 10),
signSGD and medianSGD, run with tuneguard's own GARs, stall at the median 2 where the true
gradient is still 7/3; with noise b * xi on each worker's gradient they move to the mean 13/3.
Deterministic (seeded generators); a few seconds in all."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tuneguard.aggregators import aggregate

_PATH = Path(__file__).resolve().parents[1] / "examples" / "oned_quadratic.py"
_spec = importlib.util.spec_from_file_location("oned_quadratic", _PATH)
oned = importlib.util.module_from_spec(_spec)
sys.modules["oned_quadratic"] = oned  # dataclasses resolve the module by name
_spec.loader.exec_module(oned)

LR = 0.02


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only add contention (10x slower on a busy 2-core box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
GAP = oned.MEAN - oned.MEDIAN  # 7/3: the true gradient's size where the median gradient vanishes


@functools.cache
def _noisy_median(b: float) -> oned.Trajectory:
    return oned.run("medianSGD", b, steps=1200, lr=LR, chains=16, seed=1)


def test_the_example_is_the_papers():
    assert oned.A == (1.0, 2.0, 10.0)
    assert oned.MEDIAN == 2.0
    assert oned.MEAN == pytest.approx(13 / 3)


@pytest.mark.parametrize("algorithm", ["signSGD", "medianSGD"])
def test_plain_algorithms_stall_at_the_median(algorithm):
    tr = oned.run(algorithm, 0.0, steps=600, lr=LR, chains=1)
    x = tr.xs[-50:, 0]
    if algorithm == "signSGD":
        # sign steps of size lr: it reaches 2 after ~100 steps and oscillates within one step of it
        assert (x - oned.MEDIAN).abs().max() <= LR + 1e-9
    else:
        # x_t - 2 = (1 - lr)^t (x0 - 2): it converges to 2 exactly
        assert (x - oned.MEDIAN).abs().max() < 1e-3
    # ... where the true gradient f'(x) = x - 13/3 is still about -7/3: not a stationary point of f
    assert tr.true_gradient()[-50:].min() > GAP - LR - 1e-9
    assert tr.median_gradient()[-1] <= LR + 1e-9


@pytest.mark.parametrize("algorithm", ["signSGD", "medianSGD"])
def test_noise_moves_them_to_the_mean(algorithm):
    if algorithm == "signSGD":
        # its expected step, lr * (1 - 2 P[median < 0]), shrinks with b: a larger lr settles it sooner
        noisy = oned.run(algorithm, 10.0, steps=1000, lr=0.05, chains=16, seed=0)
    else:
        noisy = _noisy_median(10.0)
    settled = noisy.tail_mean(0.4)
    # the gap to the optimum shrinks from 7/3 to a few tenths (the b = 10 fixed point is ~4.17)
    assert abs(settled - oned.MEAN) < 0.4, settled
    assert settled > oned.MEDIAN + 1.5, settled
    # and every chain left the median behind
    assert noisy.xs[-300:].mean(dim=0).min() > 3.3


def test_more_noise_closes_more_of_the_gap():
    # medianSGD's fixed point with noise b: E[median(x - a_i + b xi_i)] = 0. b = 3 gives ~3.17, b = 10 ~4.16
    small = _noisy_median(3.0).tail_mean(0.4)
    large = _noisy_median(10.0).tail_mean(0.4)
    assert oned.MEDIAN + 0.7 < small < oned.MEAN - 0.7, small
    assert abs(large - oned.MEAN) < abs(small - oned.MEAN) - 0.5, (small, large)


def test_fixed_point_matches_the_simulation():
    pred = oned.fixed_point("medianSGD", 3.0, samples=20_000)
    assert 3.0 < pred < 3.35, pred  # well between the median 2 and the mean 13/3
    sim = _noisy_median(3.0).tail_mean(0.4)
    assert sim == pytest.approx(pred, abs=0.15)


def test_sign_majority_is_the_sign_of_the_median():
    # 003 Proposition 1 (odd n, nonzero median), checked on tuneguard's two rules
    g = torch.Generator().manual_seed(0)
    v = torch.randn(7, 1000, generator=g, dtype=torch.float64)
    assert torch.equal(aggregate("sign_majority", v, 0), aggregate("median", v, 0).sign())
