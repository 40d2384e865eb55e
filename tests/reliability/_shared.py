"""Parent-side helpers shared by the reliability tests."""

from __future__ import annotations

import multiprocessing.process
import multiprocessing.queues
from pathlib import Path
from typing import Any

import turnbuckle
from turnbuckle import TaskRecord

from ._children import WAIT_S, store_url


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
