"""Store factories for the conformance suites: every adapter turnbuckle ships."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import turnbuckle
from turnbuckle.testing import conformance

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
