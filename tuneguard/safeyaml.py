"""One safe YAML loader for every file and value tuneguard reads from a user.

On top of ``yaml.SafeLoader`` (no Python objects are ever constructed):

- **Duplicate keys are errors.** PyYAML keeps the last value silently; a config with ``lr``
  twice is almost always a mistake, and which value wins is not obvious to the reader.
- **Numbers as people write them.** YAML 1.1 (PyYAML) reads ``1e30`` and ``1e-5`` as strings
  because they lack a dot; here they are floats, as in YAML 1.2 and JSON.
- **Bounded documents.** Anchors and aliases are kept (they are useful), but a document whose
  expanded size is absurd (a "billion laughs" alias bomb: a few hundred bytes that expand to
  billions of nodes) is refused before anything walks it, and so is a recursive alias.
- **Files that are not text** (NUL bytes, not UTF-8) and files larger than
  :data:`MAX_FILE_BYTES` are refused with the file named.
- **Syntax errors** name the file, line and column.

Errors are :class:`YamlError` (a ``ValueError``), one readable message each.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 4 * 1024 * 1024  # a config or search space is a few KB
MAX_EXPANDED_NODES = 200_000  # nodes after expanding every alias
MAX_DEPTH = 64


class YamlError(ValueError):
    """A YAML file or value tuneguard refuses; the message names the file, line and rule."""


# YAML 1.2 floats (1e30, 1.5E-3, .inf, -.Inf, .nan), besides YAML 1.1's forms.
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class SafeLoader(yaml.SafeLoader):
    """SafeLoader with duplicate-key errors and YAML 1.2 floats (see the module docstring)."""


# Replace the float resolver: copy the resolver table so yaml.SafeLoader itself is unchanged.
SafeLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
SafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _construct_mapping(loader: SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *base` then overriding a key of base is what merge keys are for
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, "found an unhashable key", key_node.start_mark
            ) from None
        if key in seen:
            first = seen[key].start_mark
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {_short(key)} (first at line {first.line + 1}); each key may appear once",
                key_node.start_mark,
            )
        seen[key] = key_node
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


SafeLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters: what error messages echo back. A value that
    shares structure (aliases) is summarised without walking it."""
    if isinstance(value, dict | list | tuple) and _size(value, limit + 1) > limit:
        kind = type(value).__name__
        return f"<a {kind} of more than {limit} items>"
    return _short(value, limit)


def _size(obj: Any, cap: int) -> int:
    """Nodes of ``obj`` with shared parts counted each time (as if expanded), stopping at ``cap``."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def walk(o: Any, depth: int) -> int:
        if not isinstance(o, dict | list | tuple):
            return 1
        key = id(o)
        if key in memo:
            return memo[key]
        if key in active or depth > MAX_DEPTH:
            return cap  # recursive or absurdly deep: as large as the cap
        active.add(key)
        total = 1
        items = (x for kv in o.items() for x in kv) if isinstance(o, dict) else iter(o)
        for item in items:
            total += walk(item, depth + 1)
            if total >= cap:
                total = cap
                break
        active.discard(key)
        memo[key] = total
        return total

    return walk(obj, 0)


def _check_size(data: Any, where: str) -> None:
    memo: dict[int, int] = {}
    active: set[int] = set()

    def walk(o: Any, depth: int) -> int:
        if not isinstance(o, dict | list):
            return 1
        key = id(o)
        if key in active:
            raise YamlError(f"{where}: a recursive alias (a node that contains itself) is not allowed")
        if depth > MAX_DEPTH:
            raise YamlError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        if key in memo:
            return memo[key]
        active.add(key)
        total = 1
        items = (x for kv in o.items() for x in kv) if isinstance(o, dict) else iter(o)
        for item in items:
            total += walk(item, depth + 1)
            if total > MAX_EXPANDED_NODES:
                raise YamlError(
                    f"{where}: the document expands to more than {MAX_EXPANDED_NODES:,} values once its "
                    "aliases (*name) are expanded; refused (a config or search space needs a few hundred)"
                )
        active.discard(key)
        memo[key] = total
        return total

    walk(data, 0)


def _unshare(obj: Any) -> Any:
    """A copy in which aliased nodes are separate objects (bounded by the size check)."""
    if isinstance(obj, dict):
        return {k: _unshare(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unshare(v) for v in obj]
    return obj


def _mark_text(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    text = f"{context}: {problem}" if context and context not in str(problem) else str(problem)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    return text


def loads(text: str, where: str = "YAML") -> Any:
    """Parse ``text`` (see the module docstring); ``where`` names it in errors."""
    if "\x00" in text:
        raise YamlError(f"{where}: contains NUL bytes; expected a YAML text")
    try:
        data = yaml.load(text, Loader=SafeLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as err:
        raise YamlError(f"{where}: not valid YAML: {_mark_text(err)}") from None
    except RecursionError:
        raise YamlError(f"{where}: nested too deeply to read") from None
    _check_size(data, where)
    return _unshare(data)


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of a YAML file, with the checks of :func:`load_file` (exists, regular file, not
    too large, text not binary, UTF-8)."""
    p = Path(path)
    try:
        if not p.exists():
            raise YamlError(f"{what} not found: {p}")
        if p.is_dir():
            raise YamlError(f"{p} is a directory; expected a YAML {what}")
        if not p.is_file():
            raise YamlError(f"{p} is not a regular file; expected a YAML {what}")
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise YamlError(f"{p}: {size:,} bytes; a YAML {what} may be at most {MAX_FILE_BYTES:,} bytes")
        data = p.read_bytes()
    except OSError as err:
        raise YamlError(f"cannot read {what} {p}: {err.strerror or err}") from None
    if b"\x00" in data:
        raise YamlError(f"{p} is a binary file (it contains NUL bytes); expected a YAML {what}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise YamlError(f"{p} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); "
                        f"expected a YAML {what}") from None


def load_file(path: str | Path, what: str = "file") -> Any:
    """Read and parse a YAML file; every problem is a :class:`YamlError` naming the file."""
    return loads(read_text(path, what), str(path))


def scalar(text: str) -> Any:
    """A ``--set`` value: a YAML scalar (or flow collection) with the rules above; text that is
    not valid YAML is kept as a string."""
    try:
        return loads(text, "--set value")
    except YamlError as err:
        if "expands to" in str(err) or "recursive" in str(err) or "NUL" in str(err):
            raise
        return text
