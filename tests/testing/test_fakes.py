"""The deterministic fakes users write agent tests with: each step kind of ScriptedModel, under
trio (autojump clock for time) and asyncio, RecordingTool, FakeClock and SeededIds."""

from __future__ import annotations

import pickle

import anyio
import pytest
import trio
import trio.lowlevel
import trio.testing

from turnbuckle.errors import InvalidArgument
from turnbuckle.sansio.session import TokenUsage
from turnbuckle.sansio.turn import (
    Message,
    ModelRequest,
    ModelResponse,
    StopReason,
    ToolCall,
    ToolResult,
)
from turnbuckle.testing import (
    Delay,
    Fail,
    FakeClock,
    ModelCallError,
    RecordingTool,
    ScriptedModel,
    ScriptExhausted,
    SeededIds,
    Stall,
    call,
    calls,
    say,
)


def request(text: str = "hi", iteration: int = 0) -> ModelRequest:
    return ModelRequest(
        messages=[Message(message_id="m1", role="user", text=text)],
        tools=["search"],
        iteration=iteration,
    )


# --- ScriptedModel: the step kinds -----------------------------------------------------------


async def test_a_response_is_returned_as_is_and_a_str_is_a_text_answer() -> None:
    response = ModelResponse(text="exact", usage=TokenUsage(input_tokens=3, output_tokens=1))
    model = ScriptedModel(response, "plain")
    assert await model(request()) is response
    assert await model(request()) == ModelResponse(text="plain")
    assert model.calls == 2
    assert model.remaining == 0


async def test_say_builds_a_text_answer() -> None:
    usage = TokenUsage(input_tokens=5, output_tokens=2)
    assert say("done") == ModelResponse(text="done", stop_reason=StopReason.STOP)
    assert say("done", usage=usage).usage == usage


async def test_calls_get_deterministic_ids_counting_every_tool_call() -> None:
    model = ScriptedModel(
        call("search", {"q": "x"}),
        calls(call("a"), call("b", {"n": 1}, call_id="mine"), call("c"), text="working"),
        call("search"),
    )
    first = await model(request())
    assert first.stop_reason is StopReason.TOOL_USE
    assert first.text == ""
    assert first.tool_calls == (ToolCall(call_id="call-1", name="search", args={"q": "x"}),)
    second = await model(request())
    assert second.text == "working"
    assert second.tool_calls == (
        ToolCall(call_id="call-2", name="a"),
        ToolCall(call_id="mine", name="b", args={"n": 1}),
        ToolCall(call_id="call-4", name="c"),
    )
    assert [c.call_id for c in (await model(request())).tool_calls] == ["call-5"]


async def test_the_same_script_gives_the_same_ids_on_every_model() -> None:
    async def replies() -> list[ModelResponse]:
        model = ScriptedModel(call("a"), calls(call("b"), call("c")))
        return [await model(request()), await model(request())]

    assert await replies() == await replies()


def test_calls_refuses_parts_it_would_lose() -> None:
    with pytest.raises(InvalidArgument):
        calls()
    with pytest.raises(InvalidArgument, match="text="):
        calls(call("a", text="hmm"))
    with pytest.raises(InvalidArgument):
        calls(say("no tool calls here"))
    explicit = ToolCall(call_id="x", name="t")
    assert calls(explicit, call("u")).tool_calls == (explicit, ToolCall(call_id="", name="u"))


async def test_fail_raises_model_call_error() -> None:
    model = ScriptedModel(Fail("rate limited", retryable=True), Fail("bad key"), "recovered")
    with pytest.raises(ModelCallError, match="rate limited") as info:
        await model(request())
    assert info.value.retryable is True
    assert info.value.message == "rate limited"
    with pytest.raises(ModelCallError) as info:
        await model(request())
    assert info.value.retryable is False
    assert str(info.value) == "bad key"
    assert (await model(request())).text == "recovered"
    assert model.calls == 3


def test_model_call_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(ModelCallError("boom", True)))
    assert (error.message, error.retryable, str(error)) == ("boom", True, "boom")


async def test_stall_waits_until_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    model = ScriptedModel(Stall(), "after the stall")
    start = trio.current_time()
    with trio.move_on_after(3600) as scope:
        await model(request())
    assert scope.cancelled_caught
    assert trio.current_time() - start == 3600
    assert model.calls == 1  # the stalled call was recorded
    assert (await model(request())).text == "after the stall"


async def test_delay_sleeps_on_the_fake_clock_then_performs_its_step(
    autojump_clock: trio.testing.MockClock,
) -> None:
    model = ScriptedModel(Delay(30, then="slow answer"), Delay(5, then=Fail("timeout")))
    start = trio.current_time()
    assert (await model(request())).text == "slow answer"
    assert trio.current_time() - start == 30
    with pytest.raises(ModelCallError, match="timeout"):
        await model(request())
    assert trio.current_time() - start == 35


async def test_delay_can_be_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    model = ScriptedModel(Delay(60, then="too late"))
    with trio.move_on_after(10) as scope:
        await model(request())
    assert scope.cancelled_caught


async def test_callable_steps_answer_from_the_request() -> None:
    seen: list[int] = []

    def echo(req: ModelRequest) -> str:
        seen.append(req.iteration)
        return f"you said {req.messages[-1].text!r}"

    model = ScriptedModel(
        echo,
        lambda req: call("search", {"q": req.messages[-1].text}),
        lambda req: Fail("no") if req.iteration > 1 else "fine",
    )
    assert (await model(request("ping", 0))).text == "you said 'ping'"
    assert (await model(request("x", 1))).tool_calls == (
        ToolCall(call_id="call-1", name="search", args={"q": "x"}),
    )
    with pytest.raises(ModelCallError):
        await model(request(iteration=2))
    assert seen == [0]


async def test_a_callable_returning_a_non_step_is_refused() -> None:
    model = ScriptedModel(lambda req: 42)  # type: ignore[arg-type,return-value]
    with pytest.raises(InvalidArgument, match="not a step"):
        await model(request())


async def test_requests_are_recorded_in_order_including_failures() -> None:
    model = ScriptedModel("a", Fail("x"))
    first, second, third = request("one"), request("two"), request("three")
    await model(first)
    with pytest.raises(ModelCallError):
        await model(second)
    with pytest.raises(ScriptExhausted):
        await model(third)
    assert model.requests == [first, second, third]
    assert model.calls == 3


async def test_an_exhausted_script_raises_naming_how_many_calls_were_scripted() -> None:
    model = ScriptedModel("one", "two")
    await model(request())
    assert model.remaining == 1
    await model(request())
    with pytest.raises(ScriptExhausted) as info:
        await model(request())
    assert (info.value.scripted, info.value.call_number) == (2, 3)
    assert "only 2 calls were scripted" in str(info.value)
    assert "then=" in str(info.value)
    assert model.remaining == 0


async def test_then_repeats_a_default_step_after_the_script() -> None:
    model = ScriptedModel(call("a"), then=lambda req: f"iteration {req.iteration}")
    assert (await model(request())).tool_calls[0].name == "a"
    for i in range(1, 4):
        assert (await model(request(iteration=i))).text == f"iteration {i}"
    empty = ScriptedModel(then="always")
    assert [(await empty(request())).text for _ in range(3)] == ["always"] * 3


def test_bad_steps_are_refused_when_the_script_is_built() -> None:
    with pytest.raises(InvalidArgument, match="separate arguments"):
        ScriptedModel(["a", "b"])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="step 2"):
        ScriptedModel("a", 3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=">= 0"):
        ScriptedModel(Delay(-1, then="x"))
    with pytest.raises(InvalidArgument, match=r"Delay\.then"):
        ScriptedModel(Delay(1, then=None))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="then"):
        ScriptedModel(then=1.5)  # type: ignore[arg-type]


async def test_concurrent_calls_take_steps_in_call_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    model = ScriptedModel(Delay(10, then="first"), "second")
    got: dict[str, str] = {}

    async def ask(label: str) -> None:
        got[label] = (await model(request(label))).text

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "slow")
        await trio.sleep(1)
        nursery.start_soon(ask, "fast")
    assert got == {"slow": "first", "fast": "second"}


def test_the_scripted_model_runs_under_asyncio() -> None:
    async def main() -> list[str]:
        model = ScriptedModel(Delay(0.01, then="hello"), call("t"), Stall())
        out = [(await model(request())).text, (await model(request())).tool_calls[0].call_id]
        with anyio.move_on_after(0.05) as scope:
            await model(request())
        assert scope.cancelled_caught
        with pytest.raises(ScriptExhausted):
            await model(request())
        return out

    assert anyio.run(main, backend="asyncio") == ["hello", "call-1"]


# --- RecordingTool ---------------------------------------------------------------------------


async def test_recording_tool_records_args_and_returns_a_constant() -> None:
    tool = RecordingTool({"ok": True})
    assert await tool({"q": "a"}) == {"ok": True}
    assert await tool(None) == {"ok": True}
    assert tool.calls == [{"q": "a"}, None]
    assert await RecordingTool()(1) is None


async def test_recording_tool_wraps_sync_and_async_functions() -> None:
    def double(args: object) -> int:
        assert isinstance(args, int)
        return args * 2

    async def shout(args: object) -> str:
        await trio.lowlevel.checkpoint()
        return str(args).upper()

    sync_tool, async_tool = RecordingTool(double), RecordingTool(shout)
    assert await sync_tool(21) == 42
    assert await async_tool("hey") == "HEY"
    assert sync_tool.calls == [21]
    assert async_tool.calls == ["hey"]


async def test_recording_tool_may_return_a_tool_result_for_control() -> None:
    finish = ToolResult(call_id="", name="answer", output=7, control="finish")
    tool = RecordingTool(lambda args: finish)
    assert await tool({}) is finish


async def test_recording_tool_raises() -> None:
    tool = RecordingTool("unused", raises=RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        await tool({"a": 1})
    assert tool.calls == [{"a": 1}]
    tool.raises = None  # a plain attribute: the next call succeeds
    assert await tool(2) == "unused"
    with pytest.raises(KeyError):
        await RecordingTool(raises=KeyError)(None)

    def broken(args: object) -> None:
        raise ValueError("inside the tool")

    wrapped = RecordingTool(broken)
    with pytest.raises(ValueError, match="inside the tool"):
        await wrapped(3)
    assert wrapped.calls == [3]


async def test_recording_tool_stalls_until_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tool = RecordingTool("done", stall=True)
    start = trio.current_time()
    with trio.move_on_after(100) as scope:
        await tool({"slow": True})
    assert scope.cancelled_caught
    assert trio.current_time() - start == 100
    assert tool.calls == [{"slow": True}]
    tool.stall = False
    assert await tool(None) == "done"


# --- FakeClock and SeededIds -----------------------------------------------------------------


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(now_ms=1_000)
    assert clock.now_ms() == 1_000
    assert clock.now_ms() == 1_000
    clock.advance(250)
    assert clock.now_ms() == 1_250
    clock.advance(0)
    assert clock.now_ms() == 1_250
    with pytest.raises(InvalidArgument, match="only moves forward"):
        clock.advance(-1)
    assert clock.now_ms() == 1_250
    clock.set(500)  # set may go backwards
    assert clock.now_ms() == 500
    assert FakeClock().now_ms() == 1_748_736_000_000


def test_seeded_ids_are_reproducible() -> None:
    def draw(seed: int) -> list[int]:
        ids = SeededIds(seed)
        return [ids.random_bits(64) for _ in range(5)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert all(0 <= bits < 1 << 64 for bits in draw(1))
    assert all(SeededIds(3).random_bits(8) < 256 for _ in range(10))
