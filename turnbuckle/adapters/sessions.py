"""The session facet of a store (``store.sessions``), written once for every adapter.

As with tasks (:mod:`turnbuckle.adapters.tasks`), an adapter supplies a :class:`SessionTable`
(rows in, rows out, guarded writes reporting by their return value whether the guard held) and a
runner that calls a function with it inside one atomic transaction. Every operation here reads
the rows it needs, asks the pure decisions in :mod:`turnbuckle.sansio` (``lease``, ``queue``,
``session``), and writes the result; the rules exist once.

A store holds many sessions. Leases, queued work, metadata and attachments are addressed by
session id on the facet; a session's head (load, commit, nodes) is reached through a
:class:`SessionHandle`, which binds to one session (given, or on its first commit) and refuses
to commit another (``SessionBindingMismatch``), as the reference's single-session stores do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar

import attrs

from turnbuckle.adapters.tasks import Clock
from turnbuckle.errors import (
    ConcurrentModification,
    CorruptRecordError,
    InvalidArgument,
    QueuedWorkClaimExpired,
    QueuedWorkSourceKeyConflict,
    SessionExecutionLeaseExpired,
    UnsupportedReadScope,
)
from turnbuckle.sansio.codec import check_int64, check_text, decode_json, encode_json
from turnbuckle.sansio.ids import IdSource
from turnbuckle.sansio.lease import (
    LeaseFence,
    LeaseRow,
    SessionLease,
    check_fence,
    check_fence_argument,
    check_ttl,
    claim_lease,
    free_lease_row,
    release_lease,
    renew_lease,
)
from turnbuckle.sansio.queue import (
    ClaimBoundary,
    DeliveryRow,
    QueuedBatchRow,
    QueuedWorkBatch,
    QueuedWorkClaim,
    QueuedWorkDraft,
    QueuedWorkStatus,
    SubmitStatus,
    Ticket,
    abandon_rows,
    check_batch_ids,
    claim_rows,
    ended_claims,
    fail_rows,
    is_claimed,
    is_pending,
    new_batch_row,
    renew_rows,
    same_work,
    select_by_batch_ids,
    select_claim_prefix,
    unpark_row,
)
from turnbuckle.sansio.session import (
    ActivePath,
    AttachmentEntry,
    AttachmentIntent,
    CommitPlan,
    CommitResult,
    FullGraph,
    HeadRow,
    ReadScope,
    RuntimeCommit,
    SessionMeta,
    SessionNode,
    SessionRead,
    TokenUsage,
    TurnStampRow,
    UsageEntry,
    build_read,
    check_commit,
    check_commit_shape,
    manifest_children,
    node_from_json,
    node_to_json,
)

__all__ = ["GcReport", "SessionFacet", "SessionHandle", "SessionTable", "VacuumReport"]

T = TypeVar("T")
DurabilityTier = Literal["inline", "durable"]


@attrs.frozen(kw_only=True)
class GcReport:
    root_count: int
    retained_blob_count: int
    deleted_blob_count: int


@attrs.frozen(kw_only=True)
class VacuumReport:
    removed_node_count: int


class SessionTable(Protocol):
    """Row access inside one transaction. Implementations check no rules."""

    # heads
    def head(self, session_id: str) -> HeadRow | None: ...
    def put_head(self, row: HeadRow, expected_revision: int) -> bool:
        """Write ``row`` if the stored revision is ``expected_revision`` (0: no head yet)."""
        ...

    def heads(self) -> list[HeadRow]: ...

    # graph
    def nodes(self, session_id: str) -> list[tuple[str, str, bool]]:
        """(node_id, node JSON, tombstoned) in insertion order."""
        ...

    def node(self, session_id: str, node_id: str) -> tuple[str, bool] | None: ...
    def add_nodes(self, session_id: str, nodes: Sequence[tuple[str, str]]) -> None: ...
    def clear_nodes(self, session_id: str) -> None: ...
    def tombstone(self, session_id: str, node_ids: Sequence[str]) -> int: ...
    def vacuum(self) -> int:
        """Delete tombstoned nodes; how many rows went."""
        ...

    # usage and turn stamps
    def add_usage(self, session_id: str, entries: Sequence[str]) -> None: ...
    def usage(self, session_id: str) -> list[str]: ...
    def stamp(self, session_id: str, turn_id: str) -> TurnStampRow | None: ...
    def put_stamp(self, row: TurnStampRow) -> None: ...

    # leases
    def lease(self, session_id: str) -> LeaseRow | None: ...
    def put_lease(self, row: LeaseRow) -> None: ...

    # queued work
    def batches(self, session_id: str) -> list[QueuedBatchRow]:
        """The session's queued batches (parked ones too) in enqueue order."""
        ...

    def parked(self, session_id: str | None) -> list[QueuedBatchRow]:
        """Parked batches of one session (every session if None), by session then enqueue
        order."""
        ...

    def batch(self, batch_id: str) -> QueuedBatchRow | None: ...
    def sessions_with_work(self) -> list[str]:
        """Every session id that has queued batches, sorted."""
        ...

    def batch_by_source(self, session_id: str, source_key: str) -> QueuedBatchRow | None: ...
    def next_enqueue_seq(self) -> int: ...
    def insert_batch(self, row: QueuedBatchRow) -> None: ...
    def update_batch(self, row: QueuedBatchRow, claim_token: str | None) -> bool:
        """Overwrite the claim columns of ``row.batch_id`` if its token is ``claim_token``."""
        ...

    def delete_batch(self, batch_id: str) -> bool: ...

    # deliveries: batches a commit delivered, kept with their outcome
    def delivery(self, batch_id: str) -> DeliveryRow | None: ...
    def delivery_by_source(self, session_id: str, source_key: str) -> DeliveryRow | None: ...
    def insert_delivery(self, row: DeliveryRow) -> None: ...

    # meta, attachments, blobs
    def meta(self, session_id: str) -> str | None: ...
    def put_meta(self, session_id: str, meta: str) -> None: ...
    def put_intent(self, entry: AttachmentEntry) -> None: ...
    def commit_attachments(self, session_id: str, ids: Sequence[str], now_ms: int) -> None: ...
    def uncommitted(self, older_than_ms: int) -> list[AttachmentEntry]: ...
    def forget(self, attachment_id: str) -> bool: ...
    def put_blob(self, ref: str, content: bytes) -> None: ...
    def blob(self, ref: str) -> bytes | None: ...
    def blob_refs(self) -> list[str]: ...
    def delete_blob(self, ref: str) -> None: ...


class SessionRunner(Protocol):
    async def run(self, fn: Callable[[SessionTable], T], *, writes: bool) -> T: ...


def _decode(table: str, key: str, decode: Callable[[], T]) -> T:
    try:
        return decode()
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError) as exc:
        raise CorruptRecordError(table, key, repr(exc)) from exc


def _usage_json(entry: UsageEntry) -> str:
    u = entry.usage
    return encode_json(
        [
            entry.source,
            entry.model,
            u.input_tokens,
            u.output_tokens,
            u.cached_input_tokens,
            u.reasoning_tokens,
        ],
        limit=1 << 62,
    )


def _usage_from_json(text: str) -> UsageEntry:
    values: Any = decode_json(text)
    source, model, i, o, c, r = values
    if not (isinstance(source, str) and isinstance(model, str)):
        raise ValueError("usage entry without source or model")
    usage = TokenUsage(input_tokens=i, output_tokens=o, cached_input_tokens=c, reasoning_tokens=r)
    return UsageEntry(source=source, model=model, usage=usage)


def _lease_row(table: SessionTable, session_id: str) -> LeaseRow:
    return table.lease(session_id) or free_lease_row(session_id)


def _grant(table: SessionTable, session_id: str) -> int:
    """The session's latest lease grant (its fencing token): claims under an older one are
    void."""
    return _lease_row(table, session_id).fencing_token


class SessionFacet:
    """Durable sessions: ``store.sessions``."""

    def __init__(
        self,
        runner: SessionRunner,
        *,
        clock: Clock,
        ids: IdSource,
        max_payload_bytes: int,
        durability_tier: DurabilityTier,
    ) -> None:
        self._run = runner.run
        self._clock = clock
        self._ids = ids
        self._limit = max_payload_bytes
        #: "inline" (memory: gone with the process) or "durable" (survives it).
        self.durability_tier: DurabilityTier = durability_tier

    def bind(self, session_id: str | None = None) -> SessionHandle:
        """A handle on one session's head; None binds it to the first session it commits.

        Raises:
            InvalidArgument: ``session_id`` is not a non-empty str.
        """
        if session_id is not None:
            _check_session(session_id, self._limit)
        return SessionHandle(self, session_id)

    # --- the session execution lease ---

    async def try_claim_lease(
        self, session_id: str, owner_id: str, ttl_ms: int
    ) -> SessionLease | None:
        """Take the session's execution lease, or re-enter it as its owner; None if another
        owner holds it.

        Raises:
            InvalidArgument: a bad id or ttl.
        """
        _check_session(session_id, self._limit)
        check_text("owner_id", owner_id, limit=self._limit)
        now, ids = self._clock.now_ms(), self._ids

        def op(table: SessionTable) -> SessionLease | None:
            got = claim_lease(_lease_row(table, session_id), owner_id, ttl_ms, now_ms=now, ids=ids)
            if got is None:
                return None
            table.put_lease(got[0])
            return got[1]

        return await self._run(op, writes=True)

    async def renew_lease(self, fence: LeaseFence, ttl_ms: int) -> SessionLease:
        """Extend a live lease.

        Raises:
            SessionExecutionLeaseExpired: ``fence`` is not the live lease.
            InvalidArgument: a bad fence or ttl.
        """
        check_fence_argument(fence)
        check_ttl(ttl_ms)
        now = self._clock.now_ms()

        def op(table: SessionTable) -> SessionLease:
            row, lease = renew_lease(_lease_row(table, fence.session_id), fence, ttl_ms, now_ms=now)
            table.put_lease(row)
            return lease

        return await self._run(op, writes=True)

    async def renew_lease_and_claims(
        self, fence: LeaseFence, claims: Sequence[QueuedWorkClaim], ttl_ms: int
    ) -> tuple[SessionLease, tuple[QueuedWorkClaim, ...]]:
        """Extend a live lease and the live claims of the running turn, in one transaction
        (what a runtime does every ttl/3).

        Raises:
            SessionExecutionLeaseExpired: ``fence`` is not the live lease.
            QueuedWorkClaimExpired: a claim expired or lost a batch (nothing is renewed).
            InvalidArgument: a bad fence, claim or ttl.
        """
        check_fence_argument(fence)
        check_ttl(ttl_ms)
        if isinstance(claims, str) or not isinstance(claims, Sequence):
            raise InvalidArgument(f"claims must be a sequence of QueuedWorkClaim, got {claims!r}")
        for claim in claims:
            _check_claim(claim)
            if claim.session_id != fence.session_id:
                raise InvalidArgument("every claim must be of the fenced session")
        now = self._clock.now_ms()

        def op(table: SessionTable) -> tuple[SessionLease, tuple[QueuedWorkClaim, ...]]:
            row, lease = renew_lease(_lease_row(table, fence.session_id), fence, ttl_ms, now_ms=now)
            table.put_lease(row)
            return lease, tuple(_renew_claim(table, claim, ttl_ms, now) for claim in claims)

        return await self._run(op, writes=True)

    async def release_lease(self, fence: LeaseFence) -> None:
        """Release the lease if ``fence`` is its current grant; otherwise do nothing (a stale
        or repeated release never frees a newer grant).

        Raises:
            InvalidArgument: a bad fence.
        """
        check_fence_argument(fence)

        def op(table: SessionTable) -> None:
            row = release_lease(_lease_row(table, fence.session_id), fence)
            if row is not None:
                table.put_lease(row)

        await self._run(op, writes=True)

    # --- queued work ---

    async def enqueue(self, draft: QueuedWorkDraft) -> QueuedWorkBatch:
        """Durably enqueue a batch. A source key seen before in the session (queued, parked
        or already delivered) returns the original batch and enqueues nothing.

        Raises:
            QueuedWorkSourceKeyConflict: the source key was used for different work (the error
                names the original batch, which is kept).
            InvalidArgument, PayloadNotSerializable, PayloadTooLarge: a bad draft.
        """
        batch, status = await self._enqueue(draft)
        if status is SubmitStatus.CONFLICT:
            assert batch.source_key is not None
            raise QueuedWorkSourceKeyConflict(batch.session_id, batch.source_key, batch.batch_id)
        return batch

    async def submit(self, draft: QueuedWorkDraft) -> Ticket:
        """Durably enqueue a batch, or find the one its source key names, and say which: a
        source key seen before in the session (queued, parked or already delivered) returns
        the original's ticket, with the same content (``DUPLICATE``) or other content
        (``CONFLICT``), and enqueues nothing.

        Raises:
            InvalidArgument, PayloadNotSerializable, PayloadTooLarge: a bad draft.
        """
        batch, status = await self._enqueue(draft)
        return Ticket(
            session_id=batch.session_id,
            batch_id=batch.batch_id,
            source_key=batch.source_key,
            status=status,
        )

    async def _enqueue(self, draft: QueuedWorkDraft) -> tuple[QueuedWorkBatch, SubmitStatus]:
        now, ids, limit = self._clock.now_ms(), self._ids, self._limit
        probe = new_batch_row(draft, enqueue_seq=0, now_ms=now, ids=ids, limit=limit)

        def op(table: SessionTable) -> tuple[QueuedWorkBatch, SubmitStatus]:
            if probe.source_key is not None:
                existing = table.batch_by_source(probe.session_id, probe.source_key)
                if existing is None:
                    delivered = table.delivery_by_source(probe.session_id, probe.source_key)
                    existing = None if delivered is None else delivered.row
                if existing is not None:
                    try:
                        same_work(existing, probe)
                    except QueuedWorkSourceKeyConflict:
                        return _batch(existing), SubmitStatus.CONFLICT
                    return _batch(existing), SubmitStatus.DUPLICATE
            row = attrs.evolve(probe, enqueue_seq=table.next_enqueue_seq())
            table.insert_batch(row)
            return _batch(row), SubmitStatus.NEW

        return await self._run(op, writes=True)

    async def claim_queued_work(
        self,
        session_id: str,
        fence: LeaseFence,
        owner_id: str,
        boundary: ClaimBoundary,
        ttl_ms: int,
        max_batches: int,
    ) -> QueuedWorkClaim | None:
        """Claim the ready prefix of a session's queued work (see
        :func:`~turnbuckle.sansio.queue.select_claim_prefix`); None if nothing is ready. An
        ``idle`` claim starts from the head of the queue, voiding any claim still on it; a
        checkpoint claim takes the work right behind what the fenced grant already holds.

        Raises:
            SessionExecutionLeaseExpired: ``fence`` is not the session's live lease.
            InvalidArgument: a bad argument.
        """
        return await self._claim(
            session_id,
            fence,
            owner_id,
            ttl_ms,
            lambda rows, now, grant: select_claim_prefix(
                rows, boundary, max_batches, now_ms=now, lease_fencing=grant
            ),
            idle=boundary is ClaimBoundary.IDLE,
        )

    async def claim_queued_work_by_ids(
        self,
        session_id: str,
        fence: LeaseFence,
        owner_id: str,
        boundary: ClaimBoundary,
        ttl_ms: int,
        batch_ids: Sequence[str],
    ) -> QueuedWorkClaim | None:
        """Claim exactly ``batch_ids`` if they are the prefix a claim would take now; None
        otherwise (never skips earlier work).

        Raises:
            SessionExecutionLeaseExpired: ``fence`` is not the session's live lease.
            InvalidArgument: a bad argument.
        """
        ids = check_batch_ids(batch_ids)
        return await self._claim(
            session_id,
            fence,
            owner_id,
            ttl_ms,
            lambda rows, now, grant: select_by_batch_ids(
                rows, boundary, ids, now_ms=now, lease_fencing=grant
            ),
            idle=boundary is ClaimBoundary.IDLE,
        )

    async def _claim(
        self,
        session_id: str,
        fence: LeaseFence,
        owner_id: str,
        ttl_ms: int,
        select: Callable[[list[QueuedBatchRow], int, int], tuple[QueuedBatchRow, ...]],
        *,
        idle: bool,
    ) -> QueuedWorkClaim | None:
        _check_session(session_id, self._limit)
        check_fence_argument(fence)
        check_text("owner_id", owner_id, limit=self._limit)
        check_ttl(ttl_ms)
        now, ids = self._clock.now_ms(), self._ids
        select([], now, 0)  # validates the selection's own arguments before any IO

        def op(table: SessionTable) -> QueuedWorkClaim | None:
            if fence.session_id != session_id:  # another session's fence is never this one's
                raise SessionExecutionLeaseExpired(session_id)
            lease = _lease_row(table, session_id)
            check_fence(lease, fence, now_ms=now)
            grant = lease.fencing_token
            rows = table.batches(session_id)
            selected = select(rows, now, grant)
            if not selected:
                return None
            claimed, claim = claim_rows(
                selected, owner_id, ttl_ms, now_ms=now, ids=ids, lease_fencing=grant
            )
            if idle:  # a turn starts: every claim of an earlier one ends
                tokens = {r.batch_id: r.claim_token for r in rows}
                for row in ended_claims(rows, selected):
                    if not table.update_batch(row, tokens[row.batch_id]):
                        raise ConcurrentModification(row.batch_id)
            for old, new in zip(selected, claimed, strict=True):
                if not table.update_batch(new, old.claim_token):
                    raise ConcurrentModification(old.batch_id)
            return claim

        return await self._run(op, writes=True)

    async def renew_queued_work_claim(self, claim: QueuedWorkClaim, ttl_ms: int) -> QueuedWorkClaim:
        """Extend a live claim that still owns all its batches.

        Raises:
            QueuedWorkClaimExpired: it expired, lost a batch, or a newer lease was granted.
            InvalidArgument: a bad claim or ttl.
        """
        _check_claim(claim)
        check_ttl(ttl_ms)
        now = self._clock.now_ms()
        return await self._run(lambda t: _renew_claim(t, claim, ttl_ms, now), writes=True)

    async def abandon_queued_work_claim(self, claim: QueuedWorkClaim) -> None:
        """Give a claim's batches back to the queue (those it still owns; idempotent)."""
        _check_claim(claim)

        def op(table: SessionTable) -> None:
            rows = [table.batch(b.batch_id) for b in claim.batches]
            for row in abandon_rows(rows, claim):
                table.update_batch(row, claim.lease_token)

        await self._run(op, writes=True)

    async def fail_queued_work(
        self, claim: QueuedWorkClaim, error: str, max_failures: int
    ) -> list[QueuedWorkBatch]:
        """Give a failed turn's claim back: each batch it still owns counts the failure and
        keeps ``error``, and is parked once it has failed ``max_failures`` times. Returns the
        batches parked now.

        Raises:
            InvalidArgument: a bad claim, error or limit.
        """
        _check_claim(claim)
        check_text("error", error, limit=self._limit)
        check_int64("max_failures", max_failures, minimum=1)

        def op(table: SessionTable) -> list[QueuedWorkBatch]:
            rows = [table.batch(b.batch_id) for b in claim.batches]
            failed = fail_rows(rows, claim, error, max_failures)
            for row in failed:
                table.update_batch(row, claim.lease_token)
            return [_batch(row) for row in failed if row.parked]

        return await self._run(op, writes=True)

    async def unpark_queued_work(self, session_id: str, batch_id: str) -> QueuedWorkBatch | None:
        """Put a parked batch back in the queue, at its old place (so it is delivered before
        the work enqueued after it), with its failures forgotten. None if the session has no
        parked batch ``batch_id``.

        Raises:
            InvalidArgument: a bad id.
        """
        _check_session(session_id, self._limit)
        check_text("batch_id", batch_id)

        def op(table: SessionTable) -> QueuedWorkBatch | None:
            row = table.batch(batch_id)
            if row is None or row.session_id != session_id or not row.parked:
                return None
            fresh = unpark_row(row)
            table.update_batch(fresh, row.claim_token)
            return _batch(fresh)

        return await self._run(op, writes=True)

    async def cancel_queued_work(self, session_id: str, batch_id: str) -> QueuedWorkBatch | None:
        """Delete a queued batch nobody has a live claim on (a parked one too); None if it is
        claimed or unknown."""
        _check_session(session_id, self._limit)
        check_text("batch_id", batch_id)
        now = self._clock.now_ms()

        def op(table: SessionTable) -> QueuedWorkBatch | None:
            row = table.batch(batch_id)
            if (
                row is None
                or row.session_id != session_id
                or is_claimed(row, now, _grant(table, session_id))
            ):
                return None
            table.delete_batch(batch_id)
            return _batch(row)

        return await self._run(op, writes=True)

    async def queued_work_status(self, session_id: str, batch_id: str) -> QueuedWorkStatus | None:
        """Where a batch is: queued (claimed or not), parked, or delivered, with the turn that
        delivered it and its recorded outcome. None if the session never had it, or it was
        cancelled.

        Raises:
            InvalidArgument: a bad id.
            CorruptRecordError: the stored batch cannot be decoded.
        """
        _check_session(session_id, self._limit)
        check_text("batch_id", batch_id)

        def op(table: SessionTable) -> QueuedWorkStatus | None:
            row = table.batch(batch_id)
            found: QueuedBatchRow | DeliveryRow | None = row
            if row is None:
                found = table.delivery(batch_id)
            if found is None or _row_of(found).session_id != session_id:
                return None
            return _decode("queued_work", batch_id, found.status)

        return await self._run(op, writes=False)

    async def list_queued_work(self, session_id: str) -> list[QueuedWorkBatch]:
        """Every queued batch of the session, claimed and parked ones included, in enqueue
        order."""
        _check_session(session_id, self._limit)
        return await self._run(
            lambda table: [_batch(r) for r in table.batches(session_id)], writes=False
        )

    async def list_pending_queued_work(self, session_id: str) -> list[QueuedWorkBatch]:
        """The session's batches waiting for a claim (no live claim, not parked), in enqueue
        order."""
        _check_session(session_id, self._limit)
        now = self._clock.now_ms()

        def op(table: SessionTable) -> list[QueuedWorkBatch]:
            grant = _grant(table, session_id)
            return [_batch(r) for r in table.batches(session_id) if is_pending(r, now, grant)]

        return await self._run(op, writes=False)

    async def list_parked_queued_work(self, session_id: str | None = None) -> list[QueuedWorkBatch]:
        """Parked batches of one session, or of every session (None), by session then enqueue
        order; each says how often it failed and why, last."""
        if session_id is not None:
            _check_session(session_id, self._limit)
        return await self._run(
            lambda table: [_batch(r) for r in table.parked(session_id)], writes=False
        )

    async def list_sessions_with_queued_work(self) -> list[str]:
        """Sessions with unparked queued work that is available now, claimed or not (a claim
        may belong to a runtime that died): what a runtime should look after when it starts."""
        now = self._clock.now_ms()

        def op(table: SessionTable) -> list[str]:
            return [
                session_id
                for session_id in table.sessions_with_work()
                if any(_ready(r, now) for r in table.batches(session_id))
            ]

        return await self._run(op, writes=False)

    async def next_queued_work_in_ms(self, session_id: str) -> int | None:
        """Milliseconds until the session's earliest not-yet-available (unparked) batch becomes
        available (None if it has none)."""
        _check_session(session_id, self._limit)
        now = self._clock.now_ms()

        def op(table: SessionTable) -> int | None:
            later = [
                r.available_at_ms - now
                for r in table.batches(session_id)
                if not r.parked and r.available_at_ms > now
            ]
            return min(later) if later else None

        return await self._run(op, writes=False)

    async def has_queued_work(self, session_id: str) -> bool:
        """True if the session has unparked queued work available now, claimed or not."""
        _check_session(session_id, self._limit)
        now = self._clock.now_ms()
        return await self._run(
            lambda table: any(_ready(r, now) for r in table.batches(session_id)),
            writes=False,
        )

    # --- metadata and attachments ---

    async def save_meta(self, meta: SessionMeta) -> None:
        """Store a session's metadata (replacing what was there).

        Raises:
            InvalidArgument, PayloadNotSerializable: a bad field.
        """
        if not isinstance(meta, SessionMeta):
            raise InvalidArgument(f"expected a SessionMeta, got {meta!r}")
        _check_session(meta.session_id, self._limit)
        text = encode_json(attrs.asdict(meta), limit=self._limit)
        await self._run(lambda table: table.put_meta(meta.session_id, text), writes=True)

    async def load_meta(self, session_id: str) -> SessionMeta | None:
        """A session's metadata, or None.

        Raises:
            CorruptRecordError: the stored metadata cannot be decoded.
        """
        _check_session(session_id, self._limit)
        text = await self._run(lambda table: table.meta(session_id), writes=False)
        if text is None:
            return None
        return _decode("session_meta", session_id, lambda: SessionMeta(**decode_json(text)))  # type: ignore[arg-type]

    async def record_intent(self, intent: AttachmentIntent) -> None:
        """Record that attachment bytes are about to be stored (write-ahead)."""
        if not isinstance(intent, AttachmentIntent):
            raise InvalidArgument(f"expected an AttachmentIntent, got {intent!r}")
        for name in ("attachment_id", "session_id", "canonical_uri"):
            check_text(name, getattr(intent, name), limit=self._limit)
        check_int64("intent_at_ms", intent.intent_at_ms)
        entry = AttachmentEntry(**attrs.asdict(intent), committed_at_ms=None)
        await self._run(lambda table: table.put_intent(entry), writes=True)

    async def commit_refs(self, session_id: str, attachment_ids: Sequence[str]) -> None:
        """Mark attachments committed (outside a runtime commit)."""
        _check_session(session_id, self._limit)
        ids = _check_ids(attachment_ids)
        now = self._clock.now_ms()
        await self._run(lambda table: table.commit_attachments(session_id, ids, now), writes=True)

    async def list_uncommitted(self, older_than_ms: int) -> list[AttachmentEntry]:
        """Intents never committed, recorded before ``older_than_ms``."""
        check_int64("older_than_ms", older_than_ms)
        return await self._run(lambda table: table.uncommitted(older_than_ms), writes=False)

    async def forget(self, attachment_id: str) -> bool:
        """Drop an attachment's manifest entry; True if there was one."""
        check_text("attachment_id", attachment_id)
        return await self._run(lambda table: table.forget(attachment_id), writes=True)

    # --- upkeep ---

    async def vacuum(self) -> VacuumReport:
        """Delete tombstoned nodes for good."""
        return VacuumReport(removed_node_count=await self._run(lambda t: t.vacuum(), writes=True))

    async def gc_unreachable(self) -> GcReport:
        """Delete blobs no session head's checkpoint reaches. Conservative: if any head or
        manifest cannot be read, nothing is deleted. Never raises for damaged data."""

        def op(table: SessionTable) -> GcReport:
            refs = table.blob_refs()
            keep: set[str] = set()
            heads = table.heads()
            try:
                for head in heads:
                    root = _checkpoint_ref(head)
                    manifest = table.blob(root)
                    if manifest is None:
                        raise ValueError(f"missing manifest {root}")
                    keep.add(root)
                    keep.update(manifest_children(manifest))
            except (ValueError, TypeError, KeyError, UnicodeDecodeError):
                return GcReport(
                    root_count=len(heads), retained_blob_count=len(refs), deleted_blob_count=0
                )
            doomed = [ref for ref in refs if ref not in keep]
            for ref in doomed:
                table.delete_blob(ref)
            return GcReport(
                root_count=len(heads),
                retained_blob_count=len(refs) - len(doomed),
                deleted_blob_count=len(doomed),
            )

        return await self._run(op, writes=True)


class SessionHandle:
    """One session's head: load it, commit to it, manage its nodes."""

    def __init__(self, facet: SessionFacet, session_id: str | None) -> None:
        self._facet = facet
        self._bound = session_id

    @property
    def session_id(self) -> str | None:
        """The bound session, or None until the first commit binds one."""
        return self._bound

    async def load(self, scope: ReadScope | None = None) -> SessionRead | None:
        """The session as committed (None before the first commit, or unbound).

        Raises:
            UnsupportedReadScope: ``scope`` is not FullGraph() or ActivePath(leaf).
            CorruptRecordError: the stored session cannot be decoded.
        """
        scope = FullGraph() if scope is None else scope
        if not isinstance(scope, FullGraph | ActivePath):
            raise UnsupportedReadScope(scope)
        session_id = self._bound
        if session_id is None:
            return None

        def op(table: SessionTable) -> SessionRead | None:
            head = table.head(session_id)
            if head is None:
                return None

            def decode() -> SessionRead:
                nodes = [
                    node_from_json(text) for _, text, dead in table.nodes(session_id) if not dead
                ]
                usage = [_usage_from_json(t) for t in table.usage(session_id)]
                blobs = {ref: table.blob(ref) for ref in _head_refs(table, head)}
                return build_read(
                    head, nodes, usage, {k: v for k, v in blobs.items() if v is not None}, scope
                )

            return _decode("sessions", session_id, decode)

        return await self._facet._run(op, writes=False)

    async def load_node(self, node_id: str) -> SessionNode | None:
        """One live node of the session, or None (unknown or tombstoned)."""
        check_text("node_id", node_id)
        session_id = self._bound
        if session_id is None:
            return None

        def op(table: SessionTable) -> SessionNode | None:
            found = table.node(session_id, node_id)
            if found is None or found[1]:
                return None
            return _decode("graph_nodes", node_id, lambda: node_from_json(found[0]))

        return await self._facet._run(op, writes=False)

    async def tombstone_nodes(self, node_ids: Sequence[str]) -> int:
        """Hide nodes from loads (``vacuum`` deletes them); how many were hidden now."""
        ids = _check_ids(node_ids)
        session_id = self._bound
        if session_id is None:
            return 0
        return await self._facet._run(lambda t: t.tombstone(session_id, ids), writes=True)

    async def commit(self, commit: RuntimeCommit) -> CommitResult:
        """Apply a runtime commit atomically (see :mod:`turnbuckle.sansio.session`).

        Raises:
            SessionBindingMismatch: the handle is bound to another session.
            RuntimeTurnCommitConflict: the turn id was committed with another hash.
            SessionExecutionLeaseExpired: no live lease fence (and not a replay).
            HeadRevisionConflict: the head moved since ``expected_head_revision``.
            QueuedWorkClaimExpired: a completed claim no longer owns its batches.
            InvalidArgument, PayloadNotSerializable, PayloadTooLarge: a malformed commit.
        """
        facet = self._facet
        check_commit_shape(commit, facet._limit)
        bound, now = self._bound, facet._clock.now_ms()

        def op(table: SessionTable) -> CommitResult:
            session_id = commit.session_id
            stamp = None
            if commit.turn_commit is not None:
                stamp = table.stamp(session_id, commit.turn_commit.turn_id)
            claimed = [[table.batch(i) for i in c.batch_ids] for c in commit.completed_claims]
            plan = check_commit(
                commit,
                bound_session=bound,
                head=table.head(session_id),
                lease=_lease_row(table, session_id),
                stamp=stamp,
                claimed=claimed,
                now_ms=now,
            )
            if not plan.replay:
                _apply(table, commit, plan, now)
            if plan.lease is not None:
                table.put_lease(plan.lease)
            return plan.result

        result = await facet._run(op, writes=True)
        if self._bound is None:
            self._bound = commit.session_id
        return result


def _apply(table: SessionTable, commit: RuntimeCommit, plan: CommitPlan, now: int) -> None:
    assert plan.head is not None
    session_id = commit.session_id
    for ref, content in plan.blobs:
        table.put_blob(ref, content)
    table.add_usage(session_id, [_usage_json(e) for e in plan.usage])
    if plan.replace_graph:
        table.clear_nodes(session_id)
    for node in plan.nodes:
        if table.node(session_id, node.node_id) is not None:
            raise InvalidArgument(f"node {node.node_id!r} already exists in the session")
    table.add_nodes(session_id, [(n.node_id, node_to_json(n)) for n in plan.nodes])
    expected = plan.head.head_revision - 1
    if not table.put_head(plan.head, expected):
        raise ConcurrentModification(session_id)
    for delivered in plan.deliveries:
        if not table.delete_batch(delivered.row.batch_id):
            raise QueuedWorkClaimExpired(session_id, delivered.row.batch_id)
        table.insert_delivery(delivered)
    table.commit_attachments(session_id, plan.attachment_ids, now)
    if plan.stamp is not None:
        table.put_stamp(plan.stamp)


def _checkpoint_ref(head: HeadRow) -> str:
    state = decode_json(head.state)
    ref = state.get("checkpoint_ref") if isinstance(state, dict) else None
    if not isinstance(ref, str):
        raise ValueError(f"session {head.session_id!r} has no checkpoint ref")
    return ref


def _head_refs(table: SessionTable, head: HeadRow) -> list[str]:
    root = _checkpoint_ref(head)
    manifest = table.blob(root)
    if manifest is None:
        raise ValueError(f"missing checkpoint manifest {root}")
    return [root, *manifest_children(manifest)]


def _batch(row: QueuedBatchRow) -> QueuedWorkBatch:
    return _decode("queued_work", row.batch_id, row.batch)


def _row_of(found: QueuedBatchRow | DeliveryRow) -> QueuedBatchRow:
    return found.row if isinstance(found, DeliveryRow) else found


def _ready(row: QueuedBatchRow, now_ms: int) -> bool:
    """Deliverable now, if nobody (alive) holds it."""
    return not row.parked and row.available_at_ms <= now_ms


def _renew_claim(
    table: SessionTable, claim: QueuedWorkClaim, ttl_ms: int, now_ms: int
) -> QueuedWorkClaim:
    rows = [table.batch(b.batch_id) for b in claim.batches]
    renewed, fresh = renew_rows(
        rows, claim, ttl_ms, now_ms=now_ms, lease_fencing=_grant(table, claim.session_id)
    )
    for row in renewed:
        table.update_batch(row, claim.lease_token)
    return fresh


def _check_session(session_id: object, limit: int) -> None:
    check_text("session_id", session_id, limit=limit)
    if not session_id:
        raise InvalidArgument("session_id must not be empty")


def _check_ids(ids: object) -> tuple[str, ...]:
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise InvalidArgument(f"expected a sequence of ids, got {ids!r}")
    for i in ids:
        check_text("id", i)
    return tuple(ids)


def _check_claim(claim: object) -> None:
    if not isinstance(claim, QueuedWorkClaim):
        raise InvalidArgument(f"expected a QueuedWorkClaim, got {claim!r}")
