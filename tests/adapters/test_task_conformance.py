"""The task conformance suite, run against every adapter turnbuckle ships."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import apsw
import pytest

import turnbuckle
from turnbuckle.adapters.memory import MemoryRunner
from turnbuckle.testing import conformance

from .factories import FACTORIES, memory_factory, sqlite_factory

Scenario = Callable[[conformance.StoreFactory], Awaitable[None]]


@pytest.fixture(params=sorted(FACTORIES))
def make(request: pytest.FixtureRequest, tmp_path: Path) -> conformance.StoreFactory:
    return FACTORIES[request.param](tmp_path)


@pytest.mark.parametrize("scenario", conformance.TASK_STORE_SCENARIOS, ids=lambda s: s.__name__)
async def test_task_store(make: conformance.StoreFactory, scenario: Scenario) -> None:
    await scenario(make)


async def corrupt_memory(store: turnbuckle.Store, task_id: str, column: str, raw: str) -> None:
    runner = store.tasks._run.__self__  # type: ignore[attr-defined]
    assert isinstance(runner, MemoryRunner)
    runner.table.corrupt_for_testing(task_id, column, raw)


async def corrupt_sqlite(store: turnbuckle.Store, task_id: str, column: str, raw: str) -> None:
    # Damage from outside: another connection writes the column behind the store's back.
    path = store.url[len("sqlite:///") :]
    conn = apsw.Connection(path)
    try:
        conn.setbusytimeout(5000)
        conn.execute(f"UPDATE tasks SET {column} = ? WHERE task_id = ?", (raw, task_id))
        assert conn.changes() == 1
    finally:
        conn.close()


async def test_corrupt_rows_memory(tmp_path: Path) -> None:
    await conformance.corrupt_rows(memory_factory(tmp_path), corrupt_memory)


async def test_corrupt_rows_sqlite(tmp_path: Path) -> None:
    await conformance.corrupt_rows(sqlite_factory(tmp_path), corrupt_sqlite)


@pytest.mark.parametrize("durability", ["full", "process"])
@pytest.mark.parametrize("scenario", conformance.REOPEN_SCENARIOS, ids=lambda s: s.__name__)
async def test_reopen(tmp_path: Path, durability: str, scenario: Scenario) -> None:
    @contextlib.asynccontextmanager
    async def make(**options: Any) -> AsyncIterator[turnbuckle.Store]:
        async with turnbuckle.open_store(
            f"sqlite:///{tmp_path}/same.db",
            durability=durability,
            **options,  # type: ignore[arg-type]
        ) as store:
            yield store

    await scenario(make)


async def test_whole_suite_entry_point(tmp_path: Path) -> None:
    """The one-call entry point third-party adapters use runs everything."""
    await conformance.task_store(memory_factory(tmp_path), corrupt=corrupt_memory)
