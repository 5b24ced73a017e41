"""The ``tuneguard`` command line: a thin layer over the library.

Each sub-command lives in its own module with a ``register(app)`` function; heavy imports
(torch, ray, mlflow) happen inside the commands so ``tuneguard --help`` stays fast.
"""

from __future__ import annotations

import typer

from . import export_cmd, list_cmd, privacy_cmd, report_cmd, train_cmd, tune_cmd, ui_cmd
from .common import GuardedGroup

app = typer.Typer(
    name="tuneguard",
    cls=GuardedGroup,
    help="Search training settings that stay accurate under differential privacy and Byzantine attack.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (list_cmd, privacy_cmd, train_cmd, tune_cmd, export_cmd, ui_cmd, report_cmd):
    _module.register(app)


def main() -> None:
    app()
