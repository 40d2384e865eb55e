"""The runtime (:mod:`turnbuckle.actors.runtime`): per-session actors running turns on a store.

Every test runs on ``memory://`` and on a SQLite file, under trio (pytest-trio); the core
scenarios (a simple turn, a concurrent tool batch, a mid-turn join) run under asyncio too.
Ordering is by Events (a gated model, tools that wait for each other), never by sleeps;
``fail_after`` only turns a hang into a failure, and nothing asserts on timing.

Tests that steal or expire leases use a :class:`FakeClock` for the store, so a lease or a claim
expires exactly when a test advances the clock and never because the machine was slow.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import attrs
import pytest

from turnbuckle import (
    ClaimBoundary,
    DeliveryPolicy,
    LeaseFence,
    Message,
    ModelRequest,
    ModelResponse,
    QueuedWorkDraft,
    SessionLease,
    SessionRead,
    SlotPolicy,
    StopReason,
    Store,
    TokenUsage,
    ToolCall,
    TurnOutcome,
    open_runtime,
    open_store,
)
from turnbuckle.actors.runtime import Model
from turnbuckle.testing import (
    Fail,
    FakeClock,
    RecordingTool,
    ScriptedModel,
    Stall,
    call,
    calls,
    say,
)

#: A hang guard, never a timing assertion.
HANG_S = 20


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    return "sqlite:///" + str(tmp_path / "runtime.db")


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


async def pending_ids(store: Store, session_id: str) -> list[str]:
    return [b.batch_id for b in await store.sessions.list_pending_queued_work(session_id)]


async def wait_until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll a condition on the store until it holds (the store has no change notifications;
    the interval orders nothing)."""
    while True:
        if await condition():
            return
        await anyio.sleep(0.01)


async def take_lease(store: Store, session_id: str, owner: str, ttl_ms: int) -> SessionLease:
    lease = await store.sessions.try_claim_lease(session_id, owner, ttl_ms)
    assert lease is not None, f"{owner} could not take the lease of {session_id!r}"
    return lease


def user_draft(session_id: str, text: str) -> QueuedWorkDraft:
    """What ``Runtime.submit`` enqueues for a user message."""
    return QueuedWorkDraft(
        session_id=session_id,
        delivery=DeliveryPolicy.EARLIEST_SAFE_BOUNDARY,
        slot=SlotPolicy.JOIN,
        payloads=[{"role": "user", "text": text}],
        source_key=text,
    )


# --- scenarios shared by trio and asyncio ----------------------------------------------------


async def simple_turn(url: str) -> None:
    model = ScriptedModel(say("Hello there."))
    with anyio.fail_after(HANG_S):
        async with open_store(url) as store, open_runtime(store, model=model) as runtime:
            outcome = await runtime.run_turn("s1", "hi")
            assert outcome == TurnOutcome(kind="assistant_message", text="Hello there.")
            read = await load(store, "s1")
            assert graph(read) == [("user", "hi"), ("assistant", "Hello there.")]
            assert read.nodes[1].parent_node_id == read.nodes[0].node_id
            assert read.head_revision == 1
            assert await queue_ids(store, "s1") == []
            assert [user_texts(r.messages) for r in model.requests] == [["hi"]]
            await runtime.wait_idle()
            assert runtime.active_sessions == []
            # The actor released the session's lease when it ran out of work.
            lease = await take_lease(store, "s1", "someone-else", 60_000)
            assert lease.fencing_token == 2


async def concurrent_tools(url: str) -> None:
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
    with anyio.fail_after(HANG_S):
        async with (
            open_store(url) as store,
            open_runtime(store, model=model, tools=tools) as runtime,
        ):
            outcome = await runtime.run_turn("s", "use both tools")
            assert outcome == TurnOutcome(kind="assistant_message", text="both done")
            assert tools["a"].calls == [{"n": 1}]
            assert tools["b"].calls == [{"n": 2}]
            assert model.calls == 2
            second = model.requests[1]
            assert second.tools == ("a", "b")
            assert [(m.role, m.tool_call_id, m.text) for m in second.messages] == [
                ("user", None, "use both tools"),
                ("assistant", None, ""),
                ("tool", "call-1", json.dumps({"a": {"n": 1}})),
                ("tool", "call-2", json.dumps({"b": {"n": 2}})),
            ]
            assert [c.name for c in second.messages[1].tool_calls] == ["a", "b"]
            read = await load(store, "s")
            assert [role for role, _ in graph(read)] == [
                "user",
                "assistant",
                "tool",
                "tool",
                "assistant",
            ]
            assert read.head_revision == 1
            assert await queue_ids(store, "s") == []


async def mid_turn_message(url: str, delivery: DeliveryPolicy) -> None:
    """A second message submitted while the first turn's model call is running (the model
    waits until the test has submitted it): ``earliest_safe_boundary`` joins the running turn
    at its checkpoint (one commit), ``after_current_turn_commit`` starts the next turn."""
    inner = ScriptedModel(say("first answer"), say("second answer"))
    model = Gate(inner)
    outcomes: list[TurnOutcome] = []
    with anyio.fail_after(HANG_S):
        async with open_store(url) as store, open_runtime(store, model=model) as runtime:

            async def first() -> None:
                outcomes.append(await runtime.run_turn("s", "m1"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await model.entered.wait()  # the first turn is inside its model call
                await runtime.submit("s", "m2", delivery=delivery)
                model.release.set()
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
            if delivery is DeliveryPolicy.EARLIEST_SAFE_BOUNDARY:
                # Joined: one turn, whose second model call sees the injected message.
                assert read.head_revision == 1
                assert outcomes == [TurnOutcome(kind="assistant_message", text="second answer")]
                assert requests == [["m1"], ["m1", "m2"]]
                assert inner.requests[1].iteration == 1
            else:
                # The next turn: the first turn never saw m2.
                assert read.head_revision == 2
                assert outcomes == [TurnOutcome(kind="assistant_message", text="first answer")]
                assert requests == [["m1"], ["m1", "m2"]]
                assert inner.requests[1].iteration == 0
                assert all(m.text != "m2" for m in inner.requests[0].messages)


# --- trio ------------------------------------------------------------------------------------


async def test_simple_turn(url: str) -> None:
    await simple_turn(url)


async def test_one_batch_of_tools_runs_concurrently(url: str) -> None:
    await concurrent_tools(url)


@pytest.mark.parametrize(
    "delivery",
    [DeliveryPolicy.EARLIEST_SAFE_BOUNDARY, DeliveryPolicy.AFTER_CURRENT_TURN_COMMIT],
    ids=["join", "after_commit"],
)
async def test_message_sent_during_a_turn(url: str, delivery: DeliveryPolicy) -> None:
    await mid_turn_message(url, delivery)


async def test_events_stream_a_turn_in_order(url: str) -> None:
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
    with anyio.fail_after(HANG_S):
        async with (
            open_store(url) as store,
            open_runtime(store, model=model, tools=tools) as runtime,
            runtime.events("s") as stream,
            runtime.events("other") as elsewhere,
        ):
            outcome = await runtime.run_turn("s", "question")
            events = []
            async for event in stream:
                events.append(event)
                if event.type == "turn_outcome":
                    break
            assert [e.type for e in events] == [
                "llm_request",
                "token_usage",
                "tool_call",
                "llm_request",
                "token_usage",
                "text_delta",
                "turn_outcome",
            ]
            assert events[0].data == {"iteration": 0, "message_count": 1}
            assert events[1].data == {
                "usage": attrs.asdict(first_usage),
                "cumulative": attrs.asdict(first_usage),
            }
            assert events[2].data == {
                "call_id": "c1",
                "name": "lookup",
                "args": {"q": "x"},
                "output": "found x",
                "is_error": False,
            }
            assert events[3].data == {"iteration": 1, "message_count": 3}
            assert events[4].data == {
                "usage": attrs.asdict(second_usage),
                "cumulative": attrs.asdict(TokenUsage(input_tokens=13, output_tokens=6)),
            }
            assert events[5].data == {"text": "the answer"}
            # The waiter of run_turn got the same outcome the stream announced.
            assert outcome == TurnOutcome(kind="assistant_message", text="the answer")
            assert events[6].data == attrs.asdict(outcome)
            assert stream.dropped == 0
            with pytest.raises(anyio.WouldBlock):  # nothing more, nothing for other sessions
                stream.receive.receive_nowait()
            with pytest.raises(anyio.WouldBlock):
                elsewhere.receive.receive_nowait()
            read = await load(store, "s")
            assert [u.usage for u in read.usage] == [TokenUsage(input_tokens=13, output_tokens=6)]


async def test_many_sessions_deliver_every_message_exactly_once(url: str) -> None:
    sessions = [f"s{n}" for n in range(5)]
    expected = {s: [f"{s}/m{i}" for i in range(3)] for s in sessions}
    cross_talk: list[list[str]] = []

    async def model(request: ModelRequest) -> ModelResponse:
        await anyio.lowlevel.checkpoint()  # let the sessions interleave
        users = user_texts(request.messages)
        if len({text.split("/")[0] for text in users}) != 1:
            cross_talk.append(users)
        return say(f"re: {users[-1]}")

    outcomes: dict[str, TurnOutcome] = {}
    with anyio.fail_after(HANG_S):
        async with open_store(url) as store, open_runtime(store, model=model) as runtime:

            async def send(session_id: str, text: str) -> None:
                outcomes[text] = await runtime.run_turn(session_id, text)

            async with anyio.create_task_group() as tg:
                for i in range(3):
                    for session_id in sessions:
                        tg.start_soon(send, session_id, expected[session_id][i])
            await runtime.wait_idle()
            assert sorted(outcomes) == sorted(t for texts in expected.values() for t in texts)
            assert all(o.kind == "assistant_message" for o in outcomes.values()), outcomes
            assert cross_talk == []
            for session_id in sessions:
                read = await load(store, session_id)
                users = Counter(text for role, text in graph(read) if role == "user")
                assert users == Counter(expected[session_id]), (session_id, graph(read))
                assert 1 <= read.head_revision <= 3
                assert await queue_ids(store, session_id) == []


async def test_a_model_error_becomes_a_provider_error_outcome(url: str) -> None:
    model = ScriptedModel(Fail("rate limited"))
    with anyio.fail_after(HANG_S):
        async with open_store(url) as store, open_runtime(store, model=model) as runtime:
            outcome = await runtime.run_turn("s", "hi")
            assert outcome.kind == "stopped"
            assert outcome.reason == "provider_error"
            assert "rate limited" in outcome.text
            read = await load(store, "s")
            assert graph(read) == [("user", "hi")]
            assert read.head_revision == 1
            assert await queue_ids(store, "s") == []


async def test_a_model_returning_a_non_response_is_a_provider_error(url: str) -> None:
    async def model(request: ModelRequest) -> ModelResponse:
        return "not a ModelResponse"  # type: ignore[return-value]

    with anyio.fail_after(HANG_S):
        async with open_store(url) as store, open_runtime(store, model=model) as runtime:
            outcome = await runtime.run_turn("s", "hi")
            assert (outcome.kind, outcome.reason) == ("stopped", "provider_error")
            assert await queue_ids(store, "s") == []


async def test_unknown_and_failing_tools_become_error_results(url: str) -> None:
    model = ScriptedModel(calls(call("nope", {"x": 1}), call("broken")), say("carried on"))
    broken = RecordingTool(raises=ValueError("bad input"))
    with anyio.fail_after(HANG_S):
        async with (
            open_store(url) as store,
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
            tool_events = []
            async for event in stream:
                if event.type == "tool_call":
                    tool_events.append(event.data)
                if event.type == "turn_outcome":
                    break
            assert [(e["name"], e["is_error"]) for e in tool_events] == [  # type: ignore[index,call-overload]
                ("nope", True),
                ("broken", True),
            ]
            assert (await load(store, "s")).head_revision == 1


async def test_shutdown_cancel_hands_the_work_back(url: str) -> None:
    """Leaving the block cancels a stalled turn at once: its claim goes back to the queue (not
    by expiry: claims and lease last a minute here), the lease is released, nothing is
    committed; a new runtime over the store (resume=True) then delivers the message."""
    stalled = Gate(ScriptedModel(Stall()), hold=False)
    answering = ScriptedModel(say("late answer"))

    async def resume_and_check(store: Store) -> None:
        async with open_runtime(store, model=answering, resume=True) as runtime:
            await runtime.wait_idle()
        read = await load(store, "s")
        assert graph(read) == [("user", "m1"), ("assistant", "late answer")]
        assert read.head_revision == 1
        assert await queue_ids(store, "s") == []

    with anyio.fail_after(HANG_S):
        async with open_store(url) as store:
            async with open_runtime(
                store, model=stalled, owner_id="first", lease_ttl_ms=60_000
            ) as runtime:
                batch = await runtime.submit("s", "m1")
                await stalled.entered.wait()
            assert stalled.cancelled.is_set()
            assert await pending_ids(store, "s") == [batch.batch_id]
            lease = await take_lease(store, "s", "second", 60_000)  # released, not expired
            assert lease.fencing_token == 2
            await store.sessions.release_lease(lease.fence())
            assert await store.sessions.bind("s").load() is None
            if url == "memory://":
                await resume_and_check(store)
        if url != "memory://":
            async with open_store(url) as store:
                await resume_and_check(store)


async def test_shutdown_finish_waits_for_queued_work(url: str) -> None:
    model = Gate(ScriptedModel(then="done"))
    leaving = anyio.Event()

    async def release_once_leaving() -> None:
        await leaving.wait()
        model.release.set()

    with anyio.fail_after(HANG_S):
        async with open_store(url) as store:
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
                assert await queue_ids(store, session_id) == []


async def steal_lease(store: Store, clock: FakeClock, how: str, owner: str) -> SessionLease:
    """Take session "s"'s lease from the runtime ``owner`` for a thief: by letting it expire
    (the fake clock jumps past it, as if the runtime had stalled), or by releasing the
    runtime's own grant (re-entering the lease as its owner returns that grant)."""
    if how == "expire":
        clock.advance(1_000)
    else:
        held = await take_lease(store, "s", owner, 300)
        await store.sessions.release_lease(held.fence())
    thief = await take_lease(store, "s", "thief", 300)
    assert thief.fencing_token == 2
    return thief


@pytest.mark.parametrize("how", ["expire", "release"])
async def test_lease_loss_cancels_the_turn_and_abandons_its_claims(url: str, how: str) -> None:
    """The runtime renews its lease every ttl/3; once a renewal fails the running turn is
    cancelled (the stalled model call sees the cancellation), its claim is handed back, and
    nothing is committed. With ``how="release"`` the fake clock never moves, so the work is
    pending again only because the claim was abandoned (it has not expired)."""
    clock = FakeClock()
    model = Gate(ScriptedModel(Stall(), then="recovered"), hold=False)
    with anyio.fail_after(HANG_S):
        async with (
            open_store(url, clock=clock) as store,
            open_runtime(store, model=model, owner_id="victim", lease_ttl_ms=300) as runtime,
        ):
            batch = await runtime.submit("s", "m1")
            await model.entered.wait()
            thief = await steal_lease(store, clock, how, "victim")
            await model.cancelled.wait()
            await wait_until(lambda: _pending_is(store, [batch.batch_id]))
            assert await store.sessions.bind("s").load() is None
            claim = await store.sessions.claim_queued_work(
                "s", thief.fence(), "thief", ClaimBoundary.IDLE, 300, 64
            )
            assert claim is not None
            assert [b.batch_id for b in claim.batches] == [batch.batch_id]
            assert model.calls == 1  # nothing ran the session while the thief held it
            await store.sessions.abandon_queued_work_claim(claim)
            await store.sessions.release_lease(thief.fence())


async def _pending_is(store: Store, batch_ids: list[str]) -> bool:
    return await pending_ids(store, "s") == batch_ids


async def test_resume_takes_over_work_a_dead_runtime_left_claimed(url: str) -> None:
    """A runtime that dies mid-turn leaves a live lease and a live claim; a runtime started
    before they expire must still deliver the message once they do ("a claim left by the dead
    runtime is taken again once it expires"). Regression: ``resume`` used to list only
    sessions with work claimable *now*, and an actor gave up when no work was *pending*, so
    the message was stranded. The dead runtime is played with the store API; the fake clock
    then moves past its lease and claim."""
    clock = FakeClock()
    model = ScriptedModel(say("answered"))
    with anyio.fail_after(HANG_S):
        async with open_store(url, clock=clock) as store:
            sessions = store.sessions
            batch = await sessions.enqueue(user_draft("s", "m1"))
            dead = await take_lease(store, "s", "dead", 600)
            claim = await sessions.claim_queued_work(
                "s", dead.fence(), "dead", ClaimBoundary.IDLE, 600, 64
            )
            assert claim is not None and [b.batch_id for b in claim.batches] == [batch.batch_id]
            async with open_runtime(store, model=model, lease_ttl_ms=600, resume=True) as runtime:
                clock.advance(601)  # the dead runtime's lease and claim have expired now
                with anyio.move_on_after(5):
                    await wait_until(lambda: _queue_empty(store))
                assert await queue_ids(store, "s") == [], (
                    "5 s after the dead runtime's claim expired, m1 is still queued; the "
                    f"runtime has actors for {runtime.active_sessions} and called the model "
                    f"{model.calls}x"
                )
                read = await load(store, "s")
                assert graph(read) == [("user", "m1"), ("assistant", "answered")]


# --- runtime bugs: these fail until the runtime is fixed (see each docstring) ----------------


async def test_after_losing_its_lease_the_runtime_delivers_the_work_once_free(url: str) -> None:
    """BUG (liveness): after a lost lease the actor exits even though its session still has
    work (``_SessionActor.run`` breaks out unless poked), so the abandoned message stays in
    the queue until some later submit or resume, and the ``run_turn`` caller waits forever.
    Expected: once the lease is free again, the runtime takes the session back and delivers."""
    clock = FakeClock()
    model = Gate(ScriptedModel(Stall(), then="recovered"), hold=False)
    outcomes: list[TurnOutcome] = []
    with anyio.fail_after(HANG_S):
        async with (
            open_store(url, clock=clock) as store,
            open_runtime(store, model=model, owner_id="victim", lease_ttl_ms=300) as runtime,
            anyio.create_task_group() as tg,
        ):

            async def send() -> None:
                outcomes.append(await runtime.run_turn("s", "m1"))

            tg.start_soon(send)
            await model.entered.wait()
            thief = await steal_lease(store, clock, "expire", "victim")
            await model.cancelled.wait()
            await store.sessions.release_lease(thief.fence())  # the thief did nothing
            with anyio.move_on_after(5):
                await wait_until(lambda: _queue_empty(store))
            assert await queue_ids(store, "s") == [], (
                "5 s after the lease was free again, m1 is still queued; the runtime has "
                f"actors for {runtime.active_sessions} and called the model {model.calls}x"
            )
            await runtime.wait_idle()
            read = await load(store, "s")
            assert graph(read) == [("user", "m1"), ("assistant", "recovered")]
            tg.cancel_scope.cancel()
    assert outcomes == [TurnOutcome(kind="assistant_message", text="recovered")]


async def _queue_empty(store: Store) -> bool:
    return await queue_ids(store, "s") == []


async def test_a_turn_longer_than_the_lease_ttl_commits_once(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BUG (lost work, duplicate delivery): the runtime claims a turn's queued work for
    ``lease_ttl_ms`` and never renews the claim (only the lease). In a turn that outlives the
    ttl the claim expires; the turn's own checkpoint claim then takes the same message again
    and injects it a second time (the model sees "m1" twice), and the commit fails with
    QueuedWorkClaimExpired (the first claim lost its batch), so run_turn raises and the turn is
    thrown away. With the default ttl (15 s) this is any turn longer than 15 s.

    The fake clock moves 200 ms (of a 300 ms ttl) at a time while the model call runs, and
    each step waits for a lease renewal, so the lease stays live throughout while the claim,
    taken at the start, expires."""
    clock = FakeClock()
    renewed_at: list[int] = []
    renewal = [anyio.Event()]

    async def slow_model(request: ModelRequest) -> ModelResponse:
        if len(inner.requests) == 0:
            for _ in range(3):  # 600 ms of fake time in all: past the claim's 300 ms
                clock.advance(200)
                target = clock.now_ms()
                while not renewed_at or renewed_at[-1] < target:
                    renewal[0] = anyio.Event()
                    await renewal[0].wait()
        return await inner(request)

    inner = ScriptedModel(say("slow answer"), then="again")
    with anyio.fail_after(HANG_S):
        async with open_store(url, clock=clock) as store:
            real_renew = store.sessions.renew_lease

            async def renew(fence: LeaseFence, ttl_ms: int) -> SessionLease:
                at = clock.now_ms()
                lease = await real_renew(fence, ttl_ms)
                renewed_at.append(at)
                renewal[0].set()
                return lease

            monkeypatch.setattr(store.sessions, "renew_lease", renew)
            async with open_runtime(store, model=slow_model, lease_ttl_ms=300) as runtime:
                error: Exception | None = None
                outcome = None
                try:
                    outcome = await runtime.run_turn("s", "m1")
                except Exception as exc:
                    error = exc
                assert [user_texts(r.messages) for r in inner.requests] == [["m1"]], (
                    "the turn's own checkpoint claimed its expired claim's message again "
                    f"(and run_turn raised {error!r})"
                )
                assert error is None, f"run_turn raised {error!r}"
                assert outcome == TurnOutcome(kind="assistant_message", text="slow answer")
                read = await load(store, "s")
                assert graph(read) == [("user", "m1"), ("assistant", "slow answer")]
                assert read.head_revision == 1
                assert await queue_ids(store, "s") == []


# --- asyncio ---------------------------------------------------------------------------------


def test_simple_turn_under_asyncio(url: str) -> None:
    anyio.run(simple_turn, url, backend="asyncio")


def test_concurrent_tools_under_asyncio(url: str) -> None:
    anyio.run(concurrent_tools, url, backend="asyncio")


@pytest.mark.parametrize(
    "delivery",
    [DeliveryPolicy.EARLIEST_SAFE_BOUNDARY, DeliveryPolicy.AFTER_CURRENT_TURN_COMMIT],
    ids=["join", "after_commit"],
)
def test_message_sent_during_a_turn_under_asyncio(url: str, delivery: DeliveryPolicy) -> None:
    anyio.run(mid_turn_message, url, delivery, backend="asyncio")
