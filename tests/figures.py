"""Figures for the reliability report: harness tests record what they measured.

``record(...)`` appends one JSON line to the file named by ``TURNBUCKLE_FIGURES`` (nothing
happens when it is unset, as in ``make test``); ``make reliability`` sets it, runs the harnesses
and renders RELIABILITY.md from the lines (scripts/reliability_report.py). A figure is recorded
only after the test's assertions passed, so every recorded run is a passing one.
"""

from __future__ import annotations

import json
import os
from typing import Any


def record(prop: str, procedure: str, **figures: Any) -> None:
    """Record one harness run: the property it proves, how, and its numbers."""
    target = os.environ.get("TURNBUCKLE_FIGURES")
    if not target:
        return
    with open(target, "a", encoding="utf-8") as out:
        out.write(
            json.dumps(
                {"property": prop, "procedure": procedure, "figures": figures}, sort_keys=True
            )
            + "\n"
        )
