"""The mailbox of an actor that shells a pure driver: results in, timer firings when due.

A driver (session or worker) says when it next needs attention (``next_deadline()``, in the
store clock's milliseconds); the actor waits for the next result in its bounded mailbox, or until
that deadline, whichever is first, and feeds what came (or the timer event) to the driver. One
mailbox per actor, so the driver sees one serial stream of events.
"""

from __future__ import annotations

import contextlib
from typing import Generic, TypeVar

import anyio

from turnbuckle.adapters.tasks import Clock

__all__ = ["Mailbox"]

E = TypeVar("E")


class Mailbox(Generic[E]):
    """A bounded stream of events for one actor."""

    def __init__(self, size: int) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[E](size)

    def post_nowait(self, event: E) -> bool:
        """Post without waiting; False if the mailbox is full."""
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            return False
        return True

    async def post(self, event: E) -> None:
        """Post, waiting for room (a result is never dropped); a closed mailbox (the actor has
        left) swallows it."""
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._send.send(event)

    @property
    def waiting(self) -> int:
        """Events posted and not yet taken."""
        return self._receive.statistics().current_buffer_used

    async def next(self, deadline_ms: int | None, clock: Clock, timer: E) -> E:
        """The next event, or ``timer`` once the clock reaches ``deadline_ms``. A deadline
        already passed comes first: a lease that ran out is acted on before any result."""
        if deadline_ms is None:
            return await self._receive.receive()
        left = deadline_ms - clock.now_ms()
        if left <= 0:
            return timer
        try:
            return self._receive.receive_nowait()  # no timeout to arm for a waiting event
        except anyio.WouldBlock:
            pass
        with anyio.move_on_after(left / 1000):
            return await self._receive.receive()
        return timer

    def close(self) -> None:
        self._send.close()
        self._receive.close()
