"""The worker driver: every (state, event type) pair, straight-line scenarios with exact
command lists, and a simulated lane that answers the driver's commands in a random order, with
faults, another worker taking over expired leases, cancel requests and handlers that return,
fail or never end.

The driver is only ever moved through its public interface (``handle``, ``next_deadline``,
``state``, ``held``, ``finished``), by event scripts answered from a small fake store built on
the pure execution decisions (select, claim, reclaim, renew, complete, fail), so every handle,
renewal and refusal the driver sees is one a real store could have returned.
"""

from __future__ import annotations

import contextlib
import heapq
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeAlias

import attrs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from turnbuckle.errors import (
    CorruptRecordError,
    ExecutionNotFound,
    ExecutionTerminal,
    InvalidArgument,
    LeaseConflict,
    LeaseExpired,
    PayloadNotSerializable,
    PayloadTooLarge,
    StorageFullError,
    StoreBusyError,
    StoreClosedError,
    TurnbuckleError,
)
from turnbuckle.sansio.codec import JSON, decode_json, encode_json
from turnbuckle.sansio.driver import SessionEvent
from turnbuckle.sansio.execution import (
    ExecutionRow,
    FailureClass,
    Handle,
    RetryPolicy,
    claim_execution,
    complete_execution,
    fail_execution,
    new_execution,
    reclaim_execution,
    renew_execution,
    select_for_claim,
)
from turnbuckle.sansio.keeper import DriverError, Severity
from turnbuckle.sansio.worker import (
    CancelHandler,
    Claim,
    Command,
    Describe,
    Described,
    Event,
    ExecutionClaimed,
    Finish,
    Finished,
    HandlerEnded,
    Renew,
    Renewed,
    Report,
    RunHandler,
    SlotState,
    StoreFailed,
    TimerFired,
    Woken,
    WorkerConfig,
    WorkerDriver,
)
from turnbuckle.testing import SeededIds

LANE: Final = "jobs"
WORKER: Final = "w-a/0"
OTHER: Final = "w-b/0"
STORE_ID: Final = "store-1"
BACKEND: Final = "memory"
#: The store's payload limit (small, so a large result is easy to make).
LIMIT: Final = 4_096
TTL: Final = 15_000
THIRD: Final = TTL // 3
#: The driver stops working under a lease this long before it runs out (the keeper's
#: docstring: a tenth of the ttl, so the next holder never works at the same time).
STOP_EARLY: Final = TTL // 10
T0: Final = 1_000_000
POLL: Final = 200
#: The default Backoff of WorkerConfig: base 25 ms, cap 2 s.
BASE, CAP = 25, 2_000
RETRY: Final = RetryPolicy(max_attempts=3, base_backoff_ms=400, max_backoff_ms=1_600)
W = SlotState
INFO, WARNING, ERROR, DEBUG = Severity.INFO, Severity.WARNING, Severity.ERROR, Severity.DEBUG
#: The result events, and the commands whose results they are.
RESULT_OF: Final[dict[type[Any], tuple[type[Any], ...]]] = {
    ExecutionClaimed: (Claim,),
    Described: (Describe,),
    Renewed: (Renew,),
    HandlerEnded: (RunHandler,),
    Finished: (Finish,),
    StoreFailed: (Claim, Describe, Renew, Finish),
}
EVENT_TYPES: Final[list[type[Any]]] = [Woken, TimerFired, *RESULT_OF]
#: The commands whose results come back (with their command_id).
WithId: TypeAlias = Claim | Describe | Renew | RunHandler | Finish
StoreCommand: TypeAlias = Claim | Describe | Renew | Finish


# --- a fake store: one lane's executions, kept with the sansio decisions -----------------------


class Store:
    """What a store would answer, decided by the same pure functions the real adapters use
    (and, like the adapters: a result is encoded before the fenced write; a run whose
    cancellation was requested fails as cancelled, whatever it failed with)."""

    def __init__(self) -> None:
        self.rows: dict[str, ExecutionRow] = {}
        self.cancels: set[str] = set()
        #: Every completion event: (execution_id, kind, attempt_index, worker_id or None).
        self.completions: list[tuple[str, str, int, str | None]] = []

    def create(
        self,
        execution_id: str,
        now: int,
        *,
        priority: int = 0,
        capabilities: Sequence[str] = (),
        payload: JSON = None,
        retry: RetryPolicy = RETRY,
    ) -> ExecutionRow:
        row = new_execution(
            execution_id=execution_id,
            lane=LANE,
            capabilities=capabilities,
            priority=priority,
            payload={"job": execution_id} if payload is None else payload,
            retry=retry,
            now_ms=now,
            limit=LIMIT,
        )
        self.rows[execution_id] = row
        return row

    def row(self, execution_id: str) -> ExecutionRow:
        row = self.rows.get(execution_id)
        if row is None:
            raise ExecutionNotFound(execution_id)
        return row

    def claim(
        self, worker: str, capabilities: Sequence[str], ttl: int, now: int, *, reclaim: bool
    ) -> Handle | None:
        rows = [r for r in self.rows.values() if r.lane == LANE]
        if reclaim:
            expired = sorted(
                (
                    r
                    for r in rows
                    if r.phase == "active"
                    and (r.lease_expires_at_ms or 0) <= now
                    and set(r.capabilities) <= set(capabilities)
                ),
                key=lambda r: (r.lease_expires_at_ms or 0, r.execution_id),
            )
            for row in expired:
                got = reclaim_execution(
                    row, worker, ttl, now_ms=now, store_id=STORE_ID, backend=BACKEND
                )
                if got is not None:
                    self.rows[row.execution_id] = got[0]
                    return got[1]
            return None
        chosen = select_for_claim(rows, capabilities, now_ms=now)
        if chosen is None:
            return None
        claimed, handle = claim_execution(
            chosen, worker, ttl, now_ms=now, store_id=STORE_ID, backend=BACKEND
        )
        self.rows[chosen.execution_id] = claimed
        return handle

    def describe(self, execution_id: str) -> dict[str, Any]:
        row = self.row(execution_id)
        return {
            "execution_id": execution_id,
            "payload": None if row.payload is None else decode_json(row.payload),
            "attempt": row.attempt_index,
            "cancel_requested": execution_id in self.cancels,
        }

    def renew(self, handle: Handle, now: int) -> bool:
        row = self.row(handle.execution_id)
        self.rows[row.execution_id] = renew_execution(row, handle, now_ms=now)
        return row.execution_id in self.cancels

    def complete(self, handle: Handle, result: JSON, now: int) -> None:
        encoded = encode_json(result, limit=LIMIT)
        row = self.row(handle.execution_id)
        self.rows[row.execution_id] = complete_execution(row, handle, encoded, now_ms=now)
        self.completions.append(
            (row.execution_id, "completed", handle.attempt_index, handle.worker_id)
        )

    def fail(self, handle: Handle, failure: FailureClass, message: str, now: int) -> str:
        row = self.row(handle.execution_id)
        cls = FailureClass.CANCELLED if row.execution_id in self.cancels else failure
        new, what = fail_execution(row, handle, cls, message, now_ms=now)
        self.rows[row.execution_id] = new
        self.completions.append((row.execution_id, what, handle.attempt_index, handle.worker_id))
        return what

    def request_cancel(self, execution_id: str) -> None:
        """As ``request_cancel``: a runnable execution ends at once, a running one's worker
        sees the request when it next renews, a finished one is left alone."""
        row = self.rows[execution_id]
        if row.phase == "runnable":
            self.rows[execution_id] = attrs.evolve(
                row,
                phase="terminal",
                outcome="cancelled",
                failure="cancelled before it ran",
                version=row.version + 1,
            )
            self.completions.append((execution_id, "cancelled", row.attempt_index, None))
        elif row.phase == "active":
            self.cancels.add(execution_id)

    def answer(self, command: Command, now: int, config: WorkerConfig) -> Event:
        """Carry out a store command at ``now``: its result, or the error it raised."""
        command_id: int = getattr(command, "command_id", 0)
        try:
            if isinstance(command, Claim):
                handle = self.claim(
                    config.worker_id,
                    config.capabilities,
                    config.lease_ttl_ms,
                    now,
                    reclaim=command.reclaim,
                )
                return ExecutionClaimed(command_id=command_id, handle=handle)
            if isinstance(command, Describe):
                info = self.describe(command.execution_id)
                return Described(command_id=command_id, info=info)
            if isinstance(command, Renew):
                cancel = self.renew(command.handle, now)
                return Renewed(command_id=command_id, cancel_requested=cancel)
            if isinstance(command, Finish):
                if command.failure is None:
                    self.complete(command.handle, command.result, now)
                else:
                    self.fail(command.handle, command.failure, command.message, now)
                return Finished(command_id=command_id)
        except TurnbuckleError as exc:
            return StoreFailed(command_id=command_id, error=exc)
        raise AssertionError(f"not a store command: {command!r}")


# --- a harness: one driver, the store, the clock, and what the driver sent --------------------


class Run:
    """A driver fed event scripts at a clock that only moves forward."""

    def __init__(self, *, poll: int = POLL, capabilities: Sequence[str] = ()) -> None:
        self.config = WorkerConfig(
            lane=LANE,
            capabilities=capabilities,
            worker_id=WORKER,
            lease_ttl_ms=TTL,
            poll_ms=poll,
        )
        self.driver = WorkerDriver(self.config, ids=SeededIds(0))
        self.store = Store()
        self.now = T0
        #: Every command the driver returned, in order.
        self.sent: list[Command] = []
        #: Commands sent whose result was not reported yet, by id.
        self.outstanding: dict[int, WithId] = {}

    def state(self) -> SlotState:
        """Where the driver is now (a call: it changes under every event)."""
        return self.driver.state

    def held(self) -> Handle:
        assert self.driver.held is not None
        return self.driver.held

    def feed(self, event: Event, at: int | None = None) -> list[Command]:
        if at is not None:
            assert at >= self.now, "time only moves forward"
            self.now = at
        out = self.driver.handle(event, self.now)
        self.sent += out
        command_id = getattr(event, "command_id", None)
        if command_id is not None:
            self.outstanding.pop(command_id, None)
        self.outstanding.update({c.command_id: c for c in out if isinstance(c, WithId)})
        return out

    def last(self, kind: type[Any]) -> Any:
        """The last command of this type the driver sent."""
        for command in reversed(self.sent):
            if isinstance(command, kind):
                return command
        raise AssertionError(f"the driver sent no {kind.__name__}")

    def answer(self, kind: type[Any], at: int | None = None) -> list[Command]:
        """Let the store carry out the last command of ``kind`` and report its result."""
        if at is not None:
            self.now = at
        return self.feed(self.store.answer(self.last(kind), self.now, self.config))

    def fail(self, kind: type[Any], error: BaseException, at: int | None = None) -> list[Command]:
        return self.feed(StoreFailed(command_id=self.last(kind).command_id, error=error), at)

    def fire(self, at: int | None = None) -> list[Command]:
        """A TimerFired at ``at``, or at the deadline the driver asked for."""
        deadline = self.driver.next_deadline()
        if at is None:
            assert deadline is not None
            at = max(deadline, self.now)
        return self.feed(TimerFired(), at)

    def end(
        self, value: JSON = None, failure: FailureClass | None = None, message: str = ""
    ) -> list[Command]:
        """The handler of the last RunHandler ends."""
        run = self.last(RunHandler)
        return self.feed(
            HandlerEnded(command_id=run.command_id, value=value, failure=failure, message=message)
        )


def exact(commands: Sequence[Command]) -> list[Command]:
    """Commands with their ids zeroed (ids are only compared for uniqueness), and the jittered
    delay of a retry report zeroed (the backoff tests check it against the deadline)."""
    return [_exact(c) for c in commands]


def _exact(command: Command) -> Command:
    if isinstance(command, WithId):
        return attrs.evolve(command, command_id=0)
    if isinstance(command, Report) and command.event.type == "store_retry":
        assert isinstance(command.event.data, dict)
        data = command.event.data | {"delay_ms": 0}
        return Report(event=attrs.evolve(command.event, data=data))
    return command


def report(kind: str, data: JSON, severity: Severity = DEBUG) -> Report:
    return Report(event=SessionEvent(type=kind, data=data, severity=severity))


def retried(operation: str, error: BaseException, attempt: int) -> Report:
    """The report of a transient store error, said once as a warning and at DEBUG after."""
    data: JSON = {"operation": operation, "error": why(error), "attempt": attempt, "delay_ms": 0}
    return report("store_retry", data, WARNING if attempt == 1 else DEBUG)


def lost(execution_id: str, reason: str) -> Report:
    return report("execution_lost", {"execution_id": execution_id, "reason": reason}, WARNING)


def failed(operation: str, error: BaseException) -> Report:
    return report("worker_error", {"while": operation, "error": why(error)}, ERROR)


def claim(reclaim: bool = False) -> Claim:
    return Claim(command_id=0, reclaim=reclaim)


def describe(execution_id: str = "e1") -> Describe:
    return Describe(command_id=0, execution_id=execution_id)


def renew(handle: Handle) -> Renew:
    return Renew(command_id=0, handle=handle)


def finish(handle: Handle, **how: Any) -> Finish:
    return Finish(command_id=0, handle=handle, **how)


def why(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


RAN_OUT: Final = "the lease ran out before it could be renewed"


# --- putting a driver in each state, through its public interface only ------------------------

#: How a state is waited in: the plain way; CLAIMING after nothing was runnable (a reclaim in
#: flight); DESCRIBING or RUNNING with a renewal in flight.
MAIN, RECLAIM, RENEWING = "main", "reclaim", "renewing"


def reach(state: SlotState, how: str = MAIN) -> Run:
    """A driver in ``state``, reached by a realistic event script at T0 (the store answers
    every store command; one execution, e1, is runnable unless the state needs none)."""
    r = Run()
    if state not in (W.POLLING, W.STOPPED) and how != RECLAIM:
        r.store.create("e1", r.now)
    if state is W.IDLE:
        return r
    r.feed(Woken())
    if state is W.STOPPED:
        r.fail(Claim, StoreClosedError("memory"))
        return _checked(r, state)
    if state is W.CLAIMING:
        if how == RECLAIM:
            assert exact(r.answer(Claim)) == [claim(reclaim=True)]
        return _checked(r, state)
    r.answer(Claim)
    if state is W.POLLING:
        r.answer(Claim)
        return _checked(r, state)
    if state is W.DESCRIBING:
        if how == RENEWING:
            assert exact(r.fire()) == [renew(r.held())]
        return _checked(r, state)
    r.answer(Describe)
    if state is W.RUNNING:
        if how == RENEWING:
            assert exact(r.fire()) == [renew(r.held())]
        return _checked(r, state)
    r.end({"done": "e1"})
    return _checked(r, state)


def _checked(r: Run, state: SlotState) -> Run:
    assert r.state() is state
    return r


def ways(state: SlotState) -> list[str]:
    if state is W.CLAIMING:
        return [MAIN, RECLAIM]
    if state in (W.DESCRIBING, W.RUNNING):
        return [MAIN, RENEWING]
    return [MAIN]


STATE_WAYS: Final = [(s, w) for s in SlotState for w in ways(s)]


def snapshot(d: WorkerDriver) -> tuple[object, ...]:
    """What the driver shows of itself."""
    return (d.state, d.held, d.finished, d.next_deadline())


def answer_of(r: Run, command: Command) -> Event:
    """The (successful) result of a command: from the store, or the handler's value."""
    if isinstance(command, RunHandler):
        value: JSON = {"done": command.handle.execution_id}
        return HandlerEnded(command_id=command.command_id, value=value)
    return r.store.answer(command, r.now, r.config)


def probe(r: Run) -> list[object]:
    """Drive ``r`` on (every outstanding command answered, the timer, a wake) and record what
    it does: two drivers in the same condition record the same."""
    seen: list[object] = []

    def step(event: Event, at: int | None = None) -> None:
        try:
            seen.append(r.feed(event, at))
        except Exception as exc:  # recorded, so a difference shows
            seen.append(repr(exc))

    for command in sorted(r.outstanding.values(), key=lambda c: c.command_id):
        step(answer_of(r, command))
    deadline = r.driver.next_deadline()
    if deadline is not None:
        step(TimerFired(), max(deadline, r.now))
    step(Woken())
    return seen


# --- 1. every (state, event type) pair ----------------------------------------------------------

BUSY: Final = StoreBusyError("db", 5.0)
CORRUPT: Final = CorruptRecordError("executions", "e1", "not JSON")
CLOSED: Final = StoreClosedError("memory")
DUMMY_HANDLE: Final = Handle(
    store_id=STORE_ID,
    backend=BACKEND,
    execution_id="e9",
    attempt_index=0,
    lease_epoch=9,
    lease_ttl_ms=TTL,
    worker_id=WORKER,
)


def dummy(kind: type[Any], command_id: int) -> Event:
    """A result of ``kind`` for ``command_id`` (its content does not matter)."""
    made: dict[type[Any], Callable[[], Event]] = {
        ExecutionClaimed: lambda: ExecutionClaimed(command_id=command_id, handle=DUMMY_HANDLE),
        Described: lambda: Described(command_id=command_id, info={"x": 1}),
        Renewed: lambda: Renewed(command_id=command_id, cancel_requested=True),
        HandlerEnded: lambda: HandlerEnded(command_id=command_id, value="v"),
        Finished: lambda: Finished(command_id=command_id),
        StoreFailed: lambda: StoreFailed(command_id=command_id, error=BUSY),
    }
    return made[kind]()


def canonical(kind: type[Any], r: Run) -> tuple[Event, int]:
    """The event of ``kind`` to feed ``r``, and when: a timer at the deadline asked for (now if
    none); a result for the outstanding command of the right kind (the store's answer, the
    handler's value, or a busy store), else for any outstanding command, else for none."""
    if kind is Woken:
        return Woken(), r.now
    if kind is TimerFired:
        deadline = r.driver.next_deadline()
        return TimerFired(), r.now if deadline is None else max(deadline, r.now)
    right = sorted(
        (c for c in r.outstanding.values() if isinstance(c, RESULT_OF[kind])),
        key=lambda c: c.command_id,
    )
    if not right:
        return dummy(kind, min(r.outstanding, default=999_999)), r.now
    command = right[0]
    if kind is StoreFailed:
        return StoreFailed(command_id=command.command_id, error=BUSY), r.now
    event = answer_of(r, command)
    assert isinstance(event, kind), event
    return event, r.now


#: The way each event type is best met in a state (a RUNNING slot waits for its handler, or
#: for a renewal too).
WAY_FOR: Final[dict[type[Any], str]] = {Renewed: RENEWING, StoreFailed: RENEWING}


def way_for(state: SlotState, kind: type[Any]) -> str:
    way = WAY_FOR.get(kind, MAIN)
    return way if way in ways(state) else MAIN


Expect = Callable[[Run, Any], tuple[list[object], SlotState]]


def _same(r: Run, e: Event) -> tuple[list[object], SlotState]:
    return [], r.state()


def _claim(r: Run, e: Event) -> tuple[list[object], SlotState]:
    return [claim()], W.CLAIMING


def _retry(operation: str) -> Expect:
    return lambda r, e: ([retried(operation, BUSY, 1)], r.state())


#: What every accepted (state, event type) pair does, in the canonical condition above: the
#: commands (ids zeroed) and the state after. The keys must be exactly the driver's table.
EXPECTED: Final[dict[tuple[SlotState, type[Any]], Expect]] = {
    # A wake starts an idle slot and ends a poll at once; it changes nothing elsewhere.
    (W.IDLE, Woken): _claim,
    (W.POLLING, Woken): _claim,
    **{(s, Woken): _same for s in set(SlotState) - {W.IDLE, W.POLLING}},
    # A timer at the deadline: look for work again, or renew; nothing where nothing is due.
    (W.IDLE, TimerFired): _same,
    (W.CLAIMING, TimerFired): _same,
    (W.POLLING, TimerFired): _claim,
    # Reading holds the lease too: it is renewed while the read is out.
    (W.DESCRIBING, TimerFired): lambda r, e: ([renew(r.held())], W.DESCRIBING),
    (W.RUNNING, TimerFired): lambda r, e: ([renew(r.held())], W.RUNNING),
    (W.FINISHING, TimerFired): _same,
    (W.STOPPED, TimerFired): _same,
    # The results, each in the one state that waits for it.
    (W.CLAIMING, ExecutionClaimed): lambda r, e: (
        [describe(e.handle.execution_id)],
        W.DESCRIBING,
    ),
    (W.DESCRIBING, Described): lambda r, e: (
        [RunHandler(command_id=0, handle=r.held(), info=e.info)],
        W.RUNNING,
    ),
    (W.DESCRIBING, Renewed): _same,
    (W.RUNNING, Renewed): _same,
    (W.RUNNING, HandlerEnded): lambda r, e: (
        [finish(r.held(), result=e.value)],
        W.FINISHING,
    ),
    (W.FINISHING, Finished): _claim,
    # A busy store: the same call again after a backoff, said once as a warning (a renewal
    # too: "a transient store error is retried with backoff", and the session driver says
    # store_retry for its renewals as for every other call).
    (W.CLAIMING, StoreFailed): _retry("Claim"),
    (W.DESCRIBING, StoreFailed): _retry("Describe"),
    (W.RUNNING, StoreFailed): _retry("Renew"),
    (W.FINISHING, StoreFailed): _retry("Finish"),
}


def test_the_table_holds_exactly_the_expected_pairs() -> None:
    assert set(WorkerDriver.TRANSITIONS) == set(EXPECTED)
    assert {kind for _, kind in WorkerDriver.TRANSITIONS} == set(EVENT_TYPES)
    assert dict(WorkerDriver.ANSWERS) == RESULT_OF


@pytest.mark.parametrize("kind", EVENT_TYPES, ids=lambda k: k.__name__)
@pytest.mark.parametrize("state", list(SlotState), ids=lambda s: s.name)
def test_every_state_and_event_type(state: SlotState, kind: type[Any]) -> None:
    how = way_for(state, kind)
    r = reach(state, how)
    event, at = canonical(kind, r)
    expect = EXPECTED.get((state, kind))
    if expect is not None:
        want, after = expect(r, event)
        assert exact(r.feed(event, at)) == want
        assert r.state() is after
        if isinstance(event, ExecutionClaimed):
            assert r.driver.held == event.handle
        if isinstance(event, Renewed):
            assert r.driver.next_deadline() == r.now + THIRD
        if after in (W.CLAIMING, W.POLLING, W.IDLE, W.STOPPED):
            assert r.driver.held is None
        return
    command_id = getattr(event, "command_id", None)
    assert command_id is not None, "only results are refused"
    before = snapshot(r.driver)
    if command_id not in r.outstanding:
        # Nothing is awaited in this state: the result is late, and ignored.
        assert state in (W.IDLE, W.POLLING, W.STOPPED)
        assert r.feed(event, at) == []
    else:
        with pytest.raises(DriverError) as raised:
            r.driver.handle(event, at)
        assert str(raised.value) == (
            f"the worker driver in state {state.value} cannot take {kind.__name__}"
        )
    assert snapshot(r.driver) == before
    assert probe(r) == probe(reach(state, how)), "the driver changed, or stopped working"


RESULT_TYPES: Final = list(RESULT_OF)


@pytest.mark.parametrize(("state", "how"), STATE_WAYS, ids=str)
def test_a_result_for_a_command_not_awaited_is_ignored(state: SlotState, how: str) -> None:
    r = reach(state, how)
    # Never sent, or sent and answered already (a duplicate): both are ignored, in any state.
    answered = [c for c in r.sent if isinstance(c, WithId) and c.command_id not in r.outstanding]
    cases = [(kind, 999_999) for kind in RESULT_TYPES] + [
        (kind, c.command_id)
        for c in answered
        for kind in RESULT_TYPES
        if isinstance(c, RESULT_OF[kind])
    ]
    for kind, command_id in cases:
        before = snapshot(r.driver)
        assert r.feed(dummy(kind, command_id)) == [], (kind, command_id)
        assert snapshot(r.driver) == before
    assert probe(r) == probe(reach(state, how))


@pytest.mark.parametrize(("state", "how"), STATE_WAYS, ids=str)
def test_a_result_of_the_wrong_kind_is_refused(state: SlotState, how: str) -> None:
    """A result naming an awaited command of another kind (a Described for a claim, a
    StoreFailed for the handler) is a host bug: DriverError, nothing changed."""
    wrong: list[str] = []
    for command in list(reach(state, how).outstanding.values()):
        for kind in RESULT_TYPES:
            if isinstance(command, RESULT_OF[kind]):
                continue
            r = reach(state, how)
            before = snapshot(r.driver)
            event = dummy(kind, command.command_id)
            name = f"{kind.__name__} for {type(command).__name__}"
            try:
                out = r.driver.handle(event, r.now)
            except DriverError:
                if snapshot(r.driver) == before and probe(r) == probe(reach(state, how)):
                    continue
                wrong.append(f"{name}: changed the driver")
            except Exception as exc:
                wrong.append(f"{name}: raised {exc!r}")
            else:
                wrong.append(f"{name}: taken, returned {exact(out)}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("state", "how"), STATE_WAYS, ids=str)
def test_a_timer_at_the_deadline_moves_the_deadline_on(state: SlotState, how: str) -> None:
    """A driver that asks for a timer it has already had, and does nothing with it, makes
    its actor spin (``next_deadline`` in the past, forever)."""
    r = reach(state, how)
    deadline = r.driver.next_deadline()
    if deadline is None:
        return
    out = r.fire()
    after = r.driver.next_deadline()
    assert out or after is None or after > r.now, (r.state(), after, r.now)


def test_the_config_refuses_bad_options() -> None:
    for bad in (
        {"lease_ttl_ms": 29},
        {"lease_ttl_ms": 30.0},
        {"poll_ms": 0},
        {"lane": 3},
        {"capabilities": "gpu"},
    ):
        options: dict[str, Any] = {"lane": LANE, "capabilities": (), "worker_id": WORKER}
        with pytest.raises(InvalidArgument):
            WorkerConfig(**(options | bad))


# --- 2. scenarios ---------------------------------------------------------------------------


def test_claim_describe_run_complete_then_claim_the_next() -> None:
    r = Run()
    r.store.create("low", r.now, priority=0, payload={"n": 1})
    r.store.create("high", r.now, priority=5, payload={"n": 2})
    assert r.driver.next_deadline() is None and r.driver.held is None
    assert exact(r.feed(Woken())) == [claim()]
    assert r.state() is W.CLAIMING and r.driver.next_deadline() is None
    # The best first: the highest priority.
    assert exact(r.answer(Claim)) == [describe("high")]
    handle = r.held()
    assert (handle.execution_id, handle.attempt_index, handle.kind) == ("high", 0, "fresh")
    assert r.state() is W.DESCRIBING
    info = r.store.describe("high")
    assert exact(r.answer(Describe)) == [RunHandler(command_id=0, handle=handle, info=info)]
    assert r.state() is W.RUNNING and r.driver.next_deadline() == T0 + THIRD
    assert exact(r.end({"sum": 3})) == [finish(handle, result={"sum": 3})]
    assert r.state() is W.FINISHING and r.driver.next_deadline() is None
    assert exact(r.answer(Finish)) == [claim()]
    assert r.driver.held is None
    high = r.store.rows["high"]
    assert (high.phase, high.outcome, high.result) == ("terminal", "completed", '{"sum":3}')
    # The next one, at once.
    assert exact(r.answer(Claim)) == [describe("low")]
    r.answer(Describe)
    r.end(None)
    assert exact(r.answer(Finish)) == [claim()]
    # Nothing runnable, nothing expired: poll.
    assert exact(r.answer(Claim)) == [claim(reclaim=True)]
    assert r.answer(Claim) == []
    assert r.state() is W.POLLING and r.driver.next_deadline() == r.now + POLL
    assert [c[:2] for c in r.store.completions] == [("high", "completed"), ("low", "completed")]
    ids = [c.command_id for c in r.sent if isinstance(c, WithId)]
    assert len(ids) == len(set(ids)), "command ids are never reused"


def test_only_work_the_slot_can_serve_is_claimed() -> None:
    r = Run(capabilities=("cpu",))
    r.store.create("gpu-job", r.now, priority=9, capabilities=("gpu",))
    r.store.create("cpu-job", r.now, priority=0, capabilities=("cpu",))
    r.feed(Woken())
    assert exact(r.answer(Claim)) == [describe("cpu-job")]


def test_nothing_runnable_reclaims_then_polls_and_claims_again() -> None:
    r = Run()
    assert exact(r.feed(Woken())) == [claim()]
    assert exact(r.answer(Claim)) == [claim(reclaim=True)]
    assert r.state() is W.CLAIMING
    assert r.answer(Claim) == []
    assert r.state() is W.POLLING
    deadline = r.driver.next_deadline()
    assert deadline == T0 + POLL
    assert r.fire(deadline - 1) == []
    assert exact(r.fire()) == [claim()]
    assert r.state() is W.CLAIMING and r.driver.next_deadline() is None
    r.store.create("e1", r.now)
    assert exact(r.answer(Claim)) == [describe("e1")]


def test_a_wake_while_polling_claims_at_once() -> None:
    r = reach(W.POLLING)
    poll_at = r.driver.next_deadline()
    assert poll_at == r.now + POLL
    r.store.create("e1", r.now)
    assert exact(r.feed(Woken(), at=r.now + 1)) == [claim()]
    assert r.state() is W.CLAIMING and r.driver.next_deadline() is None
    assert exact(r.answer(Claim)) == [describe("e1")]
    # The poll is over: its time brings no second claim.
    assert r.fire(poll_at) == [] and r.state() is W.DESCRIBING


def test_work_whose_worker_died_is_reclaimed_once_its_lease_ran_out() -> None:
    r = Run()
    r.store.create("e1", r.now)
    theirs = r.store.claim(OTHER, (), TTL, r.now, reclaim=False)
    assert theirs is not None
    r.feed(Woken())
    r.answer(Claim)
    assert r.answer(Claim) == []  # their lease is live: nothing to reclaim
    while r.state() is W.POLLING and r.now + POLL < T0 + TTL:
        r.fire()
        assert exact(r.answer(Claim)) == [claim(reclaim=True)]
        assert r.answer(Claim) == []
    r.fire(T0 + TTL)
    r.answer(Claim)
    assert exact(r.answer(Claim)) == [describe("e1")]
    mine = r.held()
    assert (mine.kind, mine.attempt_index, mine.lease_epoch) == ("reclaimed", 0, 2)
    r.answer(Describe)
    r.end("ok")
    assert exact(r.answer(Finish)) == [claim()]
    assert r.store.completions == [("e1", "completed", 0, WORKER)]
    # Their handle can no longer write.
    with pytest.raises(ExecutionTerminal):
        r.store.complete(theirs, "theirs", r.now)


def test_the_lease_is_renewed_every_third_of_its_ttl_while_the_handler_runs() -> None:
    r = reach(W.RUNNING)
    handle = r.held()
    assert r.driver.next_deadline() == T0 + THIRD
    assert r.fire(T0 + THIRD - 1) == []
    assert exact(r.fire()) == [renew(handle)]
    sent = r.now
    # In flight: only the stop, a tenth of the ttl before the expiry.
    assert r.driver.next_deadline() == T0 + TTL - STOP_EARLY
    assert r.fire(r.now + 1) == []  # not twice
    assert r.answer(Renew) == []
    assert r.store.rows["e1"].lease_expires_at_ms == r.now + TTL
    # The next, a third into the lease as renewed (which began no earlier than sent).
    assert r.driver.next_deadline() == sent + THIRD
    for _ in range(5):  # a long handler: renewed for as long as it runs
        assert exact(r.fire()) == [renew(handle)]
        assert r.answer(Renew) == []
        assert r.driver.next_deadline() == r.now + THIRD
    assert r.now == T0 + 6 * THIRD
    assert exact(r.end("done")) == [finish(handle, result="done")]


def test_a_late_claim_reply_renews_at_once() -> None:
    r = Run()
    r.store.create("e1", r.now)
    r.feed(Woken())
    granted = r.store.answer(r.last(Claim), r.now, r.config)  # until T0 + TTL, by the store
    # The reply comes late: past the point where a renewal was due.
    assert exact(r.feed(granted, at=T0 + 6_000)) == [describe("e1")]
    r.answer(Describe)
    assert r.driver.next_deadline() == r.now
    assert exact(r.fire()) == [renew(r.held())]


def test_a_late_renewal_reply_renews_at_once() -> None:
    r = reach(W.RUNNING, RENEWING)
    sent = r.now
    renewed = r.store.answer(r.last(Renew), r.now, r.config)  # until sent + TTL, by the store
    assert r.feed(renewed, at=sent + 6_000) == []
    assert r.driver.next_deadline() == r.now
    assert exact(r.fire()) == [renew(r.held())]


def test_a_renewal_saying_cancel_was_requested_cancels_the_handler_and_records_it() -> None:
    r = reach(W.RUNNING)
    handle = r.held()
    r.store.request_cancel("e1")
    r.fire()
    out = r.answer(Renew)
    assert exact(out) == [
        CancelHandler(),
        finish(handle, failure=FailureClass.CANCELLED, message="cancelled on request"),
    ]
    assert r.state() is W.FINISHING and r.driver.next_deadline() is None
    # The handler's end, had it come before the cancel reached it, is ignored.
    assert r.end("too late") == []
    assert exact(r.answer(Finish)) == [claim()]
    row = r.store.rows["e1"]
    assert (row.outcome, row.failure) == ("cancelled", "cancelled on request")
    assert r.store.completions == [("e1", "cancelled", 0, WORKER)]


def test_a_cancel_requested_while_reading_never_starts_the_handler() -> None:
    """A read that takes longer than a third of the ttl is renewed under, and a renewal that
    says cancel was requested ends the execution before its handler starts."""
    r = reach(W.DESCRIBING, RENEWING)
    handle = r.held()
    r.store.request_cancel("e1")
    out = r.answer(Renew)
    assert exact(out) == [
        finish(handle, failure=FailureClass.CANCELLED, message="cancelled on request")
    ]
    # The read's reply, when it comes, starts nothing.
    assert r.answer(Describe) == []
    assert exact(r.answer(Finish)) == [claim()]
    assert not any(isinstance(c, RunHandler) for c in r.sent)
    assert r.store.rows["e1"].outcome == "cancelled"


def test_results_after_the_handler_ended_are_ignored() -> None:
    r = reach(W.RUNNING, RENEWING)
    handle = r.held()
    r.store.request_cancel("e1")
    renewal = r.store.answer(r.last(Renew), r.now, r.config)
    assert isinstance(renewal, Renewed) and renewal.cancel_requested
    assert exact(r.end("done")) == [finish(handle, result="done")]
    # The attempt ended with the handler: the renewal's answer no longer matters.
    before = snapshot(r.driver)
    assert r.feed(renewal) == []
    assert r.feed(StoreFailed(command_id=renewal.command_id, error=LeaseExpired("e1"))) == []
    assert snapshot(r.driver) == before
    assert r.driver.next_deadline() is None, "no renewals while finishing"
    assert exact(r.answer(Finish)) == [claim()]
    assert r.store.rows["e1"].outcome == "completed"


@pytest.mark.parametrize(
    "error",
    [
        LeaseConflict("e1", 1, 2),
        LeaseExpired("e1"),
        ExecutionTerminal("e1", "cancelled"),
        ExecutionNotFound("e1"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_renewal_refused_loses_the_execution_and_writes_nothing(error: BaseException) -> None:
    r = reach(W.RUNNING, RENEWING)
    run = r.last(RunHandler)
    out = r.fail(Renew, error)
    assert exact(out) == [lost("e1", why(error)), CancelHandler(), claim()]
    assert r.state() is W.CLAIMING and r.driver.held is None
    assert r.driver.next_deadline() is None
    # The cancelled handler's end is ignored: nothing is written.
    assert r.feed(answer_of(r, run)) == []
    assert not any(isinstance(c, Finish) for c in r.sent)
    assert r.store.completions == []


def test_the_lease_run_out_by_the_clock_cancels_the_handler_and_writes_nothing() -> None:
    r = reach(W.RUNNING)
    handle = r.held()
    run = r.last(RunHandler)
    r.fire()  # a renewal, never answered
    renewal = r.last(Renew)
    stop = T0 + TTL - STOP_EARLY
    assert r.driver.next_deadline() == stop
    assert r.fire(stop - 1) == []
    assert exact(r.fire()) == [lost("e1", RAN_OUT), CancelHandler(), claim()]
    assert r.now == stop and r.driver.held is None
    before = snapshot(r.driver)
    assert r.feed(answer_of(r, run)) == []  # the late handler result
    # The late renewal's answer (lost on the way to the store, or refused by it).
    assert r.feed(Renewed(command_id=renewal.command_id, cancel_requested=False)) == []
    assert r.feed(StoreFailed(command_id=renewal.command_id, error=LeaseExpired("e1"))) == []
    assert snapshot(r.driver) == before
    # The lease is still live in the store: the slot polls until it runs out, then takes the
    # execution over itself (the same attempt, a new epoch), and runs it again.
    r.answer(Claim)
    while r.answer(Claim) == []:
        assert r.now < T0 + TTL
        r.fire()
        r.answer(Claim)
    again = r.held()
    assert (again.execution_id, again.attempt_index) == ("e1", 0)
    assert again.lease_epoch > handle.lease_epoch
    assert not any(isinstance(c, Finish) for c in r.sent), "nothing written under the old lease"


def test_a_transient_renewal_failure_is_retried_before_the_stop_then_given_up() -> None:
    r = reach(W.RUNNING, RENEWING)
    handle = r.held()
    stop = T0 + TTL - STOP_EARLY
    tries = 0
    while True:
        r.fail(Renew, BUSY)
        deadline = r.driver.next_deadline()
        assert deadline is not None and r.now < deadline <= stop
        if tries == 0:
            assert r.now + 12 <= deadline <= r.now + 25
        if deadline == stop:
            break
        assert exact(r.fire()) == [renew(handle)]
        tries += 1
    assert tries >= 5  # backing off, capped: not once, not a flood
    assert exact(r.fire(stop)) == [lost("e1", RAN_OUT), CancelHandler(), claim()]


@pytest.mark.parametrize(
    "value",
    [{1, 2}, "x" * LIMIT, {"nested": [object()]}],
    ids=["a set", "too large", "an object"],
)
def test_a_value_the_store_refuses_fails_the_execution_for_good(value: Any) -> None:
    r = reach(W.RUNNING)
    handle = r.held()
    assert exact(r.end(value)) == [finish(handle, result=value)]
    refused = r.store.answer(r.last(Finish), r.now, r.config)
    assert isinstance(refused, StoreFailed)
    assert isinstance(refused.error, PayloadNotSerializable | PayloadTooLarge)
    message = f"bad result: {refused.error}"
    assert exact(r.feed(refused)) == [
        finish(handle, failure=FailureClass.PERMANENT, message=message)
    ]
    assert r.state() is W.FINISHING
    assert exact(r.answer(Finish)) == [claim()]
    row = r.store.rows["e1"]
    assert (row.outcome, row.failure) == ("failed", message)


def test_a_permanent_handler_failure_fails_the_execution() -> None:
    r = reach(W.RUNNING)
    handle = r.held()
    out = r.end(failure=FailureClass.PERMANENT, message="bad input")
    assert exact(out) == [finish(handle, failure=FailureClass.PERMANENT, message="bad input")]
    assert exact(r.answer(Finish)) == [claim()]
    row = r.store.rows["e1"]
    assert (row.outcome, row.failure, row.attempt_index) == ("failed", "bad input", 0)


def test_a_transient_handler_failure_is_retried_under_the_executions_policy() -> None:
    r = reach(W.RUNNING)
    message = "RuntimeError: flaky"
    for attempt in range(RETRY.max_attempts):
        handle = r.held()
        assert handle.attempt_index == attempt
        out = r.end(failure=FailureClass.TRANSIENT, message=message)
        assert exact(out) == [finish(handle, failure=FailureClass.TRANSIENT, message=message)]
        assert exact(r.answer(Finish)) == [claim()]
        if attempt == RETRY.max_attempts - 1:
            break
        # Not runnable before its backoff: the slot polls until it is.
        not_before = r.store.rows["e1"].not_before_ms
        assert not_before == r.now + RETRY.backoff_ms(attempt + 1)
        while exact(r.answer(Claim)) != [describe("e1")]:
            assert r.answer(Claim) == []
            r.fire()
        assert r.now >= not_before
        r.answer(Describe)
    assert [c[1] for c in r.store.completions] == ["retry_scheduled", "retry_scheduled", "failed"]
    assert r.store.rows["e1"].outcome == "failed"


# --- store errors, for each store command ---------------------------------------------------

#: Each store command, in the state that sends it: (state, way, command type).
SITUATIONS: Final[dict[str, tuple[SlotState, str, type[Any]]]] = {
    "Claim": (W.CLAIMING, MAIN, Claim),
    "Claim(reclaim)": (W.CLAIMING, RECLAIM, Claim),
    "Describe": (W.DESCRIBING, MAIN, Describe),
    "Renew": (W.RUNNING, RENEWING, Renew),
    "Finish": (W.FINISHING, MAIN, Finish),
}


def situation(name: str) -> tuple[Run, Any]:
    """A driver waiting for the result of the store command ``name``, and that command."""
    state, how, kind = SITUATIONS[name]
    r = reach(state, how)
    command = r.last(kind)
    assert command.command_id in r.outstanding
    return r, command


@pytest.mark.parametrize("name", list(SITUATIONS))
def test_a_busy_store_is_retried_with_backoff_and_a_report(name: str) -> None:
    r, command = situation(name)
    state, held = r.state(), r.driver.held
    kind = type(command)
    windows = [(12, 25), (25, 50), (50, 100), (100, 200)]
    for attempt, (low, high) in enumerate(windows, 1):
        error = BUSY if attempt % 2 else StorageFullError("db")
        out = r.fail(kind, error)
        deadline = r.driver.next_deadline()
        assert deadline is not None and r.now + low <= deadline < r.now + high
        assert exact(out) == [retried(kind.__name__, error, attempt)]
        assert (r.state(), r.driver.held) == (state, held)
        assert r.fire(deadline - 1) == []
        assert exact(r.fire()) == exact([command]), "the same call again"
    # It finally goes through.
    out = r.answer(kind)
    if name == "Claim(reclaim)":
        assert out == [] and r.state() is W.POLLING  # nothing expired: poll
    elif name != "Renew":
        assert out != []


def test_a_busy_store_backs_off_up_to_a_cap_and_is_never_fatal() -> None:
    r, _ = situation("Claim")
    for attempt in range(1, 16):
        out = r.fail(Claim, BUSY)
        assert exact(out) == [retried("Claim", BUSY, attempt)]
        deadline = r.driver.next_deadline()
        ceiling = min(CAP, BASE << (attempt - 1))
        assert deadline is not None and r.now + ceiling // 2 <= deadline <= r.now + ceiling
        assert exact(r.fire()) == [claim()]
    assert r.state() is W.CLAIMING
    assert exact(r.answer(Claim)) == [describe("e1")]
    # Done with: the next call's first retry is a first again.
    r.answer(Describe)
    r.end("ok")
    assert exact(r.fail(Finish, BUSY)) == [retried("Finish", BUSY, 1)]


def test_a_new_store_call_after_a_lost_execution_starts_its_retries_afresh() -> None:
    """A Finish refused while the store is busy, then found lost: the next call (a claim)
    is a new call, its first retry is attempt 1 (a warning), after the shortest backoff."""
    r = reach(W.FINISHING)
    r.fail(Finish, BUSY)
    r.fire()
    r.fail(Finish, BUSY)
    r.fire()
    assert exact(r.fail(Finish, LeaseExpired("e1"))) == [
        lost("e1", why(LeaseExpired("e1"))),
        claim(),
    ]
    out = r.fail(Claim, BUSY)
    deadline = r.driver.next_deadline()
    assert exact(out) == [retried("Claim", BUSY, 1)]
    assert deadline is not None and r.now + 12 <= deadline <= r.now + 25


@pytest.mark.parametrize(
    ("name", "error", "expected"),
    [
        ("Describe", ExecutionNotFound("e1"), ["lost", claim()]),
        ("Renew", LeaseExpired("e1"), ["lost", CancelHandler(), claim()]),
        ("Finish", LeaseExpired("e1"), ["lost", claim()]),
        ("Finish", LeaseConflict("e1", 1, 2), ["lost", claim()]),
        ("Finish", ExecutionTerminal("e1", "cancelled"), ["lost", claim()]),
    ],
    ids=str,
)
def test_a_lost_execution_is_dropped_and_the_slot_claims_again(
    name: str, error: BaseException, expected: list[object]
) -> None:
    r, command = situation(name)
    out = r.fail(type(command), error)
    assert exact(out) == [lost("e1", why(error)) if c == "lost" else c for c in expected]
    assert r.state() is W.CLAIMING and r.driver.held is None
    assert r.driver.next_deadline() is None
    assert not any(isinstance(c, Finish) for c in out)


@pytest.mark.parametrize("name", list(SITUATIONS))
def test_a_closed_store_stops_the_slot(name: str) -> None:
    r, command = situation(name)
    outstanding = list(r.outstanding.values())
    out = r.fail(type(command), CLOSED)
    assert out == ([CancelHandler()] if name == "Renew" else [])
    assert r.state() is W.STOPPED and r.driver.finished
    assert r.driver.next_deadline() is None
    # Stopped for good: late results, wakes and timers change nothing.
    before = snapshot(r.driver)
    for other in outstanding:
        if other.command_id != command.command_id:
            assert r.feed(answer_of(r, other)) == []
    assert r.feed(Woken()) == []
    assert r.feed(TimerFired(), at=r.now + 60_000) == []
    assert snapshot(r.driver)[:3] == before[:3] and r.driver.next_deadline() is None


@pytest.mark.parametrize(
    "error",
    # A claim cannot lose what it does not hold yet: a "lost" error from it is a failure like
    # any other, not a reason to claim again at once (a store raising it every time would spin).
    [CORRUPT, ExecutionNotFound("e1"), LeaseConflict("e1", 1, 2)],
    ids=lambda e: type(e).__name__,
)
def test_a_claim_that_fails_for_good_is_reported_and_tried_later(error: BaseException) -> None:
    for name, reclaim in (("Claim", False), ("Claim(reclaim)", True)):
        r, _ = situation(name)
        assert exact(r.fail(Claim, error)) == [failed("Claim", error)]
        assert r.state() is W.CLAIMING and r.driver.next_deadline() == r.now + CAP
        assert r.fire(r.now + CAP - 1) == []
        assert exact(r.fire()) == [claim(reclaim=reclaim)]


def test_a_describe_that_fails_for_good_fails_the_execution() -> None:
    r, _ = situation("Describe")
    handle = r.held()
    message = f"cannot read it: {why(CORRUPT)}"
    assert exact(r.fail(Describe, CORRUPT)) == [
        finish(handle, failure=FailureClass.PERMANENT, message=message)
    ]
    assert r.state() is W.FINISHING
    assert not any(isinstance(c, RunHandler) for c in r.sent)
    assert exact(r.answer(Finish)) == [claim()]
    row = r.store.rows["e1"]
    assert (row.outcome, row.failure) == ("failed", message)


def test_a_renewal_that_fails_for_good_is_reported_and_retried() -> None:
    r, _ = situation("Renew")
    handle = r.held()
    assert exact(r.fail(Renew, CORRUPT)) == [failed("Renew", CORRUPT)]
    assert r.state() is W.RUNNING
    deadline = r.driver.next_deadline()
    assert deadline is not None and r.now + 12 <= deadline <= r.now + 25
    assert exact(r.fire()) == [renew(handle)]


def test_a_finish_that_fails_for_good_is_dropped_and_the_work_returns_with_its_lease() -> None:
    r, _ = situation("Finish")
    handle = r.held()
    assert exact(r.fail(Finish, CORRUPT)) == [failed("Finish", CORRUPT), claim()]
    assert r.state() is W.CLAIMING and r.driver.held is None
    # The execution is still active under the dropped lease: reclaimed once it runs out.
    r.answer(Claim)
    while r.answer(Claim) == []:
        r.fire()
        r.answer(Claim)
    again = r.held()
    assert again.execution_id == "e1" and again.lease_epoch > handle.lease_epoch


def test_a_failure_the_store_refuses_is_dropped_not_retried() -> None:
    """Only a *value* the store refuses turns into a permanent failure; a failure record the
    store refuses (a bad argument) is a failing call: reported, the execution dropped."""
    r = reach(W.RUNNING)
    handle = r.held()
    r.end(failure=FailureClass.TRANSIENT, message="boom")
    error = InvalidArgument("message too long")
    assert exact(r.fail(Finish, error)) == [failed("Finish", error), claim()]
    assert r.driver.held is None and r.state() is W.CLAIMING
    assert r.store.rows["e1"].lease_epoch == handle.lease_epoch  # left to run out


def test_a_describe_answered_after_the_lease_ran_out_does_not_run_the_handler() -> None:
    """The keeper's docstring: once the lease has run out by the driver's clock, "the driver
    stops working under it at once", because the next holder may already have it. A read that
    comes back after that must not start the handler under the dead lease."""
    r = reach(W.DESCRIBING)  # claimed at T0: the store's lease runs until T0 + TTL
    reply = r.store.answer(r.last(Describe), r.now, r.config)  # read at once, replied late
    stop = T0 + TTL - STOP_EARLY
    # Time passes; the slot's timers fire when it asks (none of its calls come back).
    for _ in range(100):
        deadline = r.driver.next_deadline()
        if deadline is None or deadline > stop:
            break
        r.fire()
    out = r.feed(reply, at=max(r.now, stop + 1))
    assert not any(isinstance(c, RunHandler) for c in r.sent), (
        f"the handler was started at {r.now - T0} ms, past the stop at {stop - T0} ms: {exact(out)}"
    )
    assert r.driver.held is None


# --- 3. properties: a simulated lane, random latencies, faults and other workers --------------

#: A value a handler may return that the store cannot keep.
NOT_JSON: Final[Any] = {1, 2}
#: What a handler does, per run: return a value, return a value the store refuses, fail
#: (transiently or for good), or never end.
BEHAVIOURS: Final = ("ok", "bad", "transient", "permanent", "hang")


@attrs.frozen
class World:
    """What the world does, drawn by hypothesis: executions created at times (with a priority
    and what their handler does on each run), latencies of every call and handler (so results
    come back in any order, some after the lease ran out), store faults, another worker that
    takes over leases that ran out (and then finishes the work, or dies too), cancel requests
    and stray wakes. Once a list runs out, the world is calm: no latency, no faults."""

    #: (delay after the previous one, priority, the handler's behaviour on each run).
    executions: tuple[tuple[int, int, tuple[str, ...]], ...]
    latencies: tuple[int, ...] = ()
    #: Per store call: 0 busy, 1 busy after applying (its reply lost), 2 failing for good
    #: (a corrupt record), else fine.
    faults: tuple[int, ...] = ()
    #: (when another worker starts looking for a lease that ran out, whether it finishes
    #: what it takes over).
    steals: tuple[tuple[int, bool], ...] = ()
    #: (when, which execution): a cancel request.
    cancels: tuple[tuple[int, int], ...] = ()
    wakes: tuple[int, ...] = ()
    #: Stray timers (the actor's timer fires early, or twice).
    timers: tuple[int, ...] = ()
    #: How long each handler run takes (until it ends, if it does).
    durations: tuple[int, ...] = ()
    #: (when, how long): the store stalls (a long transaction, a paused disk): what reaches it
    #: then is carried out, and what it answers then comes back, only when the stall ends.
    stalls: tuple[tuple[int, int], ...] = ()


#: Events that are work in flight (the rest is the world's own schedule).
IN_FLIGHT: Final = frozenset({"create", "carry_out", "report", "handler_end", "other_finish"})


class Sim:
    """The slot's actor and world as a discrete-event simulation; checks the driver's
    invariants after every event it is fed."""

    #: Faults of one command kind in a row, at most (a transient error is transient).
    MAX_FAULTS_IN_A_ROW: Final = 3
    #: From then on an operator cancels whatever still runs (a handler that never ends).
    END: Final = 90_000
    STEAL_TRIES: Final = 40
    POLL: Final = 1_000
    MAX_STEPS: Final = 5_000

    def __init__(self, world: World) -> None:
        self.world = world
        self.run = Run(poll=self.POLL)
        self._latencies = list(world.latencies)
        self._durations = list(world.durations)
        self._faults = list(world.faults)
        self._queue: list[tuple[int, int, str, Any]] = []
        self._seq = 0
        self.names: list[str] = []
        self.plans: dict[str, list[str]] = {}
        self.ids: set[int] = set()
        #: When each command was sent, and the commands whose results were not fed yet.
        self.sent_at: dict[int, int] = {}
        self.unanswered: dict[int, Command] = {}
        #: The handler running, if any; the handlers cancelled.
        self.handler: RunHandler | None = None
        self.cancelled: set[int] = set()
        #: Handles the driver let go of, and those whose Finish it saw recorded.
        self.dropped: set[Handle] = set()
        self.recorded: set[Handle] = set()
        #: When the driver must stop under each handle, by what it learned of its lease.
        self.stop_at: dict[Handle, int] = {}
        self.in_a_row: dict[type[Any], int] = {}
        self.log: deque[str] = deque(maxlen=12)
        at = T0
        for i, (delay, priority, plan) in enumerate(world.executions):
            at += delay
            self.schedule(at, "create", (f"e{i}", priority, plan))
        self.schedule(T0, "wakes", None)
        for kind in ("wakes", "timers"):
            for delay in getattr(world, kind):
                self.schedule(T0 + delay, kind, None)
        for delay, finishes in world.steals:
            self.schedule(T0 + delay, "steal", (finishes, 0))
        for delay, index in world.cancels:
            self.schedule(T0 + delay, "cancel", f"e{index}")
        self.schedule(T0 + self.END, "end", None)

    @property
    def driver(self) -> WorkerDriver:
        return self.run.driver

    @property
    def store(self) -> Store:
        return self.run.store

    def schedule(self, at: int, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, payload))

    def arrival(self) -> int:
        """When a store call sent now reaches the store (or its answer comes back)."""
        at = self.run.now + (self._latencies.pop(0) if self._latencies else 0)
        for start, length in self.world.stalls:
            if T0 + start <= at < T0 + start + length:
                at = T0 + start + length
        return at

    def fault(self, kind: type[Any]) -> int:
        code = self._faults.pop(0) if self._faults else 9
        if code < 3 and self.in_a_row.get(kind, 0) < self.MAX_FAULTS_IN_A_ROW:
            self.in_a_row[kind] = self.in_a_row.get(kind, 0) + 1
            return code
        self.in_a_row[kind] = 0
        return 9

    # --- the run ---

    def settled(self) -> bool:
        return (
            all(row.phase == "terminal" for row in self.store.rows.values())
            and not any(kind in IN_FLIGHT for _, _, kind, _ in self._queue)
            and self.handler is None
            and self.driver.state in (W.IDLE, W.POLLING)
        )

    def play(self) -> None:
        for _ in range(self.MAX_STEPS):
            if self.settled():
                return
            deadline = self.driver.next_deadline()
            # The driver's own deadline first when it is due (its stop must come before
            # anything that happens at the same time).
            if self._queue and (deadline is None or self._queue[0][0] < deadline):
                at, _, kind, payload = heapq.heappop(self._queue)
                self.run.now = max(self.run.now, at)
                self.happen(kind, payload)
            elif deadline is not None:
                self.timer(deadline)
            else:
                raise AssertionError(
                    f"stalled in {self.driver.state}: no deadline, nothing in flight"
                )
        raise AssertionError(f"did not settle, in {self.driver.state}: {list(self.log)}")

    def happen(self, kind: str, payload: Any) -> None:
        r, store = self.run, self.store
        if kind == "create":
            name, priority, plan = payload
            store.create(name, r.now, priority=priority)
            self.names.append(name)
            self.plans[name] = list(plan)
        elif kind == "wakes":
            self.feed(Woken())
        elif kind == "timers":
            self.timer(r.now)
        elif kind == "steal":
            finishes, tries = payload
            handle = store.claim(OTHER, (), TTL, r.now, reclaim=True)
            if handle is not None:
                if finishes:
                    self.schedule(self.arrival(), "other_finish", handle)
            elif tries < self.STEAL_TRIES:
                self.schedule(r.now + 500, kind, (finishes, tries + 1))
        elif kind == "other_finish":
            # Its lease may have run out meanwhile: then it died after all.
            with contextlib.suppress(TurnbuckleError):
                store.complete(payload, "theirs", r.now)
        elif kind == "cancel":
            if payload in store.rows:
                store.request_cancel(payload)
        elif kind == "end":
            # Only what runs (a runnable execution is the slot's to claim), and again later,
            # for a hung handler that takes over a cancelled run.
            for name, row in store.rows.items():
                if row.phase == "active":
                    store.request_cancel(name)
            self.schedule(r.now + 10_000, "end", None)
        elif kind == "carry_out":
            self.carry_out(payload)
        elif kind in ("report", "handler_end"):
            self.feed(payload)
        else:  # pragma: no cover
            raise AssertionError(kind)

    def carry_out(self, command: StoreCommand) -> None:
        r = self.run
        fault = self.fault(type(command))
        result: Event
        if fault == 0:
            result = StoreFailed(command_id=command.command_id, error=BUSY)
        elif fault == 2:
            result = StoreFailed(command_id=command.command_id, error=CORRUPT)
        else:
            result = self.store.answer(command, r.now, r.config)
            if fault == 1:  # applied; its reply is lost
                result = StoreFailed(command_id=command.command_id, error=BUSY)
        self.schedule(self.arrival(), "report", result)

    def start_handler(self, command: RunHandler) -> None:
        name = command.handle.execution_id
        plan = self.plans[name]
        behaviour = plan.pop(0) if plan else "ok"
        ended = {
            "ok": HandlerEnded(command_id=command.command_id, value={"ok": name}),
            "bad": HandlerEnded(command_id=command.command_id, value=NOT_JSON),
            "transient": HandlerEnded(
                command_id=command.command_id,
                failure=FailureClass.TRANSIENT,
                message="RuntimeError: flaky",
            ),
            "permanent": HandlerEnded(
                command_id=command.command_id,
                failure=FailureClass.PERMANENT,
                message="bad input",
            ),
        }.get(behaviour)
        if ended is not None:  # else it hangs, until cancelled
            duration = self._durations.pop(0) if self._durations else 0
            self.schedule(self.run.now + duration, "handler_end", ended)

    def timer(self, at: int) -> None:
        self.run.now = max(at, self.run.now)
        for _ in range(2):  # due again at once: the actor fires again, and it must get on
            out = self.feed(TimerFired())
            deadline = self.driver.next_deadline()
            assert out or deadline is None or deadline > self.run.now, (
                f"spins: in {self.driver.state}, asks for {deadline} at {self.run.now} again"
            )
            if deadline is None or deadline > self.run.now:
                return

    def feed(self, event: Event) -> list[Command]:
        r, d = self.run, self.driver
        self.check_lease("before")
        held, state = d.held, d.state
        command_id = getattr(event, "command_id", None)
        command = None if command_id is None else self.unanswered.pop(command_id, None)
        late = command_id in self.cancelled
        out = r.feed(event)  # the driver never raises: any exception fails the test
        self.log.append(
            f"{r.now - T0}: {state.name} {type(event).__name__}"
            f" -> {[type(c).__name__ for c in out]}"
        )
        if late:
            assert out == [], "a result of a cancelled handler was not ignored"
        if self.handler is not None and self.handler.command_id == command_id:
            self.handler = None
        # What the driver learned of its lease (a grant or renewal it took).
        if command_id is not None and command is not None:
            sent_at = self.sent_at[command_id]
            claimed = isinstance(event, ExecutionClaimed) and event.handle is not None
            if claimed and d.held is not None and d.held == getattr(event, "handle", None):
                self.stop_at[d.held] = sent_at + TTL - STOP_EARLY
            took = state in (W.DESCRIBING, W.RUNNING) and isinstance(event, Renewed)
            if took and held is not None and held == getattr(command, "handle", None):
                self.stop_at[held] = max(self.stop_at[held], sent_at + TTL - STOP_EARLY)
            done = state is W.FINISHING and isinstance(event, Finished)
            if done and held is not None and held == getattr(command, "handle", None):
                self.recorded.add(held)
        if held is not None and d.held != held:
            self.dropped.add(held)
        for c in out:
            self.sent(c)
        self.check_lease("after")
        if d.state in (W.DESCRIBING, W.RUNNING) and d.held is not None:
            # It keeps a timer for its stop, by what it learned of the lease.
            deadline = d.next_deadline()
            stop = self.stop_at[d.held]
            assert deadline is not None and deadline <= stop, (
                f"running with no timer for the stop at {stop - T0}: {list(self.log)}"
            )
        if d.next_deadline() is None and d.state not in (W.IDLE, W.STOPPED):
            assert any(kind in IN_FLIGHT for _, _, kind, _ in self._queue), (
                f"stuck in {d.state}: no deadline and nothing in flight: {list(self.log)}"
            )
        return out

    def sent(self, c: Command) -> None:
        r, d = self.run, self.driver
        if isinstance(c, WithId):
            assert c.command_id not in self.ids, f"command id reused: {c}"
            self.ids.add(c.command_id)
            self.sent_at[c.command_id] = r.now
            self.unanswered[c.command_id] = c
        if isinstance(c, Renew | Finish | RunHandler):
            assert c.handle not in self.dropped, f"{type(c).__name__} for a dropped handle"
            assert c.handle == d.held, f"{type(c).__name__} for a handle the slot does not hold"
        if isinstance(c, Finish):
            assert c.handle not in self.recorded, f"a second Finish for one attempt: {c}"
            others = [
                o
                for o in self.unanswered.values()
                if isinstance(o, Finish) and o.handle == c.handle and o is not c
            ]
            assert not others, f"two Finish at once for one attempt: {others}, {c}"
        if isinstance(c, StoreCommand):
            self.schedule(self.arrival(), "carry_out", c)
        elif isinstance(c, RunHandler):
            assert self.handler is None, "two handlers at once"
            stop = self.stop_at[c.handle]
            assert r.now < stop, (
                f"the handler starts at {r.now - T0} under a lease the slot gave up at"
                f" {stop - T0}: {list(self.log)}"
            )
            self.handler = c
            self.start_handler(c)
        elif isinstance(c, CancelHandler):
            assert self.handler is not None, "a CancelHandler with no handler running"
            self.cancelled.add(self.handler.command_id)
            self.handler = None

    def check_lease(self, when: str) -> None:
        """A handler runs only while its lease is live and still its own in the store, and
        while the driver watches it."""
        if self.handler is None:
            return
        handle, now = self.handler.handle, self.run.now
        assert self.driver.state is W.RUNNING and self.driver.held == handle, (
            f"a handler runs that the slot no longer watches ({when}): {list(self.log)}"
        )
        row = self.store.rows[handle.execution_id]
        assert (
            row.phase == "active"
            and row.lease_epoch == handle.lease_epoch
            and (row.lease_expires_at_ms or 0) > now
        ), f"the handler runs past its lease at {now - T0} ({when}): {list(self.log)}"


DELAYS: Final = st.sampled_from([0, 1, 20, 300, 2_000, 6_000, 12_000, 20_000])
WORLDS: Final = st.builds(
    World,
    executions=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 500, 5_000, 20_000]),
            st.integers(0, 2),
            st.lists(st.sampled_from(BEHAVIOURS), max_size=3).map(tuple),
        ),
        min_size=1,
        max_size=4,
    ).map(tuple),
    latencies=st.lists(DELAYS, max_size=40).map(tuple),
    faults=st.lists(st.integers(0, 6), max_size=30).map(tuple),
    steals=st.lists(st.tuples(st.integers(0, 60_000), st.booleans()), max_size=2).map(tuple),
    cancels=st.lists(st.tuples(st.integers(0, 60_000), st.integers(0, 3)), max_size=2).map(tuple),
    wakes=st.lists(st.integers(0, 60_000), max_size=3).map(tuple),
    timers=st.lists(st.integers(0, 60_000), max_size=3).map(tuple),
    durations=st.lists(st.sampled_from([0, 100, 3_000, 20_000, 40_000]), max_size=6).map(tuple),
    stalls=st.lists(
        st.tuples(st.integers(0, 60_000), st.sampled_from([3_000, 9_000, 16_000, 30_000])),
        max_size=2,
    ).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(world=WORLDS)
# Found by this test (kept, so they are always tried first):
# the claim's reply comes after the lease it granted ran out (by the slot's clock, and by the
# store's): the slot reads the execution and starts the handler under the dead lease;
@example(World(executions=((0, 0, ()),), latencies=(0, 20_000)))
# the read's reply comes after the slot's stop: the handler starts all the same (and the lease
# is not renewed while reading).
@example(World(executions=((0, 0, ()),), latencies=(0, 0, 0, 14_000)))
def test_any_world_keeps_the_invariants_and_ends_every_execution_once(world: World) -> None:
    sim = Sim(world)
    sim.play()
    store, d = sim.store, sim.driver
    assert d.state in (W.IDLE, W.POLLING) and d.held is None
    for name in sim.names:
        row = store.rows[name]
        assert row.phase == "terminal", name
        ends = [kind for e, kind, _, _ in store.completions if e == name]
        # Ended exactly once, as the store says; every earlier attempt was retried.
        assert ends[-1] == row.outcome and ends[:-1] == ["retry_scheduled"] * (len(ends) - 1)
        assert len(ends) <= RETRY.max_attempts
    # One record per attempt, whoever made it.
    attempts = [(e, attempt) for e, _, attempt, _ in store.completions]
    assert len(attempts) == len(set(attempts))
