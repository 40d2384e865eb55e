"""A scripted model: agent tests that replay exactly, under trio or asyncio.

A host calls its model as ``response = await model(request)``. :class:`ScriptedModel` answers
each call with the next step of a script::

    model = ScriptedModel(
        call("search", {"q": "turnbuckle"}),  # a reply with one tool call, id "call-1"
        Delay(2.0, then="Found it."),  # two (fake) seconds later, a plain text answer
    )

Steps:

- a :class:`~turnbuckle.sansio.turn.ModelResponse`, returned as is (see :func:`say`,
  :func:`call` and :func:`calls` to make one), or a ``str``, short for ``say(text)``;
- :class:`Fail`: the call raises :class:`ModelCallError`;
- :class:`Stall`: the call never returns (until cancelled), to test cancellation and crashes;
- :class:`Delay`: sleep (with anyio, so trio's ``MockClock`` skips it), then another step;
- a callable ``fn(request) -> step``, for a reply that depends on the request.

A tool call with an empty ``call_id`` (what :func:`call` makes unless given one) gets
``f"call-{n}"`` when returned, ``n`` counting the tool calls this model has returned, from 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import anyio
import attrs

from turnbuckle.errors import InvalidArgument
from turnbuckle.sansio.codec import JSON
from turnbuckle.sansio.session import TokenUsage
from turnbuckle.sansio.turn import ModelRequest, ModelResponse, StopReason, ToolCall

__all__ = [
    "Delay",
    "Fail",
    "ModelCallError",
    "ScriptExhausted",
    "ScriptedModel",
    "Stall",
    "Step",
    "call",
    "calls",
    "say",
]


class ModelCallError(Exception):
    """A model call failed (what a :class:`Fail` step raises). ``retryable``: worth retrying."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message, retryable)
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class ScriptExhausted(Exception):
    """A :class:`ScriptedModel` was called more often than its script has steps (a test bug).

    ``scripted``: how many steps the script had; ``call_number``: which call (from 1) found none.
    """

    def __init__(self, scripted: int, call_number: int) -> None:
        super().__init__(scripted, call_number)
        self.scripted = scripted
        self.call_number = call_number

    def __str__(self) -> str:
        return (
            f"the model was called {self.call_number} times but only {self.scripted} calls "
            "were scripted (add steps, or pass then= to repeat a default step)"
        )


@attrs.frozen
class Fail:
    """A step: the call raises ``ModelCallError(message, retryable)``."""

    message: str
    retryable: bool = False


@attrs.frozen
class Stall:
    """A step: the call waits forever (``anyio.sleep_forever``); only cancellation ends it."""


@attrs.frozen
class Delay:
    """A step: sleep ``seconds`` with anyio, then perform the step ``then``."""

    seconds: float
    then: Step


Step: TypeAlias = "ModelResponse | str | Fail | Stall | Delay | Callable[[ModelRequest], Step]"


def say(text: str, *, usage: TokenUsage | None = None) -> ModelResponse:
    """A plain text answer (``stop_reason`` STOP)."""
    if usage is None:
        return ModelResponse(text=text)
    return ModelResponse(text=text, usage=usage)


def call(
    name: str, args: JSON = None, *, call_id: str | None = None, text: str = ""
) -> ModelResponse:
    """A reply calling one tool; ``call_id`` defaults to ``call-{n}`` (see the module doc)."""
    return ModelResponse(
        text=text,
        tool_calls=[ToolCall(call_id=call_id or "", name=name, args=args)],
        stop_reason=StopReason.TOOL_USE,
    )


def calls(*parts: ModelResponse | ToolCall, text: str = "") -> ModelResponse:
    """One reply calling several tools at once: ``calls(call("a"), call("b", {"x": 1}))``.

    Raises:
        InvalidArgument: no parts, or a part is a response with text or without tool calls
            (put the text in ``text=``).
    """
    if not parts:
        raise InvalidArgument("calls() needs at least one call(...)")
    tool_calls: list[ToolCall] = []
    for part in parts:
        if isinstance(part, ToolCall):
            tool_calls.append(part)
        elif part.tool_calls and not part.text:
            tool_calls.extend(part.tool_calls)
        else:
            raise InvalidArgument(
                f"calls() takes call(...) replies without text, got {part!r}; use text="
            )
    return ModelResponse(text=text, tool_calls=tool_calls, stop_reason=StopReason.TOOL_USE)


def _check_step(step: object, where: str) -> None:
    if isinstance(step, Delay):
        if not isinstance(step.seconds, int | float) or not step.seconds >= 0:
            raise InvalidArgument(f"{where}: Delay seconds must be >= 0, got {step.seconds!r}")
        _check_step(step.then, f"{where} (Delay.then)")
    elif not isinstance(step, ModelResponse | str | Fail | Stall) and not callable(step):
        hint = " (pass steps as separate arguments: ScriptedModel(*steps))"
        raise InvalidArgument(
            f"{where}: not a step: {step!r}" + (hint if isinstance(step, list | tuple) else "")
        )


class ScriptedModel:
    """A fake model: each ``await model(request)`` performs the next step of the script.

    ``then``: a step performed for every call after the script ran out (by default there is
    none, and such a call raises :class:`ScriptExhausted`). Every request is appended to
    :attr:`requests`, including those of calls that fail, stall or find no step.
    """

    def __init__(self, *steps: Step, then: Step | None = None) -> None:
        """Raises:
        InvalidArgument: an argument is not a step, or a Delay is negative.
        """
        for number, step in enumerate(steps, 1):
            _check_step(step, f"step {number}")
        if then is not None:
            _check_step(then, "then")
        self._steps = steps
        self._then = then
        self._tool_calls = 0
        #: Every request received, in order.
        self.requests: list[ModelRequest] = []

    @property
    def calls(self) -> int:
        """How many times the model was called."""
        return len(self.requests)

    @property
    def remaining(self) -> int:
        """Scripted steps not yet used (``then`` not counted)."""
        return max(0, len(self._steps) - self.calls)

    async def __call__(self, request: ModelRequest) -> ModelResponse:
        """Perform the next step for ``request``.

        Raises:
            ModelCallError: the step is a :class:`Fail`.
            ScriptExhausted: no step is left and no ``then`` was given.
            InvalidArgument: a callable step returned something that is not a step.
        """
        self.requests.append(request)
        number = len(self.requests)
        if number <= len(self._steps):
            step = self._steps[number - 1]
        elif self._then is not None:
            step = self._then
        else:
            raise ScriptExhausted(len(self._steps), number)
        while True:
            if isinstance(step, str):
                return self._number(say(step))
            if isinstance(step, ModelResponse):
                return self._number(step)
            if isinstance(step, Fail):
                raise ModelCallError(step.message, step.retryable)
            if isinstance(step, Stall):
                await anyio.sleep_forever()
                raise AssertionError("unreachable: sleep_forever returned")
            if isinstance(step, Delay):
                await anyio.sleep(step.seconds)
                step = step.then
                continue
            produced = step(request)
            _check_step(produced, f"the step returned for call {number}")
            step = produced

    def _number(self, response: ModelResponse) -> ModelResponse:
        """Give every tool call without an id ``call-{n}``."""
        numbered = []
        for tool_call in response.tool_calls:
            self._tool_calls += 1
            if not tool_call.call_id:
                tool_call = attrs.evolve(tool_call, call_id=f"call-{self._tool_calls}")
            numbered.append(tool_call)
        if tuple(numbered) == response.tool_calls:
            return response
        return attrs.evolve(response, tool_calls=numbered)
