"""The in-memory store: the reference model every other adapter must agree with.

It keeps the same rows the SQLite store keeps (payloads as canonical JSON text), so it accepts and
refuses exactly the same inputs and hands every caller a fresh copy. Operations run to completion
without awaiting, so on one event loop each is atomic; an operation that raises part-way is undone
from its undo log, so it is all or nothing like a rolled-back transaction.

A memory store belongs to the event loop thread that uses it; it is not shared across threads or
processes, and its contents end with it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.lowlevel
import attrs

from turnbuckle.adapters.tasks import TaskTable
from turnbuckle.errors import StoreClosedError, StoreInternalError, TurnbuckleError
from turnbuckle.sansio.task import TaskRow, TaskStatus

__all__ = ["MemoryTaskTable", "MemoryRunner"]

T = TypeVar("T")
_LIVE = frozenset({TaskStatus.WORKING.value, TaskStatus.INPUT_REQUIRED.value})


class MemoryTaskTable:
    """Tasks in dicts, with sorted keys per listing scope for keyset pagination."""

    def __init__(self) -> None:
        self._rows: dict[str, TaskRow] = {}
        # (created_ms, task_id) keys in order: None is "all tasks", else a session id.
        self._order: dict[str | None, list[tuple[int, str]]] = {None: []}
        self._undo: list[Callable[[], None]] | None = None

    # --- transactions ---

    def begin(self) -> None:
        self._undo = []

    def commit(self) -> None:
        self._undo = None

    def rollback(self) -> None:
        undo, self._undo = self._undo or [], None
        for step in reversed(undo):
            step()

    def _log(self, step: Callable[[], None]) -> None:
        if self._undo is not None:
            self._undo.append(step)

    # --- TaskTable ---

    def get(self, task_id: str) -> TaskRow | None:
        return self._rows.get(task_id)

    def insert(self, row: TaskRow) -> bool:
        if row.task_id in self._rows:
            return False
        self._put(row)
        self._log(lambda: self._remove(row.task_id))
        return True

    def replace(self, row: TaskRow, expected_version: int) -> bool:
        old = self._rows.get(row.task_id)
        if old is None or old.version != expected_version:
            return False
        self._remove(row.task_id)
        self._put(row)

        def undo() -> None:
            self._remove(row.task_id)
            self._put(old)

        self._log(undo)
        return True

    def delete(self, task_id: str) -> bool:
        old = self._rows.get(task_id)
        if old is None:
            return False
        self._remove(task_id)
        self._log(lambda: self._put(old))
        return True

    def count(self) -> int:
        return len(self._rows)

    def page(
        self, session_id: str | None, after: tuple[int, str] | None, limit: int
    ) -> list[TaskRow]:
        keys = self._order.get(session_id, [])
        start = 0 if after is None else bisect.bisect_right(keys, after)
        return [self._rows[task_id] for _, task_id in keys[start : start + limit]]

    def expiring_before(self, now_ms: int) -> list[tuple[str, int, int]]:
        return [
            (row.task_id, row.created_ms, row.ttl)
            for row in self._rows.values()
            if row.ttl is not None and row.created_ms + row.ttl < now_ms
        ]

    def live_updated_before(self, cutoff_ms: int) -> list[TaskRow]:
        return [r for r in self._rows.values() if r.status in _LIVE and r.updated_ms < cutoff_ms]

    # --- indexes ---

    def _put(self, row: TaskRow) -> None:
        self._rows[row.task_id] = row
        key = (row.created_ms, row.task_id)
        bisect.insort(self._order[None], key)
        if row.session_id is not None:
            bisect.insort(self._order.setdefault(row.session_id, []), key)

    def _remove(self, task_id: str) -> None:
        row = self._rows.pop(task_id)
        key = (row.created_ms, row.task_id)
        for scope in (None, row.session_id) if row.session_id is not None else (None,):
            keys = self._order[scope]
            del keys[bisect.bisect_left(keys, key)]
            if scope is not None and not keys:
                del self._order[scope]

    def corrupt_for_testing(self, task_id: str, column: str, raw: object) -> None:
        """Overwrite one column of a stored row with ``raw``, as damage from outside would."""
        changes: dict[str, Any] = {column: raw}
        self._rows[task_id] = attrs.evolve(self._rows[task_id], **changes)


class MemoryRunner:
    """Runs each operation atomically against one :class:`MemoryTaskTable`."""

    def __init__(self, table: MemoryTaskTable) -> None:
        self.table = table
        self.closed = False

    async def run(self, fn: Callable[[TaskTable], T], *, writes: bool) -> T:
        # A checkpoint per operation keeps the memory store as interleavable (and cancellable)
        # as a real one, so concurrency tests exercise the same orderings on both.
        await anyio.lowlevel.checkpoint()
        if self.closed:
            raise StoreClosedError("memory")
        table = self.table
        table.begin()
        try:
            result = fn(table)
        except TurnbuckleError:
            table.rollback()
            raise
        except Exception as exc:
            table.rollback()
            raise StoreInternalError("memory://", f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            table.rollback()
            raise
        table.commit()
        return result
