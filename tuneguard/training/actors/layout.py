"""Which actors a run creates and what each reserves; the Tune placement group that matches.

One run of the actor engine creates:

- ``HonestWorkers`` actors, each computing a contiguous range of honest worker ids in one batched
  pass (``ceil(h / workers_per_actor)`` of them when ``actors.workers_per_actor`` is set);
- one ``ByzantineWorkers`` actor when f > 0 (it crafts the f attack vectors).

The parameter server (theta, the GAR and the update, the step metrics, evaluation) is the
process that drives the run: in a tune job, the trial's trainable, itself a Ray actor. It
would otherwise sit idle waiting on a server actor; playing the server itself saves a process
per trial and one object-store hop per step (BENCHMARKS.md).

Every actor reserves ``cfg.actors.cpus_per_actor`` CPUs and, when the run uses CUDA, an equal
share of one GPU (the driver too: it runs the server step). Unset, that is 0.25 outside Tune and, in a tune job, an equal share of
``tune.cpus_per_trial`` for the trainable and each actor (two 1-CPU trials fit on 2 CPUs). Inside a
Ray Tune trial they go into the trial's placement group, one bundle each; bundle 0 is the
trainable (the driver of the run and its parameter server).

Default grouping (``actors.workers_per_actor: null``): one worker actor per CPU core,

    worker actors = max(1, min(h, cpus)),  workers split evenly (sizes differ by at most one,
    so workers_per_actor = ceil(h / worker actors) for the largest)

with ``cpus`` the cores this process may use (``os.sched_getaffinity``). The server and the
Byzantine actor work while the honest workers wait and vice versa (the phases of a step are
sequential), so worker actors may take every core; more actors than cores add processes
(~0.35 GB private memory each, a few seconds of start-up: each imports torch) and no speed.
On the 2-core reference machine, h = 12 gives 2 actors of 6 workers (BENCHMARKS.md). Inside a Tune trial the layout is read back from the trial's
placement group (built by :func:`trial_resources`), so the driver and the trial agree even when
the trial runs on a node with another core count.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from tuneguard.config import ExperimentConfig


def available_cpus() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_worker_actors(n_honest: int, cpus: int | None = None) -> int:
    """``max(1, min(h, cpus))``: one honest-worker actor per core (module docstring)."""
    cpus = available_cpus() if cpus is None else cpus
    return max(1, min(n_honest, int(cpus)))


def default_workers_per_actor(n_honest: int, cpus: int | None = None) -> int:
    """The largest group of the default grouping: ``ceil(h / max(1, min(h, cpus)))``."""
    return math.ceil(n_honest / default_worker_actors(n_honest, cpus))


def worker_groups(n_honest: int, workers_per_actor: int) -> list[list[int]]:
    """Contiguous ranges of honest worker ids, ``workers_per_actor`` each (the last may be smaller)."""
    k = max(1, int(workers_per_actor))
    return [list(range(i, min(i + k, n_honest))) for i in range(0, n_honest, k)]


def even_groups(n_honest: int, n_actors: int) -> list[list[int]]:
    """``n_actors`` contiguous ranges of honest worker ids whose sizes differ by at most one."""
    n_actors = max(1, min(n_honest, n_actors))
    q, r = divmod(n_honest, n_actors)
    out, start = [], 0
    for a in range(n_actors):
        size = q + (a < r)
        out.append(list(range(start, start + size)))
        start += size
    return out


def uses_gpu(cfg: ExperimentConfig) -> bool:
    """Whether the run's actors compute on CUDA (``device: auto`` means: this machine has one)."""
    if cfg.device == "auto":
        import torch

        return torch.cuda.is_available()
    return cfg.device.startswith("cuda")


@dataclass(frozen=True)
class ActorLayout:
    groups: list[list[int]]  # honest worker ids of each worker actor
    byzantine: bool  # whether a Byzantine actor is created (f > 0)
    cpus: float  # CPUs each actor (and the driver's bundle) reserves
    gpus: float  # GPU share each actor reserves (0: CPU run)
    placement: str = "pack"  # pack: actors on as few nodes as possible; spread: over the nodes

    @property
    def n_actors(self) -> int:
        """Worker actors + Byzantine actor (the server is the driver, bundle 0)."""
        return len(self.groups) + int(self.byzantine)

    def actor_resources(self) -> dict[str, float]:
        res = {"CPU": self.cpus}
        if self.gpus:
            res["GPU"] = self.gpus
        return res

    def bundles(self) -> list[dict[str, float]]:
        """Bundle 0: the driver (trainable, parameter server); then worker actors, Byzantine actor."""
        return [self.actor_resources() for _ in range(self.n_actors + 1)]


STANDALONE_CPUS_PER_ACTOR = 0.25  # outside Tune, when actors.cpus_per_actor is not set


def plan_layout(cfg: ExperimentConfig, *, cpus: float | None = None, gpu: bool | None = None,
                n_worker_actors: int | None = None, trial_cpus: float | None = None) -> ActorLayout:
    """The actors a run of ``cfg`` creates. ``n_worker_actors`` (read back from a placement
    group) replaces the core count of the default grouping when ``actors.workers_per_actor``
    is not set. ``trial_cpus``: the CPUs a Tune trial reserves in all; then, unless
    ``actors.cpus_per_actor`` is set, every bundle (trainable + each actor) gets an equal share
    of it, so that e.g. two trials of 1 CPU run side by side on 2 CPUs."""
    h = cfg.n_honest
    wpa = cfg.actors.workers_per_actor
    if wpa is not None:
        groups = worker_groups(h, min(wpa, h))
    else:
        groups = even_groups(h, n_worker_actors or default_worker_actors(h, cpus))
    gpu = uses_gpu(cfg) if gpu is None else gpu
    n_actors = len(groups) + int(cfg.f > 0)
    # A trial reserves one GPU in all, shared by its driver (the server) and its actors.
    gpus = round(1.0 / (n_actors + 1), 4) if gpu else 0.0
    per = cfg.actors.cpus_per_actor
    if per is None:
        # Rounded down to Ray's resource granularity (1e-4) so the bundles never sum past the trial.
        per = (int(trial_cpus / (n_actors + 1) * 1e4) / 1e4) if trial_cpus else STANDALONE_CPUS_PER_ACTOR
    return ActorLayout(groups, cfg.f > 0, float(per), gpus, cfg.actors.placement)


def trial_resources(cfg: ExperimentConfig, *, cpus: float | None = None, trial_cpus: float | None = None):
    """The ``ray.tune.PlacementGroupFactory`` a Tune trial running ``cfg`` on the actor engine
    needs: bundle 0 for the trainable (the parameter server), one bundle per actor the engine
    will create (honest-worker actors, Byzantine actor), each ``actors.cpus_per_actor`` CPUs (default: an
    equal share of ``trial_cpus``) plus a GPU share on CUDA runs. Use it as
    ``tune.with_resources(trainable, trial_resources(cfg))``; Tune then packs as many trials as
    the cluster holds, without deadlock. ``actors.placement`` is the group's strategy: PACK (the
    actors of a trial on as few nodes as possible) or SPREAD (over the cluster's nodes).

    ``cpus``: the cores the default grouping assumes (default: ``trial_cpus`` when given, one
    worker actor per whole CPU of the trial, else this machine's cores).
    """
    from ray.tune import PlacementGroupFactory

    grouping = cpus if cpus is not None else (max(1, int(trial_cpus)) if trial_cpus else None)
    layout = plan_layout(cfg, cpus=grouping, trial_cpus=trial_cpus)
    return PlacementGroupFactory(layout.bundles(), strategy=layout.placement.upper())
