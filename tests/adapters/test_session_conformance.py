"""The session (runtime persistence) conformance suite, run against every adapter turnbuckle
ships."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import turnbuckle
from turnbuckle.testing import conformance
from turnbuckle.testing.conformance import sessions as session_scenarios

from .factories import memory_factory, sqlite_factory, sqlite_process_factory

Scenario = Callable[[conformance.StoreFactory], Awaitable[None]]


#: adapter -> (fresh-store factory, the durability tier it must declare)
FACTORIES: dict[str, tuple[Callable[[Path], conformance.StoreFactory], str]] = {
    "memory": (memory_factory, "inline"),
    "sqlite": (sqlite_factory, "durable"),
    "sqlite-process": (sqlite_process_factory, "durable"),
}


@pytest.fixture(params=sorted(FACTORIES))
def adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(adapter: str, tmp_path: Path) -> conformance.StoreFactory:
    return FACTORIES[adapter][0](tmp_path)


@pytest.mark.parametrize("scenario", conformance.SESSION_SCENARIOS, ids=lambda s: s.__name__)
async def test_runtime_persistence(make: conformance.StoreFactory, scenario: Scenario) -> None:
    await scenario(make)


async def test_declared_durability(make: conformance.StoreFactory, adapter: str) -> None:
    await session_scenarios.runtime_persistence_reports_declared_durability(
        make,
        durability_tier=FACTORIES[adapter][1],  # type: ignore[arg-type]
    )


def same_store_factory(tmp_path: Path, durability: str) -> conformance.StoreFactory:
    @contextlib.asynccontextmanager
    async def make(**options: Any) -> AsyncIterator[turnbuckle.Store]:
        # Every make() reopens the same file.
        async with turnbuckle.open_store(
            f"sqlite:///{tmp_path}/same.db",
            durability=durability,  # type: ignore[arg-type]
            **options,
        ) as store:
            yield store

    return make


@pytest.mark.parametrize("durability", ["full", "process"])
@pytest.mark.parametrize("scenario", conformance.SESSION_REOPEN_SCENARIOS, ids=lambda s: s.__name__)
async def test_reopen(tmp_path: Path, durability: str, scenario: Scenario) -> None:
    await scenario(same_store_factory(tmp_path, durability))


async def test_whole_suite_entry_point(tmp_path: Path) -> None:
    """The one-call entry points third-party adapters use run everything."""
    await conformance.runtime_persistence(memory_factory(tmp_path), durability_tier="inline")


async def test_whole_reopen_entry_point(tmp_path: Path) -> None:
    await conformance.runtime_persistence_reopenable(same_store_factory(tmp_path, "full"))


async def test_memory_is_not_reopenable(tmp_path: Path) -> None:
    """The reopen suite notices a store whose data does not survive: memory's doesn't."""
    with pytest.raises(AssertionError):
        await session_scenarios.runtime_persistence_survives_reopen(memory_factory(tmp_path))
