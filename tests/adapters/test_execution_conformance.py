"""The execution conformance suite, run against every adapter turnbuckle ships."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import apsw
import attrs
import pytest

import turnbuckle
from turnbuckle.adapters.memory import MemoryRunner
from turnbuckle.testing import conformance

from .factories import FACTORIES, memory_factory, sqlite_factory

Scenario = Callable[[conformance.StoreFactory], Awaitable[None]]


@pytest.fixture(params=sorted(FACTORIES))
def make(request: pytest.FixtureRequest, tmp_path: Path) -> conformance.StoreFactory:
    return FACTORIES[request.param](tmp_path)


@pytest.mark.parametrize("scenario", conformance.EXECUTION_SCENARIOS, ids=lambda s: s.__name__)
async def test_executions(make: conformance.StoreFactory, scenario: Scenario) -> None:
    await scenario(make)


async def corrupt_memory(store: turnbuckle.Store, execution_id: str, column: str, raw: str) -> None:
    runner = store.executions._run.__self__  # type: ignore[attr-defined]
    assert isinstance(runner, MemoryRunner)
    rows = runner.table._executions
    changes: dict[str, Any] = {column: raw}
    rows[execution_id] = attrs.evolve(rows[execution_id], **changes)


async def corrupt_sqlite(store: turnbuckle.Store, execution_id: str, column: str, raw: str) -> None:
    # Damage from outside: another connection writes the column behind the store's back.
    path = store.url[len("sqlite:///") :]
    conn = apsw.Connection(path)
    try:
        conn.setbusytimeout(5000)
        conn.execute(
            f"UPDATE executions SET {column} = ? WHERE execution_id = ?", (raw, execution_id)
        )
        assert conn.changes() == 1
    finally:
        conn.close()


async def test_corrupt_summary_memory(tmp_path: Path) -> None:
    await conformance.corrupt_summary(memory_factory(tmp_path), corrupt_memory)


async def test_corrupt_summary_sqlite(tmp_path: Path) -> None:
    await conformance.corrupt_summary(sqlite_factory(tmp_path), corrupt_sqlite)


async def test_whole_suite_entry_point(tmp_path: Path) -> None:
    """The one-call entry point third-party adapters use runs everything."""
    await conformance.executions(memory_factory(tmp_path), corrupt=corrupt_memory)
