"""What the session driver and the worker driver share: the shape of a driver, keeping a lease,
backing off, and what a store error means.

Theory of operation
-------------------

Both drivers are a :class:`CommandMachine`: fed one event at a time with the current time, they
return commands; a command whose result comes back carries a ``command_id``, and the machine
keeps every such command until its result comes (with the time it was sent). A result for an id
it no longer keeps (a cancelled call, one sent before a lease was lost) is ignored; a result of
the wrong kind for a kept id, or an event its state cannot take, is a host bug
(:class:`DriverError`) and changes nothing. Everything else is looked up in the machine's
table of (state, event type) -> handler.

A driver holds a lease (a session's, or an execution's) for as long as it works under it. The
:class:`LeaseKeeper` says when the lease must be renewed (a third of its ttl after the last
renewal, so two renewals can fail before it runs out) and when it has run out by the driver's
own clock, the same clock the store reads: then the driver stops working under it at once,
without waiting for a store to confirm, because a holder past its lease is a zombie whose
writes the store refuses anyway, and whose side effects (a tool call, a model call) nobody
wants. It stops a tenth of the ttl early: a busy event loop notices its deadline late, and the
next holder can take the lease only once it has run out, so the two never work at once. A
renewal that fails for a transient reason is tried again after a short backoff, before then.

Every store error falls in one of four kinds (:func:`classify`), and the drivers decide from
the kind alone, so a new error type needs one line in a table, not a change of protocol:

``RETRY``
    transient (busy, full disk, a concurrent writer): the same call again, after a capped,
    jittered exponential backoff (:class:`Backoff`). Never fatal.
``LOST``
    what was held is gone (the lease expired or was taken, a claim was voided, the head moved):
    drop the work done under it and start over; the store already refused the write.
``CLOSED``
    the store was closed: stop, quietly.
``FAIL``
    retrying the same call will not cure it (a bad value, a corrupt row, a bug): the work it
    belongs to fails, counted, and is parked after a bounded number of failures.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, Generic, TypeVar

import attrs

from turnbuckle.errors import InvalidArgument, StoreClosedError, TurnbuckleError
from turnbuckle.sansio.codec import JSON, check_int64
from turnbuckle.sansio.ids import IdSource

__all__ = [
    "Backoff",
    "CommandMachine",
    "DriverError",
    "Fault",
    "LeaseKeeper",
    "Severity",
    "classify",
    "describe",
    "store_retry",
]

StateT = TypeVar("StateT", bound=enum.Enum)
EventT = TypeVar("EventT")
CommandT = TypeVar("CommandT")


class DriverError(InvalidArgument):
    """A driver was fed an event it cannot be given in its state (a host bug, such as a result
    for a command that expects another kind). Nothing changed."""

    _fields = ("machine", "state", "event")
    _template = "the {machine} in state {state} cannot take {event}"


class Severity(enum.IntEnum):
    """How loudly what a driver reports should be logged (the values are ``logging``'s)."""

    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40


class CommandMachine(Generic[StateT, EventT, CommandT]):
    """The shape both drivers share (see the module docstring). A subclass sets ``NAME`` (for
    errors), ``state``, ``TRANSITIONS`` (what each (state, event type) pair runs:
    ``handler(machine, event, now_ms)``) and ``ANSWERS`` (which commands each result answers)."""

    NAME: ClassVar[str]
    TRANSITIONS: ClassVar[Mapping[tuple[Any, type[Any]], Callable[..., None]]]
    ANSWERS: ClassVar[Mapping[type[Any], tuple[type[Any], ...]]]
    state: StateT

    def __init__(self) -> None:
        self._next_id = 0
        #: Commands whose results the machine waits for, with when each was sent.
        self._pending: dict[int, tuple[CommandT, int]] = {}
        #: The command whose result is being handled, and when it was sent.
        self._current: tuple[CommandT, int] | None = None
        self._now = 0
        self._out: list[CommandT] = []

    def handle(self, event: EventT, now_ms: int) -> list[CommandT]:
        """Feed one event at ``now_ms``; returns the commands to carry out, in order.

        Raises:
            DriverError: the event cannot happen in this state (a host bug); nothing changed.
        """
        command_id = getattr(event, "command_id", None)
        if command_id is not None and command_id not in self._pending:
            return []  # a late result: cancelled, or sent before what it served was lost
        handler = self.TRANSITIONS.get((self.state, type(event)))
        if handler is None or (
            command_id is not None
            and not isinstance(self._pending[command_id][0], self.ANSWERS[type(event)])
        ):
            raise DriverError(self.NAME, self.state.value, type(event).__name__)
        self._current = None if command_id is None else self._pending.pop(command_id)
        self._now, self._out = now_ms, []
        handler(self, event, now_ms)
        out, self._out = self._out, []
        return out

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _send(self, command: CommandT) -> None:
        """Out with ``command``; kept, if it has an id, until its result comes."""
        self._out.append(command)
        command_id = getattr(command, "command_id", None)
        if command_id is not None:
            self._pending[command_id] = (command, self._now)

    def _forget(self, kinds: tuple[type[Any], ...] | None = None) -> None:
        """Stop waiting for the results of the commands of ``kinds`` (all, for None)."""
        for command_id, (command, _) in list(self._pending.items()):
            if kinds is None or isinstance(command, kinds):
                del self._pending[command_id]


class Fault(enum.Enum):
    """What a failed store call means to the work that made it (see the module docstring)."""

    RETRY = "retry"
    LOST = "lost"
    CLOSED = "closed"
    FAIL = "fail"


def classify(error: BaseException, lost: tuple[type[BaseException], ...]) -> Fault:
    """The kind of a store error; ``lost`` lists the error types that mean "what you held is
    gone" to the caller."""
    if isinstance(error, StoreClosedError):
        return Fault.CLOSED
    if isinstance(error, lost):
        return Fault.LOST
    if isinstance(error, TurnbuckleError) and error.retryable:
        return Fault.RETRY
    return Fault.FAIL


def describe(error: BaseException) -> str:
    """An error as both drivers report it: ``Type: message``."""
    return f"{type(error).__name__}: {error}"


def store_retry(
    operation: str, error: BaseException, attempt: int, delay_ms: int
) -> tuple[JSON, Severity]:
    """The data and severity of the ``store_retry`` event both drivers report when a store call
    failed transiently and is tried again after ``delay_ms``: a warning the first time in a row,
    debug after, so a busy spell logs once."""
    data: JSON = {
        "operation": operation,
        "error": describe(error),
        "attempt": attempt,
        "delay_ms": delay_ms,
    }
    return data, Severity.WARNING if attempt == 1 else Severity.DEBUG


#: Jitter resolution: 16 random bits spread a delay over 65,536 steps.
_JITTER_BITS: Final = 16


@attrs.frozen(kw_only=True)
class Backoff:
    """Capped exponential backoff with equal jitter: the n-th retry waits between half and all
    of ``min(cap_ms, base_ms * 2**n)``, so retries neither hammer a busy store nor move in
    lockstep with another process's."""

    base_ms: int = 25
    cap_ms: int = 2_000

    def __attrs_post_init__(self) -> None:
        check_int64("base_ms", self.base_ms, minimum=1)
        check_int64("cap_ms", self.cap_ms, minimum=1)
        if self.cap_ms < self.base_ms:
            raise InvalidArgument(f"cap_ms {self.cap_ms} is below base_ms {self.base_ms}")

    def delay_ms(self, attempt: int, ids: IdSource) -> int:
        """How long to wait before retry number ``attempt`` (0 for the first)."""
        ceiling = min(self.cap_ms, self.base_ms << min(max(attempt, 0), 32))
        half = ceiling // 2
        return half + ids.random_bits(_JITTER_BITS) * (ceiling - half) // (1 << _JITTER_BITS)


@attrs.define
class LeaseKeeper:
    """The renewal schedule of one held lease (see the module docstring). A driver asks
    :meth:`due` and :meth:`expired` when its timer fires, and reports what became of each
    renewal it sent."""

    ttl_ms: int
    backoff: Backoff
    #: When the lease runs out (the store's figure from the last grant or renewal).
    expires_at_ms: int = 0
    #: When the next renewal should be sent.
    renew_at_ms: int = 0
    #: The command id of the renewal in flight, if any.
    in_flight: int | None = None
    #: Renewals that failed in a row (transiently).
    failures: int = 0

    def hold(self, now_ms: int, expires_at_ms: int) -> None:
        """A lease was granted (or renewed), running out at ``expires_at_ms``; the driver
        learned it at ``now_ms``. The next renewal is due a third of the way into the lease as
        granted: for a reply that came late, sooner (at once, if it is due already)."""
        third = max(self.ttl_ms // 3, 1)
        self.expires_at_ms = expires_at_ms
        self.renew_at_ms = max(now_ms, min(now_ms + third, expires_at_ms - 2 * third))
        self.in_flight = None
        self.failures = 0

    def due(self, now_ms: int) -> bool:
        """True if a renewal should be sent now."""
        return self.in_flight is None and now_ms >= self.renew_at_ms

    @property
    def stop_at_ms(self) -> int:
        """When the holder stops working under the lease: a tenth of the ttl before it runs
        out (see the module docstring)."""
        return self.expires_at_ms - max(self.ttl_ms // 10, 1)

    def expired(self, now_ms: int) -> bool:
        """True once the holder must stop working under the lease."""
        return now_ms >= self.stop_at_ms

    def deadline(self) -> int:
        """The next instant the keeper needs attention: the renewal, or the stop."""
        if self.in_flight is None:
            return min(self.renew_at_ms, self.stop_at_ms)
        return self.stop_at_ms

    def sent(self, command_id: int) -> None:
        self.in_flight = command_id

    def retry_later(self, now_ms: int, ids: IdSource) -> int:
        """A renewal failed transiently: schedule the next one (before the expiry); returns
        the delay."""
        delay = self.backoff.delay_ms(self.failures, ids)
        self.failures += 1
        self.in_flight = None
        # Never past the stop: there the lease is given up (and a retry no sooner than now).
        self.renew_at_ms = max(now_ms, min(now_ms + delay, self.stop_at_ms))
        return delay
