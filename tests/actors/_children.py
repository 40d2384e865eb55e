"""Code that runs in the child processes of the runtime's process tests.

Importable by ``multiprocessing`` (spawn) as ``tests.actors._children``; it imports nothing
from the test modules. Each child runs its own trio loop, store handle and runtime.
"""

from __future__ import annotations

import os
import random
import traceback
from typing import Any

import anyio
import trio

import turnbuckle
from turnbuckle import ModelRequest, ModelResponse

#: How long a child waits for anything before it gives up (a hang, not a result).
WAIT_S = 60.0


def store_url(path: object) -> str:
    return "sqlite:///" + str(path)


def message_text(session_id: str, worker: int, number: int) -> str:
    """The text of a user message; the session id comes first so a model can tell whose
    conversation it is serving."""
    return f"{session_id}|w{worker}|m{number}"


def expected_texts(session_id: str, workers: int, per_session: int) -> list[str]:
    return [message_text(session_id, w, n) for w in range(workers) for n in range(per_session)]


# --- two runtimes on one file: exclusivity -------------------------------------------------


class MarkerModel:
    """A model that holds a per-session marker file, created with O_EXCL, for the length of
    each call: a second runtime inside the same session at the same time cannot create it, and
    records a violation instead."""

    def __init__(self, marker_dir: str, worker: int) -> None:
        self.marker_dir = marker_dir
        self.worker = worker
        self.violations: list[str] = []
        self.calls = 0
        self.rng = random.Random(worker)

    async def __call__(self, request: ModelRequest) -> ModelResponse:
        users = [m.text for m in request.messages if m.role == "user"]
        session_id = users[0].split("|")[0]
        marker = os.path.join(self.marker_dir, session_id)
        self.calls += 1
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            self.violations.append(f"w{self.worker} entered {session_id} while it was held")
            fd = None
        try:
            if fd is not None:
                os.write(fd, f"w{self.worker}".encode())
            # Hold the session a little, so an overlap would have a window to show up in.
            await anyio.sleep(self.rng.uniform(0, 0.01))
            return ModelResponse(text=f"w{self.worker} saw {len(users)} user messages")
        finally:
            if fd is not None:
                os.close(fd)
                os.unlink(marker)


async def _all_delivered(store: turnbuckle.Store, expected: dict[str, list[str]]) -> bool:
    for session_id, texts in expected.items():
        read = await store.sessions.bind(session_id).load()
        if read is None:
            return False
        seen = {n.payload["text"] for n in read.nodes if n.payload["role"] == "user"}  # type: ignore[index,call-overload]
        if not set(texts) <= seen:
            return False
    return True


async def _contend(
    path: str,
    worker: int,
    marker_dir: str,
    sessions: list[str],
    workers: int,
    per_session: int,
    barrier: Any,
) -> tuple[list[str], int]:
    model = MarkerModel(marker_dir, worker)
    rng = random.Random(1000 + worker)
    expected = {s: expected_texts(s, workers, per_session) for s in sessions}
    async with (
        turnbuckle.open_store(store_url(path)) as store,
        # A ttl far above any stall of a loaded machine, so leases never expire here: an
        # overlap would be a real exclusivity bug, not a slow renewal.
        turnbuckle.open_runtime(
            store, model=model, owner_id=f"worker-{worker}", lease_ttl_ms=3_000
        ) as runtime,
    ):
        await trio.to_thread.run_sync(barrier.wait, WAIT_S)
        for number in range(per_session):
            for session_id in rng.sample(sessions, len(sessions)):
                text = message_text(session_id, worker, number)
                await runtime.submit(session_id, text, source_key=text)
            await anyio.sleep(rng.uniform(0.01, 0.05))  # spread out: leases change hands
        # Stay until every message of both workers is delivered: leaving earlier would
        # cancel a turn this runtime may be running for the other worker's messages.
        with anyio.fail_after(WAIT_S):
            while True:
                if await _all_delivered(store, expected):
                    break
                await anyio.sleep(0.05)
    return model.violations, model.calls


def contend_worker(
    path: str,
    worker: int,
    marker_dir: str,
    sessions: list[str],
    workers: int,
    per_session: int,
    barrier: Any,
    results: Any,
) -> None:
    """One runtime process: submit ``per_session`` messages to each session, then wait until
    every worker's messages are delivered; report ("ok", worker, violations, model calls)."""
    try:
        violations, calls = trio.run(
            _contend, path, worker, marker_dir, sessions, workers, per_session, barrier
        )
    except BaseException:
        results.put(("crash", worker, traceback.format_exc(), 0))
        raise
    results.put(("ok", worker, violations, calls))


# --- a runtime killed inside a model call ----------------------------------------------------


async def _stall_in_model(path: str, session_id: str, text: str, ready: str, ttl_ms: int) -> None:
    parent = os.getppid()

    async def model(request: ModelRequest) -> ModelResponse:
        users = [m.text for m in request.messages if m.role == "user"]
        tmp = ready + ".tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
        os.write(fd, f"{session_id} {' '.join(users)}".encode())
        os.close(fd)
        os.replace(tmp, ready)  # the parent sees the whole line or nothing
        while True:  # stall, but never outlive the test
            if os.getppid() != parent:
                os._exit(3)
            await anyio.sleep(0.1)

    async with (
        turnbuckle.open_store(store_url(path)) as store,
        turnbuckle.open_runtime(
            store, model=model, owner_id="doomed", lease_ttl_ms=ttl_ms
        ) as runtime,
    ):
        await runtime.submit(session_id, text, source_key=text)
        await anyio.sleep_forever()


def stall_in_model(path: str, session_id: str, text: str, ready: str, ttl_ms: int) -> None:
    """A runtime whose model, once called, writes "<session> <user texts>" to ``ready`` and
    then stalls until the process is killed."""
    trio.run(_stall_in_model, path, session_id, text, ready, ttl_ms)
