"""Per-example clipped gradients: fast (ghost-norm) and generic (torch.func) paths against an
independent oracle, a per-example autograd loop written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tuneguard.privacy import clipped_gradients, supports_fast_path

W, B = 3, 7


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.Tanh(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10),
    )


def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Oracle: one autograd backward per example. Returns per-example gradients [W, b, d]
    (flattened in parameters() order) and per-worker mean losses [W]."""
    params = list(model.parameters())
    grads, losses = [], []
    for w in range(x.shape[0]):
        gw, lw = [], []
        for i in range(x.shape[1]):
            loss = F.cross_entropy(model(x[w, i : i + 1]), y[w, i : i + 1])
            gw.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]))
            lw.append(loss.detach())
        grads.append(torch.stack(gw))
        losses.append(torch.stack(lw).mean())
    return torch.stack(grads), torch.stack(losses)


def clip_mean(per: torch.Tensor, clip: float | None) -> torch.Tensor:
    """The clipped per-worker mean, written out: g_i * min(1, C / (||g_i|| + 1e-6)), averaged."""
    if clip is None:
        return per.mean(1)
    scale = (clip / (per.norm(dim=2) + 1e-6)).clamp(max=1.0)
    return (per * scale[..., None]).mean(1)


def data(shape=(1, 28, 28), dtype=torch.float64, seed=0, w=W, b=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(w, b, *shape, generator=g, dtype=dtype), torch.randint(0, 10, (w, b), generator=g)


def mid_clip(norms: torch.Tensor) -> float:
    """A clip between the smallest and the largest per-example norm: some clipped, some not."""
    c = float(norms.flatten().median())
    assert (norms > c).any() and (norms < c).any()
    return c


@pytest.fixture(scope="module")
def mlp64():
    torch.manual_seed(0)
    model = mlp().double()
    x, y = data()
    per, loss = per_example(model, x, y)
    return model, x, y, per, loss


def test_fast_generic_and_naive_agree_with_partial_clipping(mlp64):
    # float64 so that the three computations agree to ~1e-12: any gap above that is a bug,
    # not rounding (float32 is checked separately with float32 tolerances)
    model, x, y, per, loss = mlp64
    norms = per.norm(dim=2)
    c = mid_clip(norms)
    oracle = clip_mean(per, c)
    fast = clipped_gradients(model, x, y, c, method="fast")
    gen = clipped_gradients(model, x, y, c, method="generic")
    for res in (fast, gen):
        assert res.grads.shape == (W, sum(p.numel() for p in model.parameters()))
        torch.testing.assert_close(res.grads, oracle, rtol=0, atol=1e-10)
        torch.testing.assert_close(res.loss, loss, rtol=0, atol=1e-10)
        torch.testing.assert_close(res.norm_mean, norms.mean(1), rtol=0, atol=1e-9)
        torch.testing.assert_close(res.clipped_frac, (norms > c).double().mean(1))
    assert 0 < float(fast.clipped_frac.mean()) < 1
    torch.testing.assert_close(fast.grads, gen.grads, rtol=0, atol=1e-12)
    # every clipped example contributes at most C, so a worker's mean has norm <= C
    assert (fast.grads.norm(dim=1) <= c * (1 + 1e-9)).all()


def test_float32_agrees_within_float32_rounding():
    # float32: products over 784 inputs accumulate ~1e-7 relative error per term; gradients
    # here are O(0.1), so 1e-5 absolute is ~100x the rounding and far below any real bug
    torch.manual_seed(1)
    model = mlp()
    x, y = data(dtype=torch.float32, seed=1)
    per, _ = per_example(model.double(), x.double(), y)
    model.float()
    c = mid_clip(per.norm(dim=2))
    oracle = clip_mean(per, c)
    fast = clipped_gradients(model, x, y, c, method="fast")
    gen = clipped_gradients(model, x, y, c, method="generic")
    assert fast.grads.dtype == torch.float32
    torch.testing.assert_close(fast.grads, gen.grads, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.grads.double(), oracle, rtol=0, atol=1e-5)


def test_no_clip_equals_plain_mean_gradient_per_worker(mlp64):
    model, x, y, per, _ = mlp64
    norms = per.norm(dim=2)
    for method in ("fast", "generic"):
        res = clipped_gradients(model, x, y, None, method=method)
        for w in range(W):
            model.zero_grad()
            F.cross_entropy(model(x[w]), y[w]).backward()
            plain = torch.nn.utils.parameters_to_vector([p.grad for p in model.parameters()])
            torch.testing.assert_close(res.grads[w], plain, rtol=0, atol=1e-12)
        # norms are still reported exactly, nothing counts as clipped
        torch.testing.assert_close(res.norm_mean, norms.mean(1), rtol=0, atol=1e-9)
        assert (res.clipped_frac == 0).all()
    model.zero_grad(set_to_none=True)


def test_cnn_generic_and_ghost_match_naive_loop():
    torch.manual_seed(2)
    model = cnn().double()
    x, y = data(shape=(1, 14, 14), seed=2)
    assert supports_fast_path(model)  # Conv2d + Linear: the ghost path (tests/test_clipping_conv.py)
    per, loss = per_example(model, x, y)
    c = mid_clip(per.norm(dim=2))
    oracle = clip_mean(per, c)
    for method in ("generic", "auto", "fast", "ghost"):
        res = clipped_gradients(model, x, y, c, method=method)
        torch.testing.assert_close(res.grads, oracle, rtol=0, atol=1e-10)
        torch.testing.assert_close(res.loss, loss, rtol=0, atol=1e-10)


def test_fast_refuses_a_layer_without_a_norm_rule():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.PReLU(4), nn.Flatten(), nn.Linear(4 * 12 * 12, 10)).double()
    x, y = data(shape=(1, 14, 14), seed=2)
    assert not supports_fast_path(model)
    with pytest.raises(ValueError, match=r"method='fast' needs an MLP .*layer '1' \(PReLU\)"):
        clipped_gradients(model, x, y, 1.0, method="fast")
    per, _ = per_example(model, x, y)
    res = clipped_gradients(model, x, y, 1.0)  # auto: the generic path
    torch.testing.assert_close(res.grads, clip_mean(per, 1.0), rtol=0, atol=1e-10)


def test_generic_chunking_gives_the_same_result(mlp64, monkeypatch):
    from tuneguard.privacy import clipping

    model, x, y, per, _ = mlp64
    c = mid_clip(per.norm(dim=2))
    whole = clipped_gradients(model, x, y, c, method="generic")
    # chunks of 5 examples: chunk borders fall inside workers' batches (b = 7)
    monkeypatch.setattr(clipping, "GENERIC_CHUNK_BYTES", 5 * 8 * 79510)
    chunked = clipped_gradients(model, x, y, c, method="generic")
    torch.testing.assert_close(chunked.grads, whole.grads, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "layers",
    [
        [nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 7, bias=False), nn.Sigmoid(), nn.Linear(7, 5)],
        [nn.Linear(12, 8), nn.LeakyReLU(0.1), nn.Identity(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 4)],
        [nn.Linear(12, 4, bias=False)],
    ],
    ids=["tanh-sigmoid-nobias", "leaky-identity-deep", "linear-only"],
)
def test_fast_path_other_activations_and_vector_inputs(layers):
    torch.manual_seed(3)
    model = nn.Sequential(*layers).double()
    assert supports_fast_path(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(W, B, 12, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, layers[-1].out_features if isinstance(layers[-1], nn.Linear) else 4, (W, B), generator=g)
    per, _ = per_example(model, x, y)
    c = mid_clip(per.norm(dim=2))
    oracle = clip_mean(per, c)
    res = clipped_gradients(model, x, y, c, method="fast")
    torch.testing.assert_close(res.grads, oracle, rtol=0, atol=1e-10)


def test_supports_fast_path():
    from tuneguard.privacy.clipping import _fast_layers

    # the MLP path: nn.Sequential of an optional leading Flatten, Linear and activations
    assert _fast_layers(mlp()) is not None
    assert _fast_layers(nn.Sequential(nn.Linear(3, 2))) is not None
    assert _fast_layers(cnn()) is None
    assert _fast_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 2))) is None
    assert _fast_layers(nn.Sequential(nn.Flatten(start_dim=2), nn.Linear(4, 2))) is None
    shared = nn.Linear(4, 4)
    assert _fast_layers(nn.Sequential(shared, nn.ReLU(), shared)) is None
    # everything whose parameters sit in layers with a ghost-norm rule is fast too
    for model in (mlp(), cnn(), nn.Linear(3, 2), nn.Sequential(shared, nn.ReLU(), shared),
                  nn.Sequential(nn.Flatten(start_dim=2), nn.Linear(4, 2))):
        assert supports_fast_path(model)
    assert not supports_fast_path(nn.Sequential(nn.ReLU()))  # no parameters
    assert not supports_fast_path(nn.Sequential(nn.Linear(3, 3), nn.PReLU()))


def test_model_is_left_untouched(mlp64):
    model, x, y, _, _ = mlp64
    before = [p.detach().clone() for p in model.parameters()]
    for method in ("fast", "generic"):
        clipped_gradients(model, x, y, 1.0, method=method)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_bad_inputs_are_clear_errors(mlp64):
    model, x, y, _, _ = mlp64
    with pytest.raises(ValueError, match=r"clip=0 is not allowed"):
        clipped_gradients(model, x, y, 0)
    with pytest.raises(ValueError, match=r"x must be \[W, b, \*input_shape\]"):
        clipped_gradients(model, x[:, :3], y, 1.0)
    with pytest.raises(ValueError, match="integer class labels"):
        clipped_gradients(model, x, y.double(), 1.0)
    with pytest.raises(ValueError, match="method='nope' is not known"):
        clipped_gradients(model, x, y, 1.0, method="nope")
    bn = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.Linear(8, 10)).double()
    with pytest.raises(ValueError, match="BatchNorm1d in training mode"):
        clipped_gradients(bn, x, y, 1.0)


@settings(max_examples=15, deadline=None)
@given(clip=st.floats(0.01, 50.0), seed=st.integers(0, 2**16))
def test_property_worker_mean_norm_bounded_by_clip(clip, seed):
    # triangle inequality: each clipped example has norm <= C, so does their mean
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(2, 4, 6, generator=g, dtype=torch.float64) * 5
    y = torch.randint(0, 3, (2, 4), generator=g)
    fast = clipped_gradients(model, x, y, clip, method="fast")
    gen = clipped_gradients(model, x, y, clip, method="generic")
    assert (fast.grads.norm(dim=1) <= clip * (1 + 1e-9)).all()
    torch.testing.assert_close(fast.grads, gen.grads, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(mlp64):
    model, x, y, per, _ = mlp64
    c = mid_clip(per.norm(dim=2))
    cpu = clipped_gradients(model, x, y, c, method="fast")
    model_gpu = mlp().double().cuda()
    model_gpu.load_state_dict(model.state_dict())
    for method in ("fast", "generic"):
        res = clipped_gradients(model_gpu, x.cuda(), y.cuda(), c, method=method)
        assert res.grads.is_cuda and res.loss.is_cuda
        torch.testing.assert_close(res.grads.cpu(), cpu.grads, rtol=0, atol=1e-10)
