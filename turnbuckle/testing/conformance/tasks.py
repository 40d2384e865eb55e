"""Conformance scenarios for ``store.tasks``: what every store adapter must do.

Each scenario is a plain async function taking a :data:`StoreFactory`: ``make(**options)`` opens a
fresh, empty store (as an async context manager) with the given :func:`turnbuckle.open_store`
options (``clock``, ``ids``, ``max_tasks``, ``max_payload_bytes``). The first eleven are the
reference parity scenarios of turul-mcp-task-storage, tightened where the reference was loose
(two concurrent updates: exactly one wins). The rest cover what the reference got wrong or left
out. Run them all with :func:`task_store`, or one by one from :data:`TASK_STORE_SCENARIOS`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import anyio
import attrs

from turnbuckle.adapters.store import Store
from turnbuckle.errors import (
    ConcurrentModification,
    CorruptRecordError,
    InvalidArgument,
    InvalidCursor,
    InvalidTransition,
    MaxTasksReached,
    PayloadNotSerializable,
    PayloadTooLarge,
    StoreClosedError,
    TaskAlreadyExists,
    TaskNotFound,
    TerminalState,
    TurnbuckleError,
)
from turnbuckle.sansio.task import (
    RECOVERED_MESSAGE,
    TaskRecord,
    TaskRpcError,
    TaskStatus,
    TaskSuccess,
    parse_timestamp,
)
from turnbuckle.testing.conformance._check import raises as _raises
from turnbuckle.testing.conformance._check import raises_type as _raises_type
from turnbuckle.testing.fakes import FakeClock, SeededIds

__all__ = [
    "REOPEN_SCENARIOS",
    "TASK_STORE_SCENARIOS",
    "Corrupt",
    "StoreFactory",
    "task_store",
    "task_store_reopen",
]

#: ``make(**options)`` opens a fresh, empty store; options are those of ``open_store``.
StoreFactory: TypeAlias = Callable[..., contextlib.AbstractAsyncContextManager[Store]]
#: ``corrupt(store, task_id, column, raw_text)`` damages one stored column the way a disk or a
#: stray writer would (the adapter's own encoding is bypassed).
Corrupt: TypeAlias = Callable[[Store, str, str, str], Awaitable[None]]

W, IR = TaskStatus.WORKING, TaskStatus.INPUT_REQUIRED
C, F, X = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED
ALL = (W, IR, C, F, X)


def make_task(
    task_id: str, session_id: str | None = None, created_at: str = "2025-06-01T00:00:00Z"
) -> TaskRecord:
    """A minimal working task, as the reference's ``make_task``."""
    return TaskRecord(
        task_id=task_id,
        session_id=session_id,
        created_at=created_at,
        last_updated_at=created_at,
        original_method="tools/call",
    )


def make_full_task(task_id: str, session_id: str, created_at: str) -> TaskRecord:
    """A task with every optional field set, as the reference's ``make_full_task``."""
    return TaskRecord(
        task_id=task_id,
        session_id=session_id,
        status_message="Processing...",
        created_at=created_at,
        last_updated_at=created_at,
        ttl=60_000,
        poll_interval=5_000,
        original_method="tools/call",
        original_params={"tool": "calculator", "args": {"a": 1, "b": 2}},
        meta={"key1": "value1", "key2": 42},
    )


async def _all(store: Store, session_id: str | None = None, limit: int = 1000) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        if session_id is None:
            page = await store.tasks.list_tasks(cursor, limit)
        else:
            page = await store.tasks.list_tasks_for_session(session_id, cursor, limit)
        ids.extend(t.task_id for t in page.tasks)
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


# --- the eleven reference parity scenarios ---------------------------------------------------


async def create_and_retrieve(make: StoreFactory) -> None:
    """A full record round-trips every field; get of a missing id is None; delete is true once."""
    async with make() as store:
        task = make_full_task("parity-crud-1", "sess-1", "2025-06-01T00:00:00Z")
        created = await store.tasks.create_task(task)
        assert created == task
        fetched = await store.tasks.get_task("parity-crud-1")
        assert fetched == task
        assert await store.tasks.get_task("nonexistent") is None
        assert await store.tasks.delete_task("parity-crud-1") is True
        assert await store.tasks.delete_task("parity-crud-1") is False
        assert await store.tasks.get_task("parity-crud-1") is None


async def state_machine_enforcement(make: StoreFactory) -> None:
    """W->IR->W->C succeed; W->W is InvalidTransition; a missing id is TaskNotFound."""
    async with make() as store:
        await store.tasks.create_task(make_task("parity-sm-1"))
        updated = await store.tasks.update_task_status("parity-sm-1", IR, "Need input")
        assert (updated.status, updated.status_message) == (IR, "Need input")
        updated = await store.tasks.update_task_status("parity-sm-1", W, "Resuming")
        assert (updated.status, updated.status_message) == (W, "Resuming")
        updated = await store.tasks.update_task_status("parity-sm-1", C)
        assert updated.status is C
        await store.tasks.create_task(make_task("parity-sm-2", None, "2025-06-01T00:00:01Z"))
        await _raises(InvalidTransition(W, W), store.tasks.update_task_status("parity-sm-2", W))
        await _raises(TaskNotFound("nonexistent"), store.tasks.update_task_status("nonexistent", C))
        assert (await store.tasks.get_task("parity-sm-2")) == make_task(
            "parity-sm-2", None, "2025-06-01T00:00:01Z"
        )


async def terminal_state_rejection(make: StoreFactory) -> None:
    """Every move out of a terminal state is TerminalState(that state), checked first."""
    async with make() as store:
        for i, terminal in enumerate((C, F, X)):
            task_id = f"parity-term-{i}"
            await store.tasks.create_task(make_task(task_id, None, f"2025-06-01T00:00:0{i}Z"))
            done = await store.tasks.update_task_status(task_id, terminal)
            for target in ALL:
                await _raises(
                    TerminalState(terminal), store.tasks.update_task_status(task_id, target, "late")
                )
            assert await store.tasks.get_task(task_id) == done


async def cursor_determinism(make: StoreFactory) -> None:
    """Ten tasks with one created_at page back in task_id order, three at a time."""
    async with make() as store:
        ids = [f"parity-cursor-{i:02}" for i in range(10)]
        for task_id in reversed(ids):
            await store.tasks.create_task(
                make_task(task_id, "cursor-session", "2025-06-01T12:00:00Z")
            )
        assert await _all(store, "cursor-session", limit=3) == ids
        assert await _all(store, None, limit=3) == ids
        page = await store.tasks.list_tasks_for_session("cursor-session", None, 10)
        assert page.next_cursor is None, "a full last page must not promise more"


async def session_scoping(make: StoreFactory) -> None:
    """Session A sees its two tasks, B its one, C none: no leakage across sessions."""
    async with make() as store:
        await store.tasks.create_task(make_task("parity-scope-a1", "scope-sess-A"))
        await store.tasks.create_task(
            make_task("parity-scope-a2", "scope-sess-A", "2025-06-01T00:00:01Z")
        )
        await store.tasks.create_task(
            make_task("parity-scope-b1", "scope-sess-B", "2025-06-01T00:00:02Z")
        )
        await store.tasks.create_task(make_task("parity-unscoped", None))
        page_a = await store.tasks.list_tasks_for_session("scope-sess-A")
        assert [t.task_id for t in page_a.tasks] == ["parity-scope-a1", "parity-scope-a2"]
        page_b = await store.tasks.list_tasks_for_session("scope-sess-B")
        assert [t.task_id for t in page_b.tasks] == ["parity-scope-b1"]
        assert (await store.tasks.list_tasks_for_session("scope-sess-C")).tasks == ()
        assert len((await store.tasks.list_tasks()).tasks) == 4


async def ttl_expiry(make: StoreFactory) -> None:
    """An expired task (any status) is returned and removed; no-TTL and live-TTL tasks stay."""
    async with make() as store:
        expired = attrs.evolve(make_task("parity-ttl-expired", None, "2020-01-01T00:00:00Z"), ttl=1)
        await store.tasks.create_task(expired)
        await store.tasks.create_task(make_task("parity-ttl-keep", None, "2020-01-01T00:00:00Z"))
        future = attrs.evolve(
            make_task("parity-ttl-future", None, "2099-01-01T00:00:00Z"), ttl=999_999_999
        )
        await store.tasks.create_task(future)
        assert await store.tasks.expire_tasks() == ["parity-ttl-expired"]
        assert await store.tasks.get_task("parity-ttl-expired") is None
        assert await store.tasks.get_task("parity-ttl-keep") is not None
        assert await store.tasks.get_task("parity-ttl-future") is not None
        assert await store.tasks.expire_tasks() == []


async def task_result_round_trip(make: StoreFactory) -> None:
    """Success and JSON-RPC error outcomes come back exactly as stored."""
    async with make() as store:
        await store.tasks.create_task(make_task("parity-result-ok"))
        success = TaskSuccess(
            {
                "content": [{"type": "text", "text": "Result data"}],
                "isError": False,
                "structuredContent": {"value": 42},
            }
        )
        await store.tasks.store_task_result("parity-result-ok", success)
        assert await store.tasks.get_task_result("parity-result-ok") == success
        assert (await store.tasks.get_task("parity-result-ok")).status is W  # type: ignore[union-attr]
        await store.tasks.create_task(make_task("parity-result-err", None, "2025-06-01T00:00:01Z"))
        error = TaskRpcError(
            code=-32010, message="Tool execution failed", data={"detail": "division by zero"}
        )
        await store.tasks.store_task_result("parity-result-err", error)
        assert await store.tasks.get_task_result("parity-result-err") == error
        await store.tasks.create_task(make_task("parity-result-none", None))
        assert await store.tasks.get_task_result("parity-result-none") is None
        await _raises(TaskNotFound("nonexistent"), store.tasks.get_task_result("nonexistent"))
        await _raises(
            TaskNotFound("nonexistent"), store.tasks.store_task_result("nonexistent", success)
        )


async def recover_stuck_tasks(make: StoreFactory) -> None:
    """Old live tasks fail with the restart message and an error outcome; others are untouched."""
    async with make() as store:
        await store.tasks.create_task(make_task("parity-stuck-1", None, "2020-01-01T00:00:00Z"))
        stuck_ir = attrs.evolve(
            make_task("parity-stuck-2", None, "2020-01-01T00:00:01Z"), status=IR
        )
        await store.tasks.create_task(stuck_ir)
        await store.tasks.create_task(make_task("parity-recent", None, "2099-01-01T00:00:00Z"))
        done = attrs.evolve(make_task("parity-done", None, "2020-01-01T00:00:02Z"), status=C)
        await store.tasks.create_task(done)
        recovered = await store.tasks.recover_stuck_tasks(300_000)
        assert sorted(recovered) == ["parity-stuck-1", "parity-stuck-2"]
        for task_id in recovered:
            task = await store.tasks.get_task(task_id)
            assert task is not None
            assert (task.status, task.status_message) == (F, RECOVERED_MESSAGE)
            assert isinstance(task.result, TaskRpcError) and task.result.code == -32603
        assert (await store.tasks.get_task("parity-recent")).status is W  # type: ignore[union-attr]
        assert await store.tasks.get_task("parity-done") == done
        assert await store.tasks.recover_stuck_tasks(300_000) == []


async def max_tasks_limit(make: StoreFactory) -> None:
    """With max_tasks=n, the (n+1)th create is MaxTasksReached(n); a delete makes room."""
    async with make(max_tasks=5) as store:
        for i in range(5):
            await store.tasks.create_task(
                make_task(f"parity-max-{i}", None, f"2025-06-01T00:00:{i:02}Z")
            )
        await _raises(MaxTasksReached(5), store.tasks.create_task(make_task("parity-max-overflow")))
        assert await store.tasks.task_count() == 5
        assert await store.tasks.get_task("parity-max-overflow") is None
        await store.tasks.delete_task("parity-max-0")
        await store.tasks.create_task(make_task("parity-max-overflow"))
        assert await store.tasks.task_count() == 5


async def error_mapping_parity(make: StoreFactory) -> None:
    """The three lifecycle errors carry their fields and are importable from turnbuckle."""
    import turnbuckle

    async with make() as store:
        err = await _raises_type(
            turnbuckle.TaskNotFound, store.tasks.update_task_status("error-parity-missing", C)
        )
        assert err.task_id == "error-parity-missing"  # type: ignore[attr-defined]
        await store.tasks.create_task(make_task("error-parity-inv"))
        err = await _raises_type(
            turnbuckle.InvalidTransition, store.tasks.update_task_status("error-parity-inv", W)
        )
        assert (err.current, err.requested) == (W, W)  # type: ignore[attr-defined]
        await store.tasks.update_task_status("error-parity-inv", C)
        err = await _raises_type(
            turnbuckle.TerminalState, store.tasks.update_task_status("error-parity-inv", W)
        )
        assert err.status is C  # type: ignore[attr-defined]


async def concurrent_status_updates(make: StoreFactory) -> None:
    """Eight concurrent W->C updates: exactly one wins, the rest get TerminalState(completed),
    the winner's message persists, and no record is duplicated."""
    async with make() as store:
        await store.tasks.create_task(make_task("parity-concurrent-1"))
        before = await store.tasks.task_count()
        outcomes: dict[int, object] = {}

        async def racer(n: int) -> None:
            try:
                await store.tasks.update_task_status("parity-concurrent-1", C, f"winner-{n}")
                outcomes[n] = "ok"
            except TurnbuckleError as exc:
                outcomes[n] = exc

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(racer, n)
        winners = [n for n, o in outcomes.items() if o == "ok"]
        assert len(winners) == 1, outcomes
        losers = [o for o in outcomes.values() if o != "ok"]
        assert all(o == TerminalState(C) for o in losers), losers
        final = await store.tasks.get_task("parity-concurrent-1")
        assert final is not None
        assert (final.status, final.status_message) == (C, f"winner-{winners[0]}")
        assert await store.tasks.task_count() == before


# --- beyond the reference --------------------------------------------------------------------


async def store_fills_ids_and_times(make: StoreFactory) -> None:
    """Empty id and times are filled: a 32-hex time-ordered id, the clock's ISO-8601 UTC time."""
    clock = FakeClock(1_748_736_000_000)
    async with make(clock=clock, ids=SeededIds(7)) as store:
        first = await store.tasks.create_task(TaskRecord(original_method="tools/call"))
        clock.advance(1)
        second = await store.tasks.create_task(TaskRecord(original_method="tools/call"))
        for task in (first, second):
            assert len(task.task_id) == 32 and int(task.task_id, 16) >= 0
            assert task.created_at == task.last_updated_at
        assert first.created_at == "2025-06-01T00:00:00.000Z"
        assert first.task_id < second.task_id, "ids sort by creation time"
        # Within one millisecond, a store's ids still sort in the order it made them.
        burst = [
            (await store.tasks.create_task(TaskRecord(original_method="m"))).task_id
            for _ in range(20)
        ]
        assert await _all(store) == [first.task_id, second.task_id, *burst]
        clock.advance(1500)
        moved = await store.tasks.update_task_status(first.task_id, IR)
        assert moved.last_updated_at == "2025-06-01T00:00:01.501Z"
        assert moved.created_at == first.created_at


async def duplicate_id_is_refused(make: StoreFactory) -> None:
    """Creating an existing id is TaskAlreadyExists and leaves the original alone."""
    async with make() as store:
        original = make_full_task("dup", "s", "2025-06-01T00:00:00Z")
        await store.tasks.create_task(original)
        await _raises(TaskAlreadyExists("dup"), store.tasks.create_task(make_task("dup")))
        assert await store.tasks.get_task("dup") == original
        assert await store.tasks.task_count() == 1


async def finishing_is_atomic(make: StoreFactory) -> None:
    """complete/fail/cancel store outcome and status in one write; a late finish after a cancel
    is TerminalState(cancelled) and stores nothing."""
    async with make() as store:
        for task_id in ("done", "failed", "cancelled", "late"):
            await store.tasks.create_task(make_task(task_id))
        ok = TaskSuccess({"content": [], "isError": False})
        done = await store.tasks.complete_task("done", ok, "finished")
        assert (done.status, done.status_message, done.result) == (C, "finished", ok)
        error = TaskRpcError(code=-32603, message="boom")
        failed = await store.tasks.fail_task("failed", error)
        assert (failed.status, failed.result) == (F, error)
        assert await store.tasks.get_task_result("failed") == error
        cancelled = await store.tasks.cancel_task("cancelled")
        assert (cancelled.status, cancelled.result) == (X, None)
        assert cancelled.status_message == "Cancelled by client"
        await _raises(TerminalState(X), store.tasks.complete_task("cancelled", ok))
        # Arguments are checked before the task's state: the same bad call, the same error.
        await _raises_type(
            PayloadNotSerializable,
            store.tasks.complete_task("cancelled", TaskSuccess({1})),  # type: ignore[arg-type]
        )
        await _raises(TerminalState(X), store.tasks.store_task_result("cancelled", ok))
        await _raises(TerminalState(C), store.tasks.cancel_task("done"))
        await _raises(TerminalState(C), store.tasks.fail_task("done", error))
        assert await store.tasks.get_task("cancelled") == cancelled
        assert await store.tasks.get_task("done") == done
        await store.tasks.update_task_status("late", IR, "asking")
        late = await store.tasks.complete_task("late", ok)
        assert (late.status, late.status_message) == (C, None)
        await _raises(TaskNotFound("nope"), store.tasks.complete_task("nope", ok))
        await _raises(TaskNotFound("nope"), store.tasks.cancel_task("nope"))


async def update_task_replaces_fields(make: StoreFactory) -> None:
    """update_task replaces a live task's fields under the lifecycle rules, or changes nothing."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        original = await store.tasks.create_task(make_full_task("u", "s", "2025-06-01T00:00:00Z"))
        clock.advance(10)
        wanted = attrs.evolve(
            original,
            status=IR,
            status_message="need a file",
            ttl=None,
            meta={"step": 2},
            created_at="",
            last_updated_at="",
        )
        updated = await store.tasks.update_task(wanted)
        assert updated == attrs.evolve(
            wanted, created_at=original.created_at, last_updated_at="2025-06-01T00:00:00.010Z"
        )
        assert await store.tasks.get_task("u") == updated
        await _raises(InvalidTransition(IR, IR), store.tasks.update_task_status("u", IR))
        await _raises_type(
            InvalidArgument, store.tasks.update_task(attrs.evolve(updated, session_id="other"))
        )
        await _raises_type(
            InvalidArgument,
            store.tasks.update_task(attrs.evolve(updated, created_at="2024-01-01T00:00:00Z")),
        )
        await _raises(
            TaskNotFound("missing"),
            store.tasks.update_task(attrs.evolve(updated, task_id="missing")),
        )
        assert await store.tasks.get_task("u") == updated
        finished = await store.tasks.update_task(attrs.evolve(updated, status=C))
        assert finished.status is C
        await _raises(TerminalState(C), store.tasks.update_task(attrs.evolve(updated, status=W)))
        assert await store.tasks.get_task("u") == finished


async def update_task_is_optimistic(make: StoreFactory) -> None:
    """update_task with the last_updated_at it read is refused, changing nothing, once another
    writer has touched the task; with it empty it overwrites."""
    async with make() as store:
        read = await store.tasks.create_task(make_task("o"))
        moved = await store.tasks.update_task_status("o", IR, "asked the user")
        await _raises(
            ConcurrentModification("o"),
            store.tasks.update_task(attrs.evolve(read, status_message="stale write")),
        )
        assert await store.tasks.get_task("o") == moved
        fresh = await store.tasks.update_task(attrs.evolve(moved, meta={"m": 1}))
        assert (fresh.status, fresh.meta) == (IR, {"m": 1})
        blind = await store.tasks.update_task(attrs.evolve(read, last_updated_at=""))
        assert (blind.status, blind.meta) == (W, None)


async def progress_messages(make: StoreFactory) -> None:
    """set_status_message reports progress on a live task without moving it; every write
    stamps a strictly later last_updated_at, even within one millisecond or when the clock
    steps back."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        task = await store.tasks.create_task(TaskRecord(task_id="p", original_method="m"))
        stamps = [task.last_updated_at]
        for percent in (10, 50, 90):
            task = await store.tasks.set_status_message("p", f"{percent}%")
            assert (task.status, task.status_message) == (W, f"{percent}%")
            stamps.append(task.last_updated_at)
        clock.set(clock.now_ms() - 60_000)
        task = await store.tasks.update_task_status("p", IR, "need input")
        task = await store.tasks.set_status_message("p", "still waiting")
        assert (task.status, task.status_message) == (IR, "still waiting")
        stamps.append(task.last_updated_at)
        instants = [parse_timestamp("t", stamp) for stamp in stamps]
        assert instants == sorted(set(instants)), stamps
        await store.tasks.complete_task("p", TaskSuccess(None))
        await _raises(TerminalState(C), store.tasks.set_status_message("p", "late"))
        await _raises(TaskNotFound("q"), store.tasks.set_status_message("q", "x"))
        await _raises_type(InvalidArgument, store.tasks.set_status_message("p", 5))  # type: ignore[arg-type]


async def bad_payloads_change_nothing(make: StoreFactory) -> None:
    """Non-JSON payloads are PayloadNotSerializable naming the path; oversize ones are
    PayloadTooLarge; bad fields are InvalidArgument; the store is unchanged after each."""
    async with make(max_payload_bytes=1000) as store:
        base = make_task("ok")
        await store.tasks.create_task(base)
        not_json: list[tuple[Any, str]] = [
            ({"a": {1, 2}}, "$.a"),
            ({"a": b"x"}, "$.a"),
            ({"a": (1, 2)}, "$.a"),
            ({"a": [1, float("nan")]}, "$.a[1]"),
            ({"a": float("inf")}, "$.a"),
            ({1: "x"}, "$"),
            ({"a": "\ud800"}, "$.a"),
            ({"a": object()}, "$.a"),
        ]
        for params, path in not_json:
            err = await _raises_type(
                PayloadNotSerializable,
                store.tasks.create_task(attrs.evolve(make_task("bad"), original_params=params)),
            )
            assert err.path == path, (params, err)  # type: ignore[attr-defined]
            err = await _raises_type(
                PayloadNotSerializable, store.tasks.complete_task("ok", TaskSuccess(params))
            )
        big: dict[str, Any] = {"blob": "x" * 2000}
        err = await _raises_type(
            PayloadTooLarge, store.tasks.create_task(attrs.evolve(make_task("bad"), meta=big))
        )
        assert err.limit == 1000 and err.size > 1000  # type: ignore[attr-defined]
        await _raises_type(PayloadTooLarge, store.tasks.store_task_result("ok", TaskSuccess(big)))
        # Every text field is bounded too, not only the JSON payloads.
        long_text = "m" * 1001
        for call in (
            store.tasks.update_task_status("ok", IR, long_text),
            store.tasks.set_status_message("ok", long_text),
            store.tasks.complete_task("ok", TaskRpcError(-1, long_text)),
            store.tasks.create_task(make_task(long_text)),
            store.tasks.create_task(attrs.evolve(make_task("bad"), original_method=long_text)),
        ):
            await _raises_type(PayloadTooLarge, call)
        bad_fields: list[dict[str, Any]] = [
            {"ttl": -1},
            {"ttl": True},
            {"ttl": 2**63},
            {"ttl": 2**63 - 1},  # the expiry instant would overflow 64 bits
            {"poll_interval": "5"},
            {"created_at": "yesterday"},
            {"created_at": "2025-06-01T00:00:00"},
            {"status": "working"},
            {"session_id": 7},
            {"original_method": None},
            {"meta": ["not", "a", "dict"]},
            {"task_id": "\udc00"},
        ]
        for change in bad_fields:
            await _raises_type(
                InvalidArgument, store.tasks.create_task(attrs.evolve(make_task("bad"), **change))
            )
        await _raises_type(InvalidArgument, store.tasks.create_task("not a record"))  # type: ignore[arg-type]
        await _raises_type(InvalidArgument, store.tasks.update_task_status("ok", "completed"))  # type: ignore[arg-type]
        await _raises_type(InvalidArgument, store.tasks.complete_task("ok", {"x": 1}))  # type: ignore[arg-type]
        await _raises_type(InvalidArgument, store.tasks.get_task(None))  # type: ignore[arg-type]
        await _raises_type(InvalidArgument, store.tasks.recover_stuck_tasks(-1))
        assert await store.tasks.task_count() == 1
        assert await store.tasks.get_task("ok") == base


async def bad_listing_arguments(make: StoreFactory) -> None:
    """A bad limit is InvalidArgument; a forged, garbled or other listing's cursor is
    InvalidCursor (MCP: -32602), never a silent restart."""
    async with make() as store:
        for i in range(3):
            await store.tasks.create_task(make_task(f"t{i}", "A"))
        for limit in (0, -1, 1001, True, "3"):
            await _raises_type(InvalidArgument, store.tasks.list_tasks(None, limit))  # type: ignore[arg-type]
        page = await store.tasks.list_tasks_for_session("A", None, 1)
        assert page.next_cursor is not None
        for cursor in ("", "garbage", "t0", page.next_cursor[:-2]):
            await _raises(InvalidCursor(cursor), store.tasks.list_tasks(cursor))
        await _raises(
            InvalidCursor(page.next_cursor),
            store.tasks.list_tasks_for_session("B", page.next_cursor),
        )
        await _raises(InvalidCursor(page.next_cursor), store.tasks.list_tasks(page.next_cursor))


async def cursor_survives_deletes(make: StoreFactory) -> None:
    """Deleting the task a cursor points after neither repeats nor skips anything."""
    async with make() as store:
        ids = [f"d{i}" for i in range(6)]
        for task_id in ids:
            await store.tasks.create_task(make_task(task_id))
        page = await store.tasks.list_tasks(None, 2)
        assert [t.task_id for t in page.tasks] == ids[:2]
        await store.tasks.delete_task("d1")
        await store.tasks.delete_task("d2")
        rest = await store.tasks.list_tasks(page.next_cursor, 10)
        assert [t.task_id for t in rest.tasks] == ids[3:]


async def ordering_is_by_time_not_text(make: StoreFactory) -> None:
    """Listing orders by the instant of created_at, whatever its ISO-8601 spelling."""
    async with make() as store:
        spellings = {
            "late": "2025-06-01T02:00:00.500+02:00",  # 00:00:00.5 UTC
            "early": "2025-06-01T00:00:00Z",
            "middle": "2025-06-01T00:00:00.250Z",
            "last": "2025-06-01T00:00:01Z",
        }
        for task_id, created_at in spellings.items():
            await store.tasks.create_task(make_task(task_id, None, created_at))
        assert await _all(store, limit=1) == ["early", "middle", "late", "last"]
        assert (await store.tasks.get_task("late")).created_at == spellings["late"]  # type: ignore[union-attr]


async def returned_values_are_copies(make: StoreFactory) -> None:
    """Mutating a payload after storing it, or a returned one, never changes the store."""
    async with make() as store:
        params: dict[str, Any] = {"args": [1, 2]}
        await store.tasks.create_task(attrs.evolve(make_task("c"), original_params=params))
        params["args"].append(3)
        got = await store.tasks.get_task("c")
        assert got is not None and got.original_params == {"args": [1, 2]}
        got.original_params["args"].append(4)  # type: ignore[union-attr]
        again = await store.tasks.get_task("c")
        assert again is not None and again.original_params == {"args": [1, 2]}


async def ttl_counts_from_creation(make: StoreFactory) -> None:
    """TTL runs from created_at, not from the last update or the end of the task."""
    clock = FakeClock()
    async with make(clock=clock) as store:
        task = await store.tasks.create_task(TaskRecord(original_method="m", ttl=1000))
        clock.advance(900)
        await store.tasks.complete_task(task.task_id, TaskSuccess(1))
        clock.advance(100)
        assert await store.tasks.expire_tasks() == []
        clock.advance(1)
        assert await store.tasks.expire_tasks() == [task.task_id]
        await store.tasks.maintenance()
        assert await store.tasks.task_count() == 0


async def closed_store_refuses(make: StoreFactory) -> None:
    """After aclose every call is StoreClosedError; a second aclose is a no-op."""
    async with make() as store:
        await store.tasks.create_task(make_task("x"))
    await _raises_type(StoreClosedError, store.tasks.get_task("x"))
    await _raises_type(StoreClosedError, store.tasks.create_task(make_task("y")))
    await store.aclose()


TASK_STORE_SCENARIOS: tuple[Callable[[StoreFactory], Awaitable[None]], ...] = (
    create_and_retrieve,
    state_machine_enforcement,
    terminal_state_rejection,
    cursor_determinism,
    session_scoping,
    ttl_expiry,
    task_result_round_trip,
    recover_stuck_tasks,
    max_tasks_limit,
    error_mapping_parity,
    concurrent_status_updates,
    store_fills_ids_and_times,
    duplicate_id_is_refused,
    finishing_is_atomic,
    update_task_replaces_fields,
    update_task_is_optimistic,
    progress_messages,
    bad_payloads_change_nothing,
    bad_listing_arguments,
    cursor_survives_deletes,
    ordering_is_by_time_not_text,
    returned_values_are_copies,
    ttl_counts_from_creation,
    closed_store_refuses,
)


# --- damage ----------------------------------------------------------------------------------


async def corrupt_rows(make: StoreFactory, corrupt: Corrupt) -> None:
    """A damaged row answers CorruptRecordError(tasks, id) on read and write and changes
    nothing; listings leave it out and name it; sweeps and the other tasks are unaffected."""
    async with make() as store:
        for task_id in ("a", "bad-meta", "bad-status", "bad-result", "z"):
            await store.tasks.create_task(make_task(task_id, "s"))
        await corrupt(store, "bad-meta", "meta", "{not json")
        await corrupt(store, "bad-status", "status", "exploded")
        await corrupt(store, "bad-result", "result", '{"type": "mystery"}')
        for task_id in ("bad-meta", "bad-status", "bad-result"):
            err = await _raises_type(CorruptRecordError, store.tasks.get_task(task_id))
            assert (err.table, err.key) == ("tasks", task_id)  # type: ignore[attr-defined]
        await _raises_type(CorruptRecordError, store.tasks.get_task_result("bad-result"))
        await _raises_type(CorruptRecordError, store.tasks.update_task_status("bad-status", C))
        await _raises_type(
            CorruptRecordError, store.tasks.complete_task("bad-meta", TaskSuccess(1))
        )
        page = await store.tasks.list_tasks_for_session("s")
        assert [t.task_id for t in page.tasks] == ["a", "z"]
        assert sorted(page.corrupt_ids) == ["bad-meta", "bad-result", "bad-status"]
        # Recovery reads only the status, so only the task whose status is damaged is skipped.
        recovered = await store.tasks.recover_stuck_tasks(0)
        assert sorted(recovered) == ["a", "bad-meta", "bad-result", "z"]
        assert await store.tasks.expire_tasks() == []
        await _raises_type(CorruptRecordError, store.tasks.get_task("bad-meta"))
        assert await store.tasks.delete_task("bad-meta") is True
        assert await store.tasks.task_count() == 4


# --- reopening a durable store ---------------------------------------------------------------


async def reopen_keeps_everything(make: StoreFactory) -> None:
    """Everything acknowledged before close is there after reopen, cursors included."""
    async with make() as store:
        full = await store.tasks.create_task(make_full_task("r1", "s", "2025-06-01T00:00:00Z"))
        await store.tasks.create_task(make_task("r2", "s", "2025-06-01T00:00:01Z"))
        await store.tasks.create_task(make_task("r3", "s", "2025-06-01T00:00:02Z"))
        done = await store.tasks.complete_task("r2", TaskRpcError(code=1, message="m", data=[1]))
        page = await store.tasks.list_tasks_for_session("s", None, 1)
    async with make() as store:
        assert await store.tasks.get_task("r1") == full
        assert await store.tasks.get_task("r2") == done
        rest = await store.tasks.list_tasks_for_session("s", page.next_cursor)
        assert [t.task_id for t in rest.tasks] == ["r2", "r3"]
        await _raises(TerminalState(C), store.tasks.cancel_task("r2"))
        assert await store.tasks.task_count() == 3


REOPEN_SCENARIOS: tuple[Callable[[StoreFactory], Awaitable[None]], ...] = (reopen_keeps_everything,)


async def task_store(make: StoreFactory, *, corrupt: Corrupt | None = None) -> None:
    """Run every task-store scenario against fresh stores from ``make``.

    Pass ``corrupt`` to also check how damaged rows are reported.

    Raises:
        AssertionError: the store does not conform; the message says how.
    """
    for scenario in TASK_STORE_SCENARIOS:
        await scenario(make)
    if corrupt is not None:
        await corrupt_rows(make, corrupt)


async def task_store_reopen(make: StoreFactory) -> None:
    """Run the durability scenarios: ``make`` must reopen the *same* store each time.

    Raises:
        AssertionError: the store does not conform; the message says how.
    """
    for scenario in REOPEN_SCENARIOS:
        await scenario(make)
