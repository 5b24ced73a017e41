"""The link between the process driving a tune job and its Ray Tune callbacks, typed and one-way.

The driver hands its callbacks (:class:`~tuneguard.tune.progress.ProgressView`,
:class:`~tuneguard.tune.progress.JobTracker`, :class:`~tuneguard.tune.failures.FailureGuard`)
what only it knows, a :class:`DriverSettings` (the console to draw on, whether to draw, the
trials at once), through their constructors; the callbacks never write back. What the driver
learns from a job (did it run to the end, which trials did Tune know) it reads from Tune's own
``ResultGrid`` after ``fit()`` (see :mod:`tuneguard.tune.search`).

The restore path needs one hook. Tune pickles the run config, callbacks included, into
``tuner.pkl`` when the Tuner is created, and ``Tuner.restore`` unpickles it and runs the job with
those copies: Ray 2.60 takes no new callbacks on restore and has no public way to reach the
restored ones (ray-project/ray#41364; only the private ``Tuner._local_tuner``). The copies would
hold the first driver's settings minus its console, and the resuming driver could not read its
failure guard. So each of these callbacks pickles as a reference to its *slot* ("progress",
"tracker", "guard"), and :func:`restoring` (a context manager around ``Tuner.restore``) makes
those references unpickle as the resuming driver's own, freshly built callbacks: the restored job
then runs with exactly the objects a fresh job would. The hook is a ``ContextVar`` set only while
``Tuner.restore`` reads ``tuner.pkl`` (it unpickles synchronously, in the caller's thread); outside
it (a plain ``Tuner.restore`` of a tuneguard job) a reference unpickles as a copy of the pickled
callback, with the settings it was pickled with and a console on stdout: never an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class DriverSettings:
    """What the process driving a job tells its callbacks."""

    console: Any = None  # a rich Console to draw on; None: a new Console on stdout
    progress: bool = True  # draw the live view / plain progress lines at all
    concurrency: int = 1  # trials at once (the ETA divides the trials left by it)

    def __reduce__(self):
        # A console is a live object of one process (a terminal, a pipe): it does not pickle, and
        # a resumed job draws on the resuming driver's (see the module docstring).
        return (DriverSettings, (None, self.progress, self.concurrency))


# slot -> the resuming driver's callback; set only while Tuner.restore unpickles the run config.
_RESTORING: ContextVar[dict[str, Any] | None] = ContextVar("tuneguard_restoring", default=None)


class DriverBound:
    """Mixin of a Tune callback the driver builds (and may read after ``fit()``): it pickles as
    its slot plus its plain state, and unpickles as the driver's own callback of that slot inside
    :func:`restoring`. Subclasses name their ``slot`` and may drop per-process state in
    :meth:`plain_state`."""

    slot: ClassVar[str]

    def plain_state(self) -> dict[str, Any]:
        """What a copy keeps when there is no driver's callback to bind to."""
        return dict(self.__dict__)

    def __reduce__(self):
        return (_rebind, (type(self), self.slot, self.plain_state()))


def _rebind(cls: type, slot: str, state: dict[str, Any]) -> Any:
    live = (_RESTORING.get() or {}).get(slot)
    if isinstance(live, cls):
        return live
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


@contextmanager
def restoring(callbacks: Iterable[DriverBound]) -> Iterator[None]:
    """Around ``Tuner.restore``: the restored run config's callbacks become ``callbacks``."""
    token = _RESTORING.set({c.slot: c for c in callbacks})
    try:
        yield
    finally:
        _RESTORING.reset(token)
