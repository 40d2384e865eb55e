"""16 concurrent first opens of a path that does not exist yet (guide §2.4, §3.3, §4.2).

Every opener must succeed, see the schema (its first read works), and add its task; the file
then holds exactly the 16 tasks, stamped with our application_id and schema version, in WAL.
``TURNBUCKLE_SOAK=1`` runs the guide's full sizes (200 thread rounds, 100 process rounds).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from pathlib import Path
from typing import Any

import apsw
import trio

import turnbuckle
from turnbuckle.adapters.sqlite import APPLICATION_ID, SCHEMA_VERSION

from ..figures import record
from ._children import WAIT_S, first_open_once, first_open_process, store_url
from ._shared import reap

FIRST_OPEN = "Concurrent first opens never see a half-made schema"

OPENERS = 16
SOAK = os.environ.get("TURNBUCKLE_SOAK") == "1"
THREAD_ROUNDS = 200 if SOAK else 25
PROCESS_ROUNDS = 100 if SOAK else 8


def check_round(path: Path, outcomes: dict[int, tuple[str, Any]], round_no: int) -> None:
    """Every opener succeeded and the final file holds exactly one task per opener."""
    failures = {opener: value for opener, (status, value) in outcomes.items() if status != "ok"}
    assert not failures, f"round {round_no}: {len(failures)}/{OPENERS} opens failed: {failures}"
    assert sorted(outcomes) == list(range(OPENERS)), f"round {round_no}: {sorted(outcomes)}"
    values = [value for _, value in outcomes.values()]
    created = sorted(task_id for _, task_id in values)
    expected = [f"opener-{i:02d}" for i in range(OPENERS)]
    assert created == expected, f"round {round_no}: {created}"
    # Each opener saw between 0 and 15 tasks before its own: a schema, never a missing table.
    seen = sorted(before for before, _ in values)
    assert all(0 <= n < OPENERS for n in seen), f"round {round_no}: counts seen {seen}"

    async def final_ids() -> list[str]:
        async with turnbuckle.open_store(store_url(path)) as store:
            page = await store.tasks.list_tasks(limit=1000)
            return sorted(task.task_id for task in page.tasks)

    assert trio.run(final_ids) == expected, f"round {round_no}: wrong final tasks"
    conn = apsw.Connection(str(path))
    try:
        header = [
            conn.execute(f"PRAGMA {name}").fetchall()[0][0]
            for name in ("application_id", "user_version", "journal_mode")
        ]
        integrity = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    assert header == [APPLICATION_ID, SCHEMA_VERSION, "wal"], f"round {round_no}: {header}"
    assert integrity == [("ok",)], f"round {round_no}: {integrity}"


def thread_opener(
    path: str, opener: int, barrier: threading.Barrier, outcomes: dict[int, tuple[str, Any]]
) -> None:
    barrier.wait()
    outcomes[opener] = first_open_once(path, opener)


def test_16_threads_first_open(tmp_path: Path) -> None:
    for round_no in range(THREAD_ROUNDS):
        path = tmp_path / f"threads-{round_no}.db"
        barrier = threading.Barrier(OPENERS, timeout=WAIT_S)
        outcomes: dict[int, tuple[str, Any]] = {}

        threads = [
            threading.Thread(target=thread_opener, args=(str(path), n, barrier, outcomes))
            for n in range(OPENERS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
        assert not any(thread.is_alive() for thread in threads), f"round {round_no}: hung"
        check_round(path, outcomes, round_no)
    record(
        FIRST_OPEN,
        "16 threads open a new file at a barrier, each creating one task",
        openers="16 threads",
        rounds=THREAD_ROUNDS,
        opens=OPENERS * THREAD_ROUNDS,
        failed_opens=0,
        saw_a_half_made_schema=0,
    )


def test_16_processes_first_open(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    paths = [str(tmp_path / f"procs-{round_no}.db") for round_no in range(PROCESS_ROUNDS)]
    barrier = ctx.Barrier(OPENERS)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=first_open_process, args=(paths, n, barrier, results))
        for n in range(OPENERS)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, dict[int, tuple[str, Any]]] = {r: {} for r in range(PROCESS_ROUNDS)}
    try:
        for _ in range(OPENERS * PROCESS_ROUNDS):
            try:
                round_no, opener, status, value = results.get(timeout=WAIT_S)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode is not None]
                raise AssertionError(f"no report from an opener; exit codes {dead}") from None
            outcomes[round_no][opener] = (status, value)
    finally:
        reap(procs, results)
    assert [proc.exitcode for proc in procs] == [0] * OPENERS
    for round_no, path in enumerate(paths):
        check_round(Path(path), outcomes[round_no], round_no)
    record(
        FIRST_OPEN,
        "16 spawned processes open a new file at a barrier, each creating one task",
        openers="16 processes",
        rounds=PROCESS_ROUNDS,
        opens=OPENERS * PROCESS_ROUNDS,
        failed_opens=0,
        saw_a_half_made_schema=0,
    )
