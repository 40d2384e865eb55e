"""Conformance scenarios for ``store.executions``: what every store adapter must do.

Each scenario is a plain async function taking a :data:`StoreFactory`: ``make(**options)`` opens a
fresh, empty store (as an async context manager) with the given :func:`turnbuckle.open_store`
options (``clock``, ``ids``, ``max_payload_bytes``). Leases are timed by the store's clock, so the
scenarios pass a :class:`FakeClock` and advance it to expire a lease (a lease is live while
``now < expires``).

The first group ports the worker hot-path tests of ff-backend-sqlite 0.14.0 (claim, complete,
fail, progress, renew, append_frame, reclaim), observed through the public API instead of raw
SQL. The second group covers where turnbuckle is stricter than that reference: fencing checks
the epoch *and* a live lease *and* a running execution, so an expired, reclaimed or finished
handle never writes again; retries follow a policy (failure class, backoff, ``max_attempts``);
cancellation; and bad input, which must change nothing. Run them all with :func:`executions`,
or one by one from :data:`EXECUTION_SCENARIOS`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import anyio
import attrs

from turnbuckle.adapters.executions import ExecutionEvent, ExecutionInfo, Frame
from turnbuckle.adapters.store import Store
from turnbuckle.errors import (
    ConcurrentModification,
    CorruptRecordError,
    ExecutionNotFound,
    ExecutionTerminal,
    ForeignHandle,
    InvalidArgument,
    LeaseConflict,
    LeaseExpired,
    PayloadNotSerializable,
    PayloadTooLarge,
    StoreClosedError,
    TurnbuckleError,
)
from turnbuckle.sansio.codec import JSON
from turnbuckle.sansio.execution import (
    ExecutionState,
    FailureClass,
    FrameKind,
    Handle,
    RetryPolicy,
)
from turnbuckle.testing.conformance._check import raises as _raises
from turnbuckle.testing.conformance._check import raises_type as _raises_type
from turnbuckle.testing.conformance.tasks import Corrupt, StoreFactory
from turnbuckle.testing.fakes import FakeClock

__all__ = ["EXECUTION_SCENARIOS", "corrupt_summary", "executions"]

LANE = "default"
TTL = 30_000
WAITING, DELAYED, ACTIVE = ExecutionState.WAITING, ExecutionState.DELAYED, ExecutionState.ACTIVE
COMPLETED, FAILED = ExecutionState.COMPLETED, ExecutionState.FAILED
CANCELLED = ExecutionState.CANCELLED


# --- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _case(label: str) -> Iterator[None]:
    """Name the case in an assertion failure inside the block."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{label}: {exc}") from exc


async def _all_events(store: Store, stream: str) -> list[ExecutionEvent]:
    read = (
        store.executions.lease_events if stream == "lease" else store.executions.completion_events
    )
    out: list[ExecutionEvent] = []
    while page := await read(out[-1].event_id if out else 0, 100):
        out.extend(page)
    return out


async def _kinds(store: Store, stream: str, execution_id: str) -> list[str]:
    """The kinds of one execution's events in one outbox, oldest first."""
    return [e.kind for e in await _all_events(store, stream) if e.execution_id == execution_id]


async def _frames(store: Store, execution_id: str) -> list[Frame]:
    out: list[Frame] = []
    while page := await store.executions.read_stream(execution_id, out[-1].seq if out else 0):
        out.extend(page)
    return out


Snapshot = tuple[
    ExecutionInfo, list[Frame], tuple[JSON, int] | None, list[ExecutionEvent], list[ExecutionEvent]
]


async def _snapshot(store: Store, execution_id: str) -> Snapshot:
    """Everything a caller can observe about one execution, and both outboxes."""
    return (
        await store.executions.describe(execution_id),
        await _frames(store, execution_id),
        await store.executions.read_summary(execution_id),
        await _all_events(store, "lease"),
        await _all_events(store, "completion"),
    )


async def _refused(
    store: Store,
    execution_id: str,
    expected: TurnbuckleError | type[TurnbuckleError],
    call: Awaitable[Any],
) -> TurnbuckleError | None:
    """Check ``call`` raises ``expected`` (an instance: type and fields; a class: the type) and
    that nothing observable about ``execution_id`` or the outboxes changed."""
    before = await _snapshot(store, execution_id)
    got: TurnbuckleError | None = None
    if isinstance(expected, TurnbuckleError):
        await _raises(expected, call)
    else:
        got = await _raises_type(expected, call)
    after = await _snapshot(store, execution_id)
    assert after == before, f"a refused call changed the store:\n{before}\n->\n{after}"
    return got


async def _claimed(
    store: Store,
    *,
    lane: str = LANE,
    worker: str = "w1",
    ttl: int = TTL,
    retry: RetryPolicy | None = None,
    execution_id: str = "ex-1",
    payload: JSON = None,
) -> Handle:
    """Create one execution and claim it."""
    await store.executions.create(lane, retry=retry, execution_id=execution_id, payload=payload)
    handle = await store.executions.claim(lane, (), worker, ttl)
    assert handle is not None and handle.execution_id == execution_id, handle
    return handle


def _worker_calls(store: Store, handle: Handle) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Every operation a worker makes with a handle, each with valid arguments."""
    ex = store.executions
    return {
        "renew": lambda: ex.renew(handle),
        "complete": lambda: ex.complete(handle, {"late": True}),
        "fail": lambda: ex.fail(handle, FailureClass.PERMANENT, "late"),
        "fail-transient": lambda: ex.fail(handle, FailureClass.TRANSIENT, "late"),
        "progress": lambda: ex.progress(handle, 50, "late"),
        "progress-noop": lambda: ex.progress(handle),
        "append": lambda: ex.append_frame(handle, FrameKind.STDOUT, "late"),
        "append-summary": lambda: ex.append_frame(
            handle, FrameKind.EVENT, None, summary_patch={"late": 1}
        ),
    }


async def _all_refused(
    store: Store,
    handle: Handle,
    expected: TurnbuckleError | type[TurnbuckleError],
    execution_id: str | None = None,
) -> None:
    """Every worker operation with ``handle`` is refused with ``expected``, changing nothing."""
    target = handle.execution_id if execution_id is None else execution_id
    for name, call in _worker_calls(store, handle).items():
        try:
            await _refused(store, target, expected, call())
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


# --- the reference hot-path scenarios (ff-backend-sqlite 0.14.0, tests/hot_path.rs) ----------


async def claim_happy_path(make: StoreFactory) -> None:
    """A claim mints a fresh handle of this store and makes the execution active."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        await store.executions.create(LANE, capabilities=["capA"], execution_id="ex-1")
        handle = await store.executions.claim(LANE, ["capA"], "w1", TTL)
        assert handle is not None
        assert handle.backend == store.executions.backend_name
        assert handle.store_id
        assert (handle.kind, handle.execution_id, handle.worker_id) == ("fresh", "ex-1", "w1")
        assert (handle.attempt_index, handle.lease_epoch, handle.lease_ttl_ms) == (0, 1, TTL)
        info = await store.executions.describe("ex-1")
        assert info.state is ACTIVE
        assert (info.attempt_index, info.lease_epoch, info.worker_id) == (0, 1, "w1")
        assert info.lease_expires_at_ms == clock.now_ms() + TTL
        # No outcome yet.
        assert (info.result, info.failure, info.cancel_requested) == (None, None, False)
        assert await _kinds(store, "lease", "ex-1") == ["acquired"]
        assert await _kinds(store, "completion", "ex-1") == []
        # An active execution is not claimable again.
        assert await store.executions.claim(LANE, ["capA"], "w2", TTL) is None


async def claim_returns_none_when_nothing_is_eligible(make: StoreFactory) -> None:
    """No runnable execution (an empty store, another lane) is None, and writes nothing."""
    async with make() as store:
        assert await store.executions.claim(LANE, (), "w1", TTL) is None
        await store.executions.create("other-lane", execution_id="ex-1")
        assert await store.executions.claim(LANE, (), "w1", TTL) is None
        assert (await store.executions.describe("ex-1")).state is WAITING
        assert await _all_events(store, "lease") == []


async def claim_capability_mismatch_returns_none(make: StoreFactory) -> None:
    """A worker lacking one required capability gets None; the execution stays runnable."""
    async with make() as store:
        await store.executions.create(LANE, capabilities=["capA", "capB"], execution_id="ex-1")
        before = await _snapshot(store, "ex-1")
        assert await store.executions.claim(LANE, ["capA"], "w1", TTL) is None
        assert await store.executions.claim(LANE, [], "w1", TTL) is None
        assert await _snapshot(store, "ex-1") == before
        assert before[0].state is WAITING
        handle = await store.executions.claim(LANE, ["capB", "capA", "capC"], "w1", TTL)
        assert handle is not None and handle.execution_id == "ex-1"


async def claim_walks_past_capability_mismatch(make: StoreFactory) -> None:
    """A higher-priority execution nobody here can serve does not starve a lower one; among
    those it can serve, a worker gets the highest priority, then the oldest."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        await store.executions.create(LANE, capabilities=["capB"], priority=10, execution_id="hi")
        await store.executions.create(LANE, capabilities=["capA"], priority=0, execution_id="lo")
        handle = await store.executions.claim(LANE, ["capA"], "w1", TTL)
        assert handle is not None and handle.execution_id == "lo"
        assert (await store.executions.describe("lo")).state is ACTIVE
        assert (await store.executions.describe("hi")).state is WAITING
        # Priority first, then age.
        await store.executions.create(LANE, priority=5, execution_id="old")
        clock.advance(1)
        await store.executions.create(LANE, priority=5, execution_id="new")
        await store.executions.create(LANE, priority=7, execution_id="newest-but-urgent")
        order = []
        for _ in range(4):
            got = await store.executions.claim(LANE, ["capA", "capB"], "w2", TTL)
            assert got is not None
            order.append(got.execution_id)
        assert order == ["hi", "newest-but-urgent", "old", "new"]
        assert await store.executions.claim(LANE, ["capA", "capB"], "w2", TTL) is None


async def complete_writes_terminal_and_clears_lease(make: StoreFactory) -> None:
    """complete stores the result, ends the execution and releases the lease."""
    async with make() as store:
        handle = await _claimed(store)
        await store.executions.complete(handle, {"answer": 42})
        info = await store.executions.describe("ex-1")
        assert info.state is COMPLETED
        assert info.result == {"answer": 42}
        assert (info.worker_id, info.lease_expires_at_ms, info.failure) == (None, None, None)
        assert await _kinds(store, "completion", "ex-1") == ["completed"]
        assert await store.executions.claim(LANE, (), "w2", TTL) is None


async def complete_fence_mismatch(make: StoreFactory) -> None:
    """A handle with a wrong epoch is LeaseConflict and changes nothing; the good one works."""
    async with make() as store:
        handle = await _claimed(store)
        bad = attrs.evolve(handle, lease_epoch=999)
        await _refused(store, "ex-1", LeaseConflict("ex-1", 999, 1), store.executions.complete(bad))
        # A handle of another attempt of the same epoch is no better.
        other_attempt = attrs.evolve(handle, attempt_index=1)
        await _refused(
            store, "ex-1", LeaseConflict, store.executions.complete(other_attempt, {"x": 1})
        )
        await store.executions.complete(handle, "ok")
        info = await store.executions.describe("ex-1")
        assert (info.state, info.result) == (COMPLETED, "ok")


async def foreign_handle_rejected(make: StoreFactory) -> None:
    """A handle from another kind of store, or from another store of the same kind, is
    ForeignHandle naming its issuer, for every operation; nothing changes in either store."""
    async with make() as store, make() as second:
        handle = await _claimed(store)
        other_backend = attrs.evolve(handle, backend="other")
        for name, call in _worker_calls(store, other_backend).items():
            err = await _refused(store, "ex-1", ForeignHandle, call())
            assert isinstance(err, ForeignHandle), name
            assert err == ForeignHandle("other", handle.store_id), (name, err)
            assert "other" in str(err), str(err)
        # The same execution id in a second store: that store's handle is refused here...
        theirs = await _claimed(second)
        assert theirs.store_id != handle.store_id
        await _all_refused(store, theirs, ForeignHandle(theirs.backend, theirs.store_id))
        # ...and ours there.
        await _all_refused(second, handle, ForeignHandle(handle.backend, handle.store_id))
        await store.executions.complete(handle, 1)
        await second.executions.complete(theirs, 2)
        assert (await store.executions.describe("ex-1")).result == 1
        assert (await second.executions.describe("ex-1")).result == 2


async def claim_and_complete_emit_lease_events(make: StoreFactory) -> None:
    """claim then complete leaves lease events [acquired, revoked], with the lease's epoch."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        handle = await _claimed(store)
        clock.advance(5)
        await store.executions.complete(handle)
        events = [e for e in await _all_events(store, "lease") if e.execution_id == "ex-1"]
        assert [e.kind for e in events] == ["acquired", "revoked"]
        assert all(e.stream == "lease" for e in events)
        assert [(e.attempt_index, e.lease_epoch) for e in events] == [(0, 1), (0, 1)]
        assert [e.at_ms for e in events] == [clock.now_ms() - 5, clock.now_ms()]
        assert events[0].event_id < events[1].event_id


async def fail_transient_schedules_retry(make: StoreFactory) -> None:
    """A transient failure schedules the next attempt after the backoff: delayed until then,
    runnable (and claimable, with a new epoch) afterwards."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        retry = RetryPolicy(max_attempts=3, base_backoff_ms=1000, max_backoff_ms=60_000)
        handle = await _claimed(store, retry=retry)
        outcome = await store.executions.fail(handle, FailureClass.TRANSIENT, "transient boom")
        assert outcome == "retry_scheduled"
        info = await store.executions.describe("ex-1")
        assert (info.state, info.attempt_index, info.failure) == (DELAYED, 1, "transient boom")
        assert (info.worker_id, info.lease_expires_at_ms) == (None, None)
        assert await _kinds(store, "lease", "ex-1") == ["acquired", "revoked"]
        assert await _kinds(store, "completion", "ex-1") == ["retry_scheduled"]
        clock.advance(999)
        assert (await store.executions.describe("ex-1")).state is DELAYED
        assert await store.executions.claim(LANE, (), "w2", TTL) is None
        clock.advance(1)
        assert (await store.executions.describe("ex-1")).state is WAITING
        again = await store.executions.claim(LANE, (), "w2", TTL)
        assert again is not None
        assert (again.execution_id, again.attempt_index, again.lease_epoch) == ("ex-1", 1, 2)
        info = await store.executions.describe("ex-1")
        assert (info.state, info.attempt_index, info.worker_id) == (ACTIVE, 1, "w2")


async def fail_permanent_is_terminal_failed(make: StoreFactory) -> None:
    """A permanent failure ends the execution as failed at once, attempts left or not."""
    async with make() as store:
        handle = await _claimed(store, retry=RetryPolicy(max_attempts=5))
        assert await store.executions.fail(handle, FailureClass.PERMANENT, "boom") == "failed"
        info = await store.executions.describe("ex-1")
        assert (info.state, info.attempt_index, info.failure) == (FAILED, 0, "boom")
        assert (info.worker_id, info.lease_expires_at_ms) == (None, None)
        assert await _kinds(store, "lease", "ex-1") == ["acquired", "revoked"]
        assert await _kinds(store, "completion", "ex-1") == ["failed"]
        assert await store.executions.claim(LANE, (), "w2", TTL) is None


async def progress_writes_pct_and_message(make: StoreFactory) -> None:
    """progress stores both fields, without moving the execution."""
    async with make() as store:
        handle = await _claimed(store)
        await store.executions.progress(handle, 42, "halfway")
        info = await store.executions.describe("ex-1")
        assert (info.progress_pct, info.progress_message, info.state) == (42, "halfway", ACTIVE)
        await store.executions.progress(handle, 0, "")
        info = await store.executions.describe("ex-1")
        assert (info.progress_pct, info.progress_message) == (0, "")
        await store.executions.progress(handle, 100, "done")
        assert (await store.executions.describe("ex-1")).progress_pct == 100


async def progress_partial_update_keeps_the_other(make: StoreFactory) -> None:
    """A field a progress update does not name keeps its value."""
    async with make() as store:
        handle = await _claimed(store)
        await store.executions.progress(handle, 10, "starting")
        await store.executions.progress(handle, 75)
        info = await store.executions.describe("ex-1")
        assert (info.progress_pct, info.progress_message) == (75, "starting")
        await store.executions.progress(handle, message="winding down")
        info = await store.executions.describe("ex-1")
        assert (info.progress_pct, info.progress_message) == (75, "winding down")


async def progress_fence_mismatch(make: StoreFactory) -> None:
    """progress with a wrong epoch is LeaseConflict and changes nothing (even a no-op one)."""
    async with make() as store:
        handle = await _claimed(store)
        await store.executions.progress(handle, 5, "five")
        bad = attrs.evolve(handle, lease_epoch=999)
        conflict = LeaseConflict("ex-1", 999, 1)
        await _refused(store, "ex-1", conflict, store.executions.progress(bad, 50))
        await _refused(store, "ex-1", conflict, store.executions.progress(bad, None, "x"))
        await _refused(store, "ex-1", conflict, store.executions.progress(bad))


async def progress_partial_update_leaves_absent_field_absent(make: StoreFactory) -> None:
    """A field never written stays None (not some stored null-ish value)."""
    async with make() as store:
        handle = await _claimed(store)
        info = await store.executions.describe("ex-1")
        assert (info.progress_pct, info.progress_message) == (None, None)
        await store.executions.progress(handle, 25)
        info = await store.executions.describe("ex-1")
        assert (info.progress_pct, info.progress_message) == (25, None)
        other = await _claimed(store, execution_id="ex-2")
        await store.executions.progress(other, None, "only a message")
        info = await store.executions.describe("ex-2")
        assert (info.progress_pct, info.progress_message) == (None, "only a message")


async def progress_both_none_is_a_no_op(make: StoreFactory) -> None:
    """progress naming neither field writes nothing at all."""
    async with make() as store:
        handle = await _claimed(store)
        before = await _snapshot(store, "ex-1")
        await store.executions.progress(handle)
        await store.executions.progress(handle, None, None)
        assert await _snapshot(store, "ex-1") == before
        assert (before[0].progress_pct, before[0].progress_message) == (None, None)


async def renew_advances_expiry_and_emits_event(make: StoreFactory) -> None:
    """renew moves the expiry to now + ttl and records a renewed lease event."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        handle = await _claimed(store)
        expiry_before = (await store.executions.describe("ex-1")).lease_expires_at_ms
        assert expiry_before == clock.now_ms() + TTL
        clock.advance(2)
        assert await store.executions.renew(handle) is False
        expiry_after = (await store.executions.describe("ex-1")).lease_expires_at_ms
        assert expiry_after == clock.now_ms() + TTL == expiry_before + 2
        assert await _kinds(store, "lease", "ex-1") == ["acquired", "renewed"]
        # A renewed lease outlives the first expiry.
        clock.advance(TTL - 1)
        await store.executions.progress(handle, 1)
        assert (await store.executions.describe("ex-1")).state is ACTIVE


async def renew_fence_mismatch(make: StoreFactory) -> None:
    """renew with a wrong epoch is LeaseConflict and writes no event."""
    async with make() as store:
        handle = await _claimed(store)
        bad = attrs.evolve(handle, lease_epoch=999)
        await _refused(store, "ex-1", LeaseConflict("ex-1", 999, 1), store.executions.renew(bad))
        assert await _kinds(store, "lease", "ex-1") == ["acquired"]


async def append_frame_writes_durable_frames(make: StoreFactory) -> None:
    """Frames are numbered from 1 and read back in order, page by page with a cursor."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        handle = await _claimed(store)
        assert await store.executions.read_stream("ex-1") == []
        assert await store.executions.append_frame(handle, FrameKind.STDOUT, "hello") == 1
        assert (await store.executions.describe("ex-1")).frame_count == 1
        assert await store.executions.read_summary("ex-1") is None
        clock.advance(1)
        assert await store.executions.append_frame(handle, FrameKind.STDOUT, "world") == 2
        kinds = [FrameKind.STDERR, FrameKind.EVENT, FrameKind.BLOB]
        data: list[JSON] = [{"line": 3}, [1, "two", None], None]
        for n, (kind, value) in enumerate(zip(kinds, data, strict=True), start=3):
            assert await store.executions.append_frame(handle, kind, value) == n
        info = await store.executions.describe("ex-1")
        assert (info.frame_count, info.summary_version) == (5, 0)
        frames = await store.executions.read_stream("ex-1")
        assert [f.seq for f in frames] == [1, 2, 3, 4, 5]
        assert [f.kind for f in frames] == [FrameKind.STDOUT, FrameKind.STDOUT, *kinds]
        assert [f.data for f in frames] == ["hello", "world", *data]
        assert all((f.execution_id, f.attempt_index) == ("ex-1", 0) for f in frames)
        assert [f.created_at_ms for f in frames[:2]] == [clock.now_ms() - 1, clock.now_ms()]
        # Cursor pagination: pass the last seq back.
        pages = []
        after = 0
        while page := await store.executions.read_stream("ex-1", after, 2):
            pages.append([f.seq for f in page])
            after = page[-1].seq
        assert pages == [[1, 2], [3, 4], [5]]
        assert await store.executions.read_stream("ex-1", 5) == []
        # Streams are per execution.
        await _claimed(store, execution_id="ex-2", worker="w2")
        assert [f.seq for f in await store.executions.read_stream("ex-1")] == [1, 2, 3, 4, 5]
        assert await store.executions.read_stream("ex-2") == []


async def append_frame_summary_merge_patch(make: StoreFactory) -> None:
    """A summary patch merges into the document (RFC 7396) and bumps its version."""
    async with make() as store:
        handle = await _claimed(store)
        ex = store.executions
        assert await ex.append_frame(handle, FrameKind.EVENT, None, summary_patch={"a": 1}) == 1
        assert await ex.read_summary("ex-1") == ({"a": 1}, 1)
        assert await ex.append_frame(handle, FrameKind.EVENT, None, summary_patch={"b": 2}) == 2
        assert await ex.read_summary("ex-1") == ({"a": 1, "b": 2}, 2)
        assert (await ex.describe("ex-1")).summary_version == 2
        # A frame without a patch leaves the summary alone.
        await ex.append_frame(handle, FrameKind.STDOUT, "no patch")
        assert await ex.read_summary("ex-1") == ({"a": 1, "b": 2}, 2)
        # null deletes a member; objects merge recursively; anything else replaces.
        await ex.append_frame(
            handle, FrameKind.EVENT, None, summary_patch={"a": None, "c": {"d": 1, "e": [1]}}
        )
        assert await ex.read_summary("ex-1") == ({"b": 2, "c": {"d": 1, "e": [1]}}, 3)
        await ex.append_frame(
            handle, FrameKind.EVENT, None, summary_patch={"c": {"d": None, "e": [2], "f": "g"}}
        )
        assert await ex.read_summary("ex-1") == ({"b": 2, "c": {"e": [2], "f": "g"}}, 4)
        await ex.append_frame(handle, FrameKind.EVENT, None, summary_patch={"missing": None})
        assert await ex.read_summary("ex-1") == ({"b": 2, "c": {"e": [2], "f": "g"}}, 5)
        await ex.append_frame(handle, FrameKind.EVENT, None, summary_patch=["whole", "doc"])
        assert await ex.read_summary("ex-1") == (["whole", "doc"], 6)
        await ex.append_frame(handle, FrameKind.EVENT, None, summary_patch={"x": 1})
        assert await ex.read_summary("ex-1") == ({"x": 1}, 7)
        info = await ex.describe("ex-1")
        assert (info.summary_version, info.frame_count) == (7, 8)


async def append_frame_fence_mismatch(make: StoreFactory) -> None:
    """append_frame with a wrong epoch is LeaseConflict: no frame, no summary change."""
    async with make() as store:
        handle = await _claimed(store)
        await store.executions.append_frame(handle, FrameKind.STDOUT, "x", summary_patch={"a": 1})
        bad = attrs.evolve(handle, lease_epoch=999)
        conflict = LeaseConflict("ex-1", 999, 1)
        await _refused(
            store, "ex-1", conflict, store.executions.append_frame(bad, FrameKind.STDOUT, "y")
        )
        await _refused(
            store,
            "ex-1",
            conflict,
            store.executions.append_frame(bad, FrameKind.EVENT, None, summary_patch={"a": 2}),
        )


async def reclaim_expired_lease(make: StoreFactory) -> None:
    """Reclaiming an expired lease gives a reclaimed handle of the same attempt with the next
    epoch, and lease events [acquired, reclaimed]; the new handle works."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        await _claimed(store, ttl=1000)
        clock.advance(1000)
        handle = await store.executions.reclaim("ex-1", "w2", 5000)
        assert handle is not None
        assert handle.backend == store.executions.backend_name
        assert (handle.kind, handle.execution_id, handle.worker_id) == ("reclaimed", "ex-1", "w2")
        assert (handle.attempt_index, handle.lease_epoch, handle.lease_ttl_ms) == (0, 2, 5000)
        info = await store.executions.describe("ex-1")
        assert (info.state, info.attempt_index, info.lease_epoch) == (ACTIVE, 0, 2)
        assert (info.worker_id, info.lease_expires_at_ms) == ("w2", clock.now_ms() + 5000)
        assert await _kinds(store, "lease", "ex-1") == ["acquired", "reclaimed"]
        # The reclaimed lease renews by its own ttl, and finishes the execution.
        clock.advance(10)
        await store.executions.renew(handle)
        assert (await store.executions.describe("ex-1")).lease_expires_at_ms == (
            clock.now_ms() + 5000
        )
        await store.executions.complete(handle, "done")
        assert (await store.executions.describe("ex-1")).state is COMPLETED
        assert await _kinds(store, "lease", "ex-1") == [
            "acquired",
            "reclaimed",
            "renewed",
            "revoked",
        ]


async def reclaim_live_lease_returns_none(make: StoreFactory) -> None:
    """A live lease blocks reclaim (up to the last millisecond); so does not running at all."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        await store.executions.create(LANE, execution_id="waiting")
        assert await store.executions.reclaim("waiting", "w2", TTL) is None
        await _claimed(store, ttl=1000)
        before = await _snapshot(store, "ex-1")
        assert await store.executions.reclaim("ex-1", "w2", TTL) is None
        clock.advance(999)
        assert await store.executions.reclaim("ex-1", "w2", TTL) is None
        assert await _snapshot(store, "ex-1") == before
        assert await _kinds(store, "lease", "ex-1") == ["acquired"]


# --- strict fencing, retries, cancellation, bad input: beyond the reference -----------------


async def expired_handle_is_fenced(make: StoreFactory) -> None:
    """From the instant its lease expires, a handle can do nothing: LeaseExpired, no change.
    One millisecond earlier it still could."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        handle = await _claimed(store, ttl=1000)
        clock.advance(999)
        await store.executions.progress(handle, 1)
        clock.advance(1)
        await _all_refused(store, handle, LeaseExpired("ex-1"))
        clock.advance(60_000)
        await _all_refused(store, handle, LeaseExpired("ex-1"))
        info = await store.executions.describe("ex-1")
        # Nobody reclaimed it yet: still active (its lease dead), and nothing was claimable.
        assert (info.state, info.lease_epoch, info.progress_pct) == (ACTIVE, 1, 1)
        assert await store.executions.claim(LANE, (), "w2", TTL) is None


async def reclaimed_handle_conflicts(make: StoreFactory) -> None:
    """Once reclaimed, the old handle gets LeaseConflict for everything (even after the new
    lease expires too); a handle of an attempt that was retried is stale as well."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        old = await _claimed(store, ttl=1000)
        clock.advance(1500)
        new = await store.executions.reclaim("ex-1", "w2", 1000)
        assert new is not None
        await _all_refused(store, old, LeaseConflict("ex-1", 1, 2))
        await store.executions.append_frame(new, FrameKind.STDOUT, "from the new worker")
        clock.advance(1000)
        await _all_refused(store, old, LeaseConflict("ex-1", 1, 2))
        await _all_refused(store, new, LeaseExpired("ex-1"))
        newest = await store.executions.reclaim("ex-1", "w3", TTL)
        assert newest is not None and newest.lease_epoch == 3
        await _all_refused(store, new, LeaseConflict("ex-1", 2, 3))
        assert await store.executions.fail(newest, FailureClass.TRANSIENT, "x") == (
            "retry_scheduled"
        )
        # The retried attempt's handle is stale too, before and after the next claim.
        await _all_refused(store, newest, LeaseConflict)
        clock.advance(60_000)
        fourth = await store.executions.claim(LANE, (), "w4", TTL)
        assert fourth is not None
        assert (fourth.attempt_index, fourth.lease_epoch) == (1, 4)
        await _all_refused(store, newest, LeaseConflict)
        await _all_refused(store, old, LeaseConflict)
        await store.executions.complete(fourth, "ok")
        assert [f.data for f in await store.executions.read_stream("ex-1")] == [
            "from the new worker"
        ]


async def finished_execution_is_terminal(make: StoreFactory) -> None:
    """A completed, failed or cancelled execution answers ExecutionTerminal(outcome) to every
    worker call, a second complete with the same handle included; reclaim and claim skip it."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        ex = store.executions
        done = await _claimed(store, execution_id="done")
        await ex.complete(done, "first")
        failed = await _claimed(store, execution_id="failed")
        await ex.fail(failed, FailureClass.PERMANENT, "boom")
        cancelled = await _claimed(store, execution_id="cancelled")
        await ex.fail(cancelled, FailureClass.CANCELLED, "stop")
        for handle, outcome in ((done, "completed"), (failed, "failed"), (cancelled, "cancelled")):
            eid = handle.execution_id
            await _all_refused(store, handle, ExecutionTerminal(eid, outcome))
            # Terminal wins over a stale epoch, and over an expired lease.
            await _all_refused(
                store, attrs.evolve(handle, lease_epoch=999), ExecutionTerminal(eid, outcome)
            )
            before = await _snapshot(store, eid)
            assert await ex.reclaim(eid, "w2", TTL) is None
            assert (await ex.request_cancel(eid)).state is before[0].state
            assert await _snapshot(store, eid) == before
        assert (await ex.describe("done")).result == "first"
        clock.advance(10 * TTL)
        await _all_refused(store, done, ExecutionTerminal("done", "completed"))
        assert await ex.reclaim("done", "w2", TTL) is None
        assert await ex.claim(LANE, (), "w2", TTL) is None


async def retries_exhausted_after_max_attempts(make: StoreFactory) -> None:
    """Transient failures retry with exponential backoff capped at max_backoff_ms, until
    max_attempts attempts in all have run; the last failure is terminal."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        ex = store.executions
        retry = RetryPolicy(max_attempts=4, base_backoff_ms=100, max_backoff_ms=150)
        await ex.create(LANE, retry=retry, execution_id="ex-1")
        for attempt, backoff in enumerate((100, 150, 150)):
            handle = await ex.claim(LANE, (), f"w{attempt}", TTL)
            assert handle is not None
            assert (handle.attempt_index, handle.lease_epoch) == (attempt, attempt + 1)
            assert await ex.fail(handle, FailureClass.TRANSIENT, f"boom {attempt}") == (
                "retry_scheduled"
            )
            info = await ex.describe("ex-1")
            assert (info.state, info.attempt_index) == (DELAYED, attempt + 1)
            clock.advance(backoff - 1)
            assert await ex.claim(LANE, (), "early", TTL) is None
            clock.advance(1)
            assert (await ex.describe("ex-1")).state is WAITING
        last = await ex.claim(LANE, (), "w3", TTL)
        assert last is not None and (last.attempt_index, last.lease_epoch) == (3, 4)
        assert await ex.fail(last, FailureClass.TRANSIENT, "boom 3") == "failed"
        info = await ex.describe("ex-1")
        assert (info.state, info.attempt_index, info.failure) == (FAILED, 3, "boom 3")
        assert await _kinds(store, "completion", "ex-1") == [
            "retry_scheduled",
            "retry_scheduled",
            "retry_scheduled",
            "failed",
        ]
        assert await _kinds(store, "lease", "ex-1") == ["acquired", "revoked"] * 4
        # One attempt in all: the first transient failure is final.
        await ex.create(LANE, retry=RetryPolicy(max_attempts=1), execution_id="once")
        handle = await ex.claim(LANE, (), "w", TTL)
        assert handle is not None and handle.execution_id == "once"
        assert await ex.fail(handle, FailureClass.TRANSIENT, "boom") == "failed"
        assert (await ex.describe("once")).state is FAILED


async def failure_classes(make: StoreFactory) -> None:
    """infra_crash retries like transient; timeout fails and cancelled cancels at once."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        ex = store.executions
        expected = {
            FailureClass.INFRA_CRASH: ("retry_scheduled", DELAYED, "retry_scheduled"),
            FailureClass.TIMEOUT: ("failed", FAILED, "failed"),
            FailureClass.CANCELLED: ("cancelled", CANCELLED, "cancelled"),
            FailureClass.PERMANENT: ("failed", FAILED, "failed"),
            FailureClass.TRANSIENT: ("retry_scheduled", DELAYED, "retry_scheduled"),
        }
        for failure, (outcome, state, event) in expected.items():
            eid = f"ex-{failure.value}"
            handle = await _claimed(store, execution_id=eid, retry=RetryPolicy(max_attempts=5))
            assert await ex.fail(handle, failure, failure.value) == outcome, failure
            info = await ex.describe(eid)
            assert (info.state, info.failure) == (state, failure.value), failure
            assert await _kinds(store, "completion", eid) == [event], failure
            assert await _kinds(store, "lease", eid) == ["acquired", "revoked"], failure
            clock.advance(60_000)
            if state is DELAYED:
                again = await ex.claim(LANE, (), "w2", TTL)
                assert again is not None and again.execution_id == eid
                await ex.complete(again)
            assert await ex.claim(LANE, (), "w2", TTL) is None


async def request_cancel(make: StoreFactory) -> None:
    """Cancelling a runnable (or delayed) execution ends it at once; an active one keeps
    running until its worker sees renew() return True and stops."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        ex = store.executions
        await ex.create(LANE, execution_id="runnable")
        info = await ex.request_cancel("runnable")
        assert info.state is CANCELLED
        assert await ex.describe("runnable") == info
        assert await _kinds(store, "completion", "runnable") == ["cancelled"]
        assert await ex.claim(LANE, (), "w1", TTL) is None
        # A second request changes nothing.
        before = await _snapshot(store, "runnable")
        assert (await ex.request_cancel("runnable")).state is CANCELLED
        assert await _snapshot(store, "runnable") == before
        # Delayed (between attempts) counts as runnable.
        handle = await _claimed(store, execution_id="delayed")
        await ex.fail(handle, FailureClass.TRANSIENT, "boom")
        assert (await ex.describe("delayed")).state is DELAYED
        assert (await ex.request_cancel("delayed")).state is CANCELLED
        clock.advance(60_000)
        assert await ex.claim(LANE, (), "w1", TTL) is None
        await _all_refused(store, handle, ExecutionTerminal("delayed", "cancelled"))
        # Active: a request the worker sees on renew.
        handle = await _claimed(store, execution_id="active")
        assert await ex.renew(handle) is False
        info = await ex.request_cancel("active")
        assert (info.state, info.cancel_requested) == (ACTIVE, True)
        assert await _kinds(store, "completion", "active") == []
        assert await ex.renew(handle) is True
        await ex.progress(handle, 99, "stopping")
        assert await ex.renew(handle) is True
        assert await ex.fail(handle, FailureClass.CANCELLED, "stopped on request") == "cancelled"
        info = await ex.describe("active")
        assert (info.state, info.failure) == (CANCELLED, "stopped on request")
        assert await _kinds(store, "completion", "active") == ["cancelled"]
        assert await _kinds(store, "lease", "active") == [
            "acquired",
            "renewed",
            "renewed",
            "renewed",
            "revoked",
        ]
        await _raises(ExecutionNotFound("nope"), ex.request_cancel("nope"))


async def bad_worker_inputs_change_nothing(make: StoreFactory) -> None:
    """Bad progress, failure classes, frame kinds, non-JSON data and non-handles are refused
    before anything is read, with the same error whatever the lease's state; nothing changes."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        ex = store.executions
        handle = await _claimed(store)
        await ex.progress(handle, 10, "ten")
        await ex.append_frame(handle, FrameKind.STDOUT, "one", summary_patch={"a": 1})
        stale = attrs.evolve(handle, lease_epoch=999)
        not_json: list[Any] = [{1, 2}, {"a": b"x"}, (1, 2), float("nan"), {1: "x"}, "\ud800"]
        bad_pcts: list[Any] = [101, -1, True, False, 50.0, "50"]
        bad_messages: list[Any] = [5, b"msg", "\udc00"]
        bad_classes: list[Any] = ["transient", "permanent", None, 1]
        bad_kinds: list[Any] = ["stdout", None, 1]
        for h in (handle, stale):
            for pct in bad_pcts:
                await _refused(store, "ex-1", InvalidArgument, ex.progress(h, pct))
            for message in bad_messages:
                await _refused(store, "ex-1", InvalidArgument, ex.progress(h, 1, message))
                await _refused(
                    store, "ex-1", InvalidArgument, ex.fail(h, FailureClass.PERMANENT, message)
                )
            for failure in bad_classes:
                await _refused(store, "ex-1", InvalidArgument, ex.fail(h, failure, "x"))
            for kind in bad_kinds:
                await _refused(store, "ex-1", InvalidArgument, ex.append_frame(h, kind, "x"))
            for value in not_json:
                await _refused(
                    store,
                    "ex-1",
                    PayloadNotSerializable,
                    ex.append_frame(h, FrameKind.EVENT, value),
                )
                await _refused(
                    store,
                    "ex-1",
                    PayloadNotSerializable,
                    ex.append_frame(h, FrameKind.EVENT, None, summary_patch=value),
                )
                await _refused(store, "ex-1", PayloadNotSerializable, ex.complete(h, value))
        err = await _refused(
            store, "ex-1", PayloadNotSerializable, ex.complete(handle, {"a": [1, float("inf")]})
        )
        assert getattr(err, "path", None) == "$.a[1]", err
        not_handles: list[Any] = [None, "ex-1", attrs.asdict(handle)]
        for not_a_handle in not_handles:
            for call in (
                ex.renew(not_a_handle),
                ex.complete(not_a_handle),
                ex.fail(not_a_handle, FailureClass.PERMANENT, "x"),
                ex.progress(not_a_handle, 1),
                ex.append_frame(not_a_handle, FrameKind.STDOUT, "x"),
            ):
                await _refused(store, "ex-1", InvalidArgument, call)
        # And once the lease expired: still the argument's error, not the lease's.
        clock.advance(TTL)
        await _refused(store, "ex-1", InvalidArgument, ex.progress(handle, 101))
        await _refused(store, "ex-1", InvalidArgument, ex.append_frame(handle, bad_kinds[0], "x"))
        # Reading with bad cursors or limits.
        bad_pages: list[tuple[Any, Any]] = [(-1, 10), (0, 0), (0, -1), (True, 10), (0, "10")]
        for after, limit in bad_pages:
            await _raises_type(InvalidArgument, ex.read_stream("ex-1", after, limit))
            await _raises_type(InvalidArgument, ex.lease_events(after, limit))
            await _raises_type(InvalidArgument, ex.completion_events(after, limit))
        bad_ids: list[Any] = [None, 5, "\ud800"]
        for bad_id in bad_ids:
            await _raises_type(InvalidArgument, ex.describe(bad_id))
            await _raises_type(InvalidArgument, ex.read_summary(bad_id))
            await _raises_type(InvalidArgument, ex.read_stream(bad_id))
            await _refused(store, "ex-1", InvalidArgument, ex.request_cancel(bad_id))


async def oversize_payloads_change_nothing(make: StoreFactory) -> None:
    """Every payload and text is bounded by max_payload_bytes, the merged summary included;
    an oversize one is PayloadTooLarge and changes nothing."""
    async with make(max_payload_bytes=1000) as store:
        ex = store.executions
        handle = await _claimed(store)
        await ex.append_frame(handle, FrameKind.EVENT, None, summary_patch={"a": "x" * 600})
        big: JSON = {"blob": "x" * 2000}
        long_text = "m" * 1001
        calls: tuple[Awaitable[Any], ...] = (
            ex.complete(handle, big),
            ex.fail(handle, FailureClass.PERMANENT, long_text),
            ex.progress(handle, 1, long_text),
            ex.append_frame(handle, FrameKind.STDOUT, big),
            ex.append_frame(handle, FrameKind.EVENT, None, summary_patch=big),
            # Each patch fits, the merged document does not.
            ex.append_frame(handle, FrameKind.EVENT, "small", summary_patch={"b": "y" * 600}),
            ex.reclaim("ex-1", long_text, TTL),
        )
        for call in calls:
            err = await _refused(store, "ex-1", PayloadTooLarge, call)
            assert getattr(err, "limit", None) == 1000, err
            assert getattr(err, "size", 0) > 1000, err
        assert await ex.read_summary("ex-1") == ({"a": "x" * 600}, 1)
        # A patch that shrinks the document is fine again.
        await ex.append_frame(handle, FrameKind.EVENT, None, summary_patch={"a": None, "b": "y"})
        assert await ex.read_summary("ex-1") == ({"b": "y"}, 2)
        # Producers and claims are bounded too.
        calls = (
            ex.create(LANE, payload=big, execution_id="big"),
            ex.create(LANE, execution_id=long_text),
            ex.create(long_text, execution_id="big"),
            ex.claim(LANE, (), long_text, TTL),
        )
        for call in calls:
            await _refused(store, "ex-1", PayloadTooLarge, call)
        await _raises(ExecutionNotFound("big"), ex.describe("big"))
        await ex.create(LANE, payload={"blob": "x" * 900}, execution_id="fits")


async def unknown_executions_are_not_found(make: StoreFactory) -> None:
    """An unknown execution id is ExecutionNotFound, for readers, producers and handles."""
    async with make() as store:
        ex = store.executions
        handle = await _claimed(store)
        for call in (ex.describe("nope"), ex.read_summary("nope"), ex.request_cancel("nope")):
            await _refused(store, "ex-1", ExecutionNotFound("nope"), call)
        await _refused(store, "ex-1", ExecutionNotFound("nope"), ex.reclaim("nope", "w", TTL))
        ghost = attrs.evolve(handle, execution_id="nope")
        await _all_refused(store, ghost, ExecutionNotFound("nope"), execution_id="ex-1")
        await _raises(ExecutionNotFound("nope"), ex.describe("nope"))


async def bad_lease_ttl_changes_nothing(make: StoreFactory) -> None:
    """A lease ttl that is not an int from 1 ms to 30 days is InvalidArgument for claim and
    reclaim, whether or not there is anything to claim; nothing changes."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        ex = store.executions
        bad_ttls: list[Any] = [0, -1, True, "1000", 1.5, None, 30 * 86_400_000 + 1, 2**63 - 1]
        for ttl in bad_ttls:
            with _case(f"claim on an empty lane, ttl={ttl!r}"):
                await _raises_type(InvalidArgument, ex.claim(LANE, (), "w1", ttl))
        await ex.create(LANE, execution_id="ex-1")
        for ttl in bad_ttls:
            with _case(f"claim, ttl={ttl!r}"):
                await _refused(store, "ex-1", InvalidArgument, ex.claim(LANE, (), "w1", ttl))
        bad_workers: list[Any] = [None, 5, "\ud800"]
        for worker in bad_workers:
            with _case(f"claim, worker_id={worker!r}"):
                await _refused(store, "ex-1", InvalidArgument, ex.claim(LANE, (), worker, TTL))
        bad_caps: list[Any] = ["capA", [1], ["\ud800"], None]
        for caps in bad_caps:
            with _case(f"claim, capabilities={caps!r}"):
                await _refused(store, "ex-1", InvalidArgument, ex.claim(LANE, caps, "w1", TTL))
        # Reclaim of a runnable, a live and an expired lease: the argument's error every time.
        for ttl in bad_ttls:
            with _case(f"reclaim of a runnable execution, ttl={ttl!r}"):
                await _refused(store, "ex-1", InvalidArgument, ex.reclaim("ex-1", "w2", ttl))
        handle = await ex.claim(LANE, (), "w1", 30 * 86_400_000)
        assert handle is not None
        for ttl in bad_ttls:
            with _case(f"reclaim of a live lease, ttl={ttl!r}"):
                await _refused(store, "ex-1", InvalidArgument, ex.reclaim("ex-1", "w2", ttl))
            with _case(f"reclaim of an unknown execution, ttl={ttl!r}"):
                await _raises_type(InvalidArgument, ex.reclaim("nope", "w2", ttl))
        clock.advance(30 * 86_400_000)
        for ttl in bad_ttls:
            with _case(f"reclaim of an expired lease, ttl={ttl!r}"):
                await _refused(store, "ex-1", InvalidArgument, ex.reclaim("ex-1", "w2", ttl))
        for worker in bad_workers:
            with _case(f"reclaim, worker_id={worker!r}"):
                await _refused(store, "ex-1", InvalidArgument, ex.reclaim("ex-1", worker, TTL))
        assert await ex.reclaim("ex-1", "w2", 1) is not None


async def bad_create_arguments_change_nothing(make: StoreFactory) -> None:
    """create refuses bad fields and a taken id, storing nothing."""
    async with make() as store:
        ex = store.executions
        original = await ex.create(
            LANE, capabilities=["b", "a", "a"], payload=[1], execution_id="x"
        )
        assert original.capabilities == ("a", "b")
        assert (original.state, original.payload, original.attempt_index) == (WAITING, [1], 0)
        bad: list[dict[str, Any]] = [
            {"lane": ""},
            {"lane": 5},
            {"capabilities": "capA"},
            {"capabilities": [1]},
            {"capabilities": None},
            {"priority": 1.5},
            {"priority": True},
            {"priority": 1 << 31},
            {"retry": RetryPolicy(max_attempts=0)},
            {"retry": RetryPolicy(base_backoff_ms=-1)},
            {"retry": {"max_attempts": 3}},
            {"execution_id": 5},
        ]
        for change in bad:
            kwargs: dict[str, Any] = {"lane": LANE, "execution_id": "new", **change}
            lane = kwargs.pop("lane")
            with _case(f"create with {change!r}"):
                await _refused(store, "x", InvalidArgument, ex.create(lane, **kwargs))
            await _raises(ExecutionNotFound("new"), ex.describe("new"))
        not_json: Any = {"a": {1}}
        await _refused(
            store, "x", PayloadNotSerializable, ex.create(LANE, payload=not_json, execution_id="n")
        )
        await _refused(store, "x", ConcurrentModification("x"), ex.create(LANE, execution_id="x"))
        assert await ex.describe("x") == original
        # Ids the store makes up are distinct.
        made = {(await ex.create(LANE)).execution_id for _ in range(5)}
        assert len(made) == 5 and "x" not in made


async def concurrent_workers(make: StoreFactory) -> None:
    """Racing workers: each execution is claimed once, an expired lease is reclaimed once,
    and one handle completes once (the others see ExecutionTerminal)."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        ex = store.executions
        for i in range(3):
            await ex.create(LANE, execution_id=f"ex-{i}")
        claims: dict[int, Handle | None] = {}

        async def claimer(n: int) -> None:
            claims[n] = await ex.claim(LANE, (), f"w{n}", 1000)

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(claimer, n)
        got = [h for h in claims.values() if h is not None]
        assert sorted(h.execution_id for h in got) == ["ex-0", "ex-1", "ex-2"], claims
        clock.advance(1000)
        reclaims: dict[int, Handle | None] = {}

        async def reclaimer(n: int) -> None:
            reclaims[n] = await ex.reclaim("ex-0", f"r{n}", TTL)

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(reclaimer, n)
        winners = [h for h in reclaims.values() if h is not None]
        assert len(winners) == 1, reclaims
        assert winners[0].lease_epoch == 2
        assert await _kinds(store, "lease", "ex-0") == ["acquired", "reclaimed"]
        outcomes: dict[int, object] = {}

        async def completer(n: int) -> None:
            try:
                await ex.complete(winners[0], n)
                outcomes[n] = "ok"
            except TurnbuckleError as exc:
                outcomes[n] = exc

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(completer, n)
        won = [n for n, o in outcomes.items() if o == "ok"]
        assert len(won) == 1, outcomes
        assert all(
            o == ExecutionTerminal("ex-0", "completed") for o in outcomes.values() if o != "ok"
        ), outcomes
        assert (await ex.describe("ex-0")).result == won[0]
        assert await _kinds(store, "completion", "ex-0") == ["completed"]


async def frames_span_attempts(make: StoreFactory) -> None:
    """One stream per execution: frames of a later attempt follow those of the earlier one,
    each marked with its attempt."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        ex = store.executions
        first = await _claimed(store)
        await ex.append_frame(first, FrameKind.STDOUT, "attempt 0", summary_patch={"try": 0})
        await ex.fail(first, FailureClass.TRANSIENT, "boom")
        clock.advance(60_000)
        second = await ex.claim(LANE, (), "w2", TTL)
        assert second is not None and second.attempt_index == 1
        await ex.append_frame(second, FrameKind.STDOUT, "attempt 1", summary_patch={"try": 1})
        frames = await ex.read_stream("ex-1")
        assert [(f.seq, f.attempt_index, f.data) for f in frames] == [
            (1, 0, "attempt 0"),
            (2, 1, "attempt 1"),
        ]
        assert await ex.read_summary("ex-1") == ({"try": 1}, 2)


async def event_outboxes_page_by_cursor(make: StoreFactory) -> None:
    """Each outbox holds only its own events, ids grow, and ``after`` pages through them."""
    async with make() as store:
        ex = store.executions
        for i in range(3):
            handle = await _claimed(store, execution_id=f"ex-{i}")
            await ex.renew(handle)
            await ex.complete(handle)
        lease = await ex.lease_events(0, 1000)
        assert [e.kind for e in lease] == ["acquired", "renewed", "revoked"] * 3
        assert all(e.stream == "lease" for e in lease)
        ids = [e.event_id for e in lease]
        assert ids == sorted(set(ids))
        paged: list[ExecutionEvent] = []
        while page := await ex.lease_events(paged[-1].event_id if paged else 0, 2):
            assert len(page) <= 2
            paged.extend(page)
        assert paged == lease
        assert await ex.lease_events(ids[-1]) == []
        assert await ex.lease_events(ids[4]) == lease[5:]
        completion = await ex.completion_events()
        assert [(e.execution_id, e.kind) for e in completion] == [
            (f"ex-{i}", "completed") for i in range(3)
        ]
        assert all(e.stream == "completion" for e in completion)


async def returned_values_are_copies(make: StoreFactory) -> None:
    """Mutating a payload after storing it, or a returned one, never changes the store."""
    async with make() as store:
        ex = store.executions
        payload: dict[str, Any] = {"args": [1, 2]}
        await ex.create(LANE, payload=payload, execution_id="ex-1")
        payload["args"].append(3)
        handle = await ex.claim(LANE, (), "w1", TTL)
        assert handle is not None
        data: dict[str, Any] = {"line": [1]}
        patch: dict[str, Any] = {"doc": {"k": [1]}}
        await ex.append_frame(handle, FrameKind.EVENT, data, summary_patch=patch)
        data["line"].append(2)
        patch["doc"]["k"].append(2)
        info = await ex.describe("ex-1")
        assert info.payload == {"args": [1, 2]}
        cast(Any, info.payload)["args"].append(4)
        assert (await ex.describe("ex-1")).payload == {"args": [1, 2]}
        frames = await ex.read_stream("ex-1")
        assert frames[0].data == {"line": [1]}
        cast(Any, frames[0].data)["line"].append(5)
        assert (await ex.read_stream("ex-1"))[0].data == {"line": [1]}
        summary = await ex.read_summary("ex-1")
        assert summary == ({"doc": {"k": [1]}}, 1)
        cast(Any, summary)[0]["doc"]["k"].append(6)
        assert await ex.read_summary("ex-1") == ({"doc": {"k": [1]}}, 1)


async def closed_store_refuses(make: StoreFactory) -> None:
    """After aclose every executions call is StoreClosedError."""
    async with make() as store:
        handle = await _claimed(store)
    ex = store.executions
    await _raises_type(StoreClosedError, ex.describe("ex-1"))
    await _raises_type(StoreClosedError, ex.create(LANE))
    await _raises_type(StoreClosedError, ex.claim(LANE, (), "w1", TTL))
    await _raises_type(StoreClosedError, ex.complete(handle))
    await _raises_type(StoreClosedError, ex.lease_events())


EXECUTION_SCENARIOS: tuple[Callable[[StoreFactory], Awaitable[None]], ...] = (
    # The reference hot path.
    claim_happy_path,
    claim_returns_none_when_nothing_is_eligible,
    claim_capability_mismatch_returns_none,
    claim_walks_past_capability_mismatch,
    complete_writes_terminal_and_clears_lease,
    complete_fence_mismatch,
    foreign_handle_rejected,
    claim_and_complete_emit_lease_events,
    fail_transient_schedules_retry,
    fail_permanent_is_terminal_failed,
    progress_writes_pct_and_message,
    progress_partial_update_keeps_the_other,
    progress_fence_mismatch,
    progress_partial_update_leaves_absent_field_absent,
    progress_both_none_is_a_no_op,
    renew_advances_expiry_and_emits_event,
    renew_fence_mismatch,
    append_frame_writes_durable_frames,
    append_frame_summary_merge_patch,
    append_frame_fence_mismatch,
    reclaim_expired_lease,
    reclaim_live_lease_returns_none,
    # Beyond the reference.
    expired_handle_is_fenced,
    reclaimed_handle_conflicts,
    finished_execution_is_terminal,
    retries_exhausted_after_max_attempts,
    failure_classes,
    request_cancel,
    bad_worker_inputs_change_nothing,
    oversize_payloads_change_nothing,
    unknown_executions_are_not_found,
    bad_lease_ttl_changes_nothing,
    bad_create_arguments_change_nothing,
    concurrent_workers,
    frames_span_attempts,
    event_outboxes_page_by_cursor,
    returned_values_are_copies,
    closed_store_refuses,
)


# --- damage ----------------------------------------------------------------------------------


async def corrupt_summary(make: StoreFactory, corrupt: Corrupt) -> None:
    """A damaged summary document is CorruptRecordError(executions, id) for read_summary and
    for a summary patch, which then writes nothing; the rest of the execution still works."""
    async with make() as store:
        ex = store.executions
        handle = await _claimed(store)
        await ex.append_frame(handle, FrameKind.EVENT, "one", summary_patch={"a": 1})
        await corrupt(store, "ex-1", "summary", "{broken")
        err = await _raises_type(CorruptRecordError, ex.read_summary("ex-1"))
        assert (getattr(err, "table", None), getattr(err, "key", None)) == ("executions", "ex-1")
        info = await ex.describe("ex-1")
        frames = await _frames(store, "ex-1")
        err = await _raises_type(
            CorruptRecordError,
            ex.append_frame(handle, FrameKind.EVENT, "two", summary_patch={"b": 2}),
        )
        assert (getattr(err, "table", None), getattr(err, "key", None)) == ("executions", "ex-1")
        assert await ex.describe("ex-1") == info
        assert await _frames(store, "ex-1") == frames
        assert (info.frame_count, info.summary_version) == (1, 1)
        # Frames without a patch, progress and completion do not need the document.
        assert await ex.append_frame(handle, FrameKind.STDOUT, "three") == 2
        await ex.progress(handle, 50)
        await ex.complete(handle, "done")
        assert (await ex.describe("ex-1")).state is COMPLETED
        await _raises_type(CorruptRecordError, ex.read_summary("ex-1"))


async def executions(make: StoreFactory, *, corrupt: Corrupt | None = None) -> None:
    """Run every execution scenario against fresh stores from ``make``.

    Pass ``corrupt`` (``corrupt(store, execution_id, column, raw_text)``, which must be able to
    damage the ``summary`` column) to also check how a damaged summary is reported.

    Raises:
        AssertionError: the store does not conform; the message says how.
    """
    for scenario in EXECUTION_SCENARIOS:
        await scenario(make)
    if corrupt is not None:
        await corrupt_summary(make, corrupt)
