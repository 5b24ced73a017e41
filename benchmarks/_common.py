"""Shared by the benchmark scripts: machine facts and writing one section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = """# Benchmarks

Each section is written by the script it names, with the command that produced it, the machine
and the package versions, the median of several runs and its ratio to a reference measured in
the same run.

Run the whole suite (each figure in its own process, one after another; it writes every section
below, so run it on a quiet machine):

```bash
source .venv/bin/activate && export TUNEGUARD_DATA_DIR=../shared/datasets
python -m benchmarks                      # every figure, writes BENCHMARKS.md (roughly 40 min on 2 cores)
python -m benchmarks --quick              # smoke run: tiny repeats and steps, writes nothing
python -m benchmarks --only clipping grid_projection --no-write   # some figures, printed only
python -m benchmarks --list               # the figures and the exact commands
```

Figures: (1) `clipping`: DP gradients vs the non-private floor, the generic path and Opacus;
(2) `train_step`: one local-engine step per GAR and attack vs the floor; (3) `aggregators`: GAR
latencies at n = 15 and n = 51; (4) `actor_overhead`: actor engine vs local engine; (5)
`tune_overhead`: a tune job's wall time vs its trials' training time; (6) `grid_projection`:
the 001 Fashion-MNIST grid projected on this machine (and on a GPU when there is one) vs its
floor; (7) `engine_job`: the quickstart tune job on the actor engine vs the local engine. Each script also runs on its own: `python -m benchmarks.<name> --help`.
"""
PACKAGES = ("ray", "mlflow", "optuna", "opacus")


def machine_info() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        load = f"; 1-minute load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return (f"{os.cpu_count()} cores ({cpu}), {gpu}; {versions()}; "
            f"{torch.get_num_threads()} torch threads{load}")


def versions() -> str:
    """Python and the versions of torch and the packages the figures use (without importing them)."""
    from importlib import metadata

    import torch

    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in PACKAGES:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def write_section(title: str, body: str, command: str, doc: str | None = None) -> None:
    """Replace (or append) the section ``## title`` of BENCHMARKS.md."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    text = with_header(text)
    section = f"## {title}\n\nCommand: `{command}`\n\nMachine: {machine_info()}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    BENCHMARKS_MD.write_text(text)


def with_header(text: str) -> str:
    """``text`` with everything before its first section replaced by :data:`HEADER`."""
    first = re.search(r"^## ", text, re.M)
    return HEADER.rstrip() + "\n\n" + (text[first.start():] if first else "")
