"""Cancelling callers never produces a phantom write (guide R3, §3.5, §4.2 "Cancellation").

The SQLite adapter shields a caller's wait for its queued write, so a cancelled write call
either raises ``Cancelled`` before anything was queued, or runs to completion and returns
normally (the cancellation then arrives at the caller's next checkpoint). Whatever the
interleaving, every task in the store must have been returned to some caller, and every call
that returned must be in the store. Reads are not shielded and can be cancelled promptly.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import apsw
import trio

import turnbuckle
from turnbuckle import TaskRecord, TaskStatus, TaskSuccess

from ..figures import record as record_figures
from ._children import store_url

SOAK = os.environ.get("TURNBUCKLE_SOAK") == "1"
OPERATIONS = 5000 if SOAK else 200
CONCURRENCY = 8


async def all_tasks(store: turnbuckle.Store) -> dict[str, TaskRecord]:
    found: dict[str, TaskRecord] = {}
    cursor = None
    while True:
        page = await store.tasks.list_tasks(cursor, limit=1000)
        found.update((task.task_id, task) for task in page.tasks)
        cursor = page.next_cursor
        if cursor is None:
            return found


async def test_cancelled_writes_are_never_phantoms(tmp_path: Path) -> None:
    path = tmp_path / "cancel.db"
    rng = random.Random(20240601)
    created: set[str] = set()  # create_task returned this id to its caller
    completed: set[str] = set()  # complete_task returned for this id
    counts = {
        "attempts": 0,
        "cancelled": 0,
        "cancelled_before_create": 0,
        "cancelled_after_create": 0,
        "cancelled_after_complete": 0,
    }
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async with turnbuckle.open_store(store_url(path), durability="process") as store:

        async def one(i: int, delay: float, pause: float | None) -> None:
            task_id = f"cx-{i:05d}"
            stage = "before_create"
            async with limiter:
                with trio.move_on_after(delay) as scope:
                    if pause is not None:
                        await trio.sleep(pause)  # the deadline may strike before the call
                    record = await store.tasks.create_task(
                        TaskRecord(task_id=task_id, original_method="cancel/test")
                    )
                    created.add(task_id)
                    stage = "after_create"
                    assert record.task_id == task_id
                    await trio.lowlevel.checkpoint()  # a deadline that struck mid-write lands here
                    await store.tasks.complete_task(task_id, TaskSuccess(i))
                    completed.add(task_id)
                    stage = "after_complete"
                    await trio.lowlevel.checkpoint()
            counts["attempts"] += 1
            if scope.cancelled_caught:
                counts["cancelled"] += 1
                counts[f"cancelled_{stage}"] += 1

        async with trio.open_nursery() as nursery:
            for i in range(OPERATIONS):
                roll = rng.random()
                if roll < 0.1:
                    timeout, pause = 0.0, 0.0  # cancelled at the first checkpoint, pre-queue
                elif roll < 0.2:
                    timeout, pause = 0.0, None  # already expired when the write is queued
                else:
                    timeout = rng.uniform(0, 0.004)
                    pause = rng.choice([None, rng.uniform(0, 0.002)])
                nursery.start_soon(one, i, timeout, pause)
                if rng.random() < 0.3:
                    await trio.sleep(rng.uniform(0, 0.001))

        found = await all_tasks(store)

    summary = f"{counts}, created {len(created)}, completed {len(completed)}"
    assert counts["attempts"] == OPERATIONS, summary
    assert counts["cancelled"] > 0, f"no call was cancelled; the test proved nothing: {summary}"
    phantoms = sorted(set(found) - created)
    assert not phantoms, f"tasks no caller was told about: {phantoms[:10]}; {summary}"
    lost = sorted(created - set(found))
    assert not lost, f"returned but missing: {lost[:10]}; {summary}"
    done = {task_id for task_id, task in found.items() if task.status is TaskStatus.COMPLETED}
    assert done == completed, (
        f"completed without the caller told: {sorted(done - completed)[:10]}; completed but"
        f" not stored: {sorted(completed - done)[:10]}; {summary}"
    )
    for task_id in completed:
        assert found[task_id].result == TaskSuccess(int(task_id[3:])), task_id
    for task_id in set(found) - completed:
        assert found[task_id].status is TaskStatus.WORKING, found[task_id]
    record_figures(
        "Cancellation never makes a phantom write",
        "callers of create_task/complete_task are cancelled at random points (trio"
        " move_on_after with tiny random deadlines, 8 at a time); every task in the store must"
        " have been reported to its caller, and every reported write must be stored",
        operations=OPERATIONS,
        cancelled=counts["cancelled"],
        phantoms=0,
        lost=0,
        cancelled_before_create=counts["cancelled_before_create"],
        cancelled_after_create=counts["cancelled_after_create"],
    )


async def test_write_cancelled_while_blocked_still_lands_and_returns(tmp_path: Path) -> None:
    """A write stuck behind another connection's write lock, whose caller's deadline passes
    while it waits, is not abandoned: it commits once the lock is released, and its caller is
    given the result before it sees the cancellation."""
    path = tmp_path / "blocked.db"
    async with turnbuckle.open_store(store_url(path), busy_timeout=60) as store:
        blocker = apsw.Connection(str(path))
        try:
            blocker.execute("BEGIN IMMEDIATE")  # hold the write lock
            returned: list[TaskRecord] = []
            write_done = trio.Event()
            scopes: list[trio.CancelScope] = []

            async def writer() -> None:
                with trio.move_on_after(0.05) as scope:
                    scopes.append(scope)
                    returned.append(
                        await store.tasks.create_task(
                            TaskRecord(task_id="blocked", original_method="cancel/test")
                        )
                    )
                    write_done.set()
                    await trio.lowlevel.checkpoint()  # the pending cancellation lands here
                    raise AssertionError("the deadline passed long ago; not reached")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await trio.sleep(0.3)  # well past the writer's deadline
                assert scopes[0].cancel_called
                assert not write_done.is_set(), "the write finished while the lock was held"
                blocker.execute("ROLLBACK")
            assert scopes[0].cancelled_caught
            assert [record.task_id for record in returned] == ["blocked"]
        finally:
            blocker.close()
        stored = await store.tasks.get_task("blocked")
        assert stored is not None
        assert stored == returned[0]


async def test_reads_can_be_cancelled_promptly(tmp_path: Path) -> None:
    """A read queued behind a write that cannot proceed (another connection holds the lock)
    is abandoned when its caller is cancelled; the queued write still lands afterwards."""
    path = tmp_path / "reads.db"
    async with turnbuckle.open_store(store_url(path), busy_timeout=60) as store:
        await store.tasks.create_task(TaskRecord(task_id="present", original_method="m"))
        blocker = apsw.Connection(str(path))
        try:
            blocker.execute("BEGIN IMMEDIATE")
            write_done = trio.Event()

            async def stuck_write() -> None:
                await store.tasks.complete_task("present", TaskSuccess("late"))
                write_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stuck_write)
                await trio.sleep(0.05)  # the owner thread is now waiting for the lock
                results = []
                for _ in range(3):
                    with trio.move_on_after(0.05) as scope:
                        results.append(await store.tasks.get_task("present"))
                    assert scope.cancelled_caught, "the read was not cancelled"
                    assert not write_done.is_set()
                assert results == []
                blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert write_done.is_set()
        task = await store.tasks.get_task("present")
        assert task is not None
        assert (task.status, task.result) == (TaskStatus.COMPLETED, TaskSuccess("late"))
