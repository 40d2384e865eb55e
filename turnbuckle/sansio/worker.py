"""The worker driver: everything one worker slot decides, as a pure machine.

Theory of operation
-------------------

A worker runs N slots; each slot loops over executions of one lane: claim the best one it can
serve (or, when none is runnable, reclaim one whose worker's lease ran out), read it, run the
host's handler on it while keeping its lease, and record how the handler ended. As with the
session driver (:mod:`turnbuckle.sansio.driver`), the slot's actor decides nothing: it feeds this
driver events with the time of the store's clock and carries out its commands; results carry the
``command_id`` of the command they answer, and a result the driver no longer waits for is ignored.

::

    IDLE --woken--> CLAIMING --nothing runnable: reclaim; nothing either--> POLLING
                     |   ^                                                     |
           (claimed) |   \\----------------- timer or woken --------------------/
                     v
                DESCRIBING --read--> RUNNING --handler ended--> FINISHING --recorded--> CLAIMING

    DESCRIBING, RUNNING --cancel requested--> FINISHING (the execution ends ``cancelled``)
    DESCRIBING --unreadable--> FINISHING (the execution fails for good)
    DESCRIBING, RUNNING, FINISHING --lease lost: cancel the handler, write nothing--> CLAIMING

From the claim until the handler ends (DESCRIBING and RUNNING), the
:class:`~turnbuckle.sansio.keeper.LeaseKeeper` renews the execution's lease every ttl/3 (the same
schedule, retries and expiry rule as a session lease), and the slot works under it only until it
runs out by the shared clock: a claim or a read answered after that is given up, not run. A
renewal that says cancellation was requested cancels the handler (or, before it started, does
not start it) and ends the execution ``cancelled``. A lease lost (a renewal refused, a newer
claim, or the lease run out) cancels the handler and writes nothing: whoever holds the execution
now finishes it. FINISHING does not renew: the record is one call, and if store trouble holds it
up until the lease runs out, the store refuses it and the execution runs again elsewhere (at
least once, as a crash there would).

How the handler ended decides the record: a value completes the execution (a value the store
refuses, not JSON say, fails it for good, with the reason); a permanent failure fails it; any
other exception fails the attempt as transient, so the execution's retry policy decides. A
transient store error is retried with backoff and reported (``store_retry``), never fatal to
the slot; a call that fails for good is reported (``worker_error``): a claim is tried again after
the backoff's cap, an unreadable execution is failed, a record that cannot be written is left to
run out and return to the lane. A store that was closed stops the slot.
"""

from __future__ import annotations

import enum
from typing import Any, Final, TypeAlias, final

import attrs

from turnbuckle.errors import (
    ExecutionNotFound,
    ExecutionTerminal,
    InvalidArgument,
    LeaseConflict,
    LeaseExpired,
)
from turnbuckle.sansio.codec import JSON, check_int64, check_text, sequence
from turnbuckle.sansio.driver import SessionEvent
from turnbuckle.sansio.execution import FailureClass, Handle
from turnbuckle.sansio.ids import IdSource
from turnbuckle.sansio.keeper import (
    Backoff,
    CommandMachine,
    Fault,
    LeaseKeeper,
    Severity,
    classify,
    describe,
    store_retry,
)

__all__ = [
    "CancelHandler",
    "Claim",
    "Command",
    "Describe",
    "Described",
    "Event",
    "ExecutionClaimed",
    "Finish",
    "Finished",
    "HandlerEnded",
    "Renew",
    "Renewed",
    "Report",
    "RunHandler",
    "SlotState",
    "StoreFailed",
    "TimerFired",
    "Woken",
    "WorkerConfig",
    "WorkerDriver",
]


class SlotState(enum.Enum):
    """Where one worker slot is (see the module docstring)."""

    IDLE = "idle"
    #: A claim (or a reclaim of an expired lease) is in flight.
    CLAIMING = "claiming"
    #: Nothing to claim: look again after the poll interval, or when woken.
    POLLING = "polling"
    #: Reading the claimed execution (its payload) for the handler.
    DESCRIBING = "describing"
    #: The handler runs; the keeper renews the lease.
    RUNNING = "running"
    #: Recording how the handler ended.
    FINISHING = "finishing"
    #: The store was closed: the slot ends.
    STOPPED = "stopped"


@attrs.frozen(kw_only=True)
class WorkerConfig:
    lane: str
    capabilities: tuple[str, ...] = attrs.field(converter=sequence)
    worker_id: str
    lease_ttl_ms: int = 30_000
    #: How long an idle slot waits before it looks for work again.
    poll_ms: int = 50
    backoff: Backoff = attrs.field(factory=Backoff)

    def __attrs_post_init__(self) -> None:
        check_text("lane", self.lane)
        check_text("worker_id", self.worker_id)
        for capability in self.capabilities:
            check_text("capability", capability)
        if type(self.lease_ttl_ms) is not int or self.lease_ttl_ms < 30:
            raise InvalidArgument(f"lease_ttl_ms must be an int >= 30, got {self.lease_ttl_ms!r}")
        check_int64("poll_ms", self.poll_ms, minimum=1)


# --- events ----------------------------------------------------------------------------------


@final
@attrs.frozen
class Woken:
    """Start, or look for work now (work may have arrived)."""


@final
@attrs.frozen
class TimerFired:
    """The time :meth:`WorkerDriver.next_deadline` asked for has come."""


@final
@attrs.frozen(kw_only=True)
class ExecutionClaimed:
    command_id: int
    #: None: nothing this slot can serve.
    handle: Handle | None


@final
@attrs.frozen(kw_only=True)
class Described:
    command_id: int
    #: What the handler gets to read (opaque here).
    info: Any


@final
@attrs.frozen(kw_only=True)
class Renewed:
    command_id: int
    cancel_requested: bool


@final
@attrs.frozen(kw_only=True)
class HandlerEnded:
    """The handler returned ``value`` (``failure`` None), or raised: ``failure`` says how the
    attempt failed (permanent or transient) and ``message`` why."""

    command_id: int
    value: JSON = None
    failure: FailureClass | None = None
    message: str = ""


@final
@attrs.frozen(kw_only=True)
class Finished:
    command_id: int


@final
@attrs.frozen(kw_only=True)
class StoreFailed:
    command_id: int
    error: BaseException


Event: TypeAlias = (
    Woken
    | TimerFired
    | ExecutionClaimed
    | Described
    | Renewed
    | HandlerEnded
    | Finished
    | StoreFailed
)

# --- commands --------------------------------------------------------------------------------


@final
@attrs.frozen(kw_only=True)
class Claim:
    """Claim the best runnable execution (``reclaim``: one whose worker's lease expired)."""

    command_id: int
    reclaim: bool


@final
@attrs.frozen(kw_only=True)
class Describe:
    command_id: int
    execution_id: str


@final
@attrs.frozen(kw_only=True)
class Renew:
    command_id: int
    handle: Handle


@final
@attrs.frozen(kw_only=True)
class RunHandler:
    command_id: int
    handle: Handle
    info: Any


@final
@attrs.frozen
class CancelHandler:
    """Cancel the running handler (its end will be ignored)."""


@final
@attrs.frozen(kw_only=True)
class Finish:
    """Record the end of the attempt: ``failure`` None completes it with ``result``."""

    command_id: int
    handle: Handle
    result: JSON = None
    failure: FailureClass | None = None
    message: str = ""


@final
@attrs.frozen(kw_only=True)
class Report:
    """Something to log (and nothing to do)."""

    event: SessionEvent


Command: TypeAlias = Claim | Describe | Renew | RunHandler | CancelHandler | Finish | Report
_StoreCommand: TypeAlias = Claim | Describe | Renew | Finish

#: Errors that mean "this execution is no longer ours".
_LOST: Final = (LeaseConflict, LeaseExpired, ExecutionTerminal, ExecutionNotFound)
#: The states in which the slot holds an execution's lease and keeps it.
_KEEPING: Final = frozenset({SlotState.DESCRIBING, SlotState.RUNNING})
_RAN_OUT: Final = "the lease ran out before it could be renewed"


class WorkerDriver(CommandMachine[SlotState, Event, Command]):
    """The decisions of one worker slot (see the module docstring): ``handle(event, now_ms)``
    returns the commands to carry out; ``next_deadline()`` says when to report
    :class:`TimerFired`."""

    NAME = "worker driver"

    def __init__(self, config: WorkerConfig, *, ids: IdSource) -> None:
        super().__init__()
        self.config = config
        self._ids = ids
        self.state = SlotState.IDLE
        self._keeper = LeaseKeeper(ttl_ms=config.lease_ttl_ms, backoff=config.backoff)
        #: The execution this slot holds, if any.
        self.held: Handle | None = None
        self._retry: tuple[int, _StoreCommand] | None = None
        self._retries = 0
        self._poll_at: int | None = None

    @property
    def finished(self) -> bool:
        """True once the slot stopped (its store was closed)."""
        return self.state is SlotState.STOPPED

    def next_deadline(self) -> int | None:
        """When the driver next needs a :class:`TimerFired` (None: only events)."""
        times = []
        if self.state in _KEEPING:
            times.append(self._keeper.deadline())
        if self._retry is not None:
            times.append(self._retry[0])
        if self._poll_at is not None:
            times.append(self._poll_at)
        return min(times) if times else None

    # --- helpers ---

    def _report(self, kind: str, data: JSON, severity: Severity) -> None:
        self._out.append(Report(event=SessionEvent(type=kind, data=data, severity=severity)))

    def _worker_error(self, what: str, error: BaseException) -> None:
        """A store call failed for good (not a transient error, not a lost execution)."""
        self._report("worker_error", {"while": what, "error": describe(error)}, Severity.ERROR)

    def _sent_at(self) -> int:
        """When the command whose result is being handled was sent."""
        assert self._current is not None
        return self._current[1]

    def _claim(self, *, reclaim: bool) -> None:
        self.state = SlotState.CLAIMING
        self._poll_at = None
        self._send(Claim(command_id=self._new_id(), reclaim=reclaim))

    def _drop(self) -> None:
        """Forget the execution (recorded, or no longer ours) and look for the next."""
        self.held = None
        self._keeper.in_flight = None
        self._retry, self._retries = None, 0
        self._pending.clear()
        self._claim(reclaim=False)

    def _finish(self, **how: Any) -> None:
        assert self.held is not None
        # The attempt ends here: no more renewals, and a renewal (or a read) in flight no longer
        # matters.
        self._forget((Renew, RunHandler, Describe))
        self._keeper.in_flight = None
        self.state = SlotState.FINISHING
        self._send(Finish(command_id=self._new_id(), handle=self.held, **how))

    def _lose(self, why: str) -> None:
        assert self.held is not None
        self._report(
            "execution_lost",
            {"execution_id": self.held.execution_id, "reason": why},
            Severity.WARNING,
        )
        if self.state is SlotState.RUNNING:
            self._out.append(CancelHandler())
        self._drop()

    # --- handlers ---

    def _on_start(self, event: Woken, now_ms: int) -> None:
        self._claim(reclaim=False)

    def _ignore(self, event: Event, now_ms: int) -> None:
        pass

    def _on_claimed(self, event: ExecutionClaimed, now_ms: int) -> None:
        self._retries = 0
        command = self._current
        if event.handle is not None:
            self.held = event.handle
            # The store's lease began when it took the claim: no earlier than it was sent.
            sent_at = self._sent_at()
            self._keeper.hold(now_ms, sent_at + self.config.lease_ttl_ms)
            self.state = SlotState.DESCRIBING
            if self._keeper.expired(now_ms):
                self._lose("the claim was answered after its lease ran out")
                return
            execution_id = event.handle.execution_id
            self._send(Describe(command_id=self._new_id(), execution_id=execution_id))
        elif command is not None and isinstance(command[0], Claim) and not command[0].reclaim:
            self._claim(reclaim=True)
        else:
            self.state = SlotState.POLLING
            self._poll_at = now_ms + self.config.poll_ms

    def _on_described(self, event: Described, now_ms: int) -> None:
        self._retries = 0
        assert self.held is not None
        if self._keeper.expired(now_ms):
            self._lose(_RAN_OUT)
            return
        self.state = SlotState.RUNNING
        self._send(RunHandler(command_id=self._new_id(), handle=self.held, info=event.info))

    def _on_renewed(self, event: Renewed, now_ms: int) -> None:
        sent_at = self._sent_at()
        self._keeper.hold(now_ms, sent_at + self.config.lease_ttl_ms)
        if event.cancel_requested:
            if self.state is SlotState.RUNNING:
                self._out.append(CancelHandler())
            self._finish(failure=FailureClass.CANCELLED, message="cancelled on request")

    def _on_handler_ended(self, event: HandlerEnded, now_ms: int) -> None:
        if event.failure is None:
            self._finish(result=event.value)
        else:
            self._finish(failure=event.failure, message=event.message)

    def _on_finished(self, event: Finished, now_ms: int) -> None:
        self._retries = 0
        self._drop()

    def _on_timer(self, event: TimerFired, now_ms: int) -> None:
        if self.state in _KEEPING:
            assert self.held is not None
            if self._keeper.expired(now_ms):
                self._lose(_RAN_OUT)
                return
            if self._keeper.due(now_ms):
                command_id = self._new_id()
                self._keeper.sent(command_id)
                self._send(Renew(command_id=command_id, handle=self.held))
        if self._retry is not None and now_ms >= self._retry[0]:
            command = self._retry[1]
            self._retry = None
            self._send(attrs.evolve(command, command_id=self._new_id()))
        if self._poll_at is not None and now_ms >= self._poll_at:
            self._claim(reclaim=False)

    def _on_store_failed(self, event: StoreFailed, now_ms: int) -> None:
        assert self._current is not None
        command, error = self._current[0], event.error
        assert isinstance(command, Claim | Describe | Renew | Finish)
        fault = classify(error, _LOST)
        what = type(command).__name__
        if fault is Fault.CLOSED:
            if self.state is SlotState.RUNNING:
                self._out.append(CancelHandler())
            self.state = SlotState.STOPPED
            self.held = None
            self._pending.clear()
            self._retry = self._poll_at = None
            return
        if isinstance(command, Renew):
            if fault is Fault.LOST:
                self._lose(describe(error))
                return
            delay = self._keeper.retry_later(now_ms, self._ids)
            if fault is Fault.RETRY:
                self._report("store_retry", *store_retry(what, error, self._keeper.failures, delay))
            else:
                self._worker_error(what, error)
            return
        if fault is Fault.LOST and self.held is not None:
            self._lose(describe(error))
            return
        if fault is Fault.RETRY:
            delay = self.config.backoff.delay_ms(self._retries, self._ids)
            self._retries += 1
            self._retry = (now_ms + delay, command)
            self._report("store_retry", *store_retry(what, error, self._retries, delay))
            return
        # FAIL: the same call again will not help.
        self._retries = 0
        if (
            isinstance(command, Finish)
            and command.failure is None
            and isinstance(error, InvalidArgument)
        ):
            # The handler's value cannot be stored (not JSON, too large): fail it for good.
            self._finish(failure=FailureClass.PERMANENT, message=f"bad result: {error}")
            return
        if isinstance(command, Describe):
            self._finish(
                failure=FailureClass.PERMANENT, message=f"cannot read it: {describe(error)}"
            )
            return
        self._worker_error(what, error)
        if isinstance(command, Claim):
            # Claiming itself fails (a corrupt row, a bug, or a "lost" error, which a claim
            # cannot mean): try again later, never give up, never spin.
            self._retry = (now_ms + self.config.backoff.cap_ms, command)
        else:
            self._drop()  # what it could not record returns to the lane when its lease ends


#: Which commands each result answers (a result naming a command of another kind is a bug).
_ANSWERS: Final[dict[type[Any], tuple[type[Any], ...]]] = {
    ExecutionClaimed: (Claim,),
    Described: (Describe,),
    Renewed: (Renew,),
    HandlerEnded: (RunHandler,),
    Finished: (Finish,),
    StoreFailed: (Claim, Describe, Renew, Finish),
}

W = SlotState
_S = WorkerDriver

#: (state, event type) -> handler: every pair a slot accepts; a result for a command the driver
#: no longer waits for is ignored before the table is consulted; any other pair is a host bug.
_TRANSITIONS: Final[dict[tuple[SlotState, type[Any]], Any]] = {
    (W.IDLE, Woken): _S._on_start,
    (W.POLLING, Woken): _S._on_start,
    **{(state, Woken): _S._ignore for state in set(SlotState) - {W.IDLE, W.POLLING}},
    **{(state, TimerFired): _S._on_timer for state in SlotState},
    (W.CLAIMING, ExecutionClaimed): _S._on_claimed,
    (W.DESCRIBING, Described): _S._on_described,
    **{(state, Renewed): _S._on_renewed for state in _KEEPING},
    (W.RUNNING, HandlerEnded): _S._on_handler_ended,
    (W.FINISHING, Finished): _S._on_finished,
    **{
        (state, StoreFailed): _S._on_store_failed
        for state in (W.CLAIMING, W.DESCRIBING, W.RUNNING, W.FINISHING)
    },
}
WorkerDriver.TRANSITIONS, WorkerDriver.ANSWERS = _TRANSITIONS, _ANSWERS
