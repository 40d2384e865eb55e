"""One-shot replies that another OS thread can deliver to an async caller.

An actor that owns a blocking resource (the SQLite adapter's connection thread) answers each
request exactly once. The caller awaits the answer on its event loop, trio or asyncio; the owner
thread hands the outcome over without blocking and without a thread hop of its own: it stores the
value and schedules a wake-up with the loop's thread-safe "run soon" hook. A reply sent after the
caller's loop has ended is dropped, since nobody can be waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
import sniffio

__all__ = ["ThreadReply"]

T = TypeVar("T")


def _loop_scheduler() -> Callable[[Callable[[], object]], object]:
    """The current event loop's thread-safe "run this callback soon"."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    return asyncio.get_running_loop().call_soon_threadsafe


class ThreadReply(Generic[T]):
    """A reply slot made on the event loop, filled once from any thread, awaited on the loop."""

    __slots__ = ("_done", "_error", "_schedule", "_value")

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._schedule = _loop_scheduler()
        self._value: T | None = None
        self._error: BaseException | None = None

    def send(self, value: T) -> None:
        """Deliver a result (from any thread)."""
        self._value = value
        self._wake()

    def fail(self, error: BaseException) -> None:
        """Deliver an error for the waiter to raise (from any thread)."""
        self._error = error
        self._wake()

    def _wake(self) -> None:
        # RuntimeError: the caller's event loop has ended, so nobody is waiting.
        with contextlib.suppress(RuntimeError):
            self._schedule(self._done.set)

    async def wait(self, *, shield: bool = False) -> T:
        """Wait for the reply and return it, or raise the error sent.

        With ``shield``, cancellation is held off until the reply arrives, so a caller is never
        told "cancelled" about work that then completes. The owner must always reply.
        """
        with anyio.CancelScope(shield=shield):
            await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
