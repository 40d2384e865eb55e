"""Two writers (processes, then threads) racing to change the same task in one SQLite file.

Each round both writers leave a barrier together and make a conflicting change to one working
task. Exactly one must win; the loser must get ``TerminalState`` naming the winner's status; the
stored record must be the winner's record exactly (status, message, result: nothing
half-written, nothing from the loser). Guide R7/R8 and §4.2 ("one-shot CAS").
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from pathlib import Path
from typing import Any

import trio

import turnbuckle
from turnbuckle import TaskRecord, TaskStatus

from ..figures import record as record_figures
from ._children import WAIT_S, Round, race_outcome, race_worker, store_url
from ._shared import read_all, reap

SOAK = os.environ.get("TURNBUCKLE_SOAK") == "1"
ROUNDS_PER_KIND = 500 if SOAK else 20
KINDS = ("status", "complete", "cancel_vs_complete")


def plan_rounds() -> list[Round]:
    return [(kind, f"{kind}-{n:04d}") for kind in KINDS for n in range(ROUNDS_PER_KIND)]


async def create_tasks(path: Path, rounds: list[Round]) -> None:
    async with turnbuckle.open_store(store_url(path)) as store:
        for _, task_id in rounds:
            await store.tasks.create_task(TaskRecord(task_id=task_id, original_method="race"))


def expected_winner_record(kind: str, worker: int, round_no: int, record: TaskRecord) -> None:
    """The winner's returned record says what it asked for."""
    cancels = kind == "cancel_vs_complete" and (worker + round_no) % 2 == 0
    if kind == "status":
        want = (TaskStatus.COMPLETED, f"winner-{worker}", None)
    elif cancels:
        want = (TaskStatus.CANCELLED, f"cancel-{worker}", None)
    else:
        want = (TaskStatus.COMPLETED, f"winner-{worker}", race_outcome(kind, worker, round_no))
    got = (record.status, record.status_message, record.result)
    assert got == want, f"round {round_no} ({kind}): winner {worker} returned {got}"


def check_races(
    path: Path, rounds: list[Round], reports: list[tuple[Any, ...]], label: str
) -> None:
    crashes = [r for r in reports if r[0] == "crash"]
    assert not crashes, f"a racer crashed: {crashes}"
    by_round: dict[int, list[tuple[Any, ...]]] = {}
    for report in reports:
        by_round.setdefault(report[1], []).append(report)
    assert sorted(by_round) == list(range(len(rounds)))
    final = trio.run(read_all, path)
    wins = {0: 0, 1: 0}
    for round_no, (kind, task_id) in enumerate(rounds):
        pair = sorted(by_round[round_no], key=lambda report: report[2])
        assert [report[2] for report in pair] == [0, 1], f"round {round_no}: {pair}"
        oks = [report for report in pair if report[0] == "ok"]
        errors = [report for report in pair if report[0] == "error"]
        assert len(oks) == 1 and len(errors) == 1, (
            f"round {round_no} ({kind}, {task_id}): want 1 winner + 1 TerminalState, got {pair}"
        )
        _, _, winner, record = oks[0]
        _, _, loser, (module, name, fields, text) = errors[0]
        wins[winner] += 1
        assert (module, name) == ("turnbuckle.errors", "TerminalState"), (
            f"round {round_no} ({kind}): loser {loser} got {text}"
        )
        assert fields == {"status": record.status}, f"round {round_no}: loser saw {text}"
        expected_winner_record(kind, winner, round_no, record)
        stored = final[task_id]
        assert stored == record, (
            f"round {round_no} ({kind}): stored record is not the winner's:\n"
            f" stored {stored!r}\n winner {record!r}"
        )
    assert len(final) == len(rounds)
    assert sum(wins.values()) == len(rounds), wins
    record_figures(
        "Two writers on one task: exactly one wins",
        f"{label}: at a barrier, both make a"
        " conflicting change to one working task (status, complete, cancel vs complete)",
        rounds=len(rounds),
        exactly_one_winner=len(rounds),
        loser_got_TerminalState=len(rounds),
        half_written=0,
    )


def test_two_processes_race_on_one_task(tmp_path: Path) -> None:
    path = tmp_path / "race.db"
    rounds = plan_rounds()
    trio.run(create_tasks, path, rounds)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=race_worker, args=(str(path), n, barrier, results, rounds))
        for n in (0, 1)
    ]
    for proc in procs:
        proc.start()
    reports: list[tuple[Any, ...]] = []
    try:
        for _ in range(2 * len(rounds)):
            try:
                reports.append(results.get(timeout=WAIT_S))
            except queue.Empty:
                codes = [proc.exitcode for proc in procs]
                raise AssertionError(f"no report; racers' exit codes {codes}") from None
            if reports[-1][0] == "crash":
                break
    finally:
        reap(procs, results)
    check_races(path, rounds, reports, "2 spawned processes")
    assert [proc.exitcode for proc in procs] == [0, 0]


def test_two_threads_race_on_one_task(tmp_path: Path) -> None:
    """The same races between two store handles in one process (each on its own thread and
    its own trio.run): two connections, two owner threads, one file."""
    path = tmp_path / "race.db"
    rounds = plan_rounds()
    trio.run(create_tasks, path, rounds)
    barrier = threading.Barrier(2)
    results: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    threads = [
        threading.Thread(target=race_worker, args=(str(path), n, barrier, results, rounds))
        for n in (0, 1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads), "a racer thread hung"
    reports = []
    while not results.empty():
        reports.append(results.get())
    check_races(path, rounds, reports, "2 threads, one store handle each")
