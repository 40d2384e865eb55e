"""Power loss: what an OS crash leaves of the file (guide §4.6).

The store opens through :class:`~._powerloss.PowerLossVFS` (the adapter's ``apsw`` is swapped
for a proxy; nothing in ``turnbuckle/`` changes). A writer creates and completes tasks one at a
time and records each acknowledgement (the awaited call returned before the cut). The power is
cut after a random number of mutating file calls: in the open, in the middle of a commit, in a
checkpoint (odd cycles set ``wal_autocheckpoint`` to 8 pages) or in the close; every write not
synced by then is undone (or, by cycle, a random half of them, or all up to a random point, is
kept). The file is then reopened normally (``quick_check``, WAL recovery) and checked:

- ``"full"``: every acknowledged write is there; besides them, at most the one in flight;
- ``"process"``: what is there is a prefix of (acknowledged + in flight), in order;
- both: ``integrity_check`` is ok, and earlier cycles' tasks are all still there.

The control run sets ``synchronous=OFF``: the harness must then see acknowledged writes lost.
``TURNBUCKLE_SOAK=1``: 100 cycles per durability (CI: 10).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import turnbuckle
import turnbuckle.adapters.sqlite as sqlite_adapter
from turnbuckle import TaskRecord, TaskStatus, TaskSuccess

from ..adapters.schemas import sql
from ..figures import record as record_figures
from ._children import store_url
from ._powerloss import ApswProxy, PowerLossVFS
from ._shared import read_all

SOAK = os.environ.get("TURNBUCKLE_SOAK") == "1"
CYCLES = 100 if SOAK else 10
CYCLES_PER_FILE = 5
#: Tasks a cycle would write (create + complete each) if the power never went out.
TASKS_PER_CYCLE = 12

#: How the cut treats unsynced writes, by cycle (see ``PowerLossVFS.restore``).
MODES = ("drop", "subset", "ordered")

Op = tuple[str, str]  # ("C" | "D", task_id)


@pytest.fixture
def vfs() -> Iterator[PowerLossVFS]:
    crash = PowerLossVFS()
    try:
        yield crash
    finally:
        crash.unregister()


def outcome(task_id: str) -> TaskSuccess:
    return TaskSuccess({"id": task_id})


async def write_until_cut(
    path: Path, durability: Any, prefix: str, vfs: PowerLossVFS
) -> tuple[list[Op], list[Op]]:
    """Create and complete tasks until the power goes out: (acknowledged, in flight)."""
    acked: list[Op] = []
    ops = [(kind, f"{prefix}-{i:03d}") for i in range(TASKS_PER_CYCLE) for kind in "CD"]
    try:
        async with turnbuckle.open_store(store_url(path), durability=durability) as store:
            for kind, task_id in ops:
                if vfs.cut:
                    break
                try:
                    if kind == "C":
                        record = TaskRecord(task_id=task_id, original_method="power/write")
                        await store.tasks.create_task(record)
                    else:
                        await store.tasks.complete_task(task_id, outcome(task_id), "done")
                except turnbuckle.TurnbuckleError:
                    assert vfs.cut, f"{kind} {task_id} failed with the power on"
                    return acked, [(kind, task_id)]
                if vfs.cut:  # the cut came during this call: its reply never arrived
                    return acked, [(kind, task_id)]
                acked.append((kind, task_id))
        # All written: the cut may still come while the store closes (its checkpoint).
    except turnbuckle.TurnbuckleError:
        # Only the open can fail here (the power went out while it ran).
        assert vfs.cut and not acked, "the store failed with the power on"
    vfs.cut_now()
    return acked, []


def present_ops(found: dict[str, TaskRecord], prefix: str) -> set[Op]:
    present: set[Op] = set()
    for task_id, task in found.items():
        if not task_id.startswith(prefix + "-"):
            continue
        present.add(("C", task_id))
        if task.status is TaskStatus.COMPLETED:
            assert task.result == outcome(task_id), f"{task_id}: {task}"
            present.add(("D", task_id))
        else:
            assert task.status is TaskStatus.WORKING and task.result is None, f"{task}"
    return present


def run_cycles(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    vfs: PowerLossVFS,
    durability: str,
    *,
    cycles: int,
    sync_off: bool = False,
) -> list[dict[str, Any]]:
    """Run power-cut cycles; return one report per cycle (checks the invariants that hold for
    every durability: a readable, consistent file, and nothing present that was never sent)."""
    rng = random.Random(f"power-{durability}-{sync_off}")
    proxy = ApswProxy(vfs_name="tb-crash", sync_off=sync_off)
    reports = []
    previous: dict[str, TaskRecord] = {}
    ops_per_cycle = 0
    for cycle in range(cycles + 1):
        calibrating = cycle == 0  # measures how many file calls a full cycle makes
        if cycle % CYCLES_PER_FILE == 1 or calibrating:
            path = tmp_path / f"power-{durability}-{cycle}.db"
            previous = {}
        prefix = f"p{cycle:03d}"
        vfs.arm(None if calibrating else rng.randint(0, ops_per_cycle))
        mode = "drop" if sync_off else MODES[cycle % len(MODES)]
        # Odd cycles checkpoint every few commits, so cuts also land in checkpoints.
        proxy.autocheckpoint = 8 if cycle % 2 else None
        with monkeypatch.context() as patch:
            patch.setattr(sqlite_adapter, "apsw", proxy)
            acked, in_flight = trio.run(write_until_cut, path, durability, prefix, vfs)
        cut_at, dropped = vfs.ops, vfs.dropped
        lost_unsynced, kept_unsynced = vfs.restore(mode, rng)
        if calibrating:
            ops_per_cycle = cut_at
            path.unlink()
            continue
        where = (
            f"{durability}, cycle {cycle}, cut after {vfs.cut_after} calls, {mode},"
            f" autocheckpoint={proxy.autocheckpoint}"
        )

        found = trio.run(read_all, path)  # the real VFS: quick_check, WAL recovery
        assert sql(path, "PRAGMA integrity_check") == [("ok",)], f"integrity_check failed; {where}"
        gone = sorted(k for k in previous if found.get(k) != previous[k])
        assert not gone, f"earlier tasks lost or changed: {gone[:5]}; {where}"
        present = present_ops(found, prefix)
        sent = acked + in_flight
        assert present <= set(sent), f"never-sent writes present: {present - set(sent)}; {where}"
        assert len(found) == len(previous) + len({t for _, t in present}), f"strangers; {where}"
        previous = found
        reports.append(
            {
                "cycle": cycle,
                "acked": len(acked),
                "lost": sum(op not in present for op in acked),
                "prefix": present == set(sent[: len(present)]),
                "in_flight_landed": bool(in_flight) and in_flight[0] in present,
                "unsynced_lost": lost_unsynced,
                "unsynced_kept": kept_unsynced,
                "dropped_calls": dropped,
                "mode": mode,
                "where": where,
            }
        )
    return reports


PROCEDURE = (
    "a Python VFS records every write since each file's last sync; power is cut after"
    " a random number of file operations (open, commit, checkpoint or close); unsynce"
    "d writes are dropped, kept in part, or kept up to a point; the file is reopened "
    "and checked"
)


def totals(reports: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("acked", "lost", "in_flight_landed", "unsynced_lost", "unsynced_kept")
    return {key: sum(int(report[key]) for report in reports) for key in keys} | {
        "cycles": len(reports),
        "cycles_losing_acked": sum(report["lost"] > 0 for report in reports),
    }


def test_full_durability_loses_no_acknowledged_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vfs: PowerLossVFS
) -> None:
    reports = run_cycles(tmp_path, monkeypatch, vfs, "full", cycles=CYCLES)
    summary = totals(reports)
    for report in reports:
        assert report["lost"] == 0, f"acknowledged writes lost: {report}; {summary}"
        assert report["prefix"], f"not a prefix: {report}; {summary}"
    assert summary["acked"] > 0 and summary["unsynced_lost"] > 0, f"harness idle: {summary}"
    print(f"power loss, full: {summary}")
    record_figures(
        "Power loss: durability 'full' loses nothing acknowledged",
        PROCEDURE,
        **summary,
        corruptions=0,
    )


def test_process_durability_keeps_a_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vfs: PowerLossVFS
) -> None:
    reports = run_cycles(tmp_path, monkeypatch, vfs, "process", cycles=CYCLES)
    summary = totals(reports)
    for report in reports:
        assert report["prefix"], f"present writes are not a prefix: {report}; {summary}"
    assert summary["acked"] > 0 and summary["unsynced_lost"] > 0, f"harness idle: {summary}"
    print(f"power loss, process: {summary}")
    record_figures(
        "Power loss: durability 'process' loses at most a suffix, never corrupts",
        PROCEDURE,
        **summary,
        non_prefix_cycles=0,
        corruptions=0,
    )


def test_control_synchronous_off_loses_acknowledged_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vfs: PowerLossVFS
) -> None:
    """The harness bites: with no syncs at all, acknowledged writes vanish at the cut."""
    reports = run_cycles(tmp_path, monkeypatch, vfs, "full", cycles=10, sync_off=True)
    summary = totals(reports)
    assert summary["cycles_losing_acked"] > 0, f"no acknowledged write ever lost: {summary}"
    print(f"power loss, control (synchronous=OFF): {summary}")
    record_figures("Power loss: the harness bites (control, synchronous=OFF)", PROCEDURE, **summary)
