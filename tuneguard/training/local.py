"""The local engine: every honest worker of a step in one batched pass, in this process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tuneguard import _rowstats as rowstats
from tuneguard.training.context import RunContext
from tuneguard.training.metrics import evaluate
from tuneguard.training.server import HonestSummary, honest_summary, server_step
from tuneguard.training.step import WorkerOutput, byzantine_vectors, worker_round


@dataclass
class TrainState:
    theta: torch.Tensor  # [d]
    momentum: torch.Tensor | None  # [h, d] honest workers' momentum buffers
    byz_momentum: torch.Tensor | None  # [f, d] label-flipping workers' buffers


class LocalEngine:
    """Runs steps in-process. ``worker_groups`` (a test hook) splits the honest workers into
    groups computed one after another; results must not depend on it."""

    name = "local"

    def __init__(self, ctx: RunContext, worker_groups: Sequence[Sequence[int]] | None = None):
        self.ctx = ctx
        self.plan = ctx.plan
        h = ctx.cfg.n_honest
        self.groups = [list(g) for g in worker_groups] if worker_groups else [list(range(h))]
        if sorted(w for g in self.groups for w in g) != list(range(h)):
            raise ValueError(f"worker_groups must partition range({h}); got {self.groups}")

    def init_state(self) -> TrainState:
        return TrainState(self.ctx.initial_theta(), None, None)

    def step(self, state: TrainState, t: int) -> tuple[TrainState, dict[str, float]]:
        ctx = self.ctx
        cfg = ctx.cfg
        h, n = cfg.n_honest, cfg.n_workers
        one_group = len(self.groups) == 1
        # With one group (the default) the workers write their rows straight into the GAR's
        # [n, d] input (honest rows first, then the Byzantine ones): no concatenation pass.
        # A fresh tensor each step: the honest rows double as the momentum buffers the next
        # step reads.
        stacked = torch.empty(n, ctx.d, device=ctx.device, dtype=ctx.params.dtype) if one_group else None
        with rowstats.shared():  # the attack's pass over the honest rows serves the metrics too
            honest, flipped, byz, summary = self._workers(state, t, stacked)
        if stacked is not None:
            if n == h:
                stacked = stacked[:h]
            elif byz.data_ptr() != stacked[h:].data_ptr():  # label flippers wrote their rows in place
                stacked[h:].copy_(byz)
        theta, metrics = server_step(ctx, state.theta, honest, byz, t, summary=summary, stacked=stacked)
        new_state = TrainState(theta, honest.momentum, flipped.momentum if flipped is not None else None)
        return new_state, metrics

    def _workers(self, state: TrainState, t: int, stacked: torch.Tensor | None
                 ) -> tuple[WorkerOutput, WorkerOutput | None, torch.Tensor, HonestSummary]:
        """Steps 2 and 3 and the honest half of the metrics: (honest, label flippers, the
        Byzantine vectors, the honest summary)."""
        ctx = self.ctx
        h, n = ctx.cfg.n_honest, ctx.cfg.n_workers
        one_group = stacked is not None
        parts = []
        for g in self.groups:
            # One group takes the buffer as is: indexing would copy [h, d].
            mom = state.momentum if state.momentum is None or one_group else state.momentum[g]
            parts.append(worker_round(ctx, state.theta, mom, g, t, submit_out=stacked[:h] if one_group else None))
        honest = WorkerOutput.concat(parts)
        if not one_group:
            # Rows follow the group order; put them back in worker-id order.
            order = torch.tensor([w for g in self.groups for w in g]).argsort()
            honest = _reorder(honest, order.to(ctx.device))
        flipped = None
        if ctx.label_flip:
            byz_ids = list(range(h, n))
            flipped = worker_round(ctx, state.theta, state.byz_momentum, byz_ids, t, flip=True,
                                   submit_out=stacked[h:] if one_group else None)
        byz = byzantine_vectors(ctx, honest.submit, t, flipped, gar=ctx.gar)
        # Before the Byzantine rows land next to the honest ones: writing them bumps the version
        # counter the honest rows' view shares, and the metrics would then read the honest
        # rows again instead of reusing the attack's pass over them (tuneguard._rowstats).
        return honest, flipped, byz, honest_summary(honest)

    def export_state(self, state: TrainState) -> dict[str, torch.Tensor | None]:
        cpu = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        return {"theta": cpu(state.theta), "momentum": cpu(state.momentum), "byz_momentum": cpu(state.byz_momentum)}

    def import_state(self, saved: dict[str, torch.Tensor | None]) -> TrainState:
        dev = lambda t: None if t is None else t.to(self.ctx.device)  # noqa: E731
        return TrainState(dev(saved["theta"]), dev(saved["momentum"]), dev(saved["byz_momentum"]))

    def evaluate(self, state: TrainState) -> tuple[float, float]:
        return evaluate(self.ctx, state.theta)

    def close(self) -> None:
        pass


def _reorder(out: WorkerOutput, order: torch.Tensor) -> WorkerOutput:
    pick = lambda t: None if t is None else t[order]  # noqa: E731
    return WorkerOutput(*(pick(getattr(out, k)) for k in ("sample", "submit", "momentum", "loss", "grad_norm", "clipped_frac")))
