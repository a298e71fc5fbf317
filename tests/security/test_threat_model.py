"""docs/SECURITY.md names, for each threat, the tests that show its mitigation: every one
of them must exist, so the page cannot promise what no test checks."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAMED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def test_every_test_the_threat_model_names_exists() -> None:
    page = (REPO / "docs" / "SECURITY.md").read_text()
    named = set(NAMED.findall(page))
    assert len(named) >= 40, "the threat model names its tests as `tests/FILE.py::test_name`"
    missing = [
        f"{path}::{name}"
        for path, name in sorted(named)
        if not (REPO / path).exists() or not re.search(rf"\bdef {name}\b", (REPO / path).read_text())
    ]
    assert not missing, missing
