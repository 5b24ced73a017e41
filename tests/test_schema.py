"""The results schema owns every ``tuneguard.*`` MLflow tag name: no other module spells one."""

from __future__ import annotations

import re
from pathlib import Path

from tuneguard.results import schema

PKG = Path(__file__).resolve().parents[1] / "tuneguard"
TAG_LITERAL = re.compile(r"""["'`](tuneguard\.[a-z_]+)["'`]""")


def test_no_tag_literal_outside_the_schema():
    modules = {p.stem for p in PKG.rglob("*.py")} | {p.name for p in PKG.rglob("*") if p.is_dir()} | {"train"}
    stray = []
    for path in PKG.rglob("*.py"):
        if path.name == "schema.py":
            continue
        for m in TAG_LITERAL.finditer(path.read_text()):
            if m.group(1).split(".")[1] not in modules:  # module paths in messages are not tags
                stray.append(f"{path.relative_to(PKG)}: {m.group(1)}")
    assert not stray, stray


def test_names_are_unique_and_filters_quote():
    names = list(schema.names())
    assert len(names) == len(set(names)) and schema.JOB in names
    assert schema.tag_filter(job="a'b", kind=None) == "tags.`tuneguard.job` = 'a\\'b'"
    assert schema.best_accuracy({"best_cross_accuracy": 0.5}) == 0.5
    assert schema.best_accuracy({"max_cross_accuracy": 0.7, "best_cross_accuracy": 0.5}) == 0.7
