"""The runtime showcase (run by ``make demo`` after the task tour): agent sessions on SQLite.

A scripted model (no real LLM) with two tools serves several sessions at once; a message
arrives mid-turn and is joined at the turn's checkpoint; a second runtime contends for a busy
session and waits for its lease; then a runtime process is killed in the middle of a turn, and a
new one resumes the session once the dead one's lease expires, delivering the message exactly
once. Last, exactly once as a client sees it: a resend after the answer gets the original ticket
(no second turn), the answer is read back from the ticket alone after a restart, and a message
whose turn keeps failing is parked with its error, then resubmitted once the cause is fixed.
Everything prints as a timeline.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import trio

from turnbuckle import (
    ModelRequest,
    ModelResponse,
    QueuedWorkParked,
    StopReason,
    Ticket,
    ToolCall,
    open_runtime,
    open_store,
)

DB = "demo-agents.db"
URL = f"sqlite:///{DB}"
START = time.monotonic()


def log(who: str, text: str) -> None:
    print(f"  {time.monotonic() - START:6.2f}s  {who:<14} {text}")


# --- the agent: a scripted model and two tools ------------------------------------------------


model_calls = {"n": 0}


async def model(request: ModelRequest) -> ModelResponse:
    """Stands in for an LLM: asks for the weather of every city the user names, then answers
    from the tool results. Deterministic, so the demo reads the same on every run."""
    model_calls["n"] += 1
    await trio.sleep(0.05)  # "thinking"
    last = request.messages[-1]
    if last.role == "user":
        asked = [m.text for m in request.messages if m.role == "user" and " in " in m.text]
        cities = [text.rsplit(" in ", 1)[1].strip("?., ") for text in asked]
        calls = [
            ToolCall(call_id=f"{last.message_id}:{i}", name="weather", args={"city": c})
            for i, c in enumerate(cities[-2:])
        ]
        calls.append(ToolCall(call_id=f"{last.message_id}:clock", name="clock", args=None))
        return ModelResponse(tool_calls=calls, stop_reason=StopReason.TOOL_USE)
    results = [m.text for m in request.messages if m.role == "tool"]
    return ModelResponse(text=f"Here you are: {'; '.join(results[-3:])}")


async def weather(args: dict[str, str]) -> str:
    await trio.sleep(0.2)  # a slow API: long enough for a message to arrive mid-turn
    return f"{args['city']}: {12 + len(args['city'])} C"


async def clock(args: object) -> str:
    return time.strftime("%H:%M")


TOOLS = {"weather": weather, "clock": clock}


async def showcase() -> None:
    async with (
        open_store(URL) as store,
        open_runtime(
            store, model=model, tools=TOOLS, owner_id="runtime-a", lease_ttl_ms=3000
        ) as runtime_a,
    ):
        print("8. Three sessions at once on runtime-a; a message arrives mid-turn")

        async def converse(session: str, text: str) -> None:
            log(session, f"user: {text!r}")
            outcome = await runtime_a.run_turn(session, text)
            log(session, f"agent: {outcome.text!r}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(converse, "alice", "Weather in Oslo?")
            nursery.start_soon(converse, "bob", "Weather in Lima?")
            nursery.start_soon(converse, "carol", "Weather in Cairo?")
            await trio.sleep(0.1)  # alice's turn is waiting on its tools now
            await runtime_a.submit("alice", "And in Rome?")
            log("alice", "user: 'And in Rome?' (queued while her turn runs)")
        read = await store.sessions.bind("alice").load()
        assert read is not None
        users = [n.payload["text"] for n in read.nodes if n.payload["role"] == "user"]  # type: ignore[index, call-overload]
        log("alice", f"one turn (revision {read.head_revision}) delivered both: {users}")

        print("9. A second runtime contends for a busy session")
        async with open_runtime(
            store,
            model=model,
            tools=TOOLS,
            owner_id="runtime-b",
            lease_ttl_ms=3000,
            shutdown="finish",
        ) as runtime_b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(converse, "dave", "Weather in Kyiv?")
                await trio.sleep(0.06)  # runtime-a holds dave's lease now
                lease = await store.sessions.try_claim_lease("dave", "runtime-b", 3000)
                log("runtime-b", f"try_claim_lease('dave') -> {lease} (runtime-a holds it)")
                await runtime_b.submit("dave", "Weather in Quito?")
                log("runtime-b", "queued 'Weather in Quito?' for dave; runtime-b's actor waits")
            await runtime_b.wait_idle()
            read = await store.sessions.bind("dave").load()
            assert read is not None
            users = [n.payload["text"] for n in read.nodes if n.payload["role"] == "user"]  # type: ignore[index, call-overload]
            log("dave", f"delivered once each by the lease holder: {users}")


def crash_child() -> None:
    """A runtime process whose model hangs mid-turn (the parent kills it there)."""

    async def hanging_model(request: ModelRequest) -> ModelResponse:
        print("inside-model", flush=True)
        await trio.sleep_forever()
        raise AssertionError

    async def main() -> None:
        async with (
            open_store(URL) as store,
            open_runtime(
                store,
                model=hanging_model,
                tools=TOOLS,
                owner_id="runtime-doomed",
                lease_ttl_ms=1000,
            ) as runtime,
        ):
            await runtime.submit("erin", "Weather in Lagos?", source_key="erin-1")
            await trio.sleep_forever()

    trio.run(main)


async def crash_and_resume() -> None:
    print("10. A runtime is killed mid-turn; another resumes the session")
    child = subprocess.Popen(  # noqa: ASYNC220 (started once; its pipe is read off-thread)
        [sys.executable, __file__, "--crash-child"], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    line = await trio.to_thread.run_sync(child.stdout.readline)
    assert line.strip() == "inside-model", line
    log("runtime-doomed", "inside erin's model call... kill -9")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    async with open_store(URL) as store:
        pending = await store.sessions.list_queued_work("erin")
        log(
            "store",
            f"erin's message is still queued ({len(pending)} batch, claimed by the "
            "dead runtime until its lease expires)",
        )
        async with open_runtime(
            store,
            model=model,
            tools=TOOLS,
            owner_id="runtime-c",
            lease_ttl_ms=3000,
            shutdown="finish",
        ) as runtime_c:
            resumed = await runtime_c.resume()
            log("runtime-c", f"resume() -> {resumed}; waiting for the dead lease to expire")
        read = await store.sessions.bind("erin").load()
        assert read is not None
        users = [n.payload["text"] for n in read.nodes if n.payload["role"] == "user"]  # type: ignore[index, call-overload]
        answer = read.nodes[-1].payload["text"]  # type: ignore[index, call-overload]
        log("erin", f"delivered exactly once: {users}; agent: {answer!r}")


async def exactly_once() -> None:
    print("11. Exactly once, as the client sees it")
    async with (
        open_store(URL) as store,
        open_runtime(store, model=model, tools=TOOLS, owner_id="runtime-d") as runtime,
    ):
        ticket = await runtime.submit("fay", "Weather in Paris?", source_key="fay-msg-1")
        reply = await runtime.outcome(ticket)
        log("fay", f"agent: {reply.text!r} (turn {reply.turn_id})")
        calls_before = model_calls["n"]
        again = await runtime.submit("fay", "Weather in Paris?", source_key="fay-msg-1")
        log(
            "fay",
            f"sent again with the same key: status {again.status.value}, same ticket:"
            f" {again.batch_id == ticket.batch_id}; model calls since: "
            f"{model_calls['n'] - calls_before}",
        )
    # A new store handle and a new runtime: the answer is read back from the ticket alone.
    async with (
        open_store(URL) as store,
        open_runtime(store, model=model, tools=TOOLS, owner_id="runtime-e") as runtime,
    ):
        saved = Ticket(session_id="fay", batch_id=ticket.batch_id)
        log(
            "runtime-e",
            f"after a restart, outcome(ticket) -> {(await runtime.outcome(saved)).text!r}",
        )

    # A tool whose answer the store refuses (2 MB, over the 1 MiB payload limit): the turn's
    # commit fails every time; after three failed turns the message is parked, not retried
    # forever, and the work behind it goes on.
    huge = {"on": True}

    async def report(args: object) -> str:
        return "x" * 2_000_000 if huge["on"] else "a short report"

    async def reporting_model(request: ModelRequest) -> ModelResponse:
        if request.messages[-1].role == "user":
            call = ToolCall(call_id=request.messages[-1].message_id, name="report", args=None)
            return ModelResponse(tool_calls=[call], stop_reason=StopReason.TOOL_USE)
        return ModelResponse(text=f"report of {len(request.messages[-1].text)} characters")

    async with (
        open_store(URL) as store,
        open_runtime(
            store, model=reporting_model, tools={"report": report}, owner_id="runtime-f"
        ) as runtime,
    ):
        ticket = await runtime.submit("gus", "Send me the full report")
        try:
            await runtime.outcome(ticket)
        except QueuedWorkParked as parked:
            log(
                "gus",
                f"parked after {parked.failures} failed turns: {parked.last_error[:70]}...",
            )
        idle = await runtime.wait_idle()
        log("runtime-f", f"idle; parked messages: {[b.batch_id for b in idle.parked]}")
        huge["on"] = False  # the tool is fixed
        await runtime.resubmit(ticket)
        log("gus", f"resubmitted; agent: {(await runtime.outcome(ticket)).text!r}")


async def main() -> None:
    await showcase()
    await crash_and_resume()
    await exactly_once()


if __name__ == "__main__":
    if sys.argv[1:] == ["--crash-child"]:
        crash_child()
    else:
        # Failures are logged (turnbuckle.runtime, at ERROR); shown here among the timeline.
        logging.basicConfig(level=logging.ERROR, format="           logged: %(message).110s")
        for path in (DB, f"{DB}-wal", f"{DB}-shm"):
            if os.path.exists(path):
                os.remove(path)
        trio.run(main)
