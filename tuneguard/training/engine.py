"""What :func:`tuneguard.training.train` needs from an engine, and the registry of engines.

An engine computes steps of Algorithm 1 (paper 001) for one run. Engines differ in *where*
workers compute (this process, Ray actors, ...), never in the numbers: every engine builds its
step from :func:`tuneguard.training.step.worker_round` (honest workers),
:func:`tuneguard.training.step.byzantine_vectors` (the attack) and
:func:`tuneguard.training.server.server_step` (GAR, update, metrics), keyed by
(seed, worker id, step), so the same config gives the same numbers on every engine.

Adding an engine is one module with a class that satisfies :class:`Engine` and one
:data:`ENGINES` entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tuneguard.config import ExperimentConfig
from tuneguard.training.plan import PrivacyPlan


@runtime_checkable
class Engine(Protocol):
    """One run's steps. ``State`` is the engine's own (tensors, ObjectRefs, ...); ``export_state``
    / ``import_state`` convert it to and from CPU tensors for checkpoints, the same on every engine."""

    name: str
    plan: PrivacyPlan  # the run's noise and number of steps

    def init_state(self) -> Any: ...

    def step(self, state: Any, t: int) -> tuple[Any, dict[str, float]]:
        """Step t (0-based) of Algorithm 1: (new state, the step's metrics)."""
        ...

    def evaluate(self, state: Any) -> tuple[float, float]:
        """(top-1 test accuracy, mean test loss) of the state's parameters."""
        ...

    def export_state(self, state: Any) -> dict[str, Any]: ...

    def import_state(self, saved: dict[str, Any]) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineSpec:
    name: str
    description: str
    build: Callable[..., Engine]  # build(cfg, worker_groups=None, data=None) -> Engine


def _local(cfg: ExperimentConfig, worker_groups: Sequence[Sequence[int]] | None = None, data: Any = None) -> Engine:
    from tuneguard.training.context import build_context
    from tuneguard.training.local import LocalEngine

    dataset = None
    if data is not None:
        import ray

        from tuneguard.training.actors.remote import dataset_from_numpy

        dataset = dataset_from_numpy(ray.get(data))
    return LocalEngine(build_context(cfg, data=dataset), worker_groups=worker_groups)


def _actors(cfg: ExperimentConfig, worker_groups: Sequence[Sequence[int]] | None = None, data: Any = None) -> Engine:
    from tuneguard.training.actors import ActorEngine

    return ActorEngine(cfg, data=data)


ENGINES: dict[str, EngineSpec] = {
    "local": EngineSpec("local", "every worker of a step batched in this process: the single-process "
                        "simulation for laptops, tests and benchmarks", _local),
    "actors": EngineSpec("actors", "Ray actors play the honest and the Byzantine workers, the trial's "
                         "trainable the parameter server (warm: reused across the runs of a Tune trial)", _actors),
}


def make_engine(cfg: ExperimentConfig, worker_groups: Sequence[Sequence[int]] | None = None,
                data: Any = None) -> Engine:
    """The engine ``cfg.engine`` names, built for this process. ``data``: an ObjectRef of the
    packed dataset (:func:`tuneguard.training.actors.remote.dataset_to_numpy`) to use instead of
    reading ``cfg.dataset`` from disk."""
    try:
        spec = ENGINES[cfg.engine]
    except KeyError:
        raise ValueError(f"engine={cfg.engine!r} is not one of {sorted(ENGINES)}") from None
    return spec.build(cfg, worker_groups, data)
