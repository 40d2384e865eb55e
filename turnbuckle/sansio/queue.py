"""Durable queued work for a session, as pure decisions.

Theory of operation
-------------------

Queued work is the one durable way into a busy session: a message that arrives while a turn runs,
a process wake, a session command. Each enqueue is one *batch* of items with policies:

- ``delivery``: ``earliest_safe_boundary`` work may be injected into a running turn at its next
  checkpoint; ``after_current_turn_commit`` work waits until the session is idle.
- ``slot``: an ``exclusive`` batch is delivered alone; a ``join`` batch is delivered together with
  the join batches right behind it that share its delivery policy and merge key.
- ``merge_key``: ``never`` (join nothing), ``payload_default`` (join other ``payload_default``
  work) or a named group (join the same group).
- ``available_at_ms``: not deliverable before then (a later batch may go first).
- ``source_key``: idempotency for as long as the session's history is kept. Enqueueing the same
  key again returns the original batch, queued or already delivered; the same key with other
  content is refused, naming the original.

A batch lives as a queue row until a commit delivers it; then its row moves to the session's
deliveries, with the turn that delivered it and that turn's recorded outcome::

    pending --claim--> claimed --completion in a commit--> delivered (kept, with the outcome)
       ^  |               |  \\--abandon, expiry, or a newer lease grant--> pending
       |  |               |  \\--fail: the failure count reaches the limit--> parked
       |  \\--cancel--> deleted                                               |
       +--------------------------------- unpark (resubmit) --------------------+

**Order.** Claims (:func:`select_claim_prefix`) take a prefix of the session's deliverable
batches in enqueue order: nothing if a checkpoint claim finds ``after_current_turn_commit`` work
at the head (the head blocks everything behind it), else the head alone if it is exclusive, else
the head and the joinable batches right behind it, up to ``max_batches``. Which batches count as
deliverable is what keeps order across lease handovers and crashes:

- Every claim records the session lease grant it was taken under (its fencing token). A claim is
  live only while that grant is still the session's latest one, and not expired: as soon as a
  newer lease is granted, every claim of the older holder is void, so the new holder gets the
  head of the queue at once, never the work behind a dead runtime's claim.
- An ``idle`` claim is the start of a turn: the claimer has no turn in progress, so any claim
  still on the queue is left over from a turn that is over. It starts from the head whoever
  claimed it, and ends every other claim on the session's queue (:func:`ended_claims`): none
  of them can complete or renew any more, and none is skipped by the new turn's checkpoints.
- A ``checkpoint`` claim comes from inside the running turn: it skips the batches its own grant
  holds (the turn is delivering them) and takes the prefix right behind them.
- Parked batches are dead letters: no claim takes them, so the work behind them goes on.

Each claim's fencing token is one more than the last one the head batch saw, so reclaiming always
yields a higher token, and a completion must still own *every* batch of its claim, under the
grant of the commit's own lease, or the whole commit is refused.

**Failures.** A turn that fails for a reason retrying will not cure hands its claim back with
:func:`fail_rows`: each batch counts the failure and keeps the error; at the caller's limit it is
parked, with the error, until it is unparked (resubmitted, from its old place in the queue) or
cancelled.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import ClassVar, Final

import attrs

from turnbuckle.errors import InvalidArgument, QueuedWorkClaimExpired, QueuedWorkSourceKeyConflict
from turnbuckle.sansio.codec import (
    JSON,
    check_int64,
    check_text,
    decode_json,
    encode_json,
    sequence,
)
from turnbuckle.sansio.ids import IdSource, random_hex
from turnbuckle.sansio.lease import check_ttl

__all__ = [
    "MAX_CLAIM_BATCHES",
    "ClaimBoundary",
    "DeliveryPolicy",
    "DeliveryRow",
    "MergeKey",
    "QueuedBatchRow",
    "QueuedWorkBatch",
    "QueuedWorkClaim",
    "QueuedWorkCompletion",
    "QueuedWorkDraft",
    "QueuedWorkItem",
    "QueuedWorkStatus",
    "SlotPolicy",
    "SubmitStatus",
    "Ticket",
    "WorkState",
    "abandon_rows",
    "check_batch_ids",
    "check_completion",
    "claim_rows",
    "deliver_row",
    "ended_claims",
    "fail_rows",
    "is_claimed",
    "is_pending",
    "new_batch_row",
    "renew_rows",
    "same_work",
    "select_by_batch_ids",
    "select_claim_prefix",
    "unpark_row",
]

#: Most batches one claim may take.
MAX_CLAIM_BATCHES: Final = 1024


class DeliveryPolicy(enum.Enum):
    """When queued work may reach the session."""

    #: At the next checkpoint of a running turn, or when idle.
    EARLIEST_SAFE_BOUNDARY = "earliest_safe_boundary"
    #: Only when the session is idle (after the running turn commits).
    AFTER_CURRENT_TURN_COMMIT = "after_current_turn_commit"


class SlotPolicy(enum.Enum):
    """Whether a batch is delivered alone or with its neighbours."""

    JOIN = "join"
    EXCLUSIVE = "exclusive"


class ClaimBoundary(enum.Enum):
    """Where the claimer stands: between turns, or at a running turn's checkpoint."""

    IDLE = "idle"
    ACTIVE_TURN_CHECKPOINT = "active_turn_checkpoint"


@attrs.frozen
class MergeKey:
    """Which join batches may be delivered together: ``MergeKey.NEVER``,
    ``MergeKey.PAYLOAD_DEFAULT`` or ``MergeKey.group(name)``; the wire forms are ``never``,
    ``payload_default`` and ``group:NAME``."""

    wire: str
    #: Join nothing: the batch is delivered alone even with a join slot.
    NEVER: ClassVar[MergeKey]
    #: Join other ``payload_default`` work.
    PAYLOAD_DEFAULT: ClassVar[MergeKey]

    @classmethod
    def group(cls, name: str) -> MergeKey:
        """Join only batches of the group ``name``.

        Raises:
            InvalidArgument: ``name`` is not a non-empty str.
        """
        check_text("merge group", name)
        if not name:
            raise InvalidArgument("a merge group needs a name")
        return cls(f"group:{name}")

    @classmethod
    def from_wire(cls, wire: str) -> MergeKey:
        """Parse the wire form.

        Raises:
            ValueError: not a merge key's wire form.
        """
        if wire in ("never", "payload_default") or (wire.startswith("group:") and wire[6:]):
            return cls(wire)
        raise ValueError(f"not a merge key: {wire!r}")

    def joins(self, other: MergeKey) -> bool:
        """True if batches with these keys may be delivered together."""
        return self.wire != "never" and self.wire == other.wire


MergeKey.NEVER = MergeKey("never")
MergeKey.PAYLOAD_DEFAULT = MergeKey("payload_default")


@attrs.frozen(kw_only=True)
class QueuedWorkDraft:
    """What a caller enqueues: one batch of payloads (plain JSON values) for one session."""

    session_id: str
    delivery: DeliveryPolicy
    slot: SlotPolicy
    payloads: tuple[JSON, ...] = attrs.field(converter=sequence)
    source_key: str | None = None
    merge_key: MergeKey = MergeKey.NEVER
    available_at_ms: int = 0


@attrs.frozen(kw_only=True)
class QueuedWorkItem:
    item_id: str
    payload: JSON


@attrs.frozen(kw_only=True)
class QueuedWorkBatch:
    """An enqueued batch, as callers see it."""

    batch_id: str
    session_id: str
    #: Position in the store-wide enqueue order; delivery follows it.
    enqueue_seq: int
    source_key: str | None
    delivery: DeliveryPolicy
    slot: SlotPolicy
    merge_key: MergeKey
    available_at_ms: int
    enqueued_at_ms: int
    items: tuple[QueuedWorkItem, ...]
    #: Turns that took this batch and failed (see :func:`fail_rows`).
    failures: int = 0
    #: Why the last of those turns failed.
    last_error: str | None = None
    #: Parked (dead-lettered): no claim takes it until it is unparked.
    parked: bool = False


@attrs.frozen(kw_only=True)
class QueuedWorkCompletion:
    """What a commit presents to deliver the batches of a claim."""

    session_id: str
    claim_id: str
    lease_token: str
    batch_ids: tuple[str, ...]


@attrs.frozen(kw_only=True)
class QueuedWorkClaim:
    """A claim on a prefix of a session's queued work."""

    session_id: str
    claim_id: str
    owner_id: str
    lease_token: str
    fencing_token: int
    claimed_at_ms: int
    expires_at_ms: int
    batches: tuple[QueuedWorkBatch, ...]

    def completion(self) -> QueuedWorkCompletion:
        """The completion to put in the commit that delivers this work."""
        return QueuedWorkCompletion(
            session_id=self.session_id,
            claim_id=self.claim_id,
            lease_token=self.lease_token,
            batch_ids=tuple(b.batch_id for b in self.batches),
        )


class SubmitStatus(enum.Enum):
    """What a submit did."""

    #: Enqueued now.
    NEW = "new"
    #: The source key was submitted before with the same content: nothing was enqueued, the
    #: ticket is the original's (queued, parked or already answered).
    DUPLICATE = "duplicate"
    #: The source key was submitted before with *other* content: nothing was enqueued, the
    #: ticket is the original's.
    CONFLICT = "conflict"


@attrs.frozen(kw_only=True)
class Ticket:
    """The receipt of a submitted message: what to ask for its answer with, from any process,
    for as long as the session's history is kept."""

    session_id: str
    batch_id: str
    source_key: str | None = None
    status: SubmitStatus = SubmitStatus.NEW


class WorkState(enum.Enum):
    """Where a batch is: waiting (claimed or not), parked, or delivered by a commit."""

    QUEUED = "queued"
    PARKED = "parked"
    DELIVERED = "delivered"


@attrs.frozen(kw_only=True)
class QueuedWorkStatus:
    """One batch's state; for a delivered batch, the turn that delivered it and the outcome
    that turn's commit recorded (the durable answer to the message)."""

    batch: QueuedWorkBatch
    state: WorkState
    turn_id: str | None = None
    head_revision: int | None = None
    outcome: JSON = None
    delivered_at_ms: int | None = None


@attrs.frozen(kw_only=True)
class QueuedBatchRow:
    """A batch as a store keeps it: payloads as canonical JSON text, plus its claim columns.

    ``claim_fencing_token`` survives abandon and expiry, so the next claim's token is higher;
    ``claim_lease_fencing`` is the fencing token of the session lease grant the claim was taken
    under (a newer grant voids the claim).
    """

    batch_id: str
    session_id: str
    enqueue_seq: int
    source_key: str | None
    delivery: str
    slot: str
    merge_key: str
    available_at_ms: int
    enqueued_at_ms: int
    #: (item_id, payload JSON text) in order.
    items: tuple[tuple[str, str], ...]
    claim_id: str | None = None
    claim_owner_id: str | None = None
    claim_token: str | None = None
    claim_fencing_token: int = 0
    claimed_at_ms: int = 0
    claim_expires_at_ms: int = 0
    claim_lease_fencing: int = 0
    failures: int = 0
    last_error: str | None = None
    parked: bool = False

    def batch(self) -> QueuedWorkBatch:
        """Decode for callers.

        Raises:
            ValueError: a column holds something no turnbuckle wrote (stores turn this into
                ``CorruptRecordError``).
        """
        return QueuedWorkBatch(
            batch_id=self.batch_id,
            session_id=self.session_id,
            enqueue_seq=self.enqueue_seq,
            source_key=self.source_key,
            delivery=DeliveryPolicy(self.delivery),
            slot=SlotPolicy(self.slot),
            merge_key=MergeKey.from_wire(self.merge_key),
            available_at_ms=self.available_at_ms,
            enqueued_at_ms=self.enqueued_at_ms,
            items=tuple(
                QueuedWorkItem(item_id=item_id, payload=decode_json(text))
                for item_id, text in self.items
            ),
            failures=self.failures,
            last_error=self.last_error,
            parked=self.parked,
        )

    def status(self) -> QueuedWorkStatus:
        """This (still queued) batch's status.

        Raises:
            ValueError: as :meth:`batch`.
        """
        state = WorkState.PARKED if self.parked else WorkState.QUEUED
        return QueuedWorkStatus(batch=self.batch(), state=state)


@attrs.frozen(kw_only=True)
class DeliveryRow:
    """A delivered batch as a store keeps it: the queue row as it was delivered (claim columns
    cleared), the turn that delivered it, and that turn's outcome as canonical JSON text."""

    row: QueuedBatchRow
    turn_id: str | None
    head_revision: int
    outcome: str | None
    delivered_at_ms: int

    def status(self) -> QueuedWorkStatus:
        """The delivered batch's status, with its recorded outcome.

        Raises:
            ValueError: a column holds something no turnbuckle wrote.
        """
        return QueuedWorkStatus(
            batch=self.row.batch(),
            state=WorkState.DELIVERED,
            turn_id=self.turn_id,
            head_revision=self.head_revision,
            outcome=None if self.outcome is None else decode_json(self.outcome),
            delivered_at_ms=self.delivered_at_ms,
        )


def new_batch_row(
    draft: QueuedWorkDraft, *, enqueue_seq: int, now_ms: int, ids: IdSource, limit: int
) -> QueuedBatchRow:
    """Validate a draft and make its row (``enqueue_seq`` is the store's next position).

    Raises:
        InvalidArgument: a field of the wrong type or range, or no payloads.
        PayloadNotSerializable, PayloadTooLarge: a payload is not plain JSON or too large.
    """
    if not isinstance(draft, QueuedWorkDraft):
        raise InvalidArgument(f"expected a QueuedWorkDraft, got {draft!r}")
    check_text("session_id", draft.session_id, limit=limit)
    check_text("source_key", draft.source_key, optional=True, limit=limit)
    for name, kind in (("delivery", DeliveryPolicy), ("slot", SlotPolicy), ("merge_key", MergeKey)):
        if not isinstance(getattr(draft, name), kind):
            raise InvalidArgument(f"{name} must be a {kind.__name__}, got {getattr(draft, name)!r}")
    check_int64("available_at_ms", draft.available_at_ms)
    if not draft.payloads:
        raise InvalidArgument("a queued-work batch needs at least one payload")
    batch_id = f"qwb:{random_hex(ids)}"
    return QueuedBatchRow(
        batch_id=batch_id,
        session_id=draft.session_id,
        enqueue_seq=enqueue_seq,
        source_key=draft.source_key,
        delivery=draft.delivery.value,
        slot=draft.slot.value,
        merge_key=draft.merge_key.wire,
        available_at_ms=draft.available_at_ms,
        enqueued_at_ms=now_ms,
        items=tuple(
            (f"{batch_id}:{index}", encode_json(payload, limit=limit))
            for index, payload in enumerate(draft.payloads)
        ),
    )


def same_work(existing: QueuedBatchRow, fresh: QueuedBatchRow) -> QueuedBatchRow:
    """The answer to enqueueing ``fresh`` when ``existing`` (queued or delivered) has its source
    key: the original batch, if it is the same work.

    Raises:
        QueuedWorkSourceKeyConflict: the key was used for different work.
    """

    def content(row: QueuedBatchRow) -> tuple[object, ...]:
        return (
            row.delivery,
            row.slot,
            row.merge_key,
            row.available_at_ms,
            tuple(text for _, text in row.items),
        )

    if content(existing) != content(fresh):
        assert fresh.source_key is not None
        raise QueuedWorkSourceKeyConflict(fresh.session_id, fresh.source_key, existing.batch_id)
    return existing


def is_claimed(row: QueuedBatchRow, now_ms: int, lease_fencing: int) -> bool:
    """True while a claim holds the batch: not expired, and taken under the session's latest
    lease grant (``lease_fencing``, the fencing token of the session's lease row)."""
    return (
        row.claim_token is not None
        and now_ms < row.claim_expires_at_ms
        and row.claim_lease_fencing == lease_fencing
    )


def is_pending(row: QueuedBatchRow, now_ms: int, lease_fencing: int) -> bool:
    """True if the batch waits for a claim: not parked, and no live claim holds it."""
    return not row.parked and not is_claimed(row, now_ms, lease_fencing)


def _check_max(max_batches: object) -> int:
    count = check_int64("max_batches", max_batches)
    if count > MAX_CLAIM_BATCHES:
        raise InvalidArgument(f"max_batches must be at most {MAX_CLAIM_BATCHES}, got {count}")
    return count


def select_claim_prefix(
    rows: Sequence[QueuedBatchRow],
    boundary: ClaimBoundary,
    max_batches: int,
    *,
    now_ms: int,
    lease_fencing: int,
) -> tuple[QueuedBatchRow, ...]:
    """The batches a claim takes from one session's rows (in enqueue order) under the lease
    grant ``lease_fencing``; () for none. See the module docstring for the rules.

    Raises:
        InvalidArgument: ``boundary`` is not a ClaimBoundary or ``max_batches`` out of range.
    """
    if not isinstance(boundary, ClaimBoundary):
        raise InvalidArgument(f"boundary must be a ClaimBoundary, got {boundary!r}")
    limit = _check_max(max_batches)
    idle = boundary is ClaimBoundary.IDLE
    candidates = [
        r
        for r in rows
        if not r.parked
        and r.available_at_ms <= now_ms
        and (idle or not is_claimed(r, now_ms, lease_fencing))
    ]
    if limit == 0 or not candidates:
        return ()
    head = candidates[0]
    if not idle and head.delivery != DeliveryPolicy.EARLIEST_SAFE_BOUNDARY.value:
        return ()  # the head blocks everything behind it: work is never reordered
    if head.slot == SlotPolicy.EXCLUSIVE.value:
        return (head,)
    key = MergeKey.from_wire(head.merge_key)
    taken = [head]
    for row in candidates[1:]:
        if len(taken) == limit:
            break
        if (
            row.slot != SlotPolicy.JOIN.value
            or row.delivery != head.delivery
            or not key.joins(MergeKey.from_wire(row.merge_key))
        ):
            break
        taken.append(row)
    return tuple(taken)


def check_batch_ids(batch_ids: object) -> tuple[str, ...]:
    """Validate the ids of an exact claim.

    Raises:
        InvalidArgument: not a non-empty sequence of str.
    """
    if isinstance(batch_ids, str) or not isinstance(batch_ids, Sequence):
        raise InvalidArgument(f"batch_ids must be a non-empty sequence of str, got {batch_ids!r}")
    ids = tuple(batch_ids)
    if not ids or not all(type(i) is str for i in ids):
        raise InvalidArgument(f"batch_ids must be a non-empty sequence of str, got {batch_ids!r}")
    return ids


def select_by_batch_ids(
    rows: Sequence[QueuedBatchRow],
    boundary: ClaimBoundary,
    batch_ids: Sequence[str],
    *,
    now_ms: int,
    lease_fencing: int,
) -> tuple[QueuedBatchRow, ...]:
    """The batches named, if they are exactly the prefix a claim would take now; else ().
    An exact claim never skips earlier work.

    Raises:
        InvalidArgument: ``batch_ids`` is empty or not a sequence of str.
    """
    ids = check_batch_ids(batch_ids)
    prefix = select_claim_prefix(
        rows, boundary, len(ids), now_ms=now_ms, lease_fencing=lease_fencing
    )
    return prefix if tuple(r.batch_id for r in prefix) == ids else ()


def claim_rows(
    selected: Sequence[QueuedBatchRow],
    owner_id: str,
    ttl_ms: int,
    *,
    now_ms: int,
    ids: IdSource,
    lease_fencing: int,
) -> tuple[tuple[QueuedBatchRow, ...], QueuedWorkClaim]:
    """Claim the selected batches (from :func:`select_claim_prefix`) for ``owner_id`` under the
    lease grant ``lease_fencing``.

    Raises:
        InvalidArgument: an empty owner or a ttl out of range.
    """
    check_text("owner_id", owner_id)
    if not owner_id:
        raise InvalidArgument("owner_id must not be empty")
    ttl = check_ttl(ttl_ms)
    assert selected, "claim_rows needs at least one batch"
    head = selected[0]
    fencing = head.claim_fencing_token + 1
    claim_id = f"qwc:{head.enqueue_seq}:{fencing}"
    token = random_hex(ids)
    claimed = tuple(
        attrs.evolve(
            row,
            claim_id=claim_id,
            claim_owner_id=owner_id,
            claim_token=token,
            claim_fencing_token=fencing,
            claimed_at_ms=now_ms,
            claim_expires_at_ms=now_ms + ttl,
            claim_lease_fencing=lease_fencing,
        )
        for row in selected
    )
    claim = QueuedWorkClaim(
        session_id=head.session_id,
        claim_id=claim_id,
        owner_id=owner_id,
        lease_token=token,
        fencing_token=fencing,
        claimed_at_ms=now_ms,
        expires_at_ms=now_ms + ttl,
        batches=tuple(row.batch() for row in claimed),
    )
    return claimed, claim


def _owns(row: QueuedBatchRow | None, claim_id: str, token: str) -> bool:
    return row is not None and row.claim_id == claim_id and row.claim_token == token


def check_completion(
    rows: Sequence[QueuedBatchRow | None], completion: QueuedWorkCompletion, lease_fencing: int
) -> None:
    """Check that a completion still owns every batch it names (``rows`` in the same order;
    None for a batch that is gone), under the lease grant ``lease_fencing`` of the commit.

    Raises:
        QueuedWorkClaimExpired: some batch was abandoned, reclaimed, cancelled or delivered,
            or the claim was taken under another lease grant.
    """
    if (
        not completion.batch_ids
        or len(rows) != len(completion.batch_ids)
        or not all(
            _owns(row, completion.claim_id, completion.lease_token)
            and row is not None
            and row.claim_lease_fencing == lease_fencing
            for row in rows
        )
    ):
        raise QueuedWorkClaimExpired(completion.session_id, completion.claim_id)


def renew_rows(
    rows: Sequence[QueuedBatchRow | None],
    claim: QueuedWorkClaim,
    ttl_ms: int,
    *,
    now_ms: int,
    lease_fencing: int,
) -> tuple[tuple[QueuedBatchRow, ...], QueuedWorkClaim]:
    """Extend a live claim that still owns all its batches.

    Raises:
        QueuedWorkClaimExpired: the claim expired, lost a batch, or a newer lease was granted.
        InvalidArgument: a ttl out of range.
    """
    ttl = check_ttl(ttl_ms)
    if not all(
        row is not None
        and _owns(row, claim.claim_id, claim.lease_token)
        and is_claimed(row, now_ms, lease_fencing)
        for row in rows
    ) or len(rows) != len(claim.batches):
        raise QueuedWorkClaimExpired(claim.session_id, claim.claim_id)
    expires = max(claim.expires_at_ms, now_ms + ttl)
    renewed = tuple(
        attrs.evolve(row, claim_expires_at_ms=expires) for row in rows if row is not None
    )
    return renewed, attrs.evolve(claim, expires_at_ms=expires)


def _unclaimed(row: QueuedBatchRow) -> QueuedBatchRow:
    return attrs.evolve(
        row,
        claim_id=None,
        claim_owner_id=None,
        claim_token=None,
        claimed_at_ms=0,
        claim_expires_at_ms=0,
        claim_lease_fencing=0,
    )


def ended_claims(
    rows: Sequence[QueuedBatchRow], claimed: Sequence[QueuedBatchRow]
) -> tuple[QueuedBatchRow, ...]:
    """The other claimed rows of the session, given back, when an idle claim takes ``claimed``
    (see the module docstring): a turn that is over (dropped after its commit was refused, or
    cut off by a lost lease that was then taken again as the same grant) left them claimed,
    and the new turn's checkpoint claims must not skip them."""
    taken = {row.batch_id for row in claimed}
    return tuple(
        _unclaimed(row) for row in rows if row.claim_token is not None and row.batch_id not in taken
    )


def abandon_rows(
    rows: Sequence[QueuedBatchRow | None], claim: QueuedWorkClaim
) -> tuple[QueuedBatchRow, ...]:
    """The batches to give back to the queue: those the claim still owns (idempotent; a
    batch already reclaimed by someone else is left alone)."""
    return tuple(
        _unclaimed(row)
        for row in rows
        if row is not None and _owns(row, claim.claim_id, claim.lease_token)
    )


def fail_rows(
    rows: Sequence[QueuedBatchRow | None], claim: QueuedWorkClaim, error: str, max_failures: int
) -> tuple[QueuedBatchRow, ...]:
    """Give back the batches the claim still owns after a failed turn: each counts the failure
    and keeps ``error``; those that reached ``max_failures`` failures are parked.

    Raises:
        InvalidArgument: ``error`` is not a str or ``max_failures`` is not a positive int.
    """
    check_text("error", error)
    check_int64("max_failures", max_failures, minimum=1)
    failed = []
    for row in rows:
        if row is None or not _owns(row, claim.claim_id, claim.lease_token):
            continue
        failures = row.failures + 1
        failed.append(
            attrs.evolve(
                _unclaimed(row),
                failures=failures,
                last_error=error,
                parked=failures >= max_failures,
            )
        )
    return tuple(failed)


def unpark_row(row: QueuedBatchRow) -> QueuedBatchRow:
    """A parked batch back in the queue, at its old place, with its failures forgotten."""
    return attrs.evolve(row, parked=False, failures=0, last_error=None)


def deliver_row(
    row: QueuedBatchRow,
    *,
    turn_id: str | None,
    head_revision: int,
    outcome: str | None,
    now_ms: int,
) -> DeliveryRow:
    """What a commit keeps of a batch it delivered."""
    return DeliveryRow(
        row=_unclaimed(row),
        turn_id=turn_id,
        head_revision=head_revision,
        outcome=outcome,
        delivered_at_ms=now_ms,
    )
