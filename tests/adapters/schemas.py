"""Frozen copies of older store schemas, and raw-file helpers, for the upgrade tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apsw

# The version-1, -2 and -3 schemas, exactly as turnbuckle made them (frozen here, so a later
# change to the live DDL cannot silently change what "a version-2 file" means to these tests).
V1_DDL = (
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
V2_DDL = (
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
    "INSERT INTO tb_meta (key, value) VALUES ('enqueue_seq', 0)",
)

V3_DDL = (
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


def sql(path: Path, *statements: str) -> list[tuple[Any, ...]]:
    """Run statements on a separate raw connection (closed again); the rows of the last one."""
    conn = apsw.Connection(str(path))
    try:
        rows: list[tuple[Any, ...]] = []
        for statement in statements:
            rows = list(conn.execute(statement))  # drained here: apsw cursors are lazy
        return rows
    finally:
        conn.close()


def columns(ddl: tuple[str, ...], table: str) -> list[str]:
    """The columns ``table`` has under the schema ``ddl``."""
    conn = apsw.Connection(":memory:")
    try:
        for statement in ddl:
            conn.execute(statement)
        return [str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


def copy_rows(ddl: tuple[str, ...], tables: tuple[str, ...]) -> list[str]:
    """Statements copying ``tables`` from an attached ``scratch`` database (made by today's
    code) into ``main`` (made with the older ``ddl``): the columns that version had."""
    statements = []
    for table in tables:
        names = ", ".join(columns(ddl, table))
        statements.append(f"INSERT INTO main.{table} ({names}) SELECT {names} FROM scratch.{table}")
    return statements


def schema(path: Path) -> list[tuple[Any, ...]]:
    """Every schema object of the file at ``path``, in a stable order."""
    return sql(path, "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY type, name")
