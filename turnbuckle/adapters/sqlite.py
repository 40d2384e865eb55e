"""The SQLite store: one file, many processes, nothing acknowledged ever lost.

Theory of operation
-------------------

Each store handle owns one apsw connection, and one dedicated thread owns that connection (the
adapter actor). Callers on the event loop put requests (a function of a table, and whether it
writes) on the thread's queue and wait for a one-shot reply; the thread never touches the event
loop except to schedule "your reply is ready" on it. That gives:

- **One hop per operation.** A request is one whole operation (read, decide, write), run as one
  call on the owner thread; no transaction is ever held open across an ``await``.
- **Group commit.** On each wake-up the thread takes every request already queued and runs the
  writes in one ``BEGIN IMMEDIATE`` transaction, each in its own savepoint, and replies only after
  COMMIT (the reads among them first, in a read transaction, so another process's write lock
  never holds them up). Many concurrent callers share one fsync. A request whose operation
  raises a typed error is rolled back to its savepoint alone; if the database itself fails
  (disk full, I/O) part-way, the batch is rolled back and each request retried alone, so every
  caller gets its own truthful answer.
- **Serialized writers across processes.** Every transaction that may write starts with
  ``BEGIN IMMEDIATE``, so a read-then-write never races another connection, and every write is
  also guarded by the row version it read (checked by the changed-row count).
- **Writes are never abandoned.** A caller cancelled while its write is queued or running keeps
  waiting (shielded) until the outcome is known: a cancelled caller is never told "not applied"
  about a write that then commits. Reads may be abandoned. A caller already cancelled when it
  calls starts nothing.
- **A race-free open.** The schema is checked and created inside ``BEGIN IMMEDIATE``, with an
  ``application_id`` stamp (so a foreign file, or our file with another database's ``-wal``, is
  refused rather than written over), a ``user_version`` check (an older version is migrated in
  place, in the same transaction, one DDL statement at a time; a newer one is refused), a write
  probe (so a read-only file fails at open, not at the first write), WAL switched on after the
  schema commit with a bounded retry, and ``PRAGMA quick_check`` (on by default).

Process and file safety:

- **A handle belongs to the process that opened it.** In a child made by ``fork`` the owner
  thread does not exist, and the inherited connection must never be used or closed there (its
  locks belong to the parent). The runner records its pid when it starts; in any other process
  every call raises ``StoreUsedInForkedChild`` at once and ``aclose()`` returns at once, touching
  nothing. The child opens the store again.
- **A write is acknowledged only if it landed in the file at the path.** A file deleted or
  replaced while open (unlinked, renamed away, another file renamed or copied over it) would
  go on taking this connection's commits, which nobody opening the path would ever see. The
  open records the file's (st_dev, st_ino) and has SQLite confirm it is the file it opened; the
  owner thread stats the path before each BEGIN and again after each COMMIT, before replying.
  Once they differ, that batch and every later call raise ``StoreFileReplaced``, and the
  connection is retired writing nothing at the path: its WAL is checkpointed through its own
  descriptor into the file that left (which then holds every write acknowledged before) and
  emptied, and it closes without the checkpoint-on-close that would delete the -wal and -shm by
  name.
- **A full disk can be recovered through the API.** In WAL mode a commit only appends to the
  -wal, and a checkpoint must grow the main file to copy new pages in; on a full disk it could
  not, the WAL could never be emptied, and every later write (a delete too) failed. So before
  each COMMIT the main file is grown (in 64 KiB steps) to hold the whole database the commit
  leaves, and that growth is refused (``StorageFullError``) when it would leave less than 1 MiB
  free: a checkpoint then never needs new space, and the reserve is there for the WAL of writes
  that do not grow the database. A request that hits FULL empties the WAL
  (``wal_checkpoint(TRUNCATE)``) and is tried once more, alone; so is the open's write probe.
  ``journal_size_limit`` hands back the space of a WAL that once grew large. Deletes free pages
  that new writes reuse; the file never shrinks.

Durability: ``"full"`` (default) is ``synchronous=FULL``: an acknowledged write survives a
process crash and an OS crash or power loss on storage that honours fsync. ``"process"`` is
``synchronous=NORMAL``: it survives a process crash; the last writes may roll back on power
loss, but the file is never corrupted. SQLite needs a local filesystem: WAL does not work over a
network filesystem, and all processes using a file must be on one host.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import anyio.lowlevel
import apsw
import attrs

from turnbuckle.actors.oneshot import ThreadReply
from turnbuckle.adapters.executions import ExecutionEvent, ExecutionTable, Frame
from turnbuckle.errors import (
    CorruptRecordError,
    ForeignDatabaseError,
    InvalidArgument,
    NotADatabaseError,
    StorageFullError,
    StoreBusyError,
    StoreClosedError,
    StoreCorruptError,
    StoreFileReplaced,
    StoreInternalError,
    StoreOpenError,
    StoreReadOnlyError,
    StoreUsedInForkedChild,
    TurnbuckleError,
    UnsupportedSchemaVersion,
)
from turnbuckle.sansio.execution import ExecutionRow, FrameKind
from turnbuckle.sansio.lease import LeaseRow
from turnbuckle.sansio.queue import DeliveryRow, QueuedBatchRow
from turnbuckle.sansio.session import AttachmentEntry, HeadRow, TurnStampRow
from turnbuckle.sansio.task import TaskRow

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "Durability",
    "SqliteExecutionTable",
    "SqliteRunner",
    "SqliteSessionTable",
    "SqliteTables",
    "SqliteTaskTable",
    "sqlite_version",
    "wal_reset_bug_fixed",
]

T = TypeVar("T")
Durability = Literal["full", "process"]

#: Stamped in the file header: "TRNB". A file without it is not ours.
APPLICATION_ID: Final = 0x54524E42
#: The schema this code reads and writes. An older file is migrated at open (see
#: ``_MIGRATIONS``); a newer one is refused.
SCHEMA_VERSION: Final = 4
#: Most requests one transaction takes; bounds the latency a big burst adds to its first caller.
MAX_BATCH: Final = 256
_WAL_RETRIES: Final = 20
#: About the size the WAL reaches between automatic checkpoints (1000 pages of 4 KiB), so
#: steady use keeps it; a WAL that grew past it (a burst, a reader holding checkpoints off, a
#: disk that filled) gives the space back at its next restart instead of keeping its peak.
_WAL_SIZE_LIMIT: Final = 4 * 1024 * 1024
#: The step in which the main file is grown ahead of the WAL (see ``SqliteRunner._make_room``).
_GROWTH_CHUNK: Final = 64 * 1024
#: Free space the database may not grow into: after a StorageFullError it is what the WAL of
#: writes that do not grow the database (deletes, status changes) still has (a few hundred
#: pages; an operation's transaction needs a handful).
_FREE_RESERVE: Final = 1024 * 1024

# Version 1: the task table.
_DDL_V1: Final = (
    "CREATE TABLE tb_meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL) STRICT",
    "INSERT INTO tb_meta (key, value) VALUES ('open_count', 0)",
    """CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY NOT NULL,
        session_id TEXT,
        status TEXT NOT NULL,
        status_message TEXT,
        created_at TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        last_updated_at TEXT NOT NULL,
        updated_ms INTEGER NOT NULL,
        ttl INTEGER,
        expires_ms INTEGER,
        poll_interval INTEGER,
        original_method TEXT NOT NULL,
        original_params TEXT,
        result TEXT,
        meta TEXT,
        version INTEGER NOT NULL
    ) STRICT""",
    "CREATE INDEX tasks_by_created ON tasks (created_ms, task_id)",
    "CREATE INDEX tasks_by_session ON tasks (session_id, created_ms, task_id)"
    " WHERE session_id IS NOT NULL",
    "CREATE INDEX tasks_by_expiry ON tasks (expires_ms) WHERE expires_ms IS NOT NULL",
    "CREATE INDEX tasks_live ON tasks (updated_ms) WHERE status IN ('working', 'input_required')",
)

# Version 2 adds the session tables (the rows of :mod:`turnbuckle.sansio.lease`, ``.queue`` and
# ``.session``). ``seq`` columns are rowid aliases: insertion order within a session.
_DDL_V2: Final = (
    """CREATE TABLE session_heads (
        session_id TEXT PRIMARY KEY NOT NULL,
        head_revision INTEGER NOT NULL,
        state TEXT NOT NULL
    ) STRICT""",
    """CREATE TABLE graph_nodes (
        seq INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        node_json TEXT NOT NULL,
        tombstoned INTEGER NOT NULL DEFAULT 0,
        UNIQUE (session_id, node_id)
    ) STRICT""",
    "CREATE INDEX graph_nodes_in_order ON graph_nodes (session_id, seq)",
    "CREATE INDEX graph_nodes_tombstoned ON graph_nodes (seq) WHERE tombstoned = 1",
    """CREATE TABLE usage_entries (
        seq INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        entry TEXT NOT NULL
    ) STRICT""",
    "CREATE INDEX usage_in_order ON usage_entries (session_id, seq)",
    """CREATE TABLE turn_stamps (
        session_id TEXT NOT NULL,
        turn_id TEXT NOT NULL,
        turn_commit_hash TEXT NOT NULL,
        head_revision INTEGER NOT NULL,
        checkpoint_ref TEXT NOT NULL,
        PRIMARY KEY (session_id, turn_id)
    ) STRICT""",
    """CREATE TABLE session_leases (
        session_id TEXT PRIMARY KEY NOT NULL,
        owner_id TEXT,
        lease_token TEXT,
        fencing_token INTEGER NOT NULL,
        claimed_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL
    ) STRICT""",
    """CREATE TABLE queued_work (
        enqueue_seq INTEGER PRIMARY KEY,
        batch_id TEXT NOT NULL UNIQUE,
        session_id TEXT NOT NULL,
        source_key TEXT,
        delivery TEXT NOT NULL,
        slot TEXT NOT NULL,
        merge_key TEXT NOT NULL,
        available_at_ms INTEGER NOT NULL,
        enqueued_at_ms INTEGER NOT NULL,
        items TEXT NOT NULL,
        claim_id TEXT,
        claim_owner_id TEXT,
        claim_token TEXT,
        claim_fencing_token INTEGER NOT NULL,
        claimed_at_ms INTEGER NOT NULL,
        claim_expires_at_ms INTEGER NOT NULL
    ) STRICT""",
    "CREATE INDEX queued_work_in_order ON queued_work (session_id, enqueue_seq)",
    "CREATE UNIQUE INDEX queued_work_by_source ON queued_work (session_id, source_key)"
    " WHERE source_key IS NOT NULL",
    """CREATE TABLE session_meta (
        session_id TEXT PRIMARY KEY NOT NULL,
        meta TEXT NOT NULL
    ) STRICT""",
    """CREATE TABLE attachments (
        attachment_id TEXT PRIMARY KEY NOT NULL,
        session_id TEXT NOT NULL,
        canonical_uri TEXT NOT NULL,
        intent_at_ms INTEGER NOT NULL,
        committed_at_ms INTEGER
    ) STRICT""",
    "CREATE INDEX attachments_uncommitted ON attachments (intent_at_ms, attachment_id)"
    " WHERE committed_at_ms IS NULL",
    """CREATE TABLE blobs (
        ref TEXT PRIMARY KEY NOT NULL,
        content BLOB NOT NULL
    ) STRICT""",
    # The store-wide enqueue counter: never reused, even after the last batches are deleted.
    "INSERT INTO tb_meta (key, value) VALUES ('enqueue_seq', 0)",
)

# Version 3 adds the execution tables (the rows of :mod:`turnbuckle.sansio.execution`) and the
# store's identity, a random id made once with the schema (SQLite's randomblob draws from the
# OS's randomness) that every handle a claim issues names.
_DDL_V3: Final = (
    """CREATE TABLE tb_identity (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    ) STRICT""",
    "INSERT INTO tb_identity (key, value) VALUES ('store_id', lower(hex(randomblob(8))))",
    # One row per execution: ExecutionRow's fields, capabilities as a JSON array of str.
    """CREATE TABLE executions (
        execution_id TEXT PRIMARY KEY NOT NULL,
        lane TEXT NOT NULL,
        priority INTEGER NOT NULL,
        capabilities TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        payload TEXT,
        phase TEXT NOT NULL,
        attempt_index INTEGER NOT NULL,
        lease_epoch INTEGER NOT NULL,
        worker_id TEXT,
        lease_expires_at_ms INTEGER,
        lease_ttl_ms INTEGER NOT NULL,
        not_before_ms INTEGER NOT NULL,
        outcome TEXT,
        result TEXT,
        failure TEXT,
        progress_pct INTEGER,
        progress_message TEXT,
        max_attempts INTEGER NOT NULL,
        base_backoff_ms INTEGER NOT NULL,
        max_backoff_ms INTEGER NOT NULL,
        summary TEXT,
        summary_version INTEGER NOT NULL,
        frame_count INTEGER NOT NULL,
        version INTEGER NOT NULL
    ) STRICT""",
    # A claim's candidates, best first: only runnable rows, so finished ones cost it nothing.
    "CREATE INDEX executions_runnable ON executions"
    " (lane, priority DESC, created_at_ms, execution_id) WHERE phase = 'runnable'",
    # Running ones by lease expiry, oldest first (what a reclaim sweep looks at).
    "CREATE INDEX executions_expiring ON executions"
    " (lane, ifnull(lease_expires_at_ms, 0), execution_id) WHERE phase = 'active'",
    """CREATE TABLE execution_frames (
        execution_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        attempt_index INTEGER NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (execution_id, seq)
    ) STRICT""",
    # The outbox: AUTOINCREMENT, so an event id is never given out twice.
    """CREATE TABLE execution_events (
        event_id INTEGER PRIMARY KEY AUTOINCREMENT,
        stream TEXT NOT NULL,
        execution_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        attempt_index INTEGER NOT NULL,
        lease_epoch INTEGER NOT NULL,
        at_ms INTEGER NOT NULL
    ) STRICT""",
    "CREATE INDEX execution_events_by_stream ON execution_events (stream, event_id)",
    """CREATE TABLE execution_cancels (
        execution_id TEXT PRIMARY KEY NOT NULL
    ) STRICT""",
)

# Version 4: claims name the lease grant they were taken under, batches count failed turns and
# can be parked, and delivered batches are kept (with the turn that delivered them and its
# outcome) instead of deleted, so a source key stays idempotent after delivery and a client can
# read its answer. A v3 claim carries grant 0: void under any lease, so its work is claimed
# again from the head of the queue.
_DDL_V4: Final = (
    "ALTER TABLE queued_work ADD COLUMN claim_lease_fencing INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE queued_work ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE queued_work ADD COLUMN last_error TEXT",
    "ALTER TABLE queued_work ADD COLUMN parked INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX queued_work_parked ON queued_work (session_id, enqueue_seq) WHERE parked = 1",
    # queued_work's columns as they were at delivery, then the delivery's own.
    """CREATE TABLE queued_work_deliveries (
        batch_id TEXT PRIMARY KEY NOT NULL,
        session_id TEXT NOT NULL,
        enqueue_seq INTEGER NOT NULL,
        source_key TEXT,
        delivery TEXT NOT NULL,
        slot TEXT NOT NULL,
        merge_key TEXT NOT NULL,
        available_at_ms INTEGER NOT NULL,
        enqueued_at_ms INTEGER NOT NULL,
        items TEXT NOT NULL,
        claim_id TEXT,
        claim_owner_id TEXT,
        claim_token TEXT,
        claim_fencing_token INTEGER NOT NULL,
        claimed_at_ms INTEGER NOT NULL,
        claim_expires_at_ms INTEGER NOT NULL,
        claim_lease_fencing INTEGER NOT NULL,
        failures INTEGER NOT NULL,
        last_error TEXT,
        parked INTEGER NOT NULL,
        turn_id TEXT,
        head_revision INTEGER NOT NULL,
        outcome TEXT,
        delivered_at_ms INTEGER NOT NULL
    ) STRICT""",
    "CREATE UNIQUE INDEX queued_work_deliveries_by_source ON queued_work_deliveries"
    " (session_id, source_key) WHERE source_key IS NOT NULL",
)

#: A brand-new file gets every table at once.
_DDL: Final = (*_DDL_V1, *_DDL_V2, *_DDL_V3, *_DDL_V4)
#: The statements that take a file from version ``v`` to ``v + 1`` (an older file takes each
#: step in turn, in one transaction).
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {1: _DDL_V2, 2: _DDL_V3, 3: _DDL_V4}


def sqlite_version() -> str:
    """The version of the SQLite library apsw bundles, e.g. ``"3.54.1"``."""
    return str(apsw.sqlite_lib_version())


def wal_reset_bug_fixed(version: str) -> bool:
    """True if ``version`` is outside the WAL-reset corruption range (3.7.0 to 3.51.2, with the
    fix backported to 3.44.6 and 3.50.7)."""
    parts = tuple(int(p) for p in version.split(".")[:3])
    if parts < (3, 7, 0) or parts >= (3, 51, 3):
        return True
    return (3, 44, 6) <= parts < (3, 45, 0) or (3, 50, 7) <= parts < (3, 51, 0)


# --- rows ------------------------------------------------------------------------------------

# The columns are TaskRow's fields, in its order; expires_ms is derived, stored for its index.
_FIELDS: Final = tuple(field.name for field in attrs.fields(TaskRow))
_SET: Final = (*_FIELDS[1:], "expires_ms")  # what a write sets: all but the key
_SELECT: Final = f"SELECT {', '.join(_FIELDS)} FROM tasks"
_INSERT: Final = (
    f"INSERT INTO tasks (task_id, {', '.join(_SET)}) VALUES (?{', ?' * len(_SET)})"
    " ON CONFLICT (task_id) DO NOTHING"
)
_UPDATE: Final = (
    f"UPDATE tasks SET {', '.join(f'{name} = ?' for name in _SET)}"
    " WHERE task_id = ? AND version = ?"
)


def _row(values: tuple[Any, ...]) -> TaskRow:
    return TaskRow(**dict(zip(_FIELDS, values, strict=True)))


def _set_values(row: TaskRow) -> tuple[Any, ...]:
    return tuple(getattr(row, name) for name in _SET)


class SqliteTaskTable:
    """The task table of one connection; every call runs inside the caller's transaction."""

    def __init__(self, conn: apsw.Connection) -> None:
        self._conn = conn

    def get(self, task_id: str) -> TaskRow | None:
        found = self._conn.execute(f"{_SELECT} WHERE task_id = ?", (task_id,)).fetchone()
        return None if found is None else _row(found)

    def insert(self, row: TaskRow) -> bool:
        self._conn.execute(_INSERT, (row.task_id, *_set_values(row)))
        return bool(self._conn.changes() == 1)

    def replace(self, row: TaskRow, expected_version: int) -> bool:
        self._conn.execute(_UPDATE, (*_set_values(row), row.task_id, expected_version))
        return bool(self._conn.changes() == 1)

    def delete(self, task_id: str) -> bool:
        self._conn.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
        return bool(self._conn.changes() == 1)

    def count(self) -> int:
        return int(_scalar(self._conn, "SELECT count(*) FROM tasks"))

    def page(
        self, session_id: str | None, after: tuple[int, str] | None, limit: int
    ) -> list[TaskRow]:
        where: list[str] = []
        args: list[object] = []
        if session_id is not None:
            where.append("session_id = ?")
            args.append(session_id)
        if after is not None:
            where.append("(created_ms, task_id) > (?, ?)")
            args.extend(after)
        sql = _SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_ms, task_id LIMIT ?"
        return [_row(r) for r in self._conn.execute(sql, (*args, limit))]

    def expiring_before(self, now_ms: int) -> list[tuple[str, int, int]]:
        sql = "SELECT task_id, created_ms, ttl FROM tasks WHERE expires_ms < ?"
        return [(r[0], r[1], r[2]) for r in self._conn.execute(sql, (now_ms,))]

    def live_updated_before(self, cutoff_ms: int) -> list[TaskRow]:
        sql = (
            f"{_SELECT} WHERE status IN ('working', 'input_required') AND updated_ms < ?"
            " ORDER BY updated_ms"
        )
        return [_row(r) for r in self._conn.execute(sql, (cutoff_ms,))]


# --- session rows ----------------------------------------------------------------------------

_LEASE_COLUMNS: Final = (
    "session_id, owner_id, lease_token, fencing_token, claimed_at_ms, expires_at_ms"
)
# QueuedBatchRow's fields, in its order (``items`` is stored as JSON text).
_BATCH_FIELDS: Final = tuple(field.name for field in attrs.fields(QueuedBatchRow))
_BATCH_SELECT: Final = f"SELECT {', '.join(_BATCH_FIELDS)} FROM queued_work"
_BATCH_INSERT: Final = (
    f"INSERT INTO queued_work ({', '.join(_BATCH_FIELDS)})"
    f" VALUES (?{', ?' * (len(_BATCH_FIELDS) - 1)})"
)
_BATCH_SET: Final = tuple(name for name in _BATCH_FIELDS if name != "batch_id")
_BATCH_UPDATE: Final = (
    f"UPDATE queued_work SET {', '.join(f'{name} = ?' for name in _BATCH_SET)}"
    " WHERE batch_id = ? AND claim_token IS ?"
)
_DELIVERY_FIELDS: Final = ("turn_id", "head_revision", "outcome", "delivered_at_ms")
_DELIVERY_COLUMNS: Final = (*_BATCH_FIELDS, *_DELIVERY_FIELDS)
_DELIVERY_SELECT: Final = f"SELECT {', '.join(_DELIVERY_COLUMNS)} FROM queued_work_deliveries"
_DELIVERY_INSERT: Final = (
    f"INSERT INTO queued_work_deliveries ({', '.join(_DELIVERY_COLUMNS)})"
    f" VALUES (?{', ?' * (len(_DELIVERY_COLUMNS) - 1)})"
)
_ATTACHMENT_SELECT: Final = (
    "SELECT attachment_id, session_id, canonical_uri, intent_at_ms, committed_at_ms"
    " FROM attachments"
)


def _items_text(items: tuple[tuple[str, str], ...]) -> str:
    return json.dumps([list(item) for item in items], ensure_ascii=False, separators=(",", ":"))


def _items(batch_id: str, text: str) -> tuple[tuple[str, str], ...]:
    try:
        value = json.loads(text)
        if not isinstance(value, list):
            raise ValueError("items is not a list")
        items: list[tuple[str, str]] = []
        for item in value:
            if not (
                isinstance(item, list) and len(item) == 2 and all(type(x) is str for x in item)
            ):
                raise ValueError(f"not an (item_id, payload) pair: {item!r}")
            items.append((item[0], item[1]))
    except (ValueError, TypeError, RecursionError) as exc:
        raise CorruptRecordError("queued_work", batch_id, repr(exc)) from exc
    return tuple(items)


def _batch_row(values: tuple[Any, ...]) -> QueuedBatchRow:
    fields = dict(zip(_BATCH_FIELDS, values, strict=True))
    fields["items"] = _items(fields["batch_id"], fields["items"])
    fields["parked"] = bool(fields["parked"])
    return QueuedBatchRow(**fields)


def _delivery_row(values: tuple[Any, ...]) -> DeliveryRow:
    count = len(_BATCH_FIELDS)
    return DeliveryRow(
        row=_batch_row(values[:count]),
        **dict(zip(_DELIVERY_FIELDS, values[count:], strict=True)),
    )


def _batch_values(row: QueuedBatchRow, names: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(
        _items_text(row.items) if name == "items" else getattr(row, name) for name in names
    )


def _attachment(values: tuple[Any, ...]) -> AttachmentEntry:
    attachment_id, session_id, uri, intent_at_ms, committed_at_ms = values
    return AttachmentEntry(
        attachment_id=attachment_id,
        session_id=session_id,
        canonical_uri=uri,
        intent_at_ms=intent_at_ms,
        committed_at_ms=committed_at_ms,
    )


class SqliteSessionTable:
    """The session tables of one connection, with :class:`MemorySessionTable`'s semantics;
    every call runs inside the caller's transaction, and guarded writes report by the changed-row
    count whether their guard held."""

    def __init__(self, conn: apsw.Connection) -> None:
        self._conn = conn

    def _changed(self) -> bool:
        return bool(self._conn.changes() == 1)

    # --- heads ---

    def head(self, session_id: str) -> HeadRow | None:
        sql = "SELECT head_revision, state FROM session_heads WHERE session_id = ?"
        found = self._conn.execute(sql, (session_id,)).fetchone()
        if found is None:
            return None
        return HeadRow(session_id=session_id, head_revision=found[0], state=found[1])

    def put_head(self, row: HeadRow, expected_revision: int) -> bool:
        conn = self._conn
        conn.execute(
            "UPDATE session_heads SET head_revision = ?, state = ?"
            " WHERE session_id = ? AND head_revision = ?",
            (row.head_revision, row.state, row.session_id, expected_revision),
        )
        if self._changed():
            return True
        if expected_revision != 0:
            return False
        # No head yet counts as revision 0.
        conn.execute(
            "INSERT INTO session_heads (session_id, head_revision, state) VALUES (?, ?, ?)"
            " ON CONFLICT (session_id) DO NOTHING",
            (row.session_id, row.head_revision, row.state),
        )
        return self._changed()

    def heads(self) -> list[HeadRow]:
        sql = "SELECT session_id, head_revision, state FROM session_heads ORDER BY rowid"
        return [
            HeadRow(session_id=r[0], head_revision=r[1], state=r[2])
            for r in self._conn.execute(sql)
        ]

    # --- graph ---

    def nodes(self, session_id: str) -> list[tuple[str, str, bool]]:
        sql = (
            "SELECT node_id, node_json, tombstoned FROM graph_nodes"
            " WHERE session_id = ? ORDER BY seq"
        )
        return [(r[0], r[1], bool(r[2])) for r in self._conn.execute(sql, (session_id,))]

    def node(self, session_id: str, node_id: str) -> tuple[str, bool] | None:
        sql = "SELECT node_json, tombstoned FROM graph_nodes WHERE session_id = ? AND node_id = ?"
        found = self._conn.execute(sql, (session_id, node_id)).fetchone()
        return None if found is None else (found[0], bool(found[1]))

    def add_nodes(self, session_id: str, nodes: Sequence[tuple[str, str]]) -> None:
        # REPLACE deletes a node with the same id and inserts at the end (a new, highest seq),
        # as the memory table's overwrite does.
        self._conn.executemany(
            "INSERT OR REPLACE INTO graph_nodes (session_id, node_id, node_json, tombstoned)"
            " VALUES (?, ?, ?, 0)",
            [(session_id, node_id, text) for node_id, text in nodes],
        )

    def clear_nodes(self, session_id: str) -> None:
        self._conn.execute("DELETE FROM graph_nodes WHERE session_id = ?", (session_id,))

    def tombstone(self, session_id: str, node_ids: Sequence[str]) -> int:
        count = 0
        for node_id in node_ids:
            self._conn.execute(
                "UPDATE graph_nodes SET tombstoned = 1"
                " WHERE session_id = ? AND node_id = ? AND tombstoned = 0",
                (session_id, node_id),
            )
            count += self._conn.changes()
        return count

    def vacuum(self) -> int:
        self._conn.execute("DELETE FROM graph_nodes WHERE tombstoned = 1")
        return int(self._conn.changes())

    # --- usage and turn stamps ---

    def add_usage(self, session_id: str, entries: Sequence[str]) -> None:
        self._conn.executemany(
            "INSERT INTO usage_entries (session_id, entry) VALUES (?, ?)",
            [(session_id, text) for text in entries],
        )

    def usage(self, session_id: str) -> list[str]:
        sql = "SELECT entry FROM usage_entries WHERE session_id = ? ORDER BY seq"
        return [r[0] for r in self._conn.execute(sql, (session_id,))]

    def stamp(self, session_id: str, turn_id: str) -> TurnStampRow | None:
        sql = (
            "SELECT turn_commit_hash, head_revision, checkpoint_ref FROM turn_stamps"
            " WHERE session_id = ? AND turn_id = ?"
        )
        found = self._conn.execute(sql, (session_id, turn_id)).fetchone()
        if found is None:
            return None
        return TurnStampRow(
            session_id=session_id,
            turn_id=turn_id,
            turn_commit_hash=found[0],
            head_revision=found[1],
            checkpoint_ref=found[2],
        )

    def put_stamp(self, row: TurnStampRow) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO turn_stamps"
            " (session_id, turn_id, turn_commit_hash, head_revision, checkpoint_ref)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                row.session_id,
                row.turn_id,
                row.turn_commit_hash,
                row.head_revision,
                row.checkpoint_ref,
            ),
        )

    # --- leases ---

    def lease(self, session_id: str) -> LeaseRow | None:
        sql = f"SELECT {_LEASE_COLUMNS} FROM session_leases WHERE session_id = ?"
        found = self._conn.execute(sql, (session_id,)).fetchone()
        if found is None:
            return None
        return LeaseRow(
            session_id=found[0],
            owner_id=found[1],
            lease_token=found[2],
            fencing_token=found[3],
            claimed_at_ms=found[4],
            expires_at_ms=found[5],
        )

    def put_lease(self, row: LeaseRow) -> None:
        # One row per session forever: its fencing token only grows.
        self._conn.execute(
            f"INSERT OR REPLACE INTO session_leases ({_LEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (
                row.session_id,
                row.owner_id,
                row.lease_token,
                row.fencing_token,
                row.claimed_at_ms,
                row.expires_at_ms,
            ),
        )

    # --- queued work ---

    def sessions_with_work(self) -> list[str]:
        sql = "SELECT DISTINCT session_id FROM queued_work ORDER BY session_id"
        return [str(r[0]) for r in self._conn.execute(sql)]

    def batches(self, session_id: str) -> list[QueuedBatchRow]:
        sql = f"{_BATCH_SELECT} WHERE session_id = ? ORDER BY enqueue_seq"
        return [_batch_row(r) for r in self._conn.execute(sql, (session_id,))]

    def parked(self, session_id: str | None) -> list[QueuedBatchRow]:
        if session_id is None:
            sql = f"{_BATCH_SELECT} WHERE parked = 1 ORDER BY session_id, enqueue_seq"
            return [_batch_row(r) for r in self._conn.execute(sql)]
        sql = f"{_BATCH_SELECT} WHERE session_id = ? AND parked = 1 ORDER BY enqueue_seq"
        return [_batch_row(r) for r in self._conn.execute(sql, (session_id,))]

    def batch(self, batch_id: str) -> QueuedBatchRow | None:
        found = self._conn.execute(f"{_BATCH_SELECT} WHERE batch_id = ?", (batch_id,)).fetchone()
        return None if found is None else _batch_row(found)

    def batch_by_source(self, session_id: str, source_key: str) -> QueuedBatchRow | None:
        sql = f"{_BATCH_SELECT} WHERE session_id = ? AND source_key = ?"
        found = self._conn.execute(sql, (session_id, source_key)).fetchone()
        return None if found is None else _batch_row(found)

    def next_enqueue_seq(self) -> int:
        # A counter row, not max()+1: a deleted last batch never gives its number away again,
        # in this process or any other, before or after a reopen.
        found = self._conn.execute(
            "UPDATE tb_meta SET value = value + 1 WHERE key = 'enqueue_seq' RETURNING value"
        ).fetchall()
        value = found[0][0] if len(found) == 1 else None
        if not isinstance(value, int):
            raise CorruptRecordError("tb_meta", "enqueue_seq", "the enqueue counter is missing")
        return value

    def insert_batch(self, row: QueuedBatchRow) -> None:
        self._conn.execute(_BATCH_INSERT, _batch_values(row, _BATCH_FIELDS))

    def update_batch(self, row: QueuedBatchRow, claim_token: str | None) -> bool:
        self._conn.execute(
            _BATCH_UPDATE, (*_batch_values(row, _BATCH_SET), row.batch_id, claim_token)
        )
        return self._changed()

    def delete_batch(self, batch_id: str) -> bool:
        self._conn.execute("DELETE FROM queued_work WHERE batch_id = ?", (batch_id,))
        return self._changed()

    def delivery(self, batch_id: str) -> DeliveryRow | None:
        sql = f"{_DELIVERY_SELECT} WHERE batch_id = ?"
        found = self._conn.execute(sql, (batch_id,)).fetchone()
        return None if found is None else _delivery_row(found)

    def delivery_by_source(self, session_id: str, source_key: str) -> DeliveryRow | None:
        sql = f"{_DELIVERY_SELECT} WHERE session_id = ? AND source_key = ?"
        found = self._conn.execute(sql, (session_id, source_key)).fetchone()
        return None if found is None else _delivery_row(found)

    def insert_delivery(self, row: DeliveryRow) -> None:
        self._conn.execute(
            _DELIVERY_INSERT,
            (*_batch_values(row.row, _BATCH_FIELDS), *(getattr(row, f) for f in _DELIVERY_FIELDS)),
        )

    # --- meta, attachments, blobs ---

    def meta(self, session_id: str) -> str | None:
        sql = "SELECT meta FROM session_meta WHERE session_id = ?"
        found = self._conn.execute(sql, (session_id,)).fetchone()
        return None if found is None else str(found[0])

    def put_meta(self, session_id: str, meta: str) -> None:
        self._conn.execute(
            "INSERT INTO session_meta (session_id, meta) VALUES (?, ?)"
            " ON CONFLICT (session_id) DO UPDATE SET meta = excluded.meta",
            (session_id, meta),
        )

    def put_intent(self, entry: AttachmentEntry) -> None:
        self._conn.execute(
            "INSERT INTO attachments"
            " (attachment_id, session_id, canonical_uri, intent_at_ms, committed_at_ms)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (attachment_id) DO NOTHING",
            (
                entry.attachment_id,
                entry.session_id,
                entry.canonical_uri,
                entry.intent_at_ms,
                entry.committed_at_ms,
            ),
        )

    def commit_attachments(self, session_id: str, ids: Sequence[str], now_ms: int) -> None:
        # Only the session's own attachments; the first commit's time stays.
        self._conn.executemany(
            "UPDATE attachments SET committed_at_ms = ?"
            " WHERE attachment_id = ? AND session_id = ? AND committed_at_ms IS NULL",
            [(now_ms, attachment_id, session_id) for attachment_id in ids],
        )

    def uncommitted(self, older_than_ms: int) -> list[AttachmentEntry]:
        sql = (
            f"{_ATTACHMENT_SELECT} WHERE committed_at_ms IS NULL AND intent_at_ms < ?"
            " ORDER BY intent_at_ms, attachment_id"
        )
        return [_attachment(r) for r in self._conn.execute(sql, (older_than_ms,))]

    def forget(self, attachment_id: str) -> bool:
        self._conn.execute("DELETE FROM attachments WHERE attachment_id = ?", (attachment_id,))
        return self._changed()

    def put_blob(self, ref: str, content: bytes) -> None:
        self._conn.execute(
            "INSERT INTO blobs (ref, content) VALUES (?, ?) ON CONFLICT (ref) DO NOTHING",
            (ref, content),
        )

    def blob(self, ref: str) -> bytes | None:
        found = self._conn.execute("SELECT content FROM blobs WHERE ref = ?", (ref,)).fetchone()
        return None if found is None else bytes(found[0])

    def blob_refs(self) -> list[str]:
        # BINARY collation compares UTF-8 bytes: the same order as sorted() on str.
        return [r[0] for r in self._conn.execute("SELECT ref FROM blobs ORDER BY ref")]

    def delete_blob(self, ref: str) -> None:
        self._conn.execute("DELETE FROM blobs WHERE ref = ?", (ref,))


# --- execution rows --------------------------------------------------------------------------

# The columns are ExecutionRow's fields, in its order (capabilities as a JSON array of str).
_EXEC_FIELDS: Final = tuple(field.name for field in attrs.fields(ExecutionRow))
_EXEC_SET: Final = _EXEC_FIELDS[1:]  # what a write sets: all but the key
_EXEC_SELECT: Final = f"SELECT {', '.join(_EXEC_FIELDS)} FROM executions"
_EXEC_INSERT: Final = (
    f"INSERT INTO executions ({', '.join(_EXEC_FIELDS)}) VALUES (?{', ?' * len(_EXEC_SET)})"
    " ON CONFLICT (execution_id) DO NOTHING"
)
_EXEC_UPDATE: Final = (
    f"UPDATE executions SET {', '.join(f'{name} = ?' for name in _EXEC_SET)}"
    " WHERE execution_id = ? AND version = ?"
)
# Served by the executions_runnable index, in its order (the partial index needs the literal
# phase = 'runnable').
_EXEC_RUNNABLE: Final = (
    f"{_EXEC_SELECT} WHERE lane = ? AND phase = 'runnable' AND not_before_ms <= ?"
    " ORDER BY priority DESC, created_at_ms, execution_id LIMIT ?"
)
# Served by the executions_expiring index, in its order (a missing expiry counts as 0, as in the
# memory table; the expression must match the index's).
_EXEC_EXPIRED: Final = (
    f"{_EXEC_SELECT} WHERE lane = ? AND phase = 'active' AND ifnull(lease_expires_at_ms, 0) <= ?"
    " ORDER BY ifnull(lease_expires_at_ms, 0), execution_id LIMIT ?"
)
_EVENT_COLUMNS: Final = "event_id, stream, execution_id, kind, attempt_index, lease_epoch, at_ms"


def _capabilities(execution_id: str, text: str) -> tuple[str, ...]:
    try:
        value = json.loads(text)
        if not (isinstance(value, list) and all(type(cap) is str for cap in value)):
            raise ValueError(f"capabilities are not a list of str: {value!r}")
    except (ValueError, TypeError, RecursionError) as exc:
        raise CorruptRecordError("executions", execution_id, repr(exc)) from exc
    return tuple(value)


def _execution(values: tuple[Any, ...]) -> ExecutionRow:
    fields = dict(zip(_EXEC_FIELDS, values, strict=True))
    fields["capabilities"] = _capabilities(fields["execution_id"], fields["capabilities"])
    return ExecutionRow(**fields)


def _execution_values(row: ExecutionRow) -> tuple[Any, ...]:
    return tuple(
        json.dumps(list(row.capabilities), ensure_ascii=False, separators=(",", ":"))
        if name == "capabilities"
        else getattr(row, name)
        for name in _EXEC_SET
    )


class SqliteExecutionTable:
    """The execution tables of one connection, with :class:`MemoryExecutionTable`'s semantics;
    every call runs inside the caller's transaction, and a guarded write reports by the
    changed-row count whether its guard held."""

    def __init__(self, conn: apsw.Connection) -> None:
        self._conn = conn
        self._store_id: str | None = None

    def store_id(self) -> str:
        # Made once with the schema and never changed, so one read per connection will do.
        if self._store_id is None:
            found = self._conn.execute(
                "SELECT value FROM tb_identity WHERE key = 'store_id'"
            ).fetchone()
            if found is None or not isinstance(found[0], str) or not found[0]:
                raise CorruptRecordError("tb_identity", "store_id", "the store identity is missing")
            self._store_id = found[0]
        return self._store_id

    def execution(self, execution_id: str) -> ExecutionRow | None:
        sql = f"{_EXEC_SELECT} WHERE execution_id = ?"
        found = self._conn.execute(sql, (execution_id,)).fetchone()
        return None if found is None else _execution(found)

    def insert_execution(self, row: ExecutionRow) -> bool:
        self._conn.execute(_EXEC_INSERT, (row.execution_id, *_execution_values(row)))
        return bool(self._conn.changes() == 1)

    def replace_execution(self, row: ExecutionRow, expected_version: int) -> bool:
        self._conn.execute(
            _EXEC_UPDATE, (*_execution_values(row), row.execution_id, expected_version)
        )
        return bool(self._conn.changes() == 1)

    def runnable(self, lane: str, now_ms: int, limit: int) -> list[ExecutionRow]:
        return [_execution(r) for r in self._conn.execute(_EXEC_RUNNABLE, (lane, now_ms, limit))]

    def expired(self, lane: str, now_ms: int, limit: int) -> list[ExecutionRow]:
        return [_execution(r) for r in self._conn.execute(_EXEC_EXPIRED, (lane, now_ms, limit))]

    def add_frame(self, frame: Frame, text: str) -> None:
        # REPLACE: a frame stored again under its key overwrites it, as the memory table's does.
        self._conn.execute(
            "INSERT OR REPLACE INTO execution_frames"
            " (execution_id, seq, attempt_index, kind, data, created_at_ms)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                frame.execution_id,
                frame.seq,
                frame.attempt_index,
                frame.kind.value,
                text,
                frame.created_at_ms,
            ),
        )

    def frames(self, execution_id: str, after_seq: int, limit: int) -> list[tuple[Frame, str]]:
        sql = (
            "SELECT seq, attempt_index, kind, data, created_at_ms FROM execution_frames"
            " WHERE execution_id = ? AND seq > ? ORDER BY seq LIMIT ?"
        )
        out: list[tuple[Frame, str]] = []
        for seq, attempt_index, kind, text, created_at_ms in self._conn.execute(
            sql, (execution_id, after_seq, limit)
        ):
            try:
                frame_kind = FrameKind(kind)
            except ValueError as exc:
                raise CorruptRecordError(
                    "execution_frames", f"{execution_id}#{seq}", repr(exc)
                ) from exc
            frame = Frame(
                execution_id=execution_id,
                seq=seq,
                attempt_index=attempt_index,
                kind=frame_kind,
                data=None,
                created_at_ms=created_at_ms,
            )
            out.append((frame, text))
        return out

    def add_event(
        self,
        stream: str,
        execution_id: str,
        kind: str,
        attempt_index: int,
        lease_epoch: int,
        at_ms: int,
    ) -> None:
        self._conn.execute(
            "INSERT INTO execution_events"
            " (stream, execution_id, kind, attempt_index, lease_epoch, at_ms)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (stream, execution_id, kind, attempt_index, lease_epoch, at_ms),
        )

    def events(self, stream: str, after_id: int, limit: int) -> list[ExecutionEvent]:
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM execution_events"
            " WHERE stream = ? AND event_id > ? ORDER BY event_id LIMIT ?"
        )
        return [
            ExecutionEvent(
                event_id=r[0],
                stream=r[1],
                execution_id=r[2],
                kind=r[3],
                attempt_index=r[4],
                lease_epoch=r[5],
                at_ms=r[6],
            )
            for r in self._conn.execute(sql, (stream, after_id, limit))
        ]

    def cancel_requested(self, execution_id: str) -> bool:
        sql = "SELECT 1 FROM execution_cancels WHERE execution_id = ?"
        return self._conn.execute(sql, (execution_id,)).fetchone() is not None

    def request_cancel(self, execution_id: str) -> None:
        self._conn.execute(
            "INSERT INTO execution_cancels (execution_id) VALUES (?)"
            " ON CONFLICT (execution_id) DO NOTHING",
            (execution_id,),
        )


class SqliteTables(SqliteTaskTable, SqliteSessionTable, SqliteExecutionTable):
    """Every table of one connection: what the runner hands each operation."""

    def __init__(self, conn: apsw.Connection) -> None:
        SqliteTaskTable.__init__(self, conn)
        SqliteSessionTable.__init__(self, conn)
        SqliteExecutionTable.__init__(self, conn)


if TYPE_CHECKING:
    # mypy checks here that the execution table keeps up with the protocol the facet uses.
    def _is_an_execution_table(table: SqliteExecutionTable) -> ExecutionTable:
        return table


# --- errors ----------------------------------------------------------------------------------


def map_error(exc: BaseException, path: str, busy_timeout_s: float) -> TurnbuckleError:
    """The library error for a driver (or unexpected) exception, with it as ``__cause__``."""
    mapped: TurnbuckleError
    if isinstance(exc, TurnbuckleError):
        return exc
    if isinstance(exc, apsw.BusyError | apsw.LockedError):
        mapped = StoreBusyError(path, busy_timeout_s)
    elif isinstance(exc, apsw.NotADBError):
        mapped = NotADatabaseError(path)
    elif isinstance(exc, apsw.CorruptError):
        mapped = StoreCorruptError(path, str(exc))
    elif isinstance(exc, apsw.ReadOnlyError):
        mapped = StoreReadOnlyError(path)
    elif isinstance(exc, apsw.FullError):
        mapped = StorageFullError(path)
    elif isinstance(exc, apsw.CantOpenError | apsw.PermissionsError):
        mapped = StoreOpenError(path, str(exc))
    else:
        mapped = StoreInternalError(path, f"{type(exc).__name__}: {exc}")
    mapped.__cause__ = exc
    return mapped


# --- opening ---------------------------------------------------------------------------------


#: (st_dev, st_ino): which file a path named when the store opened it.
FileId = tuple[int, int]


def _open_connection(
    path: str, *, durability: Durability, busy_timeout_s: float, verify: bool
) -> tuple[apsw.Connection, FileId]:
    """Open, check (or create) and set up the store's connection; also return the identity of
    the file it has open."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise StoreOpenError(path, "the path is a folder")
    if not os.path.isdir(folder):
        raise StoreOpenError(path, f"the folder {folder!r} does not exist")
    # Looked at before opening (stat only, never open: that would drop SQLite's locks).
    wal_was_there = os.path.exists(path + "-wal")
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
    try:
        conn.setbusytimeout(int(busy_timeout_s * 1000))
        try:
            _check_and_probe(conn, path, verify=verify)
        except apsw.FullError:
            # A WAL left on a full disk (by a crash, or a writer without the room this store
            # keeps) is what the probe could not append to; emptying it may free the space.
            _empty_wal(conn)
            _check_and_probe(conn, path, verify=verify)
        _switch_to_wal(conn, path)
        conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
        conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        # The main file then grows in steps of this size, and only then does SQLite act on
        # the size hints of SqliteRunner._make_room.
        chunk = ctypes.c_int(_GROWTH_CHUNK)
        conn.file_control("main", apsw.SQLITE_FCNTL_CHUNK_SIZE, ctypes.addressof(chunk))
        file_id = _opened_file_id(conn, path)
    except BaseException:
        # The last connection to close checkpoints the WAL into the main file and deletes it.
        # For a refused file with a -wal we found there, that would write to it: with another
        # database's -wal beside ours, it would turn our file into that database. So close
        # without checkpointing and leave both as found; a -wal we made ourselves is empty,
        # and closing normally removes it again.
        # A file replaced during the open (or one we cannot tell about) is left alone for the
        # same reason: the -wal at the path may now be another file's.
        try:
            leave_alone = wal_was_there or _has_moved(conn)
        except apsw.Error:
            leave_alone = True
        if leave_alone:
            conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
        conn.close()
        raise
    return conn, file_id


def _check_and_probe(conn: apsw.Connection, path: str, *, verify: bool) -> None:
    """The open transaction: check (or create, or migrate) the schema, verify, probe a write."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        _check_or_create_schema(conn, path)
        if verify:
            # Before the first write: a file refused as corrupt is left exactly as found.
            problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreCorruptError(path, "; ".join(problems[:5]))
        # The write probe: a read-only file fails here, at open, not at the first write.
        conn.execute("UPDATE tb_meta SET value = value + 1 WHERE key = 'open_count'")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _empty_wal(conn: apsw.Connection) -> None:
    """Copy the WAL into the main file and truncate it to nothing, giving its space back.

    Outside any transaction. It waits (up to the busy timeout) for other connections' readers
    to move past the WAL; if they do not, it does what it can. It never raises: the caller
    tries its write again, and that answers.
    """
    with contextlib.suppress(apsw.Error):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _has_moved(conn: apsw.Connection) -> bool:
    """SQLite's own answer: does the path still name the file its descriptor has open?"""
    moved = ctypes.c_int(0)
    understood = conn.file_control("main", apsw.SQLITE_FCNTL_HAS_MOVED, ctypes.addressof(moved))
    return bool(understood and moved.value)


def _opened_file_id(conn: apsw.Connection, path: str) -> FileId:
    try:
        found = os.stat(path)
    except OSError as exc:
        raise StoreOpenError(path, f"the file went away while it was being opened: {exc}") from exc
    # Asked after our stat, SQLite (which compares the path with the descriptor it opened)
    # proves the stat saw that same file: a swap before our stat shows to both, one after it
    # to neither.
    if _has_moved(conn):
        raise StoreOpenError(path, "another file was put at the path while it was being opened")
    return found.st_dev, found.st_ino


def _scalar(conn: apsw.Connection, sql: str) -> Any:
    found = conn.execute(sql).fetchone()
    assert found is not None, sql
    return found[0]


def _check_or_create_schema(conn: apsw.Connection, path: str) -> None:
    version = _scalar(conn, "PRAGMA user_version")
    app_id = _scalar(conn, "PRAGMA application_id")
    objects = _scalar(conn, "SELECT count(*) FROM sqlite_schema")
    if version == 0 and app_id == 0 and objects == 0:
        # A new (or empty) file. DDL goes one statement at a time, inside this transaction, so
        # concurrent first opens queue on the write lock and see a finished schema.
        for statement in _DDL:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    elif app_id != APPLICATION_ID:
        raise ForeignDatabaseError(path, app_id, version)
    elif version != SCHEMA_VERSION:
        if not (version in _MIGRATIONS and version < SCHEMA_VERSION):
            raise UnsupportedSchemaVersion(expected=SCHEMA_VERSION, found=version, path=path)
        # An older file is upgraded in place, in this same transaction (user_version is in the
        # header and transactional): every opener sees the old schema or the whole new one.
        while version < SCHEMA_VERSION:
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
            version += 1
            conn.execute(f"PRAGMA user_version = {version}")


def _rollback(conn: apsw.Connection) -> None:
    """Leave the connection outside any transaction, whatever failed.

    SQLite may already have rolled back by itself (after FULL, IOERR, NOMEM: "may or may not"),
    so look before rolling back; and a failing ROLLBACK must not hide the error that led here.
    """
    if conn.in_transaction:
        with contextlib.suppress(apsw.Error):
            conn.execute("ROLLBACK")


def _switch_to_wal(conn: apsw.Connection, path: str) -> None:
    # Another opener can hold a lock for an instant; journal_mode then fails at once with
    # BUSY (the busy handler is not used), and one retry has always been enough.
    for attempt in range(_WAL_RETRIES):
        try:
            mode = _scalar(conn, "PRAGMA journal_mode = WAL")
        except apsw.BusyError:
            if attempt == _WAL_RETRIES - 1:
                raise
            time.sleep(0.005 * (attempt + 1))
            continue
        if str(mode).lower() != "wal":
            raise StoreInternalError(path, f"journal_mode stayed {mode!r}")
        return


def _close_replaced(conn: apsw.Connection) -> None:
    """Close the connection of a file that is no longer at its path, writing nothing there.

    First its WAL is checkpointed into the file the connection has open, the one that left the
    path (SQLite writes through the descriptor it opened, never by name), so that file holds
    every write acknowledged before; and the WAL is emptied, so a later opener of the path does
    not replay these pages onto the file that is there now. Then it closes without the
    checkpoint-on-close, which would also delete the -wal and -shm by name: those names may
    belong to the new file now. The checkpoint may find another connection reading (it then
    does what it can); nothing here may raise, the handle is closing either way.
    """
    _empty_wal(conn)
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    with contextlib.suppress(apsw.Error):
        conn.close()


# --- the adapter actor -----------------------------------------------------------------------

_STOP: Final = object()


class _Request:
    """One operation and its one-shot reply, handed from the event loop to the owner thread."""

    __slots__ = ("fn", "reply", "writes")

    def __init__(self, fn: Callable[[Any], Any], writes: bool) -> None:
        self.fn = fn
        self.writes = writes
        self.reply: ThreadReply[Any] = ThreadReply()


class SqliteRunner:
    """Runs operations on the owner thread of one connection; see the module docstring."""

    def __init__(
        self,
        path: str,
        *,
        durability: Durability = "full",
        busy_timeout_s: float = 5.0,
        verify_on_open: bool = True,
    ) -> None:
        if durability not in ("full", "process"):
            raise InvalidArgument(f"durability must be 'full' or 'process', got {durability!r}")
        if not isinstance(busy_timeout_s, int | float) or not 0 <= busy_timeout_s <= 3600:
            raise InvalidArgument(f"busy_timeout must be 0 to 3600 s, got {busy_timeout_s!r}")
        self.path = os.path.abspath(path)
        self._durability: Durability = durability
        self._busy_s = float(busy_timeout_s)
        self._verify = verify_on_open
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = True
        self._stopped: _Request | None = None
        #: The process that started the owner thread; in any other (a forked child) the thread
        #: does not exist and the connection must not be touched.
        self._pid: int | None = None
        #: Set by the owner thread when the file at the path is no longer the one it opened;
        #: from then on every call is refused with it.
        self._replaced: StoreFileReplaced | None = None
        self._file_id: FileId = (0, 0)
        self._page_size = 4096

    async def start(self) -> None:
        """Open the file on a new owner thread.

        Raises:
            StoreOpenError, NotADatabaseError, ForeignDatabaseError, UnsupportedSchemaVersion,
            StoreCorruptError, StoreReadOnlyError, StoreBusyError: the file cannot serve.
        """
        opened = _Request(lambda _: None, True)
        self._stopped = _Request(lambda _: None, True)
        thread = threading.Thread(
            target=self._main,
            args=(opened,),
            daemon=True,
            name=f"turnbuckle-sqlite:{os.path.basename(self.path)}",
        )
        self._closed = False
        self._pid = os.getpid()
        thread.start()
        try:
            await opened.reply.wait(shield=True)
        except BaseException:
            self._closed = True
            raise

    async def run(self, fn: Callable[[Any], T], *, writes: bool) -> T:
        """Run ``fn(table)`` atomically on the owner thread and return its result.

        Raises:
            StoreUsedInForkedChild: called in a child process forked from the one that opened
                the store.
            StoreFileReplaced: the file at the path is no longer the one this handle opened
                (now, or at any earlier call); the handle has closed itself.
            StoreClosedError: the store was closed.
            whatever ``fn`` raises, or the store error the database gave.
        """
        # First, and before taking the lock (another thread may have held it at the fork):
        # in a forked child no owner thread would ever answer, so the call would hang.
        forked = self._forked()
        if forked is not None:
            raise forked
        # A caller already cancelled starts nothing (as on the memory store): it is told
        # "cancelled" truthfully, and never leaves behind a write it will not see the result of.
        await anyio.lowlevel.checkpoint_if_cancelled()
        request = _Request(fn, writes)
        with self._lock:
            if self._replaced is not None:
                raise StoreFileReplaced(self.path, self._replaced.reason)
            if self._closed:
                raise StoreClosedError("sqlite")
            self._queue.put(request)
        # A write's caller waits for the outcome even when cancelled: never a phantom commit.
        return await request.reply.wait(shield=writes)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Finish every queued request, checkpoint, and close the connection. Idempotent.

        In a forked child it returns at once: the connection and its thread are the parent's.
        """
        if self._forked() is not None:
            return
        with self._lock:
            already = self._closed
            self._closed = True
            if not already:
                self._queue.put(_STOP)
        stopped = self._stopped
        if stopped is not None:
            await stopped.reply.wait(shield=True)

    def _forked(self) -> StoreUsedInForkedChild | None:
        pid = os.getpid()
        if self._pid is None or pid == self._pid:
            return None
        return StoreUsedInForkedChild("sqlite", self._pid, pid)

    # --- the owner thread ---

    def _main(self, opened: _Request) -> None:
        try:
            conn, self._file_id = _open_connection(
                self.path,
                durability=self._durability,
                busy_timeout_s=self._busy_s,
                verify=self._verify,
            )
        except BaseException as exc:
            opened.reply.fail(map_error(exc, self.path, self._busy_s))
            self._shut(None)
            return
        table = SqliteTables(conn)
        self._page_size = int(_scalar(conn, "PRAGMA page_size"))
        opened.reply.send(None)
        try:
            stop = False
            while not stop:
                batch = [self._queue.get()]
                if batch[0] is _STOP:
                    break
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                # Reads go first, in a read transaction of their own: in WAL a reader never
                # waits for a writer, but a read grouped into a BEGIN IMMEDIATE would wait out
                # another process's write lock with the writes (and fail busy with them).
                # Concurrent requests may be served in either order.
                reads = [request for request in batch if not request.writes]
                writes = [request for request in batch if request.writes]
                for group in (reads, writes):
                    if not group:
                        continue
                    if self._replaced is None:
                        self._serve(conn, table, group)
                    else:
                        self._refuse(group)  # the file left before their turn
                if self._replaced is not None:
                    break
        finally:
            self._shut(conn)

    def _shut(self, conn: apsw.Connection | None) -> None:
        with self._lock:
            self._closed = True
        # Anything still queued arrived after close began; it never ran.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item.reply.fail(self._closed_error())
        if conn is not None and self._replaced is not None:
            _close_replaced(conn)
        elif conn is not None:
            # Fails only while another connection is busy with the WAL; it will checkpoint.
            with contextlib.suppress(apsw.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            conn.close()
        if self._stopped is not None:
            self._stopped.reply.send(None)

    def _closed_error(self) -> StoreClosedError:
        if self._replaced is not None:
            return StoreFileReplaced(self.path, self._replaced.reason)
        return StoreClosedError("sqlite")

    def _refuse(self, batch: list[_Request]) -> None:
        for request in batch:
            request.reply.fail(self._closed_error())

    def _file_still_ours(self) -> int | None:
        """The size of the file at the path if it is still the one this connection has open;
        if not, None, and the handle is marked replaced (for good).

        A file that left the path (deleted, renamed away, another file renamed or copied over
        it) still takes this connection's writes, and a commit there would be acknowledged and
        then lost to everyone who opens the path. A stat is about a microsecond of CPU, but it
        lets go of the GIL: measured on the owner thread it costs 4-5 us, and 10-35 us when
        the event loop is busy and takes the GIL meanwhile (two per batch).
        """
        try:
            found = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            reason = "it was deleted or renamed away"
        except OSError as exc:
            # Unable to tell which file is there, the handle cannot promise its writes land in
            # the store at the path.
            reason = f"the path can no longer be checked: {exc.strerror or exc}"
        else:
            if (found.st_dev, found.st_ino) == self._file_id:
                return found.st_size
            reason = (
                f"another file is at the path now (device {found.st_dev}, inode {found.st_ino};"
                f" the store opened device {self._file_id[0]}, inode {self._file_id[1]})"
            )
        with self._lock:
            self._replaced = StoreFileReplaced(self.path, reason)
        return None

    def _serve(
        self,
        conn: apsw.Connection,
        table: SqliteTables,
        batch: list[_Request],
        *,
        retried: bool = False,
    ) -> None:
        file_size = None if self._replaced is not None else self._file_still_ours()
        if file_size is None:
            self._refuse(batch)
            return
        try:
            outcomes = self._transaction(conn, table, batch, file_size)
        except _BeginFailed as failed:
            error = map_error(failed.cause, self.path, self._busy_s)
            for request in batch:
                request.reply.fail(error)
            return
        except BaseException as exc:
            if isinstance(exc, apsw.FullError):
                # Often it is the WAL that filled the disk: a checkpoint can always empty it
                # (the main file already has room for every committed page), giving its space
                # back; then the request is tried once more, alone.
                _empty_wal(conn)
                if len(batch) == 1 and not retried:
                    self._serve(conn, table, batch, retried=True)
                    return
            if len(batch) > 1:
                # The database failed part-way through the group: run each alone, so only
                # the operations that really fail are told so.
                for request in batch:
                    self._serve(conn, table, [request])
                return
            outcomes = [(False, map_error(exc, self.path, self._busy_s))]
        else:
            # Committed; but if the file left the path meanwhile, the commit went to a file
            # that is no longer the store. Its callers are told so, never "done".
            if self._file_still_ours() is None:
                self._refuse(batch)
                return
        for request, (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                request.reply.send(value)
            else:
                request.reply.fail(value)

    def _transaction(
        self, conn: apsw.Connection, table: SqliteTables, batch: list[_Request], file_size: int
    ) -> list[tuple[bool, Any]]:
        writes = any(request.writes for request in batch)
        try:
            conn.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
        except apsw.Error as exc:
            raise _BeginFailed(exc) from exc
        outcomes: list[tuple[bool, Any]] = []
        try:
            for request in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = request.fn(table)
                except apsw.Error:
                    raise
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    outcomes.append((False, map_error(exc, self.path, self._busy_s)))
                else:
                    outcomes.append((True, value))
                conn.execute("RELEASE op")
            if writes:
                self._make_room(conn, file_size)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return outcomes

    def _make_room(self, conn: apsw.Connection, file_size: int) -> None:
        """Before COMMIT: grow the main file to hold the whole database this commit leaves.

        In WAL mode a commit only appends to the -wal; the main file grows later, when a
        checkpoint copies the new pages in. On a full disk that growth fails, so the WAL can
        never be emptied, and every later write, even a delete (which also needs WAL space),
        fails until space is freed by hand. Grown here, while the commit can still be refused,
        the main file always has room for every committed page, so a checkpoint needs no new
        space and can always give the WAL's back.

        Raises:
            apsw.FullError: the growth would leave less than ``_FREE_RESERVE`` free on the
                filesystem (or failed for want of space); the transaction is rolled back.
        """
        needed = int(_scalar(conn, "PRAGMA page_count")) * self._page_size
        if needed <= file_size:
            return
        target = -(-needed // _GROWTH_CHUNK) * _GROWTH_CHUNK
        if self._free_bytes() - (target - file_size) < _FREE_RESERVE:
            raise apsw.FullError("the database may not grow into the filesystem's last space")
        size = ctypes.c_int64(target)
        try:
            conn.file_control("main", apsw.SQLITE_FCNTL_SIZE_HINT, ctypes.addressof(size))
        except apsw.IOError as exc:
            # SQLite reports a failed allocation as a write error, without the errno.
            if self._free_bytes() < _FREE_RESERVE:
                raise apsw.FullError("no space to grow the database") from exc
            raise

    def _free_bytes(self) -> int:
        found = os.statvfs(self.path)
        return found.f_bavail * found.f_frsize


class _BeginFailed(Exception):
    """BEGIN itself failed (usually busy): nothing ran, and retrying one by one would only wait
    the busy timeout once per request."""

    def __init__(self, cause: apsw.Error) -> None:
        super().__init__(cause)
        self.cause = cause
