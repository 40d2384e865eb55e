"""What the session driver and the worker driver share: keeping a lease, backing off, and what
a store error means.

Theory of operation
-------------------

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
from typing import Final

import attrs

from turnbuckle.errors import InvalidArgument, StoreClosedError, TurnbuckleError
from turnbuckle.sansio.codec import check_int64
from turnbuckle.sansio.ids import IdSource

__all__ = ["Backoff", "Fault", "LeaseKeeper", "classify"]


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
