"""A store handle used in a child process made by ``fork`` refuses at once, in both adapters.

Before, a SQLite write in the child waited forever (the owner thread does not exist there) and
could not be cancelled, and a memory store's copy silently diverged from the parent's. Now every
call raises ``StoreUsedInForkedChild`` (a ``StoreClosedError``), ``aclose()`` returns at once, and
the parent's store is untouched. A real fork: the child reports through a pipe, and the parent
never waits on it past a deadline, so a hang fails the test instead of stalling the run.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

import turnbuckle
from turnbuckle import StoreClosedError, StoreUsedInForkedChild, TaskRecord

from ._children import store_url

#: How long the parent waits for the child's report (and then for it to exit).
HANG_S = 30.0


def _child(store: turnbuckle.Store, out: multiprocessing.connection.Connection) -> None:
    """Runs in the forked child: try the inherited store and report each outcome."""

    async def attempts() -> list[tuple[str, Any]]:
        calls = [
            (
                "write",
                lambda: store.tasks.create_task(TaskRecord(task_id="child", original_method="m")),
            ),
            ("read", lambda: store.tasks.get_task("parent")),
            ("count", lambda: store.tasks.task_count()),
        ]
        report: list[tuple[str, Any]] = []
        for name, call in calls:
            try:
                report.append((name, ("returned", repr(await call()))))
            except Exception as exc:
                report.append((name, ("raised", exc)))
        await store.aclose()
        report.append(("aclose", ("returned", None)))
        try:
            await store.tasks.get_task("parent")
        except Exception as exc:
            report.append(("read after aclose", ("raised", exc)))
        else:
            report.append(("read after aclose", ("returned", None)))
        return report

    # The parent's event loop registered its wake-up fd for signals, and the child inherits
    # that registration; a fresh trio run here must start from none.
    signal.set_wakeup_fd(-1)
    try:
        out.send((os.getpid(), trio.run(attempts)))
    except BaseException as exc:
        out.send((os.getpid(), [("child", ("crashed", repr(exc)))]))
    finally:
        out.close()


def fork_and_report(store: turnbuckle.Store) -> tuple[int, list[tuple[str, Any]]]:
    """Fork (from a worker thread, so the child's only thread runs no event loop), let the child
    use ``store``, and return (child pid, its report)."""
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(store, theirs))
    child.start()
    theirs.close()
    try:
        assert ours.poll(HANG_S), "the child hung using the inherited store"
        report: tuple[int, list[tuple[str, Any]]] = ours.recv()
        return report
    finally:
        ours.close()
        child.join(HANG_S)
        if child.is_alive():
            child.kill()
            child.join()


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_a_forked_child_is_refused_at_once_and_the_parent_goes_on(
    tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "fork.db"
    url = "memory://" if backend == "memory" else store_url(path)
    async with turnbuckle.open_store(url) as store:
        await store.tasks.create_task(TaskRecord(task_id="parent", original_method="m"))

        child_pid, report = await trio.to_thread.run_sync(fork_and_report, store)

        steps = ["write", "read", "count", "aclose", "read after aclose"]
        assert [name for name, _ in report] == steps, report
        outcomes = dict(report)
        assert outcomes["aclose"] == ("returned", None)
        for name in ("write", "read", "count", "read after aclose"):
            kind, error = outcomes[name]
            assert kind == "raised", f"{name} in the child: {outcomes[name]}"
            assert error == StoreUsedInForkedChild(backend, os.getpid(), child_pid), error
            assert isinstance(error, StoreClosedError)
            assert "open the store again in the child" in str(error)

        # The child's attempts and its aclose changed nothing here: the same handle still
        # writes and reads, and the child's write is nowhere.
        await store.tasks.create_task(TaskRecord(task_id="after", original_method="m"))
        assert await store.tasks.get_task("child") is None
        assert await store.tasks.task_count() == 2
    if backend == "sqlite":
        async with turnbuckle.open_store(url) as store:
            page = await store.tasks.list_tasks()
            assert sorted(task.task_id for task in page.tasks) == ["after", "parent"]
