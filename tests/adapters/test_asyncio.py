"""The stores under asyncio: the whole task conformance suite, on both adapters.

The rest of the suite runs under trio (pytest-trio); most agent frameworks run asyncio, and the
SQLite adapter's replies cross threads through each loop's own "call soon" hook, so both loops
are tested end to end."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from turnbuckle.testing import conformance

from .test_task_conformance import corrupt_memory, corrupt_sqlite, memory_factory, sqlite_factory


@pytest.mark.parametrize("adapter", ["memory", "sqlite"])
def test_task_store_suite_under_asyncio(tmp_path: Path, adapter: str) -> None:
    make = memory_factory(tmp_path) if adapter == "memory" else sqlite_factory(tmp_path)
    corrupt = corrupt_memory if adapter == "memory" else corrupt_sqlite

    async def main() -> None:
        await conformance.task_store(make, corrupt=corrupt)

    # A sync test: pytest-trio owns async tests, and asyncio needs a loop of its own.
    anyio.run(main, backend="asyncio")
