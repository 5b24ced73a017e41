"""Warm actors: the honest-worker and Byzantine actors of a layout, started once and
reset (not restarted) for every run.

A pool belongs to the process that started it (the trainable of a Tune trial, or a script) and
dies with it. Inside a Ray connection this process does not own (a Tune trial, or the caller's
own ``ray.init``), :func:`acquire` keeps the pool after a run ends and hands it to the next run
with the same layout in the same placement group: the runs of a trial (attacks x seeds) and,
when Tune reuses the trial's process (``reuse_actors``), the trials of a job start no new actor.

Between runs each actor gets ``reset(cfg, plan, data_key, [data])``: it rebuilds its run
context (partition, model, buffers) and fetches the dataset from the object store only when
``data_key`` changed. Momentum and parameters travel with each step (ObjectRefs the engine
holds), so nothing of an earlier run can leak into the next one.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from tuneguard.training.actors.layout import ActorLayout
from tuneguard.training.actors.remote import ByzantineWorkers, HonestWorkers


class WorkerLost(RuntimeError):
    """An actor of the run died or hung and could not be replaced; the run stops."""

    def __init__(self, message: str, actor: str = "", workers: list[int] | None = None):
        super().__init__(message)
        self.actor = actor
        self.workers = list(workers or [])


@dataclass
class Slot:
    """One actor of the pool and its history of failures in the current run."""

    kind: str  # workers | byzantine
    index: int  # worker actors: 0.., others 0
    workers: list[int]
    options: dict[str, Any]
    args: tuple
    handle: Any = None
    restarts: int = 0  # in the current run
    timeouts: int = 0  # in the current run
    starts: int = 0  # processes started for this slot, over the pool's life
    pids: list[int] = field(default_factory=list)
    actor_id: str | None = None  # hex id of the running actor (reported by the actor itself)
    node_id: str | None = None  # the Ray node it runs on
    past_ids: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        if self.kind == "workers":
            return f"honest-worker actor {self.index} (worker ids {_ids(self.workers)})"
        return f"Byzantine actor (worker ids {_ids(self.workers)})"


_CLASSES = {"workers": HonestWorkers, "byzantine": ByzantineWorkers}


class ActorPool:
    """The actors of one layout, in one placement group (or none).

    ``bundles``/``pg``: inside a Tune trial, the trial's placement group and its bundle specs
    (bundle 0 is the trainable, the parameter server; then worker actors, Byzantine actor).
    """

    def __init__(self, layout: ActorLayout, *, n_honest: int, n_workers: int, threads: int,
                 bundles: list[dict[str, float]] | None = None, pg: Any = None, ready_timeout_s: float = 120.0):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.layout = layout
        self.placement_group = pg
        self.threads = threads
        self.ready_timeout_s = ready_timeout_s
        self.name_prefix = f"tuneguard-{uuid.uuid4().hex[:8]}"
        self.slots: list[Slot] = []
        self.runs = 0  # runs this pool has served
        self.data_refs: dict[str, ray.ObjectRef] = {}  # data key -> packed dataset in the object store
        self._current: tuple | None = None  # the reset arguments of the current run
        self._closed = False
        self._fresh: set[int] = set()  # slots spawned and not reset yet
        device = "cuda" if layout.gpus else "cpu"
        roles = [("workers", i, g, (g,)) for i, g in enumerate(layout.groups)]
        if layout.byzantine:
            roles.append(("byzantine", 0, list(range(n_honest, n_workers)), ()))
        for bundle_index, (kind, index, workers, extra) in enumerate(roles, start=1):
            res = layout.actor_resources() if bundles is None else bundles[bundle_index]
            options: dict[str, Any] = {"num_cpus": res.get("CPU", 0.0), "max_restarts": 0, "max_task_retries": 0}
            if res.get("GPU"):
                options["num_gpus"] = res["GPU"]
            if pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=bundle_index, placement_group_capture_child_tasks=False
                )
            elif layout.placement == "spread":
                options["scheduling_strategy"] = "SPREAD"
            self.slots.append(Slot(kind, index, workers, options, (device, threads, *extra)))

    # Identity --------------------------------------------------------------------------------
    def signature(self) -> tuple:
        pg = self.placement_group.id.hex() if self.placement_group is not None else None
        return (tuple(tuple(g) for g in self.layout.groups), self.layout.byzantine, self.layout.cpus,
                self.layout.gpus, self.layout.placement, self.threads, pg)

    @property
    def started(self) -> int:
        """Actor processes started over the pool's life (restarts included)."""
        return sum(s.starts for s in self.slots)

    def nodes(self) -> list[str]:
        """The Ray node ids the actors run on (one per actor, in slot order)."""
        return [s.node_id or "" for s in self.slots]

    def names(self) -> list[str]:
        return [self._name(s) for s in self.slots]

    def _name(self, slot: Slot) -> str:
        return f"{self.name_prefix}-{slot.kind}{slot.index}-s{slot.starts}"

    # Runs ------------------------------------------------------------------------------------
    def data_ref(self, key: str, make) -> ray.ObjectRef:
        """The packed dataset ``key`` in the object store, put once per pool (``make()`` packs it)."""
        ref = self.data_refs.get(key)
        if ref is None:
            self.data_refs = {key: ray.put(make())}  # one dataset at a time: the old one is freed
            ref = self.data_refs[key]
        return ref

    def spawn(self) -> None:
        """Start the actors not started yet, without waiting: each imports torch, seconds of CPU,
        which can overlap whatever the caller does before :meth:`reset` (loading the data)."""
        for s in self.slots:
            if s.handle is None:
                self._spawn(s)
                self._fresh.add(id(s))

    def reset(self, cfg, plan, data_key: str, data: ray.ObjectRef) -> None:
        """Start (first run) or reset every actor for a run of ``cfg``; waits until all are ready."""
        self._current = (cfg, plan, data_key, [data])
        self.runs += 1
        for s in self.slots:
            s.restarts = s.timeouts = 0
        self.spawn()
        fresh = [s for s in self.slots if id(s) in self._fresh]
        self._fresh = set()
        try:
            self._wait_ready(self.slots, first=bool(fresh))
        except WorkerLost:
            if len(fresh) == len(self.slots):
                raise
            # A warm actor died between runs (killed, OOM): replace the dead ones, once.
            dead = [s for s in self.slots if s not in fresh and not _responds(s.handle)]
            if not dead:
                raise
            for s in dead:
                self._spawn(s)
            self._wait_ready(self.slots, first=True)

    def _spawn(self, slot: Slot) -> None:
        if slot.actor_id:
            slot.past_ids.add(slot.actor_id)
        slot.starts += 1
        slot.handle = _CLASSES[slot.kind].options(name=self._name(slot), **slot.options).remote(*slot.args)

    def _wait_ready(self, slots: list[Slot], first: bool = False) -> None:
        assert self._current is not None
        timeout = self.ready_timeout_s
        refs = [s.handle.reset.remote(*self._current) for s in slots]
        try:
            out = ray.get(refs, timeout=timeout)
        except RayActorError as err:
            slot = next((s for s, r in zip(slots, refs, strict=True) if _failed(r)), None)
            what = slot.label if slot else "an actor of the run"
            raise WorkerLost(f"the {what} died while starting: {err}", slot.label if slot else "",
                             slot.workers if slot else []) from None
        except GetTimeoutError:
            raise WorkerLost(
                f"the actors did not {'start' if first else 'reset'} within {timeout:.0f} s: the cluster may lack "
                f"the resources they reserve ({len(slots)} actors x {self.layout.actor_resources()}; available: "
                f"{ray.available_resources()}). Lower actors.cpus_per_actor, raise actors.workers_per_actor, "
                "or in Ray Tune use trial_resources(cfg)."
            ) from None
        for s, (pid, actor_id, node_id) in zip(slots, out, strict=True):
            if not s.pids or s.pids[-1] != pid:
                s.pids.append(pid)
            s.actor_id, s.node_id = actor_id, node_id

    def restart(self, slot: Slot, where: str, why: str, err: BaseException, limit: int, log: list[str]) -> None:
        """Replace ``slot``'s actor by a new one, reset for the current run (counts against ``limit``)."""
        if slot.restarts >= limit:
            raise WorkerLost(
                f"{where}: the {slot.label} {why} ({type(err).__name__}) and "
                + (f"has already been restarted {limit} time(s) (actors.max_restarts={limit})"
                   if limit else "restarts are disabled (actors.max_restarts=0)")
                + "; the run stops.",
                slot.label, slot.workers,
            ) from None
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # already gone
            pass
        slot.restarts += 1
        log.append(f"{where}: restarted the {slot.label} ({why}), restart {slot.restarts}/{limit}")
        self._spawn(slot)
        self._wait_ready([slot])

    def alive(self) -> bool:
        return not self._closed and all(s.handle is not None for s in self.slots)

    def kill(self, wait_s: float = 10.0) -> None:
        """Kill every actor (waiting up to ``wait_s`` for them to be gone). Idempotent."""
        if self._closed:
            return
        self._closed = True
        handles = [s.handle for s in self.slots if s.handle is not None]
        for s in self.slots:
            s.handle = None
        self.data_refs = {}
        self._current = None
        if handles and ray.is_initialized():
            for h in handles:
                try:
                    ray.kill(h, no_restart=True)
                except Exception:  # already dead, or Ray is going away
                    pass
            try:  # a call on a killed actor fails once it is gone
                ray.wait([h.ready.remote() for h in handles], num_returns=len(handles), timeout=wait_s)
            except Exception:
                pass


# The warm pool of this process ------------------------------------------------------------------
_WARM: ActorPool | None = None
_WARM_LOCK = threading.Lock()


def acquire(layout: ActorLayout, **kwargs: Any) -> tuple[ActorPool, bool]:
    """This process's warm pool when it matches ``layout`` (and the placement group), else a new
    pool (the old one is killed: its bundles are needed). Returns (pool, reused)."""
    global _WARM
    with _WARM_LOCK:
        candidate = ActorPool(layout, **kwargs)
        warm, _WARM = _WARM, None
        if warm is not None and warm.alive() and warm.signature() == candidate.signature():
            return warm, True
        if warm is not None:
            warm.kill()
        return candidate, False


def release(pool: ActorPool) -> None:
    """Keep ``pool`` warm for the next run of this process."""
    global _WARM
    with _WARM_LOCK:
        old, _WARM = _WARM, pool
        if old is not None and old is not pool:
            old.kill()


def shutdown_warm() -> None:
    """Kill this process's warm pool (if any)."""
    global _WARM
    with _WARM_LOCK:
        warm, _WARM = _WARM, None
    if warm is not None:
        warm.kill()


def warm_pool() -> ActorPool | None:
    return _WARM


def _responds(handle: Any, timeout: float = 10.0) -> bool:
    try:
        ray.get(handle.ready.remote(), timeout=timeout)
        return True
    except Exception:
        return False


def _failed(ref: ray.ObjectRef) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ref, timeout=0)
    except Exception:
        return True
    return False


def _ids(ids: list[int]) -> str:
    if not ids:
        return "none"
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ", ".join(map(str, ids))
