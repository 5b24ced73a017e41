"""Helpers shared by the CLI commands: error reporting, strict JSON and option types.

Every command runs inside :class:`GuardedGroup`, which turns the errors tuneguard raises for
bad input (config, search space, YAML, tracking URI, Ray connection, a worker actor lost past
``actors.max_restarts``, ...) into one line on stderr and exit code 2, instead of a traceback.
A real bug still prints its traceback; ``TUNEGUARD_DEBUG=1`` prints it for every error.
"""

from __future__ import annotations

import json
import math
import os
import sys
import unicodedata
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from rich.console import Console
from typer.core import TyperGroup

T = TypeVar("T")
# Off a terminal (CI logs, pipes, files) rich would wrap every line at 80 columns, breaking the
# commands and ids users copy out of a log: print each line whole instead.
err_console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
console = Console(soft_wrap=not sys.stdout.isatty())

MAX_MESSAGE = 4000


def printable(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` safe for a terminal: control and bidi characters escaped (newlines and tabs kept),
    cut to ``limit`` characters."""
    out = []
    for ch in text:
        if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}")
    s = "".join(out)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear error for the user, no traceback."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    sys.exit(code)


def user_errors(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn the library's input errors into one clear line and exit code 2."""
    from tuneguard.config import ConfigError
    from tuneguard.data import DataNotFoundError

    try:
        return fn()
    except (ConfigError, DataNotFoundError, ValueError) as err:
        fail(str(err))


def strict_json(obj: Any) -> str:
    """JSON that any parser reads: NaN and infinities become null (``json.dumps`` would write
    bare ``NaN``, which is not JSON)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if x is None or isinstance(x, str | int | bool):
            return x
        try:
            import numpy as np

            if isinstance(x, np.generic):
                return clean(x.item())
        except ImportError:  # pragma: no cover
            pass
        return str(x)

    return json.dumps(clean(obj), allow_nan=False)


def _from_tuneguard(err: BaseException) -> bool:
    """Whether the innermost frame that raised ``err`` is tuneguard's own code (a deliberate
    error with a message for the user) rather than a library's."""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    module = last.tb_frame.f_globals.get("__name__", "")
    return module == "tuneguard" or module.startswith("tuneguard.")


def known_error(err: BaseException) -> str | None:
    """The one-line message for an error tuneguard expects (bad input, an unreachable service,
    a lost worker actor); None for anything else (a bug: keep its traceback)."""
    if isinstance(err, KeyboardInterrupt | SystemExit):
        return None
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError wraps the real error
    if isinstance(cause, BaseException) and cause is not err:
        inner = known_error(cause)
        if inner:
            return inner
    for cls in type(err).__mro__:
        mod = getattr(cls, "__module__", "") or ""
        if cls is not BaseException and (mod == "tuneguard" or mod.startswith("tuneguard.")):
            return str(err)
    if isinstance(err, RuntimeError | ValueError | ConnectionError | TimeoutError) and _from_tuneguard(err):
        return str(err)
    if isinstance(err, OSError) and getattr(err, "filename", None):
        return f"{err.strerror or err}: {err.filename}"
    name = type(err).__name__
    mod = type(err).__module__ or ""
    if mod.startswith("mlflow") or name == "MlflowException":
        text = getattr(err, "message", None) or str(err)
        return f"MLflow: {text}"
    if mod.startswith("sqlalchemy"):
        return f"the MLflow store's database refused the operation: {str(err).splitlines()[0]}"
    if mod.startswith("ray") and name in ("ActorDiedError", "ActorUnavailableError", "RaySystemError",
                                           "GetTimeoutError", "OutOfMemoryError", "NodeDiedError"):
        return f"Ray: {name}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


class GuardedGroup(TyperGroup):
    """The ``tuneguard`` command group: known errors become ``error: ...`` and exit code 2."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            if os.environ.get("TUNEGUARD_DEBUG"):
                raise
            err_console.print("interrupted", highlight=False)
            sys.exit(130)
        except Exception as err:  # noqa: BLE001 - classified below; unknown errors re-raise
            import click
            import typer

            if isinstance(err, click.exceptions.ClickException | click.exceptions.Exit | click.exceptions.Abort
                          | typer.Exit | typer.Abort):
                raise
            message = known_error(err)
            if message is None or os.environ.get("TUNEGUARD_DEBUG"):
                raise
            fail(message)
