"""The SQLite adapter's own behaviour: group commit (concurrent operations share transactions,
yet each caller gets its own truthful answer, even when the disk fills part-way through a group),
busy locks, and recovery from a failure in the middle of a transaction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import apsw
import pytest

import turnbuckle
from turnbuckle import (
    StorageFullError,
    StoreBusyError,
    StoreInternalError,
    TaskRecord,
    TaskStatus,
)


async def on_connection(store: turnbuckle.Store, sql: str) -> Any:
    """Run one statement on the store's own connection (test-only access)."""
    return await store.tasks._run(  # type: ignore[attr-defined]
        lambda table: table._conn.execute(sql).fetchall(), writes=False
    )


async def test_a_full_disk_fails_only_the_writes_that_do_not_fit(tmp_path: Path) -> None:
    async with turnbuckle.open_store(f"sqlite:///{tmp_path}/full.db") as store:
        for i in range(20):
            await store.tasks.create_task(TaskRecord(task_id=f"small-{i}", original_method="m"))
        [(pages,)] = await on_connection(store, "PRAGMA page_count")
        # Room for small rows on existing pages, none for large payloads.
        await on_connection(store, f"PRAGMA max_page_count = {pages + 1}")
        outcomes: dict[str, object] = {}

        async def write(task_id: str, size: int) -> None:
            try:
                if size:
                    await store.tasks.create_task(
                        TaskRecord(task_id=task_id, original_method="m", original_params="x" * size)
                    )
                else:
                    await store.tasks.update_task_status(task_id, TaskStatus.COMPLETED, "done")
                outcomes[task_id] = "ok"
            except turnbuckle.TurnbuckleError as exc:
                outcomes[task_id] = exc

        async with anyio.create_task_group() as tg:
            for i in range(20):
                # Interleave so that every group mixes writes that fit with ones that do not.
                tg.start_soon(write, f"small-{i}", 0)
                tg.start_soon(write, f"big-{i}", 200_000)

        bigs = [outcomes[f"big-{i}"] for i in range(20)]
        assert all(isinstance(o, StorageFullError) for o in bigs), bigs
        assert [outcomes[f"small-{i}"] for i in range(20)] == ["ok"] * 20
        # Nothing half-written, and the store is still fully usable.
        assert await store.tasks.task_count() == 20
        page = await store.tasks.list_tasks(limit=100)
        assert {t.status for t in page.tasks} == {TaskStatus.COMPLETED}
        await on_connection(store, "PRAGMA max_page_count = 1073741823")
        await store.tasks.create_task(
            TaskRecord(task_id="big-after", original_method="m", original_params="x" * 200_000)
        )
        assert await store.tasks.task_count() == 21


async def test_concurrent_callers_each_get_their_own_answer(tmp_path: Path) -> None:
    async with turnbuckle.open_store(f"sqlite:///{tmp_path}/mix.db") as store:
        await store.tasks.create_task(TaskRecord(task_id="t", original_method="m"))
        answers: dict[int, object] = {}

        async def racer(n: int) -> None:
            try:
                if n % 3 == 0:
                    answers[n] = await store.tasks.get_task("t")
                else:
                    answers[n] = await store.tasks.update_task_status(
                        "t", TaskStatus.INPUT_REQUIRED if n % 2 else TaskStatus.WORKING
                    )
            except turnbuckle.TurnbuckleError as exc:
                answers[n] = exc

        async with anyio.create_task_group() as tg:
            for n in range(60):
                tg.start_soon(racer, n)
        writes = [a for n, a in answers.items() if n % 3]
        ok = [a for a in writes if isinstance(a, TaskRecord)]
        refused = [a for a in writes if isinstance(a, turnbuckle.InvalidTransition)]
        assert len(ok) + len(refused) == len(writes) == 40
        # Every successful move was from the other live status: the guards serialized them.
        final = await store.tasks.get_task("t")
        assert final is not None and final.status in (TaskStatus.WORKING, TaskStatus.INPUT_REQUIRED)
        assert len(ok) >= 1


async def test_a_lock_held_past_the_timeout_is_store_busy_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    async with turnbuckle.open_store(f"sqlite:///{path}", busy_timeout=0.2) as store:
        await store.tasks.create_task(TaskRecord(task_id="t", original_method="m"))
        other = apsw.Connection(str(path))
        other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
        try:
            with pytest.raises(StoreBusyError) as caught:
                await store.tasks.update_task_status("t", TaskStatus.COMPLETED)
            assert caught.value.retryable and caught.value.timeout_s == 0.2
            assert (await store.tasks.get_task("t")).status is TaskStatus.WORKING  # type: ignore[union-attr]
        finally:
            other.execute("ROLLBACK")
            other.close()
        done = await store.tasks.update_task_status("t", TaskStatus.COMPLETED)
        assert done.status is TaskStatus.COMPLETED


async def test_a_read_queued_with_a_write_is_not_held_up_by_another_writer(
    tmp_path: Path,
) -> None:
    """A read and a write queued together, while another process holds the write lock: the
    write waits out the busy timeout and fails busy; the read, served in a read transaction of
    its own (WAL readers never wait for writers), answers."""
    path = tmp_path / "mixed.db"
    async with turnbuckle.open_store(f"sqlite:///{path}", busy_timeout=0.2) as store:
        await store.tasks.create_task(TaskRecord(task_id="t", original_method="m"))
        other = apsw.Connection(str(path))
        other.execute("BEGIN IMMEDIATE")
        results: dict[str, Any] = {}

        async def write() -> None:
            try:
                await store.tasks.update_task_status("t", TaskStatus.COMPLETED)
            except StoreBusyError as exc:
                results["write"] = exc

        async def read() -> None:
            results["read"] = await store.tasks.get_task("t")

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                tg.start_soon(read)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert isinstance(results["write"], StoreBusyError)
        assert results["read"] is not None and results["read"].status is TaskStatus.WORKING


@pytest.mark.parametrize("url", ["memory://", "sqlite"])
async def test_a_bug_mid_operation_rolls_back_and_the_store_goes_on(
    tmp_path: Path, url: str
) -> None:
    """An unexpected exception half-way through an operation (after it wrote) is reported as
    StoreInternalError, its writes are undone, and the next operation works: the connection
    is never left poisoned."""
    if url == "sqlite":
        url = f"sqlite:///{tmp_path}/bug.db"
    async with turnbuckle.open_store(url) as store:
        await store.tasks.create_task(TaskRecord(task_id="keep", original_method="m"))
        row = await store.tasks._run(lambda t: t.get("keep"), writes=False)  # type: ignore[attr-defined]

        def half_done(table: Any) -> None:
            assert table.delete("keep")
            raise RuntimeError("bug after a write")

        with pytest.raises(StoreInternalError) as caught:
            await store.tasks._run(half_done, writes=True)  # type: ignore[attr-defined]
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert await store.tasks._run(lambda t: t.get("keep"), writes=False) == row  # type: ignore[attr-defined]
        await store.tasks.update_task_status("keep", TaskStatus.CANCELLED)
        assert await store.tasks.task_count() == 1


@pytest.mark.parametrize(("durability", "synchronous"), [("full", 2), ("process", 1)])
async def test_durability_sets_synchronous_in_wal(
    tmp_path: Path, durability: str, synchronous: int
) -> None:
    url = f"sqlite:///{tmp_path}/d.db"
    async with turnbuckle.open_store(url, durability=durability) as store:  # type: ignore[arg-type]
        assert await on_connection(store, "PRAGMA synchronous") == [(synchronous,)]
        assert await on_connection(store, "PRAGMA journal_mode") == [("wal",)]
        # A WAL that once grew large is cut back when it restarts, not kept at its peak.
        assert await on_connection(store, "PRAGMA journal_size_limit") == [(4 * 1024 * 1024,)]


async def test_bad_options_are_refused_before_opening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/never.db"
    for options in [
        {"durability": "off"},
        {"busy_timeout": -1},
        {"max_tasks": -1},
        {"max_payload_bytes": 0},
    ]:
        with pytest.raises(turnbuckle.InvalidArgument):
            async with turnbuckle.open_store(url, **options):  # type: ignore[arg-type]
                pass
    for url in ["sqlite://", "sqlite:///", "postgres://x", "memory://name", ""]:
        with pytest.raises(turnbuckle.InvalidArgument):
            async with turnbuckle.open_store(url):
                pass
    assert not (tmp_path / "never.db").exists()
