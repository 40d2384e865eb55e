"""Differential property test: random operation sequences give the same answers on every
adapter (results and error types alike), with the in-memory store as the reference model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import turnbuckle
from turnbuckle import TaskRecord, TaskRpcError, TaskStatus, TaskSuccess, TurnbuckleError
from turnbuckle.testing import FakeClock

from .factories import side_by_side

IDS = ["a", "b", "c", "d"]
SESSIONS = [None, "s1", "s2"]

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("create"),
            st.sampled_from(IDS),
            st.sampled_from(SESSIONS),
            st.sampled_from(list(TaskStatus)),
            st.none() | st.integers(0, 50),
        ),
        st.tuples(st.just("status"), st.sampled_from(IDS), st.sampled_from(list(TaskStatus))),
        st.tuples(st.just("complete"), st.sampled_from(IDS), st.integers(0, 3)),
        st.tuples(st.just("fail"), st.sampled_from(IDS)),
        st.tuples(st.just("cancel"), st.sampled_from(IDS)),
        st.tuples(st.just("result"), st.sampled_from(IDS)),
        st.tuples(st.just("delete"), st.sampled_from(IDS)),
        st.tuples(st.just("tick"), st.integers(0, 40)),
        st.tuples(st.just("expire")),
        st.tuples(st.just("recover"), st.integers(0, 10)),
        st.tuples(st.just("list"), st.sampled_from(SESSIONS), st.integers(1, 3)),
        st.tuples(st.just("replace"), st.sampled_from(IDS), st.sampled_from(list(TaskStatus))),
    ),
    max_size=30,
)


async def apply(store: turnbuckle.Store, clock: FakeClock, op: tuple[Any, ...]) -> Any:
    tasks = store.tasks
    kind, *args = op
    if kind == "create":
        task_id, session, status, ttl = args
        record = TaskRecord(
            task_id=task_id,
            session_id=session,
            status=status,
            ttl=ttl,
            original_method="tools/call",
            original_params={"n": task_id},
        )
        return await tasks.create_task(record)
    if kind == "status":
        return await tasks.update_task_status(args[0], args[1], f"to {args[1]}")
    if kind == "complete":
        return await tasks.complete_task(args[0], TaskSuccess({"v": args[1]}))
    if kind == "fail":
        return await tasks.fail_task(args[0], TaskRpcError(code=-1, message="no"))
    if kind == "cancel":
        return await tasks.cancel_task(args[0])
    if kind == "result":
        return await tasks.get_task_result(args[0])
    if kind == "delete":
        return await tasks.delete_task(args[0])
    if kind == "tick":
        clock.advance(args[0])
        return None
    if kind == "expire":
        return sorted(await tasks.expire_tasks())
    if kind == "recover":
        return sorted(await tasks.recover_stuck_tasks(args[0]))
    if kind == "list":
        session, limit = args
        seen, cursor = [], None
        while True:
            if session is None:
                page = await tasks.list_tasks(cursor, limit)
            else:
                page = await tasks.list_tasks_for_session(session, cursor, limit)
            seen.append(page.tasks)
            if page.next_cursor is None:
                return seen
            cursor = page.next_cursor
    if kind == "replace":
        current = await tasks.get_task(args[0])
        if current is None:
            return None
        import attrs

        return await tasks.update_task(attrs.evolve(current, status=args[1], meta={"r": 1}))
    raise AssertionError(op)


async def outcome(store: turnbuckle.Store, clock: FakeClock, op: tuple[Any, ...]) -> Any:
    try:
        return ("ok", await apply(store, clock, op))
    except TurnbuckleError as exc:
        return ("error", exc)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=operations)
async def test_adapters_agree(tmp_path: Path, ops: list[tuple[Any, ...]]) -> None:
    async with side_by_side(tmp_path) as (stores, clocks):
        for op in ops:
            results = [
                await outcome(store, clock, op) for store, clock in zip(stores, clocks, strict=True)
            ]
            assert results[0] == results[1], op
        for store, clock in zip(stores, clocks, strict=True):
            final = await outcome(store, clock, ("list", None, 1000))
            assert final == await outcome(stores[0], clocks[0], ("list", None, 1000))
