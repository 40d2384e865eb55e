"""sansio/ stays pure: it imports no IO, clock, randomness or concurrency (AST walk)."""

from __future__ import annotations

import ast
from pathlib import Path

import turnbuckle.sansio

SANSIO = Path(turnbuckle.sansio.__file__).parent
# The standard library's pure parts, attrs/cattrs, and turnbuckle's own pure modules.
ALLOWED = {
    "__future__",
    "attrs",
    "base64",
    "binascii",
    "collections",
    "dataclasses",
    "datetime",
    "enum",
    "functools",
    "hashlib",
    "itertools",
    "json",
    "math",
    "operator",
    "typing",
    "cattrs",
}
ALLOWED_OWN = ("turnbuckle.sansio", "turnbuckle.errors")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            found.append((node.lineno, node.module or ""))
    return found


def offences(path: Path) -> list[str]:
    bad = []
    for line, module in imported_modules(path):
        top = module.split(".")[0]
        if top == "turnbuckle":
            if not module.startswith(ALLOWED_OWN):
                bad.append(f"{path.name}:{line}: {module}")
        elif top not in ALLOWED:
            bad.append(f"{path.name}:{line}: {module}")
    return bad


def test_sansio_imports_only_pure_modules() -> None:
    files = sorted(SANSIO.rglob("*.py"))
    assert files, "no sansio modules found"
    bad = [offence for path in files for offence in offences(path)]
    assert bad == []


def test_the_check_catches_an_impure_import(tmp_path: Path) -> None:
    impure = tmp_path / "impure.py"
    impure.write_text(
        "import json\nimport time\nfrom anyio import sleep\nimport turnbuckle.adapters\n"
    )
    assert offences(impure) == [
        "impure.py:2: time",
        "impure.py:3: anyio",
        "impure.py:4: turnbuckle.adapters",
    ]
