"""Trial failures seen as a job sees them: the first error once, and a stop when trials keep
failing the same way (a broken cluster or a bug fails every trial alike; retrying it only
repeats the traceback).

:class:`FailureGuard` is a Tune callback and stopper at once: it reads each errored trial's
error file, reduces it to a signature (the exception's last line, with ids and numbers masked),
and once ``limit`` trials failed with the same signature it stops the experiment (Tune asks
``stop_all()`` after every event) and says why.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

from tuneguard.tune.driver import DriverBound

# Tokens holding a digit (trial ids, numbers, addresses, pids) vary between trials failing alike.
_VOLATILE = re.compile(r"[\w.:/-]*\d[\w.:/-]*")


def error_text(trial) -> str:
    """The error a trial ended with (its error file), or a placeholder."""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            with open(path) as fh:
                return fh.read()
        except OSError:
            pass
    return str(getattr(trial, "error_msg", "") or "unknown error")


def headline(text: str) -> str:
    """The line of a traceback that says what went wrong (its last non-empty line)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def signature(text: str) -> str:
    return _VOLATILE.sub("#", headline(text))


class FailureGuard(DriverBound, Callback, Stopper):
    """Stops the job after ``limit`` trials failed with the same error (0: never). The driver
    reads ``reason`` and ``first`` after ``fit()``; a resumed job runs with the resuming driver's
    guard (:mod:`tuneguard.tune.driver`), so it reads them there too."""

    slot = "guard"

    def __init__(self, limit: int = 3):
        self.limit = int(limit)
        self.counts: Counter[str] = Counter()
        self.first: tuple[str, str] | None = None  # (trial id, error text)
        self.reason: str | None = None

    # Callback
    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        text = error_text(trial)
        if self.first is None:
            self.first = (trial.trial_id, text)
        sig = signature(text)
        self.counts[sig] += 1
        if self.limit and self.reason is None and self.counts[sig] >= self.limit:
            self.reason = (f"{self.counts[sig]} trials failed with the same error ({headline(text)}); the job stopped "
                           "early instead of repeating it (tune.stop_after_identical_failures)")

    # Stopper
    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.reason is not None
