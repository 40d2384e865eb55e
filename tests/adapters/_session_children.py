"""Code that runs in child processes (and threads) of the SQLite session tests.

Importable by ``multiprocessing`` (spawn) as ``<package>._session_children``; it imports nothing
from the test package itself.
"""

from __future__ import annotations

from typing import Any

import trio

import turnbuckle
from turnbuckle import (
    ClaimBoundary,
    GraphAppend,
    RuntimeCommit,
    SessionNode,
    TurnbuckleError,
)

#: How long any barrier wait may take before a child gives up (a hang, not a result).
WAIT_S = 60.0
#: Long enough that no lease or claim expires during a test.
TTL_MS = 60_000

#: (kind, session_id) rounds. Kinds:
#: - "cas-shared": both racers use one owner id, so both hold the same live lease fence (a
#:   re-entry), then commit with expected_head_revision=0 at once: only the head CAS decides.
#: - "cas-own": each racer claims the lease as itself and commits with release: the lease
#:   decides first, the CAS backs it up.
#: - "claim": each racer claims the lease, claims the session's one queued batch, and releases
#:   the lease: the claim stays live until the next grant, which voids it, so in the end only
#:   the last claim holds the batch.
Round = tuple[str, str]


def store_url(path: object) -> str:
    return "sqlite:///" + str(path)


def error_report(exc: BaseException) -> tuple[str, dict[str, Any], str]:
    """(class name, fields, repr) of an exception, safe to send between processes."""
    fields: dict[str, Any] = {}
    if isinstance(exc, TurnbuckleError):
        fields = {name: getattr(exc, name) for name in type(exc)._fields}
    return type(exc).__name__, fields, repr(exc)


async def _wait(barrier: Any) -> None:
    await trio.to_thread.run_sync(barrier.wait, WAIT_S)


async def _round(
    store: turnbuckle.Store, kind: str, session_id: str, worker: int, barrier: Any
) -> tuple[str, Any]:
    sessions = store.sessions
    owner = "shared-owner" if kind == "cas-shared" else f"owner-{worker}"
    lease = await sessions.try_claim_lease(session_id, owner, TTL_MS)
    if kind == "cas-shared":
        await _wait(barrier)  # both now hold the same live fence
    if lease is None:
        return "busy", None
    fence = lease.fence()
    if kind == "claim":
        try:
            claim = await sessions.claim_queued_work(
                session_id, fence, owner, ClaimBoundary.IDLE, TTL_MS, 10
            )
        finally:
            await sessions.release_lease(fence)
        return "claimed", claim
    node = SessionNode(node_id=f"n-{worker}", payload={"worker": worker})
    commit = RuntimeCommit(
        session_id=session_id,
        expected_head_revision=0,
        lease=fence,
        release=fence if kind == "cas-own" else None,
        graph=GraphAppend(nodes=(node,)),
    )
    result = await sessions.bind(session_id).commit(commit)
    return "committed", result.head_revision


async def _race(path: str, worker: int, barrier: Any, results: Any, rounds: list[Round]) -> None:
    async with turnbuckle.open_store(store_url(path)) as store:
        for round_no, (kind, session_id) in enumerate(rounds):
            await _wait(barrier)
            try:
                status, value = await _round(store, kind, session_id, worker, barrier)
            except TurnbuckleError as exc:
                results.put(("error", round_no, worker, error_report(exc)))
            else:
                results.put((status, round_no, worker, value))


def race_worker(path: str, worker: int, barrier: Any, results: Any, rounds: list[Round]) -> None:
    """One racer (a process, or a thread with its own store handle): for each round, wait at
    the barrier, play the round, and put ``(status, round_no, worker, value)`` on ``results``."""
    try:
        trio.run(_race, path, worker, barrier, results, rounds)
    except BaseException as exc:
        results.put(("crash", -1, worker, error_report(exc)))
        raise
