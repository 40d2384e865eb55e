"""The runtime across processes, on one SQLite file.

- Two runtimes in two processes serve the same sessions at once: a session's lease lets only
  one of them run it at a time (checked with an O_EXCL marker file held through every model
  call), and every message is delivered exactly once.
- A runtime killed (SIGKILL) inside a model call loses nothing: a new runtime started with
  ``resume=True`` delivers the message once the dead runtime's lease has expired.

Children are spawned (no connection crosses a fork) and run module-level code from
``_children``; events are ordered by files and barriers, never by sleeps.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import trio

import turnbuckle
from turnbuckle.testing import ScriptedModel, say

from ..reliability._shared import reap
from ._children import WAIT_S, contend_worker, expected_texts, stall_in_model, store_url

SESSIONS = ["s0", "s1", "s2"]
WORKERS = 2
PER_SESSION = 10
#: The killed runtime's lease ttl: the new runtime waits this long at most.
DOOMED_TTL_MS = 600


async def create_store(path: Path) -> None:
    async with turnbuckle.open_store(store_url(path)):
        pass


async def user_messages(path: Path) -> dict[str, list[str]]:
    """Every session's user messages in graph order; checks that the queues are empty."""
    found: dict[str, list[str]] = {}
    async with turnbuckle.open_store(store_url(path)) as store:
        for session_id in SESSIONS:
            assert await store.sessions.list_queued_work(session_id) == [], session_id
            read = await store.sessions.bind(session_id).load()
            assert read is not None, f"{session_id} was never committed"
            found[session_id] = [
                n.payload["text"]  # type: ignore[index,call-overload]
                for n in read.nodes
                if n.payload["role"] == "user"  # type: ignore[index,call-overload]
            ]
    return found


def test_two_runtime_processes_share_sessions_exclusively(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    markers = tmp_path / "markers"
    markers.mkdir()
    trio.run(create_store, path)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=contend_worker,
            args=(str(path), w, str(markers), SESSIONS, WORKERS, PER_SESSION, barrier, results),
        )
        for w in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    reports: list[tuple[Any, ...]] = []
    try:
        for _ in range(WORKERS):
            try:
                reports.append(results.get(timeout=WAIT_S))
            except queue.Empty:
                codes = [proc.exitcode for proc in procs]
                raise AssertionError(f"a worker never reported; exit codes {codes}") from None
    finally:
        reap(procs, results)
    crashes = [r for r in reports if r[0] != "ok"]
    assert not crashes, "a worker crashed:\n" + "\n".join(r[2] for r in crashes)
    assert [proc.exitcode for proc in procs] == [0] * WORKERS
    violations = [v for r in reports for v in r[2]]
    assert violations == [], f"two runtimes ran one session at once: {violations}"
    assert sum(r[3] for r in reports) > 0
    delivered = trio.run(user_messages, path)
    for session_id in SESSIONS:
        counts = Counter(delivered[session_id])
        want = expected_texts(session_id, WORKERS, PER_SESSION)
        assert counts == Counter(want), (
            f"{session_id}: lost {sorted(set(want) - set(counts))}, "
            f"duplicated {sorted(t for t, n in counts.items() if n > 1)}"
        )
    assert not any(markers.iterdir())


async def resume_after_kill(path: Path) -> None:
    model = ScriptedModel(say("answered after the crash"))
    async with turnbuckle.open_store(store_url(path)) as store:
        sessions = store.sessions
        assert len(await sessions.list_queued_work("s")) == 1
        # Is the dead runtime's lease still live? (Almost always: it was renewed moments ago.)
        probe = await sessions.try_claim_lease("s", "probe", 30)
        dead_lease_was_live = probe is None
        if probe is not None:  # a very slow machine: it expired already
            await sessions.release_lease(probe.fence())
        async with turnbuckle.open_runtime(
            store, model=model, lease_ttl_ms=DOOMED_TTL_MS, resume=True
        ) as runtime:
            with anyio.fail_after(10):
                while True:
                    if not await sessions.list_queued_work("s"):
                        break
                    await anyio.sleep(0.02)
                await runtime.wait_idle()
        read = await sessions.bind("s").load()
        assert read is not None
        nodes = [(n.payload["role"], n.payload["text"]) for n in read.nodes]  # type: ignore[index,call-overload]
        assert nodes == [("user", "m1"), ("assistant", "answered after the crash")]
        assert read.head_revision == 1
        assert model.calls == 1
        # Grants so far: the dead runtime (1), the probe if it got one, then the new runtime:
        # the new runtime could take the lease only after the dead one's grant ended.
        final = await sessions.try_claim_lease("s", "checker", 60_000)
        assert final is not None
        assert final.fencing_token >= (3 if dead_lease_was_live else 4)


def test_a_killed_runtime_s_message_is_delivered_once_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "killed.db"
    ready = tmp_path / "in-model"
    trio.run(create_store, path)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=stall_in_model, args=(str(path), "s", "m1", str(ready), DOOMED_TTL_MS)
    )
    proc.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not ready.exists():
            assert proc.is_alive(), f"the child ended early with exit code {proc.exitcode}"
            assert time.monotonic() < deadline, "the child never reached its model call"
            time.sleep(0.01)
        assert ready.read_text() == "s m1"
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(WAIT_S)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == -signal.SIGKILL
    trio.run(resume_after_kill, path)
