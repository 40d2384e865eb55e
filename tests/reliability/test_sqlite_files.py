"""Bad files are answered at open with their typed error, and are left exactly as they were.

Guide: sqlite-reliability.md §2.4 (open recipe), §2.6 (error mapping), R14 (-wal is part of the
database), §4.3 (bad inputs). Every failure must be a ``TurnbuckleError`` subclass; no apsw
exception may cross the API.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import apsw
import pytest
import trio

import turnbuckle
from turnbuckle import (
    ForeignDatabaseError,
    NotADatabaseError,
    StoreClosedError,
    StoreCorruptError,
    StoreOpenError,
    TaskRecord,
    TaskStatus,
    TaskSuccess,
    TurnbuckleError,
    UnsupportedSchemaVersion,
)
from turnbuckle.adapters.sqlite import APPLICATION_ID, SCHEMA_VERSION

from ..adapters.schemas import sql
from ..figures import record as record_figures
from ._children import store_url

PAGE = 4096  # SQLite's default page size, which the store keeps


# --- helpers ---------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` (call only while no connection has a file open)."""
    return {
        entry.name: hashlib.sha256(entry.read_bytes()).hexdigest()
        for entry in sorted(folder.iterdir())
        if entry.is_file()
    }


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


async def make_store(path: Path, tasks: int, pad: int = 0) -> None:
    async with turnbuckle.open_store(store_url(path)) as store:
        for i in range(tasks):
            await store.tasks.create_task(
                TaskRecord(
                    task_id=f"t{i:04d}",
                    original_method="files/test",
                    original_params={"i": i, "pad": "z" * pad},
                )
            )


async def open_failure(path: Path, **options: object) -> TurnbuckleError:
    """Open ``path`` expecting a failure; return the (checked to be typed) error."""
    try:
        async with turnbuckle.open_store(store_url(path), **options):  # type: ignore[arg-type]
            pass
    except Exception as exc:
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        assert isinstance(exc, TurnbuckleError), f"untyped {kind} escaped: {exc!r}"
        assert "apsw" not in type(exc).__module__, f"raw driver error {kind} escaped: {exc!r}"
        record_figures(
            "Bad files get a typed error at open, never a raw driver exception",
            "every bad file of sqlite-reliability.md section 4.3 (garbage, text, foreign"
            " databases, other application_id, newer schema, truncations, corrupt pages,"
            " mispaired -wal, missing folder, folder path) is opened through open_store",
            cases=1,
            typed_errors=1,
            raw_driver_exceptions=0,
            **{f"error_{type(exc).__name__}": 1},
        )
        return exc
    raise AssertionError(f"opening {path} succeeded; expected a typed error")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a closed store holding 300 tasks with 2 KB params (about 300 pages)."""
    path = tmp_path_factory.mktemp("big") / "big.db"
    trio.run(make_store, path, 300, 2048)
    assert sorted(os.listdir(path.parent)) == ["big.db"], "close should leave no -wal/-shm"
    data = path.read_bytes()
    assert len(data) > 200 * PAGE
    return data


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a closed store holding 5 small tasks."""
    path = tmp_path_factory.mktemp("small") / "small.db"
    trio.run(make_store, path, 5)
    return path.read_bytes()


# --- not a database at all -------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(random.Random(1).randbytes(16384), id="random-16k"),
        pytest.param(random.Random(2).randbytes(100), id="random-100"),
        pytest.param(b"hello, this is a text file\n" * 400, id="text"),
        pytest.param(b"x\n", id="short-text"),
    ],
)
async def test_not_a_database(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "store.db"
    write_bytes(path, content)
    before = snapshot(tmp_path)
    err = await open_failure(path)
    assert type(err) is NotADatabaseError, repr(err)
    assert err.path == str(path)
    assert snapshot(tmp_path) == before


# --- foreign databases -----------------------------------------------------------------------


@pytest.mark.parametrize("journal", ["delete", "wal"])
async def test_foreign_sqlite_database_is_refused_and_unchanged(
    tmp_path: Path, journal: str
) -> None:
    path = tmp_path / "foreign.db"
    sql(
        path,
        f"PRAGMA journal_mode = {journal}",
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
        "INSERT INTO notes (body) VALUES ('keep me')",
        "PRAGMA user_version = 7",
    )
    assert sql(path, "PRAGMA application_id") == [(0,)]
    before = snapshot(tmp_path)
    err = await open_failure(path)
    assert type(err) is ForeignDatabaseError, repr(err)
    assert (err.path, err.application_id, err.user_version) == (str(path), 0, 7)
    assert snapshot(tmp_path) == before
    assert sql(path, "SELECT body FROM notes") == [("keep me",)]


async def test_our_file_with_another_application_id_is_foreign(
    tmp_path: Path, small_store: bytes
) -> None:
    path = tmp_path / "store.db"
    write_bytes(path, small_store)
    sql(path, "PRAGMA application_id = 4660")
    before = snapshot(tmp_path)
    err = await open_failure(path)
    assert type(err) is ForeignDatabaseError, repr(err)
    assert (err.application_id, err.user_version) == (4660, SCHEMA_VERSION)
    assert snapshot(tmp_path) == before


async def test_newer_schema_version_is_refused_with_both_numbers(
    tmp_path: Path, small_store: bytes
) -> None:
    path = tmp_path / "store.db"
    write_bytes(path, small_store)
    sql(path, "PRAGMA user_version = 99")
    before = snapshot(tmp_path)
    err = await open_failure(path)
    assert type(err) is UnsupportedSchemaVersion, repr(err)
    assert (err.expected, err.found) == (SCHEMA_VERSION, 99)
    text = str(err).replace(str(path), "<path>")
    words = text.replace(",", " ").replace("(", " ").replace(")", " ").split()
    assert "99" in words, text
    assert str(SCHEMA_VERSION) in words, text
    assert snapshot(tmp_path) == before


# --- our file with another database's -wal (R14) ---------------------------------------------


def pair_with_foreign_wal(ours: Path, foreign: Path, mixed: Path) -> None:
    """Copy ``ours`` to ``mixed`` and put a foreign database's live -wal next to it.

    The foreign database keeps its commits in its -wal (no checkpoint, connection still open)
    when the -wal is copied.
    """
    conn = apsw.Connection(str(foreign))
    try:
        assert conn.execute("PRAGMA journal_mode = WAL").fetchall() == [("wal",)]
        conn.execute("PRAGMA wal_autocheckpoint = 0").fetchall()
        conn.execute("CREATE TABLE other (x TEXT)")
        conn.execute("INSERT INTO other VALUES ('from the other database')")
        conn.execute("PRAGMA user_version = 3")
        wal = Path(str(foreign) + "-wal")
        assert wal.stat().st_size > 32 + 2 * (24 + PAGE), "the foreign -wal holds no frames"
        shutil.copyfile(ours, mixed)
        shutil.copyfile(wal, str(mixed) + "-wal")
    finally:
        conn.close()


async def make_mixed_pair(tmp_path: Path) -> tuple[Path, Path]:
    ours = tmp_path / "ours.db"
    await make_store(ours, 5)
    mixed_dir = tmp_path / "mixed"
    mixed_dir.mkdir()
    mixed = mixed_dir / "store.db"
    pair_with_foreign_wal(ours, tmp_path / "foreign.db", mixed)
    return ours, mixed


async def test_our_file_with_another_databases_wal_is_foreign(tmp_path: Path) -> None:
    ours, mixed = await make_mixed_pair(tmp_path)
    # Control: the same main file without the stray -wal is a healthy store.
    control = tmp_path / "control.db"
    shutil.copyfile(ours, control)
    async with turnbuckle.open_store(store_url(control)) as store:
        assert await store.tasks.task_count() == 5

    err = await open_failure(mixed)
    assert type(err) is ForeignDatabaseError, repr(err)
    assert (err.application_id, err.user_version) == (0, 3)
    assert "-wal" in str(err)


async def test_refusing_a_mispaired_wal_leaves_both_files_unchanged(tmp_path: Path) -> None:
    """The refused open must not checkpoint the foreign -wal into our file (that would
    overwrite our schema page with the other database's and delete the evidence)."""
    _, mixed = await make_mixed_pair(tmp_path)
    before = snapshot(mixed.parent)
    assert sorted(before) == ["store.db", "store.db-wal"]
    err = await open_failure(mixed)
    assert type(err) is ForeignDatabaseError, repr(err)
    after = snapshot(mixed.parent)
    # SQLite may leave a -shm (the WAL index, rebuilt from the -wal on every open) behind.
    appeared = set(after) - set(before)
    unchanged = {name: after.get(name) == digest for name, digest in before.items()}
    assert unchanged == {"store.db": True, "store.db-wal": True} and appeared <= {"store.db-shm"}, (
        f"a refused open changed the files: unchanged {unchanged}, new {sorted(appeared)}"
    )
    # With the stray -wal taken away again, our store must still be intact.
    os.remove(str(mixed) + "-wal")
    async with turnbuckle.open_store(store_url(mixed)) as store:
        assert await store.tasks.task_count() == 5


# --- damaged store files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        pytest.param(10, NotADatabaseError, id="10-bytes"),  # not even a whole header
        pytest.param(50, StoreCorruptError, id="50-bytes"),
        pytest.param(100, StoreCorruptError, id="100-bytes"),
        pytest.param(PAGE, StoreCorruptError, id="first-page"),
        pytest.param("half", StoreCorruptError, id="half"),
        pytest.param("all-but-one-page", StoreCorruptError, id="all-but-one-page"),
    ],
)
async def test_truncated_store(
    tmp_path: Path, big_store: bytes, size: int | str, expected: type[TurnbuckleError]
) -> None:
    # The file may run past the database's last page (it grows in chunks), so the cuts are
    # measured from the size the header records.
    used = int.from_bytes(big_store[28:32], "big") * PAGE
    cut = {"half": used // 2, "all-but-one-page": used - PAGE}.get(str(size), size)
    assert isinstance(cut, int)
    path = tmp_path / "store.db"
    write_bytes(path, big_store[:cut])
    before = snapshot(tmp_path)
    err = await open_failure(path)
    assert type(err) is expected, f"truncated to {cut} bytes: {err!r}"
    assert err.path == str(path)
    assert snapshot(tmp_path) == before


def corrupt_middle_page(path: Path, data: bytes) -> int:
    pages = len(data) // PAGE
    victim = pages // 2
    damaged = bytearray(data)
    damaged[victim * PAGE : (victim + 1) * PAGE] = random.Random(victim).randbytes(PAGE)
    write_bytes(path, bytes(damaged))
    return victim


async def test_corrupt_interior_page_found_by_quick_check(tmp_path: Path, big_store: bytes) -> None:
    path = tmp_path / "store.db"
    victim = corrupt_middle_page(path, big_store)
    err = await open_failure(path)
    assert type(err) is StoreCorruptError, f"page {victim} overwritten: {err!r}"
    assert err.path == str(path)
    # Only the quick_check finds it: without it the open succeeds.
    async with turnbuckle.open_store(store_url(path), verify_on_open=False) as store:
        assert await store.tasks.get_task("t0000") is not None


async def test_corrupt_interior_page_is_not_written_to(tmp_path: Path, big_store: bytes) -> None:
    """A store refused as corrupt must be left exactly as found (no write probe, no WAL
    switch, no checkpoint into a damaged file)."""
    path = tmp_path / "store.db"
    victim = corrupt_middle_page(path, big_store)
    before = snapshot(tmp_path)
    err = await open_failure(path)
    assert type(err) is StoreCorruptError, repr(err)
    after = snapshot(tmp_path)
    if after != before:
        changed = [
            i
            for i, (a, b) in enumerate(zip(path.read_bytes(), big_store, strict=False))
            if a != b and not victim * PAGE <= i < (victim + 1) * PAGE
        ]
        raise AssertionError(
            f"the refused corrupt file was modified: {len(changed)} bytes outside the damaged"
            f" page {victim} differ (pages {sorted({i // PAGE + 1 for i in changed})});"
            f" files before {sorted(before)}, after {sorted(after)}"
        )


# --- paths that cannot be a store ------------------------------------------------------------


async def test_missing_parent_folder(tmp_path: Path) -> None:
    path = tmp_path / "no-such-folder" / "store.db"
    err = await open_failure(path)
    assert type(err) is StoreOpenError, repr(err)
    assert err.path == str(path)
    assert not path.parent.exists()


async def test_path_is_a_folder(tmp_path: Path) -> None:
    path = tmp_path / "a-folder.db"
    path.mkdir()
    err = await open_failure(path)
    assert type(err) is StoreOpenError, repr(err)
    assert err.path == str(path)
    assert list(path.iterdir()) == []
    assert sorted(os.listdir(tmp_path)) == ["a-folder.db"]


async def test_zero_length_file_opens_as_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    write_bytes(path, b"")
    async with turnbuckle.open_store(store_url(path)) as store:
        assert await store.tasks.task_count() == 0
        await store.tasks.create_task(TaskRecord(task_id="first", original_method="m"))
    assert sql(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    async with turnbuckle.open_store(store_url(path)) as store:
        found = await store.tasks.get_task("first")
        assert found is not None
        assert found.status is TaskStatus.WORKING


# --- use after close -------------------------------------------------------------------------


async def test_use_after_close_is_store_closed_and_double_close_is_a_noop(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with turnbuckle.open_store(store_url(path)) as store:
        await store.tasks.create_task(TaskRecord(task_id="kept", original_method="m"))
        await store.aclose()
        await store.aclose()  # a no-op
        calls = {
            "get_task": lambda: store.tasks.get_task("kept"),
            "task_count": lambda: store.tasks.task_count(),
            "list_tasks": lambda: store.tasks.list_tasks(),
            "create_task": lambda: store.tasks.create_task(
                TaskRecord(task_id="late", original_method="m")
            ),
            "complete_task": lambda: store.tasks.complete_task("kept", TaskSuccess(1)),
            "delete_task": lambda: store.tasks.delete_task("kept"),
        }
        for name, call in calls.items():
            try:
                await call()
            except Exception as exc:
                assert type(exc) is StoreClosedError, f"{name}: {exc!r}"
            else:
                raise AssertionError(f"{name} on a closed store succeeded")
    # Leaving the block closes a third time: still a no-op. Nothing was applied after close.
    await store.aclose()
    async with turnbuckle.open_store(store_url(path)) as store:
        kept = await store.tasks.get_task("kept")
        assert kept is not None
        assert kept.status is TaskStatus.WORKING
        assert await store.tasks.get_task("late") is None
