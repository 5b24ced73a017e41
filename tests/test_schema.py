"""The results schema owns every ``tuneguard.*`` MLflow tag name: no other module spells one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tuneguard.results import schema

PKG = Path(__file__).resolve().parents[1] / "tuneguard"
TAG = re.compile(r"^tuneguard\.[a-z_]+$")  # a whole string that is a tag name
FILTER = re.compile(r"tags\.`tuneguard\.")  # a hand-written MLflow filter on a tuneguard tag


def test_no_tag_literal_outside_the_schema():
    """Every string constant in the package (docstrings may name tags; code may not spell them)."""
    modules = {p.stem for p in PKG.rglob("*.py")} | {p.name for p in PKG.rglob("*") if p.is_dir()}
    stray = []
    for path in PKG.rglob("*.py"):
        if path.name == "schema.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                v = node.value
                if (TAG.match(v) and v.split(".")[1] not in modules) or FILTER.search(v):
                    stray.append(f"{path.relative_to(PKG)}:{node.lineno}: {v[:60]}")
    assert not stray, stray


def test_names_are_unique_and_filters_quote():
    names = list(schema.names())
    assert len(names) == len(set(names)) and schema.JOB in names
    assert schema.tag_filter(job="a'b", kind=None) == "tags.`tuneguard.job` = 'a\\'b'"
    assert schema.best_accuracy({"best_cross_accuracy": 0.5}) == 0.5
    assert schema.best_accuracy({"max_cross_accuracy": 0.7, "best_cross_accuracy": 0.5}) == 0.7
