"""Code that runs in child processes of the SQLite execution tests.

Importable by ``multiprocessing`` (spawn) as ``<package>._execution_children``; it imports
nothing from the test package itself.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import trio

import turnbuckle
from turnbuckle.errors import (
    ExecutionTerminal,
    LeaseConflict,
    LeaseExpired,
    TurnbuckleError,
)
from turnbuckle.sansio.execution import ExecutionState, Handle

LANE = "jobs"
#: The lease every claim and reclaim asks for.
TTL_MS = 300
#: A stalled worker sleeps this long between its work and its completion: past its lease.
STALL_S = 0.5
#: A worker runs (holds its marker) only with at least this much of its lease left.
MARGIN_MS = 150
#: A worker gives up (and reports it) after this long: a hang, not a result.
GIVE_UP_S = 60.0

_STALE = (LeaseConflict, LeaseExpired, ExecutionTerminal)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _Worker:
    def __init__(
        self,
        store: turnbuckle.Store,
        worker_id: str,
        index: int,
        ids: list[str],
        marker_dir: str,
        seed: int,
    ) -> None:
        self.ex = store.executions
        self.worker_id = worker_id
        self.index = index
        self.ids = ids
        self.marker_dir = marker_dir
        self.rng = random.Random(seed)
        self.runs = 0
        self.report: dict[str, list[Any]] = {
            "violations": [],  # two live leases running one execution at once
            "overruns": [],  # a marker found after its holder's lease ran out (timing)
            "stale": [],  # (execution_id, epoch, error class) a refused stale handle
            "completed": [],  # (execution_id, epoch)
            "stalls": [],  # (execution_id, epoch, outcome of the complete after the stall)
            "reclaims": [],  # (execution_id, epoch)
            "timeouts": [],
        }

    # --- finding work ---

    async def next_handle(self) -> tuple[Handle, int] | str:
        """(handle, lease deadline in wall ms), "idle" when nothing is ready now, or "done"
        when every execution has ended."""
        # Now and then look for expired leases first, not only when the lane is empty.
        if self.rng.random() >= 0.3:
            asked = _wall_ms()
            handle = await self.ex.claim(LANE, [], self.worker_id, TTL_MS)
            if handle is not None:
                return handle, asked + TTL_MS
        all_done = True
        for execution_id in self.ids:
            info = await self.ex.describe(execution_id)
            if info.state.is_terminal:
                continue
            all_done = False
            if (
                info.state is ExecutionState.ACTIVE
                and info.lease_expires_at_ms is not None
                and info.lease_expires_at_ms <= _wall_ms()
            ):
                asked = _wall_ms()
                got = await self.ex.reclaim(execution_id, self.worker_id, TTL_MS)
                if got is not None:
                    self.report["reclaims"].append((execution_id, got.lease_epoch))
                    return got, asked + TTL_MS
        if all_done:
            return "done"
        asked = _wall_ms()
        handle = await self.ex.claim(LANE, [], self.worker_id, TTL_MS)
        return "idle" if handle is None else (handle, asked + TTL_MS)

    # --- running ---

    def _marker(self, execution_id: str) -> str:
        return os.path.join(self.marker_dir, execution_id.replace(":", "_") + ".running")

    def _enter(self, handle: Handle, deadline_ms: int) -> int | None:
        """Create the marker (O_EXCL); its descriptor, or None if another holder has it."""
        path = self._marker(handle.execution_id)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            seen = _wall_ms()
            holder = self._read_marker(path)
            entry = (handle.execution_id, handle.lease_epoch, self.worker_id, holder, seen)
            # The holder's deadline is a lower bound of its lease's expiry, and this lease was
            # granted only after the holder's expired (or never, for a fresh claim): a holder
            # still inside its deadline means two live leases at once.
            if holder is None or int(holder.split()[2]) > seen:
                self.report["violations"].append(entry)
            else:
                self.report["overruns"].append(entry)
            return None
        os.write(fd, f"{self.worker_id} {handle.lease_epoch} {deadline_ms}".encode())
        return fd

    @staticmethod
    def _read_marker(path: str) -> str | None:
        # Its creator writes it right after the O_EXCL create: wait out that instant.
        for _ in range(20):
            try:
                with open(path) as f:
                    text = f.read()
            except FileNotFoundError:
                return None
            if len(text.split()) == 3:
                return text
            time.sleep(0.005)
        return None

    async def run(self, handle: Handle, deadline_ms: int) -> None:
        self.runs += 1
        stall = self.runs == self.index + 1 or self.rng.random() < 0.1
        if deadline_ms - _wall_ms() < MARGIN_MS:
            asked = _wall_ms()
            try:
                await self.ex.renew(handle)
            except _STALE as exc:
                self.report["stale"].append(
                    (handle.execution_id, handle.lease_epoch, type(exc).__name__)
                )
                return
            deadline_ms = asked + TTL_MS
        fd = self._enter(handle, deadline_ms)
        if fd is not None:
            try:
                await trio.sleep(self.rng.uniform(0.03, 0.1))
            finally:
                os.close(fd)
                os.unlink(self._marker(handle.execution_id))
        if stall:
            await trio.sleep(STALL_S)
        try:
            await self.ex.complete(handle, {"by": self.worker_id, "epoch": handle.lease_epoch})
        except _STALE as exc:
            outcome = type(exc).__name__
            self.report["stale"].append((handle.execution_id, handle.lease_epoch, outcome))
        else:
            outcome = "completed"
            self.report["completed"].append((handle.execution_id, handle.lease_epoch))
        if stall:
            self.report["stalls"].append((handle.execution_id, handle.lease_epoch, outcome))

    async def main(self) -> None:
        give_up = trio.current_time() + GIVE_UP_S
        while trio.current_time() < give_up:
            got = await self.next_handle()
            if got == "done":
                return
            if isinstance(got, str):
                await trio.sleep(0.01)
                continue
            await self.run(*got)
        self.report["timeouts"].append(self.worker_id)


async def _work(
    path: str, worker_id: str, index: int, ids: list[str], marker_dir: str, seed: int
) -> dict[str, list[Any]]:
    async with turnbuckle.open_store("sqlite:///" + path) as store:
        worker = _Worker(store, worker_id, index, ids, marker_dir, seed)
        await worker.main()
        return worker.report


def execution_worker(
    path: str,
    worker_id: str,
    index: int,
    ids: list[str],
    marker_dir: str,
    seed: int,
    start: Any,
    results: Any,
) -> None:
    """One worker process: wait at the ``start`` barrier, then claim, run and complete executions of
    ``LANE`` (reclaiming expired ones among ``ids``) until all have ended; put
    ``(worker_id, report)`` (or ``(worker_id, ("crash", repr))``) on ``results``."""
    try:
        start.wait()
        report = trio.run(_work, path, worker_id, index, ids, marker_dir, seed)
    except BaseException as exc:
        detail = repr(exc)
        if isinstance(exc, TurnbuckleError):
            detail = f"{type(exc).__name__}: {exc}"
        results.put((worker_id, ("crash", detail)))
        raise
    results.put((worker_id, report))
