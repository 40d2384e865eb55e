"""Assertions the conformance suites share."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from turnbuckle.errors import TurnbuckleError


async def raises(expected: TurnbuckleError, call: Awaitable[Any]) -> None:
    """Await ``call`` and check it raised exactly ``expected`` (type and fields)."""
    try:
        await call
    except TurnbuckleError as exc:
        assert exc == expected, f"expected {expected!r}, got {exc!r}"
        return
    raise AssertionError(f"expected {expected!r}, nothing was raised")


async def raises_type(expected: type[TurnbuckleError], call: Awaitable[Any]) -> TurnbuckleError:
    """Await ``call`` and check it raised an error of exactly type ``expected``; return it."""
    try:
        await call
    except TurnbuckleError as exc:
        assert type(exc) is expected, f"expected {expected.__name__}, got {exc!r}"
        return exc
    raise AssertionError(f"expected {expected.__name__}, nothing was raised")
