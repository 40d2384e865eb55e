"""The MCP task lifecycle, as pure data and pure decisions.

Theory of operation
-------------------

A task is the durable record of one long-running request (an MCP ``tools/call`` made as a task).
It starts ``working``; the server may ask the client for input (``input_required``) and go back to
``working`` any number of times; it ends ``completed``, ``failed`` or ``cancelled``, and a terminal
task never changes again::

    working <-> input_required
       |              |
       +--> completed | failed | cancelled  (terminal, absorbing)

Every change of a task goes through one of the ``apply_*`` functions here. Each takes the current
record, the request and the time, and returns the next record or raises a typed error leaving
nothing changed. The order of checks is fixed: a terminal task answers :class:`TerminalState` to
everything (checked first, so a late completion after a cancel is told *why* it lost); then an
illegal move answers :class:`InvalidTransition`. Stores never re-implement these rules: they read
the row, call the decision, and write the result guarded by the row's version, so two concurrent
updates can never both win.

Times are milliseconds since the epoch, passed in (``now_ms``). Records also carry ISO-8601 UTC
strings (``created_at``, ``last_updated_at``) because that is what MCP puts on the wire; a store
fills them when they are empty and orders, expires and recovers by their millisecond values, never
by comparing strings (``...00.5Z`` sorts before ``...00Z`` as text).

Listing is keyset pagination by ``(created_at, task_id)``. A cursor encodes the last position and
the listing it belongs to, so it stays valid when tasks are deleted between pages (upstream
restarted from the beginning, repeating tasks), and a cursor from another session's listing is
refused instead of leaking its position.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeAlias

import attrs

from turnbuckle.errors import (
    ConcurrentModification,
    CorruptRecordError,
    InvalidArgument,
    InvalidCursor,
    InvalidTransition,
    TerminalState,
)
from turnbuckle.sansio.codec import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    JSON,
    check_int64,
    check_text,
    decode_json,
    encode_json,
)
from turnbuckle.sansio.ids import IdSource

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "RECOVERED_MESSAGE",
    "TRANSITIONS",
    "IdSource",
    "TaskOutcome",
    "TaskPage",
    "TaskRecord",
    "TaskRow",
    "TaskRpcError",
    "TaskStatus",
    "TaskSuccess",
    "apply_message",
    "apply_outcome",
    "apply_replace",
    "apply_status",
    "check_status_request",
    "encode_outcome",
    "prepare_replace",
    "Replacement",
    "check_transition",
    "decode_cursor",
    "encode_cursor",
    "format_timestamp",
    "is_expired",
    "is_stuck",
    "make_task_id",
    "new_row",
    "parse_timestamp",
    "row_to_record",
]


class TaskStatus(enum.Enum):
    """Where a task is in its lifecycle; the values are the MCP wire strings."""

    WORKING = "working"
    INPUT_REQUIRED = "input_required"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True for completed, failed and cancelled: states that accept nothing."""
        return self in _TERMINAL

    def __str__(self) -> str:
        return self.value


_TERMINAL: Final = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
_ENDINGS: Final = frozenset(_TERMINAL)

#: The legal moves: ``TRANSITIONS[current]`` is the set of statuses ``current`` may move to.
TRANSITIONS: Final[dict[TaskStatus, frozenset[TaskStatus]]] = {
    TaskStatus.WORKING: frozenset({TaskStatus.INPUT_REQUIRED, *_ENDINGS}),
    TaskStatus.INPUT_REQUIRED: frozenset({TaskStatus.WORKING, *_ENDINGS}),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000
#: The status message of a task failed by :func:`is_stuck` recovery (the reference's wording).
RECOVERED_MESSAGE: Final = "Server restarted \u2014 task interrupted"
#: JSON-RPC "internal error": the outcome stored for a recovered task, so ``tasks/result`` of a
#: failed task returns an error as MCP requires, never an empty success.
RECOVERED_ERROR_CODE: Final = -32603


def check_transition(current: TaskStatus, requested: TaskStatus) -> None:
    """Check one move of the lifecycle.

    Raises:
        TerminalState: ``current`` is terminal (checked first).
        InvalidTransition: ``requested`` is not reachable from ``current``.
    """
    if current.is_terminal:
        raise TerminalState(current)
    if requested not in TRANSITIONS[current]:
        raise InvalidTransition(current, requested)


# --- outcomes and records --------------------------------------------------------------------


@attrs.frozen
class TaskSuccess:
    """The underlying request succeeded; ``value`` is its result (e.g. a ``CallToolResult``)."""

    value: JSON


@attrs.frozen
class TaskRpcError:
    """The underlying request failed with this JSON-RPC error."""

    code: int
    message: str
    data: JSON = None


#: What ``tasks/result`` returns, exactly as it was stored.
TaskOutcome: TypeAlias = TaskSuccess | TaskRpcError


@attrs.frozen(kw_only=True)
class TaskRecord:
    """One task as stored. Stores fill ``task_id``, ``created_at`` and ``last_updated_at`` when
    they are empty; everything else is kept exactly as given."""

    #: Time-ordered id (32 hex digits); unique in its store. Empty: the store makes one.
    task_id: str = ""
    #: The session (authorization context) the task belongs to, if any.
    session_id: str | None = None
    status: TaskStatus = TaskStatus.WORKING
    status_message: str | None = None
    #: ISO-8601 UTC (``2025-06-01T00:00:00Z``). Empty: the store stamps the current time.
    created_at: str = ""
    last_updated_at: str = ""
    #: Milliseconds from ``created_at`` after which the task may be swept, or None to keep it.
    ttl: int | None = None
    #: Suggested polling interval in milliseconds.
    poll_interval: int | None = None
    #: The method that made the task, e.g. ``"tools/call"``.
    original_method: str
    original_params: JSON = None
    result: TaskOutcome | None = None
    meta: dict[str, JSON] | None = None

    def to_wire(self) -> dict[str, Any]:
        """The MCP (2025-11-25) ``Task`` object for ``tasks/get`` and ``tasks/list``."""
        wire: dict[str, Any] = {
            "taskId": self.task_id,
            "status": self.status.value,
            "createdAt": self.created_at,
            "lastUpdatedAt": self.last_updated_at,
            "ttl": self.ttl,
        }
        if self.status_message is not None:
            wire["statusMessage"] = self.status_message
        if self.poll_interval is not None:
            wire["pollInterval"] = self.poll_interval
        if self.meta is not None:
            wire["_meta"] = self.meta
        return wire


@attrs.frozen
class TaskPage:
    """One page of a listing. Pass ``next_cursor`` back for the next page; None means done."""

    tasks: tuple[TaskRecord, ...]
    next_cursor: str | None = None
    #: Ids of stored tasks on this page's stretch that could not be decoded and were left out;
    #: ``get_task`` on one raises ``CorruptRecordError`` with the reason.
    corrupt_ids: tuple[str, ...] = ()


# --- time, ids, cursors ----------------------------------------------------------------------


def parse_timestamp(name: str, text: str) -> int:
    """Milliseconds since the epoch of an ISO-8601 time with a zone (``...Z`` or ``+02:00``).

    Raises:
        InvalidArgument: not ISO-8601, or no time zone (a naive time is ambiguous).
    """
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name} must be an ISO-8601 time, got {text!r}") from None
    if moment.tzinfo is None:
        raise InvalidArgument(f"{name} must carry a time zone (e.g. 'Z'), got {text!r}")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def format_timestamp(ms: int) -> str:
    """ISO-8601 UTC with milliseconds: ``2025-06-01T00:00:00.000Z``."""
    t = _EPOCH + timedelta(milliseconds=ms)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f".{t.microsecond // 1000:03d}Z"
    )


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def make_task_id(now_ms: int, ids: IdSource, after: str | None = None) -> str:
    """A UUIDv7-layout id as 32 hex digits: 48 bits of time, then 74 random bits.

    Ids sort by creation time to the millisecond; the random part keeps them unguessable, as
    MCP asks of task ids that may be used without a session binding. ``after`` is the previous
    id the same maker returned: if the new one would not sort after it (same millisecond, or
    the clock stepped back), it becomes ``after`` plus one (RFC 9562's monotonic method), so
    one maker's ids sort in the order it made them.
    """
    rand = ids.random_bits(74)
    value = (now_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76 | (rand >> 62) << 64  # version 7, then 12 random bits
    value |= 0b10 << 62 | (rand & _RAND_B)  # RFC 4122 variant, then 62 random bits
    if after is not None:
        previous = int(after, 16)
        if value <= previous and previous & _RAND_B != _RAND_B:
            value = previous + 1  # stays inside the 62 random bits: the layout holds
    return f"{value:032x}"


_RAND_B: Final = (1 << 62) - 1


def encode_cursor(session_id: str | None, created_ms: int, task_id: str) -> str:
    """An opaque cursor for the position after ``(created_ms, task_id)`` in one listing."""
    raw = json.dumps([1, session_id, created_ms, task_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, session_id: str | None) -> tuple[int, str]:
    """The position a cursor of this listing (``session_id`` None: all tasks) points after.

    Raises:
        InvalidCursor: malformed, or made by another listing.
    """
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        version, scope, created_ms, task_id = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, TypeError, binascii.Error):
        raise InvalidCursor(cursor) from None
    if version != 1 or scope != session_id or type(created_ms) is not int:
        raise InvalidCursor(cursor)
    if not -(1 << 63) <= created_ms < 1 << 63:  # forged: no stored time is out of this range
        raise InvalidCursor(cursor)
    if type(task_id) is not str:
        raise InvalidCursor(cursor)
    return created_ms, task_id


def check_page_size(limit: int | None) -> int:
    """The page size to use for ``limit``.

    Raises:
        InvalidArgument: ``limit`` is not an int from 1 to :data:`MAX_PAGE_SIZE`.
    """
    if limit is None:
        return DEFAULT_PAGE_SIZE
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"limit must be an int from 1 to {MAX_PAGE_SIZE}, got {limit!r}")
    return limit


def is_expired(created_ms: int, ttl: int | None, now_ms: int) -> bool:
    """True once ``ttl`` ms have passed since creation (MCP counts TTL from ``createdAt``)."""
    return ttl is not None and now_ms > created_ms + ttl


def is_stuck(status: TaskStatus, updated_ms: int, max_age_ms: int, now_ms: int) -> bool:
    """True for a live task untouched for longer than ``max_age_ms`` (its worker is gone)."""
    return not status.is_terminal and now_ms - updated_ms > max_age_ms


# --- stored rows -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TaskRow:
    """A task as a store keeps it: payloads as canonical JSON text, times also as integers.

    ``version`` grows by one on every write; guarded writes name the version they read.
    """

    task_id: str
    session_id: str | None
    status: str
    status_message: str | None
    created_at: str
    created_ms: int
    last_updated_at: str
    updated_ms: int
    ttl: int | None
    poll_interval: int | None
    original_method: str
    original_params: str | None
    result: str | None
    meta: str | None
    version: int

    @property
    def expires_ms(self) -> int | None:
        """When the task may be swept, or None."""
        return None if self.ttl is None else self.created_ms + self.ttl


def encode_outcome(outcome: TaskOutcome, limit: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """The stored form of an outcome.

    Raises:
        InvalidArgument: not a TaskSuccess or TaskRpcError, or a bad code or message.
        PayloadNotSerializable, PayloadTooLarge: its JSON is not plain or too large.
    """
    if isinstance(outcome, TaskSuccess):
        return encode_json({"type": "success", "value": outcome.value}, limit=limit)
    if isinstance(outcome, TaskRpcError):
        check_int64("TaskRpcError.code", outcome.code, minimum=-(1 << 63))
        check_text("TaskRpcError.message", outcome.message, limit=limit)
        body = {
            "type": "error",
            "code": outcome.code,
            "message": outcome.message,
            "data": outcome.data,
        }
        return encode_json(body, limit=limit)
    raise InvalidArgument(f"result must be TaskSuccess or TaskRpcError, got {outcome!r}")


def _decode_outcome(text: str) -> TaskOutcome:
    body = decode_json(text)
    if not isinstance(body, dict):
        raise ValueError("outcome is not an object")
    kind = body.get("type")
    if kind == "success" and set(body) == {"type", "value"}:
        return TaskSuccess(body["value"])
    if kind == "error" and set(body) == {"type", "code", "message", "data"}:
        code, message = body["code"], body["message"]
        if type(code) is not int or type(message) is not str:
            raise ValueError("error outcome has a bad code or message")
        return TaskRpcError(code=code, message=message, data=body["data"])
    raise ValueError(f"unknown outcome shape {sorted(body)!r}")


def _check_status(value: object) -> TaskStatus:
    if not isinstance(value, TaskStatus):
        raise InvalidArgument(f"status must be a TaskStatus, got {value!r}")
    return value


def _payloads(record: TaskRecord, limit: int) -> tuple[str | None, str | None, str | None]:
    meta = record.meta
    if meta is not None and type(meta) is not dict:
        raise InvalidArgument(f"meta must be a dict of JSON values or None, got {meta!r}")
    params = (
        None if record.original_params is None else encode_json(record.original_params, limit=limit)
    )
    return (
        params,
        None if record.result is None else encode_outcome(record.result, limit),
        None if meta is None else encode_json(meta, limit=limit),
    )


def new_row(
    record: TaskRecord,
    *,
    now_ms: int,
    ids: IdSource,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    previous_id: str | None = None,
) -> TaskRow:
    """Validate a record for ``create_task`` and make its first row. An empty ``task_id`` is
    made with :func:`make_task_id` (``previous_id``: the last id made the same way).

    Raises:
        InvalidArgument: a field has the wrong type or range, or a time is not ISO-8601.
        PayloadNotSerializable, PayloadTooLarge: a payload is not plain JSON or too large.
    """
    if not isinstance(record, TaskRecord):
        raise InvalidArgument(f"create_task takes a TaskRecord, got {record!r}")
    limit = max_payload_bytes
    check_text("task_id", record.task_id, limit=limit)
    check_text("session_id", record.session_id, optional=True, limit=limit)
    status = _check_status(record.status)
    check_text("status_message", record.status_message, optional=True, limit=limit)
    check_text("original_method", record.original_method, limit=limit)
    for name in ("ttl", "poll_interval"):
        if getattr(record, name) is not None:
            check_int64(name, getattr(record, name))
    task_id = record.task_id or make_task_id(now_ms, ids, previous_id)
    created_at = record.created_at or format_timestamp(now_ms)
    created_ms = parse_timestamp("created_at", created_at)
    if record.ttl is not None:  # the expiry instant must fit the stores' 64-bit integers
        check_int64("created_at + ttl in ms", created_ms + record.ttl, minimum=-(1 << 63))
    last_updated_at = record.last_updated_at or created_at
    params, result, meta = _payloads(record, max_payload_bytes)
    return TaskRow(
        task_id=task_id,
        session_id=record.session_id,
        status=status.value,
        status_message=record.status_message,
        created_at=created_at,
        created_ms=created_ms,
        last_updated_at=last_updated_at,
        updated_ms=parse_timestamp("last_updated_at", last_updated_at),
        ttl=record.ttl,
        poll_interval=record.poll_interval,
        original_method=record.original_method,
        original_params=params,
        result=result,
        meta=meta,
        version=1,
    )


def row_to_record(row: TaskRow) -> TaskRecord:
    """Decode a stored row.

    Raises:
        CorruptRecordError: a column holds something no turnbuckle wrote (bad JSON, unknown
            status, wrong shape); the message says which column.
    """
    column = "status"
    try:
        status = TaskStatus(row.status)
        column = "original_params"
        params = None if row.original_params is None else decode_json(row.original_params)
        column = "result"
        result = None if row.result is None else _decode_outcome(row.result)
        column = "meta"
        meta = None if row.meta is None else decode_json(row.meta)
        if meta is not None and not isinstance(meta, dict):
            raise ValueError("meta is not an object")
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise CorruptRecordError("tasks", row.task_id, f"column {column}: {exc!r}") from exc
    return TaskRecord(
        task_id=row.task_id,
        session_id=row.session_id,
        status=status,
        status_message=row.status_message,
        created_at=row.created_at,
        last_updated_at=row.last_updated_at,
        ttl=row.ttl,
        poll_interval=row.poll_interval,
        original_method=row.original_method,
        original_params=params,
        result=result,
        meta=meta,
    )


def _touch(row: TaskRow, now_ms: int, **changes: Any) -> TaskRow:
    # last_updated_at strictly grows per task, even when two writes land in one millisecond or
    # the wall clock steps back, so it doubles as the version update_task compares against.
    stamp = max(now_ms, row.updated_ms + 1)
    return attrs.evolve(
        row,
        last_updated_at=format_timestamp(stamp),
        updated_ms=stamp,
        version=row.version + 1,
        **changes,
    )


def _current_status(row: TaskRow) -> TaskStatus:
    try:
        return TaskStatus(row.status)
    except ValueError as exc:
        raise CorruptRecordError("tasks", row.task_id, f"column status: {exc}") from exc


def check_status_request(
    requested: object, message: object, limit: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> TaskStatus:
    """Validate the arguments of a status change (done before any store is touched).

    Raises:
        InvalidArgument: ``requested`` is not a TaskStatus or ``message`` not a str or None.
        PayloadTooLarge: ``message`` is longer than ``limit`` bytes.
    """
    check_text("status_message", message, optional=True, limit=limit)
    return _check_status(requested)


def apply_status(
    row: TaskRow, requested: TaskStatus, message: str | None, *, now_ms: int
) -> TaskRow:
    """``update_task_status``: move to ``requested`` and set the status message (arguments
    already checked by :func:`check_status_request`).

    Raises:
        TerminalState, InvalidTransition: see :func:`check_transition`.
    """
    check_transition(_current_status(row), requested)
    return _touch(row, now_ms, status=requested.value, status_message=message)


def apply_outcome(
    row: TaskRow,
    encoded: str,
    *,
    status: TaskStatus | None,
    message: str | None = None,
    now_ms: int,
) -> TaskRow:
    """Store an outcome (made by :func:`encode_outcome`); with ``status``, also end the task
    there, in the same write.

    ``status`` None is ``store_task_result``: the outcome is stored and the status kept, which a
    terminal task refuses (its outcome is final).

    Raises:
        TerminalState: the task already ended.
        InvalidTransition: ``status`` is not reachable.
    """
    current = _current_status(row)
    if status is None:
        if current.is_terminal:
            raise TerminalState(current)
        return _touch(row, now_ms, result=encoded)
    check_transition(current, status)
    return _touch(row, now_ms, result=encoded, status=status.value, status_message=message)


def apply_message(row: TaskRow, message: str | None, *, now_ms: int) -> TaskRow:
    """Set the status message of a live task without moving it (progress reports: MCP shows
    ``statusMessage`` on ``tasks/get``).

    Raises:
        TerminalState: the task already ended.
    """
    current = _current_status(row)
    if current.is_terminal:
        raise TerminalState(current)
    return _touch(row, now_ms, status_message=message)


@attrs.frozen
class Replacement:
    """A checked ``update_task`` request, made by :func:`prepare_replace` before any IO."""

    #: The record's fields as a row (id made up from nothing: it is never inserted).
    fresh: TaskRow
    #: Compare creation times (the record gave one) and versions (it gave last_updated_at).
    check_created: bool
    check_version: bool


def prepare_replace(
    record: TaskRecord, *, now_ms: int, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> Replacement:
    """Validate and encode an ``update_task`` record.

    Raises:
        InvalidArgument, PayloadNotSerializable, PayloadTooLarge: as :func:`new_row`.
    """
    fresh = new_row(record, now_ms=now_ms, ids=_NoIds(), max_payload_bytes=max_payload_bytes)
    return Replacement(fresh, bool(record.created_at), bool(record.last_updated_at))


def apply_replace(row: TaskRow, replacement: Replacement, *, now_ms: int) -> TaskRow:
    """``update_task``: replace the stored task's fields, keeping the lifecycle rules.

    The id, session and creation time are the task's identity and cannot change (empty
    ``created_at`` means "keep"); a status change must be a legal move; a terminal task refuses
    every change. ``last_updated_at`` is the version the caller read: if it is set and the
    stored task has changed since, nothing is written (empty means "overwrite regardless").
    The new ``last_updated_at`` is stamped by the store.

    Raises:
        TerminalState: the task already ended (checked first).
        ConcurrentModification: the task changed since the record's ``last_updated_at``.
        InvalidArgument: the session or the creation time differs.
        InvalidTransition: the new status is not reachable.
    """
    current = _current_status(row)
    if current.is_terminal:
        raise TerminalState(current)
    fresh = replacement.fresh
    if replacement.check_version and fresh.updated_ms != row.updated_ms:
        raise ConcurrentModification(row.task_id)
    if replacement.check_created and fresh.created_ms != row.created_ms:
        raise InvalidArgument("update_task cannot change created_at")
    if fresh.session_id != row.session_id:
        raise InvalidArgument("update_task cannot move a task to another session")
    requested = TaskStatus(fresh.status)
    if requested is not current:
        check_transition(current, requested)
    return _touch(
        row,
        now_ms,
        status=fresh.status,
        status_message=fresh.status_message,
        ttl=fresh.ttl,
        poll_interval=fresh.poll_interval,
        original_method=fresh.original_method,
        original_params=fresh.original_params,
        result=fresh.result,
        meta=fresh.meta,
    )


def apply_recovery(row: TaskRow, *, now_ms: int) -> TaskRow:
    """Fail a stuck task with :data:`RECOVERED_MESSAGE`, storing a JSON-RPC internal error as
    its outcome unless it already has one."""
    result = row.result
    if result is None:
        result = _RECOVERED_OUTCOME
    return _touch(
        row, now_ms, status=TaskStatus.FAILED.value, status_message=RECOVERED_MESSAGE, result=result
    )


_RECOVERED_OUTCOME: Final = encode_outcome(
    TaskRpcError(code=RECOVERED_ERROR_CODE, message=RECOVERED_MESSAGE)
)


class _NoIds:
    """update_task never makes an id: the record's must match the stored row's."""

    def random_bits(self, k: int) -> int:
        raise InvalidArgument("update_task needs the record's task_id")
