"""The Ray actor engine: honest-worker actors and a Byzantine actor, with the process that
drives the run as the parameter server.

One step (Algorithm 1 of paper 001):

    theta_t (put once in the object store)  ->  HonestWorkers.round  (one call per worker actor)
    honest outputs (ObjectRefs)             ->  ByzantineWorkers.craft (omniscient: sees them all)
    honest + Byzantine vectors              ->  server_step here -> theta_{t+1}, metrics

The driver is the parameter server: in a tune job that is the trial's trainable, itself a Ray
actor, which would otherwise only wait on a separate server actor. It reads the honest outputs
as soon as they exist (same-node reads map the object store's buffers, no copy) and computes
their half of the metrics while the Byzantine actor crafts; then the GAR and the update. The
actors call the same step functions as the local engine (:mod:`..step`), and the server calls
:func:`..server.server_step`, keyed by worker id, so a run gives the local engine's numbers
however the workers are grouped.

How the vectors travel (``actors.transport``): when every actor runs on the server's node (CPU,
Linux), through shared memory, an eventfd per actor to start its part and a Unix socket to hear
it is done (:mod:`.channel`: the workers write their rows straight into the GAR's input, no Ray
call per step); otherwise, and for any step a channel fails, through Ray's object store as
ObjectRefs. Same numbers either way.

The actors are warm (:mod:`.pool`): started once per process and layout, reset for each run.
They keep nothing between steps: theta_t and each actor's previous output (which carries its
workers' momentum) travel as arguments, or stay in the channel's other buffer. When a worker
actor dies (killed, OOM) or hangs past
``actors.step_timeout_s``, the engine starts a new one (up to ``actors.max_restarts`` times per
run, a hang only once), hands it the last momentum and recomputes the step: the run ends with
the numbers of an undisturbed run. When it cannot, it raises :class:`WorkerLost`, naming the
actor and its worker ids.
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from tuneguard.config import ExperimentConfig
from tuneguard.raycluster import RayConnection, connect
from tuneguard.training.actors import channel as channels
from tuneguard.training.actors import pool as pools
from tuneguard.training.actors.layout import ActorLayout, plan_layout
from tuneguard.training.actors.pool import ActorPool, Slot, WorkerLost
from tuneguard.training.actors.remote import (
    Packed,
    dataset_from_numpy,
    dataset_to_numpy,
    read_rows,
    to_tensor,
)
from tuneguard.training.metrics import Moments, evaluate
from tuneguard.training.server import HonestSummary, honest_summary, server_step
from tuneguard.training.step import WorkerOutput


@dataclass
class ActorState:
    """theta_t (here, on the server) and where each actor's output of step t - 1 is: ObjectRefs,
    or (``shared``) the channel buffer that holds the rows of step t - 1."""

    theta: torch.Tensor
    honest: list[ray.ObjectRef | None]  # per worker actor: its last output (momentum), None at start
    byz: ray.ObjectRef | None = None  # Byzantine actor's last output (label-flip momentum)
    shared: int | None = None  # step t - 1 went through the channel: its rows are in rows[shared]


@dataclass
class _StepRefs:
    honest: list[ray.ObjectRef | None]
    byz: ray.ObjectRef | None = None
    sent: dict[int, Any] = field(default_factory=dict)  # slot position -> the handle its call went to


class ActorEngine:
    """Runs steps on Ray actors; same interface and same numbers as the local engine.

    ``ActorEngine(cfg)`` connects to Ray (:func:`tuneguard.raycluster.connect`: the running
    connection inside a Tune trial, else ``actors.address`` / ``RAY_ADDRESS``, else a private
    local cluster it shuts down in :meth:`close`) and takes its actors from this process's warm
    pool when the layout matches (:func:`.pool.acquire`), else starts them. The dataset goes to
    the object store once per pool; ``data``, an ObjectRef of a packed dataset
    (:func:`.remote.dataset_to_numpy`), replaces reading it from disk (clusters without a shared
    filesystem).

    ``warm``: keep the actors for the next run of this process after :meth:`close` (default:
    when the Ray connection is not this engine's own, e.g. inside a Tune trial).
    """

    name = "actors"

    def __init__(self, cfg: ExperimentConfig, *, connection: RayConnection | None = None,
                 data: ray.ObjectRef | None = None, warm: bool | None = None):
        from tuneguard.training.context import build_context

        self.cfg = cfg
        self.pool: ActorPool | None = None
        self._conn: RayConnection | None = None
        self._closed = False
        self.startup_seconds = float("nan")
        self.reused = False
        self.restart_log: list[str] = []
        self.placement_group = None
        self._broken = False
        self._stack: torch.Tensor | None = None
        self.run_key = uuid.uuid4().hex  # this run's context on the (possibly shared) actors
        self._restarts: dict[int, int] = {}  # slot position -> restarts in this run
        self._timeouts: dict[int, int] = {}
        self._channel: channels.Channel | None = None
        self._channel_off: str | None = None  # why this run's steps go through the object store
        self._channel_failures = 0
        self.steps_by_transport = {"shared_memory": 0, "object_store": 0}
        self.transport_log: list[str] = []
        # per shared-memory step (the last 1000), where its time went, in ms: see _shared_step
        self.timeline: collections.deque[dict[str, float]] = collections.deque(maxlen=1000)
        from tuneguard.training.plan import InfeasibleBudget

        try:
            self._conn = connection or connect(cfg.actors.address)
            self.warm = (not self._conn.owned) if warm is None else warm
            t0 = time.perf_counter()
            layout, bundles, pg = self._resolve_layout()
            self.placement_group = pg  # the Tune trial's placement group the actors run in, or None
            kwargs = _pool_kwargs(cfg, layout, bundles, pg)
            if self.warm:
                self.pool, self.reused = pools.acquire(layout, **kwargs)
            else:
                self.pool = ActorPool(layout, **kwargs)
                self.pool.users = 1
            self.pool.spawn()  # new actors import torch while this process loads the data
            shipped = dataset_from_numpy(ray.get(data)) if data is not None else None
            # The same data, partition and privacy plan as the local engine: this process is the
            # parameter server (GAR, update, evaluation). An infeasible budget raises here (the
            # warm actors stay for the next run).
            self.ctx = build_context(cfg, "cuda" if layout.gpus else "cpu", data=shipped)
            self.plan = self.ctx.plan
            self.label_flip = self.ctx.label_flip
            self.d = self.ctx.d
            if data is not None:
                key, ref = f"ref:{data.hex()}", data
            else:
                key = json.dumps([cfg.dataset, cfg.data_dir or "", cfg.dataset_params], sort_keys=True, default=str)
                ref = self.pool.data_ref(key, lambda data=self.ctx.data: dataset_to_numpy(data))
            del shipped
            self.pool.attach(self.run_key, cfg, self.plan, key, ref)
            self.startup_seconds = time.perf_counter() - t0
        except InfeasibleBudget:
            self.close()
            raise
        except BaseException:
            self.close(keep=False)
            raise

    # Set-up --------------------------------------------------------------------------------
    def _resolve_layout(self) -> tuple[ActorLayout, list[dict[str, float]] | None, Any]:
        """The layout, and inside a placement group (a Tune trial) the bundle of each actor."""
        from ray.util.placement_group import get_current_placement_group

        cfg = self.cfg
        pg = get_current_placement_group()
        if pg is None:
            layout = plan_layout(cfg, gpu=self._gpu_outside_pg())
            self._check_fits(layout)
            return layout, None, None
        specs = list(pg.bundle_specs)
        spare = len(specs) - 1 - int(cfg.f > 0)  # bundle 0: this driver (the server); then [Byzantine]
        gpu = any(b.get("GPU", 0) > 0 for b in specs[1:])
        layout = plan_layout(cfg, gpu=gpu, n_worker_actors=max(spare, 1))
        if spare < 1 or layout.n_actors + 1 > len(specs):
            raise RuntimeError(
                f"this run executes inside a Ray placement group with {len(specs)} bundles, but the actor "
                f"engine needs {layout.n_actors + 1} (1 for the driver, which is the parameter server, "
                f"{len(layout.groups)} honest-worker actors{', 1 Byzantine actor' if layout.byzantine else ''}). "
                "In Ray Tune, reserve them with tune.with_resources(trainable, "
                "tuneguard.training.actors.trial_resources(cfg)) for the same config."
            )
        return layout, specs, pg

    def _check_fits(self, layout: ActorLayout) -> None:
        """Fail at once, not after a start-up timeout, when the cluster can never hold the actors."""
        total = ray.cluster_resources()
        need_cpu = layout.n_actors * layout.cpus
        if need_cpu > total.get("CPU", 0.0) + 1e-9:
            n = layout.n_actors
            raise RuntimeError(
                f"the actor engine needs {n} actors x actors.cpus_per_actor={layout.cpus:g} = {need_cpu:g} CPUs, "
                f"but the Ray cluster has {total.get('CPU', 0.0):g}. Set actors.cpus_per_actor <= "
                f"{total.get('CPU', 0.0) / n:.3g}, or raise actors.workers_per_actor (fewer worker actors; "
                f"now {len(layout.groups)} of up to {max(len(g) for g in layout.groups)} workers)."
            )

    def _gpu_outside_pg(self) -> bool:
        """``device: auto`` means CUDA when the cluster has GPUs (the local engine: this process)."""
        if self.cfg.device == "cpu":
            return False
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        if self.cfg.device.startswith("cuda") and not has_gpu:
            raise RuntimeError(
                f"device={self.cfg.device!r} but the Ray cluster has no GPU resources; "
                "use device: auto or cpu, or a cluster with GPUs"
            )
        return has_gpu

    @property
    def layout(self) -> ActorLayout:
        assert self.pool is not None
        return self.pool.layout

    @property
    def _slots(self) -> list[Slot]:
        return self.pool.slots if self.pool is not None else []

    @property
    def worker_actors(self) -> list[Any]:
        """Handles of the honest-worker actors (in worker-id order)."""
        return [s.handle for s in self._slots if s.kind == "workers"]

    @property
    def byzantine_actor(self):
        return next((s.handle for s in self._slots if s.kind == "byzantine"), None)

    def nodes(self) -> list[str]:
        """The Ray node ids the run's processes use: this one (the server), then each actor's."""
        return [ray.get_runtime_context().get_node_id(), *(self.pool.nodes() if self.pool is not None else [])]

    def actor_names(self) -> list[str]:
        return self.pool.names() if self.pool is not None else []

    @property
    def transport(self) -> str:
        """How this run's steps travelled: ``shared_memory``, ``object_store``, or both with counts."""
        done = {k: v for k, v in self.steps_by_transport.items() if v}
        if len(done) == 2:
            return ", ".join(f"{k} ({v} steps)" for k, v in done.items())
        if done:
            return next(iter(done))
        return "object_store" if self._channel_off else "shared_memory"

    @property
    def restarts(self) -> int:
        """Actor restarts in this run."""
        return len(self.restart_log)

    def _kill_worker_for_test(self, i: int) -> None:
        """Test hook: kill honest-worker actor ``i`` as an OOM kill would."""
        ray.kill(self.worker_actors[i], no_restart=True)

    def actor_memory(self) -> dict[str, dict[str, float]]:
        """Memory of each actor process in MiB (rss, pss, uss), by actor label."""
        refs = [s.handle.memory.remote() for s in self._slots]
        return {s.label: m for s, m in zip(self._slots, ray.get(refs, timeout=60), strict=True)}

    # Steps ---------------------------------------------------------------------------------
    def init_state(self) -> ActorState:
        return ActorState(self.ctx.initial_theta(), [None] * len(self.layout.groups), None)

    def step(self, state: ActorState, t: int) -> tuple[ActorState, dict[str, float]]:
        try:
            return self._step(state, t)
        except BaseException:
            self._broken = True  # a failed run's actors are not handed to the next run
            raise

    def _step(self, state: ActorState, t: int) -> tuple[ActorState, dict[str, float]]:
        ch = self._open_channel()
        if ch is not None:
            try:
                out = self._shared_step(ch, state, t)
                self.steps_by_transport["shared_memory"] += 1
                return out
            except channels.ChannelBroken as err:
                # The object store path finds what failed and restarts it (same numbers); the
                # next step opens new channels.
                state = self._leave_channel(state)
                self._channel_failures += 1
                self.transport_log.append(f"step {t + 1}: the shared-memory channel broke ({err}); "
                                          "the step went through the object store")
            except channels.ChannelError as err:
                raise RuntimeError(f"step {t + 1}: an actor failed:\n{err}") from None
        out = self._object_store_step(state, t)
        self.steps_by_transport["object_store"] += 1
        return out

    # Same-node channel ----------------------------------------------------------------------
    def _open_channel(self) -> channels.Channel | None:
        if self._channel is not None or self._channel_off is not None:
            return self._channel
        why = self._channel_unusable()
        if why is None and self._channel_failures >= 3:
            why = f"the shared-memory channel failed {self._channel_failures} times"
            self.transport_log.append(f"{why}: the run's next steps go through the object store")
        if why is not None:
            self._channel_off = why
            return None
        assert self.pool is not None
        cfg = self.cfg
        with self.pool.lock:  # the addresses of actors a sibling run is not replacing right now
            addresses = [s.channel for s in self._slots]
        specs = [{"index": s.index, "run": self.run_key} for s in self._slots]
        geometry = channels.Geometry(self.d, cfg.n_workers, len(self.layout.groups))
        try:
            self._channel = channels.Channel(geometry, addresses, specs, cfg.actors.step_timeout_s)  # type: ignore[arg-type]
        except (OSError, EOFError, AuthenticationError, channels.ChannelBroken, channels.ChannelError) as err:
            self._channel_failures += 1
            self.transport_log.append(f"could not open the shared-memory channel ({type(err).__name__}: {err})")
        return self._channel

    def _channel_unusable(self) -> str | None:
        """Why this run cannot use same-node channels, or None."""
        if self.cfg.actors.transport != "auto":
            return f"actors.transport={self.cfg.actors.transport}"
        if not channels.supported():
            return "shared memory by descriptor needs Linux"
        if self.layout.gpus or self.ctx.device.type != "cpu":
            return "CUDA runs use the object store"
        here = ray.get_runtime_context().get_node_id()
        if any(s.node_id != here for s in self._slots):
            return "actors on other nodes"
        if any(s.channel is None for s in self._slots):
            return "an actor without a channel"
        return None

    def _close_channel(self) -> None:
        ch, self._channel = self._channel, None
        if ch is not None:
            ch.close()

    def _leave_channel(self, state: ActorState) -> ActorState:
        """``state`` with step t - 1's rows (the momentum) as ObjectRefs; closes the channel."""
        if state.shared is not None:
            assert self._channel is not None
            mom = self._channel.buffers.rows[state.shared]
            state = self.import_state(self._momentum_of(mom, state.theta))
        self._close_channel()
        return state

    def _momentum_of(self, rows: torch.Tensor, theta: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The checkpoint form of the momentum buffers kept in a channel buffer's ``rows``."""
        cfg = self.cfg
        h, n = cfg.n_honest, cfg.n_workers
        momentum = rows[:h].clone() if cfg.momentum > 0 else None
        byz = rows[h:n].clone() if cfg.momentum > 0 and self.label_flip and n > h else None
        return {"theta": theta.detach().cpu().clone(), "momentum": momentum, "byz_momentum": byz}

    def _shared_step(self, ch: channels.Channel, state: ActorState, t: int) -> tuple[ActorState, dict[str, float]]:
        """Step t through the channel (module docstring of :mod:`.channel`)."""
        cfg = self.cfg
        h, n = cfg.n_honest, cfg.n_workers
        bufs = ch.buffers
        groups = self.layout.groups
        if state.shared is None:  # the momentum arrives as ObjectRefs (a checkpoint, a failed step)
            read = 0
            prev = self._seed(bufs.rows[read], state)
            byz_prev = prev and state.byz is not None
        else:
            read = state.shared
            prev = byz_prev = cfg.momentum > 0
        w = 1 - read
        t0 = time.monotonic()
        bufs.theta.copy_(state.theta)
        for i in range(len(groups)):
            ch.go(i, t, w, prev)
        byz = len(groups) if self._byz_slot() is not None else None
        if byz is not None and self.label_flip:  # they train on their own: they need no honest row
            ch.go(byz, t, w, byz_prev)
        replies = [ch.recv(i) for i in range(len(groups))]
        t_honest = time.monotonic()
        if byz is not None and not self.label_flip:
            ch.go(byz, t, w, False)
        # The honest half of the server's work overlaps the Byzantine actor's crafting.
        loss, grad_norm, clipped = (torch.from_numpy(np.concatenate([r[k] for r in replies])) for k in range(3))
        sample, submit = (Moments.combine([Moments(len(g), bufs.means[i, j].clone(), float(r[3 + j]))
                                           for i, (g, r) in enumerate(zip(groups, replies, strict=True))])
                          for j in (0, 1))
        honest = WorkerOutput(sample, bufs.rows[w][:h], None, loss, grad_norm, clipped)  # type: ignore[arg-type]
        summary = honest_summary(honest, submit)
        if byz is not None:
            ch.recv(byz)
        t_byz = time.monotonic()
        stack = bufs.rows[w] if n > h else bufs.rows[w][:h]
        theta, metrics = server_step(self.ctx, state.theta, honest, None, t, summary=summary, stacked=stack)
        self._record(ch, t0, t_honest, t_byz, time.monotonic(), len(groups))
        return ActorState(theta, [None] * len(groups), None, shared=w), metrics

    def _record(self, ch: channels.Channel, t0: float, t_honest: float, t_byz: float, t_end: float, a: int) -> None:
        """Where a shared-memory step's time went (ms; the actors' clock is this node's): until the
        last worker actor began, its computing, until the server read the last rows, the
        Byzantine actor's part (wake-up, crafting, reply; overlapping the server's honest
        metrics), the server's GAR, update and metrics, the whole step."""
        times = [x for x in ch.last_times[:a] if x is not None]
        if len(times) != a:
            return
        ms = 1e3
        row = {"start": (max(x[1] for x in times) - t0) * ms,
               "workers": max(x[2] - x[1] for x in times) * ms,
               "gather": (t_honest - max(x[2] for x in times)) * ms,
               "byzantine": (t_byz - t_honest) * ms,
               "server": (t_end - t_byz) * ms,
               "step": (t_end - t0) * ms}
        if len(ch.last_times) > a and ch.last_times[a] is not None:
            row["craft"] = (ch.last_times[a][2] - ch.last_times[a][1]) * ms
        self.timeline.append(row)

    def _seed(self, rows: torch.Tensor, state: ActorState) -> bool:
        """Write the momentum of ``state``'s ObjectRefs into ``rows``; whether there was any."""
        cfg = self.cfg
        if cfg.momentum <= 0 or any(r is None for r in state.honest):
            return False
        outs = ray.get(list(state.honest))
        if any(o.get("momentum") is None for o in outs):
            return False
        for g, o in zip(self.layout.groups, outs, strict=True):
            rows[g[0]:g[-1] + 1].copy_(torch.from_numpy(o["momentum"]))
        if state.byz is not None:
            mom = ray.get(state.byz).get("momentum")
            if mom is not None:
                rows[cfg.n_honest:cfg.n_workers].copy_(torch.from_numpy(mom))
        return True

    # Object store ---------------------------------------------------------------------------
    def _object_store_step(self, state: ActorState, t: int) -> tuple[ActorState, dict[str, float]]:
        theta_ref = ray.put(state.theta.detach().cpu().numpy())
        refs = _StepRefs([None] * len(self.layout.groups))
        timeout = self.cfg.actors.step_timeout_s
        while True:
            self._submit(state, theta_ref, t, refs)
            try:
                # The honest half of the server's work overlaps the Byzantine actor's crafting.
                honest, summary, stack = self._honest(ray.get(refs.honest, timeout=timeout))
                byz = ray.get(refs.byz, timeout=timeout) if refs.byz is not None else None
                break
            except RayError as err:
                self._recover(err, refs, t)
        h = self.cfg.n_honest
        if byz is not None and byz["vectors"].shape[0]:
            stack[h:].copy_(to_tensor(byz["vectors"], stack.device))
        else:
            stack = stack[:h]
        theta, metrics = server_step(self.ctx, state.theta, honest, None, t, summary=summary, stacked=stack)
        return ActorState(theta, refs.honest, refs.byz if self.label_flip else None), metrics

    def _honest(self, outputs: list[Packed]) -> tuple[WorkerOutput, HonestSummary, torch.Tensor]:
        """The honest outputs as one WorkerOutput whose ``submit`` rows are the first h rows of
        an [n, d] buffer the Byzantine vectors then fill: one copy into the GAR's input, not two."""
        ctx = self.ctx
        dev = ctx.device
        n, h = ctx.cfg.n_workers, ctx.cfg.n_honest
        if self._stack is None or self._stack.shape != (n, ctx.d) or self._stack.device != dev:
            self._stack = torch.empty(n, ctx.d, device=dev)
        stack = self._stack
        row = 0
        for p in outputs:
            k = p["submit"].shape[0]
            stack[row:row + k].copy_(to_tensor(p["submit"], dev))
            row += k
        assert row == h, (row, h)
        loss, grad_norm, clipped = (read_rows([p[k] for p in outputs], dev) for k in ("loss", "grad_norm", "clipped_frac"))
        sample = Moments.combine([Moments(p["submit"].shape[0], to_tensor(p["sample_mean"], dev), float(p["sample_m2"]))
                                  for p in outputs])
        out = WorkerOutput(sample, stack[:h], None, loss, grad_norm, clipped)  # type: ignore[arg-type]
        return out, honest_summary(out), stack

    def _submit(self, state: ActorState, theta_ref: ray.ObjectRef, t: int, refs: _StepRefs) -> None:
        """Submit whatever part of step t has no result yet; nothing waits here."""
        workers = [s for s in self._slots if s.kind == "workers"]
        run = self.run_key
        assert self.pool is not None
        with self.pool.lock:  # not while a sibling run replaces an actor and resets it for us
            self._submit_locked(state, theta_ref, t, refs, workers, run)

    def _submit_locked(self, state: ActorState, theta_ref: ray.ObjectRef, t: int, refs: _StepRefs,
                       workers: list[Slot], run: str) -> None:
        for i, slot in enumerate(workers):
            if refs.honest[i] is None:
                refs.sent[i] = slot.handle
                refs.honest[i] = slot.handle.round.remote(run, theta_ref, state.honest[i], t)
        byz_slot = self._byz_slot()
        if byz_slot is not None and refs.byz is None:
            refs.sent[len(workers)] = byz_slot.handle
            if self.label_flip:  # label flippers train on their own; they need no honest vector
                refs.byz = byz_slot.handle.craft.remote(run, t, theta_ref, state.byz)
            else:
                refs.byz = byz_slot.handle.craft.remote(run, t, None, None, *refs.honest)

    def _byz_slot(self) -> Slot | None:
        return next((s for s in self._slots if s.kind == "byzantine"), None)

    def _recover(self, err: RayError, refs: _StepRefs, t: int) -> None:
        """Find the actors that died or hung during step t, restart them and drop the results
        that depended on them; re-raise errors that are not actor failures."""
        timed_out = isinstance(err, GetTimeoutError)
        if not timed_out and _lost_actor_id(err) is None:
            raise err  # an error in the step itself (a bug, bad input), not a lost actor
        dead_ids = {_lost_actor_id(err)} - {None}
        workers = [s for s in self._slots if s.kind == "workers"]
        byz = self._byz_slot()
        parts: list[tuple[Slot, ray.ObjectRef | None]] = list(zip(workers, refs.honest, strict=True))
        if byz is not None:
            parts.append((byz, refs.byz))
        hung: list[Slot] = []
        for slot, ref in parts:
            if ref is None:
                continue
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                if timed_out:
                    hung.append(slot)
                continue
            try:
                ray.get(ref, timeout=0)
            except RayError as e:
                if _lost_actor_id(e) is None:
                    raise
                dead_ids.add(_lost_actor_id(e))
        dead = [s for s in self._slots if s.actor_id in dead_ids or (s.past_ids & dead_ids)]
        if any(s.kind == "workers" for s in hung):
            hung = [s for s in hung if s.kind == "workers"]  # the Byzantine actor waits on the workers
        if not dead and not hung:
            raise WorkerLost(f"step {t + 1}: an actor of the run was lost ({err})") from err
        where = f"step {t + 1}"
        for slot in hung:
            if slot not in dead:
                self._count_timeout(slot, where)
        positions = {id(s): i for i, s in enumerate(self._slots)}
        for slot in dead + [s for s in hung if s not in dead]:
            seen = refs.sent.get(positions[id(slot)], slot.handle)
            self._restart(slot, seen, where, "died" if slot in dead else "hung", err)
        # Drop the results of restarted actors and of everything downstream of them.
        restarted = {id(s) for s in dead + hung}
        for i, slot in enumerate(workers):
            if id(slot) in restarted:
                refs.honest[i] = None
        if byz is not None and (id(byz) in restarted or (not self.label_flip and any(r is None for r in refs.honest))):
            refs.byz = None

    def _count_timeout(self, slot: Slot, where: str) -> None:
        pos = self._slots.index(slot)
        self._timeouts[pos] = self._timeouts.get(pos, 0) + 1
        if self._timeouts[pos] > 1:
            raise WorkerLost(
                f"{where}: the {slot.label} did not answer within actors.step_timeout_s="
                f"{self.cfg.actors.step_timeout_s:g} s, again after a restart; the run stops. "
                "Raise actors.step_timeout_s if steps are legitimately this slow.",
                slot.label, slot.workers,
            )

    def _restart(self, slot: Slot, seen: Any, where: str, why: str, err: BaseException) -> None:
        """Replace ``slot``'s actor (``seen``: the handle our failed call went to); counts
        against ``actors.max_restarts`` for this run. When a sibling run sharing the pool has
        already replaced it, the step is only resubmitted."""
        assert self.pool is not None
        limit = self.cfg.actors.max_restarts
        pos = self._slots.index(slot)
        done = self._restarts.get(pos, 0)
        if slot.handle is seen and done >= limit:
            raise WorkerLost(
                f"{where}: the {slot.label} {why} ({type(err).__name__}) and "
                + (f"has already been restarted {limit} time(s) (actors.max_restarts={limit})"
                   if limit else "restarts are disabled (actors.max_restarts=0)")
                + "; the run stops.",
                slot.label, slot.workers,
            ) from None
        if self.pool.restart(slot, seen):
            self._restarts[pos] = done + 1
            self.restart_log.append(f"{where}: restarted the {slot.label} ({why}), restart {done + 1}/{limit}")

    def export_state(self, state: ActorState) -> dict[str, torch.Tensor | None]:
        if state.shared is not None:
            assert self._channel is not None, "the channel holding this state's momentum is closed"
            return self._momentum_of(self._channel.buffers.rows[state.shared], state.theta)
        theta = state.theta.detach().cpu().clone()
        momentum = None
        if self.cfg.momentum > 0 and all(r is not None for r in state.honest):
            momentum = torch.cat([torch.from_numpy(ray.get(r)["momentum"].copy()) for r in state.honest])
        byz_momentum = None
        if state.byz is not None and self.cfg.momentum > 0:
            byz_momentum = torch.from_numpy(ray.get(state.byz)["momentum"].copy())
        return {"theta": theta, "momentum": momentum, "byz_momentum": byz_momentum}

    def import_state(self, saved: dict[str, torch.Tensor | None]) -> ActorState:
        np_ = lambda x: x.detach().cpu().contiguous().numpy()  # noqa: E731
        honest: list[ray.ObjectRef | None] = [None] * len(self.layout.groups)
        if saved.get("momentum") is not None:
            mom = saved["momentum"]
            honest = [ray.put({"momentum": np_(mom[g[0] : g[-1] + 1])}) for g in self.layout.groups]
        byz = None
        if saved.get("byz_momentum") is not None:
            byz = ray.put({"momentum": np_(saved["byz_momentum"])})
        return ActorState(saved["theta"].to(self.ctx.device), honest, byz)

    def evaluate(self, state: ActorState) -> tuple[float, float]:
        return evaluate(self.ctx, state.theta)

    # Shutdown -------------------------------------------------------------------------------
    def close(self, wait_s: float = 10.0, *, keep: bool | None = None) -> None:
        """End the run: keep the actors warm for this process's next run (``warm``), or kill them
        (waiting up to ``wait_s``); shut Ray down if this engine started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        keep = getattr(self, "warm", False) and not self._broken if keep is None else keep
        if getattr(self, "_channel", None) is not None:
            self._close_channel()
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.detach(self.run_key)
            if getattr(self, "warm", False):
                pools.release(pool, broken=not keep)
            else:
                pool.kill(wait_s)
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> ActorEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leave actors behind
        try:
            self.close()
        except Exception:
            pass


def _pool_kwargs(cfg: ExperimentConfig, layout: ActorLayout, bundles, pg) -> dict[str, Any]:
    return dict(n_honest=cfg.n_honest, n_workers=cfg.n_workers, threads=max(1, int(layout.cpus)),
                bundles=bundles, pg=pg, ready_timeout_s=max(cfg.actors.step_timeout_s, 60.0))


def prewarm(cfg: ExperimentConfig) -> ActorPool | None:
    """Start this process's warm actors for the runs of ``cfg`` now, without waiting: inside a
    Tune trial their processes boot (each imports torch) while the trial sets up its runs.
    Returns the pool with one use held (hand it back with :func:`.pool.release`), or None where
    runs would not use a warm pool (no Ray connection, or not inside a placement group)."""
    from ray.util.placement_group import get_current_placement_group

    if cfg.engine != "actors" or not ray.is_initialized() or get_current_placement_group() is None:
        return None
    probe = ActorEngine.__new__(ActorEngine)  # the layout rules of a run, without starting one
    probe.cfg = cfg
    layout, bundles, pg = probe._resolve_layout()
    pool, _ = pools.acquire(layout, **_pool_kwargs(cfg, layout, bundles, pg))
    pool.spawn()
    return pool


def _lost_actor_id(err: BaseException) -> str | None:
    """The id of the actor whose loss ``err`` reports (directly, or as the failed dependency of a
    later task); None when ``err`` is not about a lost actor."""
    if not isinstance(err, RayActorError):
        cause = getattr(err, "cause", None)
        if not isinstance(cause, RayActorError):
            return None
        err = cause
    aid = getattr(err, "actor_id", None)
    if aid is None:
        return "<unknown>"
    return aid if isinstance(aid, str) else aid.hex()
