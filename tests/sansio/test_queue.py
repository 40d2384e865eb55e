"""Queued work: claim selection, fencing, completion, failures and idempotency, as pure decisions.

These are the reference conformance rules (lash runtime_persistence scenarios 8-15) checked
against the decisions alone, with turnbuckle's order across lease handovers (claims void under a
newer grant, idle claims from the head) and parking; the store suites check them again through
every adapter."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnbuckle.errors import (
    InvalidArgument,
    PayloadNotSerializable,
    QueuedWorkClaimExpired,
    QueuedWorkSourceKeyConflict,
)
from turnbuckle.sansio.queue import (
    ClaimBoundary,
    DeliveryPolicy,
    MergeKey,
    QueuedBatchRow,
    QueuedWorkDraft,
    SlotPolicy,
    WorkState,
    abandon_rows,
    check_completion,
    claim_rows,
    deliver_row,
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
from turnbuckle.testing import SeededIds

ESB, ACTC = DeliveryPolicy.EARLIEST_SAFE_BOUNDARY, DeliveryPolicy.AFTER_CURRENT_TURN_COMMIT
JOIN, EXCL = SlotPolicy.JOIN, SlotPolicy.EXCLUSIVE
IDLE, CHECKPOINT = ClaimBoundary.IDLE, ClaimBoundary.ACTIVE_TURN_CHECKPOINT
NOW = 10_000
#: The session lease grant (fencing token) the claims below are taken under.
G = 3
_ids = SeededIds(5)


def batch(
    seq: int,
    delivery: DeliveryPolicy = ESB,
    slot: SlotPolicy = JOIN,
    merge: MergeKey = MergeKey.PAYLOAD_DEFAULT,
    available_at_ms: int = 0,
    text: str = "hi",
    session: str = "root",
    source_key: str | None = None,
) -> QueuedBatchRow:
    draft = QueuedWorkDraft(
        session_id=session,
        delivery=delivery,
        slot=slot,
        payloads=[{"text": text}],
        merge_key=merge,
        available_at_ms=available_at_ms,
        source_key=source_key,
    )
    return new_batch_row(draft, enqueue_seq=seq, now_ms=NOW, ids=_ids, limit=1 << 20)


def seqs(rows: Sequence[QueuedBatchRow]) -> list[int]:
    return [r.enqueue_seq for r in rows]


def claim(
    rows: Sequence[QueuedBatchRow],
    boundary: ClaimBoundary = IDLE,
    max_batches: int = 10,
    now: int = NOW,
    ttl: int = 60_000,
    grant: int = G,
):  # type: ignore[no-untyped-def]
    selected = select_claim_prefix(rows, boundary, max_batches, now_ms=now, lease_fencing=grant)
    if not selected:
        return None
    return claim_rows(selected, "owner", ttl, now_ms=now, ids=_ids, lease_fencing=grant)


def select(
    rows: Sequence[QueuedBatchRow],
    boundary: ClaimBoundary = IDLE,
    max_batches: int = 10,
    now: int = NOW,
    grant: int = G,
) -> tuple[QueuedBatchRow, ...]:
    return select_claim_prefix(rows, boundary, max_batches, now_ms=now, lease_fencing=grant)


def apply(rows: list[QueuedBatchRow], changed: Sequence[QueuedBatchRow]) -> list[QueuedBatchRow]:
    by_id = {r.batch_id: r for r in changed}
    return [by_id.get(r.batch_id, r) for r in rows]


def test_checkpoint_claims_wait_behind_after_commit_work() -> None:
    rows = [batch(1, ACTC, EXCL), batch(2, ESB, EXCL)]
    assert select(rows, CHECKPOINT) == ()
    claimed, idle_claim = claim(rows)
    assert seqs(claimed) == [1]
    rows = apply(rows, claimed)
    # The grant's own turn holds the head: its checkpoint takes the earliest-safe-boundary
    # batch right behind it (lash scenario 11, by the holder of the current lease).
    assert seqs(select(rows, CHECKPOINT)) == [2]
    rows = apply(rows, abandon_rows(claimed, idle_claim))
    claimed2, reclaimed = claim(rows)
    assert seqs(claimed2) == [1] and reclaimed.fencing_token > idle_claim.fencing_token
    renewed_rows, renewed = renew_rows(
        claimed2, reclaimed, 120_000, now_ms=NOW + 5, lease_fencing=G
    )
    assert (renewed.claim_id, renewed.lease_token) == (reclaimed.claim_id, reclaimed.lease_token)
    assert renewed.expires_at_ms == NOW + 5 + 120_000
    assert all(r.claim_expires_at_ms == renewed.expires_at_ms for r in renewed_rows)


def test_a_newer_lease_grant_voids_every_older_claim() -> None:
    """Runtime A (grant G) claims the head and dies; runtime B takes the lease (grant G + 1)
    while A's claim has not expired: the head is B's at once, at the idle boundary and at a
    checkpoint alike, and A's claim can neither renew nor complete."""
    rows = [batch(1, slot=EXCL), batch(2, slot=EXCL)]
    claimed, dead = claim(rows, ttl=60_000)
    rows = apply(rows, claimed)
    assert is_claimed(rows[0], NOW, G) and not is_pending(rows[0], NOW, G)
    assert not is_claimed(rows[0], NOW, G + 1) and is_pending(rows[0], NOW, G + 1)
    assert seqs(select(rows, IDLE, grant=G + 1)) == [1]
    assert seqs(select(rows, CHECKPOINT, grant=G + 1)) == [1]
    taken, fresh = claim(rows, grant=G + 1)
    assert seqs(taken) == [1] and fresh.fencing_token > dead.fencing_token
    with pytest.raises(QueuedWorkClaimExpired):
        renew_rows(claimed, dead, 1000, now_ms=NOW, lease_fencing=G + 1)
    with pytest.raises(QueuedWorkClaimExpired):
        check_completion(claimed, dead.completion(), G + 1)  # its rows, a newer commit's grant
    check_completion(taken, fresh.completion(), G + 1)


def test_an_idle_claim_starts_from_the_head_whoever_holds_it() -> None:
    """The idle boundary is the start of a turn: a claim still on the queue belongs to a turn
    that is over, even one of the same grant, so nothing behind it goes first."""
    rows = [batch(1, slot=EXCL), batch(2, slot=EXCL)]
    claimed, first = claim(rows)
    rows = apply(rows, claimed)
    again, second = claim(rows)
    assert seqs(again) == [1] and second.fencing_token > first.fencing_token
    with pytest.raises(QueuedWorkClaimExpired):
        check_completion(apply(rows, again)[:1], first.completion(), G)


def test_an_idle_claim_ends_every_other_claim() -> None:
    """A dropped turn held b1 (idle) and b2 (checkpoint) under this grant; the next turn's idle
    claim takes b1 and ends the claim on b2, so its checkpoint takes b2, not b3."""
    rows = [batch(1, slot=EXCL), batch(2, slot=EXCL), batch(3, slot=EXCL)]
    first, _ = claim(rows)
    rows = apply(rows, first)
    second, _ = claim(rows, CHECKPOINT)
    rows = apply(rows, second)
    assert seqs(select(rows, CHECKPOINT)) == [3], "without ending them, b2 would be skipped"
    again = select(rows)
    assert seqs(again) == [1]
    ended = ended_claims(rows, again)
    assert seqs(ended) == [2] and ended[0].claim_token is None
    assert ended[0].claim_fencing_token == rows[1].claim_fencing_token, "the token still grows"
    rows = apply(rows, ended)
    taken, _ = claim(rows)
    rows = apply(rows, taken)
    assert seqs(select(rows, CHECKPOINT)) == [2]
    assert ended_claims(rows[1:], ()) == (), "no claim left but the new one"


def test_parked_work_is_skipped_and_unparked_in_its_place() -> None:
    rows = [batch(1, slot=EXCL), batch(2, slot=EXCL)]
    claimed, turn = claim(rows)
    failed = fail_rows(claimed, turn, "boom", max_failures=2)
    assert [(r.failures, r.last_error, r.parked) for r in failed] == [(1, "boom", False)]
    rows = apply(rows, failed)
    assert is_pending(rows[0], NOW, G) and seqs(select(rows)) == [1], "retried first"
    claimed, turn = claim(rows)
    rows = apply(rows, fail_rows(claimed, turn, "boom again", max_failures=2))
    assert rows[0].parked and rows[0].failures == 2 and rows[0].last_error == "boom again"
    assert not is_pending(rows[0], NOW, G)
    assert seqs(select(rows)) == [2] and seqs(select(rows, CHECKPOINT)) == [2]
    decoded = rows[0].batch()
    assert (decoded.parked, decoded.failures, decoded.last_error) == (True, 2, "boom again")
    assert rows[0].status().state is WorkState.PARKED
    rows = apply(rows, [unpark_row(rows[0])])
    assert seqs(select(rows)) == [1], "back at its old place in the queue"
    assert (rows[0].failures, rows[0].last_error) == (0, None)
    # A stale claim fails nothing; bad arguments are refused.
    assert fail_rows(rows, turn, "late", 2) == ()
    with pytest.raises(InvalidArgument):
        fail_rows(rows, turn, "x", 0)


def test_a_delivered_batch_keeps_its_turn_and_outcome() -> None:
    rows = [batch(1, source_key="k")]
    claimed, _ = claim(rows)
    kept = deliver_row(claimed[0], turn_id="t1", head_revision=4, outcome='{"ok":1}', now_ms=NOW)
    assert kept.row.claim_token is None and kept.row.batch_id == rows[0].batch_id
    status = kept.status()
    assert (status.state, status.turn_id, status.head_revision, status.outcome) == (
        WorkState.DELIVERED,
        "t1",
        4,
        {"ok": 1},
    )
    assert status.batch == rows[0].batch()
    assert rows[0].status().state is WorkState.QUEUED


def test_join_groups_only_adjacent_batches_with_the_same_policy_and_key() -> None:
    a = MergeKey.group("a")
    rows = [
        batch(1, merge=a),
        batch(2, merge=a),
        batch(3, merge=MergeKey.group("b")),
        batch(4, ACTC, merge=a),
        batch(5, merge=a),
    ]
    assert seqs(select(rows)) == [1, 2]
    assert seqs(select(rows[2:])) == [3]
    assert seqs(select(rows[3:])) == [4]
    assert seqs(select(rows, IDLE, 1)) == [1], "max_batches caps it"


def test_never_joins_nothing_and_exclusive_goes_alone() -> None:
    never = [batch(1, merge=MergeKey.NEVER), batch(2, merge=MergeKey.NEVER)]
    assert seqs(select(never)) == [1]
    rows = [batch(1, slot=EXCL), batch(2), batch(3)]
    assert seqs(select(rows)) == [1]
    rows = [batch(1), batch(2, slot=EXCL), batch(3)]
    assert seqs(select(rows)) == [1]


def test_availability_is_respected_without_blocking_later_work() -> None:
    rows = [batch(1, available_at_ms=NOW + 1), batch(2, slot=EXCL)]
    assert seqs(select(rows)) == [2]
    assert seqs(select(rows, now=NOW + 1)) == [1]
    assert select(rows, IDLE, 0) == ()
    assert select([]) == ()


def test_an_expired_claim_can_be_reclaimed_with_a_higher_token() -> None:
    rows = [batch(1, slot=EXCL)]
    claimed, first = claim(rows, ttl=0)
    rows = apply(rows, claimed)
    assert not is_claimed(rows[0], NOW, G)
    assert seqs(select(rows, CHECKPOINT)) == [1], "expired: no longer held, even at a checkpoint"
    claimed, second = claim(rows)
    assert second.fencing_token > first.fencing_token
    with pytest.raises(QueuedWorkClaimExpired):
        check_completion(claimed, first.completion(), G)
    check_completion(claimed, second.completion(), G)


def test_exact_claims_never_skip_earlier_work() -> None:
    rows = [batch(1, ACTC, EXCL), batch(2, ACTC, EXCL)]

    def exact(rows: Sequence[QueuedBatchRow], ids: object) -> tuple[QueuedBatchRow, ...]:
        return select_by_batch_ids(rows, IDLE, ids, now_ms=NOW, lease_fencing=G)  # type: ignore[arg-type]

    assert exact(rows, [rows[1].batch_id]) == ()
    assert seqs(exact(rows, [rows[0].batch_id])) == [1]
    joined = [batch(1), batch(2), batch(3)]
    ids = [r.batch_id for r in joined[:2]]
    assert seqs(exact(joined, ids)) == [1, 2]
    assert exact(joined, ids[::-1]) == ()
    for bad in ([], [1], "qwb:x", None, 5):
        with pytest.raises(InvalidArgument):
            exact(joined, bad)


def test_completion_must_own_every_batch() -> None:
    rows = [batch(1), batch(2)]
    claimed, live = claim(rows)
    check_completion(claimed, live.completion(), G)
    stale = attrs.evolve(live.completion(), lease_token="0" * 32)
    with pytest.raises(QueuedWorkClaimExpired) as caught:
        check_completion(claimed, stale, G)
    assert (caught.value.session_id, caught.value.claim_id) == ("root", live.claim_id)
    with pytest.raises(QueuedWorkClaimExpired):
        check_completion([claimed[0], None], live.completion(), G)  # one batch is gone
    with pytest.raises(QueuedWorkClaimExpired):
        check_completion([claimed[0], rows[1]], live.completion(), G)  # one was abandoned


def test_abandon_is_idempotent_and_never_touches_a_newer_claim() -> None:
    rows = [batch(1, slot=EXCL)]
    claimed, first = claim(rows, ttl=0)
    claimed2, second = claim(apply(rows, claimed))
    assert abandon_rows(claimed2, first) == ()
    back = abandon_rows(claimed2, second)
    assert not is_claimed(back[0], NOW, G) and back[0].claim_fencing_token == second.fencing_token
    assert abandon_rows(back, second) == ()
    with pytest.raises(QueuedWorkClaimExpired):
        renew_rows(back, second, 1000, now_ms=NOW, lease_fencing=G)


def test_renewing_an_expired_claim_is_refused() -> None:
    claimed, live = claim([batch(1)], ttl=10)
    with pytest.raises(QueuedWorkClaimExpired):
        renew_rows(claimed, live, 1000, now_ms=NOW + 10, lease_fencing=G)


def test_source_keys_return_the_original_or_conflict() -> None:
    original = batch(1, source_key="msg-1", text="hello")
    replay = batch(2, source_key="msg-1", text="hello")
    assert same_work(original, replay) is original
    with pytest.raises(QueuedWorkSourceKeyConflict) as caught:
        same_work(original, batch(3, source_key="msg-1", text="different"))
    assert (caught.value.session_id, caught.value.source_key) == ("root", "msg-1")
    assert caught.value.batch_id == original.batch_id, "it names the original, which stays"
    with pytest.raises(QueuedWorkSourceKeyConflict):
        same_work(original, batch(3, ACTC, source_key="msg-1", text="hello"))


def test_bad_drafts_are_refused() -> None:
    good = QueuedWorkDraft(session_id="s", delivery=ESB, slot=JOIN, payloads=[1])
    bad = [
        attrs.evolve(good, payloads=()),
        attrs.evolve(good, delivery="earliest_safe_boundary"),
        attrs.evolve(good, slot=None),
        attrs.evolve(good, merge_key="never"),
        attrs.evolve(good, available_at_ms=-1),
        attrs.evolve(good, session_id=3),
    ]
    for draft in bad:
        with pytest.raises(InvalidArgument):
            new_batch_row(draft, enqueue_seq=1, now_ms=NOW, ids=_ids, limit=1000)
    # Sequence fields refuse a non-sequence when the record is made, not later.
    for payloads in (5, None, "two letters", {"a": 1}):
        with pytest.raises(InvalidArgument):
            attrs.evolve(good, payloads=payloads)
    with pytest.raises(PayloadNotSerializable):
        new_batch_row(
            attrs.evolve(good, payloads=[{1, 2}]), enqueue_seq=1, now_ms=NOW, ids=_ids, limit=1000
        )
    with pytest.raises(InvalidArgument):
        MergeKey.group("")
    assert MergeKey.from_wire("group:x") == MergeKey.group("x")
    with pytest.raises(ValueError):
        MergeKey.from_wire("group:")


def test_rows_decode_to_what_was_enqueued() -> None:
    row = batch(7, ESB, EXCL, MergeKey.group("g"), available_at_ms=5, text="x", source_key="k")
    decoded = row.batch()
    assert (decoded.enqueue_seq, decoded.delivery, decoded.slot, decoded.merge_key) == (
        7,
        ESB,
        EXCL,
        MergeKey.group("g"),
    )
    assert [item.payload for item in decoded.items] == [{"text": "x"}]
    assert decoded.source_key == "k" and decoded.available_at_ms == 5


policies = st.tuples(
    st.sampled_from([ESB, ACTC]),
    st.sampled_from([JOIN, EXCL]),
    st.sampled_from([MergeKey.NEVER, MergeKey.PAYLOAD_DEFAULT, MergeKey.group("a")]),
    st.integers(0, 3),
)


@given(
    st.lists(policies, max_size=12),
    st.sampled_from([IDLE, CHECKPOINT]),
    st.integers(0, 12),
    st.integers(0, 3),
    st.lists(st.sampled_from(["free", "mine", "older", "expired", "parked"]), max_size=12),
)
def test_claims_are_an_in_order_prefix_of_deliverable_work(
    specs: list[tuple[DeliveryPolicy, SlotPolicy, MergeKey, int]],
    boundary: ClaimBoundary,
    max_batches: int,
    now: int,
    states: list[str],
) -> None:
    """Whatever claims (live under this grant, under an older one, expired) and parked rows
    are on the queue, a claim takes a prefix of the deliverable work in order: at the idle
    boundary everything not parked counts, at a checkpoint everything not held by this grant."""
    rows = [batch(i, d, s, m, available_at_ms=a) for i, (d, s, m, a) in enumerate(specs)]
    for i, state in enumerate(states[: len(rows)]):
        if state == "parked":
            rows[i] = attrs.evolve(rows[i], parked=True, failures=1, last_error="x")
        elif state != "free":
            rows[i] = attrs.evolve(
                rows[i],
                claim_id="c",
                claim_token="t",
                claim_expires_at_ms=now + (0 if state == "expired" else 1),
                claim_lease_fencing=G if state in ("mine", "expired") else G - 1,
            )
    taken = select(rows, boundary, max_batches, now=now)
    ready = [
        r
        for r in rows
        if r.available_at_ms <= now
        and not r.parked
        and (boundary is IDLE or not is_claimed(r, now, G))
    ]
    assert list(taken) == ready[: len(taken)], "a prefix of the ready work, in order"
    assert len(taken) <= max_batches
    if taken:
        head = taken[0]
        assert len({(r.delivery, r.merge_key) for r in taken}) == 1 or len(taken) == 1
        if len(taken) > 1:
            assert all(r.slot == JOIN.value for r in taken) and head.merge_key != "never"
        if boundary is CHECKPOINT:
            assert head.delivery == ESB.value
