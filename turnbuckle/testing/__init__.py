"""Shipped to users: conformance suites for store adapters, and deterministic fakes.

- :mod:`turnbuckle.testing.conformance`: plain async functions that take a store factory and
  check every behaviour a store must have; run them against your own adapter.
- :class:`FakeClock` and :class:`SeededIds`: inject time and randomness, so a test or a
  simulation replays exactly.
"""

from turnbuckle.testing.fakes import FakeClock as FakeClock
from turnbuckle.testing.fakes import SeededIds as SeededIds

__all__ = ["FakeClock", "SeededIds"]
