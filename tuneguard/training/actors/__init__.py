"""The Ray actor engine (``engine: actors``): honest-worker actors, a Byzantine actor and the
driving process as parameter server (in a tune job, the trial's trainable) compute Algorithm 1
of paper 001 with the local engine's step functions, so a run gives the same numbers as
``engine: local`` however the workers are grouped.

- :class:`ActorEngine`      the engine (:mod:`.engine`: data flow, restarts, shutdown)
- :class:`ActorPool`        warm actors: started once per process and layout, reset per run
                            (:mod:`.pool`; :func:`shutdown_warm` kills this process's pool)
- :mod:`.channel`           same-node steps through shared memory (eventfd to start, a Unix
                            socket to answer); :mod:`.remote` the actors themselves
- :func:`trial_resources`   the Ray Tune placement group a trial running it needs
- :func:`plan_layout`       which actors a config creates, what each reserves (:mod:`.layout`:
                            the default ``workers_per_actor`` rule)
- :class:`WorkerLost`       raised when an actor dies or hangs and cannot be replaced
"""

from tuneguard.training.actors.engine import ActorEngine, ActorState
from tuneguard.training.actors.layout import (
    ActorLayout,
    default_worker_actors,
    default_workers_per_actor,
    plan_layout,
    trial_resources,
)
from tuneguard.training.actors.pool import ActorPool, WorkerLost, shutdown_warm, warm_pool

__all__ = [
    "ActorEngine",
    "ActorPool",
    "shutdown_warm",
    "warm_pool",
    "ActorLayout",
    "ActorState",
    "WorkerLost",
    "default_worker_actors",
    "default_workers_per_actor",
    "plan_layout",
    "trial_resources",
]
