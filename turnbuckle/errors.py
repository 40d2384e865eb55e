"""One exception hierarchy for everything turnbuckle raises.

Every error is rooted at :class:`TurnbuckleError` and carries the fields a caller needs as
attributes (``InvalidTransition.current``, ``UnsupportedSchemaVersion.found``, ...). No exception of
a driver (apsw), the json module or cattrs ever crosses the public API: adapters wrap them in one of
these and keep the original as ``__cause__``.

Errors are plain values: they compare by type and fields in tests, print a sentence that names
the fields, and pickle (so a test can send one from a child process to its parent).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ConcurrentModification",
    "CorruptRecordError",
    "ExecutionError",
    "ExecutionNotFound",
    "ExecutionTerminal",
    "ForeignDatabaseError",
    "ForeignHandle",
    "HeadRevisionConflict",
    "InvalidArgument",
    "InvalidCursor",
    "InvalidTransition",
    "LeaseConflict",
    "LeaseExpired",
    "MaxTasksReached",
    "NotADatabaseError",
    "PayloadNotSerializable",
    "PayloadTooLarge",
    "QueuedWorkClaimExpired",
    "QueuedWorkNotFound",
    "QueuedWorkParked",
    "QueuedWorkSourceKeyConflict",
    "RuntimeTurnCommitConflict",
    "SessionBindingMismatch",
    "SessionError",
    "SessionExecutionLeaseExpired",
    "StorageFullError",
    "StoreBusyError",
    "StoreClosedError",
    "StoreCorruptError",
    "StoreError",
    "StoreFileReplaced",
    "StoreInternalError",
    "StoreOpenError",
    "StoreReadOnlyError",
    "StoreUsedInForkedChild",
    "TaskAlreadyExists",
    "TaskError",
    "TaskNotFound",
    "TerminalState",
    "TurnbuckleError",
    "UnsupportedReadScope",
    "UnsupportedSchemaVersion",
]


class TurnbuckleError(Exception):
    """Root of every error turnbuckle raises on purpose.

    Subclasses list their fields in ``_fields`` and a message template in ``_template``; the
    constructor takes the fields positionally or by keyword and stores them as attributes.
    """

    _fields: ClassVar[tuple[str, ...]] = ()
    _template: ClassVar[str] = ""
    #: True when trying the same call again later may succeed (busy, full disk freed, ...).
    retryable: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = type(self)._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(fields)} arguments")
        values = dict(zip(fields, args, strict=False))
        for name, value in kwargs.items():
            if name not in fields or name in values:
                raise TypeError(f"{type(self).__name__} got an unexpected argument {name!r}")
            values[name] = value
        for name in fields:
            setattr(self, name, values.get(name))
        super().__init__(*(values.get(name) for name in fields))

    def __str__(self) -> str:
        template = type(self)._template
        if not template:
            return super().__str__()
        return template.format(**{name: getattr(self, name) for name in type(self)._fields})

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in type(self)._fields)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in type(self)._fields)

    def __hash__(self) -> int:
        return hash((type(self), *(repr(getattr(self, f)) for f in type(self)._fields)))


# --- bad input -------------------------------------------------------------------------------


class InvalidArgument(TurnbuckleError, ValueError):
    """An argument is malformed or out of range; nothing was read or written."""

    _fields: ClassVar[tuple[str, ...]] = ("message",)
    _template = "{message}"
    message: str


class InvalidCursor(InvalidArgument):
    """A pagination cursor was not made by this listing (MCP answers -32602)."""

    _fields = ("cursor",)
    _template = "invalid cursor {cursor!r}: pass back only the next_cursor of the same listing"
    cursor: str


class PayloadNotSerializable(InvalidArgument):
    """A payload is not plain JSON: ``path`` says where inside it, ``type_name`` what was found."""

    _fields = ("path", "type_name", "reason")
    _template = "payload is not JSON-serializable at {path}: {type_name} ({reason})"
    path: str
    type_name: str
    reason: str


class PayloadTooLarge(InvalidArgument):
    """An encoded payload is larger than the store's ``max_payload_bytes``."""

    _fields = ("size", "limit")
    _template = "payload of {size} bytes exceeds the limit of {limit} bytes"
    size: int
    limit: int


# --- task state ------------------------------------------------------------------------------


class TaskError(TurnbuckleError):
    """Base of the errors about one task's existence or state."""


class TaskNotFound(TaskError, LookupError):
    """No task has this id (it never existed, was deleted, or expired and was swept)."""

    _fields = ("task_id",)
    _template = "task {task_id!r} not found"
    task_id: str


class TaskAlreadyExists(TaskError):
    """``create_task`` was given the id of a task the store already holds."""

    _fields = ("task_id",)
    _template = "task {task_id!r} already exists"
    task_id: str


class InvalidTransition(TaskError):
    """The requested status is not reachable from the current one (e.g. working -> working)."""

    _fields = ("current", "requested")
    _template = "cannot move a task from {current} to {requested}"
    current: Any
    requested: Any


class TerminalState(TaskError):
    """The task is completed, failed or cancelled, and terminal tasks never change again."""

    _fields = ("status",)
    _template = "task is in terminal state {status} and cannot change"
    status: Any


class MaxTasksReached(TaskError):
    """The store already holds ``limit`` tasks (the ``max_tasks`` option)."""

    _fields = ("limit",)
    _template = "the store holds its maximum of {limit} tasks"
    limit: int


class ConcurrentModification(TaskError):
    """A guarded write found the row changed under it; re-read and decide again."""

    _fields = ("key",)
    _template = "{key!r} was modified concurrently"
    key: str
    retryable = True


# --- sessions: leases and queued work -------------------------------------------------------


class SessionError(TurnbuckleError):
    """Base of the errors about a session's execution lease and queued work."""


class SessionExecutionLeaseExpired(SessionError):
    """The lease fence presented is not the session's live lease (expired, released,
    reclaimed by another owner, forged, or from another session). Nothing was written."""

    _fields = ("session_id",)
    _template = "session {session_id!r}: the execution lease presented is not live"
    session_id: str


class QueuedWorkClaimExpired(SessionError):
    """The queued-work claim presented no longer owns every one of its batches."""

    _fields = ("session_id", "claim_id")
    _template = "session {session_id!r}: queued-work claim {claim_id!r} no longer owns its work"
    session_id: str
    claim_id: str


class QueuedWorkSourceKeyConflict(SessionError):
    """A batch with this source key was already enqueued with different content; ``batch_id``
    is the original batch, which is kept as it was."""

    _fields = ("session_id", "source_key", "batch_id")
    _template = (
        "session {session_id!r}: source key {source_key!r} was already used for different work"
        " (batch {batch_id!r})"
    )
    session_id: str
    source_key: str
    batch_id: str


class QueuedWorkNotFound(SessionError):
    """No queued or delivered batch has this id in the session (it was cancelled, or never
    existed)."""

    _fields = ("session_id", "batch_id")
    _template = "session {session_id!r} has no queued or delivered work {batch_id!r}"
    session_id: str
    batch_id: str


class QueuedWorkParked(SessionError):
    """The batch was parked (dead-lettered) after ``failures`` failed turns; ``last_error`` says
    why the last one failed. It stays parked, visible, until it is resubmitted or cancelled."""

    _fields = ("session_id", "batch_id", "failures", "last_error")
    _template = (
        "session {session_id!r}: work {batch_id!r} was parked after {failures} failed turns;"
        " the last failed with: {last_error}"
    )
    session_id: str
    batch_id: str
    failures: int
    last_error: str


class HeadRevisionConflict(SessionError):
    """The session head moved since the revision the commit was computed from: reload and
    decide again. Nothing was written."""

    _fields = ("expected", "actual")
    _template = "expected head revision {expected}, the session is at {actual}"
    expected: int
    actual: int


class RuntimeTurnCommitConflict(SessionError):
    """The turn already committed something else under this turn id."""

    _fields = ("session_id", "turn_id")
    _template = "session {session_id!r}: turn {turn_id!r} already committed different content"
    session_id: str
    turn_id: str


class SessionBindingMismatch(SessionError):
    """A session handle bound to one session was asked to commit another."""

    _fields = ("bound_session_id", "attempted_session_id")
    _template = "this handle is bound to session {bound_session_id!r}, not {attempted_session_id!r}"
    bound_session_id: str
    attempted_session_id: str


class UnsupportedReadScope(SessionError, InvalidArgument):
    """``load_session`` was given something that is not a read scope."""

    _fields = ("scope",)
    _template = "unsupported read scope {scope!r}: use FullGraph() or ActivePath(leaf)"
    scope: object


# --- executions ------------------------------------------------------------------------------


class ExecutionError(TurnbuckleError):
    """Base of the errors about an execution and its lease."""


class ExecutionNotFound(ExecutionError, LookupError):
    _fields = ("execution_id",)
    _template = "execution {execution_id!r} not found"


class LeaseConflict(ExecutionError):
    """The handle's lease epoch is not the execution's current one: another claim or reclaim
    owns the execution now. Nothing was written."""

    _fields = ("execution_id", "presented", "current")
    _template = "execution {execution_id!r}: lease epoch {presented} is stale (now {current})"


class LeaseExpired(ExecutionError):
    """The handle's lease ran out; renew earlier, or expect a reclaim. Nothing was written."""

    _fields = ("execution_id",)
    _template = "execution {execution_id!r}: the lease expired"


class ExecutionTerminal(ExecutionError):
    """The execution already ended (completed, failed or cancelled). Nothing was written."""

    _fields = ("execution_id", "outcome")
    _template = "execution {execution_id!r} already ended: {outcome}"


class ForeignHandle(ExecutionError, InvalidArgument):
    """A handle issued by another store (or another kind of store) was presented."""

    _fields = ("backend", "store_id")
    _template = "this handle was issued by another store ({backend} store {store_id!r})"


# --- the store -------------------------------------------------------------------------------


class StoreError(TurnbuckleError):
    """Base of the errors about the store itself rather than one record in it."""


class StoreOpenError(StoreError):
    """The store cannot be opened at all (missing folder, path is a folder, no permission)."""

    _fields: ClassVar[tuple[str, ...]] = ("path", "reason")
    _template = "cannot open store {path!r}: {reason}"
    path: str
    reason: str


class UnsupportedSchemaVersion(StoreOpenError):
    """The file's schema version is not one this turnbuckle can use."""

    _fields = ("expected", "found", "path")
    _template = (
        "store {path!r} has schema version {found}, this turnbuckle needs {expected}"
        " (a newer turnbuckle made it, or it must be migrated)"
    )
    expected: int
    found: int
    path: str


class ForeignDatabaseError(StoreOpenError):
    """The file is an SQLite database, but not a turnbuckle store.

    A turnbuckle file whose ``-wal`` file was swapped for another database's also lands here.
    """

    _fields = ("path", "application_id", "user_version")
    _template = (
        "{path!r} is an SQLite database that turnbuckle did not make (application_id="
        "{application_id}, user_version={user_version}); if it is a turnbuckle store, check that"
        " its -wal file was not replaced by another database's"
    )
    path: str
    application_id: int
    user_version: int


class NotADatabaseError(StoreOpenError):
    """The file exists but is not an SQLite database at all."""

    _fields = ("path",)
    _template = "{path!r} is not an SQLite database"
    path: str


class StoreCorruptError(StoreError):
    """The database file is damaged (malformed pages, failed integrity check)."""

    _fields = ("path", "detail")
    _template = "store {path!r} is corrupt: {detail}"
    path: str
    detail: str


class StoreReadOnlyError(StoreError):
    """The store cannot be written (read-only file, folder or mount); found at open."""

    _fields = ("path",)
    _template = "store {path!r} is read-only"
    path: str


class StoreBusyError(StoreError):
    """Another connection held the write lock past the busy timeout. Nothing was applied."""

    _fields = ("path", "timeout_s")
    _template = "store {path!r} stayed locked by another connection for {timeout_s} s"
    path: str
    timeout_s: float
    retryable = True


class StorageFullError(StoreError):
    """The disk (or the database's page limit) is full. The write was not applied."""

    _fields = ("path",)
    _template = "store {path!r} is full; the write was not applied"
    path: str
    retryable = True


class CorruptRecordError(StoreError):
    """One stored record cannot be decoded. The rest of the store is usable."""

    _fields = ("table", "key", "reason")
    _template = "corrupt record {key!r} in {table}: {reason}"
    table: str
    key: str
    reason: str


class StoreClosedError(StoreError):
    """The store handle was closed; open a new one."""

    _fields: ClassVar[tuple[str, ...]] = ("backend",)
    _template = "the {backend} store is closed"
    backend: str


class StoreUsedInForkedChild(StoreClosedError):
    """The store was opened in another process, and this process is a child forked from it.

    A handle does not survive ``fork``: the SQLite store's owner thread does not exist in the
    child (and its connection must never be used there), and a memory store's copy would
    silently diverge from the parent's. Every call raises this at once; ``aclose()`` in the
    child returns at once and leaves the parent's store alone. Open the store again in the
    child.
    """

    _fields = ("backend", "opened_pid", "pid")
    _template = (
        "the {backend} store was opened in process {opened_pid} and cannot be used in process"
        " {pid}, a child forked from it: open the store again in the child"
    )
    backend: str
    opened_pid: int
    pid: int


class StoreFileReplaced(StoreClosedError):
    """The SQLite file this handle opened is no longer the one at its path: it was deleted,
    renamed away, or another file (a copy, another database) was put in its place.

    The handle closed itself when it saw it, and refuses every later call with this error; no
    write was ever acknowledged into the file that left the path. A write that failed with it
    was not applied to whatever file is at the path now (it may have reached the file that was
    moved away). Find out which file should be the store, then open it again.
    """

    _fields = ("path", "reason")
    _template = (
        "store {path!r} is no longer the file this handle opened ({reason}); the handle is"
        " closed: check which file should be the store, then open it again"
    )
    backend = "sqlite"
    path: str
    reason: str


class StoreInternalError(StoreError):
    """The database reported an error turnbuckle did not expect: a bug, please report it."""

    _fields = ("path", "detail")
    _template = "unexpected store error on {path!r}: {detail}"
    path: str
    detail: str
