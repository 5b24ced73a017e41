r"""Per-example clipped gradients for all honest workers at once (step 2 of Algorithm 1, 001).

For worker :math:`w` with batch :math:`B_w` of b examples and per-example loss
:math:`\ell_i = \mathrm{CE}(f_\theta(x_i), y_i)`:

.. math::
    g_w = \frac{1}{b}\sum_{i \in B_w} s_i\,\nabla_\theta \ell_i, \qquad
    s_i = \min\Big(1, \frac{C}{\lVert\nabla_\theta \ell_i\rVert_2 + 10^{-6}}\Big),

so :math:`\lVert s_i \nabla\ell_i\rVert \le C` and the clipped mean has replace-one
sensitivity :math:`2C/b` (what :mod:`tuneguard.privacy.calibration` assumes). The noise is
added by the caller.

Three implementations, same numbers (to rounding):

``"fast"``, MLPs (ghost norms; nn.Sequential of an optional leading nn.Flatten, nn.Linear and
elementwise activations): one forward over all W*b examples, then the per-example output
gradient :math:`\delta_L = \mathrm{softmax}(z) - \mathrm{onehot}(y)` is back-propagated by
hand. For a Linear layer with input :math:`a_i` and output gradient :math:`\delta_i`, the
per-example weight gradient is the rank-one :math:`\delta_i a_i^\top`, so

.. math:: \lVert\nabla_{W,b}\ell_i\rVert^2 = \lVert\delta_i\rVert^2(\lVert a_i\rVert^2 + 1)

(Goodfellow 2015; the "ghost clipping" of Li et al. 2022 / Opacus), summed over layers,
without building any per-example gradient. The clipped per-worker sums are then batched
matmuls :math:`\sum_i (s_i/b)\,\delta_i a_i^\top`, one [out, in] block per worker.

``"ghost"`` (any architecture whose parameters all sit in Linear, Conv1d/Conv2d, Embedding,
GroupNorm or LayerNorm layers, e.g. CNNs and GroupNorm ResNets): one autograd forward over
all W*b examples with hooks that keep each such layer's input :math:`a_i`, and one backward
of :math:`\sum_i \ell_i` *to the layers' outputs only* (no parameter gradient is formed),
which yields each example's output gradient :math:`\delta_i`; each layer's norms are taken
during that backward, as soon as its :math:`\delta` arrives, so the layer-sized buffers are
freed as in a plain backward. Per-example squared norms, layer by layer, without per-example
gradients where that is cheaper:

- Linear / Conv (input unfolded to :math:`A_i \in \mathbb{R}^{D \times L}`, :math:`D = C_{in}k^2/G`
  per group, :math:`L` output positions; :math:`\Delta_i \in \mathbb{R}^{p \times L}`): the
  weight gradient is :math:`\Delta_i A_i^\top`, and

  .. math:: \lVert \Delta_i A_i^\top\rVert_F^2 = \langle A_i^\top A_i,\ \Delta_i^\top \Delta_i\rangle_F

  (ghost norm: :math:`O(L^2(D + p))`, Li et al. 2022) or the direct product
  (:math:`O(pDL)`); the cheaper one is used per layer, i.e. ghost iff :math:`L(D + p) < pD`
  (the mixed ghost clipping of Bu et al. 2022, "Scalable and Efficient Training of Large
  Convolutional Neural Networks with Differential Privacy", who compare the memory
  :math:`2L^2` vs :math:`pD`; on CPUs time follows the flops). Bias: :math:`\lVert\sum_l \Delta_{i,:,l}\rVert^2`.
- Embedding (tokens :math:`t_{i,1..T}`): :math:`\sum_{u,v} [t_u = t_v]\langle \delta_u, \delta_v\rangle`.
- GroupNorm / LayerNorm affine: per-example gradients are small ([C]); they are formed:
  :math:`\sum (\delta \odot \hat x)` and :math:`\sum \delta` over the positions a weight acts on
  (GroupNorm: from per-channel sums, :math:`r(\sum \delta a - \mu \sum \delta)`, without forming
  :math:`\hat x`, unless the group's mean dwarfs its spread).

The clipped per-worker sums then come from the same :math:`(a_i, \delta_i)` by book-keeping
(Bu et al. 2023, "Differentially Private Optimization on Large Model at Small Cost"): each
layer's weight gradient of the per-worker *weighted* loss :math:`\sum_{i \in B_w} (s_i/b)\ell_i`,
computed by the layer's own weight-gradient kernel on :math:`(s_i/b)\delta_i`, one call per
worker (a conv's weight gradient, a batched matmul for Linear, an index-add for Embedding): no
second backward, no per-example gradient tensor.

``"generic"``: ``torch.func`` (``functional_call`` + ``vmap(grad)``) per-example gradients for
any model without cross-example layers, in chunks that bound memory. ``"auto"`` picks the MLP
path, else the ghost path, else (one line logged by :mod:`tuneguard.models`) the generic one.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WorkerGradients", "clipped_gradients", "fast_path_blocker", "supports_fast_path"]

_EPS = 1e-6  # in the clip factor C / (norm + eps): avoids 0/0 for a zero gradient
_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity)
METHODS = ("auto", "fast", "ghost", "generic")
#: memory the generic path may spend on per-example gradients of one chunk
GENERIC_CHUNK_BYTES = 256 * 2**20


@dataclass
class WorkerGradients:
    """Clipped mean gradients of W workers and statistics of their batches.

    grads: [W, d] each worker's mean of per-example gradients clipped to norm C, flattened
        in ``model.parameters()`` order (as ``torch.nn.utils.parameters_to_vector``); every
        parameter counts, whether or not it requires grad.
    loss: [W] each worker's mean loss on its batch.
    norm_mean: [W] mean unclipped per-example gradient norm (both paths compute the
        per-example norms exactly, also when ``clip`` is None).
    clipped_frac: [W] fraction of examples whose norm exceeded C (0 when ``clip`` is None).
    """

    grads: Tensor
    loss: Tensor
    norm_mean: Tensor
    clipped_frac: Tensor


def _fast_layers(model: nn.Module) -> list[nn.Module] | None:
    if type(model) is not nn.Sequential:
        return None
    layers = list(model)
    if layers and type(layers[0]) is nn.Flatten:
        if (layers[0].start_dim, layers[0].end_dim) != (1, -1):
            return None
        layers = layers[1:]
    if not any(type(layer) is nn.Linear for layer in layers):
        return None
    for layer in layers:
        if type(layer) is not nn.Linear and type(layer) not in _ACTIVATIONS:
            return None
    linears = [layer for layer in layers if type(layer) is nn.Linear]
    if len({id(layer) for layer in linears}) != len(linears):
        return None  # a Linear used twice shares its weight: the ghost norm would not hold
    return layers


def supports_fast_path(model: nn.Module) -> bool:
    """True if per-example clipping of ``model`` runs without materialising per-example
    gradients: an MLP (nn.Sequential of an optional leading nn.Flatten, nn.Linear layers and
    elementwise activations) or any model whose parameters all sit in layers with a ghost-norm
    rule (see :func:`fast_path_blocker`)."""
    return _fast_layers(model) is not None or fast_path_blocker(model) is None


#: what the generic path costs, for the fallback notice (benchmarks/clipping.py, BENCHMARKS.md)
GENERIC_COST = ("per-example gradients materialised by torch.func: 2-3x a non-private step for small CNNs, "
                "100-200x for MLPs, BENCHMARKS.md")


def fast_path_blocker(model: nn.Module) -> str | None:
    """None if the ghost path handles every parameter of ``model``, else one line naming the
    first layer that keeps it on the generic path and what that costs."""
    info = _ghost_plan(model)
    return None if isinstance(info, _GhostPlan) else f"{info}; per-example clipping falls back to the generic path ({GENERIC_COST})"


def _check(params: list[Tensor], x: Tensor, y: Tensor, clip: float | None, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known: choose one of {', '.join(METHODS)}")
    if clip is not None and not (float(clip) > 0):
        raise ValueError(f"clip={clip!r} is not allowed: the clipping norm must be > 0, or None for no clipping")
    if y.dim() != 2:
        raise ValueError(f"y must be [W, b] integer labels, got shape {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must hold integer class labels (int64), got dtype {y.dtype}")
    if x.dim() < 3 or tuple(x.shape[:2]) != tuple(y.shape):
        raise ValueError(
            f"x must be [W, b, *input_shape] with [W, b] = y.shape = {tuple(y.shape)}, got {tuple(x.shape)}"
        )
    if y.shape[1] < 1:
        raise ValueError("each worker needs a batch of at least one example (b >= 1)")
    if not params:
        raise ValueError("the model has no parameters")


def clipped_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    clip: float | None,
    *,
    method: str = "auto",
    out: Tensor | None = None,
) -> WorkerGradients:
    """Per-worker means of per-example gradients clipped to L2 norm ``clip`` (cross-entropy).

    Args:
        model: the shared model (all workers hold the same parameters). Its parameters
            are not modified and their ``.grad`` is not touched.
        x: [W, b, *input_shape] the W workers' batches; y: [W, b] int64 labels.
        clip: the clipping norm C, or None for the plain per-worker mean gradient.
        method: "fast" (the MLP path for MLPs, else the ghost path; see
            :func:`supports_fast_path`), "ghost" (the hook-based ghost path, also for MLPs),
            "generic" (torch.func, any model without batch-statistics layers) or "auto"
            (fast when the model qualifies, else generic).
        out: optional preallocated contiguous [W, d] tensor (parameters' dtype, x's device)
            that receives ``grads``; reusing one across steps saves allocating (and
            page-faulting) W model-sized vectors per step.

    Returns:
        :class:`WorkerGradients`, on x's device, in the parameters' dtype.
    """
    # one traversal of the module tree: at b = 25 each parameters() walk is a visible cost
    params = list(model.parameters())
    _check(params, x, y, clip, method)
    if out is not None:
        d = sum(p.numel() for p in params)
        p0 = params[0]
        if tuple(out.shape) != (y.shape[0], d) or out.dtype != p0.dtype or out.device != x.device or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous [W, d] = [{y.shape[0]}, {d}] tensor of dtype {p0.dtype} on "
                f"{x.device}; got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
    layers = _fast_layers(model)
    mlp_ok = layers is not None and (type(model[0]) is nn.Flatten or x.dim() == 3)
    if method == "generic":
        return _generic(model, x, y, clip, out)
    if mlp_ok and method in ("auto", "fast"):
        return _fast(params, layers, x, y, clip, out)
    plan = _ghost_plan(model)
    if isinstance(plan, _GhostPlan):
        try:
            return _ghost(model, plan, params, x, y, clip, out)
        except _Unsupported as why:
            if method != "auto":
                raise ValueError(f"method={method!r} cannot run this model: {why}. Use method='generic' (or 'auto')") from None
            _note_runtime_fallback(model, str(why))
            return _generic(model, x, y, clip, out)
    if method in ("fast", "ghost"):
        raise ValueError(
            f"method={method!r} needs an MLP (nn.Sequential of an optional leading nn.Flatten, nn.Linear and "
            "elementwise activations) or a model whose parameters all sit in Linear, Conv1d, Conv2d, Embedding, "
            f"GroupNorm or LayerNorm layers; {plan}. Use method='generic' (or 'auto')"
        )
    return _generic(model, x, y, clip, out)


def _act_backward(layer: nn.Module, g: Tensor, pre: Tensor, post: Tensor) -> Tensor:
    """g * d post / d pre for an elementwise activation; may work in place on g (a fresh tensor)."""
    if type(layer) is nn.ReLU:
        # what autograd runs for ReLU: one fused op, no bool mask converted to float
        return torch.ops.aten.threshold_backward(g, post, 0.0)
    if type(layer) is nn.LeakyReLU:
        # not torch.where(cond, 1.0, slope): Python scalars would make it float32
        return g.mul_(torch.ones_like(pre).masked_fill_(pre <= 0, layer.negative_slope))
    if type(layer) is nn.Tanh:
        return g.mul_(1.0 - post * post)
    if type(layer) is nn.Sigmoid:
        return g.mul_(post * (1.0 - post))
    return g  # nn.Identity


def _act(layer: nn.Module, h: Tensor) -> Tensor:
    # functional forms: never in place, since the pre-activation is kept for the backward
    if isinstance(layer, nn.ReLU):
        return torch.relu(h)
    if isinstance(layer, nn.LeakyReLU):
        return F.leaky_relu(h, layer.negative_slope)
    if isinstance(layer, nn.Tanh):
        return torch.tanh(h)
    if isinstance(layer, nn.Sigmoid):
        return torch.sigmoid(h)
    return h


def _clip_coefficients(norms: Tensor, clip: float | None, W: int, b: int) -> tuple[Tensor, Tensor]:
    """(coef [W b], clipped fraction [W]) from the per-example gradient norms: coef_i = s_i / b
    with s_i = min(1, C / (norm_i + eps)) (the 1/b of the batch mean folded in); 1 / b and no
    clipping when ``clip`` is None."""
    if clip is None:
        return torch.full_like(norms, 1.0 / b), torch.zeros(W, dtype=norms.dtype, device=norms.device)
    coef = (norms + _EPS).reciprocal_().mul_(clip / b).clamp_(max=1.0 / b)
    return coef, (norms > clip).view(W, b).sum(1, dtype=norms.dtype).div_(b)


def _offsets(params: list[Tensor]) -> tuple[dict[int, int], int]:
    off, pos = {}, 0
    for p in params:
        off[id(p)] = pos
        pos += p.numel()
    return off, pos


#: weight blocks up to this many elements (all W workers) are computed into a contiguous
#: temporary and copied: ``torch.bmm`` with a strided ``out=`` (a slice of the [W, d] result)
#: falls back to one small matmul per worker, which dominates for small layers
_SMALL_BLOCK = 1 << 18


@torch.no_grad()
def _fast(
    params: list[Tensor], layers: list[nn.Module], x: Tensor, y: Tensor, clip: float | None, out: Tensor | None
) -> WorkerGradients:
    W, b = y.shape
    n = W * b
    dtype = params[0].dtype
    h = x.reshape(n, -1)
    if h.dtype != dtype:
        h = h.to(dtype)
    # forward, keeping each Linear's input and each activation's (pre, post)
    tape: list[tuple[nn.Module, Tensor, Tensor | None]] = []
    for layer in layers:
        if type(layer) is nn.Linear:
            tape.append((layer, h, None))
            h = F.linear(h, layer.weight, layer.bias)
        else:
            post = _act(layer, h)
            tape.append((layer, h, post))
            h = post
    logp = torch.log_softmax(h, dim=1)
    yf = y.reshape(n, 1)
    if yf.dtype != torch.int64:
        yf = yf.long()
    nll = logp.gather(1, yf)  # -loss, [n, 1]
    # per-example dL_i/dlogits for cross-entropy: softmax - onehot (in place on logp)
    g = logp.exp_()
    g.scatter_add_(1, yf, torch.full((n, 1), -1.0, dtype=dtype, device=g.device))

    # backward by hand; per-example squared norms by the ghost-norm identity
    # ||dW_i||^2 + ||db_i||^2 = ||g_i||^2 (||a_i||^2 + 1), summed over the Linear layers
    sq: Tensor | None = None
    saved: list[tuple[nn.Linear, Tensor, Tensor]] = []
    first_linear = next(i for i, (layer, _, _) in enumerate(tape) if type(layer) is nn.Linear)
    for i in range(len(tape) - 1, first_linear - 1, -1):
        layer, inp, post = tape[i]
        if type(layer) is nn.Linear:
            a2 = torch.linalg.vector_norm(inp, dim=1).square_()
            g2 = torch.linalg.vector_norm(g, dim=1).square_()
            # the bias adds ||g_i||^2; tensor-only ops (a Python scalar costs a conversion)
            if sq is None:
                sq = torch.addcmul(g2, g2, a2) if layer.bias is not None else g2.mul_(a2)
            else:
                sq.addcmul_(g2, a2)
                if layer.bias is not None:
                    sq += g2
            saved.append((layer, inp, g))
            if i > first_linear:  # the gradient w.r.t. the model input is never needed
                g = g @ layer.weight  # a fresh tensor: the activations below may work in place
        else:
            g = _act_backward(layer, g, inp, post)

    norms = sq.sqrt_()
    coef, frac = _clip_coefficients(norms, clip, W, b)

    offsets, d_total = _offsets(params)
    if out is None:
        out = torch.empty(W, d_total, dtype=dtype, device=x.device)
    scale = coef.view(W, 1, b)
    for layer, inp, g in saved:
        o, i_ = layer.weight.shape
        # (s_i / b) * g_i, laid out [W, out, b] contiguous: bmm then needs no internal copy
        gt = torch.empty(W, o, b, dtype=dtype, device=x.device)
        torch.mul(g.view(W, b, o).transpose(1, 2), scale, out=gt)
        start = offsets[id(layer.weight)]
        block = out[:, start : start + o * i_].view(W, o, i_)
        if W * o * i_ <= _SMALL_BLOCK:
            block.copy_(torch.bmm(gt, inp.view(W, b, i_)))
        else:  # large: writing in place beats a temporary of W model-sized blocks plus a copy
            torch.bmm(gt, inp.view(W, b, i_), out=block)
        if layer.bias is not None:
            start = offsets[id(layer.bias)]
            torch.sum(gt, dim=2, out=out[:, start : start + o])
    return WorkerGradients(out, nll.view(W, b).mean(1).neg_(), norms.view(W, b).mean(1), frac)


def _generic(model: nn.Module, x: Tensor, y: Tensor, clip: float | None, out: Tensor | None) -> WorkerGradients:
    from torch.func import functional_call, grad, vmap

    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            raise ValueError(
                f"{type(mod).__name__} in training mode mixes examples, so per-example gradients "
                "(and DP clipping) are undefined: use GroupNorm/LayerNorm, or put it in eval mode"
            )
    W, b = y.shape
    n = W * b
    names = [k for k, _ in model.named_parameters()]
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    dtype = next(iter(params.values())).dtype
    sizes = [params[k].numel() for k in names]
    d_total = sum(sizes)

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        loss = F.cross_entropy(out, yi.unsqueeze(0))
        return loss, loss

    per_example = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0), randomness="different")
    xf = x.reshape(n, *x.shape[2:])
    if xf.is_floating_point():  # token ids (an Embedding's input) stay integers
        xf = xf.to(dtype)
    yf = y.reshape(n).long()
    elem = torch.empty((), dtype=dtype).element_size()
    chunk = max(1, min(n, GENERIC_CHUNK_BYTES // max(1, d_total * elem)))

    if out is None:
        out = torch.zeros(W, d_total, dtype=dtype, device=x.device)
    else:
        out.zero_()
    losses = torch.empty(n, dtype=dtype, device=x.device)
    norms = torch.empty(n, dtype=dtype, device=x.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        grads, loss = per_example(params, xf[s:e], yf[s:e])
        flat = [grads[k].reshape(e - s, -1) for k in names]
        sq = sum(f.square().sum(1) for f in flat)
        nrm = sq.sqrt()
        norms[s:e] = nrm
        losses[s:e] = loss.detach()
        if clip is None:
            coef = torch.full_like(nrm, 1.0 / b)
        else:
            coef = (clip / (nrm + _EPS)).clamp(max=1.0) / b
        worker = torch.arange(s, e, device=x.device) // b
        pos = 0
        for f, size in zip(flat, sizes, strict=True):
            out[:, pos : pos + size].index_add_(0, worker, f * coef[:, None])
            pos += size
    frac = torch.zeros(W, dtype=dtype, device=x.device) if clip is None else (norms > clip).to(dtype).view(W, b).mean(1)
    return WorkerGradients(out, losses.view(W, b).mean(1), norms.view(W, b).mean(1), frac)


# ------------------------------------------------------------------------------------------------
# The ghost path: hooks on the parameter-owning layers, ghost norms, book-keeping
# ------------------------------------------------------------------------------------------------
class _Unsupported(Exception):
    """What the ghost path meets only while running (e.g. a layer's input modified in place
    afterwards); ``auto`` then falls back to the generic path for that call."""


#: exact types only: a subclass may change forward (and so the gradient) behind our back
_GHOST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.GroupNorm, nn.LayerNorm)
#: memory one chunk of the norm computation may take (unfolded inputs, Gram matrices); below
#: glibc's largest mmap threshold (32 MiB), so chunk buffers come back from the heap instead of
#: fresh zero pages on every step (page faults dominated at 64 MiB: benchmarks/clipping.py --conv)
GHOST_CHUNK_BYTES = 16 * 2**20

_log = logging.getLogger("tuneguard")
_NOTED: set[str] = set()


def _note_runtime_fallback(model: nn.Module, why: str) -> None:
    key = f"{type(model).__name__}|{why}"
    if key not in _NOTED:  # once per process: a step loop must not print a line per step
        _NOTED.add(key)
        _log.warning("%s: %s; per-example clipping falls back to the generic path (%s)", type(model).__name__, why, GENERIC_COST)


@dataclass(frozen=True)
class _GhostPlan:
    modules: tuple[nn.Module, ...]  # the layers that own parameters, each once


_PLANS: weakref.WeakKeyDictionary[nn.Module, _GhostPlan | str] = weakref.WeakKeyDictionary()


def _ghost_plan(model: nn.Module) -> _GhostPlan | str:
    """The plan for ``model``, or why it has none (cached per model: steps call this each time)."""
    plan = _PLANS.get(model)
    if plan is None:
        plan = _PLANS[model] = _make_plan(model)
    return plan


def _layer_problem(mod: nn.Module) -> str | None:
    t = type(mod)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return f"{t.__name__} mixes the examples of a batch (use GroupNorm)"
    if t not in _GHOST_TYPES:
        return f"{t.__name__} has no ghost-norm rule (supported: {', '.join(c.__name__ for c in _GHOST_TYPES)})"
    if t in (nn.Conv1d, nn.Conv2d) and mod.padding_mode != "zeros":
        return f"{t.__name__} with padding_mode={mod.padding_mode!r} (only 'zeros')"
    if t is nn.Embedding and (mod.max_norm is not None or mod.scale_grad_by_freq or mod.sparse):
        return "Embedding with max_norm, scale_grad_by_freq or sparse gradients"
    return None


def _make_plan(model: nn.Module) -> _GhostPlan | str:
    owner: dict[int, str] = {}
    mods: list[nn.Module] = []
    for path, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False))
        if not own:
            continue
        where = f"layer {path or '<root>'!r}"
        problem = _layer_problem(mod)
        if problem:
            return f"{where} ({type(mod).__name__}): {problem}"
        for pname, p in own:
            if id(p) in owner:
                return f"{where}: parameter {pname!r} is shared with {owner[id(p)]!r} (tied weights)"
            if not p.requires_grad:
                return f"{where}: parameter {pname!r} has requires_grad=False"
            owner[id(p)] = path
        mods.append(mod)
    if not mods:
        return "the model has no parameters"
    return _GhostPlan(tuple(mods))


#: models that modify a hooked layer's output in place (an inplace ReLU after a conv): their
#: hooks hand the network a copy from the first run on
_NEEDS_CLONE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class _Tap(torch.autograd.Function):
    """Identity on a hooked layer's output whose backward hands the output gradient to the
    caller (``sink``) and passes it on unchanged. Backward asks only for the gradient of a
    scalar ``anchor`` that every tap takes as an input, so autograd returns no layer-sized
    tensor and frees each output gradient (and saved activation) once it has been used, as a
    plain backward does: holding all of them until the end cost more than the weight
    gradients it skips (page faults on fresh buffers; benchmarks/clipping.py --conv)."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, anchor: Tensor, sink: Any, i: int) -> Tensor:
        ctx.sink, ctx.i = sink, i
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        ctx.sink(ctx.i, g)
        return g, None, None, None


def _ghost_forward(
    model: nn.Module, plan: _GhostPlan, xf: Tensor, yf: Tensor, clone: bool, process: Any
) -> Tensor | None:
    """Forward with hooks, then d(sum_i loss_i)/d(each hooked layer's output), handed to
    ``process(module, [(input, output grad), one per call])`` as soon as all of a layer's
    calls have their gradient (during the backward for a layer called once). Layers whose
    output does not reach the loss are not processed.

    Returns the per-example losses, or None when a layer's output was modified in place (an
    inplace ReLU after a conv): the caller then reruns with ``clone`` so the hooks hand the
    network a copy and keep the original intact.
    """
    n = xf.shape[0]
    records: list[Any] = []  # [module, input, output, input version, output version]
    anchor = torch.zeros((), dtype=xf.dtype if xf.is_floating_point() else torch.float32,
                         device=xf.device, requires_grad=True)
    calls: dict[int, int] = {}
    pending: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def sink(i: int, g: Tensor) -> None:
        mod, a = records[i][0], records[i][1]
        records[i] = None  # drop the input: autograd frees it once its node has run
        if a.dim() == 0 or a.shape[0] != n or g.shape[0] != n:
            # e.g. a layer applied to a shared (not per-example) tensor: no per-example split
            raise _Unsupported(f"a {type(mod).__name__} layer runs on a tensor whose first dimension is not the batch")
        u = pending.setdefault(id(mod), [])
        u.append((a.detach(), g))
        if len(u) == calls[id(mod)]:
            process(mod, pending.pop(id(mod)))

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise _Unsupported(f"{type(mod).__name__} called with non-tensor input or output")
        records.append([mod, args[0], output, args[0]._version, output._version])
        if not output.requires_grad:
            return output.clone() if clone else None
        tapped = _Tap.apply(output, anchor, sink, len(records) - 1)
        # the tap's output is a view: an in-place op on it fails, and the caller reruns with clone
        return tapped.clone() if clone else tapped

    handles = [m.register_forward_hook(hook) for m in plan.modules]
    try:
        with torch.enable_grad():
            try:
                logits = model(xf)
            except RuntimeError:
                if clone:
                    raise
                return None  # e.g. an in-place op on a tapped output: rerun with clone
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != xf.shape[0]:
                raise _Unsupported("the model does not return logits [N, classes]")
            for r in records:
                mod, a, out, va, vo = r
                if a._version != va:
                    raise _Unsupported(f"the input of a {type(mod).__name__} layer is modified in place after it")
                if out._version != vo:
                    return None
                calls[id(mod)] = calls.get(id(mod), 0) + 1
                del r[2:]  # keep [module, input]; the output itself is not needed any more
            loss = F.cross_entropy(logits, yf, reduction="none")
            del logits
            # d sum_i l_i / d out: row i is example i's output gradient (layers do not mix
            # examples). Only the anchor's gradient is asked for, so autograd skips every
            # weight gradient: those come later, weighted, by book-keeping.
            torch.autograd.grad(loss.sum(), anchor, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for key, u in pending.items():  # a layer with some calls that do not reach the loss
        process(next(m for m in plan.modules if id(m) == key), u)
    return loss.detach()


def _chunk(n: int, per_example_elems: int, elem: int, align: int = 1) -> int:
    c = max(1, GHOST_CHUNK_BYTES // max(1, per_example_elems * elem))
    if align > 1:
        c = max(align, c // align * align)
    return min(n, c)


def _pair_sq(G: Tensor, A: Tensor) -> Tensor:
    """Per-row ||G_r^T A_r||_F^2 for G [R, L, p], A [R, L, D], by the cheaper formula:
    ghost <A A^T, G G^T> in O(L^2 (D + p)) or direct in O(p D L) (Bu et al. 2022)."""
    R, L, p = G.shape
    D = A.shape[2]
    if L == 1:
        return G.square().sum((1, 2)) * A.square().sum((1, 2))
    ghost = L * (D + p) < p * D
    c = _chunk(R, 2 * L * L if ghost else p * D, G.element_size())
    out = torch.empty(R, dtype=G.dtype, device=G.device)
    for s in range(0, R, c):
        g, a = G[s : s + c], A[s : s + c]
        if ghost:
            out[s : s + c] = ((a @ a.mT) * (g @ g.mT)).sum((1, 2))
        else:
            out[s : s + c] = torch.linalg.matrix_norm(g.mT @ a).square()
    return out


def _conv_geometry(mod: nn.Module, a: Tensor) -> tuple[Tensor, tuple, tuple, tuple, tuple]:
    """(input as 4-D and explicitly padded when the padding is asymmetric, kernel, stride,
    dilation, symmetric padding) for Conv1d / Conv2d, so Conv1d runs as a 1 x k Conv2d."""
    if type(mod) is nn.Conv1d:
        a = a.unsqueeze(2)
        k, s, d = (1, mod.kernel_size[0]), (1, mod.stride[0]), (1, mod.dilation[0])
        pad = mod.padding if isinstance(mod.padding, str) else (0, mod.padding[0])
    else:
        k, s, d, pad = tuple(mod.kernel_size), tuple(mod.stride), tuple(mod.dilation), mod.padding
    if pad == "valid":
        pad = (0, 0)
    elif pad == "same":
        # as aten's 'same': total d (k - 1) per dim, the odd pixel on the right/bottom
        tot = [d[i] * (k[i] - 1) for i in range(2)]
        left = [t // 2 for t in tot]
        a = F.pad(a, (left[1], tot[1] - left[1], left[0], tot[0] - left[0]))
        pad = (0, 0)
    return a, k, s, d, tuple(pad)


def _unfold(a: Tensor, k: tuple, stride: tuple, dilation: tuple, pad: tuple) -> Tensor:
    """im2col [n, C k_h k_w, L] as one strided copy: F.unfold's CPU kernel loops per example
    and was 6-10x slower here (benchmarks/clipping.py)."""
    if pad != (0, 0):
        a = F.pad(a, (pad[1], pad[1], pad[0], pad[0]))
    n, C, H, W = a.shape
    ho = (H - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    wo = (W - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    sn, sc, sh, sw = a.stride()
    v = a.as_strided((n, C, k[0], k[1], ho, wo),
                     (sn, sc, sh * dilation[0], sw * dilation[1], sh * stride[0], sw * stride[1]))
    return v.reshape(n, C * k[0] * k[1], ho * wo)


#: per-example conv weight gradients (direct formula) up to this size are kept for
#: book-keeping (a [W, 1, b] x [W, b, p D] product) instead of recomputed by the conv kernel
KEEP_PER_EXAMPLE_BYTES = 128 * 2**20
#: None: the cheaper conv norm formula; "ghost" / "direct": that one (tests check both agree)
_FORCE_FORMULA: str | None = None
#: the direct formula by a grouped weight-gradient call instead of im2col + bmm, for layers
#: with at least this many output positions and input channels per group (a stem conv on
#: 1-3 input channels unfolds cheaply: im2col + bmm measured faster there)
_GROUPED_DIRECT = True
GROUPED_MIN_POSITIONS = 64
GROUPED_MIN_CHANNELS = 4


def _conv_sq(mod: nn.Module, uses: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-example squared norm of a conv's weight (and bias) gradient, in example chunks,
    the per-example weight gradients [n, p D] when the direct formula ran and they fit, and
    the per-example bias gradients [n, p] (None without a bias)."""
    groups = mod.groups
    p = mod.out_channels
    pg = p // groups
    n = uses[0][0].shape[0]
    dtype, dev = uses[0][1].dtype, uses[0][1].device
    geo = [(_conv_geometry(mod, a), g) for a, g in uses]
    D = mod.weight[0].numel()  # C_in / groups * prod(kernel), per group
    L = sum(g[0].numel() // p for _, g in uses)
    ghost = L * (D + pg) < pg * D if _FORCE_FORMULA is None else _FORCE_FORMULA == "ghost"
    elem = uses[0][1].element_size()
    per = groups * (D * L + (2 * L * L if ghost else pg * D))
    c = _chunk(n, per, elem)
    keep = None
    if not ghost and n * p * D * elem <= KEEP_PER_EXAMPLE_BYTES:
        keep = torch.empty(n, p * D, dtype=dtype, device=dev)
    out = torch.empty(n, dtype=dtype, device=dev)
    bias_rows = sum(g.reshape(n, p, -1).sum(2) for _, g in uses) if mod.bias is not None else None
    grouped = len(geo) == 1 and L >= GROUPED_MIN_POSITIONS and D // math.prod(geo[0][0][1]) >= GROUPED_MIN_CHANNELS
    if not ghost and _GROUPED_DIRECT and grouped:
        # direct formula through the conv's own weight-gradient kernel with one group per
        # example (input [1, c C, H, W], grads [1, c p, L]): the per-example gradients without
        # an im2col copy, which dominated ResNet-style layers (large L, small p and D); below
        # GROUPED_MIN_POSITIONS (or with few input channels) im2col + bmm measured faster
        (a4, k, st, dl, pad), g = geo[0]
        g4 = g.unsqueeze(2) if type(mod) is nn.Conv1d else g
        c = _chunk(n, p * D + a4[0].numel() + g4[0].numel(), elem)
        wshape = (p, D // (k[0] * k[1]), k[0], k[1])
        for s in range(0, n, c):
            aa, gg = a4[s : s + c], g4[s : s + c]
            cc = aa.shape[0]
            per_ex = torch.nn.grad.conv2d_weight(
                aa.reshape(1, -1, *aa.shape[2:]), (cc * p, *wshape[1:]), gg.reshape(1, -1, *gg.shape[2:]),
                st, pad, dl, cc * groups,
            ).view(cc, -1)
            if keep is not None:
                keep[s : s + cc] = per_ex
            out[s : s + cc] = _row_sq(per_ex)
        if bias_rows is not None:
            out += _row_sq(bias_rows)
        return out, keep, bias_rows
    for s in range(0, n, c):
        As, Gs = [], []
        for (a4, k, st, dl, pad), g in geo:
            unf = _unfold(a4[s : s + c], k, st, dl, pad)  # [c, G*D, L_use]
            gg = g[s : s + c].reshape(unf.shape[0], p, -1)
            if gg.shape[2] != unf.shape[2]:
                raise _Unsupported(f"{type(mod).__name__}: unfolded positions {unf.shape[2]} != output positions {gg.shape[2]}")
            As.append(unf.view(unf.shape[0] * groups, D, -1))
            Gs.append(gg.reshape(unf.shape[0] * groups, pg, -1))
        A = torch.cat(As, 2) if len(As) > 1 else As[0]  # [c G, D, L]
        G = torch.cat(Gs, 2) if len(Gs) > 1 else Gs[0]  # [c G, p/G, L]
        cc = A.shape[0] // groups
        if ghost:
            out[s : s + cc] = ((A.mT @ A) * (G.mT @ G)).sum((1, 2)).view(cc, groups).sum(1)
        else:
            per_ex = G @ A.mT  # [c G, p/G, D]: group-major rows, as weight.view(p, -1)
            if keep is not None:
                keep[s : s + cc] = per_ex.view(cc, -1)
            out[s : s + cc] = _row_sq(per_ex.view(cc, -1))
    if bias_rows is not None:
        out += _row_sq(bias_rows)
    return out, keep, bias_rows


def _row_sq(t: Tensor) -> Tensor:
    """Squared L2 norm of each row of a 2-D tensor, without a squared copy of it."""
    return torch.linalg.vector_norm(t, dim=1).square_()


def _linear_rows(uses: list[tuple[Tensor, Tensor]], n: int) -> tuple[Tensor, Tensor]:
    """A [n, L, in], G [n, L, out] over all calls (positions of sequence inputs, calls concatenated)."""
    A = [a.reshape(n, -1, a.shape[-1]) for a, _ in uses]
    G = [g.reshape(n, -1, g.shape[-1]) for _, g in uses]
    return (torch.cat(A, 1) if len(A) > 1 else A[0]), (torch.cat(G, 1) if len(G) > 1 else G[0])


#: a GroupNorm's per-example affine gradients come from per-channel sums (one pass, no
#: normalised copy of the input) unless a group's mean is this large against its spread,
#: in units of the dtype's epsilon (mu^2 / var * eps): then the one-pass variance
#: E[a^2] - mu^2 would lose digits, and x_hat is formed as before
GN_ONE_PASS_MAX = 1e-5


def _group_norm_sums(mod: nn.GroupNorm, a: Tensor, g: Tensor, n: int) -> tuple[Tensor, Tensor] | None:
    r"""(:math:`\sum_l \delta_{c,l}\hat x_{c,l}`, :math:`\sum_l \delta_{c,l}`) per example and channel, [n, C]
    each, from sums over positions: with group mean :math:`\mu`, :math:`r = (\sigma^2 + \epsilon)^{-1/2}`,
    :math:`\sum_l \delta_l \hat x_l = r(\sum_l \delta_l a_l - \mu \sum_l \delta_l)`. None when the
    one-pass variance is ill-conditioned (see ``GN_ONE_PASS_MAX``)."""
    C, G = mod.num_channels, mod.num_groups
    a3, g3 = a.reshape(n, C, -1), g.reshape(n, C, -1)
    L = a3.shape[2]
    cnt = (C // G) * L
    mu = a3.sum(2).view(n, G, -1).sum(2).div_(cnt)
    var = torch.linalg.vector_norm(a3, dim=2).square_().view(n, G, -1).sum(2).div_(cnt).sub_(mu * mu)
    if bool((mu * mu * torch.finfo(a.dtype).eps > GN_ONE_PASS_MAX * var.clamp(min=0)).any()):
        return None
    rstd = var.clamp_(min=0).add_(mod.eps).rsqrt_().repeat_interleave(C // G, 1)
    sg = g3.sum(2)
    # per-(example, channel) dot products as one batched [1, L] x [L, 1] product: no g * a copy
    sga = torch.bmm(g3.reshape(n * C, 1, L), a3.reshape(n * C, L, 1)).view(n, C)
    return sga.sub_(mu.repeat_interleave(C // G, 1) * sg).mul_(rstd), sg


def _norm_affine(mod: nn.Module, uses: list[tuple[Tensor, Tensor]], n: int) -> tuple[Tensor | None, Tensor | None]:
    """Per-example gradients of a GroupNorm / LayerNorm's weight and bias, [n, numel] each:
    sum over the positions each weight acts on of delta * x_hat (weight) and delta (bias)."""
    gw = gb = None
    for a, g in uses:
        sums = _group_norm_sums(mod, a, g, n) if type(mod) is nn.GroupNorm and mod.weight is not None else None
        if sums is not None:
            w, bb = sums
            gw = w if gw is None else gw + w
            if mod.bias is not None:
                gb = bb if gb is None else gb + bb
            continue
        if type(mod) is nn.GroupNorm:
            xhat = F.group_norm(a, mod.num_groups, eps=mod.eps)
            rows = lambda t: t.reshape(n, mod.num_channels, -1).sum(2)  # noqa: E731
        else:
            xhat = F.layer_norm(a, mod.normalized_shape, eps=mod.eps)
            k = math.prod(mod.normalized_shape)
            rows = lambda t, k=k: t.reshape(n, -1, k).sum(1)  # noqa: E731
        if mod.weight is not None:
            w = rows(g * xhat)
            gw = w if gw is None else gw + w
        if mod.bias is not None:
            bb = rows(g)
            gb = bb if gb is None else gb + bb
    return gw, gb


def _embedding_rows(mod: nn.Embedding, uses: list[tuple[Tensor, Tensor]], n: int) -> tuple[Tensor, Tensor]:
    idx = torch.cat([a.reshape(n, -1) for a, _ in uses], 1)
    G = torch.cat([g.reshape(n, -1, mod.embedding_dim) for _, g in uses], 1)
    if mod.padding_idx is not None:  # autograd gives the padding row no gradient
        G = G * (idx != mod.padding_idx).unsqueeze(2).to(G.dtype)
    return idx, G


def _embedding_sq(idx: Tensor, G: Tensor) -> Tensor:
    """sum_{u,v} [t_u = t_v] <delta_u, delta_v>: the norm of the per-example sum of one-hot
    rows, without the [vocab, dim] per-example gradient."""
    n, T, dim = G.shape
    if T == 1:
        return G.square().sum((1, 2))
    c = _chunk(n, 2 * T * T, G.element_size())
    out = torch.empty(n, dtype=G.dtype, device=G.device)
    for s in range(0, n, c):
        i = idx[s : s + c]
        same = (i.unsqueeze(2) == i.unsqueeze(1)).to(G.dtype)
        out[s : s + c] = (same * (G[s : s + c] @ G[s : s + c].mT)).sum((1, 2))
    return out


def _write(block: Tensor, value: Tensor) -> None:
    block.copy_(value.reshape(block.shape))


def _ghost(
    model: nn.Module, plan: _GhostPlan, params: list[Tensor], x: Tensor, y: Tensor, clip: float | None, out: Tensor | None
) -> WorkerGradients:
    W, b = y.shape
    n = W * b
    dtype = params[0].dtype
    xf = x.reshape(n, *x.shape[2:])
    if xf.is_floating_point() and xf.dtype != dtype:
        xf = xf.to(dtype)
    yf = y.reshape(n)
    if yf.dtype != torch.int64:
        yf = yf.long()
    # 1. per-example squared norms, layer by layer (during the backward); keep what
    # book-keeping reuses
    sq = torch.zeros(n, dtype=dtype, device=x.device)
    kept: dict[int, Any] = {}

    def process(mod: nn.Module, u: list[tuple[Tensor, Tensor]]) -> None:
        nonlocal sq
        with torch.no_grad():
            t = type(mod)
            if t is nn.Linear:
                A, G = _linear_rows(u, n)
                sq += _pair_sq(G, A)
                if mod.bias is not None:
                    sq += G.sum(1).square().sum(1)
                kept[id(mod)] = (A, G)
            elif t in (nn.Conv1d, nn.Conv2d):
                csq, per_ex, bias_rows = _conv_sq(mod, u)
                sq += csq
                # the inputs and output grads only when book-keeping reruns the conv kernel
                kept[id(mod)] = (per_ex, bias_rows, u if per_ex is None else None)
            elif t is nn.Embedding:
                idx, G = _embedding_rows(mod, u, n)
                sq += _embedding_sq(idx, G)
                kept[id(mod)] = (idx, G)
            else:  # GroupNorm / LayerNorm
                gw, gb = _norm_affine(mod, u, n)
                for g in (gw, gb):
                    if g is not None:
                        sq += _row_sq(g)
                kept[id(mod)] = (gw, gb)

    loss = None if model in _NEEDS_CLONE else _ghost_forward(model, plan, xf, yf, False, process)
    if loss is None:
        sq.zero_()
        kept.clear()
        loss = _ghost_forward(model, plan, xf, yf, True, process)
        _NEEDS_CLONE.add(model)  # later steps go straight to the copying run
    assert loss is not None

    with torch.no_grad():
        norms = sq.sqrt_()
        coef, frac = _clip_coefficients(norms, clip, W, b)

        # 2. book-keeping: each layer's gradient of sum_{i in worker} (s_i / b) l_i, per worker
        offsets, d_total = _offsets(params)
        if out is None:
            out = torch.empty(W, d_total, dtype=dtype, device=x.device)

        def block(p: Tensor) -> Tensor:
            start = offsets[id(p)]
            return out[:, start : start + p.numel()]

        for mod in plan.modules:
            if id(mod) not in kept:  # not called, or its output does not reach the loss
                for p in mod.parameters(recurse=False):
                    block(p).zero_()
                continue
            t = type(mod)
            if t is nn.Linear:
                A, G = kept[id(mod)]
                L = A.shape[1]
                Gs = (G * coef.view(n, 1, 1)).reshape(W, b * L, -1)
                _write(block(mod.weight), torch.bmm(Gs.mT, A.reshape(W, b * L, -1)))
                if mod.bias is not None:
                    _write(block(mod.bias), Gs.sum(1))
            elif t in (nn.Conv1d, nn.Conv2d):
                wshape = mod.weight.shape if t is nn.Conv2d else (*mod.weight.shape[:2], 1, mod.weight.shape[2])
                wblock = block(mod.weight)
                bblock = block(mod.bias) if mod.bias is not None else None
                per_ex, bias_rows, u = kept[id(mod)]
                cw = coef.view(W, 1, b)
                if per_ex is not None:
                    _write(wblock, torch.bmm(cw, per_ex.view(W, b, -1)))
                else:
                    geo = [(_conv_geometry(mod, a), g.unsqueeze(2) if t is nn.Conv1d else g) for a, g in u]
                    for w in range(W):
                        rows = slice(w * b, (w + 1) * b)
                        gw = None
                        for (a4, _, st, dl, pad), g4 in geo:
                            # the conv's own weight-gradient kernel on the worker's weighted output
                            # grads (scaled one worker at a time: no weighted copy of all of them)
                            gs = g4[rows] * coef[rows].view(b, 1, 1, 1)
                            r = torch.nn.grad.conv2d_weight(a4[rows], wshape, gs, st, pad, dl, mod.groups)
                            gw = r if gw is None else gw.add_(r)
                        wblock[w].copy_(gw.reshape(-1))
                if bblock is not None:
                    _write(bblock, torch.bmm(cw, bias_rows.view(W, b, -1)))
            elif t is nn.Embedding:
                idx, G = kept[id(mod)]
                V, dim = mod.weight.shape
                eb = block(mod.weight).view(W, V, dim)
                eb.zero_()
                Gs = G * coef.view(n, 1, 1)
                for w in range(W):
                    rows = slice(w * b, (w + 1) * b)
                    eb[w].index_add_(0, idx[rows].reshape(-1), Gs[rows].reshape(-1, dim))
            else:
                gw, gb = kept[id(mod)]
                cw = coef.view(W, 1, b)
                if gw is not None:
                    _write(block(mod.weight), torch.bmm(cw, gw.view(W, b, -1)))
                if gb is not None:
                    _write(block(mod.bias), torch.bmm(cw, gb.view(W, b, -1)))
    return WorkerGradients(out, loss.view(W, b).mean(1), norms.view(W, b).mean(1), frac)
