"""A full filesystem is recovered through the API, on a real small filesystem (a tmpfs).

Before, the WAL grew into the last free bytes and could never be emptied again: a checkpoint
must grow the main file to copy the WAL's new pages in, and there was no space for that. So
after ``StorageFullError`` even ``delete_task`` failed, for good, until space was freed by
hand. Now the main file is grown before each commit (a checkpoint never needs new space), the
database may not grow into the filesystem's last ``_FREE_RESERVE`` bytes, and a write that hits
FULL empties the WAL (``wal_checkpoint(TRUNCATE)``) and is tried once more, alone; so is the
open's write probe.

Tests mount their own tmpfs (root is needed, as on the machines and in CI) and always unmount it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

import turnbuckle
from turnbuckle import StorageFullError, TaskRecord, TaskStatus
from turnbuckle.adapters.sqlite import _FREE_RESERVE

from ..adapters.schemas import sql
from ._children import store_url
from ._shared import read_all

#: Small enough to fill in well under a second, big enough for the reserve and the schema.
FS_BYTES = 4 * 1024 * 1024
#: Each task's payload: a few pages, so the filesystem fills after a few hundred tasks.
PAD = "p" * 6000


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-fs"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        # Fails (and so fails the test) if anything still holds a file open there.
        subprocess.run(["umount", str(mount)], check=True)


def free_bytes(folder: Path) -> int:
    found = os.statvfs(folder)
    return found.f_bavail * found.f_frsize


def fill_to_the_last_byte(filler: Path) -> None:
    with open(filler, "wb", buffering=0) as out:
        for block in (64 * 1024, 4096, 1):
            try:
                while True:
                    out.write(b"\0" * block)
            except OSError:
                pass


async def fill(store: turnbuckle.Store, prefix: str) -> tuple[list[str], StorageFullError]:
    """Create tasks until the store is full; return the ids acknowledged, and the error."""
    acked: list[str] = []
    while True:
        task_id = f"{prefix}-{len(acked):04d}"
        try:
            await store.tasks.create_task(
                TaskRecord(task_id=task_id, original_method="m", original_params={"pad": PAD})
            )
        except StorageFullError as full:
            return acked, full
        acked.append(task_id)
        assert len(acked) < 10_000, "the filesystem never filled"


async def test_a_full_disk_is_recovered_through_the_api(small_fs: Path) -> None:
    path = small_fs / "store.db"
    async with turnbuckle.open_store(store_url(path)) as store:
        acked, full = await fill(store, "a")
        assert full.path == str(path) and full.retryable
        # The database, not the WAL, got the filesystem, up to the reserve it keeps free:
        # the WAL was emptied on FULL and gave its space back.
        assert (small_fs / "store.db-wal").stat().st_size == 0
        assert path.stat().st_size > FS_BYTES - _FREE_RESERVE - 128 * 1024
        assert _FREE_RESERVE <= free_bytes(small_fs) < _FREE_RESERVE + 128 * 1024
        # The same handle deletes, and changes what it holds, at once.
        deleted = set(acked[:10])
        for task_id in acked[:10]:
            await store.tasks.delete_task(task_id)
        await store.tasks.update_task_status(acked[10], TaskStatus.COMPLETED, "done")
        # New growth is still refused, and says so.
        with pytest.raises(StorageFullError):
            await store.tasks.create_task(
                TaskRecord(task_id="big", original_method="m", original_params={"pad": PAD * 40})
            )

    # Closing (which checkpoints) and opening again work on the full filesystem.
    async with turnbuckle.open_store(store_url(path)) as store:
        assert await store.tasks.task_count() == len(acked) - 10
        # After deleting enough, new tasks fit again (in the space the deletes freed).
        deleted |= set(acked[11:111])
        for task_id in acked[11:111]:
            await store.tasks.delete_task(task_id)
        added, _ = await fill(store, "b")
        assert len(added) >= 90  # nearly all of the space the deletes freed

    assert sql(path, "PRAGMA integrity_check") == [("ok",)]
    found = await read_all(path)
    assert set(found) == (set(acked) - deleted) | set(added)
    assert found[acked[10]].status is TaskStatus.COMPLETED
    assert all(task.original_params == {"pad": PAD} for task in found.values())


async def test_an_open_whose_write_probe_hits_a_full_disk_empties_the_wal(
    small_fs: Path,
) -> None:
    """A WAL left behind (here by a raw connection that never checkpointed) on a filesystem
    then filled to the last byte: the open's write probe hits FULL, the open empties the WAL
    into the main file, and tries again."""
    path = small_fs / "store.db"
    async with turnbuckle.open_store(store_url(path)) as store:
        for i in range(20):
            await store.tasks.create_task(TaskRecord(task_id=f"t{i}", original_method="m"))
    other = apsw.Connection(str(path))
    other.wal_autocheckpoint(0)
    for round_no in range(40):  # rewrites of existing pages: the WAL grows, the database not
        other.execute("UPDATE tasks SET status_message = ?", (f"round {round_no:03d}",))
    other.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    other.close()
    assert (small_fs / "store.db-wal").stat().st_size > 100 * 1024
    filler = small_fs / "filler"
    fill_to_the_last_byte(filler)
    assert free_bytes(small_fs) == 0

    async with turnbuckle.open_store(store_url(path)) as store:
        assert await store.tasks.task_count() == 20
        first = await store.tasks.get_task("t0")
        assert first is not None and first.status_message == "round 039"
    filler.unlink()
    assert sql(path, "PRAGMA integrity_check") == [("ok",)]
