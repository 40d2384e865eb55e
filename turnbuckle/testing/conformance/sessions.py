"""Conformance scenarios for ``store.sessions``: what every store adapter must do for sessions.

Each scenario is a plain async function taking a :data:`StoreFactory`: ``make(**options)`` opens a
fresh, empty store (as an async context manager) with the given :func:`turnbuckle.open_store`
options (``clock``, ``ids``, ``max_payload_bytes``).

The first nineteen are the scenarios of lash-core's ``runtime_persistence`` suite (0.1.0-alpha.66),
with the reference's names, translated to turnbuckle's API:

- the reference store holds one session and binds to it on its first commit; here a
  :class:`~turnbuckle.adapters.sessions.SessionHandle` from ``store.sessions.bind()`` does that,
  while leases, queued work, metadata and attachments are addressed by session id;
- payloads (turn inputs, wakes, node events) are plain JSON, snapshots are bytes;
- a source key replayed with *different* content is refused (``QueuedWorkSourceKeyConflict``,
  naming the original batch) where the reference silently returns the original: the reference
  scenario replays the same work, and :func:`source_key_conflict_keeps_the_original` covers the
  difference;
- claims keep order across lease handovers (see :mod:`turnbuckle.sansio.queue`): a claim taken
  under a lease grant is void once a newer grant exists, and an idle claim starts from the head
  of the queue. Where a reference scenario took successive claims, each under a lease of its own,
  and expected each to take the work behind the last, here the claimed work is delivered (a
  commit completes it) before the next claim, or the next claim is a checkpoint claim by the same
  lease holder (scenario 11's "checkpoint claim after the head is leased");
- every turnbuckle store keeps an attachment manifest, so the reference's alternative for stores
  without one (``noop_attachment_manifest_is_explicit_and_empty``) is not ported;
- where the reference only says "expiry extended", a FakeClock is advanced so the scenario can
  check that it really was.

Two more reference scenarios need a store that can be reopened; they are in
:data:`SESSION_REOPEN_SCENARIOS`, where ``make`` opens the *same* store on every call. Beyond the
reference, :data:`SESSION_SCENARIOS` covers order across lease handovers, failed work that is
parked and resubmitted, deliveries that keep their outcome (and their source keys), and bad
input: stale and forged tokens, out-of-range numbers, unknown ids, conflicting source keys, bad
payloads, mistyped commit fields, bad read scopes and stale head revisions; each checks that
nothing was written.

Run them all with :func:`runtime_persistence` (and :func:`runtime_persistence_reopenable` for a
durable store), or one by one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import attrs

from turnbuckle.adapters.sessions import DurabilityTier, SessionHandle
from turnbuckle.adapters.store import Store
from turnbuckle.errors import (
    HeadRevisionConflict,
    InvalidArgument,
    PayloadNotSerializable,
    PayloadTooLarge,
    QueuedWorkClaimExpired,
    QueuedWorkSourceKeyConflict,
    RuntimeTurnCommitConflict,
    SessionBindingMismatch,
    SessionExecutionLeaseExpired,
    UnsupportedReadScope,
)
from turnbuckle.sansio.codec import JSON
from turnbuckle.sansio.lease import LeaseFence, SessionLease
from turnbuckle.sansio.queue import (
    ClaimBoundary,
    DeliveryPolicy,
    MergeKey,
    QueuedWorkBatch,
    QueuedWorkClaim,
    QueuedWorkDraft,
    SlotPolicy,
    WorkState,
)
from turnbuckle.sansio.session import (
    ActivePath,
    AgentFrame,
    AttachmentIntent,
    Checkpoint,
    CommitResult,
    FullGraph,
    GraphAppend,
    GraphReplace,
    GraphUnchanged,
    RuntimeCommit,
    SessionMeta,
    SessionNode,
    SessionRead,
    TokenUsage,
    TurnCommitStamp,
    UsageEntry,
    turn_commit_hash,
)
from turnbuckle.testing.conformance._check import raises as _raises
from turnbuckle.testing.conformance._check import raises_type as _raises_type
from turnbuckle.testing.conformance.tasks import StoreFactory
from turnbuckle.testing.fakes import FakeClock

__all__ = [
    "SESSION_REOPEN_SCENARIOS",
    "SESSION_SCENARIOS",
    "queued_turn_input_draft",
    "runtime_persistence",
    "runtime_persistence_reopenable",
]

Scenario = Callable[[StoreFactory], Awaitable[None]]

ESB = DeliveryPolicy.EARLIEST_SAFE_BOUNDARY
AFTER = DeliveryPolicy.AFTER_CURRENT_TURN_COMMIT
JOIN, EXCLUSIVE = SlotPolicy.JOIN, SlotPolicy.EXCLUSIVE
IDLE, CHECKPOINT = ClaimBoundary.IDLE, ClaimBoundary.ACTIVE_TURN_CHECKPOINT
TTL = 60_000
#: 2100-01-01T00:00:00Z: "not yet available" for any FakeClock these scenarios use.
FAR_FUTURE_MS = 4_102_444_800_000


# --- helpers ---------------------------------------------------------------------------------


def turn_input(text: str) -> JSON:
    """A queued turn input payload, shaped like the reference's ``TurnInput::text``."""
    return {"type": "turn_input", "input": {"items": [{"type": "text", "text": text}]}}


def queued_turn_input_draft(
    session_id: str,
    text: str,
    delivery: DeliveryPolicy,
    slot: SlotPolicy,
    *,
    source_key: str | None = None,
    merge_key: MergeKey = MergeKey.NEVER,
    available_at_ms: int = 0,
) -> QueuedWorkDraft:
    """A one-item queued turn input, as the reference's ``queued_turn_input_draft``."""
    return QueuedWorkDraft(
        session_id=session_id,
        delivery=delivery,
        slot=slot,
        payloads=_items(turn_input(text)),
        source_key=source_key,
        merge_key=merge_key,
        available_at_ms=available_at_ms,
    )


def batch_text(batch: QueuedWorkBatch) -> str | None:
    """The text of a batch's first turn-input item, or None (as the reference's helper)."""
    if not batch.items:
        return None
    payload = batch.items[0].payload
    if not isinstance(payload, dict) or payload.get("type") != "turn_input":
        return None
    inner = payload.get("input")
    items = inner.get("items") if isinstance(inner, dict) else None
    first = items[0] if isinstance(items, list) and items else None
    text = first.get("text") if isinstance(first, dict) else None
    return text if isinstance(text, str) else None


def _items(*items: object) -> Any:
    """``items`` for an attrs field declared with ``converter=tuple`` (payloads, nodes, frames,
    completed claims...). mypy's attrs plugin types such an argument as ``Iterable[_T_co]`` with
    the type variable unsolved, and refuses every list or tuple passed to it; hence Any."""
    return items


def _not_json() -> Any:
    """A value with no JSON form (typed Any, so it can go where JSON is expected)."""
    return {1, 2}


def _ids(batches: Sequence[QueuedWorkBatch]) -> list[str]:
    return [b.batch_id for b in batches]


def sample_node(node_id: str, parent: str | None) -> SessionNode:
    """A protocol-event node, as the reference's ``sample_session_node``."""
    return SessionNode(
        node_id=node_id,
        parent_node_id=parent,
        timestamp="1970-01-01T00:00:00Z",
        payload={"kind": "protocol", "event": "conformance", "data": {"node": node_id}},
    )


def state(session_id: str, turn_index: int = 0, **fields: Any) -> RuntimeCommit:
    """A commit of a default session state, as the reference's ``persisted_state``."""
    checkpoint = fields.pop("checkpoint", Checkpoint(turn_state={"turn_index": turn_index}))
    return RuntimeCommit(session_id=session_id, checkpoint=checkpoint, **fields)


def stamped(commit: RuntimeCommit, turn_id: str) -> RuntimeCommit:
    """``commit`` as the final commit of turn ``turn_id``, with its own hash."""
    stamp = TurnCommitStamp(
        session_id=commit.session_id, turn_id=turn_id, turn_commit_hash=turn_commit_hash(commit)
    )
    return attrs.evolve(commit, turn_commit=stamp)


def fenced(commit: RuntimeCommit, lease: SessionLease, *, release: bool = True) -> RuntimeCommit:
    """``commit`` under ``lease`` (and releasing it in the same transaction)."""
    return attrs.evolve(commit, lease=lease.fence(), release=lease.fence() if release else None)


async def _lease(store: Store, session_id: str, owner_id: str, ttl_ms: int = TTL) -> SessionLease:
    lease = await store.sessions.try_claim_lease(session_id, owner_id, ttl_ms)
    assert lease is not None, f"the lease of {session_id!r} should be free for {owner_id!r}"
    assert (lease.session_id, lease.owner_id) == (session_id, owner_id), lease
    return lease


async def _release(store: Store, lease: SessionLease) -> None:
    await store.sessions.release_lease(lease.fence())


async def _commit(
    store: Store, handle: SessionHandle, commit: RuntimeCommit, owner_id: str
) -> CommitResult:
    """Commit under a fresh lease that the commit releases (``commit_runtime_state_for_test``)."""
    lease = await _lease(store, commit.session_id, owner_id)
    return await handle.commit(fenced(commit, lease))


async def _claim(
    store: Store,
    session_id: str,
    owner_id: str,
    boundary: ClaimBoundary = IDLE,
    *,
    ttl_ms: int = TTL,
    max_batches: int = 10,
) -> QueuedWorkClaim | None:
    """Claim queued work under a session lease taken and released around the claim."""
    lease = await _lease(store, session_id, owner_id)
    try:
        return await store.sessions.claim_queued_work(
            session_id, lease.fence(), owner_id, boundary, ttl_ms, max_batches
        )
    finally:
        await _release(store, lease)


async def _hold(
    store: Store,
    session_id: str,
    owner_id: str,
    boundary: ClaimBoundary = IDLE,
    *,
    max_batches: int = 10,
) -> tuple[SessionLease, QueuedWorkClaim]:
    """Take the session's lease and claim its ready work, keeping the lease."""
    lease = await _lease(store, session_id, owner_id)
    claim = await store.sessions.claim_queued_work(
        session_id, lease.fence(), owner_id, boundary, TTL, max_batches
    )
    assert claim is not None, f"{session_id!r} should have ready queued work"
    return lease, claim


async def _deliver(store: Store, lease: SessionLease, *claims: QueuedWorkClaim) -> CommitResult:
    """Deliver ``claims`` with a commit under ``lease`` that releases it."""
    commit = state(lease.session_id, completed_claims=[c.completion() for c in claims])
    return await store.sessions.bind(lease.session_id).commit(fenced(commit, lease))


async def _claimed(
    store: Store,
    session_id: str,
    owner_id: str,
    boundary: ClaimBoundary = IDLE,
    *,
    ttl_ms: int = TTL,
    max_batches: int = 10,
) -> QueuedWorkClaim:
    claim = await _claim(
        store, session_id, owner_id, boundary, ttl_ms=ttl_ms, max_batches=max_batches
    )
    assert claim is not None, f"{session_id!r} should have ready queued work"
    return claim


async def _load(store: Store, session_id: str, scope: Any = None) -> SessionRead | None:
    return await store.sessions.bind(session_id).load(FullGraph() if scope is None else scope)


async def _loaded(store: Store, session_id: str, scope: Any = None) -> SessionRead:
    read = await _load(store, session_id, scope)
    assert read is not None, f"session {session_id!r} should have been committed"
    return read


async def _snapshot(store: Store, *session_ids: str) -> list[object]:
    """Everything a caller can read about some sessions (to check that nothing changed)."""
    seen: list[object] = [await store.sessions.list_uncommitted(2**62)]
    for session_id in session_ids:
        seen.append(await _load(store, session_id))
        seen.append(await store.sessions.list_queued_work(session_id))
        seen.append(await store.sessions.list_pending_queued_work(session_id))
        seen.append(await store.sessions.load_meta(session_id))
    return seen


async def _still_held(store: Store, lease: SessionLease) -> None:
    """``lease`` is still the live grant: nobody else gets it, and its holder can renew it."""
    other = await store.sessions.try_claim_lease(lease.session_id, "an-intruder", TTL)
    assert other is None, f"the lease of {lease.session_id!r} should still be held: {other!r}"
    renewed = await store.sessions.renew_lease(lease.fence(), TTL)
    assert (renewed.lease_token, renewed.fencing_token) == (lease.lease_token, lease.fencing_token)


class _Refusals:
    """Awaits calls that must raise ``expected`` (or a subclass), and reports every one that
    did not at once, rather than stopping at the first."""

    def __init__(self, expected: type[Exception]) -> None:
        self.expected = expected
        self.wrong: list[str] = []

    async def __call__(self, label: str, call: Awaitable[Any]) -> None:
        try:
            await call
        except self.expected:
            return
        except Exception as exc:
            self.wrong.append(f"{label}: raised {exc!r}")
        else:
            self.wrong.append(f"{label}: accepted")

    def check(self) -> None:
        assert not self.wrong, f"expected {self.expected.__name__} for:\n  " + "\n  ".join(
            self.wrong
        )


def _forged(fence: LeaseFence, **changes: Any) -> LeaseFence:
    return attrs.evolve(fence, **changes)


# --- the reference scenarios -----------------------------------------------------------------


async def runtime_persistence_reports_declared_durability(
    make: StoreFactory, *, durability_tier: DurabilityTier | None = None
) -> None:
    """The store declares its durability tier: ``"inline"`` (gone with the process) or
    ``"durable"``; pass ``durability_tier`` to pin the one it must declare. (The reopen suite
    also checks that a store whose data survives a reopen declares ``"durable"``.)"""
    async with make() as store:
        tier = store.sessions.durability_tier
        assert tier in ("inline", "durable"), tier
        if durability_tier is not None:
            assert tier == durability_tier, f"declared {tier!r}, expected {durability_tier!r}"
    async with make() as again:
        assert again.sessions.durability_tier == tier, "the tier is a property of the adapter"


async def commit_increments_head_and_round_trips_agent_frames(make: StoreFactory) -> None:
    """Each commit moves the head one revision; agent frames (a custom reason, a per-frame
    execution snapshot), the current frame, config and the checkpoint come back as committed."""
    async with make(clock=FakeClock()) as store:
        handle = store.sessions.bind()
        assignment: JSON = {"model": "gpt-5.4-mini", "max_context_tokens": 200_000}
        frames = (
            AgentFrame(frame_id="frame-1", reason="initial", data={"assignment": assignment}),
            AgentFrame(
                frame_id="frame-2",
                parent_frame_id="frame-1",
                reason="plan_mode",
                data={"assignment": assignment},
                execution_snapshot=b"frame-vm",
            ),
        )
        commit = state(
            "root",
            config={"model": "gpt-5.4-mini"},
            agent_frames=frames,
            current_agent_frame_id="frame-2",
            checkpoint=Checkpoint(execution_state=b"frame-vm"),
        )
        first = await _commit(store, handle, commit, "commit-round-trip")
        assert first.head_revision == 1
        read = await handle.load(FullGraph())
        assert read is not None
        assert read.session_id == "root"
        assert read.current_agent_frame_id == "frame-2"
        assert len(read.agent_frames) == 2
        current = next(f for f in read.agent_frames if f.frame_id == "frame-2")
        assert current.reason == "plan_mode"
        assert current.execution_snapshot == b"frame-vm"
        assert read.agent_frames == frames
        assert read.checkpoint.execution_state == b"frame-vm"
        assert read.config == {"model": "gpt-5.4-mini"}
        assert (read.head_revision, read.checkpoint_ref) == (
            first.head_revision,
            first.checkpoint_ref,
        )
        # The next commit replaces the frames and moves the head on by one.
        back = attrs.evolve(
            commit,
            agent_frames=_items(*frames[:1]),
            current_agent_frame_id="frame-1",
            checkpoint=Checkpoint(),
        )
        second = await _commit(store, handle, back, "commit-round-trip")
        assert second.head_revision == 2
        read = await handle.load(FullGraph())
        assert read is not None
        assert read.head_revision == 2
        assert (read.agent_frames, read.current_agent_frame_id) == (frames[:1], "frame-1")
        assert read.checkpoint == Checkpoint()


async def commit_rejects_a_different_session_id(make: StoreFactory) -> None:
    """The first commit binds a handle to its session; a commit for another session is
    SessionBindingMismatch and writes nothing (the lease it carried stays held)."""
    async with make() as store:
        handle = store.sessions.bind()
        assert handle.session_id is None
        await _raises(
            SessionExecutionLeaseExpired("alpha"), handle.commit(RuntimeCommit(session_id="alpha"))
        )
        assert handle.session_id is None, "a refused commit binds nothing"
        await _commit(store, handle, state("alpha"), "bind-alpha")
        assert handle.session_id == "alpha"
        beta = await _lease(store, "beta", "bind-beta")
        await _raises(
            SessionBindingMismatch("alpha", "beta"), handle.commit(fenced(state("beta"), beta))
        )
        assert handle.session_id == "alpha"
        assert await _load(store, "beta") is None
        await _still_held(store, beta)
        # A handle bound up front refuses other sessions the same way.
        bound = store.sessions.bind("beta")
        alpha = await _lease(store, "alpha", "bind-alpha")
        await _raises(
            SessionBindingMismatch("beta", "alpha"), bound.commit(fenced(state("alpha"), alpha))
        )
        assert (await _loaded(store, "alpha")).head_revision == 1
        result = await bound.commit(fenced(state("beta"), beta))
        assert result.head_revision == 1


async def load_hydrates_checkpoint_and_usage(make: StoreFactory) -> None:
    """A load returns the committed checkpoint snapshots (tool state, plugin snapshot and
    revision) and the token ledger."""
    async with make() as store:
        handle = store.sessions.bind()
        checkpoint = Checkpoint(
            turn_state={"turn_index": 0},
            tool_state=b'{"generation":9}',
            plugin_snapshot=b'{"plugins":{}}',
            plugin_snapshot_revision=12,
        )
        usage = UsageEntry(
            source="turn",
            model="mock-model",
            usage=TokenUsage(
                input_tokens=11, output_tokens=7, cached_input_tokens=3, reasoning_tokens=5
            ),
        )
        commit = state("hydrated", checkpoint=checkpoint, usage=[usage])
        await _commit(store, handle, commit, "hydrate")
        read = await handle.load(FullGraph())
        assert read is not None
        assert read.session_id == "hydrated"
        assert read.checkpoint.tool_state == b'{"generation":9}'
        assert read.checkpoint.plugin_snapshot_revision == 12
        assert read.checkpoint == checkpoint
        assert len(read.usage) == 1
        assert read.usage[0].usage.input_tokens == 11
        assert read.usage == (usage,)
        # The ledger accumulates across commits.
        await _commit(store, handle, commit, "hydrate")
        read = await handle.load(FullGraph())
        assert read is not None and read.usage == (usage, usage)


async def active_path_read_scope_selects_only_requested_ancestry(make: StoreFactory) -> None:
    """FullGraph returns every live node in insertion order; ActivePath() only the ancestry of
    the persisted leaf; ActivePath(leaf) only the ancestry of that leaf."""
    async with make() as store:
        handle = store.sessions.bind()
        nodes = [
            sample_node("root-node", None),
            sample_node("left-node", "root-node"),
            sample_node("left-leaf", "left-node"),
            sample_node("right-leaf", "root-node"),
        ]
        graph = GraphReplace(nodes=_items(*nodes), leaf="left-leaf")
        await _commit(store, handle, state("branchy", graph=graph), "active-path")
        full = await handle.load(FullGraph())
        assert full is not None
        assert [n.node_id for n in full.nodes] == [
            "root-node",
            "left-node",
            "left-leaf",
            "right-leaf",
        ], "FullGraph must retain every non-tombstoned branch"
        assert full.nodes == tuple(nodes)
        persisted = await handle.load(ActivePath())
        assert persisted is not None
        assert [n.node_id for n in persisted.nodes] == ["root-node", "left-node", "left-leaf"], (
            "ActivePath with no explicit leaf must use the persisted leaf and hide siblings"
        )
        assert persisted.leaf_node_id == "left-leaf"
        right = await handle.load(ActivePath(leaf="right-leaf"))
        assert right is not None
        assert [n.node_id for n in right.nodes] == ["root-node", "right-leaf"], (
            "ActivePath with an explicit leaf must select that ancestry, not the persisted leaf"
        )
        assert right.leaf_node_id == "right-leaf"


async def session_execution_lease_contract(make: StoreFactory) -> None:
    """Re-entry, exclusion, fenced renew and release, fencing tokens that only grow, ttl-0
    leases, commits and queue claims that need the live lease, and lease-free stamped replays."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        sessions = store.sessions
        first = await _lease(store, "root", "owner-a")
        clock.advance(1_000)
        reentered = await sessions.try_claim_lease("root", "owner-a", 120_000)
        assert reentered is not None, "the same owner may re-enter its live lease"
        assert reentered.lease_token == first.lease_token
        assert reentered.fencing_token == first.fencing_token
        assert reentered.expires_at_ms > first.expires_at_ms
        assert await sessions.try_claim_lease("root", "owner-b", TTL) is None, (
            "a live session execution lease must exclude concurrent owners"
        )
        clock.advance(1_000)
        renewed = await sessions.renew_lease(reentered.fence(), 120_000)
        assert renewed.lease_token == first.lease_token
        assert renewed.expires_at_ms > reentered.expires_at_ms
        stale = _forged(reentered.fence(), lease_token=reentered.lease_token + ":stale")
        await _raises(SessionExecutionLeaseExpired("root"), sessions.renew_lease(stale, TTL))
        await sessions.release_lease(stale)  # fenced and idempotent: a no-op
        assert await sessions.try_claim_lease("root", "owner-b", TTL) is None, (
            "a stale release must not clear the live lease"
        )
        await _release(store, renewed)
        second = await _lease(store, "root", "owner-b")
        assert second.fencing_token > first.fencing_token, "a reclaim advances the fencing token"
        await sessions.release_lease(first.fence())  # an old release is idempotent
        assert await sessions.try_claim_lease("root", "owner-c", TTL) is None, (
            "an old release must not clear a newer lease"
        )
        await _release(store, second)
        expired = await _lease(store, "root", "owner-expired", 0)  # expired at once
        reclaimed = await _lease(store, "root", "owner-reclaim")
        assert reclaimed.fencing_token > expired.fencing_token
        await _release(store, reclaimed)

        handle = store.sessions.bind()
        await _raises(
            SessionExecutionLeaseExpired("root"),
            handle.commit(state("root")),
        )
        assert await _load(store, "root") is None
        commit_lease = await _lease(store, "root", "commit-owner")
        await handle.commit(fenced(state("root"), commit_lease))
        after_commit = await _lease(store, "root", "after-commit")  # the commit released it
        await _release(store, after_commit)

        turn_commit = stamped(state("root", turn_index=1), "lease-replay-turn")
        turn_lease = await _lease(store, "root", "turn-owner")
        first_result = await handle.commit(fenced(turn_commit, turn_lease))
        replay = await handle.commit(turn_commit)
        assert replay == first_result, "a stamped replay returns without a live lease"

        batch = await sessions.enqueue(
            queued_turn_input_draft("root", "fenced queue", ESB, EXCLUSIVE)
        )
        await _raises(
            SessionExecutionLeaseExpired("root"),
            sessions.claim_queued_work("root", commit_lease.fence(), "queue-owner", IDLE, TTL, 1),
        )
        assert _ids(await sessions.list_pending_queued_work("root")) == [batch.batch_id]
        queue_lease = await _lease(store, "root", "queue-owner")
        claim = await sessions.claim_queued_work(
            "root", queue_lease.fence(), "queue-owner", IDLE, TTL, 1
        )
        assert claim is not None
        assert _ids(claim.batches) == [batch.batch_id]
        await _release(store, queue_lease)


async def attachment_manifest_records_intent_and_commit_stamps(make: StoreFactory) -> None:
    """Intents are listed until committed, out of band or by a runtime commit; the one left
    has no commit time, and forget removes it."""
    async with make() as store:
        sessions = store.sessions
        for attachment_id in ("runtime-commit", "manual-commit", "orphan"):
            await sessions.record_intent(
                AttachmentIntent(
                    attachment_id=attachment_id,
                    session_id="root",
                    canonical_uri=f"sha256:{attachment_id}",
                    intent_at_ms=100,
                )
            )
        uncommitted = await sessions.list_uncommitted(200)
        assert sorted(e.attachment_id for e in uncommitted) == [
            "manual-commit",
            "orphan",
            "runtime-commit",
        ]
        assert await sessions.list_uncommitted(100) == [], "only intents older than the bound"
        await sessions.commit_refs("root", ["manual-commit"])
        handle = sessions.bind()
        commit = state("root", committed_attachment_ids=["runtime-commit"])
        await _commit(store, handle, commit, "attachment-manifest")
        still = await sessions.list_uncommitted(200)
        assert [e.attachment_id for e in still] == ["orphan"]
        assert still[0].committed_at_ms is None
        assert (still[0].session_id, still[0].canonical_uri) == ("root", "sha256:orphan")
        assert still[0].intent_at_ms == 100
        assert await sessions.forget("orphan") is True
        assert await sessions.list_uncommitted(200) == []
        assert await sessions.forget("orphan") is False
        # A session commits only its own attachments, never another session's by id.
        foreign = AttachmentIntent(
            attachment_id="theirs", session_id="other", canonical_uri="u", intent_at_ms=1
        )
        await sessions.record_intent(foreign)
        await sessions.commit_refs("root", ["theirs"])
        assert [e.attachment_id for e in await sessions.list_uncommitted(200)] == ["theirs"]


async def queued_work_source_keys_are_idempotent_and_list_ordered(make: StoreFactory) -> None:
    """Enqueueing a source key again returns the original batch (ids and payload); listings
    are per session, in enqueue order."""
    async with make() as store:
        sessions = store.sessions
        first_draft = queued_turn_input_draft("root", "first", ESB, JOIN, source_key="source:first")
        first = await sessions.enqueue(first_draft)
        replay = await sessions.enqueue(first_draft)
        second = await sessions.enqueue(queued_turn_input_draft("root", "second", ESB, EXCLUSIVE))
        await sessions.enqueue(queued_turn_input_draft("other", "other session", ESB, EXCLUSIVE))
        assert first.batch_id == replay.batch_id, "a replayed source key returns the original"
        assert first.items[0].item_id == replay.items[0].item_id
        assert batch_text(replay) == "first"
        assert replay == first
        listed = await sessions.list_queued_work("root")
        assert _ids(listed) == [first.batch_id, second.batch_id]
        assert listed[0].enqueue_seq < listed[1].enqueue_seq
        assert listed == [first, second]
        assert [batch_text(b) for b in await sessions.list_queued_work("other")] == [
            "other session"
        ]


async def queued_work_cancel_removes_only_unclaimed_batches(make: StoreFactory) -> None:
    """Unclaimed batches cancel; a claimed batch is kept durably but hidden from the pending
    list and cannot be cancelled; once abandoned it is pending and cancellable again."""
    async with make() as store:
        sessions = store.sessions
        cancellable = await sessions.enqueue(
            queued_turn_input_draft("root", "cancel me", AFTER, EXCLUSIVE)
        )
        cancelled = await sessions.cancel_queued_work("root", cancellable.batch_id)
        assert cancelled is not None
        assert cancelled.batch_id == cancellable.batch_id
        assert batch_text(cancelled) == "cancel me"
        assert await sessions.list_queued_work("root") == []
        assert await sessions.cancel_queued_work("root", cancellable.batch_id) is None
        claimed = await sessions.enqueue(
            queued_turn_input_draft("root", "claimed", AFTER, EXCLUSIVE)
        )
        claim = await _claimed(store, "root", "owner", max_batches=1)
        assert _ids(claim.batches) == [claimed.batch_id]
        assert await sessions.list_pending_queued_work("root") == [], (
            "active claims must disappear from user-editable queue snapshots"
        )
        assert _ids(await sessions.list_queued_work("root")) == [claimed.batch_id], (
            "claimed batches remain durable until their claim is completed"
        )
        assert await sessions.cancel_queued_work("root", claimed.batch_id) is None, (
            "actively claimed batches must not be cancelled"
        )
        await sessions.abandon_queued_work_claim(claim)
        assert _ids(await sessions.list_pending_queued_work("root")) == [claimed.batch_id]
        again = await sessions.cancel_queued_work("root", claimed.batch_id)
        assert again is not None and again.batch_id == claimed.batch_id
        assert await sessions.list_queued_work("root") == []


async def queued_work_exact_claim_uses_selected_batch_ids(make: StoreFactory) -> None:
    """A by-ids claim that would skip earlier work claims nothing; naming the head works."""
    async with make() as store:
        sessions = store.sessions
        first = await sessions.enqueue(queued_turn_input_draft("root", "first", AFTER, EXCLUSIVE))
        second = await sessions.enqueue(queued_turn_input_draft("root", "second", AFTER, EXCLUSIVE))
        lease = await _lease(store, "root", "owner")
        skipped = await sessions.claim_queued_work_by_ids(
            "root", lease.fence(), "owner", IDLE, TTL, [second.batch_id]
        )
        assert skipped is None, "exact claims must not skip earlier durable queue work"
        await _release(store, lease)
        assert _ids(await sessions.list_pending_queued_work("root")) == [
            first.batch_id,
            second.batch_id,
        ]
        lease = await _lease(store, "root", "owner")
        claim = await sessions.claim_queued_work_by_ids(
            "root", lease.fence(), "owner", IDLE, TTL, [first.batch_id]
        )
        await _release(store, lease)
        assert claim is not None
        assert _ids(claim.batches) == [first.batch_id]
        assert _ids(await sessions.list_pending_queued_work("root")) == [second.batch_id]


async def queued_work_claims_respect_boundaries_renewal_and_abandon(make: StoreFactory) -> None:
    """After-commit work at the head blocks checkpoint claims; an idle claim takes it; a
    reclaim after abandon has a higher fencing token; renew keeps the claim and extends it."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        sessions = store.sessions
        after_commit = await sessions.enqueue(
            queued_turn_input_draft("root", "after current commit", AFTER, EXCLUSIVE)
        )
        earliest = await sessions.enqueue(
            queued_turn_input_draft("root", "earliest", ESB, EXCLUSIVE)
        )
        assert await _claim(store, "root", "owner-a", CHECKPOINT) is None, (
            "after-current-commit work at the queue head must wait for the idle boundary"
        )
        lease, idle_claim = await _hold(store, "root", "owner-a", IDLE)
        assert _ids(idle_claim.batches) == [after_commit.batch_id]
        # The holder's own turn has the head: its checkpoint takes the work behind it.
        checkpoint_claim = await sessions.claim_queued_work(
            "root", lease.fence(), "owner-a", CHECKPOINT, TTL, 10
        )
        assert checkpoint_claim is not None, "checkpoint claim after head is leased"
        assert _ids(checkpoint_claim.batches) == [earliest.batch_id]
        await _release(store, lease)
        await sessions.abandon_queued_work_claim(idle_claim)
        reclaimed = await _claimed(store, "root", "owner-c", IDLE)
        assert _ids(reclaimed.batches) == [after_commit.batch_id]
        assert reclaimed.fencing_token > idle_claim.fencing_token, (
            "reclaiming abandoned work must advance the fencing token"
        )
        clock.advance(1_000)
        renewed = await sessions.renew_queued_work_claim(reclaimed, TTL)
        assert renewed.claim_id == reclaimed.claim_id
        assert renewed.lease_token == reclaimed.lease_token
        assert _ids(renewed.batches) == _ids(reclaimed.batches)
        assert renewed.expires_at_ms > reclaimed.expires_at_ms
        # The abandoned claim can neither renew nor complete any more.
        await _raises(
            QueuedWorkClaimExpired("root", idle_claim.claim_id),
            sessions.renew_queued_work_claim(idle_claim, TTL),
        )


async def queued_work_respects_availability_limits_exclusivity_reclaim_and_sessions(
    make: StoreFactory,
) -> None:
    """Work not yet available is skipped; an exclusive batch is claimed alone; sessions are
    isolated; a ttl-0 claim can be reclaimed with a higher fencing token; max_batches caps a
    join group."""
    async with make(clock=FakeClock()) as store:
        sessions = store.sessions
        await sessions.enqueue(
            queued_turn_input_draft(
                "root", "not ready", ESB, EXCLUSIVE, available_at_ms=FAR_FUTURE_MS
            )
        )
        exclusive = await sessions.enqueue(
            queued_turn_input_draft("root", "exclusive", ESB, EXCLUSIVE)
        )
        joined = await sessions.enqueue(
            queued_turn_input_draft("root", "joined", ESB, JOIN, merge_key=MergeKey.group("root"))
        )
        other = await sessions.enqueue(
            queued_turn_input_draft("other", "other session", ESB, EXCLUSIVE)
        )
        lease, claim = await _hold(store, "root", "owner-a")
        assert _ids(claim.batches) == [exclusive.batch_id], (
            "an exclusive batch must claim alone and unavailable earlier work must be skipped"
        )
        await _deliver(store, lease, claim)
        lease, next_root = await _hold(store, "root", "owner-b")
        assert _ids(next_root.batches) == [joined.batch_id]
        await _deliver(store, lease, next_root)
        assert await _claim(store, "root", "owner-b") is None, "only unavailable work is left"
        other_claim = await _claimed(store, "other", "owner-c")
        assert _ids(other_claim.batches) == [other.batch_id], (
            "claiming one session must not consume queued work from another session"
        )

        source = await sessions.enqueue(
            queued_turn_input_draft("reclaim", "expired claim", ESB, EXCLUSIVE)
        )
        expired = await _claimed(store, "reclaim", "owner-a", ttl_ms=0, max_batches=1)
        assert await sessions.list_pending_queued_work("reclaim") == [source], (
            "an expired claim no longer holds its work"
        )
        reclaimed = await _claimed(store, "reclaim", "owner-b", max_batches=1)
        assert _ids(reclaimed.batches) == [source.batch_id]
        assert reclaimed.fencing_token > expired.fencing_token, (
            "reclaiming an expired queued-work claim must bump the fencing token"
        )

        limited = [
            await sessions.enqueue(
                queued_turn_input_draft(
                    "limited", text, ESB, JOIN, merge_key=MergeKey.group("limited")
                )
            )
            for text in ("one", "two", "three")
        ]
        lease, capped = await _hold(store, "limited", "owner", max_batches=2)
        assert _ids(capped.batches) == _ids(limited[:2]), "max_batches must cap a join claim"
        await _deliver(store, lease, capped)
        remaining = await _claimed(store, "limited", "owner-next")
        assert _ids(remaining.batches) == [limited[2].batch_id]


async def queued_work_join_groups_by_delivery_policy_and_merge_key(make: StoreFactory) -> None:
    """Only adjacent join batches with the same delivery policy and merge key are grouped."""
    async with make() as store:
        sessions = store.sessions

        async def join(text: str, delivery: DeliveryPolicy, group: str) -> QueuedWorkBatch:
            draft = queued_turn_input_draft(
                "root", text, delivery, JOIN, merge_key=MergeKey.group(group)
            )
            return await sessions.enqueue(draft)

        first = await join("group a one", ESB, "a")
        second = await join("group a two", ESB, "a")
        different_merge = await join("group b", ESB, "b")
        different_delivery = await join("after commit", AFTER, "a")
        lease, first_claim = await _hold(store, "root", "owner-a")
        assert _ids(first_claim.batches) == [first.batch_id, second.batch_id], (
            "join claims must group only adjacent batches with the same delivery and merge key"
        )
        await _deliver(store, lease, first_claim)
        lease, second_claim = await _hold(store, "root", "owner-b")
        assert _ids(second_claim.batches) == [different_merge.batch_id]
        await _deliver(store, lease, second_claim)
        third_claim = await _claimed(store, "root", "owner-c")
        assert _ids(third_claim.batches) == [different_delivery.batch_id]


async def queued_work_completion_is_lease_guarded(make: StoreFactory) -> None:
    """A commit presenting a stale claim token is QueuedWorkClaimExpired and keeps the queue
    (and writes nothing); a valid completion deletes every batch of the claim."""
    async with make() as store:
        sessions = store.sessions
        group = MergeKey.group("joined")
        first = await sessions.enqueue(
            queued_turn_input_draft("root", "join one", ESB, JOIN, merge_key=group)
        )
        second = await sessions.enqueue(
            queued_turn_input_draft("root", "join two", ESB, JOIN, merge_key=group)
        )
        lease = await _lease(store, "root", "owner-a")
        claim = await sessions.claim_queued_work("root", lease.fence(), "owner-a", IDLE, TTL, 10)
        assert claim is not None
        assert _ids(claim.batches) == [first.batch_id, second.batch_id]
        stale = attrs.evolve(claim.completion(), lease_token=claim.lease_token + ":stale")
        handle = sessions.bind("root")
        await _raises(
            QueuedWorkClaimExpired("root", claim.claim_id),
            handle.commit(
                attrs.evolve(state("root"), lease=lease.fence(), completed_claims=_items(stale))
            ),
        )
        assert len(await sessions.list_queued_work("root")) == 2
        assert await handle.load() is None
        await handle.commit(fenced(state("root", completed_claims=[claim.completion()]), lease))
        assert await sessions.list_queued_work("root") == []


async def queued_wake_delivery_is_source_key_idempotent_and_claimed_once(
    make: StoreFactory,
) -> None:
    """A replayed process wake is deduplicated by its source key, claimed once, and removed
    exactly once by the commit that delivers it."""
    async with make() as store:
        sessions = store.sessions
        wake: JSON = {
            "type": "process_wake",
            "wake_id": "wake-1",
            "target_session_id": "root",
            "target_scope_id": "session:root",
            "process_id": "process-1",
            "sequence": 7,
            "event_type": "process.wake",
            "dedupe_key": "wake-dedupe-1",
            "input": "wake payload",
            "created_at_ms": 1,
        }
        draft = QueuedWorkDraft(
            session_id="root",
            delivery=ESB,
            slot=EXCLUSIVE,
            payloads=_items(wake),
            source_key="process:process-1:event:7:wake",
        )
        first = await sessions.enqueue(draft)
        replay = await sessions.enqueue(draft)
        assert first.batch_id == replay.batch_id, "a wake replay returns the original batch"
        assert len(await sessions.list_queued_work("root")) == 1, "no second delivery"
        lease = await _lease(store, "root", "wake-owner")
        claim = await sessions.claim_queued_work("root", lease.fence(), "wake-owner", IDLE, TTL, 10)
        assert claim is not None
        assert len(claim.batches) == 1
        assert len(claim.batches[0].items) == 1
        assert claim.batches[0].items[0].payload == wake
        assert (
            await sessions.claim_queued_work(
                "root", lease.fence(), "wake-owner", CHECKPOINT, TTL, 10
            )
            is None
        ), "a claimed wake is not claimed twice"
        handle = sessions.bind()
        await handle.commit(fenced(state("root", completed_claims=[claim.completion()]), lease))
        assert await sessions.list_queued_work("root") == [], "delivered exactly once"
        again = await sessions.enqueue(draft)
        assert again.batch_id == first.batch_id, "a replay after delivery is still the original"
        assert await sessions.list_queued_work("root") == [], "and is not delivered again"


async def queue_completion_and_turn_commit_stamp_are_atomic(make: StoreFactory) -> None:
    """A stale queue completion refuses the whole final commit (no session, no stamp, queue
    kept, lease kept); a valid one commits everything; a stamped retry returns the same
    result."""
    async with make() as store:
        sessions = store.sessions
        batch = await sessions.enqueue(
            queued_turn_input_draft("root", "atomic queue", ESB, EXCLUSIVE)
        )
        lease = await _lease(store, "root", "queue-owner")
        claim = await sessions.claim_queued_work("root", lease.fence(), "queue-owner", IDLE, TTL, 1)
        assert claim is not None
        assert _ids(claim.batches) == [batch.batch_id]
        base = state("root", turn_index=41)
        commit_hash = turn_commit_hash(base)
        stamp = TurnCommitStamp(
            session_id="root", turn_id="turn-atomic", turn_commit_hash=commit_hash
        )
        stale = attrs.evolve(claim.completion(), lease_token=claim.lease_token + ":stale")
        handle = sessions.bind("root")
        await _raises(
            QueuedWorkClaimExpired("root", claim.claim_id),
            handle.commit(
                attrs.evolve(
                    base, lease=lease.fence(), turn_commit=stamp, completed_claims=_items(stale)
                )
            ),
        )
        assert await handle.load() is None, "a refused queue completion persists no session"
        assert _ids(await sessions.list_queued_work("root")) == [batch.batch_id]
        final = attrs.evolve(base, turn_commit=stamp, completed_claims=_items(claim.completion()))
        first = await handle.commit(fenced(final, lease))
        assert first.head_revision == 1, "the refused commit must not have recorded its stamp"
        retry_stamp = TurnCommitStamp(
            session_id="root", turn_id="turn-atomic", turn_commit_hash=commit_hash
        )
        retry = await handle.commit(fenced(attrs.evolve(final, turn_commit=retry_stamp), lease))
        assert retry.head_revision == first.head_revision
        assert retry.checkpoint_ref == first.checkpoint_ref
        read = await handle.load()
        assert read is not None and read.head_revision == 1
        assert await sessions.list_queued_work("root") == []
        await _release(store, await _lease(store, "root", "next-owner"))


async def session_metadata_round_trips(make: StoreFactory) -> None:
    """Every field of SessionMeta round-trips; saving again replaces it."""
    async with make() as store:
        meta = SessionMeta(
            session_id="root",
            session_name="Conformance Root",
            created_at="2026-06-02T00:00:00Z",
            model="gpt-5.4-mini",
            cwd="/tmp/lash-conformance",
            relation={"kind": "root"},
        )
        assert await store.sessions.load_meta("root") is None
        await store.sessions.save_meta(meta)
        loaded = await store.sessions.load_meta("root")
        assert loaded is not None
        assert loaded.session_id == meta.session_id
        assert loaded.session_name == meta.session_name
        assert loaded.created_at == meta.created_at
        assert loaded.model == meta.model
        assert loaded.cwd == meta.cwd
        assert loaded.relation == meta.relation
        assert loaded == meta
        renamed = attrs.evolve(meta, session_name="Renamed", cwd=None)
        await store.sessions.save_meta(renamed)
        assert await store.sessions.load_meta("root") == renamed
        assert await store.sessions.load_meta("other") is None


async def tombstone_vacuum_and_gc_are_minimally_consistent(make: StoreFactory) -> None:
    """Tombstoned nodes are hidden from load_node and graph loads; vacuum reports only the rows
    it removed; gc_unreachable keeps everything the head reaches."""
    async with make() as store:
        sessions = store.sessions
        handle = sessions.bind()
        graph = GraphReplace(
            nodes=_items(sample_node("node-live", None), sample_node("node-delete", "node-live")),
            leaf="node-delete",
        )
        old = Checkpoint(tool_state=b"old tool state")
        await _commit(store, handle, state("root", graph=graph, checkpoint=old), "tombstone")
        assert await handle.load_node("node-delete") == sample_node("node-delete", "node-live")
        assert await handle.tombstone_nodes(["node-delete"]) == 1
        assert await handle.load_node("node-delete") is None, (
            "tombstoned nodes must be hidden from direct loads"
        )
        read = await handle.load(FullGraph())
        assert read is not None
        assert [n.node_id for n in read.nodes] == ["node-live"], (
            "tombstoned nodes must be hidden from session graph loads"
        )
        vacuum = await sessions.vacuum()
        assert vacuum.removed_node_count <= 1, f"vacuum reported {vacuum!r}"
        assert (await sessions.vacuum()).removed_node_count == 0, "nothing left to remove"
        assert await handle.load_node("node-delete") is None
        assert await handle.load_node("node-live") == sample_node("node-live", None)
        new = Checkpoint(tool_state=b"new tool state")
        latest = await _commit(store, handle, state("root", checkpoint=new), "tombstone")
        report = await sessions.gc_unreachable()
        assert report.root_count >= 1
        assert report.deleted_blob_count >= 1, "the first checkpoint is no longer reachable"
        again = await sessions.gc_unreachable()
        assert again.deleted_blob_count == 0, "a second GC finds nothing more"
        read = await handle.load(FullGraph())
        assert read is not None, "GC must keep everything the head reaches"
        assert read.checkpoint == new
        assert read.checkpoint_ref == latest.checkpoint_ref


async def final_commit_stamp_is_idempotent_and_conflicts_on_changed_hash(
    make: StoreFactory,
) -> None:
    """A stamped final commit replays without a lease and returns the same result; the hash
    ignores the expected revision and the lease; the same turn id with another hash is
    RuntimeTurnCommitConflict."""
    async with make() as store:
        handle = store.sessions.bind()
        commit = state("root")
        commit_hash = turn_commit_hash(commit)
        stamped_commit = stamped(commit, "provider-turn")
        lease = await _lease(store, "root", "provider-turn")
        first = await handle.commit(fenced(stamped_commit, lease))
        retry = await handle.commit(stamped_commit)
        assert retry.head_revision == first.head_revision
        assert retry.checkpoint_ref == first.checkpoint_ref
        retry_from_new_head = attrs.evolve(commit, expected_head_revision=first.head_revision)
        assert turn_commit_hash(retry_from_new_head) == commit_hash, (
            "turn commit identity must not depend on the optimistic CAS revision"
        )
        assert turn_commit_hash(fenced(commit, lease)) == commit_hash, "nor on the lease"
        changed = state("root", turn_index=1)
        await _raises(
            RuntimeTurnCommitConflict("root", "provider-turn"),
            handle.commit(stamped(changed, "provider-turn")),
        )
        read = await handle.load()
        assert read is not None and read.head_revision == first.head_revision


# --- reopen-only reference scenarios ---------------------------------------------------------


async def session_execution_lease_first_claim_excludes_concurrent_reopen_handles(
    make: StoreFactory,
) -> None:
    """Two handles on the same store race for a session's first lease: exactly one wins.
    ``make`` must open the same store on every call."""
    async with make() as open_, make() as reopen:
        results: dict[str, SessionLease | None] = {}

        async def race(store: Store, owner_id: str) -> None:
            results[owner_id] = await store.sessions.try_claim_lease(
                "first-claim-race", owner_id, TTL
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(race, open_, "owner-a")
            tg.start_soon(race, reopen, "owner-b")
        winners = [lease for lease in results.values() if lease is not None]
        assert len(winners) == 1, f"exactly one first claim may win: {results!r}"
        winner = winners[0]
        loser = "owner-b" if winner.owner_id == "owner-a" else "owner-a"
        for store in (open_, reopen):
            assert await store.sessions.try_claim_lease("first-claim-race", loser, TTL) is None
        await open_.sessions.release_lease(winner.fence())
        taken = await reopen.sessions.try_claim_lease("first-claim-race", loser, TTL)
        assert taken is not None and taken.fencing_token > winner.fencing_token
        await open_.sessions.release_lease(taken.fence())


async def runtime_persistence_survives_reopen(make: StoreFactory) -> None:
    """Metadata, the checkpoint, turn stamps, queued work, attachment intents and the lease
    (its holder and its fencing token) all survive closing and reopening the store, which
    declares itself durable. ``make`` must open the same store on every call."""
    clock = FakeClock()
    meta = SessionMeta(
        session_id="root",
        session_name="Durable Root",
        created_at="2026-06-02T00:00:00Z",
        model="gpt-5.4-mini",
        cwd="/tmp/lash-reopen",
        relation={"kind": "root"},
    )
    checkpoint = Checkpoint(turn_state={"turn_index": 3}, tool_state=b'{"generation":77}')
    final = stamped(state("root", checkpoint=checkpoint), "reopen-turn")
    draft = queued_turn_input_draft(
        "root", "survives reopen", ESB, EXCLUSIVE, source_key="reopen:queued"
    )
    intent = AttachmentIntent(
        attachment_id="reopen-attachment",
        session_id="root",
        canonical_uri="sha256:reopen-attachment",
        intent_at_ms=100,
    )
    async with make(clock=clock) as store:
        await store.sessions.save_meta(meta)
        result = await _commit(store, store.sessions.bind(), final, "reopen")
        queued = await store.sessions.enqueue(draft)
        await store.sessions.record_intent(intent)
        held = await _lease(store, "root", "holder")
    async with make(clock=clock) as store:
        assert store.sessions.durability_tier == "durable", "what survives reopen is durable"
        assert await store.sessions.load_meta("root") == meta
        handle = store.sessions.bind("root")
        read = await handle.load(FullGraph())
        assert read is not None
        assert read.session_id == "root"
        assert read.checkpoint == checkpoint
        assert (read.head_revision, read.checkpoint_ref) == (
            result.head_revision,
            result.checkpoint_ref,
        )
        assert await handle.commit(final) == result, "turn stamps survive: the replay is a no-op"
        queue = await store.sessions.list_queued_work("root")
        assert _ids(queue) == [queued.batch_id]
        assert batch_text(queue[0]) == "survives reopen"
        assert queue == [queued]
        assert await store.sessions.enqueue(draft) == queued, "source keys survive"
        intents = await store.sessions.list_uncommitted(200)
        assert any(e.attachment_id == "reopen-attachment" for e in intents), (
            "attachment intent rows must survive reopening a durable store"
        )
        await _still_held(store, held)
        await _release(store, held)
        after = await _lease(store, "root", "after-reopen")
        assert after.fencing_token > held.fencing_token, "fencing tokens survive reopen"
        await _release(store, after)


# --- bad input -------------------------------------------------------------------------------


async def stale_or_forged_lease_fences_write_nothing(make: StoreFactory) -> None:
    """Every fence that is not the session's live lease (forged token, owner or fencing token,
    another session's fence, a released or expired one) is SessionExecutionLeaseExpired on
    renew, queue claims and commits, a no-op on release, and writes nothing."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        sessions = store.sessions
        await sessions.enqueue(queued_turn_input_draft("root", "work", ESB, EXCLUSIVE))
        released = await _lease(store, "root", "gone")
        await _release(store, released)
        expired = await _lease(store, "root", "expired", 0)
        live = await _lease(store, "root", "owner")
        other = await _lease(store, "other", "owner")
        fence = live.fence()
        bad = [
            _forged(fence, lease_token=fence.lease_token + ":forged"),
            _forged(fence, lease_token=""),
            _forged(fence, owner_id="someone-else"),
            _forged(fence, fencing_token=fence.fencing_token + 1),
            _forged(fence, fencing_token=fence.fencing_token - 1),
            _forged(other.fence(), session_id="root"),
            released.fence(),
            expired.fence(),
        ]
        before = await _snapshot(store, "root", "other")
        handle = sessions.bind("root")
        for stale in bad:
            await _raises(SessionExecutionLeaseExpired("root"), sessions.renew_lease(stale, TTL))
            await _raises(
                SessionExecutionLeaseExpired("root"),
                sessions.claim_queued_work("root", stale, "owner", IDLE, TTL, 10),
            )
            await _raises(
                SessionExecutionLeaseExpired("root"),
                sessions.claim_queued_work_by_ids("root", stale, "owner", IDLE, TTL, ["qwb:x"]),
            )
            await _raises(
                SessionExecutionLeaseExpired("root"),
                handle.commit(attrs.evolve(state("root"), lease=stale, release=stale)),
            )
            await sessions.release_lease(stale)
        # Another session's genuine fence is not this session's.
        await _raises(
            SessionExecutionLeaseExpired("root"),
            sessions.claim_queued_work("root", other.fence(), "owner", IDLE, TTL, 10),
        )
        await _raises(
            SessionExecutionLeaseExpired("root"),
            handle.commit(attrs.evolve(state("root"), lease=other.fence())),
        )
        assert await _snapshot(store, "root", "other") == before
        await _still_held(store, live)
        await _still_held(store, other)
        # A lease that ran out while held is as dead as a forged one.
        clock.advance(TTL + 1)
        await _raises(SessionExecutionLeaseExpired("root"), sessions.renew_lease(live.fence(), TTL))
        await _raises(
            SessionExecutionLeaseExpired("root"), handle.commit(fenced(state("root"), live))
        )
        assert await _snapshot(store, "root") == before[:5]
        taken = await _lease(store, "root", "next")
        assert taken.fencing_token > live.fencing_token


async def stale_or_forged_queue_claims_write_nothing(make: StoreFactory) -> None:
    """A claim whose token is forged, that was abandoned, that expired and was reclaimed, or a
    completion naming batches it does not own, is QueuedWorkClaimExpired on renew and in a
    commit (which then writes nothing); abandoning it is a no-op."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        sessions = store.sessions
        first = await sessions.enqueue(queued_turn_input_draft("root", "first", ESB, EXCLUSIVE))
        second = await sessions.enqueue(queued_turn_input_draft("root", "second", ESB, EXCLUSIVE))
        lease, claim = await _hold(store, "root", "committer")
        assert _ids(claim.batches) == [first.batch_id]
        forged = attrs.evolve(claim, lease_token=claim.lease_token + ":forged")
        other_id = attrs.evolve(claim, claim_id=claim.claim_id + ":forged")
        expected = QueuedWorkClaimExpired("root", claim.claim_id)
        await _raises(expected, sessions.renew_queued_work_claim(forged, TTL))
        await _raises(
            QueuedWorkClaimExpired("root", other_id.claim_id),
            sessions.renew_queued_work_claim(other_id, TTL),
        )
        await sessions.abandon_queued_work_claim(forged)
        await sessions.abandon_queued_work_claim(other_id)
        assert _ids(await sessions.list_pending_queued_work("root")) == [second.batch_id], (
            "a forged abandon must not give back work someone else holds"
        )
        handle = sessions.bind("root")
        completion = claim.completion()
        bad_completions = [
            forged.completion(),
            other_id.completion(),
            attrs.evolve(completion, batch_ids=(first.batch_id, second.batch_id)),
            attrs.evolve(completion, batch_ids=(second.batch_id,)),
            attrs.evolve(completion, batch_ids=("qwb:unknown",)),
            attrs.evolve(completion, batch_ids=()),
        ]
        before = await _snapshot(store, "root")
        for bad in bad_completions:
            await _raises(
                QueuedWorkClaimExpired("root", bad.claim_id),
                handle.commit(fenced(state("root", completed_claims=[bad]), lease)),
            )
            # Valid and bad completions together: the bad one refuses the whole commit.
            await _raises(
                QueuedWorkClaimExpired("root", bad.claim_id),
                handle.commit(fenced(state("root", completed_claims=[completion, bad]), lease)),
            )
        assert await _snapshot(store, "root") == before
        await _still_held(store, lease)
        # An expired claim that someone else reclaimed is dead for its first holder.
        await sessions.abandon_queued_work_claim(claim)
        short = await sessions.claim_queued_work("root", lease.fence(), "owner", IDLE, 0, 1)
        assert short is not None and _ids(short.batches) == [first.batch_id]
        await _raises(
            QueuedWorkClaimExpired("root", short.claim_id),
            sessions.renew_queued_work_claim(short, TTL),
        )
        reclaim = await sessions.claim_queued_work("root", lease.fence(), "owner-2", IDLE, TTL, 1)
        assert reclaim is not None and _ids(reclaim.batches) == [first.batch_id]
        assert reclaim.fencing_token > short.fencing_token
        await _raises(
            QueuedWorkClaimExpired("root", short.claim_id),
            handle.commit(fenced(state("root", completed_claims=[short.completion()]), lease)),
        )
        await sessions.abandon_queued_work_claim(short)
        assert _ids(await sessions.list_pending_queued_work("root")) == [second.batch_id]
        assert await handle.load() is None
        result = await handle.commit(
            fenced(state("root", completed_claims=[reclaim.completion()]), lease)
        )
        assert result.head_revision == 1
        assert _ids(await sessions.list_queued_work("root")) == [second.batch_id]


async def out_of_range_numbers_are_invalid(make: StoreFactory) -> None:
    """Negative, non-int or 64-bit-overflowing ttls (and ttls past the longest allowed),
    revisions, fencing tokens, limits, token counts and instants are InvalidArgument, whatever
    the state of the queue, and nothing is written."""
    async with make(clock=FakeClock()) as store:
        sessions = store.sessions
        batch = await sessions.enqueue(queued_turn_input_draft("root", "work", ESB, EXCLUSIVE))
        lease = await _lease(store, "root", "owner")
        claim = await sessions.claim_queued_work("root", lease.fence(), "owner", IDLE, TTL, 1)
        assert claim is not None  # nothing else is ready: a bad claim has nothing to take
        handle = sessions.bind("root")
        before = await _snapshot(store, "root")
        bad_ints: list[Any] = [-1, 2**63, True, 1.5, "5"]
        fence = lease.fence()
        expect = _Refusals(InvalidArgument)
        for bad in [*bad_ints, 2**63 - 1, None]:
            await expect(f"try_claim_lease ttl={bad!r}", sessions.try_claim_lease("new", "o", bad))
            await expect(f"renew_lease ttl={bad!r}", sessions.renew_lease(fence, bad))
            await expect(
                f"claim_queued_work ttl={bad!r}",
                sessions.claim_queued_work("root", fence, "owner", IDLE, bad, 1),
            )
            await expect(
                f"claim_queued_work_by_ids ttl={bad!r}",
                sessions.claim_queued_work_by_ids(
                    "root", fence, "owner", IDLE, bad, [batch.batch_id]
                ),
            )
            await expect(
                f"renew_queued_work_claim ttl={bad!r}", sessions.renew_queued_work_claim(claim, bad)
            )
        for bad in [*bad_ints, None]:
            await expect(
                f"claim_queued_work max_batches={bad!r}",
                sessions.claim_queued_work("root", fence, "owner", IDLE, TTL, bad),
            )
            await expect(f"list_uncommitted {bad!r}", sessions.list_uncommitted(bad))
            forged = _forged(fence, fencing_token=bad)
            await expect(f"release_lease fencing_token={bad!r}", sessions.release_lease(forged))
            await expect(f"renew_lease fencing_token={bad!r}", sessions.renew_lease(forged, TTL))
            await expect(
                f"enqueue available_at_ms={bad!r}",
                sessions.enqueue(
                    queued_turn_input_draft("root", "late", ESB, EXCLUSIVE, available_at_ms=bad)
                ),
            )
            usage = UsageEntry(source="turn", model="m", usage=TokenUsage(input_tokens=bad))
            await expect(
                f"commit usage input_tokens={bad!r}",
                handle.commit(fenced(state("root", usage=[usage]), lease)),
            )
        for bad in bad_ints:  # None is valid here: it skips the check
            await expect(
                f"commit expected_head_revision={bad!r}",
                handle.commit(fenced(state("root", expected_head_revision=bad), lease)),
            )
        await expect(
            "claim_queued_work boundary='idle'",
            sessions.claim_queued_work("root", fence, "owner", "idle", TTL, 1),  # type: ignore[arg-type]
        )
        expect.check()
        assert await _snapshot(store, "root") == before
        assert await sessions.list_queued_work("new") == []
        fresh = await _lease(store, "new", "owner")
        assert fresh.fencing_token == 1, "no refused claim took the new session's lease"
        await _still_held(store, lease)
        renewed = await sessions.renew_queued_work_claim(claim, TTL)
        assert renewed.claim_id == claim.claim_id


async def unknown_batch_ids_claim_and_cancel_nothing(make: StoreFactory) -> None:
    """Claiming or cancelling batch ids that are unknown, another session's, or not the ready
    prefix claims and cancels nothing; an empty id list is InvalidArgument."""
    async with make() as store:
        sessions = store.sessions
        mine = await sessions.enqueue(queued_turn_input_draft("root", "mine", ESB, EXCLUSIVE))
        theirs = await sessions.enqueue(queued_turn_input_draft("other", "theirs", ESB, EXCLUSIVE))
        before = await _snapshot(store, "root", "other")
        lease = await _lease(store, "root", "owner")
        for batch_ids in (
            ["qwb:unknown"],
            [theirs.batch_id],
            [mine.batch_id, mine.batch_id],
            [mine.batch_id, "qwb:unknown"],
            ["qwb:unknown", mine.batch_id],
        ):
            claim = await sessions.claim_queued_work_by_ids(
                "root", lease.fence(), "owner", IDLE, TTL, batch_ids
            )
            assert claim is None, (batch_ids, claim)
        for batch_ids_arg in ([], "qwb:unknown", [7], None, 7):
            await _raises_type(
                InvalidArgument,
                sessions.claim_queued_work_by_ids(
                    "root",
                    lease.fence(),
                    "owner",
                    IDLE,
                    TTL,
                    batch_ids_arg,  # type: ignore[arg-type]
                ),
            )
        assert await sessions.cancel_queued_work("root", "qwb:unknown") is None
        assert await sessions.cancel_queued_work("root", theirs.batch_id) is None
        assert await sessions.cancel_queued_work("other", mine.batch_id) is None
        assert await _snapshot(store, "root", "other") == before
        claim = await sessions.claim_queued_work_by_ids(
            "root", lease.fence(), "owner", IDLE, TTL, [mine.batch_id]
        )
        assert claim is not None and _ids(claim.batches) == [mine.batch_id]


async def source_key_conflict_keeps_the_original(make: StoreFactory) -> None:
    """A source key enqueued again with different content (payload, policies, availability) is
    QueuedWorkSourceKeyConflict and writes nothing; the same content returns the original;
    source keys are per session."""
    async with make() as store:
        sessions = store.sessions
        draft = queued_turn_input_draft("root", "original", ESB, JOIN, source_key="k")
        original = await sessions.enqueue(draft)
        before = await _snapshot(store, "root")
        for changed in (
            attrs.evolve(draft, payloads=_items(turn_input("different"))),
            attrs.evolve(draft, payloads=_items(turn_input("original"), turn_input("more"))),
            attrs.evolve(draft, delivery=AFTER),
            attrs.evolve(draft, slot=EXCLUSIVE),
            attrs.evolve(draft, merge_key=MergeKey.group("g")),
            attrs.evolve(draft, available_at_ms=5),
        ):
            await _raises(
                QueuedWorkSourceKeyConflict("root", "k", original.batch_id),
                sessions.enqueue(changed),
            )
        assert await _snapshot(store, "root") == before
        assert await sessions.enqueue(draft) == original
        elsewhere = await sessions.enqueue(attrs.evolve(draft, session_id="other"))
        assert elsewhere.batch_id != original.batch_id
        assert _ids(await sessions.list_queued_work("root")) == [original.batch_id]


async def bad_payloads_write_nothing(make: StoreFactory) -> None:
    """Payloads that are not plain JSON are PayloadNotSerializable, oversize ones (and
    oversize text fields) PayloadTooLarge, in drafts, commits, metadata and intents; the store
    is unchanged after each, and a refused commit keeps its lease."""
    async with make(max_payload_bytes=1000) as store:
        sessions = store.sessions
        meta = SessionMeta(session_id="root", session_name="ok")
        await sessions.save_meta(meta)
        queued = await sessions.enqueue(queued_turn_input_draft("root", "ok", ESB, EXCLUSIVE))
        handle = sessions.bind("root")
        lease = await _lease(store, "root", "owner")
        before = await _snapshot(store, "root")
        not_json: list[Any] = [
            {1, 2},
            b"bytes",
            (1, 2),
            float("nan"),
            {"a": float("inf")},
            {1: "x"},
            {"a": object()},
            "\ud800",
        ]
        base = queued_turn_input_draft("root", "x", ESB, EXCLUSIVE)
        for value in not_json:
            await _raises_type(
                PayloadNotSerializable, sessions.enqueue(attrs.evolve(base, payloads=[value]))
            )
            for commit in (
                state(
                    "root",
                    graph=GraphReplace(nodes=_items(SessionNode(node_id="n", payload=value))),
                ),
                state("root", checkpoint=Checkpoint(turn_state=value)),
                state("root", config=value),
                state("root", agent_frames=[AgentFrame(frame_id="f", data=value)]),
            ):
                await _raises_type(
                    PayloadNotSerializable, handle.commit(fenced(commit, lease, release=False))
                )
            await _raises_type(
                PayloadNotSerializable, sessions.save_meta(attrs.evolve(meta, relation=value))
            )
        big = "x" * 100_000
        await _raises_type(
            PayloadTooLarge,
            sessions.enqueue(attrs.evolve(base, payloads=_items(turn_input(big[:2000])))),
        )
        await _raises_type(
            PayloadTooLarge, sessions.enqueue(attrs.evolve(base, source_key=big[:2000]))
        )
        await _raises_type(
            PayloadTooLarge, sessions.enqueue(attrs.evolve(base, session_id=big[:2000]))
        )
        await _raises_type(
            PayloadTooLarge,
            handle.commit(
                fenced(
                    state(
                        "root",
                        graph=GraphReplace(nodes=_items(SessionNode(node_id="n", payload=big))),
                    ),
                    lease,
                    release=False,
                )
            ),
        )
        await _raises_type(
            PayloadTooLarge,
            handle.commit(
                fenced(state("root", checkpoint=Checkpoint(turn_state=big)), lease, release=False)
            ),
        )
        await _raises_type(
            PayloadTooLarge, sessions.save_meta(attrs.evolve(meta, session_name=big[:2000]))
        )
        await _raises_type(
            PayloadTooLarge,
            sessions.record_intent(
                AttachmentIntent(
                    attachment_id="a", session_id="root", canonical_uri=big[:2000], intent_at_ms=1
                )
            ),
        )
        await _raises_type(InvalidArgument, sessions.enqueue(attrs.evolve(base, payloads=[])))
        await _raises_type(InvalidArgument, sessions.enqueue("not a draft"))  # type: ignore[arg-type]
        await _raises_type(InvalidArgument, handle.commit("not a commit"))  # type: ignore[arg-type]
        await _raises_type(InvalidArgument, sessions.save_meta({"session_id": "root"}))  # type: ignore[arg-type]
        assert await _snapshot(store, "root") == before
        assert await sessions.list_queued_work("root") == [queued]
        await _still_held(store, lease)


async def mistyped_commit_fields_are_invalid(make: StoreFactory) -> None:
    """Commit fields of the wrong type (snapshots that are not bytes, a non-int or negative
    snapshot revision, non-str ids, reasons, timestamps or usage sources) are InvalidArgument
    before anything is written: never a raw TypeError, and never accepted only to come back
    changed, or to make the session unreadable."""
    async with make() as store:
        handle = store.sessions.bind("root")
        lease = await _lease(store, "root", "owner")
        before = await _snapshot(store, "root")

        def node(**fields: Any) -> GraphReplace:
            return GraphReplace(nodes=_items(SessionNode(node_id="n", **fields)))

        def frame(**fields: Any) -> Any:
            return _items(AgentFrame(**{"frame_id": "f", **fields}))

        bad: dict[str, RuntimeCommit] = {
            "tool_state str": state("root", checkpoint=Checkpoint(tool_state="x")),  # type: ignore[arg-type]
            "plugin_snapshot_revision str": state(
                "root",
                checkpoint=Checkpoint(plugin_snapshot_revision="12"),  # type: ignore[arg-type]
            ),
            "plugin_snapshot_revision -1": state(
                "root", checkpoint=Checkpoint(plugin_snapshot_revision=-1)
            ),
            "frame execution_snapshot str": state(
                "root", agent_frames=frame(execution_snapshot="x")
            ),
            "frame_id int": state("root", agent_frames=frame(frame_id=7)),
            "frame reason int": state("root", agent_frames=frame(reason=5)),
            "usage source int": state(
                "root",
                usage=_items(UsageEntry(source=5, model="m", usage=TokenUsage())),  # type: ignore[arg-type]
            ),
            "node parent_node_id int": state("root", graph=node(parent_node_id=5)),
            "node timestamp int": state("root", graph=node(timestamp=5)),
            "leaf int": state("root", graph=GraphUnchanged(leaf=5)),  # type: ignore[arg-type]
            "current_agent_frame_id int": state("root", current_agent_frame_id=5),
            "committed_attachment_ids [int]": state("root", committed_attachment_ids=[5]),
            "the same node id twice": state(
                "root",
                graph=GraphAppend(nodes=[SessionNode(node_id="n"), SessionNode(node_id="n")]),
            ),
        }
        expect = _Refusals(InvalidArgument)
        for label, commit in bad.items():
            await expect(label, handle.commit(fenced(commit, lease, release=False)))
        expect.check()
        assert await _snapshot(store, "root") == before
        await _still_held(store, lease)


async def non_scope_load_is_unsupported_read_scope(make: StoreFactory) -> None:
    """Loading with something that is not FullGraph() or ActivePath(leaf) is
    UnsupportedReadScope, on bound and unbound handles alike."""
    async with make() as store:
        handle = store.sessions.bind()
        await _commit(store, handle, state("root"), "owner")
        for scope in ("full", FullGraph, ActivePath, {"leaf": None}, 0):
            await _raises(UnsupportedReadScope(scope), handle.load(scope))  # type: ignore[arg-type]
            await _raises(UnsupportedReadScope(scope), store.sessions.bind().load(scope))  # type: ignore[arg-type]
        assert (await _loaded(store, "root")).head_revision == 1


async def stale_head_revision_conflicts_and_writes_nothing(make: StoreFactory) -> None:
    """A commit whose expected head revision is not the head's is HeadRevisionConflict
    (expected, actual) and writes nothing: no graph, checkpoint, usage, queue completion,
    attachment stamp, turn stamp or lease release."""
    async with make() as store:
        sessions = store.sessions
        handle = sessions.bind()
        lease = await _lease(store, "root", "owner")
        await _raises(
            HeadRevisionConflict(5, 0),
            handle.commit(fenced(state("root", expected_head_revision=5), lease)),
        )
        assert handle.session_id is None
        first = await handle.commit(
            fenced(state("root", expected_head_revision=0), lease, release=False)
        )
        assert first.head_revision == 1
        second = await handle.commit(
            fenced(state("root", expected_head_revision=1), lease, release=False)
        )
        assert second.head_revision == 2
        await sessions.enqueue(queued_turn_input_draft("root", "work", ESB, EXCLUSIVE))
        claim = await sessions.claim_queued_work("root", lease.fence(), "owner", IDLE, TTL, 1)
        assert claim is not None
        await sessions.record_intent(
            AttachmentIntent(
                attachment_id="a", session_id="root", canonical_uri="u", intent_at_ms=1
            )
        )
        before = await _snapshot(store, "root")
        stale = state(
            "root",
            turn_index=9,
            expected_head_revision=1,
            graph=GraphReplace(nodes=_items(sample_node("n", None))),
            usage=[UsageEntry(source="turn", model="m", usage=TokenUsage(input_tokens=1))],
            completed_claims=[claim.completion()],
            committed_attachment_ids=["a"],
        )
        stale = stamped(stale, "stale-turn")
        for expected in (0, 1, 3, 2**63 - 1):
            try:
                await handle.commit(
                    fenced(attrs.evolve(stale, expected_head_revision=expected), lease)
                )
            except HeadRevisionConflict as exc:
                assert (exc.expected, exc.actual) == (expected, 2), exc
            else:
                raise AssertionError(f"expected HeadRevisionConflict({expected}, 2)")
        assert await _snapshot(store, "root") == before
        await _still_held(store, lease)
        renewed = await sessions.renew_queued_work_claim(claim, TTL)
        assert renewed.claim_id == claim.claim_id, "the claim was not completed"
        # The turn stamp was not recorded: the same turn commits for real at the right head.
        result = await handle.commit(fenced(attrs.evolve(stale, expected_head_revision=2), lease))
        assert result.head_revision == 3
        assert await sessions.list_queued_work("root") == []
        assert await sessions.list_uncommitted(2**62) == []


# --- beyond the reference: order, failures, deliveries ---------------------------------------


async def queued_work_order_survives_lease_handover(make: StoreFactory) -> None:
    """A runtime claims the head and dies with its claim still live; the next lease holder
    gets the head at once (at the idle boundary and at a checkpoint), not the work behind it,
    and the dead runtime's claim can neither renew, complete nor be reclaimed from under the
    new holder. The same holds when the old lease was released rather than expired."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        sessions = store.sessions
        b1, b2, b3 = [
            await sessions.enqueue(queued_turn_input_draft("root", text, ESB, EXCLUSIVE))
            for text in ("b1", "b2", "b3")
        ]
        dead = await _lease(store, "root", "dead", ttl_ms=1_000)
        orphan = await sessions.claim_queued_work("root", dead.fence(), "dead", IDLE, TTL, 10)
        assert orphan is not None and _ids(orphan.batches) == [b1.batch_id]
        clock.advance(1_001)  # the lease expired; the claim (a minute long) has not
        lease = await _lease(store, "root", "next")
        assert _ids(await sessions.list_pending_queued_work("root")) == _ids([b1, b2, b3]), (
            "a claim taken under an older lease grant holds nothing"
        )
        checkpoint = await sessions.claim_queued_work(
            "root", lease.fence(), "next", CHECKPOINT, TTL, 10
        )
        assert checkpoint is not None and _ids(checkpoint.batches) == [b1.batch_id], (
            "the new holder gets the head first, even at a checkpoint"
        )
        idle = await sessions.claim_queued_work("root", lease.fence(), "next", IDLE, TTL, 10)
        assert idle is not None and _ids(idle.batches) == [b1.batch_id], (
            "an idle claim starts from the head, whoever held it"
        )
        await _raises(
            QueuedWorkClaimExpired("root", orphan.claim_id),
            sessions.renew_queued_work_claim(orphan, TTL),
        )
        await _raises(
            QueuedWorkClaimExpired("root", orphan.claim_id),
            sessions.bind("root").commit(
                fenced(state("root", completed_claims=[orphan.completion()]), lease, release=False)
            ),
        )
        await sessions.abandon_queued_work_claim(orphan)  # a no-op: it owns nothing now
        # Behind its own head, the holder's checkpoint takes the next batch.
        behind = await sessions.claim_queued_work(
            "root", lease.fence(), "next", CHECKPOINT, TTL, 10
        )
        assert behind is not None and _ids(behind.batches) == [b2.batch_id]
        await _deliver(store, lease, idle, behind)
        # A released lease: its claim is void as soon as the next grant exists.
        released, left = await _hold(store, "root", "leaving")
        assert _ids(left.batches) == [b3.batch_id]
        await _release(store, released)
        assert await sessions.list_pending_queued_work("root") == [], "held until a new grant"
        assert await sessions.cancel_queued_work("root", b3.batch_id) is None
        lease = await _lease(store, "root", "last")
        assert _ids(await sessions.list_pending_queued_work("root")) == [b3.batch_id]
        claim = await sessions.claim_queued_work("root", lease.fence(), "last", CHECKPOINT, TTL, 10)
        assert claim is not None and _ids(claim.batches) == [b3.batch_id]
        await _deliver(store, lease, claim)
        read = await _loaded(store, "root")
        assert read.head_revision == 2 and await sessions.list_queued_work("root") == []


async def an_idle_claim_ends_every_earlier_claim(make: StoreFactory) -> None:
    """A turn claims b1 and, at a checkpoint, b2; then it is dropped (its commit refused, or
    its lease lost and taken back as the same grant). The next turn's idle claim takes b1 and
    ends the old claim on b2 too, so its checkpoint takes b2, not b3: nothing is delivered out
    of order, and the old claims can neither renew nor complete."""
    async with make(clock=FakeClock()) as store:
        sessions = store.sessions
        b1, b2, _ = [
            await sessions.enqueue(queued_turn_input_draft("root", text, ESB, EXCLUSIVE))
            for text in ("b1", "b2", "b3")
        ]
        lease, old_idle = await _hold(store, "root", "owner")
        fence = lease.fence()
        old_checkpoint = await sessions.claim_queued_work(
            "root", fence, "owner", CHECKPOINT, TTL, 10
        )
        assert old_checkpoint is not None and _ids(old_checkpoint.batches) == [b2.batch_id]
        idle = await sessions.claim_queued_work("root", fence, "owner", IDLE, TTL, 10)
        assert idle is not None and _ids(idle.batches) == [b1.batch_id]
        checkpoint = await sessions.claim_queued_work("root", fence, "owner", CHECKPOINT, TTL, 10)
        assert checkpoint is not None and _ids(checkpoint.batches) == [b2.batch_id], (
            "the new turn's checkpoint must not skip the work the dropped turn had claimed"
        )
        for ended in (old_idle, old_checkpoint):
            await _raises(
                QueuedWorkClaimExpired("root", ended.claim_id),
                sessions.renew_queued_work_claim(ended, TTL),
            )
        await _deliver(store, lease, idle, checkpoint)
        assert [batch_text(b) for b in await sessions.list_queued_work("root")] == ["b3"]


async def lease_and_claims_renew_together(make: StoreFactory) -> None:
    """``renew_lease_and_claims`` extends the lease and every claim in one transaction; if any
    claim is no longer live nothing is renewed."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        sessions = store.sessions
        for text in ("a", "b"):
            await sessions.enqueue(queued_turn_input_draft("root", text, ESB, EXCLUSIVE))
        lease, first = await _hold(store, "root", "owner")
        second = await sessions.claim_queued_work(
            "root", lease.fence(), "owner", CHECKPOINT, TTL, 1
        )
        assert second is not None
        clock.advance(1_000)
        renewed, claims = await sessions.renew_lease_and_claims(lease.fence(), [first, second], TTL)
        assert renewed.expires_at_ms == lease.expires_at_ms + 1_000
        assert [c.claim_id for c in claims] == [first.claim_id, second.claim_id]
        assert all(c.expires_at_ms == renewed.expires_at_ms for c in claims)
        await sessions.abandon_queued_work_claim(second)
        clock.advance(1_000)
        await _raises(
            QueuedWorkClaimExpired("root", second.claim_id),
            sessions.renew_lease_and_claims(lease.fence(), [first, second], TTL),
        )
        again, _ = await sessions.renew_lease_and_claims(lease.fence(), [], 0)
        assert again.expires_at_ms == renewed.expires_at_ms, "the refused renewal changed nothing"
        await _raises_type(
            InvalidArgument,
            sessions.renew_lease_and_claims(lease.fence(), [first.completion()], TTL),  # type: ignore[list-item]
        )
        other = await _lease(store, "other", "owner")
        await _raises_type(
            InvalidArgument, sessions.renew_lease_and_claims(other.fence(), [first], TTL)
        )
        clock.advance(TTL)
        await _raises(
            SessionExecutionLeaseExpired("root"),
            sessions.renew_lease_and_claims(lease.fence(), [first], TTL),
        )


async def failed_work_is_parked_and_resubmittable(make: StoreFactory) -> None:
    """A failed turn's claim counts a failure on each of its batches and gives them back; at
    the limit they are parked: visible with their error, skipped by every claim (so the work
    behind goes on), cancellable, and resubmittable at their old place in the queue."""
    async with make() as store:
        sessions = store.sessions
        poison = await sessions.enqueue(queued_turn_input_draft("root", "poison", ESB, EXCLUSIVE))
        after = await sessions.enqueue(queued_turn_input_draft("root", "after", ESB, EXCLUSIVE))
        lease, claim = await _hold(store, "root", "owner")
        assert await sessions.fail_queued_work(claim, "TypeError: bad", 2) == []
        listed = await sessions.list_queued_work("root")
        assert [(b.failures, b.last_error, b.parked) for b in listed] == [
            (1, "TypeError: bad", False),
            (0, None, False),
        ]
        assert await sessions.fail_queued_work(claim, "again", 2) == [], (
            "a spent claim fails nothing"
        )
        retry = await sessions.claim_queued_work("root", lease.fence(), "owner", IDLE, TTL, 10)
        assert retry is not None and _ids(retry.batches) == [poison.batch_id], "retried first"
        parked = await sessions.fail_queued_work(retry, "TypeError: still bad", 2)
        assert _ids(parked) == [poison.batch_id]
        assert (parked[0].parked, parked[0].failures, parked[0].last_error) == (
            True,
            2,
            "TypeError: still bad",
        )
        assert _ids(await sessions.list_pending_queued_work("root")) == [after.batch_id]
        assert await sessions.list_parked_queued_work("root") == parked
        assert await sessions.list_parked_queued_work() == parked
        assert await sessions.list_parked_queued_work("other") == []
        status = await sessions.queued_work_status("root", poison.batch_id)
        assert status is not None and status.state is WorkState.PARKED
        assert await sessions.has_queued_work("root")
        nxt = await sessions.claim_queued_work("root", lease.fence(), "owner", IDLE, TTL, 10)
        assert nxt is not None and _ids(nxt.batches) == [after.batch_id], "the work behind goes on"
        await _deliver(store, lease, nxt)
        assert not await sessions.has_queued_work("root"), "only parked work is left"
        assert await sessions.list_sessions_with_queued_work() == []
        assert await sessions.unpark_queued_work("root", after.batch_id) is None, "delivered"
        assert await sessions.unpark_queued_work("other", poison.batch_id) is None
        back = await sessions.unpark_queued_work("root", poison.batch_id)
        assert back is not None and (back.parked, back.failures, back.last_error) == (
            False,
            0,
            None,
        )
        assert await sessions.unpark_queued_work("root", poison.batch_id) is None, "not parked"
        assert await sessions.list_sessions_with_queued_work() == ["root"]
        lease, claim = await _hold(store, "root", "owner")
        assert _ids(claim.batches) == [poison.batch_id]
        await sessions.fail_queued_work(claim, "once more", 1)
        await _release(store, lease)
        gone = await sessions.cancel_queued_work("root", poison.batch_id)
        assert gone is not None and gone.parked, "a parked batch can be cancelled"
        assert await sessions.list_queued_work("root") == []
        assert await sessions.queued_work_status("root", poison.batch_id) is None
        for bad in ("", 0):
            await _raises_type(InvalidArgument, sessions.fail_queued_work(claim, "x", bad))  # type: ignore[arg-type]
        await _raises_type(InvalidArgument, sessions.fail_queued_work(claim, None, 1))  # type: ignore[arg-type]


async def delivered_work_keeps_its_outcome_and_source_key(make: StoreFactory) -> None:
    """A commit that delivers queued work records, for every batch, the turn that delivered it
    and the commit's outcome: ``queued_work_status`` reads it back. A source key stays
    idempotent after delivery: the same work returns the original batch (nothing is queued),
    other work is a conflict naming it."""
    async with make() as store:
        sessions = store.sessions
        group = MergeKey.PAYLOAD_DEFAULT
        draft = queued_turn_input_draft(
            "root", "question", ESB, JOIN, source_key="msg-1", merge_key=group
        )
        first = await sessions.enqueue(draft)
        joined = await sessions.enqueue(
            queued_turn_input_draft("root", "more", ESB, JOIN, source_key="msg-2", merge_key=group)
        )
        queued = await sessions.queued_work_status("root", first.batch_id)
        assert queued is not None and (queued.state, queued.batch) == (WorkState.QUEUED, first)
        assert queued.outcome is None and queued.turn_id is None
        lease, claim = await _hold(store, "root", "owner")
        assert _ids(claim.batches) == [first.batch_id, joined.batch_id]
        outcome: JSON = {"kind": "assistant_message", "text": "the answer"}
        final = stamped(
            state("root", completed_claims=[claim.completion()], outcome=outcome), "turn-1"
        )
        result = await sessions.bind("root").commit(fenced(final, lease))
        for batch in (first, joined):
            status = await sessions.queued_work_status("root", batch.batch_id)
            assert status is not None
            assert (status.state, status.turn_id, status.head_revision, status.outcome) == (
                WorkState.DELIVERED,
                "turn-1",
                result.head_revision,
                outcome,
            )
            assert status.batch == batch
        assert await sessions.list_queued_work("root") == []
        assert await sessions.enqueue(draft) == first, "a resend after delivery is the original"
        assert await sessions.list_queued_work("root") == [], "and is not queued again"
        await _raises(
            QueuedWorkSourceKeyConflict("root", "msg-1", first.batch_id),
            sessions.enqueue(attrs.evolve(draft, payloads=_items(turn_input("other")))),
        )
        assert await sessions.queued_work_status("root", "qwb:unknown") is None
        assert await sessions.queued_work_status("other", first.batch_id) is None
        # A commit without an outcome or a stamp still records its deliveries.
        plain = await sessions.enqueue(queued_turn_input_draft("root", "plain", ESB, EXCLUSIVE))
        lease, claim = await _hold(store, "root", "owner")
        await _deliver(store, lease, claim)
        status = await sessions.queued_work_status("root", plain.batch_id)
        assert status is not None and (status.state, status.turn_id, status.outcome) == (
            WorkState.DELIVERED,
            None,
            None,
        )
        await _raises_type(
            PayloadNotSerializable,
            sessions.bind("root").commit(fenced(state("root", outcome=_not_json()), lease)),
        )


async def deliveries_and_parked_work_survive_reopen(make: StoreFactory) -> None:
    """Delivered outcomes, their source keys and parked work survive closing and reopening the
    store. ``make`` must open the same store on every call."""
    # The other reopen scenarios leave work of their own in "root" of the same store.
    sid = "reopen-deliveries"
    async with make() as store:
        sessions = store.sessions
        draft = queued_turn_input_draft(sid, "answered", ESB, EXCLUSIVE, source_key="k")
        answered = await sessions.enqueue(draft)
        poison = await sessions.enqueue(queued_turn_input_draft(sid, "poison", ESB, EXCLUSIVE))
        lease, claim = await _hold(store, sid, "owner")
        final = stamped(state(sid, completed_claims=[claim.completion()], outcome={"n": 1}), "t1")
        await sessions.bind(sid).commit(fenced(final, lease))
        lease, claim = await _hold(store, sid, "owner")
        parked = await sessions.fail_queued_work(claim, "bad", 1)
        await _release(store, lease)
    async with make() as store:
        sessions = store.sessions
        status = await sessions.queued_work_status(sid, answered.batch_id)
        assert status is not None and (status.state, status.outcome) == (
            WorkState.DELIVERED,
            {"n": 1},
        )
        assert await sessions.enqueue(draft) == answered
        assert await sessions.list_parked_queued_work() == parked
        assert _ids(parked) == [poison.batch_id]


SESSION_SCENARIOS: tuple[Scenario, ...] = (
    runtime_persistence_reports_declared_durability,
    commit_increments_head_and_round_trips_agent_frames,
    commit_rejects_a_different_session_id,
    load_hydrates_checkpoint_and_usage,
    active_path_read_scope_selects_only_requested_ancestry,
    session_execution_lease_contract,
    attachment_manifest_records_intent_and_commit_stamps,
    queued_work_source_keys_are_idempotent_and_list_ordered,
    queued_work_cancel_removes_only_unclaimed_batches,
    queued_work_exact_claim_uses_selected_batch_ids,
    queued_work_claims_respect_boundaries_renewal_and_abandon,
    queued_work_respects_availability_limits_exclusivity_reclaim_and_sessions,
    queued_work_join_groups_by_delivery_policy_and_merge_key,
    queued_work_completion_is_lease_guarded,
    queued_wake_delivery_is_source_key_idempotent_and_claimed_once,
    queue_completion_and_turn_commit_stamp_are_atomic,
    session_metadata_round_trips,
    tombstone_vacuum_and_gc_are_minimally_consistent,
    final_commit_stamp_is_idempotent_and_conflicts_on_changed_hash,
    # beyond the reference: order, failures, deliveries
    queued_work_order_survives_lease_handover,
    an_idle_claim_ends_every_earlier_claim,
    lease_and_claims_renew_together,
    failed_work_is_parked_and_resubmittable,
    delivered_work_keeps_its_outcome_and_source_key,
    # beyond the reference: bad input
    stale_or_forged_lease_fences_write_nothing,
    stale_or_forged_queue_claims_write_nothing,
    out_of_range_numbers_are_invalid,
    unknown_batch_ids_claim_and_cancel_nothing,
    source_key_conflict_keeps_the_original,
    bad_payloads_write_nothing,
    mistyped_commit_fields_are_invalid,
    non_scope_load_is_unsupported_read_scope,
    stale_head_revision_conflicts_and_writes_nothing,
)

SESSION_REOPEN_SCENARIOS: tuple[Scenario, ...] = (
    session_execution_lease_first_claim_excludes_concurrent_reopen_handles,
    runtime_persistence_survives_reopen,
    deliveries_and_parked_work_survive_reopen,
)


async def runtime_persistence(
    make: StoreFactory, *, durability_tier: DurabilityTier | None = None
) -> None:
    """Run every session scenario against fresh stores from ``make``; pass ``durability_tier``
    to pin the tier the store must declare.

    Raises:
        AssertionError: the store does not conform; the message says how.
    """
    for scenario in SESSION_SCENARIOS:
        if scenario is runtime_persistence_reports_declared_durability:
            await runtime_persistence_reports_declared_durability(
                make, durability_tier=durability_tier
            )
        else:
            await scenario(make)


async def runtime_persistence_reopenable(make: StoreFactory) -> None:
    """Run the reopen scenarios: ``make`` must open the *same* durable store on every call.

    Raises:
        AssertionError: the store does not conform; the message says how.
    """
    for scenario in SESSION_REOPEN_SCENARIOS:
        await scenario(make)
