"""Code that runs in the child processes of the runtime's chaos tests.

Importable by ``multiprocessing`` (spawn) as ``tests.actors._chaos_children``; it imports nothing
from the test modules. Each child is one runtime: its own event loop (trio or asyncio), store
handle and ``open_runtime`` on the shared SQLite file, until the parent creates the stop file
(or kills it with SIGKILL).

A child reports through files only, one file per fact, written whole (a temporary file renamed
into place): a process killed with SIGKILL can leave a ``multiprocessing`` queue or lock
half-used, and a file written whole is there or not, never torn. The folder a child reports to:

- ``ready/<pid>``: the runtime is open and serving.
- ``violations/<pid>-<n>``: a breach the child saw (two runtimes inside one session's model
  call, or the user messages of a model request out of enqueue order).
- ``stale/<pid>-<n>``: a model-call marker left by a killed runtime, taken over.
- ``failures/<pid>-<n>``: an event the runtime published at ERROR severity.
- ``done/<pid>``: the child stopped cleanly; JSON with its counts.
- ``errors/<pid>``: the child crashed; the traceback.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import traceback
from collections import Counter

import anyio

import turnbuckle
from turnbuckle import ModelRequest, ModelResponse, Runtime

#: How often a child looks for the parent's stop file.
POLL_S = 0.05


def store_url(path: object) -> str:
    return "sqlite:///" + str(path)


def message_text(session_id: str, number: int) -> str:
    """A user message: its session, then its place in the session's enqueue order."""
    return f"{session_id}|{number}"


def answer_text(session_id: str, through: int) -> str:
    """What the model answers when the last user message it saw was number ``through``."""
    return f"{session_id} through {through}"


def parse_answer(text: str) -> tuple[str, int]:
    session_id, _, through = text.partition(" through ")
    return session_id, int(through)


class Reporter:
    """Writes one file per fact under a folder, each whole (see the module docstring)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.pid = os.getpid()
        self._numbers = itertools.count()

    def write(self, kind: str, text: str, *, name: str | None = None) -> None:
        name = name or f"{self.pid}-{next(self._numbers)}"
        target = os.path.join(self.folder, kind, name)
        tmp = os.path.join(self.folder, kind, f".{name}.tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, target)


def stop_requested(folder: str) -> bool:
    """The parent's signal to stop: a file (a stat: no event loop is held up by it)."""
    return os.path.exists(os.path.join(folder, "stop"))


def pid_alive(pid: int) -> bool:
    """True unless no process has that pid (the parent reaps every child it kills at once,
    so a killed runtime's pid is gone, not a zombie, long before its lease runs out)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MarkerModel:
    """A model that holds a per-session marker file for the length of each call.

    The marker holds the caller's pid and is created atomically with its content (a link of
    a file written beforehand, which fails if the marker exists). A marker found in place is
    moved aside (an atomic rename, so two callers never both take the same one) and read:

    - its pid is dead: a runtime killed inside a model call left it; it is stale, counted, and
      the call takes the marker;
    - its pid is alive: another runtime (or this one) is inside the same session's model call
      right now: a violation.

    The model also checks the request's user messages: they must be the session's messages
    0, 1, 2, ... in enqueue order (a claim takes a prefix of the queue, in order).
    """

    def __init__(self, marker_dir: str, reporter: Reporter, seed: int) -> None:
        self.marker_dir = marker_dir
        self.reporter = reporter
        self.pid = os.getpid()
        self.rng = random.Random(seed)
        self.calls = 0
        self.stale = 0
        self.violations = 0

    def _violation(self, text: str) -> None:
        self.violations += 1
        self.reporter.write("violations", f"pid {self.pid}: {text}")

    def _enter(self, session_id: str) -> bool:
        """Take the session's marker; False if a live holder has it (a violation)."""
        marker = os.path.join(self.marker_dir, session_id)
        mine = os.path.join(self.marker_dir, f".{session_id}.{self.pid}.mine")
        aside = os.path.join(self.marker_dir, f".{session_id}.{self.pid}.aside")
        with open(mine, "w", encoding="ascii") as out:
            out.write(str(self.pid))
        try:
            while True:
                try:
                    os.link(mine, marker)
                    return True
                except FileExistsError:
                    pass
                try:
                    os.rename(marker, aside)
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                with open(aside, encoding="ascii") as found:
                    holder = int(found.read())
                if pid_alive(holder):
                    os.unlink(aside)
                    self._violation(f"entered {session_id} while pid {holder} was inside it")
                    return False
                os.unlink(aside)
                self.stale += 1
                self.reporter.write("stale", f"{session_id} {holder}")
        finally:
            os.unlink(mine)

    def _leave(self, session_id: str) -> None:
        marker = os.path.join(self.marker_dir, session_id)
        try:
            with open(marker, encoding="ascii") as found:
                holder = int(found.read())
            if holder != self.pid:
                self._violation(f"left {session_id} but its marker was pid {holder}'s")
                return
            os.unlink(marker)
        except FileNotFoundError:
            self._violation(f"left {session_id} but its marker was gone")

    async def __call__(self, request: ModelRequest) -> ModelResponse:
        texts = [m.text for m in request.messages if m.role == "user"]
        session_id = texts[0].split("|")[0]
        numbers = [int(t.split("|")[1]) for t in texts]
        self.calls += 1
        if numbers != list(range(len(numbers))) or any(
            not t.startswith(session_id + "|") for t in texts
        ):
            self._violation(f"model request of {session_id} out of order: {texts}")
        held = self._enter(session_id)
        try:
            # Stay inside a while, so an overlap has a window to show up in (and a kill has a
            # good chance of landing inside a model call).
            await anyio.sleep(self.rng.uniform(0.01, 0.05))
            return ModelResponse(text=answer_text(session_id, numbers[-1]))
        finally:
            if held:
                self._leave(session_id)


#: Events that mean something failed (published at ERROR severity).
FAILURES = frozenset({"turn_failed", "work_parked", "session_error"})


async def _watch(runtime: Runtime, reporter: Reporter, counts: Counter[str]) -> None:
    async with runtime.events(since=0) as stream:
        async for event in stream:
            counts[event.type] += 1
            if event.type in FAILURES:
                reporter.write(
                    "failures", json.dumps({"type": event.type, "data": event.data}, default=str)
                )


async def _serve(path: str, folder: str, ttl_ms: int, seed: int) -> None:
    reporter = Reporter(folder)
    parent = os.getppid()
    model = MarkerModel(os.path.join(folder, "markers"), reporter, seed)
    counts: Counter[str] = Counter()
    async with (
        turnbuckle.open_store(store_url(path)) as store,
        # Messages come from another process (the parent): a runtime finds them by its sweep,
        # here every third of a lease.
        turnbuckle.open_runtime(
            store,
            model=model,
            owner_id=f"chaos-{os.getpid()}",
            lease_ttl_ms=ttl_ms,
            sweep_interval=ttl_ms / 3000,
        ) as runtime,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_watch, runtime, reporter, counts)
        reporter.write("ready", "", name=str(reporter.pid))
        while not stop_requested(folder):
            if os.getppid() != parent:  # the test is gone: never outlive it
                os._exit(3)
            await anyio.sleep(POLL_S)
        tg.cancel_scope.cancel()
    figures = {
        "calls": model.calls,
        "stale": model.stale,
        "violations": model.violations,
        "events": dict(counts),
    }
    reporter.write("done", json.dumps(figures), name=str(reporter.pid))


def serve(path: str, folder: str, backend: str, ttl_ms: int, seed: int) -> None:
    """One runtime process on the shared file, under ``backend`` ("trio" or "asyncio"),
    until ``<folder>/stop`` exists; reports through files under ``folder``."""
    try:
        anyio.run(_serve, path, folder, ttl_ms, seed, backend=backend)
    except BaseException:
        Reporter(folder).write("errors", traceback.format_exc(), name=str(os.getpid()))
        raise
