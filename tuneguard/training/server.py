"""Step 4 of Algorithm 1 (paper 001) and the step's metrics: the one server step every engine
calls, whatever computed the honest and Byzantine vectors.

    R_t = GAR(g_1, ..., g_h, b_1, ..., b_f)
    theta_{t+1} = theta_t - lr (R_t + wd theta_t)

plus the metrics of the step: the honest workers' VN ratios before noise ("sample") and at the
GAR ("submit"; 001 Eq. 37), the mean loss, the mean unclipped gradient norm, the clipped
fraction, ||mean of honest submissions||, ||R_t - that mean|| and ||theta_{t+1}||.

The local engine calls :func:`server_step` with its workers' output; the Ray actor engine's
driver (the parameter server; a trial's trainable in a tune job) calls the same function with
the outputs its worker actors sent. The
honest-only half (:func:`honest_summary`) may run earlier, while Byzantine workers craft
(the actor engine overlaps the two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneguard.training.context import RunContext
from tuneguard.training.metrics import Moments, gar_distance, honest_metrics
from tuneguard.training.step import WorkerOutput, aggregate_and_update


@dataclass
class HonestSummary:
    """The honest-only part of a step's metrics (computable before the Byzantine vectors exist)."""

    mean: torch.Tensor  # [d] mean of the honest submissions
    metrics: dict[str, float]


def honest_summary(honest: WorkerOutput, submit: Moments | None = None) -> HonestSummary:
    """``submit``: the moments of ``honest.submit`` when the caller has them (the actor
    engine's worker actors compute their groups'); else computed here, from the same one-pass
    statistics the little attack reads (computed once a step when both run in this process)."""
    submit = Moments.of_deviations(honest.submit) if submit is None else submit
    return HonestSummary(submit.mean, honest_metrics(honest.sample, submit, honest.loss, honest.grad_norm,
                                                     honest.clipped_frac))


def server_step(
    ctx: RunContext,
    theta: torch.Tensor,
    honest: WorkerOutput,
    byz: torch.Tensor | None,
    t: int,
    *,
    summary: HonestSummary | None = None,
    stacked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Aggregate, update and measure step ``t``; returns (theta_{t+1}, metrics).

    ``byz``: the f Byzantine vectors ([f, d]; None or empty when f = 0). ``stacked``, when the
    caller already holds the n vectors in one [n, d] tensor (honest rows first, as
    ``honest.submit`` views them), saves the concatenation. ``summary``: :func:`honest_summary`
    computed earlier.
    """
    summary = summary if summary is not None else honest_summary(honest)
    if stacked is None:
        stacked = honest.submit if byz is None or byz.shape[0] == 0 else torch.cat([honest.submit, byz])
    new_theta, R = aggregate_and_update(ctx, theta, stacked, t, gar=ctx.gar)
    metrics = {**summary.metrics, "gar_distance": gar_distance(R, summary.mean), "param_norm": float(new_theta.norm())}
    return new_theta, metrics
