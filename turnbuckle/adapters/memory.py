"""The in-memory store: the reference model every other adapter must agree with.

It keeps the same rows the SQLite store keeps (payloads as canonical JSON text), so it accepts and
refuses exactly the same inputs and hands every caller a fresh copy. Operations run to completion
without awaiting, so on one event loop each is atomic; an operation that raises part-way is undone
from its undo log, so it is all or nothing like a rolled-back transaction.

A memory store belongs to the event loop thread that uses it; it is not shared across threads or
processes, and its contents end with it. In a child process made by ``fork`` its copy is refused
(``StoreUsedInForkedChild``), as the SQLite store's is, rather than silently diverging.
"""

from __future__ import annotations

import bisect
import os
import secrets
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio.lowlevel
import attrs

from turnbuckle.adapters.executions import ExecutionEvent, Frame
from turnbuckle.errors import (
    StoreClosedError,
    StoreInternalError,
    StoreUsedInForkedChild,
    TurnbuckleError,
)
from turnbuckle.sansio.execution import ExecutionRow
from turnbuckle.sansio.lease import LeaseRow
from turnbuckle.sansio.queue import DeliveryRow, QueuedBatchRow
from turnbuckle.sansio.session import AttachmentEntry, HeadRow, TurnStampRow
from turnbuckle.sansio.task import TaskRow, TaskStatus

__all__ = ["MemoryRunner", "MemorySessionTable", "MemoryTables", "MemoryTaskTable"]

T = TypeVar("T")
_LIVE = frozenset({TaskStatus.WORKING.value, TaskStatus.INPUT_REQUIRED.value})


_MISSING: Any = object()


class _UndoLog:
    """All-or-nothing for plain dicts: every change inside an operation records its inverse."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] | None = None

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

    def _set(self, mapping: dict[Any, Any], key: Any, value: Any) -> None:
        old = mapping.get(key, _MISSING)
        mapping[key] = value
        self._log(lambda: _restore(mapping, key, old))

    def _pop(self, mapping: dict[Any, Any], key: Any) -> Any:
        old = mapping.pop(key, _MISSING)
        if old is not _MISSING:
            self._log(lambda: _restore(mapping, key, old))
        return None if old is _MISSING else old


def _restore(mapping: dict[Any, Any], key: Any, old: Any) -> None:
    if old is _MISSING:
        mapping.pop(key, None)
    else:
        mapping[key] = old


class MemoryTaskTable(_UndoLog):
    """Tasks in dicts, with sorted keys per listing scope for keyset pagination."""

    def __init__(self) -> None:
        super().__init__()
        self._rows: dict[str, TaskRow] = {}
        # (created_ms, task_id) keys in order: None is "all tasks", else a session id.
        self._order: dict[str | None, list[tuple[int, str]]] = {None: []}

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


class MemorySessionTable(_UndoLog):
    """Sessions, leases, queued work, attachments and blobs in dicts."""

    def __init__(self) -> None:
        super().__init__()
        self._heads: dict[str, HeadRow] = {}
        # session -> {node_id: [seq, json, tombstoned]} ; insertion order is seq order
        self._nodes: dict[str, dict[str, tuple[int, str, bool]]] = {}
        self._node_seq = 0
        self._usage: dict[str, dict[int, str]] = {}
        self._stamps: dict[tuple[str, str], TurnStampRow] = {}
        self._leases: dict[str, LeaseRow] = {}
        self._batches: dict[str, QueuedBatchRow] = {}
        self._sources: dict[tuple[str, str], str] = {}
        self._deliveries: dict[str, DeliveryRow] = {}
        self._delivered_sources: dict[tuple[str, str], str] = {}
        self._enqueue_seq = 0
        self._meta: dict[str, str] = {}
        self._attachments: dict[str, AttachmentEntry] = {}
        self._blobs: dict[str, bytes] = {}

    def head(self, session_id: str) -> HeadRow | None:
        return self._heads.get(session_id)

    def put_head(self, row: HeadRow, expected_revision: int) -> bool:
        old = self._heads.get(row.session_id)
        if (0 if old is None else old.head_revision) != expected_revision:
            return False
        self._set(self._heads, row.session_id, row)
        return True

    def heads(self) -> list[HeadRow]:
        return list(self._heads.values())

    def nodes(self, session_id: str) -> list[tuple[str, str, bool]]:
        found = self._nodes.get(session_id, {})
        ordered = sorted(found.items(), key=lambda item: item[1][0])
        return [(node_id, text, dead) for node_id, (_, text, dead) in ordered]

    def node(self, session_id: str, node_id: str) -> tuple[str, bool] | None:
        found = self._nodes.get(session_id, {}).get(node_id)
        return None if found is None else (found[1], found[2])

    def _session_nodes(self, session_id: str) -> dict[str, tuple[int, str, bool]]:
        if session_id not in self._nodes:
            self._set(self._nodes, session_id, {})
        return self._nodes[session_id]

    def add_nodes(self, session_id: str, nodes: Sequence[tuple[str, str]]) -> None:
        table = self._session_nodes(session_id)
        for node_id, text in nodes:
            self._node_seq += 1
            self._set(table, node_id, (self._node_seq, text, False))

    def clear_nodes(self, session_id: str) -> None:
        table = self._session_nodes(session_id)
        for node_id in list(table):
            self._pop(table, node_id)

    def tombstone(self, session_id: str, node_ids: Sequence[str]) -> int:
        table = self._nodes.get(session_id, {})
        count = 0
        for node_id in node_ids:
            found = table.get(node_id)
            if found is not None and not found[2]:
                self._set(table, node_id, (found[0], found[1], True))
                count += 1
        return count

    def vacuum(self) -> int:
        count = 0
        for table in self._nodes.values():
            for node_id, (_, _, dead) in list(table.items()):
                if dead:
                    self._pop(table, node_id)
                    count += 1
        return count

    def add_usage(self, session_id: str, entries: Sequence[str]) -> None:
        if session_id not in self._usage:
            self._set(self._usage, session_id, {})
        ledger = self._usage[session_id]
        for text in entries:
            self._set(ledger, len(ledger), text)

    def usage(self, session_id: str) -> list[str]:
        ledger = self._usage.get(session_id, {})
        return [ledger[i] for i in sorted(ledger)]

    def stamp(self, session_id: str, turn_id: str) -> TurnStampRow | None:
        return self._stamps.get((session_id, turn_id))

    def put_stamp(self, row: TurnStampRow) -> None:
        self._set(self._stamps, (row.session_id, row.turn_id), row)

    def lease(self, session_id: str) -> LeaseRow | None:
        return self._leases.get(session_id)

    def put_lease(self, row: LeaseRow) -> None:
        self._set(self._leases, row.session_id, row)

    def batches(self, session_id: str) -> list[QueuedBatchRow]:
        rows = [r for r in self._batches.values() if r.session_id == session_id]
        return sorted(rows, key=lambda r: r.enqueue_seq)

    def parked(self, session_id: str | None) -> list[QueuedBatchRow]:
        rows = [
            r
            for r in self._batches.values()
            if r.parked and (session_id is None or r.session_id == session_id)
        ]
        return sorted(rows, key=lambda r: (r.session_id, r.enqueue_seq))

    def batch(self, batch_id: str) -> QueuedBatchRow | None:
        return self._batches.get(batch_id)

    def sessions_with_work(self) -> list[str]:
        return sorted({r.session_id for r in self._batches.values()})

    def batch_by_source(self, session_id: str, source_key: str) -> QueuedBatchRow | None:
        batch_id = self._sources.get((session_id, source_key))
        return None if batch_id is None else self._batches.get(batch_id)

    def next_enqueue_seq(self) -> int:
        seq = self._enqueue_seq + 1
        self._enqueue_seq = seq
        return seq

    def insert_batch(self, row: QueuedBatchRow) -> None:
        self._set(self._batches, row.batch_id, row)
        if row.source_key is not None:
            self._set(self._sources, (row.session_id, row.source_key), row.batch_id)

    def update_batch(self, row: QueuedBatchRow, claim_token: str | None) -> bool:
        old = self._batches.get(row.batch_id)
        if old is None or old.claim_token != claim_token:
            return False
        self._set(self._batches, row.batch_id, row)
        return True

    def delete_batch(self, batch_id: str) -> bool:
        row = self._pop(self._batches, batch_id)
        if row is None:
            return False
        if row.source_key is not None:
            self._pop(self._sources, (row.session_id, row.source_key))
        return True

    def delivery(self, batch_id: str) -> DeliveryRow | None:
        return self._deliveries.get(batch_id)

    def delivery_by_source(self, session_id: str, source_key: str) -> DeliveryRow | None:
        batch_id = self._delivered_sources.get((session_id, source_key))
        return None if batch_id is None else self._deliveries.get(batch_id)

    def insert_delivery(self, row: DeliveryRow) -> None:
        batch = row.row
        self._set(self._deliveries, batch.batch_id, row)
        if batch.source_key is not None:
            self._set(self._delivered_sources, (batch.session_id, batch.source_key), batch.batch_id)

    def meta(self, session_id: str) -> str | None:
        return self._meta.get(session_id)

    def put_meta(self, session_id: str, meta: str) -> None:
        self._set(self._meta, session_id, meta)

    def put_intent(self, entry: AttachmentEntry) -> None:
        if entry.attachment_id not in self._attachments:
            self._set(self._attachments, entry.attachment_id, entry)

    def commit_attachments(self, session_id: str, ids: Sequence[str], now_ms: int) -> None:
        for attachment_id in ids:
            entry = self._attachments.get(attachment_id)
            if (
                entry is not None
                and entry.session_id == session_id
                and entry.committed_at_ms is None
            ):
                self._set(
                    self._attachments, attachment_id, attrs.evolve(entry, committed_at_ms=now_ms)
                )

    def uncommitted(self, older_than_ms: int) -> list[AttachmentEntry]:
        return sorted(
            (
                e
                for e in self._attachments.values()
                if e.committed_at_ms is None and e.intent_at_ms < older_than_ms
            ),
            key=lambda e: (e.intent_at_ms, e.attachment_id),
        )

    def forget(self, attachment_id: str) -> bool:
        return self._pop(self._attachments, attachment_id) is not None

    def put_blob(self, ref: str, content: bytes) -> None:
        if ref not in self._blobs:
            self._set(self._blobs, ref, content)

    def blob(self, ref: str) -> bytes | None:
        return self._blobs.get(ref)

    def blob_refs(self) -> list[str]:
        return sorted(self._blobs)

    def delete_blob(self, ref: str) -> None:
        self._pop(self._blobs, ref)


class MemoryExecutionTable(_UndoLog):
    """Executions, their frames and their outbox events in dicts."""

    def __init__(self) -> None:
        super().__init__()
        self._store_id = secrets.token_hex(8)
        self._executions: dict[str, ExecutionRow] = {}
        self._frames: dict[tuple[str, int], tuple[Frame, str]] = {}
        self._events: dict[int, ExecutionEvent] = {}
        self._counters: dict[str, int] = {"event": 1}
        self._cancels: dict[str, bool] = {}

    def store_id(self) -> str:
        return self._store_id

    def execution(self, execution_id: str) -> ExecutionRow | None:
        return self._executions.get(execution_id)

    def insert_execution(self, row: ExecutionRow) -> bool:
        if row.execution_id in self._executions:
            return False
        self._set(self._executions, row.execution_id, row)
        return True

    def replace_execution(self, row: ExecutionRow, expected_version: int) -> bool:
        old = self._executions.get(row.execution_id)
        if old is None or old.version != expected_version:
            return False
        self._set(self._executions, row.execution_id, row)
        return True

    def runnable(self, lane: str, now_ms: int, limit: int) -> list[ExecutionRow]:
        rows = [
            r
            for r in self._executions.values()
            if r.lane == lane and r.phase == "runnable" and r.not_before_ms <= now_ms
        ]
        rows.sort(key=lambda r: (-r.priority, r.created_at_ms, r.execution_id))
        return rows[:limit]

    def expired(self, lane: str, now_ms: int, limit: int) -> list[ExecutionRow]:
        rows = [
            r
            for r in self._executions.values()
            if r.lane == lane and r.phase == "active" and (r.lease_expires_at_ms or 0) <= now_ms
        ]
        rows.sort(key=lambda r: (r.lease_expires_at_ms or 0, r.execution_id))
        return rows[:limit]

    def add_frame(self, frame: Frame, text: str) -> None:
        self._set(self._frames, (frame.execution_id, frame.seq), (frame, text))

    def frames(self, execution_id: str, after_seq: int, limit: int) -> list[tuple[Frame, str]]:
        found = sorted(
            (seq, value)
            for (eid, seq), value in self._frames.items()
            if eid == execution_id and seq > after_seq
        )
        return [value for _, value in found[:limit]]

    def add_event(
        self,
        stream: str,
        execution_id: str,
        kind: str,
        attempt_index: int,
        lease_epoch: int,
        at_ms: int,
    ) -> None:
        event_id = self._counters["event"]
        self._set(self._counters, "event", event_id + 1)  # undone with the rest on rollback
        self._set(
            self._events,
            event_id,
            ExecutionEvent(
                event_id=event_id,
                stream=stream,
                execution_id=execution_id,
                kind=kind,
                attempt_index=attempt_index,
                lease_epoch=lease_epoch,
                at_ms=at_ms,
            ),
        )

    def events(self, stream: str, after_id: int, limit: int) -> list[ExecutionEvent]:
        found = [e for i, e in sorted(self._events.items()) if i > after_id and e.stream == stream]
        return found[:limit]

    def cancel_requested(self, execution_id: str) -> bool:
        return self._cancels.get(execution_id, False)

    def request_cancel(self, execution_id: str) -> None:
        self._set(self._cancels, execution_id, True)


class MemoryTables(MemoryTaskTable, MemorySessionTable, MemoryExecutionTable):
    """Every table of a memory store, sharing one undo log."""

    def __init__(self) -> None:
        MemoryTaskTable.__init__(self)
        MemorySessionTable.__init__(self)
        MemoryExecutionTable.__init__(self)


class MemoryRunner:
    """Runs each operation atomically against one :class:`MemoryTables`."""

    def __init__(self, table: MemoryTables) -> None:
        self.table = table
        self.closed = False
        # A child made by fork gets a copy of the tables that would silently diverge from the
        # parent's: it is refused, as on the SQLite store.
        self._pid = os.getpid()

    async def aclose(self) -> None:
        """Refuse every later operation (the contents go with the store). In a forked child it
        returns at once and changes nothing."""
        if os.getpid() != self._pid:
            return
        self.closed = True

    async def run(self, fn: Callable[[Any], T], *, writes: bool) -> T:
        """Run ``fn(table)`` all or nothing and return its result.

        Raises:
            StoreUsedInForkedChild: called in a child process forked from the one that made
                the store.
            StoreClosedError: the store was closed.
            whatever ``fn`` raises (a ``TurnbuckleError``), or StoreInternalError for any
            other exception, after undoing its writes.
        """
        if os.getpid() != self._pid:
            raise StoreUsedInForkedChild("memory", self._pid, os.getpid())
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
