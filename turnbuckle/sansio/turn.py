"""The turn machine: one agent turn as a pure state machine (standard tool calling).

Theory of operation
-------------------

A turn is "ask the model, run the tools it calls, feed the results back, repeat until it answers".
The machine does none of that itself: it emits *effects* and waits for *responses*. The host
drains :meth:`TurnMachine.poll_effect` until it returns None, carries out each effect, and feeds
each reply to :meth:`TurnMachine.handle_response`::

    CallModel --ModelReplied(tool calls)--> RunTools --ToolsFinished--> Checkpoint(after_work)
        ^                                                                     |
        +------------------------ (delivery empty, or injected input) -------+
    CallModel --ModelReplied(text)--> Checkpoint(before_completion) --empty--> Done(answer)
                                                                  \\--input--> CallModel (again)

Rules:

- Effects are numbered from 1 within the turn, in the order they are emitted, so the n-th effect
  of a turn always has id n. A reply names the id it answers; a reply for any other id (late,
  duplicate, from before a restore) is ignored. A reply of the wrong kind for the awaited id is a
  host bug and raises :class:`UnexpectedResponse`, changing nothing.
- ``Checkpoint`` effects are the safe boundaries where the host injects queued input
  (``earliest_safe_boundary`` work); ``Progress`` marks a persistable boundary; ``Emit`` carries
  UI events; ``Done`` ends the turn with its :class:`TurnOutcome`.
- The whole machine is a frozen value (:attr:`TurnMachine.state`), serializable with
  :func:`encode_state` / :func:`decode_state`. Restored, it re-emits the effect it was waiting
  for, with the same id: a crash during a model call replays that call (never a second one); a
  crash after the model replied replays the checkpoint, not the call.
- Limits and errors map to outcomes: a model error or a provider stop is
  ``Stopped(provider_error)``; an output limit ``Stopped(incomplete)``; more than ``max_turns``
  model calls ``Stopped(max_turns)`` with a final note; a tool that reports ``finish`` ends the
  turn with its value, one that reports ``fail`` with ``Stopped(tool_error)``; ``cancel()`` ends
  it ``Stopped(cancelled)``.
- What the host hands in is checked, never trusted: a model reply that is not a well-formed
  :class:`ModelResponse` ends the turn ``Stopped(invalid_model_response)``, a tool result that
  is not plain JSON (a datetime, say) ``Stopped(invalid_tool_result)``, with the problem in the
  outcome's text. The conversation stays well formed: every tool call still gets a tool message.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from typing import Any, Final, TypeAlias

import attrs
import cattrs
from cattrs.strategies import configure_tagged_union

from turnbuckle.errors import CorruptRecordError, InvalidArgument, PayloadNotSerializable
from turnbuckle.sansio.codec import JSON, encode_json, sequence
from turnbuckle.sansio.session import TokenUsage

__all__ = [
    "CallModel",
    "CheckpointDelivered",
    "CheckpointKind",
    "Done",
    "Effect",
    "Emit",
    "Message",
    "ModelFailed",
    "ModelReplied",
    "ModelRequest",
    "ModelResponse",
    "Phase",
    "Progress",
    "Response",
    "RunTools",
    "StopReason",
    "ToolCall",
    "ToolResult",
    "ToolsFinished",
    "TurnEvent",
    "TurnMachine",
    "TurnOutcome",
    "TurnState",
    "UnexpectedResponse",
    "decode_state",
    "encode_state",
]


class UnexpectedResponse(InvalidArgument):
    """A response of the wrong kind for the effect it names (a host bug). Nothing changed."""

    _fields = ("effect_id", "expected", "got")
    _template = "effect {effect_id} awaits {expected}, got {got}"


_NO_USAGE: Final = TokenUsage()


# --- values ----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ToolCall:
    call_id: str
    name: str
    args: JSON = None


@attrs.frozen(kw_only=True)
class Message:
    """One message of the conversation. ``role``: system, user, assistant, tool or event."""

    message_id: str
    role: str
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = attrs.field(default=(), converter=sequence)
    #: For a tool message: the call it answers.
    tool_call_id: str | None = None


@attrs.frozen(kw_only=True)
class ModelRequest:
    """What the host sends to its model."""

    messages: tuple[Message, ...] = attrs.field(converter=sequence)
    tools: tuple[str, ...] = attrs.field(converter=sequence)
    iteration: int


class StopReason(enum.Enum):
    STOP = "stop"
    TOOL_USE = "tool_use"
    OUTPUT_LIMIT = "output_limit"
    CONTEXT_OVERFLOW = "context_overflow"
    CONTENT_FILTER = "content_filter"
    PROVIDER_ERROR = "provider_error"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"


@attrs.frozen(kw_only=True)
class ModelResponse:
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = attrs.field(default=(), converter=sequence)
    stop_reason: StopReason = StopReason.STOP
    usage: TokenUsage = _NO_USAGE


@attrs.frozen(kw_only=True)
class ToolResult:
    """A tool's answer. ``control``: None (go on), ``"finish"`` (end the turn with this value)
    or ``"fail"`` (end it with a tool error)."""

    call_id: str
    name: str
    output: JSON = None
    is_error: bool = False
    control: str | None = None


@attrs.frozen(kw_only=True)
class TurnOutcome:
    """How a turn ended. ``kind``: ``assistant_message``, ``tool_value`` (finished) or
    ``stopped``; ``reason`` for stopped turns: ``cancelled``, ``incomplete``, ``max_turns``,
    ``provider_error``, ``tool_error``, ``invalid_model_response``, ``invalid_tool_result``."""

    kind: str
    text: str = ""
    tool_name: str | None = None
    value: JSON = None
    reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.kind != "stopped"


@attrs.frozen(kw_only=True)
class TurnEvent:
    """A UI event: ``text_delta``, ``llm_request``, ``tool_call``, ``token_usage``, ``error``,
    ``injected_input``, ``turn_outcome``; ``data`` is plain JSON."""

    type: str
    data: JSON = None


class CheckpointKind(enum.Enum):
    AFTER_WORK = "after_work"
    BEFORE_COMPLETION = "before_completion"


# --- effects (commands) and responses (facts) ------------------------------------------------


@attrs.frozen(kw_only=True)
class CallModel:
    effect_id: int
    request: ModelRequest


@attrs.frozen(kw_only=True)
class RunTools:
    """Run these calls (concurrently, if the host likes) and reply with every result."""

    effect_id: int
    calls: tuple[ToolCall, ...] = attrs.field(converter=sequence)


@attrs.frozen(kw_only=True)
class Checkpoint:
    """A safe boundary: reply with any input queued for the session (often none)."""

    effect_id: int
    kind: CheckpointKind


@attrs.frozen(kw_only=True)
class Emit:
    effect_id: int
    event: TurnEvent


@attrs.frozen(kw_only=True)
class Progress:
    """A persistable boundary: the conversation so far."""

    effect_id: int
    messages: tuple[Message, ...] = attrs.field(converter=sequence)
    iteration: int


@attrs.frozen(kw_only=True)
class Done:
    effect_id: int
    outcome: TurnOutcome
    messages: tuple[Message, ...] = attrs.field(converter=sequence)
    iteration: int


Effect: TypeAlias = CallModel | RunTools | Checkpoint | Emit | Progress | Done


@attrs.frozen(kw_only=True)
class ModelReplied:
    effect_id: int
    response: ModelResponse


@attrs.frozen(kw_only=True)
class ModelFailed:
    effect_id: int
    message: str
    retryable: bool = False


@attrs.frozen(kw_only=True)
class ToolsFinished:
    effect_id: int
    results: tuple[ToolResult, ...] = attrs.field(converter=sequence)


@attrs.frozen(kw_only=True)
class CheckpointDelivered:
    """Input injected at a checkpoint (user or system messages), possibly none."""

    effect_id: int
    messages: tuple[Message, ...] = attrs.field(default=(), converter=sequence)


Response: TypeAlias = ModelReplied | ModelFailed | ToolsFinished | CheckpointDelivered


# --- the state -------------------------------------------------------------------------------


class Phase(enum.Enum):
    WAITING_MODEL = "waiting_model"
    WAITING_TOOLS = "waiting_tools"
    WAITING_CHECKPOINT = "waiting_checkpoint"
    FINISHED = "finished"


@attrs.frozen(kw_only=True)
class TurnState:
    """The whole machine, as a value (see the module docstring)."""

    phase: Phase
    messages: tuple[Message, ...] = attrs.field(converter=sequence)
    tools: tuple[str, ...] = attrs.field(converter=sequence)
    max_turns: int
    iteration: int = 0
    next_effect_id: int = 1
    next_message: int = 1
    #: Effects emitted but not yet polled, in order.
    pending: tuple[Effect, ...] = attrs.field(default=(), converter=sequence)
    #: The polled effect awaiting its reply (None when finished).
    waiting: Effect | None = None
    #: The awaited effect must be polled again (set by a restore after it was polled).
    redeliver: bool = False
    #: What an empty before-completion checkpoint finishes with.
    on_empty: TurnOutcome | None = None
    usage: TokenUsage = _NO_USAGE
    outcome: TurnOutcome | None = None
    turn_id: str = "turn"


#: Which responses answer which awaited effect: the transition table of the machine.
ACCEPTS: Final[dict[Phase, tuple[type[Any], ...]]] = {
    Phase.WAITING_MODEL: (ModelReplied, ModelFailed),
    Phase.WAITING_TOOLS: (ToolsFinished,),
    Phase.WAITING_CHECKPOINT: (CheckpointDelivered,),
    Phase.FINISHED: (),
}


class _Builder:
    """Accumulates the effects and changes of one step, then freezes them into a new state."""

    def __init__(self, state: TurnState) -> None:
        self.state = state
        self.out: list[Effect] = list(state.pending)
        self.changes: dict[str, Any] = {}

    def _next_id(self) -> int:
        current = self.changes.get("next_effect_id", self.state.next_effect_id)
        self.changes["next_effect_id"] = current + 1
        return int(current)

    def get(self, name: str) -> Any:
        return self.changes.get(name, getattr(self.state, name))

    def emit(self, kind: str, data: JSON = None) -> None:
        self.out.append(Emit(effect_id=self._next_id(), event=TurnEvent(type=kind, data=data)))

    def message(self, role: str, **fields: Any) -> Message:
        number = self.get("next_message")
        self.changes["next_message"] = number + 1
        msg = Message(message_id=f"{self.state.turn_id}:m{number}", role=role, **fields)
        self.changes["messages"] = (*self.get("messages"), msg)
        return msg

    def progress(self) -> None:
        self.out.append(
            Progress(
                effect_id=self._next_id(),
                messages=self.get("messages"),
                iteration=self.get("iteration"),
            )
        )

    def await_effect(self, phase: Phase, effect: Effect) -> None:
        self.out.append(effect)
        self.changes["phase"] = phase
        self.changes["waiting"] = effect

    def call_model(self) -> None:
        iteration = self.get("iteration")
        self.emit(
            "llm_request", {"iteration": iteration, "message_count": len(self.get("messages"))}
        )
        request = ModelRequest(
            messages=self.get("messages"), tools=self.state.tools, iteration=iteration
        )
        self.await_effect(
            Phase.WAITING_MODEL, CallModel(effect_id=self._next_id(), request=request)
        )

    def checkpoint(self, kind: CheckpointKind, on_empty: TurnOutcome | None) -> None:
        self.changes["on_empty"] = on_empty
        self.await_effect(
            Phase.WAITING_CHECKPOINT, Checkpoint(effect_id=self._next_id(), kind=kind)
        )

    def finish(self, outcome: TurnOutcome) -> None:
        done = Done(
            effect_id=self._next_id(),
            outcome=outcome,
            messages=self.get("messages"),
            iteration=self.get("iteration"),
        )
        self.out.append(done)
        # Kept as the awaited effect, so a restore after the host took it hands it out again.
        self.changes.update(phase=Phase.FINISHED, waiting=done, outcome=outcome)

    def build(self) -> TurnState:
        return attrs.evolve(self.state, pending=tuple(self.out), redeliver=False, **self.changes)


def _stopped(reason: str, text: str = "") -> TurnOutcome:
    return TurnOutcome(kind="stopped", reason=reason, text=text)


# --- transitions -----------------------------------------------------------------------------


def _json_problem(value: object) -> str | None:
    try:
        encode_json(value, limit=1 << 62)
    except PayloadNotSerializable as exc:
        return f"{exc.type_name} at {exc.path} is not JSON ({exc.reason})"
    return None


def model_response_problem(response: object) -> str | None:
    """What is wrong with a model's reply, or None if it is a well-formed ModelResponse."""
    if not isinstance(response, ModelResponse):
        return f"the model returned {type(response).__name__}, not a ModelResponse"
    if type(response.text) is not str:
        return f"ModelResponse.text is {type(response.text).__name__}, not str"
    if not isinstance(response.stop_reason, StopReason):
        return f"ModelResponse.stop_reason is {response.stop_reason!r}, not a StopReason"
    usage = response.usage
    if not isinstance(usage, TokenUsage) or not all(
        type(getattr(usage, f.name)) is int and getattr(usage, f.name) >= 0
        for f in attrs.fields(TokenUsage)
    ):
        return f"ModelResponse.usage is {usage!r}, not a TokenUsage of counts"
    ids = set()
    for call in response.tool_calls:
        if not isinstance(call, ToolCall):
            return f"a tool call is {type(call).__name__}, not a ToolCall"
        if type(call.call_id) is not str or type(call.name) is not str:
            return f"tool call {call!r} needs a str call_id and name"
        if call.call_id in ids:
            return f"two tool calls have the call_id {call.call_id!r}"
        ids.add(call.call_id)
        problem = _json_problem(call.args)
        if problem is not None:
            return f"the arguments of tool call {call.call_id!r}: {problem}"
    return None


def tool_result_problem(result: ToolResult) -> str | None:
    """What is wrong with a tool's result, or None if it can go into the conversation."""
    if result.control not in (None, "finish", "fail"):
        return f"tool {result.name!r} asked for control {result.control!r}"
    if type(result.is_error) is not bool:
        return f"tool {result.name!r} returned is_error={result.is_error!r}"
    problem = _json_problem(result.output)
    if problem is not None:
        return f"tool {result.name!r} returned a value that is not JSON: {problem}"
    return None


def _on_model_replied(b: _Builder, response: ModelResponse) -> None:
    problem = model_response_problem(response)
    if problem is not None:
        b.emit("error", {"message": problem})
        b.finish(_stopped("invalid_model_response", problem))
        return
    usage = b.state.usage
    total = TokenUsage(
        **{
            f.name: getattr(usage, f.name) + getattr(response.usage, f.name)
            for f in attrs.fields(TokenUsage)
        }
    )
    b.changes["usage"] = total
    b.emit(
        "token_usage", {"usage": attrs.asdict(response.usage), "cumulative": attrs.asdict(total)}
    )
    stop = response.stop_reason
    terminal = {
        StopReason.OUTPUT_LIMIT: "incomplete",
        StopReason.CONTEXT_OVERFLOW: "provider_error",
        StopReason.CONTENT_FILTER: "provider_error",
        StopReason.PROVIDER_ERROR: "provider_error",
        StopReason.CANCELLED: "cancelled",
    }.get(stop)
    if response.text:
        b.emit("text_delta", {"text": response.text})
    if terminal is not None:
        b.emit("error", {"message": f"the model stopped: {stop.value}"})
        b.finish(_stopped(terminal, response.text))
        return
    if response.tool_calls:
        b.message("assistant", text=response.text, tool_calls=response.tool_calls)
        b.progress()
        b.await_effect(
            Phase.WAITING_TOOLS, RunTools(effect_id=b._next_id(), calls=response.tool_calls)
        )
        return
    after_tools = any(m.role == "tool" for m in b.state.messages)
    if response.text or after_tools:
        b.message("assistant", text=response.text)
        b.progress()
        b.checkpoint(
            CheckpointKind.BEFORE_COMPLETION,
            TurnOutcome(kind="assistant_message", text=response.text),
        )
        return
    b.emit("error", {"message": "the model returned nothing"})
    b.finish(_stopped("provider_error"))


def _on_model_failed(b: _Builder, response: ModelFailed) -> None:
    b.emit("error", {"message": response.message, "retryable": response.retryable})
    b.finish(_stopped("provider_error", response.message))


def _on_tools_finished(b: _Builder, response: ToolsFinished) -> None:
    waiting = b.state.waiting
    assert isinstance(waiting, RunTools)
    by_id = {r.call_id: r for r in response.results}
    missing = [c.call_id for c in waiting.calls if c.call_id not in by_id]
    if missing:
        raise UnexpectedResponse(
            response.effect_id, "a result for every call", f"none for {missing}"
        )
    invalid: tuple[str, str] | None = None
    for call in waiting.calls:  # in call order, whatever order they finished in
        result = by_id[call.call_id]
        problem = tool_result_problem(result)
        if problem is None:
            text = json.dumps(result.output, sort_keys=True)
        else:
            # The call still gets its tool message, so the conversation stays well formed.
            text = json.dumps(f"error: {problem}")
            invalid = invalid or (call.name, problem)
        b.message("tool", text=text, tool_call_id=call.call_id)
    if invalid is not None:
        b.emit("error", {"message": invalid[1]})
        b.finish(
            TurnOutcome(
                kind="stopped", reason="invalid_tool_result", tool_name=invalid[0], text=invalid[1]
            )
        )
        return
    for call in waiting.calls:
        result = by_id[call.call_id]
        if result.control == "finish":
            b.finish(TurnOutcome(kind="tool_value", tool_name=result.name, value=result.output))
            return
        if result.control == "fail":
            b.finish(
                TurnOutcome(
                    kind="stopped", reason="tool_error", tool_name=result.name, value=result.output
                )
            )
            return
    _next_iteration(b, CheckpointKind.AFTER_WORK)


def _next_iteration(b: _Builder, kind: CheckpointKind | None) -> None:
    iteration = b.get("iteration") + 1
    b.changes["iteration"] = iteration
    if iteration >= b.state.max_turns:
        b.message("assistant", text=f"Stopped after {b.state.max_turns} model calls.")
        b.progress()
        b.finish(_stopped("max_turns"))
        return
    b.progress()
    if kind is None:
        b.call_model()
    else:
        b.checkpoint(kind, None)


def _on_checkpoint(b: _Builder, response: CheckpointDelivered) -> None:
    waiting = b.state.waiting
    assert isinstance(waiting, Checkpoint)
    injected = [m for m in response.messages if m.role in ("user", "system")]
    if len(injected) != len(response.messages):
        raise UnexpectedResponse(response.effect_id, "user or system messages", "another role")
    if not injected:
        if b.state.on_empty is not None:
            b.finish(b.state.on_empty)
        else:
            b.call_model()
        return
    for message in injected:
        b.message(message.role, text=message.text)
    b.emit("injected_input", {"count": len(injected), "checkpoint": waiting.kind.value})
    if waiting.kind is CheckpointKind.BEFORE_COMPLETION:
        _next_iteration(b, None)
    else:
        b.progress()
        b.call_model()


_HANDLERS: Final = {
    ModelReplied: lambda b, r: _on_model_replied(b, r.response),
    ModelFailed: _on_model_failed,
    ToolsFinished: _on_tools_finished,
    CheckpointDelivered: _on_checkpoint,
}


class TurnMachine:
    """Drive one turn: ``poll_effect()`` until None, ``handle_response(reply)``, repeat."""

    def __init__(self, state: TurnState) -> None:
        self.state = state

    @classmethod
    def start(
        cls,
        messages: Iterable[Message],
        *,
        tools: Iterable[str] = (),
        max_turns: int = 8,
        turn_id: str = "turn",
    ) -> TurnMachine:
        """A new turn over ``messages`` (the history plus this turn's input).

        Raises:
            InvalidArgument: ``max_turns`` is not a positive int.
        """
        if type(max_turns) is not int or max_turns < 1:
            raise InvalidArgument(f"max_turns must be a positive int, got {max_turns!r}")
        state = TurnState(
            phase=Phase.WAITING_MODEL,
            messages=tuple(messages),
            tools=tuple(tools),
            max_turns=max_turns,
            turn_id=turn_id,
        )
        builder = _Builder(state)
        builder.call_model()
        return cls(builder.build())

    @classmethod
    def restore(cls, state: TurnState) -> TurnMachine:
        """Resume from a saved state; the awaited effect is emitted again, same id."""
        return cls(
            attrs.evolve(
                state, redeliver=state.waiting is not None and state.waiting not in state.pending
            )
        )

    @property
    def done(self) -> bool:
        """True once the turn finished and its Done effect was taken."""
        state = self.state
        return state.phase is Phase.FINISHED and not state.pending and not state.redeliver

    def poll_effect(self) -> Effect | None:
        """The next effect to carry out, or None when the machine awaits a reply (or is done)."""
        state = self.state
        if state.redeliver and state.waiting is not None:
            self.state = attrs.evolve(state, redeliver=False)
            return state.waiting
        if not state.pending:
            return None
        self.state = attrs.evolve(state, pending=state.pending[1:])
        return state.pending[0]

    def handle_response(self, response: Response) -> bool:
        """Feed a reply. False if it was ignored (not for the awaited effect).

        Raises:
            UnexpectedResponse: the reply names the awaited effect but is of the wrong kind, or
                is incomplete; nothing changed.
        """
        state = self.state
        waiting = state.waiting
        if state.phase is Phase.FINISHED:
            return False  # a finished turn awaits nothing: every reply is late
        if waiting is None or getattr(response, "effect_id", None) != waiting.effect_id:
            return False
        if not isinstance(response, ACCEPTS[state.phase]):
            raise UnexpectedResponse(
                waiting.effect_id, type(waiting).__name__, type(response).__name__
            )
        builder = _Builder(state)  # handlers read the awaited effect from builder.state
        builder.changes["waiting"] = None
        _HANDLERS[type(response)](builder, response)  # type: ignore[operator]
        self.state = builder.build()
        return True

    def cancel(self) -> None:
        """End the turn now: ``Stopped(cancelled)`` (a no-op once finished)."""
        if self.state.phase is Phase.FINISHED:
            return
        builder = _Builder(self.state)
        builder.finish(_stopped("cancelled"))
        self.state = builder.build()


# --- serialization ---------------------------------------------------------------------------


def _is_json(type_: Any) -> bool:
    """The JSON alias resolved by attrs: payloads are plain JSON already, kept as they are."""
    args = getattr(type_, "__args__", ())
    return all(t in args for t in (bool, int, float, str, type(None))) and len(args) == 7


_converter: Final = cattrs.Converter()
_converter.register_structure_hook_func(_is_json, lambda value, _: value)
configure_tagged_union(Effect, _converter, tag_name="effect")
configure_tagged_union(Response, _converter, tag_name="response")


def encode_state(state: TurnState) -> str:
    """A turn's state as canonical JSON (to persist, or to hand to another process)."""
    return encode_json(_converter.unstructure(state), limit=1 << 62)


def decode_state(text: str) -> TurnState:
    """The inverse of :func:`encode_state`.

    Raises:
        CorruptRecordError: not a state this code wrote.
    """
    try:
        return _converter.structure(json.loads(text), TurnState)
    except (ValueError, TypeError, KeyError, cattrs.BaseValidationError) as exc:
        raise CorruptRecordError("turn_state", "", repr(exc)) from exc
