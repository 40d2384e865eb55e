"""Every ```python block of README.md runs, so the documented usage cannot rot."""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest
import trio

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, source) of each ```python block."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _BLOCK.finditer(text)]


def test_readme_has_python_examples() -> None:
    assert python_blocks(), "README.md should show at least one ```python example"


@pytest.mark.parametrize(
    "source", [pytest.param(source, id=f"line{n}") for n, source in python_blocks()]
)
def test_readme_block_runs(source: str) -> None:
    # A sync test on purpose: pytest-trio runs async tests inside trio, and a block may call
    # trio.run itself, which cannot nest.
    code = compile(source, str(README), "exec")
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(code, namespace)
    main = namespace.get("main")
    if inspect.iscoroutinefunction(main) and not (
        "trio.run(" in source or "asyncio.run(" in source
    ):
        trio.run(main)
