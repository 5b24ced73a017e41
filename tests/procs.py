"""Process clean-up shared by the tests that start their own Ray clusters: they stop exactly the
processes they started (never `ray stop`, which would also stop the session's cluster)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def ray_pids(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (a cluster's temp dir) or that run with
    ``RAY_TMPDIR=marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (d / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd or f"RAY_TMPDIR={marker}" in env:
            pids.append(int(d.name))
    return pids


def kill_matching(marker: str) -> None:
    """SIGKILL every process :func:`ray_pids` finds, until none is left (3 tries)."""
    for _ in range(3):
        pids = ray_pids(marker)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1.0)
