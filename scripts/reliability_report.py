"""Render RELIABILITY.md from the figures the harnesses recorded (see tests/figures.py).

Usage: python scripts/reliability_report.py FIGURES.jsonl RELIABILITY.md [--soak]
``make reliability`` runs the harnesses with TURNBUCKLE_FIGURES set, then this.
"""

from __future__ import annotations

import json
import platform
import sys
from collections import defaultdict
from datetime import UTC, datetime

import apsw

import turnbuckle

INTRO = """# turnbuckle reliability report

Every figure below comes from a harness test that passed in this run: the harness records its
numbers only after its assertions held (`tests/figures.py`). Reproduce with `make reliability`
(CI sizes, a few minutes) or `TURNBUCKLE_SOAK=1 make reliability` (large sizes).
"""


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    soak = "--soak" in sys.argv
    runs: dict[str, list[dict[str, object]]] = defaultdict(list)
    with open(source, encoding="utf-8") as lines:
        for line in lines:
            entry = json.loads(line)
            runs[entry["property"]].append(entry)
    out = [INTRO]
    out.append(
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {'soak' if soak else 'CI'} sizes;"
        f" turnbuckle {turnbuckle.__version__}, SQLite {apsw.sqlite_lib_version()}"
        f" (apsw {apsw.apsw_version()}), Python {platform.python_version()},"
        f" {platform.machine()}.\n"
    )
    out.append("| property | runs | key figures |")
    out.append("|---|---|---|")
    for prop, entries in runs.items():
        merged: dict[str, object] = {}
        for entry in entries:
            for key, value in entry["figures"].items():  # type: ignore[attr-defined]
                summable = isinstance(value, int) and not isinstance(value, bool)
                if summable and isinstance(merged.get(key, 0), int):
                    merged[key] = int(merged.get(key, 0)) + value  # type: ignore[call-overload]
                else:
                    merged.setdefault(key, value)
        key_figures = ", ".join(f"{k} {v}" for k, v in merged.items())
        out.append(f"| {prop} | {len(entries)} | {key_figures} |")
    out.append("")
    for prop, entries in runs.items():
        out.append(f"## {prop}\n")
        for entry in entries:
            out.append(f"- Procedure: {entry['procedure']}.")
            figures = entry["figures"]
            out.append("  " + "; ".join(f"**{k}** {v}" for k, v in figures.items()))  # type: ignore[attr-defined]
        out.append("")
    with open(target, "w", encoding="utf-8") as report:
        report.write("\n".join(out))
    print(f"wrote {target}: {len(runs)} properties from {sum(map(len, runs.values()))} runs")


if __name__ == "__main__":
    main()
