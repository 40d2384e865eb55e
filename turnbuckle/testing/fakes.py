"""Deterministic stand-ins for time and randomness, for tests and simulations."""

from __future__ import annotations

import random

import anyio

from turnbuckle.errors import InvalidArgument

__all__ = ["FakeClock", "LoopClock", "SeededIds"]


class FakeClock:
    """A clock that moves only when told to. Pass it as ``open_store(..., clock=clock)``."""

    def __init__(self, now_ms: int = 1_748_736_000_000) -> None:  # 2025-06-01T00:00:00Z
        self._now = now_ms

    def now_ms(self) -> int:
        """The current fake time in milliseconds since the epoch."""
        return self._now

    def advance(self, ms: int) -> None:
        """Move time forward by ``ms``.

        Raises:
            InvalidArgument: ``ms`` is negative (time never runs backwards here).
        """
        if ms < 0:
            raise InvalidArgument(f"a fake clock only moves forward, got {ms}")
        self._now += ms

    def set(self, now_ms: int) -> None:
        """Jump to ``now_ms``, backwards included, e.g. to model a stepped wall clock."""
        self._now = now_ms


class LoopClock:
    """The event loop's own clock, as milliseconds since the epoch: pass it as
    ``open_store(..., clock=LoopClock())`` and the store, and every runtime and worker on it,
    keep time by the loop. Under trio's ``MockClock`` (``autojump_threshold=0``) a whole runtime
    (leases running out, retries, delayed work) then runs in virtual time, with no real sleep."""

    def __init__(self, epoch_ms: int = 1_748_736_000_000) -> None:  # 2025-06-01T00:00:00Z
        self._epoch = epoch_ms

    def now_ms(self) -> int:
        """The loop's time in milliseconds, counted from ``epoch_ms``. Call it on the loop."""
        return self._epoch + int(anyio.current_time() * 1000)


class SeededIds:
    """Reproducible randomness: the same seed gives the same task ids."""

    def __init__(self, seed: int = 0) -> None:
        self._random = random.Random(seed)

    def random_bits(self, k: int) -> int:
        """A random int of ``k`` bits from the seeded generator."""
        return self._random.getrandbits(k)
