"""`import tuneguard` stays light: the Python API (tuneguard.tune, tuneguard.train) loads Ray,
MLflow, torch and pandas on first use, not on import."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light_and_the_api_is_reachable():
    code = ("import sys, tuneguard; heavy = [m for m in ('ray', 'mlflow', 'torch', 'pandas') if m in sys.modules]; "
            "assert not heavy, heavy; assert callable(tuneguard.tune) and callable(tuneguard.train); "
            "import tuneguard.tune.space; assert callable(tuneguard.tune)")  # still callable once the package loads
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
