"""Frozen copies of older store schemas, and raw-file helpers, for the upgrade tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apsw

# The version-1 and version-2 schemas, exactly as turnbuckle made them (frozen here, so a later
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


def schema(path: Path) -> list[tuple[Any, ...]]:
    """Every schema object of the file at ``path``, in a stable order."""
    return sql(path, "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY type, name")
