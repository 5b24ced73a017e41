"""Smoke runs of the benchmark scripts of figures 5 and 6 (benchmarks/tune_overhead.py, a real
Tune job on a private Ray cluster; benchmarks/grid_projection.py) with tiny settings, both at
once, each in its own process. They check the tables' shape and that the numbers are positive,
never a timing: the machine may be loaded. About 40 s on a quiet 2-core machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real Ray Tune job

REPO = Path(__file__).resolve().parents[1]

TUNE = ["benchmarks.tune_overhead", "--steps", "2", "--eval-every", "1", "--batch-sizes", "25", "--repeats", "1",
        "--no-reference"]
GRID = ["benchmarks.grid_projection", "--steps", "1", "--warmup", "1", "--batch-sizes", "25", "--gars", "mda",
        "--fs", "3", "--attacks", "little", "--validate", "mda:25", "--validate-steps", "2", "--floor-repeats", "1",
        "--mlflow-repeats", "1"]


def table(output: str, header: str) -> list[list[str]]:
    """The rows (cells, stripped) of the markdown table whose header line is ``header``."""
    lines = output.splitlines()
    assert header in lines, f"no table {header!r} in:\n{output[-3000:]}"
    rows = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    assert rows, f"table {header!r} is empty"
    return rows


def number(cell: str) -> float:
    return float(cell.replace("*", "").replace("x", "").replace("%", "").replace("+", "").strip())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TUNEGUARD_DATA_DIR=data_dir)
    procs = {}
    for name, args in (("tune", TUNE), ("grid", GRID)):
        cmd = [sys.executable, "-m", *args, "--json", str(tmp / f"{name}.json")]
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    out = {}
    try:
        for name, p in procs.items():
            text, _ = p.communicate(timeout=400)
            assert p.returncode == 0, f"{name} failed:\n{text[-4000:]}"
            out[name] = (text, json.loads((tmp / f"{name}.json").read_text()))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return out


def test_tune_overhead_tables(runs):
    text, nums = runs["tune"]
    rows = {r[0]: r[1:] for r in table(text, "| | seconds | vs training loops |")}
    loops = next(v for k, v in rows.items() if k.startswith("sum of the trials' training loops"))
    wall = next(v for k, v in rows.items() if k.startswith("tune job wall"))
    assert number(loops[0]) > 0 and number(wall[0]) > 0
    assert any(k.startswith("**overhead = wall x 1 / loops - 1**") for k in rows)
    parts = table(text, "| part | seconds | share of wall x concurrency |")
    names = [r[0] for r in parts]
    assert names[0].startswith("Ray start") and "training loops" in names and names[-1] == "Ray shutdown"
    measured = {r[0]: number(r[1]) for r in parts}  # the others are differences of timestamps (ms noise)
    assert measured["Ray shutdown"] > 0 and measured["training loops"] > 0 and measured[names[0]] > 0
    per_trial = table(text, "| b | GAR | trial set-up | run set-up | loop | run finish | trial finish | run_seconds |")
    assert [r[:2] for r in per_trial] == [["25", "mda"]]
    assert number(per_trial[0][4]) > 0 and number(per_trial[0][7]) > 0
    assert nums["trials"] == 1 and nums["loop_s"] > 0 and nums["wall_s"] > nums["loop_s"]
    assert nums["overhead"] == pytest.approx(nums["wall_s"] / nums["loop_s"] - 1)


def test_grid_projection_tables(runs):
    text, nums = runs["grid"]
    per_b = table(text, "| b | runs | step (ms) | true floor (ms) | step / floor | projected h | floor h |")
    assert [int(r[0]) for r in per_b] == [25, 50, 150, 300, 500, 750, 1000, 1250, 1500]
    assert sum(int(r[1]) for r in per_b) == 2025
    assert all(number(c) > 0 for r in per_b for c in r[2:])
    totals = {r[0]: r[1:] for r in table(text, "| | hours | share | per run (s) |")}
    assert number(totals["**projected total**"][0]) > 0
    floor = next(v for k, v in totals.items() if k.startswith("true floor"))
    assert number(floor[0]) > 0
    assert "target" in totals
    cells = table(text, "| GAR, f, attack | b = 25 |")
    assert cells[0][0] == "mda f=3 little" and number(cells[0][1].split()[0]) > 0
    val = table(text, "| run | b | steps | predicted (s) | measured (s) | measured / predicted - 1 |")
    assert val[0][:3] == ["mda f=3 little", "25", "2"] and number(val[0][3]) > 0 and number(val[0][4]) > 0
    assert nums["combinations"] == 2295 and nums["runs"] == 2025
    assert nums["projected_hours"] > 0 and nums["floor_hours"] > 0 and nums["mlflow_s"] > 0
    assert nums["predicted_from"]["sampled"] == 15  # b = 25, mda, f = 3, little: 3 eps x 5 seeds
