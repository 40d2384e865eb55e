"""The task facet of a store (``store.tasks``), written once for every adapter.

An adapter supplies two things: a :class:`TaskTable` (rows in, rows out, guarded writes that
report by their return value whether the guard held) and a :class:`Runner` that calls a function
with a table inside one atomic transaction. Each operation below is such a function: it reads the
rows it needs, asks the pure decisions in :mod:`turnbuckle.sansio.task`, and writes the result
guarded by the version it read. The lifecycle rules therefore exist once, in ``sansio``, and an
adapter only has to make its table and its transactions right.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import anyio

from turnbuckle.adapters.linked import cancel_linked_execution, task_execution_id
from turnbuckle.errors import (
    ConcurrentModification,
    CorruptRecordError,
    InvalidArgument,
    MaxTasksReached,
    TaskAlreadyExists,
    TaskNotFound,
)
from turnbuckle.sansio.codec import JSON, check_int64, check_text
from turnbuckle.sansio.execution import RetryPolicy, new_execution
from turnbuckle.sansio.task import (
    IdSource,
    TaskOutcome,
    TaskPage,
    TaskRecord,
    TaskRow,
    TaskStatus,
    apply_message,
    apply_outcome,
    apply_recovery,
    apply_replace,
    apply_status,
    check_page_size,
    check_status_request,
    decode_cursor,
    encode_cursor,
    encode_outcome,
    is_expired,
    is_stuck,
    new_row,
    prepare_replace,
    row_to_record,
)

__all__ = ["Clock", "Runner", "TaskFacet", "TaskTable"]

T = TypeVar("T")

#: Default ``max_age_ms`` of :meth:`TaskFacet.recover_stuck_tasks` callers (five minutes).
DEFAULT_STUCK_AGE_MS = 300_000


class Clock(Protocol):
    """Where stores read the time: wall clock in production, a fake one in tests."""

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch."""
        ...


class TaskTable(Protocol):
    """Row access inside one transaction. Implementations do no rule checking."""

    def get(self, task_id: str) -> TaskRow | None: ...

    def insert(self, row: TaskRow) -> bool:
        """Add ``row``; False (nothing written) if its id exists."""
        ...

    def replace(self, row: TaskRow, expected_version: int) -> bool:
        """Overwrite the row with ``row.task_id`` if its version is ``expected_version``."""
        ...

    def delete(self, task_id: str) -> bool: ...

    def count(self) -> int: ...

    def page(
        self, session_id: str | None, after: tuple[int, str] | None, limit: int
    ) -> list[TaskRow]:
        """Up to ``limit`` rows ordered by (created_ms, task_id), strictly after ``after``;
        only ``session_id``'s rows unless it is None."""
        ...

    def expiring_before(self, now_ms: int) -> list[tuple[str, int, int]]:
        """(task_id, created_ms, ttl) of rows whose created_ms + ttl < now_ms."""
        ...

    def live_updated_before(self, cutoff_ms: int) -> list[TaskRow]:
        """Rows in a non-terminal status whose updated_ms < cutoff_ms."""
        ...


class Runner(Protocol):
    """Runs a function against a table atomically: all of its writes land, or none do."""

    async def run(self, fn: Callable[[TaskTable], T], *, writes: bool) -> T: ...


class TaskFacet:
    """Durable MCP tasks: ``store.tasks``.

    Every method is one atomic operation against the store. Two callers (tasks, threads or
    processes) updating the same task are serialized: exactly one wins and the other gets the
    typed error the lifecycle gives it (usually :class:`~turnbuckle.errors.TerminalState`).
    """

    def __init__(
        self,
        runner: Runner,
        *,
        backend_name: str,
        clock: Clock,
        ids: IdSource,
        max_tasks: int,
        max_payload_bytes: int,
    ) -> None:
        self._run = runner.run
        self._clock = clock
        self._ids = ids
        self._max_tasks = max_tasks
        self._limit = max_payload_bytes
        self._last_id: str | None = None
        self.backend_name = backend_name

    async def create_task(self, record: TaskRecord) -> TaskRecord:
        """Store a new task and return it with its id and times filled in.

        Raises:
            TaskAlreadyExists: a task with ``record.task_id`` exists.
            MaxTasksReached: the store holds ``max_tasks`` tasks already.
            InvalidArgument, PayloadNotSerializable, PayloadTooLarge: a bad field.
        """
        row = new_row(
            record,
            now_ms=self._clock.now_ms(),
            ids=self._ids,
            max_payload_bytes=self._limit,
            previous_id=self._last_id,
        )
        if not record.task_id:
            self._last_id = row.task_id
        max_tasks = self._max_tasks

        def op(table: TaskTable) -> TaskRecord:
            if max_tasks and table.count() >= max_tasks:
                raise MaxTasksReached(max_tasks)
            if not table.insert(row):
                raise TaskAlreadyExists(row.task_id)
            return row_to_record(row)

        return await self._run(op, writes=True)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        """The task, or None if no task has this id.

        Raises:
            CorruptRecordError: the stored task cannot be decoded.
        """
        _check_id(task_id)

        def op(table: TaskTable) -> TaskRecord | None:
            row = table.get(task_id)
            return None if row is None else row_to_record(row)

        return await self._run(op, writes=False)

    async def update_task(self, record: TaskRecord) -> TaskRecord:
        """Replace a live task's fields (see :func:`~turnbuckle.sansio.task.apply_replace`).

        Pass back the ``last_updated_at`` you read to have the write refused if the task changed
        meanwhile; leave it empty to overwrite regardless.

        Raises:
            TaskNotFound: no task has ``record.task_id``.
            ConcurrentModification: the task changed since ``record.last_updated_at``.
            TerminalState: the task already ended.
            InvalidTransition: the new status is not reachable from the stored one.
            InvalidArgument, PayloadNotSerializable, PayloadTooLarge: a bad field.
        """
        if not isinstance(record, TaskRecord):
            raise InvalidArgument(f"update_task takes a TaskRecord, got {record!r}")
        now_ms = self._clock.now_ms()
        replacement = prepare_replace(record, now_ms=now_ms, max_payload_bytes=self._limit)
        return await self._change(
            record.task_id, lambda row: apply_replace(row, replacement, now_ms=now_ms)
        )

    async def delete_task(self, task_id: str) -> bool:
        """Delete a task; True if there was one."""
        _check_id(task_id)
        return await self._run(lambda table: table.delete(task_id), writes=True)

    async def list_tasks(self, cursor: str | None = None, limit: int | None = None) -> TaskPage:
        """One page of all tasks, oldest first, ordered by (created_at, task_id).

        Raises:
            InvalidCursor: ``cursor`` is not a ``next_cursor`` of this listing.
            InvalidArgument: ``limit`` is not from 1 to 1000.
        """
        return await self._page(None, cursor, limit)

    async def list_tasks_for_session(
        self, session_id: str, cursor: str | None = None, limit: int | None = None
    ) -> TaskPage:
        """One page of one session's tasks; never another session's.

        Raises:
            InvalidCursor: ``cursor`` is not a ``next_cursor`` of this session's listing.
            InvalidArgument: ``limit`` is not from 1 to 1000, or ``session_id`` not a str.
        """
        _check_id(session_id, "session_id")
        return await self._page(session_id, cursor, limit)

    async def update_task_status(
        self, task_id: str, status: TaskStatus, message: str | None = None
    ) -> TaskRecord:
        """Move a task to ``status`` with ``message``, as one conditional write.

        Raises:
            TaskNotFound: no such task.
            TerminalState: the task already ended (checked first).
            InvalidTransition: ``status`` is not reachable (e.g. working -> working).
            InvalidArgument, PayloadTooLarge: a bad status or message.
        """
        status = check_status_request(status, message, self._limit)
        now_ms = self._clock.now_ms()
        return await self._change(
            task_id, lambda row: apply_status(row, status, message, now_ms=now_ms)
        )

    async def set_status_message(self, task_id: str, message: str | None) -> TaskRecord:
        """Report progress: set a live task's status message, keeping its status.

        Raises:
            TaskNotFound: no such task.
            TerminalState: the task already ended.
            InvalidArgument, PayloadTooLarge: ``message`` is not a str or None, or too long.
        """
        check_text("status_message", message, optional=True, limit=self._limit)
        now_ms = self._clock.now_ms()
        return await self._change(task_id, lambda row: apply_message(row, message, now_ms=now_ms))

    async def store_task_result(self, task_id: str, outcome: TaskOutcome) -> None:
        """Store the outcome of a live task, keeping its status.

        Prefer :meth:`complete_task` / :meth:`fail_task`, which also end the task atomically.

        Raises:
            TaskNotFound: no such task.
            TerminalState: the task already ended; its outcome is final.
            InvalidArgument, PayloadNotSerializable, PayloadTooLarge: a bad outcome.
        """
        await self._finish(task_id, outcome, None, None)

    async def get_task_result(self, task_id: str) -> TaskOutcome | None:
        """The stored outcome, exactly as stored, or None if there is none yet.

        Raises:
            TaskNotFound: no such task.
            CorruptRecordError: the stored task cannot be decoded.
        """
        _check_id(task_id)

        def op(table: TaskTable) -> TaskOutcome | None:
            row = table.get(task_id)
            if row is None:
                raise TaskNotFound(task_id)
            return row_to_record(row).result

        return await self._run(op, writes=False)

    async def complete_task(
        self, task_id: str, outcome: TaskOutcome, message: str | None = None
    ) -> TaskRecord:
        """Store ``outcome`` and mark the task completed, in one transaction.

        Raises:
            TaskNotFound: no such task.
            TerminalState: the task already ended (for instance, it was cancelled).
            InvalidArgument, PayloadNotSerializable, PayloadTooLarge: a bad outcome.
        """
        return await self._finish(task_id, outcome, TaskStatus.COMPLETED, message)

    async def fail_task(
        self, task_id: str, outcome: TaskOutcome, message: str | None = None
    ) -> TaskRecord:
        """Store ``outcome`` (usually a :class:`TaskRpcError`) and mark the task failed, in one
        transaction.

        Raises:
            TaskNotFound: no such task.
            TerminalState: the task already ended.
            InvalidArgument, PayloadNotSerializable, PayloadTooLarge: a bad outcome.
        """
        return await self._finish(task_id, outcome, TaskStatus.FAILED, message)

    async def cancel_task(self, task_id: str, message: str | None = None) -> TaskRecord:
        """Mark the task cancelled (MCP: before answering ``tasks/cancel``).

        Raises:
            TaskNotFound: no such task.
            TerminalState: the task already ended; MCP rejects cancelling it (-32602).
        """
        text = "Cancelled by client" if message is None else message
        status = check_status_request(TaskStatus.CANCELLED, text, self._limit)
        now_ms = self._clock.now_ms()

        def op(table: TaskTable) -> TaskRecord:
            record = self._change_op(
                table, task_id, lambda row: apply_status(row, status, text, now_ms=now_ms)
            )
            if hasattr(table, "request_cancel"):  # stores that run executions
                cancel_linked_execution(table, task_id, now_ms)
            return record

        _check_id(task_id)
        return await self._run(op, writes=True)

    async def create_running_task(
        self,
        record: TaskRecord,
        lane: str,
        *,
        capabilities: Iterable[str] = (),
        priority: int = 0,
        payload: JSON = None,
        retry: RetryPolicy | None = None,
    ) -> TaskRecord:
        """Create a task and the execution that runs it (id ``task:<task_id>``), in one
        transaction. A worker on ``lane`` runs it; the task follows the execution (progress
        messages, retries, result, failure) and cancelling the task cancels the run.

        Raises:
            as :meth:`create_task`, and InvalidArgument for a bad lane or execution option.
        """
        now_ms = self._clock.now_ms()
        row = new_row(
            record,
            now_ms=now_ms,
            ids=self._ids,
            max_payload_bytes=self._limit,
            previous_id=self._last_id,
        )
        if not record.task_id:
            self._last_id = row.task_id
        execution = new_execution(
            execution_id=task_execution_id(row.task_id),
            lane=lane,
            capabilities=capabilities,
            priority=priority,
            payload=payload,
            retry=RetryPolicy() if retry is None else retry,
            now_ms=now_ms,
            limit=self._limit,
        )
        max_tasks = self._max_tasks

        def op(table: Any) -> TaskRecord:
            if max_tasks and table.count() >= max_tasks:
                raise MaxTasksReached(max_tasks)
            if not table.insert(row):
                raise TaskAlreadyExists(row.task_id)
            if not table.insert_execution(execution):
                raise ConcurrentModification(execution.execution_id)
            return row_to_record(row)

        return await self._run(op, writes=True)

    async def wait_result(self, task_id: str, *, poll_interval: float = 0.05) -> TaskOutcome | None:
        """``tasks/result``: wait until the task ends, then return its outcome as stored.

        Raises:
            TaskNotFound: no such task (or it expired while waiting).
        """
        _check_id(task_id)
        while True:
            task = await self.get_task(task_id)
            if task is None:
                raise TaskNotFound(task_id)
            if task.status.is_terminal:
                return task.result
            await anyio.sleep(poll_interval)

    async def expire_tasks(self) -> list[str]:
        """Delete every task whose TTL (counted from creation) has run out, whatever its
        status, and return their ids, sorted."""
        now_ms = self._clock.now_ms()

        def op(table: TaskTable) -> list[str]:
            gone = []
            for task_id, created_ms, ttl in table.expiring_before(now_ms):
                if is_expired(created_ms, ttl, now_ms) and table.delete(task_id):
                    gone.append(task_id)
            return sorted(gone)  # the same answer from every adapter

        return await self._run(op, writes=True)

    async def task_count(self) -> int:
        """How many tasks the store holds."""
        return await self._run(lambda table: table.count(), writes=False)

    async def maintenance(self) -> None:
        """Periodic upkeep: sweeps expired tasks."""
        await self.expire_tasks()

    async def recover_stuck_tasks(self, max_age_ms: int = DEFAULT_STUCK_AGE_MS) -> list[str]:
        """Fail every live task not updated for more than ``max_age_ms`` (run at startup: its
        worker died with the previous process). Each gets the status message
        ``"Server restarted — task interrupted"`` and, unless it has one, a JSON-RPC internal
        error as its outcome. Returns their ids.

        Raises:
            InvalidArgument: ``max_age_ms`` is not a non-negative int.
        """
        check_int64("max_age_ms", max_age_ms)
        now_ms = self._clock.now_ms()

        def op(table: TaskTable) -> list[str]:
            recovered = []
            for row in table.live_updated_before(now_ms - max_age_ms):
                try:
                    status = TaskStatus(row.status)
                except ValueError:
                    continue  # corrupt: leave it for get_task to report
                if is_stuck(status, row.updated_ms, max_age_ms, now_ms):
                    if not table.replace(apply_recovery(row, now_ms=now_ms), row.version):
                        raise ConcurrentModification(row.task_id)
                    recovered.append(row.task_id)
            return sorted(recovered)  # the same answer from every adapter

        return await self._run(op, writes=True)

    # --- shared shapes ---

    async def _change(self, task_id: str, decide: Callable[[TaskRow], TaskRow]) -> TaskRecord:
        """Read a task, decide its next row, and write it guarded by the version read."""
        _check_id(task_id)
        return await self._run(lambda table: self._change_op(table, task_id, decide), writes=True)

    @staticmethod
    def _change_op(
        table: TaskTable, task_id: str, decide: Callable[[TaskRow], TaskRow]
    ) -> TaskRecord:
        row = table.get(task_id)
        if row is None:
            raise TaskNotFound(task_id)
        new = decide(row)
        if not table.replace(new, row.version):
            raise ConcurrentModification(task_id)
        return row_to_record(new)

    async def _finish(
        self, task_id: str, outcome: TaskOutcome, status: TaskStatus | None, message: str | None
    ) -> TaskRecord:
        # Validated and encoded before the transaction: bad input is refused the same way
        # whatever the task's state, and the store's critical section stays short.
        encoded = encode_outcome(outcome, self._limit)
        check_text("status_message", message, optional=True, limit=self._limit)
        now_ms = self._clock.now_ms()
        return await self._change(
            task_id,
            lambda row: apply_outcome(row, encoded, status=status, message=message, now_ms=now_ms),
        )

    async def _page(
        self, session_id: str | None, cursor: str | None, limit: int | None
    ) -> TaskPage:
        size = check_page_size(limit)
        after = None if cursor is None else decode_cursor(_checked_cursor(cursor), session_id)

        def op(table: TaskTable) -> TaskPage:
            rows = table.page(session_id, after, size + 1)
            more = len(rows) > size
            rows = rows[:size]
            tasks, corrupt = [], []
            for row in rows:
                try:
                    tasks.append(row_to_record(row))
                except CorruptRecordError:
                    corrupt.append(row.task_id)
            last = rows[-1] if more else None
            next_cursor = (
                None if last is None else encode_cursor(session_id, last.created_ms, last.task_id)
            )
            return TaskPage(tuple(tasks), next_cursor, tuple(corrupt))

        return await self._run(op, writes=False)


def _check_id(value: object, name: str = "task_id") -> None:
    check_text(name, value)


def _checked_cursor(cursor: object) -> str:
    if type(cursor) is not str:
        raise InvalidArgument(f"cursor must be a str or None, got {cursor!r}")
    return cursor
