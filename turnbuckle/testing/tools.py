"""A recording tool: see what an agent called, and make a tool stall or fail on purpose.

A host calls a tool as ``await tool(args)``; the tool returns a plain JSON value, or a
:class:`~turnbuckle.sansio.turn.ToolResult` to control the turn (``control="finish"`` ends it
with the tool's value, ``"fail"`` with a tool error).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import anyio

from turnbuckle.sansio.codec import JSON
from turnbuckle.sansio.turn import ToolResult

__all__ = ["RecordingTool", "ToolFunction", "ToolOutput"]

ToolOutput: TypeAlias = "JSON | ToolResult"
ToolFunction: TypeAlias = "Callable[[JSON], Awaitable[ToolOutput]] | Callable[[JSON], ToolOutput]"


class RecordingTool:
    """A tool that records the args of every call in :attr:`calls`, then answers.

    ``reply``: an async or sync function of the args, or a constant value to return (by
    default None). ``stall``: every call waits forever (until cancelled). ``raises``: every call
    raises this exception (an instance or a class). Both are checked after the call is
    recorded, and are plain attributes a test may change between calls.
    """

    def __init__(
        self,
        reply: ToolFunction | ToolOutput = None,
        *,
        stall: bool = False,
        raises: Exception | type[Exception] | None = None,
    ) -> None:
        self._reply = reply
        self.stall = stall
        self.raises = raises
        #: The args of every call, in order (stalled and failed calls included).
        self.calls: list[JSON] = []

    async def __call__(self, args: JSON) -> ToolOutput:
        """Record ``args``, then answer.

        Raises:
            Exception: ``raises`` if set, or whatever the wrapped function raises.
        """
        self.calls.append(args)
        if self.raises is not None:
            raise self.raises
        if self.stall:
            await anyio.sleep_forever()
            raise AssertionError("unreachable: sleep_forever returned")
        reply = self._reply
        if not callable(reply):
            return reply
        result = reply(args)
        if inspect.isawaitable(result):
            return await result
        return result
