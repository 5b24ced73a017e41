"""The ghost path (conv nets, GroupNorm, Embedding, ...) against the generic torch.func path and
an independent per-example autograd loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuneguard.models import build_model
from tuneguard.privacy import clipped_gradients, clipping


def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Oracle: one autograd backward per example; [W, b, d] in parameters() order."""
    params = list(model.parameters())
    rows = []
    for w in range(x.shape[0]):
        rows.append(torch.stack([
            torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(model(x[w, i : i + 1]), y[w, i : i + 1]), params)])
            for i in range(x.shape[1])
        ]))
    return torch.stack(rows)


def clip_mean(per: torch.Tensor, c: float) -> torch.Tensor:
    return (per * (c / (per.norm(dim=2) + 1e-6)).clamp(max=1.0)[..., None]).mean(1)


class TextNet(nn.Module):
    """Embedding (with padding_idx, used twice), LayerNorm, a Linear over a sequence, Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 5, 3, padding="same")
        self.out = nn.Linear(5, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.norm(self.emb(t))))  # [n, T, 6]: a 3-D Linear input
        h = h + self.emb(t)  # the embedding's second call: its gradients add up
        return self.out(self.conv(h.transpose(1, 2)).mean(2))


def odd_convs() -> nn.Module:
    """Grouped, strided, asymmetrically padded, dilated and 'same' convs; an in-place ReLU on a
    conv's output; GroupNorm; a Linear used twice (tied weights)."""
    shared = nn.Linear(10, 10)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2, padding=(1, 2), stride=2), nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 2, dilation=2, padding="same", bias=False), nn.GroupNorm(2, 6),
        nn.Flatten(), nn.Linear(6 * 7 * 8, 10), shared, nn.Tanh(), shared,
    )


CASES = {
    "cnn": (lambda: build_model("cnn", 0), (1, 28, 28), 10),
    "convnet": (lambda: build_model("convnet", 0), (1, 28, 28), 10),
    "resnet_gn": (lambda: build_model("resnet_gn", 0, input_shape=(3, 12, 12), params={"width": 4}), (3, 12, 12), 10),
    "odd_convs": (odd_convs, (2, 13, 14), 10),
}


@pytest.mark.parametrize("grouped", [False, True], ids=["im2col", "grouped-kernel"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_ghost_equals_generic_and_the_naive_loop_float64(name, grouped, monkeypatch):
    # the direct formula by im2col + bmm, or by the grouped weight-gradient kernel, for every layer
    monkeypatch.setattr(clipping, "GROUPED_MIN_POSITIONS", 0 if grouped else 10**9)
    monkeypatch.setattr(clipping, "GROUPED_MIN_CHANNELS", 0)
    build, shape, classes = CASES[name]
    torch.manual_seed(0)
    model = build().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (3, 4), generator=g)
    per = per_example(model, x, y)
    norms = per.norm(dim=2)
    s = norms.flatten().sort().values
    c = float(s[5] + s[6]) / 2  # half the examples clipped, no norm near the threshold
    assert (norms > c).any() and (norms < c).any()
    ghost = clipped_gradients(model, x, y, c, method="ghost")
    generic = clipped_gradients(model, x, y, c, method="generic")
    torch.testing.assert_close(ghost.grads, clip_mean(per, c), rtol=0, atol=1e-12)
    torch.testing.assert_close(ghost.grads, generic.grads, rtol=0, atol=1e-12)
    torch.testing.assert_close(ghost.norm_mean, norms.mean(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(ghost.loss, generic.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(ghost.clipped_frac, (norms > c).double().mean(1), rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())  # the model is left untouched
    again = clipped_gradients(model, x, y, c, method="ghost")  # a second step (odd_convs: straight to the copying run)
    torch.testing.assert_close(again.grads, ghost.grads, rtol=0, atol=0)


def test_ghost_equals_generic_on_token_inputs():
    torch.manual_seed(0)
    model = TextNet().double()
    x = torch.randint(0, 20, (3, 4, 7), generator=torch.Generator().manual_seed(2))
    x[0, 0, :3] = 0  # padding tokens get no gradient
    y = torch.randint(0, 3, (3, 4), generator=torch.Generator().manual_seed(3))
    per = per_example(model, x, y)
    c = float(per.norm(dim=2).median())
    ghost = clipped_gradients(model, x, y, c)  # auto picks the ghost path
    torch.testing.assert_close(ghost.grads, clip_mean(per, c), rtol=0, atol=1e-12)


def test_fp32_tolerance_on_the_shipped_cnn():
    torch.manual_seed(0)
    model = build_model("convnet", 0)
    x = torch.randn(4, 16, 1, 28, 28)
    y = torch.randint(0, 10, (4, 16))
    fast = clipped_gradients(model, x, y, 0.5)
    generic = clipped_gradients(model, x, y, 0.5, method="generic")
    scale = generic.grads.abs().max()
    torch.testing.assert_close(fast.grads, generic.grads, rtol=0, atol=2e-6 * float(scale))
    torch.testing.assert_close(fast.norm_mean, generic.norm_mean, rtol=1e-5, atol=0)


@pytest.mark.parametrize("keep", [True, False])
def test_chunking_and_both_formulas_give_the_same_numbers(monkeypatch, keep):
    """Tiny chunks (borders inside a worker's batch), per-example gradients kept or not, and the
    ghost and direct formulas forced in turn: all the same numbers."""
    torch.manual_seed(0)
    model = build_model("convnet", 0).double()
    x = torch.randn(2, 5, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (2, 5))
    ref = clipped_gradients(model, x, y, 0.3, method="generic")
    monkeypatch.setattr(clipping, "GHOST_CHUNK_BYTES", 3 * 8 * 64 * 196)  # ~3 examples per chunk
    monkeypatch.setattr(clipping, "KEEP_PER_EXAMPLE_BYTES", 2**40 if keep else 0)
    res = clipped_gradients(model, x, y, 0.3, method="ghost")
    torch.testing.assert_close(res.grads, ref.grads, rtol=0, atol=1e-12)
    for formula in ("ghost", "direct"):  # each formula for every conv, whatever the cost rule says
        monkeypatch.setattr(clipping, "_FORCE_FORMULA", formula)
        res = clipped_gradients(model, x, y, 0.3, method="ghost")
        torch.testing.assert_close(res.grads, ref.grads, rtol=0, atol=1e-12)


def test_out_buffer_is_fully_overwritten():
    """A reused output buffer holding garbage: every block is written, also for a layer whose
    output does not reach the loss (zero gradient)."""

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.dead = nn.Linear(3, 3)
            self.head = nn.Linear(2 * 6 * 6, 4)

        def forward(self, x):
            self.dead(torch.zeros(1, 3, dtype=x.dtype))  # called, but its output is discarded
            return self.head(torch.relu(self.conv(x)).flatten(1))

    model = Unused().double()
    x = torch.randn(2, 3, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 3))
    d = sum(p.numel() for p in model.parameters())
    out = torch.full((2, d), float("nan"), dtype=torch.float64)
    res = clipped_gradients(model, x, y, 1.0, method="ghost", out=out)
    ref = clipped_gradients(model, x, y, 1.0, method="generic")
    torch.testing.assert_close(res.grads, ref.grads, rtol=0, atol=1e-12)


def test_unsupported_layers_fall_back_with_the_layer_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.PReLU(2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    why = clipping.fast_path_blocker(model)
    assert why is not None and "layer '1' (PReLU)" in why and "generic path" in why
    assert clipping.fast_path_blocker(build_model("resnet_gn", 0, input_shape=(3, 8, 8))) is None
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    assert "BatchNorm2d mixes the examples" in clipping.fast_path_blocker(bn)


def _gn_net(offset: float) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        conv.bias.fill_(offset)  # the first GroupNorm's input mean
    model = nn.Sequential(conv, nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.GroupNorm(2, 4),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 5))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("one_pass", [True, False], ids=["sums", "x_hat"])
def test_group_norm_affine_norms_both_ways_fp32(monkeypatch, one_pass):
    """GroupNorm's per-example affine gradients from per-channel sums (one pass) or from the
    normalised input: both equal torch.func to fp32 tolerance."""
    monkeypatch.setattr(clipping, "GN_ONE_PASS_MAX", float("inf") if one_pass else -1.0)
    model = _gn_net(0.0)
    x = torch.randn(3, 6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(2))
    fast = clipped_gradients(model, x, y, 0.5, method="ghost")
    ref = clipped_gradients(model, x, y, 0.5, method="generic")
    torch.testing.assert_close(fast.grads, ref.grads, rtol=0, atol=2e-6 * float(ref.grads.abs().max()))
    torch.testing.assert_close(fast.norm_mean, ref.norm_mean, rtol=1e-5, atol=0)


def test_group_norm_with_a_mean_that_dwarfs_the_spread(monkeypatch):
    """Inputs with mean 300 and spread ~1 at the first GroupNorm: the guard sends it to the x_hat
    route (as forcing it does), within what fp32 GroupNorm itself offers of torch.func."""
    model = _gn_net(300.0)
    x = torch.randn(3, 6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(2))
    fast = clipped_gradients(model, x, y, 0.5, method="ghost")
    monkeypatch.setattr(clipping, "GN_ONE_PASS_MAX", -1.0)
    forced = clipped_gradients(model, x, y, 0.5, method="ghost")
    scale = float(forced.grads.abs().max())  # not bit-equal: the second GroupNorm (mean ~0) takes the sums
    torch.testing.assert_close(fast.grads, forced.grads, rtol=0, atol=1e-6 * scale)
    ref = clipped_gradients(model, x, y, 0.5, method="generic")
    torch.testing.assert_close(fast.grads, ref.grads, rtol=0, atol=1e-4 * float(ref.grads.abs().max()))


def test_group_norm_sums_fall_back_when_ill_conditioned():
    gn = nn.GroupNorm(2, 4)
    g = torch.randn(5, 4, 6, 6)
    assert clipping._group_norm_sums(gn, torch.randn(5, 4, 6, 6), g, 5) is not None
    assert clipping._group_norm_sums(gn, torch.randn(5, 4, 6, 6) + 1e4, g, 5) is None  # mu^2 / var ~ 1e8


def test_layer_with_a_call_that_does_not_reach_the_loss():
    """A conv called twice, one output discarded: its gradient is that of the other call."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.head = nn.Linear(2 * 6 * 6, 4)

        def forward(self, x):
            self.conv(x * 2)  # discarded
            return self.head(torch.tanh(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    model = Twice().double()
    x = torch.randn(2, 3, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 3))
    res = clipped_gradients(model, x, y, 0.1, method="ghost")
    ref = clipped_gradients(model, x, y, 0.1, method="generic")
    torch.testing.assert_close(res.grads, ref.grads, rtol=0, atol=1e-12)
