"""Signals for long-running commands: SIGTERM (and SIGHUP) stop them the way Ctrl-C does, so
their MLflow runs end KILLED instead of being left RUNNING by a process that just vanished.

``train``: the first SIGINT / SIGTERM / SIGHUP raises :class:`Terminated` (a KeyboardInterrupt)
in the main thread; ``tuneguard.training.train`` ends its run KILLED and re-raises. Further
signals while that cleanup runs are ignored (SIGKILL still works).

``tune``: Ray Tune stops a job gracefully on SIGINT (it saves the experiment state, and
``--resume`` continues). SIGTERM and SIGHUP are forwarded as SIGINT, so a ``kill`` or a closed
terminal stops a job the same way; a second one raises :class:`Terminated` at once.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)
# handlers of the active context: ray.init installs its own SIGTERM handler (Ray's C++ failure
# handler, which aborts the process), so they are put back after Ray starts (:func:`reassert`).
_ACTIVE: dict[int, object] = {}


def reassert() -> None:
    """Re-install the active handlers where something (ray.init) replaced them; main thread only."""
    import threading

    if not _ACTIVE or threading.current_thread() is not threading.main_thread():
        return
    for s, h in list(_ACTIVE.items()):
        if signal.getsignal(s) is not h:
            signal.signal(s, h)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM, SIGHUP, or SIGINT)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """``train``: SIGINT / SIGTERM / SIGHUP raise :class:`Terminated` once, then are ignored."""
    state = {"raised": False}

    def handler(signum, frame):
        if state["raised"]:
            return
        state["raised"] = True
        raise Terminated(signum)

    with _handling((signal.SIGINT, *STOP_SIGNALS), handler):
        yield


@contextmanager
def forward_as_sigint() -> Iterator[None]:
    """``tune``: SIGTERM / SIGHUP act as SIGINT (Ray Tune's graceful stop); the second raises."""
    state = {"count": 0}

    def handler(signum, frame):
        state["count"] += 1
        if state["count"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
            return
        raise Terminated(signum)

    with _handling(STOP_SIGNALS, handler):
        yield


@contextmanager
def _handling(sigs: tuple[int, ...], handler) -> Iterator[None]:
    """``handler`` for ``sigs`` inside the block (and for :func:`reassert`); the previous
    handlers back afterwards."""
    previous = {s: signal.signal(s, handler) for s in sigs}
    _ACTIVE.update({s: handler for s in sigs})
    try:
        yield
    finally:
        for s in sigs:
            _ACTIVE.pop(s, None)
        for s, h in previous.items():
            signal.signal(s, h)
