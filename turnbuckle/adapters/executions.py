"""The execution facet of a store (``store.executions``), written once for every adapter.

As for tasks and sessions, an adapter supplies an :class:`ExecutionTable` and a runner; each
operation reads rows, asks :mod:`turnbuckle.sansio.execution`, and writes the result guarded by
the row version it read, together with its outbox events, in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

import attrs

from turnbuckle.adapters.linked import cancel_execution, sync_task
from turnbuckle.adapters.tasks import Clock
from turnbuckle.errors import (
    ConcurrentModification,
    CorruptRecordError,
    ExecutionNotFound,
    ForeignHandle,
    InvalidArgument,
)
from turnbuckle.sansio.codec import JSON, check_int64, check_text, decode_json, encode_json
from turnbuckle.sansio.execution import (
    ExecutionRow,
    ExecutionState,
    FailureClass,
    FrameKind,
    Handle,
    RetryPolicy,
    apply_summary_patch,
    check_handle,
    check_lease_ttl,
    claim_execution,
    complete_execution,
    fail_execution,
    new_execution,
    public_state,
    reclaim_execution,
    renew_execution,
    report_progress,
    select_for_claim,
)
from turnbuckle.sansio.ids import IdSource, random_hex

__all__ = ["ExecutionEvent", "ExecutionFacet", "ExecutionInfo", "ExecutionTable", "Frame"]

T = TypeVar("T")
#: How many runnable executions of a lane a claim reads first (best first); it reads more only
#: when this worker can serve none of them. Small: decoding rows is most of a claim's cost.
_CLAIM_SCAN = 8
#: How many expired executions one reclaim sweep looks at (normally there are none).
_RECLAIM_SCAN = 64


@attrs.frozen(kw_only=True)
class Frame:
    """One frame of an execution's output stream."""

    execution_id: str
    seq: int
    attempt_index: int
    kind: FrameKind
    data: JSON
    created_at_ms: int


@attrs.frozen(kw_only=True)
class ExecutionEvent:
    """An outbox event: ``stream`` is ``lease`` (acquired, renewed, revoked, reclaimed) or
    ``completion`` (completed, failed, cancelled, retry_scheduled)."""

    event_id: int
    stream: str
    execution_id: str
    kind: str
    attempt_index: int
    lease_epoch: int
    at_ms: int


@attrs.frozen(kw_only=True)
class ExecutionInfo:
    """What ``describe`` tells about an execution."""

    execution_id: str
    lane: str
    priority: int
    capabilities: tuple[str, ...]
    state: ExecutionState
    attempt_index: int
    lease_epoch: int
    worker_id: str | None
    lease_expires_at_ms: int | None
    payload: JSON
    result: JSON
    failure: str | None
    progress_pct: int | None
    progress_message: str | None
    summary_version: int
    frame_count: int
    cancel_requested: bool


class ExecutionTable(Protocol):
    """Row access inside one transaction. Implementations check no rules."""

    def store_id(self) -> str:
        """A stable identity of this store (the same across reopens of one file)."""
        ...

    def execution(self, execution_id: str) -> ExecutionRow | None: ...
    def insert_execution(self, row: ExecutionRow) -> bool: ...
    def replace_execution(self, row: ExecutionRow, expected_version: int) -> bool: ...
    def runnable(self, lane: str, now_ms: int, limit: int) -> list[ExecutionRow]:
        """Runnable executions of the lane available at ``now_ms``, best first (priority
        descending, then oldest)."""
        ...

    def expired(self, lane: str, now_ms: int, limit: int) -> list[ExecutionRow]:
        """Active executions of the lane whose lease expired at or before ``now_ms``, oldest
        expiry first (their workers died: reclaimable)."""
        ...

    def add_frame(self, frame: Frame, text: str) -> None:
        """Store a frame; ``text`` is its data as canonical JSON."""
        ...

    def frames(self, execution_id: str, after_seq: int, limit: int) -> list[tuple[Frame, str]]:
        """(frame with data None, data JSON text) after ``after_seq``, in order."""
        ...

    def add_event(
        self,
        stream: str,
        execution_id: str,
        kind: str,
        attempt_index: int,
        lease_epoch: int,
        at_ms: int,
    ) -> None: ...
    def events(self, stream: str, after_id: int, limit: int) -> list[ExecutionEvent]: ...
    def cancel_requested(self, execution_id: str) -> bool: ...
    def request_cancel(self, execution_id: str) -> None: ...


class ExecutionRunner(Protocol):
    async def run(self, fn: Callable[[ExecutionTable], T], *, writes: bool) -> T: ...


def _existing(table: ExecutionTable, execution_id: str) -> ExecutionRow:
    row = table.execution(execution_id)
    if row is None:
        raise ExecutionNotFound(execution_id)
    return row


def _info(row: ExecutionRow, cancel: bool, now_ms: int) -> ExecutionInfo:
    try:
        payload = None if row.payload is None else decode_json(row.payload)
        result = None if row.result is None else decode_json(row.result)
    except ValueError as exc:
        raise CorruptRecordError("executions", row.execution_id, repr(exc)) from exc
    return ExecutionInfo(
        execution_id=row.execution_id,
        lane=row.lane,
        priority=row.priority,
        capabilities=row.capabilities,
        state=public_state(row, now_ms),
        attempt_index=row.attempt_index,
        lease_epoch=row.lease_epoch,
        worker_id=row.worker_id,
        lease_expires_at_ms=row.lease_expires_at_ms,
        payload=payload,
        result=result,
        failure=row.failure,
        progress_pct=row.progress_pct,
        progress_message=row.progress_message,
        summary_version=row.summary_version,
        frame_count=row.frame_count,
        cancel_requested=cancel,
    )


class ExecutionFacet:
    """Leased executions on lanes: ``store.executions``."""

    def __init__(
        self,
        runner: ExecutionRunner,
        *,
        backend_name: str,
        clock: Clock,
        ids: IdSource,
        max_payload_bytes: int,
    ) -> None:
        self._run = runner.run
        self._clock = clock
        self._ids = ids
        self._limit = max_payload_bytes
        self.backend_name = backend_name

    # --- producers ---

    async def create(
        self,
        lane: str,
        *,
        capabilities: Iterable[str] = (),
        priority: int = 0,
        payload: JSON = None,
        retry: RetryPolicy | None = None,
        execution_id: str | None = None,
    ) -> ExecutionInfo:
        """Create a runnable execution.

        Raises:
            InvalidArgument, PayloadNotSerializable, PayloadTooLarge: a bad argument.
            ConcurrentModification: ``execution_id`` is taken.
        """
        now = self._clock.now_ms()
        if execution_id is not None:
            check_text("execution_id", execution_id, limit=self._limit)
            if not execution_id:
                raise InvalidArgument("execution_id must not be empty (None makes one)")
        row = new_execution(
            execution_id=execution_id or f"ex:{random_hex(self._ids)}",
            lane=lane,
            capabilities=capabilities,
            priority=priority,
            payload=payload,
            retry=RetryPolicy() if retry is None else retry,
            now_ms=now,
            limit=self._limit,
        )

        def op(table: ExecutionTable) -> ExecutionInfo:
            if not table.insert_execution(row):
                raise ConcurrentModification(row.execution_id)
            return _info(row, False, now)

        return await self._run(op, writes=True)

    async def describe(self, execution_id: str) -> ExecutionInfo:
        """The execution's current state.

        Raises:
            ExecutionNotFound: no such execution.
        """
        check_text("execution_id", execution_id)
        now = self._clock.now_ms()

        def op(table: ExecutionTable) -> ExecutionInfo:
            row = _existing(table, execution_id)
            return _info(row, table.cancel_requested(execution_id), now)

        return await self._run(op, writes=False)

    async def request_cancel(self, execution_id: str) -> ExecutionInfo:
        """Ask the worker running the execution to stop (it sees the request when it next
        renews); a runnable execution is cancelled at once.

        Raises:
            ExecutionNotFound: no such execution.
        """
        check_text("execution_id", execution_id)
        now = self._clock.now_ms()

        def op(table: ExecutionTable) -> ExecutionInfo:
            row = _existing(table, execution_id)
            done = cancel_execution(table, row, "cancelled before it ran", now)
            sync_task(table, row, done, now)
            return _info(done, table.cancel_requested(execution_id), now)

        return await self._run(op, writes=True)

    # --- workers ---

    async def claim(
        self, lane: str, capabilities: Iterable[str], worker_id: str, lease_ttl_ms: int
    ) -> Handle | None:
        """Claim the best execution of ``lane`` this worker can serve; None if there is none.

        Raises:
            InvalidArgument: a bad argument.
        """
        check_text("lane", lane)
        caps = _capabilities(capabilities)
        check_text("worker_id", worker_id, limit=self._limit)
        check_lease_ttl(lease_ttl_ms)
        now, backend = self._clock.now_ms(), self.backend_name

        def op(table: ExecutionTable) -> Handle | None:
            # Best first; a page this worker can serve nothing of grows the look until the lane's
            # runnable work is exhausted, so a servable execution is never missed.
            scan, row = _CLAIM_SCAN, None
            while True:
                rows = table.runnable(lane, now, scan)
                row = select_for_claim(rows, caps, now_ms=now)
                if row is not None or len(rows) < scan:
                    break
                scan *= 4
            if row is None:
                return None
            claimed, handle = claim_execution(
                row, worker_id, lease_ttl_ms, now_ms=now, store_id=table.store_id(), backend=backend
            )
            self._write(table, row, claimed)
            table.add_event(
                "lease",
                row.execution_id,
                "acquired",
                claimed.attempt_index,
                claimed.lease_epoch,
                now,
            )
            return handle

        return await self._run(op, writes=True)

    async def reclaim(self, execution_id: str, worker_id: str, lease_ttl_ms: int) -> Handle | None:
        """Take over an execution whose worker's lease expired (a resume grant); None while its
        lease is live or when it is not running.

        Raises:
            ExecutionNotFound: no such execution.
        """
        check_text("execution_id", execution_id)
        check_text("worker_id", worker_id, limit=self._limit)
        check_lease_ttl(lease_ttl_ms)
        now, backend = self._clock.now_ms(), self.backend_name

        def op(table: ExecutionTable) -> Handle | None:
            row = _existing(table, execution_id)
            got = reclaim_execution(
                row, worker_id, lease_ttl_ms, now_ms=now, store_id=table.store_id(), backend=backend
            )
            if got is None:
                return None
            self._write(table, row, got[0])
            table.add_event(
                "lease", execution_id, "reclaimed", got[0].attempt_index, got[0].lease_epoch, now
            )
            return got[1]

        return await self._run(op, writes=True)

    async def reclaim_expired(
        self, lane: str, capabilities: Iterable[str], worker_id: str, lease_ttl_ms: int
    ) -> Handle | None:
        """Reclaim one execution of ``lane`` (that this worker can serve) whose worker's lease
        expired; None if there is none.

        Raises:
            InvalidArgument: a bad argument.
        """
        check_text("lane", lane)
        caps = set(_capabilities(capabilities))
        check_text("worker_id", worker_id, limit=self._limit)
        check_lease_ttl(lease_ttl_ms)
        now, backend = self._clock.now_ms(), self.backend_name

        def op(table: ExecutionTable) -> Handle | None:
            for row in table.expired(lane, now, _RECLAIM_SCAN):
                if not set(row.capabilities) <= caps:
                    continue
                got = reclaim_execution(
                    row,
                    worker_id,
                    lease_ttl_ms,
                    now_ms=now,
                    store_id=table.store_id(),
                    backend=backend,
                )
                if got is None:
                    continue
                self._write(table, row, got[0])
                table.add_event(
                    "lease",
                    row.execution_id,
                    "reclaimed",
                    got[0].attempt_index,
                    got[0].lease_epoch,
                    now,
                )
                return got[1]
            return None

        return await self._run(op, writes=True)

    async def renew(self, handle: Handle) -> bool:
        """Extend the lease to now + its ttl. Returns True if cancellation was requested.

        Raises:
            LeaseConflict, LeaseExpired, ExecutionTerminal: the handle no longer owns it.
            ForeignHandle: another store issued the handle.
        """
        return await self._fenced(
            handle, "renewed", lambda row, now, _: renew_execution(row, handle, now_ms=now)
        )

    async def complete(self, handle: Handle, result: JSON = None) -> None:
        """End the execution successfully.

        Raises:
            LeaseConflict, LeaseExpired, ExecutionTerminal, ForeignHandle: see :meth:`renew`.
            PayloadNotSerializable, PayloadTooLarge: a bad result.
        """
        encoded = encode_json(result, limit=self._limit)
        await self._fenced(
            handle,
            "revoked",
            lambda row, now, _: complete_execution(row, handle, encoded, now_ms=now),
            completion="completed",
        )

    async def fail(self, handle: Handle, failure: FailureClass, message: str) -> str:
        """Fail the current attempt: ``"retry_scheduled"`` (transient and infra-crash failures,
        while attempts remain, after a backoff), ``"failed"`` or ``"cancelled"``.

        Raises:
            LeaseConflict, LeaseExpired, ExecutionTerminal, ForeignHandle: see :meth:`renew`.
            InvalidArgument: a bad failure class or message.
        """
        if not isinstance(failure, FailureClass):
            raise InvalidArgument(f"failure must be a FailureClass, got {failure!r}")
        check_text("message", message, limit=self._limit)
        outcome: list[str] = []

        def decide(row: ExecutionRow, now: int, table: ExecutionTable) -> ExecutionRow:
            # A run whose cancellation was requested is not retried, whatever it failed with.
            cls = FailureClass.CANCELLED if table.cancel_requested(row.execution_id) else failure
            new, what = fail_execution(row, handle, cls, message, now_ms=now)
            outcome.append(what)
            return new

        await self._fenced(handle, "revoked", decide, completion=lambda: outcome[-1])
        return outcome[-1]

    async def progress(
        self, handle: Handle, pct: int | None = None, message: str | None = None
    ) -> None:
        """Report progress; an absent field keeps its value, neither is a no-op.

        Raises:
            LeaseConflict, LeaseExpired, ExecutionTerminal, ForeignHandle: see :meth:`renew`.
            InvalidArgument: ``pct`` not 0..100, or a bad message.
        """
        check_text("message", message, optional=True, limit=self._limit)
        if pct is not None and (type(pct) is not int or not 0 <= pct <= 100):
            raise InvalidArgument(f"progress percent must be an int from 0 to 100, got {pct!r}")
        await self._fenced(
            handle, None, lambda row, now, _: report_progress(row, handle, pct, message, now_ms=now)
        )

    async def append_frame(
        self, handle: Handle, kind: FrameKind, data: JSON = None, *, summary_patch: JSON = None
    ) -> int:
        """Append a frame to the output stream (and merge ``summary_patch`` into the summary
        document, RFC 7396); returns the frame's sequence number.

        Raises:
            LeaseConflict, LeaseExpired, ExecutionTerminal, ForeignHandle: see :meth:`renew`.
            InvalidArgument, PayloadNotSerializable, PayloadTooLarge: a bad frame or patch.
            CorruptRecordError: the stored summary document is damaged.
        """
        if not isinstance(kind, FrameKind):
            raise InvalidArgument(f"kind must be a FrameKind, got {kind!r}")
        text = encode_json(data, limit=self._limit)
        if summary_patch is not None:
            encode_json(summary_patch, limit=self._limit)
        limit, seq = self._limit, [0]

        def decide(row: ExecutionRow, now: int, _: ExecutionTable) -> ExecutionRow:
            check_handle(row, handle, now_ms=now)
            new = (
                row
                if summary_patch is None
                else apply_summary_patch(row, summary_patch, limit=limit)
            )
            new = attrs.evolve(new, frame_count=row.frame_count + 1, version=row.version + 1)
            seq[0] = new.frame_count
            return new

        def after(table: ExecutionTable, row: ExecutionRow, now: int) -> None:
            table.add_frame(
                Frame(
                    execution_id=row.execution_id,
                    seq=row.frame_count,
                    attempt_index=row.attempt_index,
                    kind=kind,
                    data=None,
                    created_at_ms=now,
                ),
                text,
            )

        await self._fenced(handle, None, decide, after=after)
        return seq[0]

    # --- readers ---

    async def read_stream(self, execution_id: str, after: int = 0, limit: int = 100) -> list[Frame]:
        """Frames after sequence number ``after``, in order (pass the last seq back to page)."""
        check_text("execution_id", execution_id)
        check_int64("after", after)
        check_int64("limit", limit, minimum=1)

        def op(table: ExecutionTable) -> list[Frame]:
            _existing(table, execution_id)
            out = []
            for frame, text in table.frames(execution_id, after, min(limit, 1000)):
                try:
                    out.append(attrs.evolve(frame, data=decode_json(text)))
                except ValueError as exc:
                    raise CorruptRecordError(
                        "execution_frames", f"{execution_id}#{frame.seq}", repr(exc)
                    ) from exc
            return out

        return await self._run(op, writes=False)

    async def read_summary(self, execution_id: str) -> tuple[JSON, int] | None:
        """The summary document and its version, or None before the first patch.

        Raises:
            ExecutionNotFound: no such execution.
            CorruptRecordError: the stored document is damaged.
        """
        check_text("execution_id", execution_id)

        def op(table: ExecutionTable) -> tuple[JSON, int] | None:
            row = _existing(table, execution_id)
            if row.summary is None:
                return None
            try:
                return decode_json(row.summary), row.summary_version
            except ValueError as exc:
                raise CorruptRecordError(
                    "executions", execution_id, f"summary document: {exc!r}"
                ) from exc

        return await self._run(op, writes=False)

    async def lease_events(self, after: int = 0, limit: int = 100) -> list[ExecutionEvent]:
        """The lease outbox (acquired, renewed, revoked, reclaimed) after event id ``after``."""
        return await self._events("lease", after, limit)

    async def completion_events(self, after: int = 0, limit: int = 100) -> list[ExecutionEvent]:
        """The completion outbox after event id ``after``."""
        return await self._events("completion", after, limit)

    async def _events(self, stream: str, after: int, limit: int) -> list[ExecutionEvent]:
        check_int64("after", after)
        check_int64("limit", limit, minimum=1)
        return await self._run(lambda t: t.events(stream, after, min(limit, 1000)), writes=False)

    # --- shared shapes ---

    def _write(self, table: ExecutionTable, old: ExecutionRow, new: ExecutionRow) -> None:
        if not table.replace_execution(new, old.version):
            raise ConcurrentModification(old.execution_id)
        # A task that runs on this execution follows it, in the same transaction.
        sync_task(table, old, new, self._clock.now_ms())

    async def _fenced(
        self,
        handle: Handle,
        lease_event: str | None,
        decide: Callable[[ExecutionRow, int, ExecutionTable], ExecutionRow | None],
        *,
        completion: str | Callable[[], str] | None = None,
        after: Callable[[ExecutionTable, ExecutionRow, int], None] | None = None,
    ) -> bool:
        if not isinstance(handle, Handle):
            raise InvalidArgument(f"expected a Handle, got {handle!r}")
        now, backend = self._clock.now_ms(), self.backend_name

        def op(table: ExecutionTable) -> bool:
            if handle.backend != backend or handle.store_id != table.store_id():
                raise ForeignHandle(handle.backend, handle.store_id)
            row = _existing(table, handle.execution_id)
            new = decide(row, now, table)
            if new is not None:
                self._write(table, row, new)
                if after is not None:
                    after(table, new, now)
            if lease_event is not None:
                table.add_event(
                    "lease",
                    row.execution_id,
                    lease_event,
                    handle.attempt_index,
                    handle.lease_epoch,
                    now,
                )
            if completion is not None:
                kind = completion if isinstance(completion, str) else completion()
                table.add_event(
                    "completion",
                    row.execution_id,
                    kind,
                    handle.attempt_index,
                    handle.lease_epoch,
                    now,
                )
            return table.cancel_requested(row.execution_id)

        return await self._run(op, writes=True)


def _capabilities(capabilities: object) -> tuple[str, ...]:
    """The capabilities as a tuple (a generator is read once), validated before any IO."""
    if isinstance(capabilities, str) or not isinstance(capabilities, Iterable):
        raise InvalidArgument(f"capabilities must be a collection of str, got {capabilities!r}")
    caps = tuple(capabilities)
    select_for_claim([], caps, now_ms=0)
    return caps
