"""Session persistence: the session graph, checkpoints, and the atomic runtime commit.

Theory of operation
-------------------

A session is one conversation: a graph of nodes (branches allowed) with a current leaf, plus the
runtime state a turn leaves behind (agent frames, config, a checkpoint of opaque snapshots) and a
token-usage ledger. Its *head* carries a revision that grows by one per commit.

A turn ends with one :class:`RuntimeCommit`, applied all or nothing. :func:`check_commit`
decides, in this order, from the rows the store read in the same transaction:

1. the handle's session binding (``SessionBindingMismatch``);
2. the turn-commit stamp: a stamp already recorded with the same hash is a *replay*: the stored
   result is returned (and the lease released, if asked) without any other check, so "retry the
   final commit" after a crash is always safe; the same turn id with another hash is
   ``RuntimeTurnCommitConflict``;
3. the live lease fence (``SessionExecutionLeaseExpired``);
4. the head CAS, if the commit names an expected revision (``HeadRevisionConflict``);
5. ownership of every completed queue claim, taken under the commit's own lease grant
   (``QueuedWorkClaimExpired``).

Only then are the writes planned: checkpoint blobs, usage, the graph delta, head revision + 1,
the delivered batches (each leaves the queue for the session's deliveries, with the turn id and
the commit's ``outcome``: the durable answer to those messages), attachment stamps, the turn
stamp, and the lease release.

Checkpoint snapshots are bytes, stored as content-addressed blobs (sha256); the checkpoint itself
is a small JSON manifest naming them, stored as a blob too, and ``checkpoint_ref`` is its address.
Garbage collection marks from every session head's manifest and keeps everything if any manifest
cannot be read.

The turn-commit hash identifies "the same final commit" across retries: a SHA-256 of the
commit's canonical JSON with the parts that legitimately differ between retries removed (the
expected revision, the lease fence and release, the stamp itself) and volatile keys scrubbed
(ids and timestamps of nodes and messages).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Any, Final, TypeAlias

import attrs

from turnbuckle.errors import (
    HeadRevisionConflict,
    InvalidArgument,
    PayloadTooLarge,
    RuntimeTurnCommitConflict,
    SessionBindingMismatch,
    SessionExecutionLeaseExpired,
)
from turnbuckle.sansio.codec import (
    JSON,
    check_int64,
    check_text,
    decode_json,
    encode_json,
    sequence,
)
from turnbuckle.sansio.lease import LeaseFence, LeaseRow, check_fence, release_lease
from turnbuckle.sansio.queue import (
    DeliveryRow,
    QueuedBatchRow,
    QueuedWorkCompletion,
    check_completion,
    deliver_row,
)

__all__ = [
    "ActivePath",
    "AgentFrame",
    "AttachmentEntry",
    "AttachmentIntent",
    "Checkpoint",
    "CommitResult",
    "FullGraph",
    "GraphAppend",
    "GraphDelta",
    "GraphReplace",
    "GraphUnchanged",
    "ReadScope",
    "RuntimeCommit",
    "SessionMeta",
    "SessionNode",
    "SessionRead",
    "TokenUsage",
    "TurnCommitStamp",
    "UsageEntry",
    "active_path",
    "blob_ref",
    "turn_commit_hash",
]


# --- the graph -------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SessionNode:
    """One event of a session's history. ``payload`` is the host's (plain JSON)."""

    node_id: str
    parent_node_id: str | None = None
    caused_by: str | None = None
    agent_frame_id: str | None = None
    timestamp: str = ""
    payload: JSON = None


@attrs.frozen(kw_only=True)
class GraphUnchanged:
    """The commit adds no nodes; ``leaf`` (if set) moves the current leaf."""

    leaf: str | None = None


@attrs.frozen(kw_only=True)
class GraphAppend:
    """The commit appends ``nodes`` (in order) and may move the leaf."""

    nodes: tuple[SessionNode, ...] = attrs.field(converter=sequence)
    leaf: str | None = None


@attrs.frozen(kw_only=True)
class GraphReplace:
    """The commit replaces the whole graph."""

    nodes: tuple[SessionNode, ...] = attrs.field(converter=sequence)
    leaf: str | None = None


GraphDelta: TypeAlias = GraphUnchanged | GraphAppend | GraphReplace


@attrs.frozen
class FullGraph:
    """Read every live (not tombstoned) node, in insertion order."""


@attrs.frozen
class ActivePath:
    """Read only the ancestry of ``leaf`` (None: the persisted leaf), root first."""

    leaf: str | None = None


ReadScope: TypeAlias = FullGraph | ActivePath


def active_path(nodes: Sequence[SessionNode], leaf: str | None) -> tuple[SessionNode, ...]:
    """The ancestry of ``leaf`` among ``nodes``, root first; () if the leaf is unknown.

    A parent missing from ``nodes`` (tombstoned) ends the path there.
    """
    by_id = {node.node_id: node for node in nodes}
    path: list[SessionNode] = []
    current = by_id.get(leaf) if leaf is not None else None
    seen: set[str] = set()
    while current is not None and current.node_id not in seen:
        seen.add(current.node_id)
        path.append(current)
        parent = current.parent_node_id
        current = by_id.get(parent) if parent is not None else None
    return tuple(reversed(path))


# --- checkpoint, frames, usage, meta ---------------------------------------------------------


@attrs.frozen(kw_only=True)
class AgentFrame:
    """One agent frame (a plan mode, a sub-agent...): the host's data plus an optional
    execution snapshot (bytes, stored as a blob)."""

    frame_id: str
    parent_frame_id: str | None = None
    reason: str = ""
    data: JSON = None
    execution_snapshot: bytes | None = None


@attrs.frozen(kw_only=True)
class Checkpoint:
    """What a turn leaves to resume from: turn state as JSON, the rest as opaque snapshots."""

    turn_state: JSON = None
    tool_state: bytes | None = None
    plugin_snapshot: bytes | None = None
    plugin_snapshot_revision: int | None = None
    execution_state: bytes | None = None


@attrs.frozen(kw_only=True)
class TokenUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0


@attrs.frozen(kw_only=True)
class UsageEntry:
    """One line of the token ledger."""

    source: str
    model: str
    usage: TokenUsage


@attrs.frozen(kw_only=True)
class SessionMeta:
    session_id: str
    session_name: str = ""
    created_at: str = ""
    model: str = ""
    cwd: str | None = None
    #: How this session relates to others (root, fork of, child of...), the host's JSON.
    relation: JSON = None


@attrs.frozen(kw_only=True)
class AttachmentIntent:
    """A write-ahead record that attachment bytes are about to be stored for a session."""

    attachment_id: str
    session_id: str
    canonical_uri: str
    intent_at_ms: int


@attrs.frozen(kw_only=True)
class AttachmentEntry:
    attachment_id: str
    session_id: str
    canonical_uri: str
    intent_at_ms: int
    committed_at_ms: int | None


# --- the commit ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TurnCommitStamp:
    """Marks a commit as the final commit of one turn, for idempotent replay."""

    session_id: str
    turn_id: str
    turn_commit_hash: str


@attrs.frozen(kw_only=True)
class RuntimeCommit:
    """Everything a turn commits, atomically."""

    session_id: str
    #: The head revision the commit was computed from; None skips the CAS (the lease guards).
    expected_head_revision: int | None = None
    #: The live lease; required unless the commit replays a recorded turn stamp.
    lease: LeaseFence | None = None
    #: Release this lease in the same transaction.
    release: LeaseFence | None = None
    config: JSON = None
    agent_frames: tuple[AgentFrame, ...] = attrs.field(default=(), converter=sequence)
    current_agent_frame_id: str | None = None
    graph: GraphDelta = GraphUnchanged()
    checkpoint: Checkpoint = Checkpoint()
    usage: tuple[UsageEntry, ...] = attrs.field(default=(), converter=sequence)
    turn_commit: TurnCommitStamp | None = None
    completed_claims: tuple[QueuedWorkCompletion, ...] = attrs.field(default=(), converter=sequence)
    #: The turn's outcome (the host's JSON), kept with every batch this commit delivers: the
    #: durable answer to those messages.
    outcome: JSON = None
    committed_attachment_ids: tuple[str, ...] = attrs.field(default=(), converter=sequence)


@attrs.frozen(kw_only=True)
class CommitResult:
    head_revision: int
    checkpoint_ref: str


@attrs.frozen(kw_only=True)
class SessionRead:
    """A session as loaded: the head state, the graph in the scope asked, the ledger."""

    session_id: str
    head_revision: int
    config: JSON
    agent_frames: tuple[AgentFrame, ...]
    current_agent_frame_id: str | None
    nodes: tuple[SessionNode, ...]
    leaf_node_id: str | None
    checkpoint: Checkpoint
    checkpoint_ref: str
    usage: tuple[UsageEntry, ...]


# --- encoding --------------------------------------------------------------------------------


def blob_ref(content: bytes) -> str:
    """The content address of a blob."""
    return "sha256:" + hashlib.sha256(content).hexdigest()


def _b64(content: bytes | None) -> str | None:
    return None if content is None else base64.b64encode(content).decode()


_VOLATILE: Final = frozenset(
    {"id", "node_id", "parent_node_id", "leaf", "leaf_node_id", "timestamp"}
)


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _node_json(node: SessionNode) -> dict[str, JSON]:
    return {
        "node_id": node.node_id,
        "parent_node_id": node.parent_node_id,
        "caused_by": node.caused_by,
        "agent_frame_id": node.agent_frame_id,
        "timestamp": node.timestamp,
        "payload": node.payload,
    }


def _frame_json(frame: AgentFrame) -> dict[str, JSON]:
    return {
        "frame_id": frame.frame_id,
        "parent_frame_id": frame.parent_frame_id,
        "reason": frame.reason,
        "data": frame.data,
        "execution_snapshot": _b64(frame.execution_snapshot),
    }


def _commit_body(commit: RuntimeCommit) -> dict[str, JSON]:
    graph = commit.graph
    checkpoint = commit.checkpoint
    return {
        "session_id": commit.session_id,
        "config": commit.config,
        "agent_frames": [_frame_json(f) for f in commit.agent_frames],
        "current_agent_frame_id": commit.current_agent_frame_id,
        "graph": {
            "kind": type(graph).__name__,
            "nodes": [_node_json(n) for n in getattr(graph, "nodes", ())],
            "leaf": graph.leaf,
        },
        "checkpoint": {
            "turn_state": checkpoint.turn_state,
            "tool_state": _b64(checkpoint.tool_state),
            "plugin_snapshot": _b64(checkpoint.plugin_snapshot),
            "plugin_snapshot_revision": checkpoint.plugin_snapshot_revision,
            "execution_state": _b64(checkpoint.execution_state),
        },
        "usage": [
            [
                e.source,
                e.model,
                e.usage.input_tokens,
                e.usage.output_tokens,
                e.usage.cached_input_tokens,
                e.usage.reasoning_tokens,
            ]
            for e in commit.usage
        ],
        "completed_claims": [[c.claim_id, list(c.batch_ids)] for c in commit.completed_claims],
        "committed_attachment_ids": list(commit.committed_attachment_ids),
        "outcome": commit.outcome,
    }


def turn_commit_hash(commit: RuntimeCommit) -> str:
    """The stable identity of a final commit across retries (see the module docstring).

    Raises:
        PayloadNotSerializable: the commit holds a payload that is not plain JSON.
    """
    body = _scrub(_commit_body(commit))
    text = encode_json(body, limit=1 << 62)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_bytes(name: str, value: object, limit: int) -> None:
    if value is None:
        return
    if type(value) is not bytes:
        raise InvalidArgument(f"{name} must be bytes or None, got {type(value).__name__}")
    if len(value) > limit:
        raise PayloadTooLarge(len(value), limit)


def _check_json(name: str, value: object, limit: int) -> None:
    encode_json(value, limit=limit)


def _check_optional_text(name: str, value: object, limit: int) -> None:
    check_text(name, value, optional=True, limit=limit)


def check_commit_shape(commit: object, limit: int) -> RuntimeCommit:
    """Validate every field of a commit before any store is touched: exact types, and each
    payload (node payload, turn state, config, frame data, snapshot) within ``limit`` bytes.

    Raises:
        InvalidArgument: a field has the wrong type or range.
        PayloadNotSerializable, PayloadTooLarge: a payload is not plain JSON or too large.
    """
    if not isinstance(commit, RuntimeCommit):
        raise InvalidArgument(f"expected a RuntimeCommit, got {commit!r}")
    check_text("session_id", commit.session_id, limit=limit)
    if not commit.session_id:
        raise InvalidArgument("session_id must not be empty")
    if commit.expected_head_revision is not None:
        check_int64("expected_head_revision", commit.expected_head_revision)
    for name in ("lease", "release"):
        fence = getattr(commit, name)
        if fence is not None and not isinstance(fence, LeaseFence):
            raise InvalidArgument(f"{name} must be a LeaseFence or None, got {fence!r}")
    _check_json("config", commit.config, limit)
    _check_optional_text("current_agent_frame_id", commit.current_agent_frame_id, limit)
    for frame in commit.agent_frames:
        if not isinstance(frame, AgentFrame):
            raise InvalidArgument(f"agent frames must be AgentFrame, got {frame!r}")
        check_text("frame_id", frame.frame_id, limit=limit)
        _check_optional_text("parent_frame_id", frame.parent_frame_id, limit)
        check_text("reason", frame.reason, limit=limit)
        _check_json("frame data", frame.data, limit)
        _check_bytes("execution_snapshot", frame.execution_snapshot, limit)
    graph = commit.graph
    if not isinstance(graph, GraphUnchanged | GraphAppend | GraphReplace):
        raise InvalidArgument(f"graph must be a GraphDelta, got {graph!r}")
    _check_optional_text("leaf", graph.leaf, limit)
    node_ids = [getattr(node, "node_id", None) for node in getattr(graph, "nodes", ())]
    if len(set(node_ids)) != len(node_ids):
        raise InvalidArgument("a graph delta names the same node id twice")
    for node in getattr(graph, "nodes", ()):
        if not isinstance(node, SessionNode):
            raise InvalidArgument(f"graph nodes must be SessionNodes, got {node!r}")
        check_text("node_id", node.node_id, limit=limit)
        for name in ("parent_node_id", "caused_by", "agent_frame_id"):
            _check_optional_text(name, getattr(node, name), limit)
        check_text("timestamp", node.timestamp, limit=limit)
        _check_json("node payload", node.payload, limit)
    checkpoint = commit.checkpoint
    if not isinstance(checkpoint, Checkpoint):
        raise InvalidArgument(f"checkpoint must be a Checkpoint, got {checkpoint!r}")
    _check_json("turn_state", checkpoint.turn_state, limit)
    for name in ("tool_state", "plugin_snapshot", "execution_state"):
        _check_bytes(name, getattr(checkpoint, name), limit)
    if checkpoint.plugin_snapshot_revision is not None:
        check_int64("plugin_snapshot_revision", checkpoint.plugin_snapshot_revision)
    for entry in commit.usage:
        if not isinstance(entry, UsageEntry) or not isinstance(entry.usage, TokenUsage):
            raise InvalidArgument(f"usage entries must be UsageEntry, got {entry!r}")
        check_text("usage source", entry.source, limit=limit)
        check_text("usage model", entry.model, limit=limit)
        for field in attrs.fields(TokenUsage):
            check_int64(field.name, getattr(entry.usage, field.name))
    stamp = commit.turn_commit
    if stamp is not None:
        if not isinstance(stamp, TurnCommitStamp):
            raise InvalidArgument(f"turn_commit must be a TurnCommitStamp, got {stamp!r}")
        if stamp.session_id != commit.session_id:
            raise InvalidArgument("the turn-commit stamp names another session")
        check_text("turn_id", stamp.turn_id, limit=limit)
        check_text("turn_commit_hash", stamp.turn_commit_hash, limit=limit)
    for claim in commit.completed_claims:
        if not isinstance(claim, QueuedWorkCompletion) or claim.session_id != commit.session_id:
            raise InvalidArgument(f"completed claims must be this session's, got {claim!r}")
        for batch_id in claim.batch_ids:
            check_text("batch_id", batch_id)
    for attachment_id in commit.committed_attachment_ids:
        check_text("attachment_id", attachment_id, limit=limit)
    _check_json("outcome", commit.outcome, limit)
    return commit


# --- stored forms ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class HeadRow:
    """A session's head as stored: its revision and its state as canonical JSON."""

    session_id: str
    head_revision: int
    state: str


@attrs.frozen(kw_only=True)
class TurnStampRow:
    session_id: str
    turn_id: str
    turn_commit_hash: str
    head_revision: int
    checkpoint_ref: str


@attrs.frozen(kw_only=True)
class CommitPlan:
    """The writes one accepted commit makes, or (``replay``) the result it already made."""

    result: CommitResult
    replay: bool
    #: The lease row to store afterwards, if it changes (a release).
    lease: LeaseRow | None = None
    head: HeadRow | None = None
    blobs: tuple[tuple[str, bytes], ...] = ()
    nodes: tuple[SessionNode, ...] = ()
    replace_graph: bool = False
    usage: tuple[UsageEntry, ...] = ()
    #: The batches delivered: each leaves the queue for the session's deliveries.
    deliveries: tuple[DeliveryRow, ...] = ()
    attachment_ids: tuple[str, ...] = ()
    stamp: TurnStampRow | None = None


def check_commit(
    commit: RuntimeCommit,
    *,
    bound_session: str | None,
    head: HeadRow | None,
    lease: LeaseRow,
    stamp: TurnStampRow | None,
    claimed: Sequence[Sequence[QueuedBatchRow | None]],
    now_ms: int,
) -> CommitPlan:
    """Decide a commit (see the module docstring for the order of checks).

    ``claimed`` holds, per completed claim, the stored rows of its batch ids (None: gone);
    every one must still be owned by its claim, taken under the commit's own lease grant.

    Raises:
        SessionBindingMismatch, RuntimeTurnCommitConflict, SessionExecutionLeaseExpired,
        HeadRevisionConflict, QueuedWorkClaimExpired: see above; nothing may be written.
    """
    if bound_session is not None and commit.session_id != bound_session:
        raise SessionBindingMismatch(bound_session, commit.session_id)
    released = None if commit.release is None else release_lease(lease, commit.release)
    if commit.turn_commit is not None and stamp is not None:
        if stamp.turn_commit_hash != commit.turn_commit.turn_commit_hash:
            raise RuntimeTurnCommitConflict(commit.session_id, commit.turn_commit.turn_id)
        result = CommitResult(
            head_revision=stamp.head_revision, checkpoint_ref=stamp.checkpoint_ref
        )
        return CommitPlan(result=result, replay=True, lease=released)
    if commit.lease is None:
        raise SessionExecutionLeaseExpired(commit.session_id)
    check_fence(lease, commit.lease, now_ms=now_ms)
    actual = 0 if head is None else head.head_revision
    expected = commit.expected_head_revision
    if expected is not None and expected != actual:
        raise HeadRevisionConflict(expected, actual)
    for completion, rows in zip(commit.completed_claims, claimed, strict=True):
        check_completion(rows, completion, commit.lease.fencing_token)
    blobs, checkpoint_ref, state = _head_state(commit, head)
    revision = actual + 1
    result = CommitResult(head_revision=revision, checkpoint_ref=checkpoint_ref)
    graph = commit.graph
    stamp_row = None
    if commit.turn_commit is not None:
        stamp_row = TurnStampRow(
            session_id=commit.session_id,
            turn_id=commit.turn_commit.turn_id,
            turn_commit_hash=commit.turn_commit.turn_commit_hash,
            head_revision=revision,
            checkpoint_ref=checkpoint_ref,
        )
    return CommitPlan(
        result=result,
        replay=False,
        lease=released,
        head=HeadRow(session_id=commit.session_id, head_revision=revision, state=state),
        blobs=blobs,
        nodes=getattr(graph, "nodes", ()),
        replace_graph=isinstance(graph, GraphReplace),
        usage=commit.usage,
        deliveries=tuple(
            deliver_row(
                row,
                turn_id=None if commit.turn_commit is None else commit.turn_commit.turn_id,
                head_revision=revision,
                outcome=None
                if commit.outcome is None
                else encode_json(commit.outcome, limit=1 << 62),
                now_ms=now_ms,
            )
            for rows in claimed
            for row in rows
            if row is not None  # check_completion saw every one
        ),
        attachment_ids=commit.committed_attachment_ids,
        stamp=stamp_row,
    )


def _head_state(
    commit: RuntimeCommit, head: HeadRow | None
) -> tuple[tuple[tuple[str, bytes], ...], str, str]:
    """The blobs to store, the checkpoint ref, and the head state JSON of a commit."""
    blobs: dict[str, bytes] = {}

    def put(content: bytes | None) -> str | None:
        if content is None:
            return None
        ref = blob_ref(content)
        blobs[ref] = content
        return ref

    checkpoint = commit.checkpoint
    manifest = encode_json(
        {
            "turn_state": checkpoint.turn_state,
            "tool_state": put(checkpoint.tool_state),
            "plugin_snapshot": put(checkpoint.plugin_snapshot),
            "plugin_snapshot_revision": checkpoint.plugin_snapshot_revision,
            "execution_state": put(checkpoint.execution_state),
            "frames": {f.frame_id: put(f.execution_snapshot) for f in commit.agent_frames},
        },
        limit=1 << 62,
    ).encode()
    checkpoint_ref = put(manifest)
    assert checkpoint_ref is not None
    graph = commit.graph
    leaf = graph.leaf
    if leaf is None and not isinstance(graph, GraphReplace):
        if isinstance(graph, GraphAppend) and graph.nodes:
            leaf = graph.nodes[-1].node_id
        elif head is not None:
            leaf = _head_fields(head)["leaf"]
    state = encode_json(
        {
            "config": commit.config,
            "frames": [
                {k: v for k, v in _frame_json(f).items() if k != "execution_snapshot"}
                for f in commit.agent_frames
            ],
            "current_agent_frame_id": commit.current_agent_frame_id,
            "leaf": leaf,
            "checkpoint_ref": checkpoint_ref,
        },
        limit=1 << 62,
    )
    return tuple(blobs.items()), checkpoint_ref, state


def manifest_children(manifest: bytes) -> list[str]:
    """The blob refs a checkpoint manifest names.

    Raises:
        ValueError: not a manifest (GC then keeps everything).
    """
    body = decode_json(manifest.decode())
    if not isinstance(body, dict) or "frames" not in body:
        raise ValueError("not a checkpoint manifest")
    refs = [body.get(k) for k in ("tool_state", "plugin_snapshot", "execution_state")]
    frames = body["frames"]
    if not isinstance(frames, dict):
        raise ValueError("bad frames in manifest")
    refs.extend(frames.values())
    return [r for r in refs if isinstance(r, str)]


def _head_fields(head: HeadRow) -> dict[str, Any]:
    body = decode_json(head.state)
    if not isinstance(body, dict):
        raise ValueError("head state is not an object")
    return body


def build_read(
    head: HeadRow,
    nodes: Sequence[SessionNode],
    usage: Sequence[UsageEntry],
    blobs: dict[str, bytes],
    scope: ReadScope,
) -> SessionRead:
    """Assemble a :class:`SessionRead` from stored parts (``nodes``: live ones, in order;
    ``blobs``: the checkpoint manifest and its children by ref).

    Raises:
        ValueError, KeyError: the stored state is damaged (stores report CorruptRecordError).
    """
    state = _head_fields(head)
    ref = state["checkpoint_ref"]
    manifest = decode_json(blobs[ref].decode())
    assert isinstance(manifest, dict)

    def blob(key: Any) -> bytes | None:
        return None if key is None else blobs[key]

    frame_refs = manifest["frames"]
    assert isinstance(frame_refs, dict)
    frames = tuple(
        AgentFrame(
            frame_id=f["frame_id"],
            parent_frame_id=f["parent_frame_id"],
            reason=f["reason"],
            data=f["data"],
            execution_snapshot=blob(frame_refs.get(f["frame_id"])),
        )
        for f in state["frames"]
    )
    checkpoint = Checkpoint(
        turn_state=manifest["turn_state"],
        tool_state=blob(manifest["tool_state"]),
        plugin_snapshot=blob(manifest["plugin_snapshot"]),
        plugin_snapshot_revision=manifest["plugin_snapshot_revision"],  # type: ignore[arg-type]
        execution_state=blob(manifest["execution_state"]),
    )
    leaf = state["leaf"]
    if isinstance(scope, ActivePath):
        if scope.leaf is not None:
            leaf = scope.leaf
        nodes = active_path(nodes, leaf)
    return SessionRead(
        session_id=head.session_id,
        head_revision=head.head_revision,
        config=state["config"],
        agent_frames=frames,
        current_agent_frame_id=state["current_agent_frame_id"],
        nodes=tuple(nodes),
        leaf_node_id=leaf,
        checkpoint=checkpoint,
        checkpoint_ref=ref,
        usage=tuple(usage),
    )


def node_to_json(node: SessionNode) -> str:
    """A node's stored form."""
    return encode_json(_node_json(node), limit=1 << 62)


def node_from_json(text: str) -> SessionNode:
    """Decode a stored node.

    Raises:
        ValueError, KeyError, TypeError: damaged (stores report CorruptRecordError).
    """
    body = decode_json(text)
    if not isinstance(body, dict):
        raise ValueError("node is not an object")
    return SessionNode(
        node_id=str(body["node_id"]),
        parent_node_id=body["parent_node_id"],  # type: ignore[arg-type]
        caused_by=body["caused_by"],  # type: ignore[arg-type]
        agent_frame_id=body["agent_frame_id"],  # type: ignore[arg-type]
        timestamp=str(body["timestamp"]),
        payload=body["payload"],
    )
