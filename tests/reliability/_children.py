"""Code that runs in child processes (and threads) of the reliability tests.

Everything here is importable by ``multiprocessing`` (spawn) as ``<package>._children`` and is
also runnable as a script (``python _children.py crash-writer ...``) for the ``kill -9`` test, so
it imports nothing from the test package itself.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import trio

import turnbuckle
from turnbuckle import TaskRecord, TaskStatus, TaskSuccess, TurnbuckleError

#: How long any barrier or queue wait may take before a child gives up (a hang, not a result).
WAIT_S = 120.0


def store_url(path: object) -> str:
    """The open_store URL of a file path (an absolute path gives ``sqlite:////...``)."""
    return "sqlite:///" + str(path)


def error_report(exc: BaseException) -> tuple[str, str, dict[str, Any], str]:
    """(module, class name, fields, repr) of an exception, safe to send between processes."""
    fields: dict[str, Any] = {}
    if isinstance(exc, TurnbuckleError):
        fields = {name: getattr(exc, name) for name in type(exc)._fields}
    return type(exc).__module__, type(exc).__name__, fields, repr(exc)


# --- concurrent first opens ------------------------------------------------------------------


async def _open_and_create(path: str, opener: int) -> tuple[int, str]:
    async with turnbuckle.open_store(store_url(path)) as store:
        before = await store.tasks.task_count()  # works only if the schema is there
        record = await store.tasks.create_task(
            TaskRecord(task_id=f"opener-{opener:02d}", original_method="first/open")
        )
        return before, record.task_id


def first_open_once(path: str, opener: int) -> tuple[str, Any]:
    """One opener: open ``path`` (which may not exist yet), create one task; report."""
    try:
        return "ok", trio.run(_open_and_create, path, opener)
    except BaseException as exc:
        return "error", error_report(exc)


def first_open_process(paths: list[str], opener: int, barrier: Any, results: Any) -> None:
    """A process that takes part in one first-open race per path, in order."""
    for index, path in enumerate(paths):
        barrier.wait(WAIT_S)
        results.put((index, opener, *first_open_once(path, opener)))


# --- two writers racing on one task ----------------------------------------------------------

#: (kind, task_id) rounds; kinds: "status", "complete", "cancel_vs_complete".
Round = tuple[str, str]


def race_outcome(kind: str, worker: int, round_no: int) -> TaskSuccess:
    """The outcome worker ``worker`` stores in round ``round_no`` (different per worker)."""
    return TaskSuccess({"winner": worker, "round": round_no, "kind": kind, "pad": "x" * 3000})


async def _race_one(
    store: turnbuckle.Store, kind: str, task_id: str, worker: int, round_no: int
) -> turnbuckle.TaskRecord:
    tasks = store.tasks
    if kind == "status":
        return await tasks.update_task_status(task_id, TaskStatus.COMPLETED, f"winner-{worker}")
    if kind == "complete":
        return await tasks.complete_task(
            task_id, race_outcome(kind, worker, round_no), f"winner-{worker}"
        )
    if kind == "cancel_vs_complete":
        # The roles swap every round, so each worker is the canceller half of the time.
        if (worker + round_no) % 2 == 0:
            return await tasks.cancel_task(task_id, f"cancel-{worker}")
        return await tasks.complete_task(
            task_id, race_outcome(kind, worker, round_no), f"winner-{worker}"
        )
    raise ValueError(f"unknown round kind {kind!r}")


async def _race(path: str, worker: int, barrier: Any, results: Any, rounds: list[Round]) -> None:
    async with turnbuckle.open_store(store_url(path)) as store:
        for round_no, (kind, task_id) in enumerate(rounds):
            await trio.to_thread.run_sync(barrier.wait, WAIT_S)
            try:
                record = await _race_one(store, kind, task_id, worker, round_no)
            except Exception as exc:
                results.put(("error", round_no, worker, error_report(exc)))
            else:
                results.put(("ok", round_no, worker, record))


def race_worker(path: str, worker: int, barrier: Any, results: Any, rounds: list[Round]) -> None:
    """One racer (a process or a thread with its own store handle): for each round, wait at
    the barrier, make this worker's change, and put the outcome on ``results``."""
    try:
        trio.run(_race, path, worker, barrier, results, rounds)
    except BaseException as exc:
        results.put(("crash", -1, worker, error_report(exc)))
        raise


# --- the kill -9 writer ----------------------------------------------------------------------


def crash_outcome(i: int) -> TaskSuccess:
    """The outcome the crash writer stores for its ``i``-th task."""
    return TaskSuccess({"i": i})


async def _crash_writer(path: str, durability: Any, prefix: str) -> None:
    rng = random.Random(prefix)
    parent = os.getppid()
    async with turnbuckle.open_store(store_url(path), durability=durability) as store:
        os.write(1, b"ready\n")
        i = 0
        while os.getppid() == parent:  # never outlive the test that started this writer
            task_id = f"{prefix}-{i:06d}"
            params = {"i": i, "pad": "p" * rng.randint(50, 1500)}
            await store.tasks.create_task(
                TaskRecord(task_id=task_id, original_method="crash/write", original_params=params)
            )
            os.write(1, f"C {task_id}\n".encode())  # acknowledged: created
            await store.tasks.complete_task(task_id, crash_outcome(i), "done")
            os.write(1, f"D {task_id}\n".encode())  # acknowledged: completed
            i += 1


def main(argv: list[str]) -> None:
    if argv[1:2] == ["crash-writer"]:
        path, durability, prefix = argv[2:5]
        trio.run(_crash_writer, path, durability, prefix)
    else:
        raise SystemExit(f"usage: {argv[0]} crash-writer PATH DURABILITY PREFIX")


if __name__ == "__main__":
    main(sys.argv)
