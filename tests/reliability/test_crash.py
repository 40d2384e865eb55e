"""``kill -9`` durability: nothing acknowledged is ever lost (guide §3.2, §4.2).

A child process creates and completes tasks in a loop, writing ``C <id>`` after each
``create_task`` returned and ``D <id>`` after each ``complete_task`` returned: those lines are
its acknowledgements. The parent kills it with SIGKILL at a random moment, reopens the file and
checks that every acknowledged task is there in its acknowledged state, that at most the one
in-flight operation landed without an acknowledgement, and that ``integrity_check`` is ok. The
next cycle restarts the writer on the same file (a fresh file every 10 cycles).
``TURNBUCKLE_SOAK=1``: 200 cycles per durability (CI: 10).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from turnbuckle import TaskRecord, TaskStatus

from ..adapters.schemas import sql
from ..figures import record
from . import _children
from ._children import crash_outcome
from ._shared import read_all

SOAK = os.environ.get("TURNBUCKLE_SOAK") == "1"
CYCLES = 200 if SOAK else 10
#: Cycles that restart the writer on the same file before a fresh file (keeps checks O(n)).
CYCLES_PER_FILE = 10
CHILD = Path(_children.__file__)


def wait_for_ready(proc: subprocess.Popen[bytes], acks: Path, errors: Path) -> None:
    deadline = time.monotonic() + _children.WAIT_S
    while not acks.read_bytes().startswith(b"ready\n"):
        if proc.poll() is not None:
            raise AssertionError(
                f"writer exited with {proc.returncode} before it was ready:"
                f" {errors.read_text()[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError("writer never became ready")
        time.sleep(0.005)


def run_writer_and_kill(
    path: Path, durability: str, prefix: str, folder: Path, rng: random.Random
) -> tuple[list[str], list[str], float]:
    """Start a writer, kill -9 it 100-400 ms after it opened the store; its acknowledgements."""
    acks, errors = folder / f"{prefix}.acks", folder / f"{prefix}.err"
    with acks.open("wb") as out, errors.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), "crash-writer", str(path), durability, prefix],
            stdout=out,
            stderr=err,
        )
    try:
        wait_for_ready(proc, acks, errors)
        delay = rng.uniform(0.1, 0.4)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"writer ended with {proc.returncode}, not by SIGKILL: {errors.read_text()[-2000:]}"
    )
    lines = acks.read_bytes().split(b"\n")[:-1]  # a partial last line is not an ack
    assert lines[0] == b"ready"
    created, completed = [], []
    for line in lines[1:]:
        kind, task_id = line.decode().split(" ")
        (created if kind == "C" else completed).append(task_id)
    return created, completed, delay


def index_of(task_id: str) -> int:
    return int(task_id.rsplit("-", 1)[1])


@pytest.mark.parametrize("durability", ["full", "process"])
def test_kill9_loses_no_acknowledged_write(tmp_path: Path, durability: str) -> None:
    rng = random.Random(f"crash-{durability}")
    previous: dict[str, TaskRecord] = {}
    totals = {"created": 0, "completed": 0, "unacked_created": 0, "unacked_completed": 0}
    for cycle in range(CYCLES):
        if cycle % CYCLES_PER_FILE == 0:
            path = tmp_path / f"crash-{cycle // CYCLES_PER_FILE}.db"
            previous = {}
        prefix = f"c{cycle:04d}"
        created, completed, delay = run_writer_and_kill(path, durability, prefix, tmp_path, rng)
        totals["created"] += len(created)
        totals["completed"] += len(completed)
        where = f"{durability}, cycle {cycle} (killed after {delay * 1000:.0f} ms), {totals}"

        found = trio.run(read_all, path)
        # Earlier cycles' tasks are all still there, exactly as last seen.
        lost = sorted(set(previous) - set(found))
        assert not lost, f"{len(lost)} earlier tasks lost, e.g. {lost[:5]}; {where}"
        changed = sorted(k for k, task in previous.items() if found[k] != task)
        assert not changed, f"earlier tasks changed: {changed[:5]}; {where}"
        # This cycle's tasks: every acknowledged create and complete landed.
        mine = {k: task for k, task in found.items() if k.startswith(prefix + "-")}
        lost = sorted(set(created) - set(mine))
        assert not lost, f"{len(lost)} acknowledged creates lost, e.g. {lost[:5]}; {where}"
        for task_id in completed:
            task = mine[task_id]
            assert task.status is TaskStatus.COMPLETED, f"{task_id} is {task.status}; {where}"
            assert task.result == crash_outcome(index_of(task_id)), f"{task_id}; {where}"
        # Present without an acknowledgement: at most the one create in flight at the kill.
        extra = sorted(set(mine) - set(created))
        assert extra in ([], [f"{prefix}-{len(created):06d}"]), f"unacked: {extra}; {where}"
        totals["unacked_created"] += len(extra)
        # Not acknowledged as completed: working, or (the one in flight) completed.
        for task_id in sorted(set(mine) - set(completed)):
            task = mine[task_id]
            if task.status is TaskStatus.COMPLETED:
                assert task_id == f"{prefix}-{len(completed):06d}", f"{task_id}; {where}"
                assert task.result == crash_outcome(index_of(task_id)), f"{task_id}; {where}"
                totals["unacked_completed"] += 1
            else:
                assert task.status is TaskStatus.WORKING, f"{task_id}: {task}; {where}"
                assert task.result is None, f"{task_id}: {task}; {where}"
        assert len(found) == len(previous) + len(mine), f"foreign tasks appeared; {where}"
        assert sql(path, "PRAGMA integrity_check") == [("ok",)], f"integrity_check failed; {where}"
        previous = found

    assert totals["created"] > 0 and totals["completed"] > 0, f"nothing acknowledged: {totals}"
    record(
        f"Durability of acknowledged writes (durability={durability!r})",
        "a child process creates and completes tasks through the public API, acknowledging each"
        " after the await returned; kill -9 at a random 100-400 ms; reopen (quick_check) and"
        " check every acknowledged write, the previous cycles' tasks, and integrity_check",
        cycles=CYCLES,
        acknowledged_creates=totals["created"],
        acknowledged_completes=totals["completed"],
        lost_acknowledged=0,
        present_unacknowledged=totals["unacked_created"] + totals["unacked_completed"],
        partial_commits=0,
        integrity_failures=0,
    )
