"""The database file deleted or replaced under an open store: refused, never acknowledged.

Before, the connection went on writing to the file that had left the path (unlinked, renamed
away, or with another file renamed or copied over it) and acknowledged every write, which
nobody opening the path would ever see. Now the owner thread checks the path's (st_dev, st_ino)
before each transaction and again after each COMMIT, before replying: once it differs, that
batch and every later call raise ``StoreFileReplaced``, and the connection is closed without
writing anything at the path. Every write acknowledged before the change is in the file that
left the path (kept reachable here through a hard link, or its new name).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import turnbuckle
import turnbuckle.adapters.sqlite as sqlite_adapter
from turnbuckle import (
    ExecutionNotFound,
    StoreClosedError,
    StoreFileReplaced,
    StoreOpenError,
    TaskRecord,
    TaskStatus,
)

from ..adapters.schemas import sql
from ._children import store_url
from ._shared import read_all


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def make_other_store(path: Path) -> None:
    """Another turnbuckle database, closed (so whole in its main file)."""
    async with turnbuckle.open_store(store_url(path)) as other:
        await other.tasks.create_task(TaskRecord(task_id="other-1", original_method="m"))


async def write_some(store: turnbuckle.Store, prefix: str, count: int) -> set[str]:
    """Create ``count`` tasks and complete every third; return the ids acknowledged."""
    acked = set()
    for i in range(count):
        task = await store.tasks.create_task(
            TaskRecord(task_id=f"{prefix}-{i}", original_method="m", original_params={"i": i})
        )
        acked.add(task.task_id)
        if i % 3 == 0:
            await store.tasks.update_task_status(task.task_id, TaskStatus.COMPLETED, "done")
    return acked


async def assert_refused(store: turnbuckle.Store, path: Path, reason_has: str) -> None:
    calls: dict[str, Any] = {
        "create_task": lambda: store.tasks.create_task(
            TaskRecord(task_id="late", original_method="m")
        ),
        "get_task": lambda: store.tasks.get_task("a-0"),
        "task_count": lambda: store.tasks.task_count(),
        "delete_task": lambda: store.tasks.delete_task("a-1"),
        "executions.describe": lambda: store.executions.describe("nope"),
    }
    for name, call in calls.items():
        with pytest.raises(StoreFileReplaced) as caught:
            await call()
        error = caught.value
        assert isinstance(error, StoreClosedError), name
        assert error.path == str(path), name
        assert reason_has in error.reason, (name, error.reason)
        assert not error.retryable


# Each change takes (folder, the store's path) and returns the path where the store's own
# file can still be read afterwards, and the file it put at the path (None: none).
def unlink(folder: Path, path: Path) -> tuple[Path, Path | None]:
    keep = folder / "kept-link.db"
    os.link(path, keep)  # only so that the test can look inside the deleted file
    os.unlink(path)
    return keep, None


def rename_away(folder: Path, path: Path) -> tuple[Path, Path | None]:
    moved = folder / "moved.db"
    os.rename(path, moved)
    return moved, None


def rename_other_over(folder: Path, path: Path) -> tuple[Path, Path | None]:
    keep = folder / "kept-link.db"
    os.link(path, keep)
    os.replace(folder / "other.db", path)
    return keep, path


def copy_over(folder: Path, path: Path) -> tuple[Path, Path | None]:
    keep = folder / "kept-link.db"
    os.link(path, keep)
    shutil.copyfile(path, folder / "copy.db")
    os.replace(folder / "copy.db", path)
    return keep, path


CHANGES = {
    "unlink": (unlink, "deleted or renamed away"),
    "rename_away": (rename_away, "deleted or renamed away"),
    "rename_other_over": (rename_other_over, "another file is at the path"),
    "copy_over": (copy_over, "another file is at the path"),
}


@pytest.mark.parametrize("change", CHANGES)
async def test_a_replaced_file_is_refused_and_nothing_acknowledged_is_lost(
    tmp_path: Path, change: str
) -> None:
    apply, reason_has = CHANGES[change]
    path = tmp_path / "store.db"
    await make_other_store(tmp_path / "other.db")
    async with turnbuckle.open_store(store_url(path)) as store:
        acked = await write_some(store, "a", 30)
        original, replacement = apply(tmp_path, path)
        at_path = None if replacement is None else digest(replacement)

        await assert_refused(store, path, reason_has)
        await store.aclose()
        # Closing does not hide why: the handle still says what happened.
        with pytest.raises(StoreFileReplaced):
            await store.tasks.get_task("a-0")

    # Whatever is at the path now was not written to (the connection never checkpointed
    # into it or deleted its -wal by name)...
    if replacement is None:
        assert not path.exists()
        # The -wal left at the path was emptied: a store made there later starts empty,
        # with none of the old store's pages replayed into it.
        assert await read_all(path) == {}
    else:
        assert digest(path) == at_path
    if change == "rename_other_over":
        assert set(await read_all(path)) == {"other-1"}
    # ...and the store's own file holds every acknowledged write, whole, and nothing else.
    assert sql(original, "PRAGMA integrity_check") == [("ok",)]
    found = await read_all(original)
    assert set(found) == acked
    for task_id, task in found.items():
        done = int(task_id.split("-")[1]) % 3 == 0
        assert task.status is (TaskStatus.COMPLETED if done else TaskStatus.WORKING), task_id


async def test_a_commit_that_lands_after_the_file_moved_is_not_acknowledged(
    tmp_path: Path,
) -> None:
    """The file leaves the path while a transaction runs (here: inside the operation itself):
    the COMMIT goes to the file that moved, and the caller is told StoreFileReplaced, not
    "done"."""
    path = tmp_path / "store.db"
    moved = tmp_path / "moved.db"
    async with turnbuckle.open_store(store_url(path)) as store:
        acked = await write_some(store, "a", 5)

        def delete_then_move(table: Any) -> bool:
            deleted = bool(table.delete("a-1"))
            os.rename(path, moved)
            return deleted

        with pytest.raises(StoreFileReplaced) as caught:
            await store.tasks._run(delete_then_move, writes=True)  # type: ignore[attr-defined]
        assert "deleted or renamed away" in caught.value.reason
        with pytest.raises(StoreFileReplaced):
            await store.executions.describe("nope")
    # The delete did commit, into the file that moved: it was never reported as done.
    assert set(await read_all(moved)) == acked - {"a-1"}


async def test_an_unchanged_file_is_served_as_before(tmp_path: Path) -> None:
    """The checks refuse nothing while the file stays: a touch, a rename onto its own path, and
    another handle writing and closing (its checkpoints) leave the store serving."""
    path = tmp_path / "store.db"
    async with turnbuckle.open_store(store_url(path)) as store:
        await write_some(store, "a", 5)
        os.utime(path)
        os.rename(path, path)
        async with turnbuckle.open_store(store_url(path)) as second:
            await write_some(second, "b", 5)
        await store.tasks.create_task(TaskRecord(task_id="c", original_method="m"))
        assert await store.tasks.task_count() == 11
        with pytest.raises(ExecutionNotFound):
            await store.executions.describe("nope")


async def test_a_file_replaced_while_it_opens_is_refused_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another database is renamed over the file between SQLite's open and the recording of its
    identity: SQLite's own check (its descriptor against the path) refuses the open, and
    neither file is written."""
    path = tmp_path / "store.db"
    keep = tmp_path / "kept-link.db"
    async with turnbuckle.open_store(store_url(path)) as store:
        acked = await write_some(store, "a", 5)
    await make_other_store(tmp_path / "other.db")
    other_digest = digest(tmp_path / "other.db")
    switch = sqlite_adapter._switch_to_wal

    def switch_then_swap(conn: Any, at: str) -> None:
        switch(conn, at)
        os.link(path, keep)
        os.replace(tmp_path / "other.db", path)

    monkeypatch.setattr(sqlite_adapter, "_switch_to_wal", switch_then_swap)
    with pytest.raises(StoreOpenError) as caught:
        async with turnbuckle.open_store(store_url(path)):
            pass
    assert "another file was put at the path" in caught.value.reason
    monkeypatch.undo()
    assert digest(path) == other_digest
    assert set(await read_all(keep)) == acked
