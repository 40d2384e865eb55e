"""The runtime (:mod:`turnbuckle.actors.runtime`): per-session actors running turns on a store.

Every trio test runs on ``memory://`` and on a SQLite file, on trio's ``MockClock`` with the
store's clock following it (``LoopClock``), so leases, renewals, retries and model delays take
no real time: on memory the clock jumps as soon as every task waits (``autojump_threshold=0``);
on SQLite only after 20 ms of real waiting, so a store call in its owner thread is not taken
for idleness. Ordering is by Events (a gated model, tools that wait for each other), never by
sleeps, and nothing asserts on timing. Lease ttls are seconds long: virtual time costs nothing,
and a lease that cannot run out while a real store call is in flight (a jump of the mock clock)
keeps a test about something else from also testing lease loss. The core scenarios also run
under asyncio, on the real clock.
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import trio
import trio.testing

from turnbuckle import (
    ClaimBoundary,
    DeliveryPolicy,
    InvalidArgument,
    Message,
    ModelRequest,
    ModelResponse,
    QueuedWorkDraft,
    QueuedWorkNotFound,
    QueuedWorkParked,
    SessionRead,
    SlotPolicy,
    StopReason,
    Store,
    StoreBusyError,
    StoreClosedError,
    SubmitStatus,
    Ticket,
    TokenUsage,
    ToolCall,
    TurnOutcome,
    WorkState,
    open_runtime,
    open_store,
)
from turnbuckle.actors.runtime import Model, RuntimeEvent
from turnbuckle.testing import (
    Fail,
    LoopClock,
    RecordingTool,
    ScriptedModel,
    Stall,
    call,
    calls,
    say,
)

#: A hang guard for the asyncio runs (real seconds), never a timing assertion. The trio runs
#: have none: on a mock clock a guard's deadline is where time jumps while a store call is in
#: its owner thread, so a hang there shows in the faulthandler's dump instead.
HANG_S = 60


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    return "sqlite:///" + str(tmp_path / "runtime.db")


@pytest.fixture
def clock(url: str) -> trio.testing.MockClock:
    """The test's clock (pytest-trio runs the test on it): see the module docstring."""
    return trio.testing.MockClock(autojump_threshold=0 if url == "memory://" else 0.02)


def store_on(url: str, **options: Any) -> Any:
    """The store, on the loop's clock (the runtime times itself by the store's)."""
    return open_store(url, clock=LoopClock(), **options)


# --- helpers ---------------------------------------------------------------------------------


class Gate:
    """Wraps a model. The first call sets :attr:`entered` and, with ``hold``, waits for
    :attr:`release` before the wrapped model answers it; a cancelled call sets
    :attr:`cancelled`. Make it inside the event loop (it holds anyio Events)."""

    def __init__(self, model: Model, *, hold: bool = True) -> None:
        self.model = model
        self.hold = hold
        self.entered = anyio.Event()
        self.release = anyio.Event()
        self.cancelled = anyio.Event()
        self.calls = 0

    async def __call__(self, request: ModelRequest) -> ModelResponse:
        self.calls += 1
        try:
            if self.calls == 1:
                self.entered.set()
                if self.hold:
                    await self.release.wait()
            return await self.model(request)
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise


def user_texts(messages: tuple[Message, ...]) -> list[str]:
    return [m.text for m in messages if m.role == "user"]


def graph(read: SessionRead) -> list[tuple[str, str]]:
    """(role, text) of every node, in order."""
    return [(node.payload["role"], node.payload["text"]) for node in read.nodes]  # type: ignore[index,call-overload]


async def load(store: Store, session_id: str) -> SessionRead:
    read = await store.sessions.bind(session_id).load()
    assert read is not None, f"session {session_id!r} was never committed"
    return read


async def queue_ids(store: Store, session_id: str) -> list[str]:
    return [b.batch_id for b in await store.sessions.list_queued_work(session_id)]


async def collect(stream: Any, until: Callable[[RuntimeEvent], bool]) -> list[RuntimeEvent]:
    events = []
    async for event in stream:
        events.append(event)
        if until(event):
            return events
    raise AssertionError("the stream ended")


# --- scenarios shared by trio and asyncio ----------------------------------------------------


async def simple_turn(url: str, **store_options: Any) -> None:
    model = ScriptedModel(say("Hello there."))
    async with (
        open_store(url, **store_options) as store,
        open_runtime(store, model=model) as runtime,
    ):
        ticket = await runtime.submit("s1", "hi", source_key="k1")
        assert (ticket.session_id, ticket.source_key, ticket.status) == (
            "s1",
            "k1",
            SubmitStatus.NEW,
        )
        reply = await runtime.outcome(ticket)
        assert reply.outcome == TurnOutcome(kind="assistant_message", text="Hello there.")
        assert reply.text == "Hello there." and reply.head_revision == 1
        assert reply.turn_id == f"turn:{ticket.batch_id}"
        read = await load(store, "s1")
        assert graph(read) == [("user", "hi"), ("assistant", "Hello there.")]
        assert read.nodes[1].parent_node_id == read.nodes[0].node_id
        assert read.head_revision == 1
        assert await queue_ids(store, "s1") == []
        assert [user_texts(r.messages) for r in model.requests] == [["hi"]]
        report = await runtime.wait_idle()
        assert report.parked == () and runtime.active_sessions == []
        # The actor released the session's lease when it ran out of work.
        lease = await store.sessions.try_claim_lease("s1", "someone-else", 60_000)
        assert lease is not None and lease.fencing_token == 2


async def concurrent_tools(url: str, **store_options: Any) -> None:
    """Two tools of one batch that can only finish if they run at the same time: ``a`` waits
    until ``b`` finished, ``b`` waits until ``a`` started (run one after the other, in either
    order, they deadlock and the hang guard fails the test). ``b`` finishes first, yet the
    results reach the model in call order."""
    a_started, b_finished = anyio.Event(), anyio.Event()

    async def tool_a(args: object) -> object:
        a_started.set()
        await b_finished.wait()
        return {"a": args}

    async def tool_b(args: object) -> object:
        await a_started.wait()
        b_finished.set()
        return {"b": args}

    model = ScriptedModel(calls(call("a", {"n": 1}), call("b", {"n": 2})), say("both done"))
    tools = {"a": RecordingTool(tool_a), "b": RecordingTool(tool_b)}
    async with (
        open_store(url, **store_options) as store,
        open_runtime(store, model=model, tools=tools) as runtime,
    ):
        outcome = await runtime.run_turn("s", "use both tools")
        assert outcome == TurnOutcome(kind="assistant_message", text="both done")
        assert tools["a"].calls == [{"n": 1}]
        assert tools["b"].calls == [{"n": 2}]
        second = model.requests[1]
        assert second.tools == ("a", "b")
        assert [(m.role, m.tool_call_id, m.text) for m in second.messages] == [
            ("user", None, "use both tools"),
            ("assistant", None, ""),
            ("tool", "call-1", json.dumps({"a": {"n": 1}})),
            ("tool", "call-2", json.dumps({"b": {"n": 2}})),
        ]
        read = await load(store, "s")
        assert [role for role, _ in graph(read)] == [
            "user",
            "assistant",
            "tool",
            "tool",
            "assistant",
        ]
        assert read.head_revision == 1


async def mid_turn_message(url: str, delivery: DeliveryPolicy, **store_options: Any) -> None:
    """A second message submitted while the first turn's model call is running (the model
    waits until the test has submitted it): ``earliest_safe_boundary`` joins the running turn
    at its checkpoint (one commit, which answers both), ``after_current_turn_commit`` starts
    the next turn."""
    inner = ScriptedModel(say("first answer"), say("second answer"))
    model = Gate(inner)
    async with (
        open_store(url, **store_options) as store,
        open_runtime(store, model=model) as runtime,
    ):
        first = await runtime.submit("s", "m1")
        await model.entered.wait()  # the first turn is inside its model call
        second = await runtime.submit("s", "m2", delivery=delivery)
        model.release.set()
        replies = [await runtime.outcome(first), await runtime.outcome(second)]
        await runtime.wait_idle()
        read = await load(store, "s")
        assert graph(read) == [
            ("user", "m1"),
            ("assistant", "first answer"),
            ("user", "m2"),
            ("assistant", "second answer"),
        ]
        assert await queue_ids(store, "s") == []
        requests = [user_texts(r.messages) for r in inner.requests]
        assert requests == [["m1"], ["m1", "m2"]]
        if delivery is DeliveryPolicy.EARLIEST_SAFE_BOUNDARY:
            # Joined: one turn answers both, and its second model call saw m2.
            assert read.head_revision == 1
            assert [r.text for r in replies] == ["second answer", "second answer"]
            assert replies[0].turn_id == replies[1].turn_id
            assert inner.requests[1].iteration == 1
        else:
            assert read.head_revision == 2
            assert [r.text for r in replies] == ["first answer", "second answer"]
            assert inner.requests[1].iteration == 0


# --- trio ------------------------------------------------------------------------------------


async def test_simple_turn(url: str, clock: trio.testing.MockClock) -> None:
    await simple_turn(url, clock=LoopClock())


async def test_one_batch_of_tools_runs_concurrently(
    url: str, clock: trio.testing.MockClock
) -> None:
    await concurrent_tools(url, clock=LoopClock())


@pytest.mark.parametrize(
    "delivery",
    [DeliveryPolicy.EARLIEST_SAFE_BOUNDARY, DeliveryPolicy.AFTER_CURRENT_TURN_COMMIT],
    ids=["join", "after_commit"],
)
async def test_message_sent_during_a_turn(
    url: str, clock: trio.testing.MockClock, delivery: DeliveryPolicy
) -> None:
    await mid_turn_message(url, delivery, clock=LoopClock())


async def test_events_stream_a_turn_in_order(url: str, clock: trio.testing.MockClock) -> None:
    first_usage = TokenUsage(input_tokens=3, output_tokens=1)
    second_usage = TokenUsage(input_tokens=10, output_tokens=5)
    model = ScriptedModel(
        ModelResponse(
            tool_calls=[ToolCall(call_id="c1", name="lookup", args={"q": "x"})],
            stop_reason=StopReason.TOOL_USE,
            usage=first_usage,
        ),
        say("the answer", usage=second_usage),
    )
    tools = {"lookup": RecordingTool("found x")}
    async with (
        store_on(url) as store,
        open_runtime(store, model=model, tools=tools) as runtime,
        runtime.events("s") as stream,
        runtime.events("other") as elsewhere,
        runtime.events() as everything,
    ):
        ticket = await runtime.submit("s", "question")
        events = await collect(stream, lambda e: e.type == "turn_outcome")
        assert [e.type for e in events] == [
            "turn_started",
            "llm_request",
            "token_usage",
            "tool_call",
            "tool_call",
            "llm_request",
            "token_usage",
            "text_delta",
            "turn_outcome",
        ]
        assert all(e.session_id == "s" for e in events)
        assert [e.seq for e in events] == sorted(e.seq for e in events)
        turn_id = f"turn:{ticket.batch_id}"
        assert {e.turn_id for e in events} == {turn_id}
        assert events[0].data == {"tickets": [ticket.batch_id]}
        assert events[1].data == {"iteration": 0, "message_count": 1}
        assert events[2].data == {
            "usage": attrs.asdict(first_usage),
            "cumulative": attrs.asdict(first_usage),
        }
        assert events[3].data == {
            "phase": "started",
            "call_id": "c1",
            "name": "lookup",
            "args": {"q": "x"},
        }
        assert events[4].data == {
            "phase": "finished",
            "call_id": "c1",
            "name": "lookup",
            "output": "found x",
            "is_error": False,
        }
        assert events[5].data == {"iteration": 1, "message_count": 3}
        assert events[7].data == {"text": "the answer"}
        outcome = TurnOutcome(kind="assistant_message", text="the answer")
        assert events[8].data == {
            "tickets": [ticket.batch_id],
            "outcome": attrs.asdict(outcome),
            "head_revision": 1,
        }
        assert (await runtime.outcome(ticket)).outcome == outcome
        assert stream.dropped == 0
        # The stream of every session saw the same events, in the same order.
        assert [e.seq for e in await collect(everything, lambda e: e.seq == events[-1].seq)] == [
            e.seq for e in events
        ]
        with pytest.raises(anyio.WouldBlock):  # nothing more, nothing for other sessions
            stream.receive.receive_nowait()
        with pytest.raises(anyio.WouldBlock):
            elsewhere.receive.receive_nowait()
        read = await load(store, "s")
        assert [u.usage for u in read.usage] == [TokenUsage(input_tokens=13, output_tokens=6)]


async def test_events_emitted_before_a_subscriber_attached_replay_from_a_cursor(
    url: str, clock: trio.testing.MockClock
) -> None:
    """Messages left by an earlier runtime are resumed at start; a subscriber that attaches
    only once the turn is over still sees every event of it, with ``since=0``."""
    async with store_on(url) as store:
        async with open_runtime(store, model=ScriptedModel(Stall())) as first:
            ticket = await first.submit("s", "left over")
        async with open_runtime(store, model=ScriptedModel(say("resumed"))) as runtime:
            await runtime.outcome(ticket)
            await runtime.wait_idle()
            async with runtime.events(since=0) as replay:
                events = await collect(replay, lambda e: e.type == "turn_outcome")
            assert events[0].type == "turn_started" and events[0].seq == 1
            assert events[-1].data["tickets"] == [ticket.batch_id]  # type: ignore[index,call-overload]
            assert replay.dropped == 0
            async with runtime.events(since=events[-1].seq) as later:
                with pytest.raises(anyio.WouldBlock):
                    later.receive.receive_nowait()


async def test_many_sessions_deliver_every_message_exactly_once_and_in_order(
    url: str, clock: trio.testing.MockClock
) -> None:
    sessions = [f"s{n}" for n in range(5)]
    expected = {s: [f"{s}/m{i}" for i in range(4)] for s in sessions}
    cross_talk: list[list[str]] = []

    async def model(request: ModelRequest) -> ModelResponse:
        await anyio.sleep(0.01)  # let the sessions interleave (virtual time)
        users = user_texts(request.messages)
        if len({text.split("/")[0] for text in users}) != 1:
            cross_talk.append(users)
        return say(f"re: {users[-1]}")

    async with store_on(url) as store, open_runtime(store, model=model) as runtime:
        tickets: dict[str, Ticket] = {}
        for i in range(4):
            for session_id in sessions:
                text = expected[session_id][i]
                tickets[text] = await runtime.submit(session_id, text, source_key=text)
        await runtime.wait_idle()
        assert cross_talk == []
        for ticket in tickets.values():
            assert (await runtime.outcome(ticket)).outcome.kind == "assistant_message"
        for session_id in sessions:
            read = await load(store, session_id)
            users = [text for role, text in graph(read) if role == "user"]
            assert users == expected[session_id], "each message once, in submit order"
            assert await queue_ids(store, session_id) == []


async def test_a_model_error_becomes_a_provider_error_outcome(
    url: str, clock: trio.testing.MockClock
) -> None:
    model = ScriptedModel(Fail("rate limited"))
    async with store_on(url) as store, open_runtime(store, model=model) as runtime:
        outcome = await runtime.run_turn("s", "hi")
        assert (outcome.kind, outcome.reason) == ("stopped", "provider_error")
        assert "rate limited" in outcome.text
        read = await load(store, "s")
        assert graph(read) == [("user", "hi")]
        assert read.head_revision == 1
        assert await queue_ids(store, "s") == []


async def test_a_model_returning_a_non_response_ends_the_turn_with_a_typed_outcome(
    url: str, clock: trio.testing.MockClock
) -> None:
    replies: list[Any] = ["not a ModelResponse", say("fine again")]

    async def model(request: ModelRequest) -> ModelResponse:
        return replies.pop(0)  # type: ignore[no-any-return]

    async with store_on(url) as store, open_runtime(store, model=model) as runtime:
        outcome = await runtime.run_turn("s", "hi")
        assert (outcome.kind, outcome.reason) == ("stopped", "invalid_model_response")
        assert "str" in outcome.text
        assert (await runtime.run_turn("s", "again")).text == "fine again"


async def test_a_tool_returning_a_datetime_ends_its_turn_and_the_next_message_is_answered(
    url: str, clock: trio.testing.MockClock
) -> None:
    """A tool that returns something that is not JSON (a datetime) ends its turn with a typed
    outcome and an event; nothing crashes, nothing is retried forever, and the session goes on
    with its next message."""

    async def now(args: object) -> object:
        return datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)

    model = ScriptedModel(call("now"), say("next one answered"))
    async with (
        store_on(url) as store,
        open_runtime(store, model=model, tools={"now": now}) as runtime,
        runtime.events("s") as stream,
    ):
        first = await runtime.submit("s", "what time is it?")
        second = await runtime.submit(
            "s", "and now?", delivery=DeliveryPolicy.AFTER_CURRENT_TURN_COMMIT
        )
        reply = await runtime.outcome(first)
        assert (reply.outcome.kind, reply.outcome.reason, reply.outcome.tool_name) == (
            "stopped",
            "invalid_tool_result",
            "now",
        )
        assert "datetime" in reply.outcome.text
        assert (await runtime.outcome(second)).text == "next one answered"
        events = await collect(stream, lambda e: e.type == "turn_outcome")
        assert any(e.type == "error" and "datetime" in str(e.data) for e in events)
        report = await runtime.wait_idle()
        assert report.parked == ()
        read = await load(store, "s")
        roles = [role for role, _ in graph(read)]
        assert roles == ["user", "assistant", "tool", "user", "assistant"]


async def test_unknown_and_failing_tools_become_error_results(
    url: str, clock: trio.testing.MockClock
) -> None:
    model = ScriptedModel(calls(call("nope", {"x": 1}), call("broken")), say("carried on"))
    broken = RecordingTool(raises=ValueError("bad input"))
    async with (
        store_on(url) as store,
        open_runtime(store, model=model, tools={"broken": broken}) as runtime,
        runtime.events("s") as stream,
    ):
        outcome = await runtime.run_turn("s", "try tools")
        assert outcome == TurnOutcome(kind="assistant_message", text="carried on")
        assert broken.calls == [None]
        results = [(m.tool_call_id, m.text) for m in model.requests[1].messages[2:]]
        assert results == [
            ("call-1", json.dumps("no tool named 'nope'")),
            ("call-2", json.dumps("ValueError: bad input")),
        ]
        events = await collect(stream, lambda e: e.type == "turn_outcome")
        tool_events = [e.data for e in events if e.type == "tool_call"]
        assert [(e["phase"], e["name"], e.get("is_error")) for e in tool_events] == [  # type: ignore[index,union-attr,call-overload]
            ("started", "nope", None),
            ("finished", "nope", True),
            ("started", "broken", None),
            ("finished", "broken", True),
        ]
        assert (await load(store, "s")).head_revision == 1


async def test_a_resend_after_the_answer_gets_the_original_ticket_and_no_second_turn(
    url: str, clock: trio.testing.MockClock
) -> None:
    """A client that never saw its reply sends again with the same source key: it gets the
    original ticket, already answered, and no second turn runs. The same key with another
    text gets the original too, flagged as a conflict."""
    model = ScriptedModel(say("the one answer"), then="a second turn (must not happen)")
    async with store_on(url) as store, open_runtime(store, model=model) as runtime:
        ticket = await runtime.submit("s", "hello", source_key="client-msg-1")
        assert (await runtime.outcome(ticket)).text == "the one answer"
        await runtime.wait_idle()
        again = await runtime.submit("s", "hello", source_key="client-msg-1")
        assert again == attrs.evolve(ticket, status=SubmitStatus.DUPLICATE)
        other = await runtime.submit("s", "hello, again?", source_key="client-msg-1")
        assert other == attrs.evolve(ticket, status=SubmitStatus.CONFLICT)
        assert (await runtime.outcome(again)).text == "the one answer"
        await runtime.wait_idle()
        assert model.calls == 1
        read = await load(store, "s")
        assert graph(read) == [("user", "hello"), ("assistant", "the one answer")]


async def test_an_outcome_is_read_after_a_restart(tmp_path: Path) -> None:
    """The answer is durable: a runtime in a new process (here: a new store handle and a new
    runtime after the first closed) reads it from the ticket alone."""
    url = "sqlite:///" + str(tmp_path / "restart.db")
    async with open_store(url) as store, open_runtime(store, model=ScriptedModel("42")) as rt:
        ticket = await rt.submit("s", "the question", source_key="q")
        await rt.wait_idle()
    async with open_store(url) as store, open_runtime(store, model=ScriptedModel(Stall())) as rt:
        reply = await rt.outcome(Ticket(session_id="s", batch_id=ticket.batch_id))
        assert reply.text == "42" and reply.turn_id == f"turn:{ticket.batch_id}"
        resent = await rt.submit("s", "the question", source_key="q")
        assert resent.batch_id == ticket.batch_id and resent.status is SubmitStatus.DUPLICATE
        with pytest.raises(QueuedWorkNotFound):
            await rt.outcome(Ticket(session_id="s", batch_id="qwb:unknown"))


async def test_a_message_that_keeps_failing_is_parked_and_can_be_resubmitted(
    url: str, clock: trio.testing.MockClock
) -> None:
    """A turn whose commit the store refuses for good (here: an answer larger than the store
    takes) fails, is retried, and after ``max_failures`` its message is parked, with the error,
    as an event and in the store; the session goes on with the next message; ``outcome``
    raises QueuedWorkParked; ``wait_idle`` reports it; once the cause is gone, ``resubmit``
    delivers it, before the work enqueued after it."""
    huge = "x" * 5_000
    answers = [huge, huge, "second is fine", "now it fits"]

    async def model(request: ModelRequest) -> ModelResponse:
        return say(answers.pop(0))

    async with (
        store_on(url, max_payload_bytes=4_000) as store,
        open_runtime(store, model=model, max_failures=2) as runtime,
        runtime.events("s") as stream,
    ):
        poison = await runtime.submit("s", "too much")
        fine = await runtime.submit("s", "next", delivery=DeliveryPolicy.AFTER_CURRENT_TURN_COMMIT)
        assert (await runtime.outcome(fine)).text == "second is fine"
        with pytest.raises(QueuedWorkParked) as caught:
            await runtime.outcome(poison)
        assert (caught.value.batch_id, caught.value.failures) == (poison.batch_id, 2)
        assert "PayloadTooLarge" in caught.value.last_error
        report = await runtime.wait_idle()
        assert [b.batch_id for b in report.parked] == [poison.batch_id]
        events = await collect(stream, lambda e: e.type == "work_parked")
        assert [e.type for e in events].count("turn_failed") == 2
        assert events[-1].data["ticket"] == poison.batch_id  # type: ignore[index,call-overload]
        await runtime.resubmit(poison)
        assert (await runtime.outcome(poison)).text == "now it fits"
        assert (await runtime.wait_idle()).parked == ()
        users = [text for role, text in graph(await load(store, "s")) if role == "user"]
        assert users == ["next", "too much"]


async def test_transient_store_errors_delay_but_never_strand_a_message(
    url: str, clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every lease take, claim, renewal and commit fails with StoreBusyError three times
    before it goes through (a store locked by another process): the actor retries with
    backoff, publishes ``store_retry`` events, never stops, and answers every message once."""
    async with store_on(url) as store:
        sessions = store.sessions
        for name in (
            "try_claim_lease",
            "claim_queued_work",
            "renew_lease_and_claims",
            "has_queued_work",
        ):
            monkeypatch.setattr(sessions, name, busy_three_times(getattr(sessions, name)))
        handle_commit = type(sessions.bind("s")).commit
        monkeypatch.setattr(type(sessions.bind("s")), "commit", busy_three_times(handle_commit))
        model = ScriptedModel(say("one"), say("two"))
        async with (
            open_runtime(store, model=model, lease_ttl_ms=3_000) as runtime,
            runtime.events("s") as stream,
        ):
            first = await runtime.submit("s", "m1")
            second = await runtime.submit(
                "s", "m2", delivery=DeliveryPolicy.AFTER_CURRENT_TURN_COMMIT
            )
            assert [(await runtime.outcome(t)).text for t in (first, second)] == ["one", "two"]
            report = await runtime.wait_idle()
            assert report.parked == ()
            events = await collect(stream, lambda e: e.type == "turn_outcome")
            assert any(e.type == "store_retry" for e in events)
        assert graph(await load(store, "s")) == [
            ("user", "m1"),
            ("assistant", "one"),
            ("user", "m2"),
            ("assistant", "two"),
        ]


def busy_three_times(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``method`` failing with StoreBusyError three times before each call that goes through."""
    failures = Counter[str]()

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures["busy"] < 3:
            failures["busy"] += 1
            raise StoreBusyError("test", 0.0)
        failures["busy"] = 0
        return await method(*args, **kwargs)

    return flaky


async def test_shutdown_cancel_hands_the_work_back(url: str, clock: trio.testing.MockClock) -> None:
    """Leaving the block cancels a stalled turn at once: its claim goes back to the queue,
    the lease is released (not left to expire), nothing is committed; a new runtime over the
    store (resume=True) then delivers the message."""
    stalled = Gate(ScriptedModel(Stall()), hold=False)
    async with store_on(url) as store:
        async with open_runtime(
            store, model=stalled, owner_id="first", lease_ttl_ms=60_000
        ) as runtime:
            ticket = await runtime.submit("s", "m1")
            await stalled.entered.wait()
        assert stalled.cancelled.is_set()
        pending = await store.sessions.list_pending_queued_work("s")
        assert [b.batch_id for b in pending] == [ticket.batch_id]
        lease = await store.sessions.try_claim_lease("s", "second", 60_000)
        assert lease is not None and lease.fencing_token == 2  # released, not expired
        await store.sessions.release_lease(lease.fence())
        assert await store.sessions.bind("s").load() is None
        async with open_runtime(store, model=ScriptedModel("late answer")) as runtime:
            assert (await runtime.outcome(ticket)).text == "late answer"
        read = await load(store, "s")
        assert graph(read) == [("user", "m1"), ("assistant", "late answer")]


async def test_shutdown_finish_waits_for_queued_work(
    url: str, clock: trio.testing.MockClock
) -> None:
    model = Gate(ScriptedModel(then="done"))
    leaving = anyio.Event()

    async def release_once_leaving() -> None:
        await leaving.wait()
        model.release.set()

    async with store_on(url) as store:
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_once_leaving)
            async with open_runtime(store, model=model, shutdown="finish") as runtime:
                await runtime.submit("s1", "m1")
                await runtime.submit("s2", "m2")
                await model.entered.wait()  # a turn is stuck in its model call...
                leaving.set()  # ...and is let go only once the block is being left
        assert not model.cancelled.is_set()
        for session_id, text in (("s1", "m1"), ("s2", "m2")):
            read = await load(store, session_id)
            assert graph(read) == [("user", text), ("assistant", "done")]


@pytest.mark.parametrize("how", ["stalled store", "stolen"])
async def test_a_lost_lease_cancels_the_turn_and_the_work_is_delivered_once(
    url: str, clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The runtime renews its lease every ttl/3. Lost, the running turn is cancelled at once
    (the model call sees it) and nothing is committed under the old lease; the work is
    delivered once, by whoever holds the lease next.

    - "stalled store": the store stops answering (every call hangs: a disk or a server that
      stalled), so the lease runs out by the shared clock: the actor stops the turn without
      waiting for the store, and takes the lease again once the store answers;
    - "stolen": a thief releases the runtime's grant and takes the lease; the next renewal is
      refused; the thief does nothing and releases; the runtime takes the lease back."""
    model = Gate(ScriptedModel(Stall(), then="recovered"), hold=False)
    async with store_on(url) as store:
        sessions = store.sessions
        run, stalled, answering = sessions._run, False, anyio.Event()

        async def stallable(fn: Any, *, writes: bool) -> Any:
            if stalled:
                await answering.wait()
            return await run(fn, writes=writes)

        monkeypatch.setattr(sessions, "_run", stallable)
        async with (
            open_runtime(store, model=model, owner_id="victim", lease_ttl_ms=3_000) as runtime,
            runtime.events("s") as stream,
        ):
            ticket = await runtime.submit("s", "m1")
            await model.entered.wait()
            if how == "stolen":
                held = await sessions.try_claim_lease("s", "victim", 3_000)  # re-entry: its grant
                assert held is not None
                await sessions.release_lease(held.fence())
                thief = await sessions.try_claim_lease("s", "thief", 3_000)
                assert thief is not None and thief.fencing_token == 2
                await model.cancelled.wait()
                await sessions.release_lease(thief.fence())
            else:
                stalled = True
                await model.cancelled.wait()  # the store has not answered since
                stalled = False
                answering.set()
            assert (await runtime.outcome(ticket)).text == "recovered"
            events = await collect(stream, lambda e: e.type == "turn_outcome")
            assert any(e.type == "lease_lost" for e in events)
            assert model.calls == 2
        read = await load(store, "s")
        assert graph(read) == [("user", "m1"), ("assistant", "recovered")]
        assert read.head_revision == 1


async def test_a_dead_runtime_s_claim_is_void_once_its_lease_ends(
    url: str, clock: trio.testing.MockClock
) -> None:
    """A runtime that died mid-turn left a live lease and a live claim (a long one). A new
    runtime delivers the message as soon as the dead *lease* ends: its new lease grant voids
    the dead claim at once, so nothing waits for the claim to expire."""
    model = ScriptedModel(say("answered"))
    async with store_on(url) as store:
        sessions = store.sessions
        ticket = await sessions.submit(
            QueuedWorkDraft(
                session_id="s",
                delivery=DeliveryPolicy.EARLIEST_SAFE_BOUNDARY,
                slot=SlotPolicy.JOIN,
                payloads=[{"role": "user", "text": "m1"}],
            )
        )
        dead = await sessions.try_claim_lease("s", "dead", 3_000)
        assert dead is not None
        claim = await sessions.claim_queued_work(
            "s", dead.fence(), "dead", ClaimBoundary.IDLE, 3_600_000, 64
        )
        assert claim is not None and claim.expires_at_ms - dead.expires_at_ms > 3_000_000
        async with open_runtime(store, model=model, lease_ttl_ms=3_000) as runtime:
            reply = await runtime.outcome(ticket)
            assert reply.text == "answered"
            status = await sessions.queued_work_status("s", ticket.batch_id)
            assert status is not None and status.delivered_at_ms is not None
            assert status.delivered_at_ms < claim.expires_at_ms
        read = await load(store, "s")
        assert graph(read) == [("user", "m1"), ("assistant", "answered")]


async def test_work_nobody_told_the_runtime_about_is_found_by_its_sweep(
    url: str, clock: trio.testing.MockClock
) -> None:
    """A message enqueued behind the runtime's back (by another process, here the store API
    itself), and a runtime that died holding a session: a running runtime finds both on its
    next sweep and answers them, without a restart or a submit of its own."""
    async with store_on(url) as store:
        sessions = store.sessions
        dead = await sessions.try_claim_lease("left", "dead", 3_000)
        assert dead is not None
        left = await sessions.submit(user_draft("left", "left by the dead"))
        async with open_runtime(
            store, model=ScriptedModel(then="found it"), lease_ttl_ms=3_000, sweep_interval=5.0
        ) as runtime:
            elsewhere = await sessions.submit(user_draft("other", "from another process"))
            # Watched through the store only (outcome() would wake the session itself).
            for ticket in (elsewhere, left):
                while (await state_of(store, ticket)) is not WorkState.DELIVERED:
                    await anyio.sleep(1)
                    assert trio.current_time() < 60, f"{ticket} was not served"
            assert [(await runtime.outcome(t)).text for t in (elsewhere, left)] == [
                "found it",
                "found it",
            ]
        async with open_runtime(store, model=ScriptedModel(Stall()), sweep_interval=0) as quiet:
            late = await sessions.submit(user_draft("late", "nobody looks"))
            await anyio.sleep(3_600)
            assert quiet.active_sessions == [], "sweeping was switched off"
            assert await state_of(store, late) is WorkState.QUEUED


async def state_of(store: Store, ticket: Ticket) -> WorkState | None:
    status = await store.sessions.queued_work_status(ticket.session_id, ticket.batch_id)
    return None if status is None else status.state


def user_draft(session_id: str, text: str) -> QueuedWorkDraft:
    """What ``Runtime.submit`` enqueues for a user message."""
    return QueuedWorkDraft(
        session_id=session_id,
        delivery=DeliveryPolicy.EARLIEST_SAFE_BOUNDARY,
        slot=SlotPolicy.JOIN,
        payloads=[{"role": "user", "text": text}],
    )


async def test_a_turn_longer_than_the_lease_ttl_commits_once(
    url: str, clock: trio.testing.MockClock
) -> None:
    """A model call four times as long as the lease ttl: the lease and the turn's claim are
    renewed together all along, the checkpoint does not take the message again, and the turn
    commits once."""
    inner = ScriptedModel(say("slow answer"), then="again")

    async def slow(request: ModelRequest) -> ModelResponse:
        await anyio.sleep(12.0)  # virtual seconds; the ttl is 3 s
        return await inner(request)

    async with store_on(url) as store, open_runtime(store, model=slow, lease_ttl_ms=3_000) as rt:
        assert await rt.run_turn("s", "m1") == TurnOutcome(
            kind="assistant_message", text="slow answer"
        )
        assert [user_texts(r.messages) for r in inner.requests] == [["m1"]]
        read = await load(store, "s")
        assert graph(read) == [("user", "m1"), ("assistant", "slow answer")]
        assert read.head_revision == 1


async def test_delayed_work_is_delivered_when_due(url: str, clock: trio.testing.MockClock) -> None:
    model = ScriptedModel(then="later, as planned")
    async with store_on(url) as store, open_runtime(store, model=model) as runtime:
        due = store.clock.now_ms() + 60_000
        ticket = await runtime.submit("s", "remind me in a minute", available_at_ms=due)
        assert runtime.active_sessions == ["s"]
        await runtime.wait_idle()
        status = await store.sessions.queued_work_status("s", ticket.batch_id)
        assert status is not None and status.delivered_at_ms is not None
        assert status.delivered_at_ms >= due
        assert model.calls == 1


async def test_open_runtime_on_a_closed_store_raises_store_closed(url: str) -> None:
    async with open_store(url) as store:
        pass
    with pytest.raises(StoreClosedError):
        async with open_runtime(store, model=ScriptedModel("x")):
            pass  # pragma: no cover


async def test_bad_tickets_and_options_are_invalid(url: str) -> None:
    async with open_store(url) as store:
        for bad in ({"lease_ttl_ms": 10}, {"max_failures": 0}, {"shutdown": "later"}):
            with pytest.raises(InvalidArgument):
                async with open_runtime(store, model=ScriptedModel("x"), **bad):
                    pass  # pragma: no cover
        async with open_runtime(store, model=ScriptedModel("x")) as runtime:
            with pytest.raises(InvalidArgument):
                await runtime.outcome("qwb:1")  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument):
                await runtime.outcome(Ticket(session_id="s", batch_id="b"), poll_interval=0)
            with pytest.raises(InvalidArgument):
                async with runtime.events(since=-1):
                    pass  # pragma: no cover


# --- asyncio ---------------------------------------------------------------------------------


async def guarded(scenario: Callable[..., Awaitable[None]], *args: Any) -> None:
    with anyio.fail_after(HANG_S):
        await scenario(*args)


def test_simple_turn_under_asyncio(url: str) -> None:
    anyio.run(guarded, simple_turn, url, backend="asyncio")


def test_concurrent_tools_under_asyncio(url: str) -> None:
    anyio.run(guarded, concurrent_tools, url, backend="asyncio")


@pytest.mark.parametrize(
    "delivery",
    [DeliveryPolicy.EARLIEST_SAFE_BOUNDARY, DeliveryPolicy.AFTER_CURRENT_TURN_COMMIT],
    ids=["join", "after_commit"],
)
def test_message_sent_during_a_turn_under_asyncio(url: str, delivery: DeliveryPolicy) -> None:
    anyio.run(guarded, mid_turn_message, url, delivery, backend="asyncio")
