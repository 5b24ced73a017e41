"""One step of Algorithm 1 (paper 001), with the options of paper 003. One source of truth: the
local engine and the Ray actor engine both call these functions.

    1. the server holds theta_t and broadcasts it;
    2. honest worker i samples b of its m examples without replacement, clips each per-example
       gradient to L2 norm C, averages, adds y ~ N(0, sigma^2 I_d) (and, for 003's noisy
       sign/median SGD, b_003 * xi with xi ~ N(0, I_d)); with worker momentum it submits
       m_t = beta m_{t-1} + (1 - dampening) g_t;
    3. Byzantine workers submit attack vectors crafted from the honest submissions;
    4. the server computes R_t = GAR(g_1, ..., g_n) and theta_{t+1} = theta_t - lr (R_t + wd theta_t);
       sign-based rules return sign vectors, so the update is lr * sign(...).

Each function is pure in (inputs, step index, seed): randomness comes from streams keyed by
(seed, purpose, worker id, step) (:mod:`tuneguard.data`), so a worker's numbers do not depend on
which other workers are computed with it, nor on which process computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tuneguard.data import (
    PURPOSE_ATTACK,
    PURPOSE_GAR,
    PURPOSE_NOISE,
    PURPOSE_PERTURB,
    sample_batch,
    torch_generator,
    torch_generators,
)
from tuneguard.training.context import RunContext

if TYPE_CHECKING:
    from tuneguard.aggregators import Gar


@dataclass
class WorkerOutput:
    """What a group of workers produced at one step (rows follow the ``workers`` order)."""

    sample: torch.Tensor  # [k, d] clipped batch means, before noise and momentum (VN "sample")
    submit: torch.Tensor  # [k, d] what reaches the GAR (noise and momentum applied)
    momentum: torch.Tensor | None  # [k, d] the new momentum buffers (None without momentum)
    loss: torch.Tensor  # [k] mean batch loss
    grad_norm: torch.Tensor  # [k] mean unclipped per-example gradient norm
    clipped_frac: torch.Tensor  # [k]

    @staticmethod
    def concat(parts: Sequence[WorkerOutput]) -> WorkerOutput:
        if len(parts) == 1:
            return parts[0]
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        mom = None if parts[0].momentum is None else cat("momentum")
        return WorkerOutput(cat("sample"), cat("submit"), mom, cat("loss"), cat("grad_norm"), cat("clipped_frac"))


def flip_labels(y: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """Label flipping (Allen-Zhu et al. 2021; Allouah et al. 2023): y -> (C - 1) - y."""
    return (num_classes - 1) - y


def gather_batches(ctx: RunContext, workers: Sequence[int], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [k, b, ...], y [k, b]: each worker's batch, sampled without replacement from its data."""
    b, seed = ctx.cfg.batch_size, ctx.cfg.seed
    rows = []
    for w in workers:
        local = sample_batch(ctx.worker_size(w), b, seed, w, step)
        rows.append(local)
    idx = torch.from_numpy(np.stack(rows)).to(ctx.device)
    if ctx.shards is not None:
        # Byzantine label-flippers (ids >= n_honest) sample from the whole train set.
        idx = torch.stack([ctx.shards[w][i] if w < len(ctx.shards) else i for w, i in zip(workers, idx, strict=True)])
    flat = idx.reshape(-1)
    # index_select on the flattened images is ~2x faster than advanced indexing on CPU. The
    # batch lands in the group's reused buffer: the caller is done with it before the next step.
    data = ctx.data.train_x
    buf = ctx.batch_buffer(tuple(workers), flat.numel())
    x = torch.index_select(data.reshape(data.shape[0], -1), 0, flat, out=buf).view(*idx.shape, *data.shape[1:])
    return x, ctx.data.train_y[flat].view(idx.shape)


def worker_round(
    ctx: RunContext,
    theta: torch.Tensor,
    momentum: torch.Tensor | None,
    workers: Sequence[int],
    step: int,
    *,
    flip: bool = False,
    submit_out: torch.Tensor | None = None,
) -> WorkerOutput:
    """Step 2 of Algorithm 1 for the given worker ids, batched in one pass.

    ``submit_out``: an optional [k, d] tensor (the parameters' dtype and device) that receives
    the submitted rows, e.g. the first rows of the server's [n, d] GAR input, which then needs
    no concatenation. The returned ``submit`` (and ``momentum``) are then views of it, so it
    must not be the previous step's momentum. Same numbers either way.
    """
    from tuneguard.privacy import clipped_gradients

    cfg, plan = ctx.cfg, ctx.plan
    ctx.set_params(theta)
    x, y = gather_batches(ctx, workers, step)
    if flip:
        y = flip_labels(y, ctx.data.num_classes)
    # The buffer is overwritten next step: everything derived from ``sample`` below is a copy.
    out = clipped_gradients(ctx.model, x, y, cfg.clip, out=ctx.grad_buffer(tuple(workers)))
    sample = out.grads
    if submit_out is not None and (submit_out.shape != sample.shape or submit_out.dtype != sample.dtype
                                   or submit_out.device != sample.device):
        raise ValueError(f"submit_out must be a [{sample.shape[0]}, {sample.shape[1]}] {sample.dtype} tensor on "
                         f"{sample.device}; got {tuple(submit_out.shape)} {submit_out.dtype} on {submit_out.device}")
    noisy = sample
    draws = [(purpose, std) for purpose, std in ((PURPOSE_NOISE, plan.sigma), (PURPOSE_PERTURB, cfg.perturbation)) if std > 0]
    for purpose, std in draws:
        # The first draw lands in the output rows and is turned into sample + std * noise in
        # place: one pass, and the result is already out of the reused ``sample`` buffer.
        first = noisy is sample
        noise = submit_out if first and submit_out is not None else torch.empty_like(sample)
        gens = torch_generators(cfg.seed, purpose, workers, step, ctx.device)
        for row, g in enumerate(gens):  # one stream per worker: grouping-independent
            noise[row].normal_(generator=g)
        noisy = torch.add(sample, noise, alpha=std, out=noise) if first else noisy.add_(noise, alpha=std)
    new_momentum = None
    submit = noisy
    if cfg.momentum > 0:
        # m_t = beta m_{t-1} + (1 - dampening) g_t with m_{-1} = 0 (El-Mhamdi et al. 2021).
        scaled = noisy
        if cfg.dampening != 0:
            dest = submit_out if submit_out is not None and noisy is sample else None
            scaled = torch.mul(noisy, 1 - cfg.dampening, out=dest) if noisy is sample else noisy.mul_(1 - cfg.dampening)
        if momentum is None:
            new_momentum = _copy_out(scaled, submit_out) if scaled is sample else scaled
        else:
            dest = submit_out if submit_out is not None else (scaled if scaled is not sample else None)
            new_momentum = torch.add(scaled, momentum, alpha=cfg.momentum, out=dest)
        submit = new_momentum
    elif submit is sample and submit_out is not None:
        submit = submit_out.copy_(sample)
    return WorkerOutput(sample, submit, new_momentum, out.loss, out.norm_mean, out.clipped_frac)


def _copy_out(t: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return t.clone() if out is None else out.copy_(t)


def byzantine_vectors(
    ctx: RunContext,
    honest_submit: torch.Tensor,
    step: int,
    flipped: WorkerOutput | None = None,
    gar: Gar | None = None,
) -> torch.Tensor:
    """Step 3: the f Byzantine vectors (omniscient, colluding: they see all honest submissions).

    ``gar``: the run's :class:`~tuneguard.aggregators.Gar` (built once per run with
    ``build_gar(ctx.cfg)``); GAR-aware attacks run it. ``None`` builds one (same numbers).
    """
    from tuneguard.attacks import ATTACKS, craft

    cfg = ctx.cfg
    if cfg.f == 0:
        return honest_submit.new_empty((0, honest_submit.shape[1]))
    if ctx.label_flip:
        assert flipped is not None, "label_flip needs the flipped workers' output"
        return flipped.submit
    spec = ATTACKS[cfg.attack.name]
    params = dict(cfg.attack.params)
    if "gar" in spec.params and "gar" not in params:  # GAR-aware attacks target the run's GAR
        params["gar"] = _run_gar(ctx, gar)
        if "gar_params" in spec.params and "gar_params" not in params:
            params["gar_params"] = gar_params(ctx, step, params["gar"])
    if spec.needs_generator:
        params["generator"] = torch_generator(cfg.seed, PURPOSE_ATTACK, 0, step, ctx.device)
    return craft(cfg.attack.name, honest_submit, cfg.f, **params)


def _run_gar(ctx: RunContext, gar: Gar | None) -> Gar:
    from tuneguard.aggregators import build_gar

    return build_gar(ctx.cfg) if gar is None else gar


def gar_params(ctx: RunContext, step: int, gar: Gar | None = None) -> dict:
    """The GAR's parameters at this step; randomised rules (bucketing) get the step's generator.

    GAR-aware attacks receive the same parameters, generator included: the omniscient attacker
    of 001 knows the server's randomness, the strongest assumption.
    """
    cfg = ctx.cfg
    params = dict(cfg.gar.params)
    if _run_gar(ctx, gar).randomized and "generator" not in params:
        params["generator"] = torch_generator(cfg.seed, PURPOSE_GAR, 0, step, ctx.device)
    return params


def aggregate_and_update(
    ctx: RunContext, theta: torch.Tensor, vectors: torch.Tensor, step: int, gar: Gar | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: R_t = GAR(vectors); returns (theta_{t+1}, R_t). ``theta`` is not modified.

    ``gar``: the run's :class:`~tuneguard.aggregators.Gar`, built once per run with
    ``build_gar(ctx.cfg)`` (its requirement checked then); ``None`` builds one per call.
    """
    cfg = ctx.cfg
    gar = _run_gar(ctx, gar)
    generator = gar_params(ctx, step, gar).get("generator") if gar.randomized else None
    R = gar(vectors, generator=generator)
    # theta - lr (R + wd theta) as (1 - lr wd) theta - lr R: one pass over d instead of three.
    new_theta = torch.add(theta * (1.0 - cfg.lr * cfg.weight_decay) if cfg.weight_decay else theta, R, alpha=-cfg.lr)
    return new_theta, R
