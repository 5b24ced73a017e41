"""The malloc settings the step relies on (tuneguard.training.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = (
    "from tuneguard.training.allocator import keep_freed_memory as k; "
    "print(k(), k())"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_applied_once_per_process_on_linux():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]


def test_opt_out_environment_variable():
    env = {**os.environ, "TUNEGUARD_MALLOC_TUNING": "0"}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == ["False", "False"]
