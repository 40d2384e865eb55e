"""The turn machine: every (phase, response) pair, the standard tool-calling protocol, and
checkpoint/restore at random points never changing the outcome."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnbuckle.errors import CorruptRecordError, InvalidArgument
from turnbuckle.sansio.session import TokenUsage
from turnbuckle.sansio.turn import (
    ACCEPTS,
    CallModel,
    Checkpoint,
    CheckpointDelivered,
    CheckpointKind,
    Done,
    Effect,
    Emit,
    Message,
    ModelFailed,
    ModelReplied,
    ModelResponse,
    Phase,
    Response,
    RunTools,
    StopReason,
    ToolCall,
    ToolResult,
    ToolsFinished,
    TurnMachine,
    TurnOutcome,
    UnexpectedResponse,
    decode_state,
    encode_state,
)

USER = Message(message_id="u1", role="user", text="what is 2+2?")


def drain(machine: TurnMachine) -> list[Effect]:
    out = []
    while (effect := machine.poll_effect()) is not None:
        out.append(effect)
    return out


def awaited(machine: TurnMachine) -> Effect:
    effect = machine.state.waiting
    assert effect is not None
    return effect


def text(answer: str) -> ModelResponse:
    return ModelResponse(text=answer, usage=TokenUsage(input_tokens=10, output_tokens=2))


def calls(*names: str) -> ModelResponse:
    return ModelResponse(
        tool_calls=[ToolCall(call_id=f"c{i}", name=n, args={"i": i}) for i, n in enumerate(names)],
        stop_reason=StopReason.TOOL_USE,
    )


def in_phase(phase: Phase) -> TurnMachine:
    machine = TurnMachine.start([USER], tools=["add"], max_turns=3)
    drain(machine)
    if phase is Phase.WAITING_TOOLS:
        machine.handle_response(
            ModelReplied(effect_id=awaited(machine).effect_id, response=calls("add"))
        )
    elif phase is Phase.WAITING_CHECKPOINT:
        machine.handle_response(
            ModelReplied(effect_id=awaited(machine).effect_id, response=text("4"))
        )
    elif phase is Phase.FINISHED:
        machine.cancel()
    drain(machine)
    assert machine.state.phase is phase
    return machine


def example(kind: type[Any], effect_id: int) -> Response:
    return {
        ModelReplied: lambda: ModelReplied(effect_id=effect_id, response=text("4")),
        ModelFailed: lambda: ModelFailed(effect_id=effect_id, message="down"),
        ToolsFinished: lambda: ToolsFinished(
            effect_id=effect_id, results=[ToolResult(call_id="c0", name="add", output=4)]
        ),
        CheckpointDelivered: lambda: CheckpointDelivered(effect_id=effect_id),
    }[kind]()  # type: ignore[no-any-return]


RESPONSES = [ModelReplied, ModelFailed, ToolsFinished, CheckpointDelivered]


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("kind", RESPONSES, ids=lambda k: k.__name__)
def test_every_phase_and_response(phase: Phase, kind: type[Any]) -> None:
    machine = in_phase(phase)
    before = machine.state
    # A reply for any other effect id is ignored, whatever its kind.
    assert machine.handle_response(example(kind, 999)) is False
    assert machine.state == before
    if phase is Phase.FINISHED:
        assert machine.handle_response(example(kind, before.next_effect_id - 1)) is False
        assert machine.state == before
        return
    effect_id = awaited(machine).effect_id
    if kind in ACCEPTS[phase]:
        assert machine.handle_response(example(kind, effect_id)) is True
        assert machine.state != before
        assert machine.state.waiting is None or machine.state.waiting.effect_id > effect_id
    else:
        with pytest.raises(UnexpectedResponse):
            machine.handle_response(example(kind, effect_id))
        assert machine.state == before


def test_the_nth_effect_has_id_n_and_a_plain_answer_finishes() -> None:
    machine = TurnMachine.start([USER], max_turns=3)
    effects = drain(machine)
    assert [type(e) for e in effects] == [Emit, CallModel]
    machine.handle_response(ModelReplied(effect_id=effects[-1].effect_id, response=text("4")))
    effects += drain(machine)
    assert isinstance(effects[-1], Checkpoint)
    assert effects[-1].kind is CheckpointKind.BEFORE_COMPLETION
    machine.handle_response(CheckpointDelivered(effect_id=effects[-1].effect_id))
    effects += drain(machine)
    assert [e.effect_id for e in effects] == list(range(1, len(effects) + 1))
    done = effects[-1]
    assert isinstance(done, Done) and done.outcome == TurnOutcome(
        kind="assistant_message", text="4"
    )
    assert [m.text for m in done.messages] == ["what is 2+2?", "4"]
    kinds = [e.event.type for e in effects if isinstance(e, Emit)]
    assert kinds == ["llm_request", "token_usage", "text_delta"]
    assert machine.done and machine.state.usage.input_tokens == 10


def run(
    machine: TurnMachine,
    model: Callable[[int], ModelResponse | str],
    tools: Callable[[ToolCall], ToolResult] | None = None,
    inject: Callable[[CheckpointKind, int], list[Message]] | None = None,
    crash_at: set[int] | frozenset[int] = frozenset(),
) -> tuple[TurnOutcome, list[tuple[str, int]]]:
    """Drive a machine like a host would; restore from JSON before answering effect ids in
    ``crash_at`` (a crash after the effect was taken, before its reply)."""
    seen: list[tuple[str, int]] = []
    calls_made = 0
    crashed: set[int] = set()
    while True:
        effect = machine.poll_effect()
        if effect is None:
            raise AssertionError("the machine stalled")
        if (type(effect).__name__, effect.effect_id) not in seen:
            seen.append((type(effect).__name__, effect.effect_id))
        if effect.effect_id in crash_at and effect.effect_id not in crashed:
            crashed.add(effect.effect_id)
            machine = TurnMachine.restore(decode_state(encode_state(machine.state)))
            continue
        if isinstance(effect, Done):
            return effect.outcome, seen
        if isinstance(effect, CallModel):
            reply = model(calls_made)
            calls_made += 1
            if isinstance(reply, str):
                machine.handle_response(ModelFailed(effect_id=effect.effect_id, message=reply))
            else:
                machine.handle_response(ModelReplied(effect_id=effect.effect_id, response=reply))
        elif isinstance(effect, RunTools):
            assert tools is not None
            results = [tools(c) for c in reversed(effect.calls)]  # finish order is not call order
            machine.handle_response(ToolsFinished(effect_id=effect.effect_id, results=results))
        elif isinstance(effect, Checkpoint):
            messages = inject(effect.kind, effect.effect_id) if inject else []
            machine.handle_response(
                CheckpointDelivered(effect_id=effect.effect_id, messages=messages)
            )


def add_tool(call: ToolCall) -> ToolResult:
    return ToolResult(call_id=call.call_id, name=call.name, output={"sum": 4})


def test_tool_loop_then_answer() -> None:
    script = [calls("add", "add"), text("it is 4")]
    outcome, seen = run(TurnMachine.start([USER], tools=["add"]), lambda n: script[n], add_tool)
    assert outcome == TurnOutcome(kind="assistant_message", text="it is 4")
    assert [k for k, _ in seen].count("CallModel") == 2
    assert [k for k, _ in seen].count("Progress") >= 2


def test_max_turns_stops_with_a_final_note() -> None:
    machine = TurnMachine.start([USER], tools=["add"], max_turns=2)
    outcome, _ = run(machine, lambda n: calls("add"), add_tool)
    assert outcome.kind == "stopped" and outcome.reason == "max_turns"


@pytest.mark.parametrize(
    ("stop", "reason"),
    [
        (StopReason.OUTPUT_LIMIT, "incomplete"),
        (StopReason.CONTEXT_OVERFLOW, "provider_error"),
        (StopReason.CONTENT_FILTER, "provider_error"),
        (StopReason.PROVIDER_ERROR, "provider_error"),
        (StopReason.CANCELLED, "cancelled"),
    ],
)
def test_model_stops_map_to_outcomes(stop: StopReason, reason: str) -> None:
    outcome, _ = run(
        TurnMachine.start([USER]), lambda n: ModelResponse(text="partial", stop_reason=stop)
    )
    assert (outcome.kind, outcome.reason) == ("stopped", reason)


def test_model_errors_and_empty_replies_are_provider_errors() -> None:
    outcome, _ = run(TurnMachine.start([USER]), lambda n: "the provider is down")
    assert (outcome.reason, outcome.text) == ("provider_error", "the provider is down")
    outcome, _ = run(TurnMachine.start([USER]), lambda n: ModelResponse())
    assert outcome.reason == "provider_error"
    # Empty after a tool result is a (blank) answer, not an error.
    script = [calls("add"), ModelResponse()]
    outcome, _ = run(TurnMachine.start([USER], tools=["add"]), lambda n: script[n], add_tool)
    assert outcome == TurnOutcome(kind="assistant_message", text="")


@pytest.mark.parametrize(("control", "kind"), [("finish", "tool_value"), ("fail", "stopped")])
def test_tool_controls_end_the_turn(control: str, kind: str) -> None:
    def tool(call: ToolCall) -> ToolResult:
        return ToolResult(call_id=call.call_id, name=call.name, output="v", control=control)

    outcome, _ = run(TurnMachine.start([USER], tools=["add"]), lambda n: calls("add"), tool)
    assert (outcome.kind, outcome.tool_name, outcome.value) == (kind, "add", "v")


def test_input_injected_at_a_checkpoint_reaches_the_next_model_call() -> None:
    requests: list[int] = []
    machine = TurnMachine.start([USER], tools=["add"])
    script = [calls("add"), text("4"), text("and 5")]
    injected = {
        CheckpointKind.AFTER_WORK: [Message(message_id="x", role="user", text="also 2+3")],
        CheckpointKind.BEFORE_COMPLETION: [],
    }
    delivered: set[CheckpointKind] = set()

    def inject(kind: CheckpointKind, _: int) -> list[Message]:
        if kind in delivered:
            return []
        delivered.add(kind)
        return injected[kind]

    def model(n: int) -> ModelResponse:
        requests.append(n)
        return script[n]

    outcome, _ = run(machine, model, add_tool, inject)
    assert outcome.text == "4"
    assert "also 2+3" in [m.text for m in machine.state.messages]


def test_cancel_finishes_once() -> None:
    machine = TurnMachine.start([USER])
    drain(machine)
    machine.cancel()
    effects = drain(machine)
    assert isinstance(effects[-1], Done) and effects[-1].outcome.reason == "cancelled"
    machine.cancel()
    assert drain(machine) == []


class Opaque:
    """Not JSON (a datetime would do as well)."""

    def __repr__(self) -> str:  # a stable test id
        return "Opaque()"


@pytest.mark.parametrize(
    "reply",
    [
        "not a ModelResponse",
        None,
        ModelResponse(text=5),  # type: ignore[arg-type]
        ModelResponse(stop_reason="stop"),  # type: ignore[arg-type]
        ModelResponse(text="x", usage=TokenUsage(input_tokens=-1)),
        ModelResponse(text="x", usage=None),  # type: ignore[arg-type]
        ModelResponse(tool_calls=[ToolCall(call_id="c", name="add", args={"at": Opaque()})]),
        ModelResponse(
            tool_calls=[ToolCall(call_id="c", name="add"), ToolCall(call_id="c", name="add")]
        ),
        ModelResponse(tool_calls=["add"]),
        ModelResponse(tool_calls=[ToolCall(call_id=1, name="add")]),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_a_malformed_model_reply_ends_the_turn_with_a_typed_outcome(reply: Any) -> None:
    machine = TurnMachine.start([USER], tools=["add"])
    drain(machine)
    machine.handle_response(ModelReplied(effect_id=awaited(machine).effect_id, response=reply))
    effects = drain(machine)
    done = effects[-1]
    assert isinstance(done, Done)
    assert (done.outcome.kind, done.outcome.reason) == ("stopped", "invalid_model_response")
    assert done.outcome.text and [e.event.type for e in effects if isinstance(e, Emit)] == ["error"]
    assert done.messages == (USER,), "nothing of the bad reply enters the conversation"


@pytest.mark.parametrize(
    "result",
    [
        ToolResult(call_id="c1", name="add", output=Opaque()),
        ToolResult(call_id="c1", name="add", output={"when": {1, 2}}),
        ToolResult(call_id="c1", name="add", output=float("nan")),
        ToolResult(call_id="c1", name="add", output=1, control="explode"),
        ToolResult(call_id="c1", name="add", output=1, is_error="yes"),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_a_tool_result_that_is_not_json_ends_the_turn_with_a_typed_outcome(
    result: ToolResult,
) -> None:
    """A tool returning a non-JSON value (a datetime, say): the turn ends
    Stopped(invalid_tool_result) naming the tool, and every call still has its tool message,
    so the next turn's conversation is well formed."""
    machine = TurnMachine.start([USER], tools=["add"])
    drain(machine)
    machine.handle_response(
        ModelReplied(effect_id=awaited(machine).effect_id, response=calls("add", "add"))
    )
    drain(machine)
    good = ToolResult(call_id="c0", name="add", output=4)
    machine.handle_response(
        ToolsFinished(effect_id=awaited(machine).effect_id, results=[good, result])
    )
    effects = drain(machine)
    done = effects[-1]
    assert isinstance(done, Done)
    assert (done.outcome.kind, done.outcome.reason, done.outcome.tool_name) == (
        "stopped",
        "invalid_tool_result",
        "add",
    )
    tool_messages = [m for m in done.messages if m.role == "tool"]
    assert [m.tool_call_id for m in tool_messages] == ["c0", "c1"]
    assert tool_messages[0].text == "4" and "error: " in tool_messages[1].text
    assert done.outcome.text in tool_messages[1].text


def test_bad_inputs() -> None:
    with pytest.raises(InvalidArgument):
        TurnMachine.start([USER], max_turns=0)
    machine = in_phase(Phase.WAITING_TOOLS)
    with pytest.raises(UnexpectedResponse):  # a result missing for a call
        machine.handle_response(ToolsFinished(effect_id=awaited(machine).effect_id, results=[]))
    machine = in_phase(Phase.WAITING_CHECKPOINT)
    with pytest.raises(UnexpectedResponse):  # only user/system input may be injected
        machine.handle_response(
            CheckpointDelivered(
                effect_id=awaited(machine).effect_id,
                messages=[Message(message_id="a", role="assistant", text="x")],
            )
        )
    with pytest.raises(CorruptRecordError):
        decode_state('{"phase": "nope"}')


def test_restore_re_emits_the_awaited_effect_with_its_id() -> None:
    machine = TurnMachine.start([USER])
    call = next(e for e in drain(machine) if isinstance(e, CallModel))
    restored = TurnMachine.restore(decode_state(encode_state(machine.state)))
    assert restored.poll_effect() == call and restored.poll_effect() is None
    # After the model replied, a restore replays the checkpoint, not the call.
    machine.handle_response(ModelReplied(effect_id=call.effect_id, response=text("4")))
    taken = drain(machine)
    restored = TurnMachine.restore(decode_state(encode_state(machine.state)))
    again = restored.poll_effect()
    assert isinstance(again, Checkpoint) and again == taken[-1]


scripts = st.lists(
    st.one_of(
        st.builds(lambda k: calls(*["add"] * k), st.integers(1, 3)),
        st.sampled_from([text("answer"), "provider down", ModelResponse()]),
    ),
    min_size=1,
    max_size=6,
)


@given(
    scripts,
    st.integers(1, 5),
    st.sets(st.integers(1, 60), max_size=6),
    st.lists(st.booleans(), max_size=8),
)
def test_random_restores_never_change_the_outcome(
    script: list[ModelResponse | str], max_turns: int, crash_at: set[int], injections: list[bool]
) -> None:
    def model(n: int) -> ModelResponse | str:
        return script[n] if n < len(script) else text("final")

    def inject(kind: CheckpointKind, effect_id: int) -> list[Message]:
        # Deterministic by effect id, so a replayed checkpoint delivers the same input.
        wanted = injections[effect_id % len(injections)] if injections else False
        return [Message(message_id=f"q{effect_id}", role="user", text="more")] if wanted else []

    def fresh() -> TurnMachine:
        return TurnMachine.start([USER], tools=["add"], max_turns=max_turns)

    baseline = run(fresh(), model, add_tool, inject)
    replayed = run(fresh(), model, add_tool, inject, crash_at=crash_at)
    assert replayed == baseline


def test_states_round_trip_through_json() -> None:
    machine = TurnMachine.start([USER], tools=["add"])
    drain(machine)
    machine.handle_response(
        ModelReplied(effect_id=awaited(machine).effect_id, response=calls("add", "add"))
    )
    state = machine.state
    assert decode_state(encode_state(state)) == state
    assert attrs.evolve(state) == state
