"""Store factories for the conformance suites: every adapter turnbuckle ships."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import turnbuckle
from turnbuckle.testing import FakeClock, SeededIds, conformance

_counter = itertools.count()


def memory_factory(tmp_path: Path) -> conformance.StoreFactory:
    return lambda **options: turnbuckle.open_store("memory://", **options)


def sqlite_factory(tmp_path: Path, durability: str = "full") -> conformance.StoreFactory:
    def make(**options: Any) -> contextlib.AbstractAsyncContextManager[turnbuckle.Store]:
        # Each make() is a fresh, empty file, as the suites expect.
        return turnbuckle.open_store(
            f"sqlite:///{tmp_path}/store-{next(_counter)}.db",
            durability=durability,  # type: ignore[arg-type]
            **options,
        )

    return make


def sqlite_process_factory(tmp_path: Path) -> conformance.StoreFactory:
    return sqlite_factory(tmp_path, "process")


FACTORIES: dict[str, Callable[[Path], conformance.StoreFactory]] = {
    "memory": memory_factory,
    "sqlite": sqlite_factory,
    "sqlite-process": sqlite_process_factory,
}


@contextlib.asynccontextmanager
async def side_by_side(
    tmp_path: Path,
) -> AsyncIterator[tuple[list[turnbuckle.Store], list[FakeClock]]]:
    """A memory store (the reference model) and a fresh SQLite store, each with its own fake
    clock and the same seeded ids, for differential tests: (stores, clocks)."""
    clocks = [FakeClock(), FakeClock()]
    async with contextlib.AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(
                turnbuckle.open_store("memory://", clock=clocks[0], ids=SeededIds(1))
            ),
            await stack.enter_async_context(
                turnbuckle.open_store(
                    f"sqlite:///{tmp_path}/diff-{next(_counter)}.db",
                    clock=clocks[1],
                    ids=SeededIds(1),
                    durability="process",
                    verify_on_open=False,
                )
            ),
        ]
        yield stores, clocks
