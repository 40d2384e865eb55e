"""Parent-side helpers shared by the reliability tests."""

from __future__ import annotations

import multiprocessing.process
import multiprocessing.queues
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

import turnbuckle
from turnbuckle import TaskRecord

from ._children import WAIT_S, store_url

T = TypeVar("T")


async def read_all(path: Path) -> dict[str, TaskRecord]:
    """Every task in the file by id, through a fresh open (which also runs quick_check and
    recovers any WAL a killed writer left); no record may be corrupt."""
    found: dict[str, TaskRecord] = {}
    async with turnbuckle.open_store(store_url(path)) as store:
        cursor = None
        while True:
            page = await store.tasks.list_tasks(cursor, limit=1000)
            assert page.corrupt_ids == (), f"corrupt records: {page.corrupt_ids}"
            found.update((task.task_id, task) for task in page.tasks)
            cursor = page.next_cursor
            if cursor is None:
                return found


def reap(
    procs: list[multiprocessing.process.BaseProcess], results: multiprocessing.queues.Queue[Any]
) -> None:
    """Wait for child processes (killing any that hang) and close their result queue."""
    for proc in procs:
        proc.join(WAIT_S)
        if proc.is_alive():
            proc.kill()
            proc.join()
    results.close()
    results.join_thread()


def race_in_threads(count: int, run: Callable[[int], Awaitable[T]]) -> dict[int, T | BaseException]:
    """Start ``count`` threads at a barrier, each running ``run(n)`` in its own event loop (and
    so with its own store handle); return each thread's result or exception by ``n``."""
    barrier = threading.Barrier(count, timeout=WAIT_S)
    outcomes: dict[int, T | BaseException] = {}

    def racer(n: int) -> None:
        barrier.wait()
        try:
            outcomes[n] = trio.run(run, n)
        except BaseException as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    return outcomes
