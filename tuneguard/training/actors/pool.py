"""Warm actors: the honest-worker and Byzantine actors of a layout, started once and reset (not
restarted) for every run.

A pool belongs to the process that started it (the trainable of a Tune trial, or a script) and
dies with it. Inside a Ray connection this process does not own (a Tune trial, or the caller's
own ``ray.init``), :func:`acquire` keeps the pool after a run ends and hands it to the next run
with the same layout in the same placement group: the runs of a trial (attacks x seeds) and,
when Tune reuses the trial's process (``reuse_actors``), the trials of a job start no new actor.

Several runs may use a pool at once (the runs of a trial go side by side, as on the local
engine): each :meth:`ActorPool.attach`\ es under its own key, and every actor keeps one run
context per key. Their calls interleave on the actors, so one run's workers compute while the
other run's server aggregates: the gaps of a step's dependent hops are filled.

``attach(run, cfg, plan, data_key, data)`` has each actor rebuild its context for the run
(partition, model, buffers) and fetch the dataset from the object store only when it lacks
``data_key``. Momentum and parameters travel with each step (ObjectRefs the engine holds, or
the run's own shared buffers: :mod:`.channel`), so nothing of an earlier or a concurrent run can
leak into another one.
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
    starts: int = 0  # processes started for this slot, over the pool's life
    pids: list[int] = field(default_factory=list)
    actor_id: str | None = None  # hex id of the running actor (reported by the actor itself)
    node_id: str | None = None  # the Ray node it runs on
    channel: tuple[str, bytes] | None = None  # its same-node channel's address (socket path, key)
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
        self.users = 0  # engines using it now (see acquire / release)
        self.poisoned = False  # a run failed on it: killed once its last user leaves, never reused
        self.data_refs: dict[str, ray.ObjectRef] = {}  # data key -> packed dataset in the object store
        self._attached: dict[str, tuple] = {}  # run key -> the reset arguments of that run
        self.lock = threading.RLock()  # held while actors change: engines submit under it
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
        """The packed dataset ``key`` in the object store, put once per pool (``make()`` packs it);
        datasets no attached run uses are freed."""
        with self.lock:
            ref = self.data_refs.get(key)
            if ref is None:
                used = {args[2] for args in self._attached.values()}
                self.data_refs = {k: v for k, v in self.data_refs.items() if k in used}
                ref = self.data_refs[key] = ray.put(make())
            return ref

    def spawn(self) -> None:
        """Start the actors not started yet, without waiting: each imports torch, seconds of CPU,
        which can overlap whatever the caller does before :meth:`attach` (loading the data)."""
        with self.lock:
            for s in self.slots:
                if s.handle is None:
                    self._spawn(s)
                    self._fresh.add(id(s))

    def attach(self, run: str, cfg, plan, data_key: str, data: ray.ObjectRef) -> None:
        """Start (first run) or reset every actor for run ``run`` of ``cfg``; waits until all are ready."""
        with self.lock:
            self._attached[run] = (cfg, plan, data_key, [data])
            self.runs += 1
            self.spawn()
            fresh = [s for s in self.slots if id(s) in self._fresh]
            self._fresh = set()
            try:
                self._wait_ready(self.slots, [run], first=bool(fresh))
            except WorkerLost:
                if len(fresh) == len(self.slots):
                    raise
                # A warm actor died between runs (killed, OOM): replace the dead ones, once.
                dead = [s for s in self.slots if s not in fresh and not _responds(s.handle)]
                if not dead:
                    raise
                for s in dead:
                    self._spawn(s)
                self._wait_ready(dead, list(self._attached), first=True)
                self._wait_ready([s for s in self.slots if s not in dead], [run], first=True)

    def detach(self, run: str) -> None:
        """Run ``run`` is over: its actors forget it (without waiting)."""
        with self.lock:
            if self._attached.pop(run, None) is None or self._closed:
                return
            for s in self.slots:
                if s.handle is not None:
                    try:
                        s.handle.drop.remote(run)
                    except Exception:  # a dead actor has nothing to forget
                        pass

    def _spawn(self, slot: Slot) -> None:
        if slot.actor_id:
            slot.past_ids.add(slot.actor_id)
        slot.starts += 1
        slot.handle = _CLASSES[slot.kind].options(name=self._name(slot), **slot.options).remote(*slot.args)

    def _wait_ready(self, slots: list[Slot], runs: list[str], first: bool = False) -> None:
        """Reset ``slots`` for each of ``runs`` (attached run keys) and wait until they answer."""
        timeout = self.ready_timeout_s
        calls = [(s, s.handle.reset.remote(*self._attached[r], r)) for r in runs for s in slots]
        if not calls:
            calls = [(s, s.handle.ready.remote()) for s in slots]
        try:
            out = ray.get([ref for _, ref in calls], timeout=timeout)
        except RayActorError as err:
            slot = next((s for s, r in calls if _failed(r)), None)
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
        for (s, _), (pid, actor_id, node_id, channel) in zip(calls, out, strict=True):
            if not s.pids or s.pids[-1] != pid:
                s.pids.append(pid)
            s.actor_id, s.node_id, s.channel = actor_id, node_id, channel

    def restart(self, slot: Slot, seen: Any) -> bool:
        """Replace ``slot``'s actor by a new one, reset for every attached run. ``seen``: the
        handle the caller's failed call went to; when another run has already replaced it, this
        only returns False (the caller resubmits to the new actor)."""
        with self.lock:
            if slot.handle is not seen:
                return False
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # already gone
                pass
            self._spawn(slot)
            self._wait_ready([slot], list(self._attached))
            return True

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
        self._attached = {}
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
    pool, which becomes the warm one unless the warm one is in use by another run (its bundles
    are then needed: the old unused one is killed). Returns (pool, reused); pair with
    :func:`release`."""
    global _WARM
    with _WARM_LOCK:
        candidate = ActorPool(layout, **kwargs)
        warm = _WARM
        if warm is not None and warm.alive() and not warm.poisoned and warm.signature() == candidate.signature():
            warm.users += 1
            return warm, True
        if warm is not None and warm.users == 0:
            warm.kill()
            _WARM = None
        if _WARM is None:
            _WARM = candidate
        candidate.users += 1
        return candidate, False


def release(pool: ActorPool, *, broken: bool = False) -> None:
    """A run is done with ``pool``: it stays warm for the next run of this process, unless a run
    failed on it (``broken``: killed once no other run uses it) or it is not the warm pool."""
    global _WARM
    with _WARM_LOCK:
        pool.users = max(0, pool.users - 1)
        pool.poisoned = pool.poisoned or broken or not pool.alive()
        if pool.users:
            return
        if pool.poisoned or pool is not _WARM:
            if pool is _WARM:
                _WARM = None
            pool.kill()


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
