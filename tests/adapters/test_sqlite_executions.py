"""The SQLite store serving ``store.executions``: the v1/v2 -> v3 migration, the store identity,
the schema's index use, agreement with the memory store, and workers in several processes."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import turnbuckle
from turnbuckle import (
    ClaimBoundary,
    CorruptRecordError,
    DeliveryPolicy,
    GraphAppend,
    QueuedWorkDraft,
    RuntimeCommit,
    SessionNode,
    SlotPolicy,
    TaskRecord,
    TaskStatus,
    TurnbuckleError,
)
from turnbuckle.adapters.sqlite import (
    _EXEC_EXPIRED,
    _EXEC_RUNNABLE,
    APPLICATION_ID,
    SCHEMA_VERSION,
)
from turnbuckle.errors import ForeignHandle
from turnbuckle.sansio.execution import ExecutionState, FailureClass, FrameKind, RetryPolicy
from turnbuckle.testing import FakeClock

from ..figures import record as record_figures
from ..reliability._shared import race_in_threads, reap
from ._execution_children import LANE, execution_worker
from ._session_children import WAIT_S, store_url
from .factories import side_by_side
from .schemas import V1_DDL, V2_DDL, copy_rows, schema, sql

#: What version 4 added to the schema (and it added columns to queued_work).
V4_OBJECTS = {
    "queued_work_parked",
    "queued_work_deliveries",
    "sqlite_autoindex_queued_work_deliveries_1",
    "queued_work_deliveries_by_source",
}
#: What version 3 added to the schema.
V3_OBJECTS = {
    "tb_identity",
    "sqlite_autoindex_tb_identity_1",
    "executions",
    "sqlite_autoindex_executions_1",
    "executions_runnable",
    "executions_expiring",
    "execution_frames",
    "sqlite_autoindex_execution_frames_1",
    "execution_events",
    "execution_events_by_stream",
    "execution_cancels",
    "sqlite_autoindex_execution_cancels_1",
    "sqlite_sequence",
}


# --- the migration ---------------------------------------------------------------------------

V1_TABLES = ("tb_meta", "tasks")
V2_TABLES = (
    *V1_TABLES,
    "session_heads",
    "graph_nodes",
    "usage_entries",
    "turn_stamps",
    "session_leases",
    "queued_work",
    "session_meta",
    "attachments",
    "blobs",
)


def draft(session_id: str, text: str = "work") -> QueuedWorkDraft:
    return QueuedWorkDraft(
        session_id=session_id,
        delivery=DeliveryPolicy.EARLIEST_SAFE_BOUNDARY,
        slot=SlotPolicy.EXCLUSIVE,
        payloads=[{"text": text}],
    )


async def fill(store: turnbuckle.Store) -> None:
    """A working task, a committed session turn, and a batch left queued."""
    await store.tasks.create_task(
        TaskRecord(
            task_id="old-task",
            session_id="old-session",
            status=TaskStatus.WORKING,
            original_method="tools/call",
            original_params={"n": 1},
        )
    )
    sessions = store.sessions
    await sessions.enqueue(draft("s"))
    lease = await sessions.try_claim_lease("s", "me", 60_000)
    assert lease is not None
    claim = await sessions.claim_queued_work(
        "s", lease.fence(), "me", ClaimBoundary.IDLE, 60_000, 10
    )
    assert claim is not None
    await sessions.bind("s").commit(
        RuntimeCommit(
            session_id="s",
            expected_head_revision=0,
            lease=lease.fence(),
            release=lease.fence(),
            graph=GraphAppend(nodes=[SessionNode(node_id="n1", payload="hi")]),
            completed_claims=[claim.completion()],
        )
    )
    await sessions.enqueue(draft("s2", "pending"))


async def make_old_file(tmp_path: Path, version: int) -> Path:
    """A store file as version ``version`` of the code left it (in WAL): its frozen DDL, with
    rows made through today's API in a scratch store and copied over."""
    scratch = tmp_path / f"scratch-{version}.db"
    async with turnbuckle.open_store(store_url(scratch)) as store:
        if version >= 2:
            await fill(store)
        else:
            await store.tasks.create_task(
                TaskRecord(
                    task_id="old-task",
                    status=TaskStatus.WORKING,
                    original_method="tools/call",
                    original_params={"n": 1},
                )
            )
    path = tmp_path / f"v{version}.db"
    ddl = V1_DDL if version == 1 else (*V1_DDL, *V2_DDL)
    tables = V1_TABLES if version == 1 else V2_TABLES
    sql(
        path,
        f"ATTACH DATABASE '{scratch}' AS scratch",
        "BEGIN IMMEDIATE",
        *ddl,
        f"PRAGMA application_id = {APPLICATION_ID}",
        f"PRAGMA user_version = {version}",
        # Only the counters that version had (a later migration adds the others).
        "INSERT OR REPLACE INTO main.tb_meta SELECT * FROM scratch.tb_meta"
        " WHERE key IN (SELECT key FROM main.tb_meta)",
        *copy_rows(ddl, tables[1:]),
        "COMMIT",
        "DETACH DATABASE scratch",
        "PRAGMA journal_mode = WAL",
    )
    return path


async def use_executions(store: turnbuckle.Store, execution_id: str) -> tuple[str, int]:
    """Create, claim, stream to and complete one execution (on a lane of its own): (store id,
    its lease epoch)."""
    ex = store.executions
    lane = f"lane-{execution_id}"
    await ex.create(lane, capabilities=["gpu"], payload={"x": 1}, execution_id=execution_id)
    handle = await ex.claim(lane, ["gpu", "cpu"], "w", 60_000)
    assert handle is not None and handle.execution_id == execution_id
    assert await ex.append_frame(handle, FrameKind.STDOUT, "out", summary_patch={"a": 1}) == 1
    await ex.complete(handle, {"ok": True})
    info = await ex.describe(execution_id)
    assert info.state is ExecutionState.COMPLETED and info.result == {"ok": True}
    assert [f.data for f in await ex.read_stream(execution_id)] == ["out"]
    assert await ex.read_summary(execution_id) == ({"a": 1}, 1)
    return handle.store_id, handle.lease_epoch


@pytest.mark.parametrize("version", [1, 2])
async def test_an_old_file_is_upgraded_to_serve_executions(tmp_path: Path, version: int) -> None:
    assert SCHEMA_VERSION == 4
    path = await make_old_file(tmp_path, version)
    fresh = tmp_path / "fresh.db"
    async with turnbuckle.open_store(store_url(fresh)):
        pass
    # The frozen DDL is what the code made at that version: today's schema without the
    # objects later versions added (and without the columns version 4 added to queued_work).
    if version == 2:
        later = {*V3_OBJECTS, *V4_OBJECTS, "queued_work"}
        assert [r for r in schema(path) if r[1] != "queued_work"] == [
            r for r in schema(fresh) if r[1] not in later
        ]
    async with turnbuckle.open_store(store_url(path)) as store:
        store_id, _ = await use_executions(store, "ex-1")
        task = await store.tasks.get_task("old-task")
        assert task is not None and task.status is TaskStatus.WORKING
        assert task.original_params == {"n": 1}
        if version == 2:
            read = await store.sessions.bind("s").load()
            assert read is not None and [n.node_id for n in read.nodes] == ["n1"]
            queued = await store.sessions.list_queued_work("s2")
            assert [b.enqueue_seq for b in queued] == [2]
            # The enqueue counter carried over.
            assert (await store.sessions.enqueue(draft("s3"))).enqueue_seq == 3
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert sql(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert sql(path, "PRAGMA integrity_check") == [("ok",)]
    # The upgraded file has exactly the schema of a file made new, and one identity.
    assert schema(path) == schema(fresh)
    assert sql(path, "SELECT key, value FROM tb_identity") == [("store_id", store_id)]
    # It opens again as a plain current-version file, with the same identity.
    async with turnbuckle.open_store(store_url(path)) as store:
        again, _ = await use_executions(store, "ex-2")
        assert again == store_id
        info = await store.executions.describe("ex-1")
        assert info.state is ExecutionState.COMPLETED


def test_concurrent_opens_of_a_version_2_file_agree_on_one_identity(tmp_path: Path) -> None:
    path = trio.run(make_old_file, tmp_path, 2)
    openers = 8

    async def open_and_claim(n: int) -> str:
        async with turnbuckle.open_store(store_url(path)) as store:
            store_id, _ = await use_executions(store, f"ex-{n}")
            return store_id

    outcomes = race_in_threads(openers, open_and_claim)
    assert len(set(outcomes.values())) == 1 and len(outcomes) == openers, outcomes
    assert sql(path, "SELECT value FROM tb_identity") == [(outcomes[0],)]
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert sql(path, "SELECT count(*) FROM executions") == [(openers,)]


# --- the store identity ----------------------------------------------------------------------


async def claim_one(store: turnbuckle.Store, lane: str = "lane") -> Any:
    await store.executions.create(lane)
    handle = await store.executions.claim(lane, [], "w", 60_000)
    assert handle is not None
    return handle


async def test_the_store_identity_is_stable_and_refuses_other_stores_handles(
    tmp_path: Path,
) -> None:
    one, two = store_url(tmp_path / "one.db"), store_url(tmp_path / "two.db")
    async with turnbuckle.open_store(one) as a, turnbuckle.open_store(one) as b:
        first = await claim_one(a)
        second = await claim_one(b)
        assert first.store_id == second.store_id
        assert len(first.store_id) == 16 and int(first.store_id, 16) >= 0
        assert first.backend == "sqlite"
        # A handle works through any handle on the same file.
        assert await b.executions.renew(first) is False
    assert sql(tmp_path / "one.db", "SELECT value FROM tb_identity") == [(first.store_id,)]
    async with turnbuckle.open_store(one) as a:
        # And after a reopen: the lease is still live, the handle still good.
        await a.executions.complete(first)
        assert (await claim_one(a)).store_id == first.store_id
    async with turnbuckle.open_store(two) as c, turnbuckle.open_store("memory://") as m:
        other = await claim_one(c)
        assert other.store_id != first.store_id
        with pytest.raises(ForeignHandle) as caught:
            await c.executions.renew(second)
        assert (caught.value.backend, caught.value.store_id) == ("sqlite", first.store_id)
        # A memory store's handle, even one naming this file's id, is refused: the backend
        # differs.
        memory = await claim_one(m)
        with pytest.raises(ForeignHandle):
            await c.executions.complete(attrs.evolve(memory, store_id=other.store_id))
        with pytest.raises(ForeignHandle):
            await m.executions.complete(other)
        assert (await c.executions.describe(other.execution_id)).state is ExecutionState.ACTIVE


async def test_a_missing_identity_is_a_corrupt_record(tmp_path: Path) -> None:
    path = tmp_path / "noid.db"
    async with turnbuckle.open_store(store_url(path)) as store:
        await store.executions.create("lane", execution_id="e")
    sql(path, "DELETE FROM tb_identity")
    async with turnbuckle.open_store(store_url(path)) as store:
        with pytest.raises(CorruptRecordError):
            await store.executions.claim("lane", [], "w", 1000)
        # Nothing was written.
        assert (await store.executions.describe("e")).state is ExecutionState.WAITING
        assert await store.executions.lease_events() == []


# --- rows, indexes and outbox ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "index"),
    [(_EXEC_RUNNABLE, "executions_runnable"), (_EXEC_EXPIRED, "executions_expiring")],
)
async def test_the_claim_and_reclaim_queries_walk_their_indexes(
    tmp_path: Path, query: str, index: str
) -> None:
    path = tmp_path / "plan.db"
    async with turnbuckle.open_store(store_url(path)) as store:
        for n in range(50):
            await store.executions.create(f"lane-{n % 3}", priority=n % 5)
        for _ in range(10):
            await store.executions.claim("lane-1", [], "w", 1)
    for statements in ([], ["ANALYZE"]):
        plan = " | ".join(
            str(row[-1])
            for row in sql(path, *statements, "EXPLAIN QUERY PLAN " + query.replace("?", "0"))
        )
        assert f"USING INDEX {index} (lane=?" in plan, plan
        assert "TEMP B-TREE" not in plan, plan


async def test_runnable_order_matches_priority_then_age_then_id(tmp_path: Path) -> None:
    clock = FakeClock()
    async with turnbuckle.open_store(store_url(tmp_path / "order.db"), clock=clock) as store:
        ex = store.executions
        for execution_id, priority, step in [
            ("e5", 0, 0),
            ("é1", 0, 0),  # a non-ASCII id sorts by code point, as in memory
            ("e4", 0, 0),
            ("e3", 2, 1),
            ("e0", 2, 0),
            ("e2", -1, 1),
            ("e1", 1, 0),
        ]:
            clock.advance(step)
            await ex.create("lane", priority=priority, execution_id=execution_id)
        await ex.create("other", priority=9, execution_id="elsewhere")
        order = []
        while (handle := await ex.claim("lane", [], "w", 1000)) is not None:
            order.append(handle.execution_id)
        assert order == ["e0", "e3", "e1", "e4", "e5", "é1", "e2"]


@pytest.mark.parametrize("adapter", ["memory", "sqlite"])
async def test_reclaim_expired_takes_the_oldest_expiry_first(tmp_path: Path, adapter: str) -> None:
    clock = FakeClock()
    url = "memory://" if adapter == "memory" else store_url(tmp_path / "expired.db")
    async with turnbuckle.open_store(url, clock=clock) as store:
        ex = store.executions
        # (id, capabilities, lease ttl): claimed in this order, all at one instant.
        for execution_id, caps, ttl in [
            ("late", [], 30),
            ("gpu", ["gpu"], 10),
            ("b", [], 20),
            ("a", [], 20),
            ("live", [], 1000),
        ]:
            await ex.create("lane", capabilities=caps, execution_id=execution_id)
            handle = await ex.claim("lane", ["gpu"], "w", ttl)
            assert handle is not None and handle.execution_id == execution_id
        await ex.create("other", execution_id="elsewhere")
        assert await ex.claim("other", [], "w", 1) is not None
        assert await ex.reclaim_expired("lane", [], "r", 500) is None  # nothing expired yet
        clock.advance(100)
        order = []
        while (got := await ex.reclaim_expired("lane", [], "r", 500)) is not None:
            assert got.kind == "reclaimed" and got.lease_epoch == 2
            order.append(got.execution_id)
        assert order == ["a", "b", "late"]  # "gpu" needs a capability, "live" is live
        got = await ex.reclaim_expired("lane", ["gpu"], "r", 500)
        assert got is not None and got.execution_id == "gpu"


@pytest.mark.parametrize("adapter", ["memory", "sqlite"])
async def test_a_caller_already_cancelled_starts_no_write(tmp_path: Path, adapter: str) -> None:
    """A worker cancelled between two calls must not reclaim (or claim) work it will never see:
    the lease it took would hold the execution until it expired."""
    url = "memory://" if adapter == "memory" else store_url(tmp_path / "cancelled.db")
    async with turnbuckle.open_store(url) as store:
        await store.executions.create("lane", execution_id="e")
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.executions.claim("lane", [], "w", 1000)
        assert scope.cancelled_caught
        info = await store.executions.describe("e")
        assert info.state is ExecutionState.WAITING and info.lease_epoch == 0
        assert await store.executions.lease_events() == []


async def test_event_ids_are_never_reused(tmp_path: Path) -> None:
    url = store_url(tmp_path / "events.db")
    async with turnbuckle.open_store(url) as a, turnbuckle.open_store(url) as b:
        for store in (a, b, a):
            await claim_one(store)
        ids = [e.event_id for e in await b.executions.lease_events()]
        assert ids == [1, 2, 3]
    # Even after the newest events are deleted (an outbox trimmed by hand), and a reopen.
    sql(tmp_path / "events.db", "DELETE FROM execution_events WHERE event_id > 1")
    async with turnbuckle.open_store(url) as store:
        await claim_one(store)
        assert [e.event_id for e in await store.executions.lease_events()] == [1, 4]


async def test_corrupt_rows_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.db"
    async with turnbuckle.open_store(store_url(path)) as store:
        handle = await claim_one(store)
        await store.executions.append_frame(handle, FrameKind.EVENT, {"k": 1})
    execution_id = handle.execution_id
    sql(
        path,
        f'UPDATE executions SET capabilities = \'{{"not": "a list"}}\''
        f" WHERE execution_id = '{execution_id}'",
        f"UPDATE execution_frames SET kind = 'smoke' WHERE execution_id = '{execution_id}'",
    )
    async with turnbuckle.open_store(store_url(path)) as store:
        with pytest.raises(CorruptRecordError):
            await store.executions.describe(execution_id)
        with pytest.raises(CorruptRecordError):
            await store.executions.read_stream(execution_id)


async def test_everything_survives_a_reopen(tmp_path: Path) -> None:
    url = store_url(tmp_path / "reopen.db")
    clock = FakeClock()
    async with turnbuckle.open_store(url, clock=clock) as store:
        ex = store.executions
        await ex.create(
            "lane",
            capabilities=["b", "a", "é"],
            priority=-7,
            payload={"k": [1, "é"]},
            retry=RetryPolicy(max_attempts=5, base_backoff_ms=10, max_backoff_ms=70),
            execution_id="e",
        )
        handle = await ex.claim("lane", ["a", "b", "é"], "w", 5000)
        assert handle is not None
        await ex.progress(handle, 40, "going")
        for n in range(3):
            await ex.append_frame(handle, FrameKind.STDERR, {"n": n}, summary_patch={str(n): n})
        await ex.request_cancel("e")
        before = (
            await ex.describe("e"),
            await ex.read_stream("e", after=1),
            await ex.read_summary("e"),
            await ex.lease_events(),
            await ex.completion_events(),
        )
        assert before[0].cancel_requested and before[0].capabilities == ("a", "b", "é")
    async with turnbuckle.open_store(url, clock=clock) as store:
        ex = store.executions
        after = (
            await ex.describe("e"),
            await ex.read_stream("e", after=1),
            await ex.read_summary("e"),
            await ex.lease_events(),
            await ex.completion_events(),
        )
        assert after == before
        assert await ex.renew(handle) is True  # the cancel request, seen on renew
        assert await ex.fail(handle, FailureClass.CANCELLED, "asked to") == "cancelled"
        assert [e.kind for e in await ex.completion_events()] == ["cancelled"]


# --- agreement with the memory store ---------------------------------------------------------

IDS = ["a", "b", "c"]
LANES = ["L1", "L2"]
CAPS = st.lists(st.sampled_from(["gpu", "cpu"]), max_size=2)

CREATE = st.tuples(
    st.just("create"),
    st.sampled_from([*IDS, *IDS, None]),
    st.sampled_from(LANES),
    CAPS,
    st.integers(-1, 2),
    st.integers(1, 3),
    st.integers(0, 20),
    st.integers(0, 50),
)
CLAIM = st.tuples(
    st.just("claim"),
    st.sampled_from(LANES),
    st.sampled_from([[], ["gpu"], ["cpu", "gpu"], ["cpu", "gpu"]]),
    st.sampled_from(["w1", "w2"]),
    st.integers(1, 30),
)
RECLAIM_EXPIRED = st.tuples(
    st.just("reclaim_expired"),
    st.sampled_from(LANES),
    st.sampled_from([[], ["gpu"], ["cpu", "gpu"], ["cpu", "gpu"]]),
    st.sampled_from(["w1", "w2"]),
    st.integers(1, 30),
)
#: A handle slot: negative ones count from the newest handle.
SLOT = st.integers(-2, 3)

operations = st.tuples(
    st.lists(CREATE, min_size=1, max_size=4),
    st.lists(CLAIM, min_size=1, max_size=2),
    st.lists(
        st.one_of(
            CREATE,
            CLAIM,
            CLAIM,
            RECLAIM_EXPIRED,
            st.tuples(
                st.just("reclaim"),
                st.sampled_from(IDS),
                st.sampled_from(["w1", "w2"]),
                st.integers(1, 30),
            ),
            st.tuples(st.just("renew"), SLOT),
            st.tuples(st.just("complete"), SLOT, st.integers(0, 3)),
            st.tuples(
                st.just("fail"),
                SLOT,
                st.sampled_from(list(FailureClass)),
                st.text(max_size=3),
            ),
            st.tuples(
                st.just("progress"),
                SLOT,
                st.none() | st.integers(0, 100),
                st.none() | st.text(max_size=3),
            ),
            st.tuples(
                st.just("frame"),
                SLOT,
                st.sampled_from(list(FrameKind)),
                st.integers(0, 9),
                st.none() | st.dictionaries(st.sampled_from("xy"), st.none() | st.integers(0, 3)),
            ),
            st.tuples(
                st.just("stream"), st.sampled_from(IDS), st.integers(0, 3), st.integers(1, 3)
            ),
            st.tuples(st.just("summary"), st.sampled_from(IDS)),
            st.tuples(st.just("describe"), st.sampled_from(IDS)),
            st.tuples(st.just("cancel"), st.sampled_from(IDS)),
            st.tuples(
                st.just("events"),
                st.sampled_from(["lease", "completion"]),
                st.integers(0, 6),
                st.integers(1, 4),
            ),
            st.tuples(st.just("tick"), st.integers(0, 40)),
            st.tuples(st.just("tick"), st.integers(0, 40)),
            RECLAIM_EXPIRED,
            RECLAIM_EXPIRED,
            RECLAIM_EXPIRED,
        ),
        min_size=5,
        max_size=40,
    ),
).map(lambda parts: [*parts[0], *parts[1], *parts[2]])


def _portable(value: Any) -> Any:
    """A handle without the store that issued it (the one thing adapters differ in)."""
    if isinstance(value, turnbuckle.sansio.execution.Handle):
        return attrs.evolve(value, store_id="", backend="")
    return value


async def apply(store: turnbuckle.Store, clock: FakeClock, handles: list[Any], op: Any) -> Any:
    ex = store.executions
    kind, *args = op

    def handle(slot: int) -> Any:
        return handles[slot % len(handles)] if handles else None

    if kind == "create":
        execution_id, lane, caps, priority, attempts, base, cap = args
        retry = RetryPolicy(max_attempts=attempts, base_backoff_ms=base, max_backoff_ms=cap)
        return await ex.create(
            lane,
            capabilities=caps,
            priority=priority,
            payload={"id": execution_id},
            retry=retry,
            execution_id=execution_id,
        )
    if kind in ("claim", "reclaim", "reclaim_expired"):
        got = await getattr(ex, kind)(*args)
        if got is not None:
            handles.append(got)
        return _portable(got)
    if kind == "tick":
        clock.advance(args[0])
        return None
    if kind == "stream":
        return await ex.read_stream(*args)
    if kind == "summary":
        return await ex.read_summary(args[0])
    if kind == "describe":
        return await ex.describe(args[0])
    if kind == "cancel":
        return await ex.request_cancel(args[0])
    if kind == "events":
        stream, after, limit = args
        read = ex.lease_events if stream == "lease" else ex.completion_events
        return await read(after, limit)
    h = handle(args[0])
    if h is None:
        return "no handle"
    if kind == "renew":
        return await ex.renew(h)
    if kind == "complete":
        return await ex.complete(h, {"r": args[1]})
    if kind == "fail":
        return await ex.fail(h, args[1], args[2])
    if kind == "progress":
        return await ex.progress(h, args[1], args[2])
    if kind == "frame":
        return await ex.append_frame(h, args[1], {"d": args[2]}, summary_patch=args[3])
    raise AssertionError(op)


async def outcome(store: turnbuckle.Store, clock: FakeClock, handles: list[Any], op: Any) -> Any:
    try:
        return ("ok", await apply(store, clock, handles, op))
    except TurnbuckleError as exc:
        return ("error", exc)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=operations)
async def test_executions_agree_with_the_memory_store(tmp_path: Path, ops: list[Any]) -> None:
    handles: list[list[Any]] = [[], []]
    async with side_by_side(tmp_path) as (stores, clocks):
        for op in ops:
            results = [
                await outcome(store, clock, mine, op)
                for store, clock, mine in zip(stores, clocks, handles, strict=True)
            ]
            assert results[0] == results[1], op
            event(f"{op[0]}: {results[0][0]} {type(results[0][1]).__name__}")
        finals = [
            [await outcome(store, clocks[0], [], ("describe", i)) for i in IDS]
            + [await outcome(store, clocks[0], [], ("events", s, 0, 1000)) for s in ("lease",)]
            + [await outcome(store, clocks[0], [], ("events", "completion", 0, 1000))]
            + [await outcome(store, clocks[0], [], ("stream", i, 0, 1000)) for i in IDS]
            for store in stores
        ]
        assert finals[0] == finals[1]


# --- workers in several processes ------------------------------------------------------------

SOAK = os.environ.get("TURNBUCKLE_SOAK") == "1"


@pytest.mark.parametrize(("workers", "executions"), [(3, 60), (16, 400 if SOAK else 160)])
def test_worker_processes_end_each_execution_exactly_once(
    tmp_path: Path,
    workers: int,
    executions: int,
) -> None:
    """Spawned workers (3, then 16) share one file and one lane: claims never hand one
    execution to two live leases, a worker that stalls past its lease loses it to a reclaim and
    is refused when it completes late, and every execution completes exactly once."""
    path = tmp_path / "workers.db"
    markers = tmp_path / "markers"
    markers.mkdir()

    async def seed() -> list[str]:
        async with turnbuckle.open_store(store_url(path)) as store:
            return [
                (await store.executions.create(LANE, payload={"n": n})).execution_id
                for n in range(executions)
            ]

    ids = trio.run(seed)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(workers, timeout=WAIT_S)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=execution_worker,
            args=(str(path), f"worker-{n}", n, ids, str(markers), 1000 + n, start, results),
        )
        for n in range(workers)
    ]
    for proc in procs:
        proc.start()
    reports: dict[str, Any] = {}
    try:
        for _ in range(workers):
            worker_id, report = results.get(timeout=WAIT_S)
            reports[worker_id] = report
    finally:
        reap(procs, results)
    assert [proc.exitcode for proc in procs] == [0] * workers, reports
    for worker_id, report in reports.items():
        assert isinstance(report, dict), (worker_id, report)

    def every(key: str) -> list[Any]:
        return [item for report in reports.values() for item in report[key]]

    assert every("violations") == []
    assert every("timeouts") == []
    assert list(markers.iterdir()) == []
    # The stall path ran: stale handles were refused, and some execution was reclaimed.
    stalls = every("stalls")
    assert stalls and all(outcome != "completed" for *_, outcome in stalls), stalls
    assert every("stale") and every("reclaims")

    async def check() -> tuple[Any, ...]:
        async with turnbuckle.open_store(store_url(path)) as store:
            ex = store.executions
            infos = [await ex.describe(execution_id) for execution_id in ids]
            lease: list[Any] = []
            while page := await ex.lease_events(lease[-1].event_id if lease else 0, 1000):
                lease.extend(page)
            done: list[Any] = []
            while page := await ex.completion_events(done[-1].event_id if done else 0, 1000):
                done.extend(page)
            return infos, lease, done

    infos, lease, done = trio.run(check)
    assert all(info.state is ExecutionState.COMPLETED for info in infos)
    # Exactly one completion per execution, matching the one completion a worker saw.
    assert Counter((e.execution_id, e.kind) for e in done) == {(i, "completed"): 1 for i in ids}
    completed = {
        (execution_id, epoch): worker_id
        for worker_id, report in reports.items()
        for execution_id, epoch in report["completed"]
    }
    assert len(completed) == len(every("completed"))
    assert sorted(completed) == sorted((e.execution_id, e.lease_epoch) for e in done)
    by_id = {info.execution_id: info for info in infos}
    for (execution_id, epoch), worker_id in completed.items():
        assert by_id[execution_id].lease_epoch == epoch
        assert by_id[execution_id].result == {"by": worker_id, "epoch": epoch}
    # Lease epochs: strictly increasing per execution over its grants (acquired, reclaimed),
    # and every renewal or revocation names the latest grant.
    event_ids = [e.event_id for e in lease]
    assert event_ids == sorted(set(event_ids))
    grants: dict[str, list[int]] = defaultdict(list)
    for lease_event in lease:
        epoch, execution_id = lease_event.lease_epoch, lease_event.execution_id
        if lease_event.kind in ("acquired", "reclaimed"):
            grants[execution_id].append(epoch)
        else:
            assert epoch == grants[execution_id][-1], lease_event
    for execution_id, epochs in grants.items():
        assert epochs == sorted(set(epochs)) and epochs[0] == 1, (execution_id, epochs)
    assert sum(e.kind == "reclaimed" for e in lease) == len(every("reclaims")) >= 1
    record_figures(
        "Claims under stalls: no double ownership, every execution ends exactly once",
        f"{workers} worker processes on one SQLite file drain a lane; some stall past their"
        " lease, others reclaim; an O_EXCL marker per execution catches two live holders",
        processes=workers,
        executions=len(ids),
        double_ownership=0,
        duplicate_completions=0,
        stalls_past_the_lease=len(stalls),
        reclaims=len(every("reclaims")),
        stale_completions_rejected=len(every("stale")),
    )
