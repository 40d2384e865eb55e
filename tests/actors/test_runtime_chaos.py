"""The runtime's "done when" checks, with real processes, kill -9 and a foreign write lock.

- Chaos: three runtime processes (spawned, each its own event loop, store handle and runtime
  on one SQLite file) serve ten sessions while the parent submits messages to random sessions
  and kills a random runtime with SIGKILL every 0.3-1 s, starting a replacement each time.
  After the kills stop, the queues drain, and the store shows every acknowledged message
  answered exactly once, in enqueue order, with its durable outcome (also read through
  ``Runtime.outcome`` in a fresh runtime); no two runtimes were ever inside one session's model
  call at once (a per-session marker file holding the caller's pid; a killed runtime's marker
  is stale, not a violation). Once with the children under trio, once under asyncio.
- A write lock held by another connection for several lease periods, taken while a turn's
  model call waits, or as the turn's commit goes to the store: the runtime retries
  (``store_retry`` events), its lease runs out (the waiting turn is cancelled; the retried
  commit is refused), and it redoes the turn under a new grant once the lock is gone; every
  message (one queued before the lock, one submitted during it, retried by the client) is
  answered exactly once, in order, committed under a live lease, and nothing is stranded or
  parked. Under trio and asyncio.

The runtimes learn of work submitted by another process by looking for it: SQLite has no
cross-process wake-up, so a runtime sweeps for sessions with work (here every third of a lease).

Children are spawned (no connection crosses a fork) and report through files (see
``_chaos_children``); nothing is ordered by a sleep: the sleeps here pace the chaos, and
every wait is bounded so a hang fails instead of blocking.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import multiprocessing.process
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import apsw
import attrs
import pytest
import trio

import turnbuckle
from turnbuckle import (
    DeliveryPolicy,
    MergeKey,
    ModelRequest,
    ModelResponse,
    QueuedWorkDraft,
    RuntimeEvent,
    SessionRead,
    SlotPolicy,
    StoreBusyError,
    SubmitStatus,
    Ticket,
    WorkState,
)

from ..figures import record
from ._chaos_children import answer_text, message_text, parse_answer, serve, store_url

#: How long anything may take before it counts as a hang.
WAIT_S = 60.0

# --- chaos -------------------------------------------------------------------------------------

PROCESSES = 3
SESSIONS = [f"s{n}" for n in range(10)]
#: Far above any stall of a loaded 2-core machine: a runtime that is alive never loses its
#: lease here, so an overlap is an exclusivity bug, not a slow renewal.
CHAOS_TTL_MS = 1_500
#: How long the parent submits and kills.
CHAOS_S = 30.0 if os.environ.get("TURNBUCKLE_SOAK") == "1" else 3.0
KILL_EVERY_S = (0.3, 1.0)
SUBMIT_EVERY_S = (0.01, 0.04)
#: The queues must be empty this soon after the kills stop: a killed runtime's sessions wait
#: out its lease (one ttl), a replacement starts, and the backlog is a turn or two per session.
DRAIN_LIMIT_S = 6 * CHAOS_TTL_MS / 1000
REPORT_DIRS = ("markers", "ready", "violations", "stale", "failures", "done", "errors")


@attrs.define
class Acked:
    """A message whose submit returned its ticket, in acknowledgement order per session."""

    text: str
    ticket: Ticket


@attrs.define
class Chaos:
    """The parent's side of the chaos: the runtime processes and what was acknowledged."""

    path: Path
    folder: Path
    backend: str
    rng: random.Random
    ctx: Any = attrs.field(factory=lambda: multiprocessing.get_context("spawn"))
    live: list[multiprocessing.process.BaseProcess] = attrs.Factory(list)
    everyone: list[multiprocessing.process.BaseProcess] = attrs.Factory(list)
    acked: dict[str, list[Acked]] = attrs.Factory(lambda: {s: [] for s in SESSIONS})
    kills: int = 0

    def start_one(self) -> None:
        proc = self.ctx.Process(
            target=serve,
            args=(
                str(self.path),
                str(self.folder),
                self.backend,
                CHAOS_TTL_MS,
                self.rng.randrange(2**32),
            ),
            name=f"chaos-runtime-{len(self.everyone)}",
        )
        proc.start()
        self.live.append(proc)
        self.everyone.append(proc)

    def serving(self) -> list[multiprocessing.process.BaseProcess]:
        ready = self.folder / "ready"
        return [p for p in self.live if (ready / str(p.pid)).exists()]

    def check_no_crash(self) -> None:
        errors = sorted((self.folder / "errors").iterdir())
        assert not errors, "a runtime crashed:\n" + "\n".join(e.read_text() for e in errors)
        dead = [(p.name, p.exitcode) for p in self.live if not p.is_alive()]
        assert not dead, f"a runtime exited by itself: {dead}"

    def kill_one(self) -> None:
        """SIGKILL a random serving runtime, reap it at once (its pid must be gone, not a
        zombie, before anyone judges its marker), and start a replacement."""
        victim = self.rng.choice(self.serving())
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(WAIT_S)
        assert victim.exitcode == -signal.SIGKILL, f"{victim.name} ended with {victim.exitcode}"
        self.live.remove(victim)
        self.kills += 1
        self.start_one()

    def wait_serving(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while len(self.serving()) < count:
            self.check_no_crash()
            assert time.monotonic() < deadline, f"fewer than {count} runtimes became ready"
            time.sleep(0.01)

    def stop_all(self) -> None:
        (self.folder / "stop").touch()
        for proc in self.everyone:
            proc.join(WAIT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()

    async def submit(self, store: turnbuckle.Store, session_id: str) -> None:
        """Enqueue the session's next message; acknowledged once the store returned its ticket.

        The parent enqueues through the store (what ``Runtime.submit`` does, without waking a
        local actor): a runtime in the parent would serve the sessions itself, never killed."""
        acked = self.acked[session_id]
        text = message_text(session_id, len(acked))
        ticket = await store.sessions.submit(
            QueuedWorkDraft(
                session_id=session_id,
                delivery=DeliveryPolicy.EARLIEST_SAFE_BOUNDARY,
                slot=SlotPolicy.JOIN,
                merge_key=MergeKey.PAYLOAD_DEFAULT,
                payloads=[{"role": "user", "text": text}],
                source_key=f"chaos:{text}",
            )
        )
        assert ticket.status is SubmitStatus.NEW, ticket
        acked.append(Acked(text=text, ticket=ticket))

    async def submit_until(self, store: turnbuckle.Store, end: float) -> None:
        while time.monotonic() < end:
            await self.submit(store, self.rng.choice(SESSIONS))
            await trio.sleep(self.rng.uniform(*SUBMIT_EVERY_S))

    async def kill_until(self, end: float) -> None:
        """Kill a runtime every KILL_EVERY_S, the last one at ``end`` (so the drain starts
        with a dead runtime's leases to wait out)."""
        while True:
            left = end - time.monotonic()
            await trio.sleep(min(self.rng.uniform(*KILL_EVERY_S), max(left, 0)))
            await trio.to_thread.run_sync(self.check_no_crash)
            await trio.to_thread.run_sync(self.wait_serving, 1)
            await trio.to_thread.run_sync(self.kill_one)
            if time.monotonic() >= end:
                return

    async def drained(self, store: turnbuckle.Store) -> bool:
        for session_id in SESSIONS:
            if await store.sessions.list_queued_work(session_id):
                return False
        return True

    async def run(self) -> float:
        """Start the runtimes, submit and kill for CHAOS_S, then wait for the queues to drain;
        returns how long the drain took (seconds after the last kill)."""
        async with turnbuckle.open_store(store_url(self.path)) as store:
            for _ in range(PROCESSES):
                self.start_one()
            await trio.to_thread.run_sync(self.wait_serving, PROCESSES)
            end = time.monotonic() + CHAOS_S
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.submit_until, store, end)
                nursery.start_soon(self.kill_until, end)
            stopped = time.monotonic()
            with trio.move_on_after(DRAIN_LIMIT_S):
                while not await self.drained(store):
                    await trio.to_thread.run_sync(self.check_no_crash)
                    await trio.sleep(0.02)
            drain_s = time.monotonic() - stopped
            if not await self.drained(store):
                left = {s: len(await store.sessions.list_queued_work(s)) for s in SESSIONS}
                raise AssertionError(
                    f"queues not drained {DRAIN_LIMIT_S} s after the kills stopped: {left};"
                    f" failures: {self.reports('failures')};"
                    f" violations: {self.reports('violations')}"
                )
            return drain_s

    def reports(self, kind: str) -> list[str]:
        return [f.read_text() for f in sorted((self.folder / kind).iterdir())]


def conversation(read: SessionRead) -> list[tuple[str, str]]:
    """A session's messages in graph order, as (role, text)."""
    found = []
    for node in read.nodes:
        payload = node.payload
        assert isinstance(payload, dict), payload
        role, text = payload["role"], payload["text"]
        assert isinstance(role, str) and isinstance(text, str), payload
        found.append((role, text))
    return found


async def check_store(chaos: Chaos) -> dict[str, int]:
    """Every acknowledged message answered exactly once, in order, with its outcome: from the
    graph, the queue status, and ``Runtime.outcome`` in a fresh runtime (so after a restart,
    from another process than the ones that ran the turns)."""
    model_calls: list[ModelRequest] = []

    async def no_model(request: ModelRequest) -> ModelResponse:
        model_calls.append(request)
        return ModelResponse(text="a turn the checker should never run")

    turns = 0
    async with turnbuckle.open_store(store_url(chaos.path)) as store:
        sessions = store.sessions
        assert await sessions.list_parked_queued_work() == []
        async with turnbuckle.open_runtime(store, model=no_model) as runtime:
            for session_id in SESSIONS:
                acked = chaos.acked[session_id]
                assert await sessions.list_queued_work(session_id) == [], session_id
                read = await sessions.bind(session_id).load()
                texts = [] if read is None else [t for r, t in conversation(read) if r == "user"]
                want = [a.text for a in acked]
                counts = Counter(texts)
                lost = [t for t in want if t not in counts]
                duplicated = [t for t, n in counts.items() if n > 1]
                foreign = [t for t in counts if t not in want]
                assert not lost, f"{session_id}: acknowledged but never answered: {lost}"
                assert not duplicated, f"{session_id}: answered twice: {duplicated}"
                assert not foreign, f"{session_id}: never acknowledged: {foreign}"
                assert texts == want, f"{session_id}: out of enqueue order: {texts}"
                # Each message's durable answer is its turn's: the turn's last model call saw
                # every message the turn delivered, so all of them share its answer.
                by_turn: dict[str | None, list[int]] = {}
                answers: dict[str | None, set[str]] = {}
                for number, message in enumerate(acked):
                    status = await sessions.queued_work_status(session_id, message.ticket.batch_id)
                    assert status is not None, message
                    assert status.state is WorkState.DELIVERED, (message, status)
                    assert status.outcome is not None, (message, status)
                    with anyio.fail_after(WAIT_S):
                        reply = await runtime.outcome(message.ticket)
                    assert reply.turn_id == status.turn_id is not None, (message, reply, status)
                    assert reply.head_revision == status.head_revision, (reply, status)
                    answered, through = parse_answer(reply.text)
                    assert answered == session_id and through >= number, (message, reply)
                    by_turn.setdefault(reply.turn_id, []).append(number)
                    answers.setdefault(reply.turn_id, set()).add(reply.text)
                for turn_id, numbers in by_turn.items():
                    # A turn delivers a run of consecutive messages, and answers them all at once.
                    assert numbers == list(range(numbers[0], numbers[-1] + 1)), numbers
                    assert answers[turn_id] == {answer_text(session_id, numbers[-1])}, (
                        turn_id,
                        numbers,
                        answers[turn_id],
                    )
                turns += len(by_turn)
        assert model_calls == [], "the checking runtime ran a turn: something was left"
    return {"turns": turns}


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_chaos_kill9_runtimes_lose_nothing_and_never_overlap(tmp_path: Path, backend: str) -> None:
    folder = tmp_path / "reports"
    for kind in REPORT_DIRS:
        (folder / kind).mkdir(parents=True)
    path = tmp_path / "chaos.db"
    chaos = Chaos(path=path, folder=folder, backend=backend, rng=random.Random(f"chaos-{backend}"))
    try:
        drain_s = trio.run(chaos.run)
        chaos.check_no_crash()
    finally:
        chaos.stop_all()
    survivors = [p for p in chaos.everyone if p.exitcode != -signal.SIGKILL]
    assert [p.exitcode for p in survivors] == [0] * PROCESSES, [p.exitcode for p in survivors]
    done = [json.loads(text) for text in chaos.reports("done")]
    assert len(done) == PROCESSES
    assert chaos.reports("errors") == []
    # No two runtimes inside one session's model call at once, and every request in order.
    assert chaos.reports("violations") == []
    # Nothing failed for good: the kills make leases run out and claims void, never a failure.
    assert chaos.reports("failures") == []
    # Markers left now are a killed runtime's (it died inside the model call), never a live one's.
    dead = {p.pid for p in chaos.everyone if p.exitcode == -signal.SIGKILL}
    for marker in (folder / "markers").iterdir():
        if not marker.name.startswith("."):
            assert int(marker.read_text()) in dead, marker
    figures = trio.run(check_store, chaos)

    acknowledged = sum(len(a) for a in chaos.acked.values())
    assert chaos.kills >= 2, chaos.kills
    assert acknowledged > 0
    record(
        f"Runtime chaos: kill -9 of runtime processes ({backend})",
        f"{PROCESSES} runtime processes on one SQLite file serve {len(SESSIONS)} sessions while"
        " the parent submits to random sessions and kill -9s a random runtime every"
        f" {KILL_EVERY_S[0]}-{KILL_EVERY_S[1]} s for {CHAOS_S} s, starting a replacement each"
        f" time (lease ttl {CHAOS_TTL_MS} ms); then the queues drain and the store is checked:"
        " each acknowledged message answered once, in enqueue order, its outcome readable from"
        " a fresh runtime; a pid-stamped marker file per session catches overlapping model calls",
        processes=PROCESSES,
        sessions=len(SESSIONS),
        messages_acknowledged=acknowledged,
        kills=chaos.kills,
        turns_committed=figures["turns"],
        stale_markers_of_killed_runtimes=len(chaos.reports("stale")),
        overlaps=0,
        lost=0,
        duplicated=0,
        out_of_order=0,
        drain_s=round(drain_s, 2),
    )


# --- a write lock held by another connection ---------------------------------------------------

LOCK_TTL_MS = 400
#: The foreign lock is held at least this long: several lease periods.
LOCK_HOLD_S = 1.5
BUSY_TIMEOUT_S = 0.2


@attrs.define
class ModelCall:
    users: list[str]
    cancelled: bool = False
    answered: bool = False


@attrs.define
class GatedModel:
    """A model whose calls wait until the test opens the gate."""

    gate: anyio.Event = attrs.Factory(anyio.Event)
    calls: list[ModelCall] = attrs.Factory(list)
    entered: anyio.Event = attrs.Factory(anyio.Event)

    async def __call__(self, request: ModelRequest) -> ModelResponse:
        call = ModelCall(users=[m.text for m in request.messages if m.role == "user"])
        self.calls.append(call)
        self.entered.set()
        try:
            await self.gate.wait()
        except anyio.get_cancelled_exc_class():
            call.cancelled = True
            raise
        call.answered = True
        return ModelResponse(text=f"answered {' '.join(call.users)}")

    async def wait_calls(self, count: int) -> None:
        while len(self.calls) < count:
            self.entered = anyio.Event()
            await self.entered.wait()


@attrs.define
class LeaseLog:
    """What the runtime's store calls said about the session lease, in the order they were
    made (the runtime's store is wrapped; see ``record_lease_calls``)."""

    #: ("grant" | "renew", fencing token, expires_at_ms, call started at (store clock)).
    leases: list[tuple[str, int, int, int]] = attrs.Factory(list)
    #: (fencing token, sent at (store clock), landed).
    commits: list[tuple[int, int, bool]] = attrs.Factory(list)


def record_lease_calls(
    store: turnbuckle.Store,
    monkeypatch: pytest.MonkeyPatch,
    before_commit: Callable[[], Awaitable[None]],
) -> LeaseLog:
    """Wrap the store's lease and commit calls to log each (the runtime calls them through
    ``store.sessions``), and to run ``before_commit`` before each commit goes to the store;
    the calls themselves are unchanged."""
    log, sessions, clock = LeaseLog(), store.sessions, store.clock
    try_claim, renew, bind = (
        sessions.try_claim_lease,
        sessions.renew_lease_and_claims,
        sessions.bind,
    )

    async def logged_claim(*args: Any, **kwargs: Any) -> Any:
        started = clock.now_ms()
        lease = await try_claim(*args, **kwargs)
        if lease is not None:
            log.leases.append(("grant", lease.fencing_token, lease.expires_at_ms, started))
        return lease

    async def logged_renew(*args: Any, **kwargs: Any) -> Any:
        started = clock.now_ms()
        lease, claims = await renew(*args, **kwargs)
        log.leases.append(("renew", lease.fencing_token, lease.expires_at_ms, started))
        return lease, claims

    def logged_bind(session_id: str | None = None) -> Any:
        handle = bind(session_id)
        commit = handle.commit

        async def logged_commit(runtime_commit: Any) -> Any:
            await before_commit()
            assert runtime_commit.lease is not None
            token, sent = runtime_commit.lease.fencing_token, clock.now_ms()
            try:
                result = await commit(runtime_commit)
            except BaseException:
                log.commits.append((token, sent, False))
                raise
            log.commits.append((token, sent, True))
            return result

        monkeypatch.setattr(handle, "commit", logged_commit)
        return handle

    monkeypatch.setattr(sessions, "try_claim_lease", logged_claim)
    monkeypatch.setattr(sessions, "renew_lease_and_claims", logged_renew)
    monkeypatch.setattr(sessions, "bind", logged_bind)
    return log


class ForeignLock:
    """SQLite's write lock, held by a raw connection of this process (as another process's
    long write transaction would)."""

    def __init__(self, path: Path) -> None:
        self.conn = apsw.Connection(str(path))
        self.conn.setbusytimeout(int(WAIT_S * 1000))
        self.taken = anyio.Event()

    async def take(self) -> None:
        await anyio.to_thread.run_sync(self.conn.execute, "BEGIN IMMEDIATE")
        self.taken.set()

    async def release(self) -> None:
        await anyio.to_thread.run_sync(self.conn.execute, "ROLLBACK")
        self.conn.close()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    with anyio.fail_after(WAIT_S):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)


#: When the foreign lock is taken: while the turn's model call waits ("turn"), or as the
#: turn's commit goes to the store ("commit").
PHASES = ("turn", "commit")


async def lock_scenario(path: Path, monkeypatch: pytest.MonkeyPatch, phase: str) -> dict[str, Any]:
    model = GatedModel()
    if phase == "commit":
        model.gate.set()  # the model answers at once; the lock catches the commit
    lock = ForeignLock(path)
    events: list[RuntimeEvent] = []
    busy_submits = 0
    tickets: dict[str, Ticket] = {}

    def seen(kind: str, operation: str | None = None) -> int:
        def matches(event: RuntimeEvent) -> bool:
            if event.type != kind:
                return False
            return operation is None or (
                isinstance(event.data, dict) and event.data["operation"] == operation
            )

        return sum(matches(e) for e in events)

    async def collect(stream: Any) -> None:
        async for event in stream:
            events.append(event)

    async def lock_the_first_commit() -> None:
        if phase == "commit" and not lock.taken.is_set():
            await lock.take()

    async with turnbuckle.open_store(store_url(path), busy_timeout=BUSY_TIMEOUT_S) as store:
        log = record_lease_calls(store, monkeypatch, lock_the_first_commit)
        async with (
            turnbuckle.open_runtime(store, model=model, lease_ttl_ms=LOCK_TTL_MS) as runtime,
            runtime.events(since=0) as stream,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(collect, stream)

            async def submit(text: str, *, retry_busy: bool) -> None:
                nonlocal busy_submits
                while True:
                    try:
                        tickets[text] = await runtime.submit("s", text, source_key=text)
                        return
                    except StoreBusyError:
                        # While the lock is held: retrying is the client's job.
                        assert retry_busy
                        busy_submits += 1
                        await anyio.sleep(0.05)

            def turn_stopped() -> bool:
                if phase == "turn":  # the lease ran out: the turn was cancelled
                    return seen("lease_lost") > 0 and model.calls[0].cancelled
                # The commit is being retried (it may have landed: it is tried until it
                # answers for good, after the lock).
                return seen("store_retry", "Commit") > 0

            with anyio.fail_after(WAIT_S):
                await submit("m1", retry_busy=False)
                await model.wait_calls(1)
                granted_before = log.leases[-1][1]
                if phase == "turn":
                    # The model call waits on the gate: queue one more, then take the lock.
                    await submit("m2", retry_busy=False)
                    await lock.take()
                else:
                    await lock.taken.wait()
                locked_at = time.monotonic()
                during = f"m{len(tickets) + 1}"
                tg.start_soon(functools.partial(submit, during, retry_busy=True))
                # Hold the lock for several lease periods, and at least until the runtime saw
                # busy errors and stopped the turn, and a submit failed.
                await wait_until(
                    lambda: (
                        time.monotonic() - locked_at >= LOCK_HOLD_S
                        and seen("store_retry") > 0
                        and turn_stopped()
                        and busy_submits > 0
                    )
                )
                held_s = time.monotonic() - locked_at
                retries_while_locked = seen("store_retry")
                await lock.release()

                await wait_until(lambda: during in tickets)
                await model.wait_calls(2)  # the turn again, under a new grant
                model.gate.set()
                replies = {text: await runtime.outcome(t) for text, t in tickets.items()}
                report = await runtime.wait_idle()
            tg.cancel_scope.cancel()

        assert report.parked == ()
        assert await store.sessions.list_queued_work("s") == []
        assert await store.sessions.list_parked_queued_work() == []
        read = await store.sessions.bind("s").load()
        assert read is not None
    nodes = conversation(read)
    users = [text for role, text in nodes if role == "user"]
    assert users == sorted(tickets), nodes
    assert users == ["m1", "m2", "m3"] if phase == "turn" else ["m1", "m2"], users
    if phase == "turn":
        # The first model call was cancelled with its turn.
        assert model.calls[0].cancelled and not model.calls[0].answered
    else:
        # The first turn answered, but its commit did not land: the turn ran again.
        assert model.calls[0].answered
        assert any(t == granted_before and not ok for t, _, ok in log.commits), log
    assert all(c.answered for c in model.calls[1:]), model.calls
    # Every answer is the outcome of the turn that delivered the message, and is in the graph.
    assistant = {text for role, text in nodes if role == "assistant"}
    for text, reply in replies.items():
        assert reply.ticket == tickets[text]
        assert reply.text in assistant, (text, reply)
    types = Counter(e.type for e in events)
    assert types["store_retry"] >= 1 and types["lease_lost"] >= 1, types
    assert types["turn_failed"] == types["work_parked"] == types["session_error"] == 0, types
    # Commits: every one that landed was sent under a newer grant than the first turn's
    # (which ran out during the lock), and before that grant's expiry as last extended by a
    # lease call made before the commit was sent.
    landed = [(token, sent) for token, sent, ok in log.commits if ok]
    assert landed, log.commits
    for token, sent in landed:
        assert token > granted_before, (token, granted_before, log)
        expiries = [e for _, t, e, started in log.leases if t == token and started <= sent]
        assert expiries and sent < max(expiries), (token, sent, log)
    return {
        "messages": len(tickets),
        "lock_held_s": held_s,
        "store_retries_while_locked": retries_while_locked,
        "busy_submits": busy_submits,
        "lease_lost": types["lease_lost"],
        "model_calls": len(model.calls),
    }


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_a_write_lock_held_by_another_connection_strands_nothing(
    tmp_path: Path, backend: str, phase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "locked.db"
    figures = anyio.run(lock_scenario, path, monkeypatch, phase, backend=backend)
    when = (
        "while a turn's model call waits (gated)"
        if phase == "turn"
        else "as a turn's commit goes to the store"
    )
    record(
        f"Runtime under a foreign write lock, taken {when} ({backend})",
        f"another connection takes SQLite's write lock {when} and holds it >= {LOCK_HOLD_S} s"
        f" (lease ttl {LOCK_TTL_MS} ms, busy timeout {BUSY_TIMEOUT_S} s); one message was"
        " queued before the lock, one submitted (retried by the client) during it; after the"
        " lock: each answered once, in order, committed under a live lease, nothing parked"
        " or left in the queue",
        messages=figures["messages"],
        lock_held_s=round(figures["lock_held_s"], 2),
        store_retries_while_locked=figures["store_retries_while_locked"],
        busy_submits=figures["busy_submits"],
        leases_lost=figures["lease_lost"],
        model_calls=figures["model_calls"],
        lost=0,
        duplicated=0,
        out_of_order=0,
        parked=0,
    )
