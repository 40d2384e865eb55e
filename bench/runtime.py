"""Runtime throughput: agent turns per second for N concurrent sessions, and actor memory.

Run it with ``make bench``. The model is a zero-latency fake (one tool call, then an answer), so
the figures are the runtime's own cost: queueing, leases, claims, the turn machine, the tool
batch and the atomic turn commit. Each configuration runs every session's turns concurrently
(one ``run_turn`` at a time per session). Memory is measured with tracemalloc: the bytes held
per idle session (its committed state in a memory store, no actor) and per active actor (a
session whose model call is in flight).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import tracemalloc

import trio

from turnbuckle import ModelRequest, ModelResponse, StopReason, ToolCall, open_runtime, open_store
from turnbuckle.adapters.sqlite import Durability

ROUNDS = 3
TURNS_PER_SESSION = 10


async def model(request: ModelRequest) -> ModelResponse:
    if request.messages[-1].role == "user":
        call = ToolCall(call_id=request.messages[-1].message_id, name="echo", args={"n": 1})
        return ModelResponse(tool_calls=[call], stop_reason=StopReason.TOOL_USE)
    return ModelResponse(text="done")


async def echo(args: object) -> object:
    return args


async def turns(url: str, sessions: int, durability: Durability) -> float:
    async with (
        open_store(url, durability=durability) as store,
        open_runtime(store, model=model, tools={"echo": echo}) as runtime,
    ):

        async def converse(index: int) -> None:
            for turn in range(TURNS_PER_SESSION):
                await runtime.run_turn(f"s{index}", f"message {turn}")

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(sessions):
                nursery.start_soon(converse, index)
        elapsed = time.perf_counter() - start
    return sessions * TURNS_PER_SESSION / elapsed


async def memory_per_session(count: int) -> tuple[float, float]:
    release, all_started = trio.Event(), trio.Event()
    started = 0

    async def stalling(request: ModelRequest) -> ModelResponse:
        nonlocal started
        started += 1
        if started == count:
            all_started.set()
        await release.wait()
        return ModelResponse(text="ok")

    async with open_store("memory://") as store:
        async with open_runtime(store, model=model, tools={"echo": echo}) as runtime:
            for index in range(count):  # give every session some history first
                await runtime.run_turn(f"idle{index}", "hello")
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        async with open_runtime(store, model=model, tools={"echo": echo}) as runtime:
            for index in range(count):
                await runtime.run_turn(f"more{index}", "hello")
        idle = (tracemalloc.get_traced_memory()[0] - base) / count
        async with open_runtime(store, model=stalling) as runtime:
            before = tracemalloc.get_traced_memory()[0]
            for index in range(count):
                await runtime.submit(f"busy{index}", "hello")
            await all_started.wait()
            active = (tracemalloc.get_traced_memory()[0] - before) / count
            release.set()
        tracemalloc.stop()
    return idle, active


def main() -> None:
    folder = tempfile.mkdtemp(prefix="bench-", dir=".")
    try:
        counter = iter(range(1_000_000))
        configs = []
        for sessions in (1, 16, 64):
            configs.append(
                (
                    f"memory://      {sessions:>3} sessions",
                    lambda n=sessions: trio.run(turns, "memory://", n, "full"),
                )
            )
            for durability in ("full", "process"):
                configs.append(
                    (
                        f"sqlite {durability:<7} {sessions:>3} sessions",
                        lambda n=sessions, d=durability: trio.run(
                            turns, f"sqlite:///{folder}/r{next(counter)}.db", n, d
                        ),
                    )
                )
        rates: dict[str, list[float]] = {label: [] for label, _ in configs}
        print(
            f"runtime turns/s: {TURNS_PER_SESSION} turns per session, each = enqueue, lease,"
            " claim, model call, tool call, model call, checkpoints, atomic commit"
        )
        for round_number in range(ROUNDS):
            shift = round_number * len(configs) // ROUNDS
            for label, run in configs[shift:] + configs[:shift]:
                rates[label].append(run())
            print(f"  round {round_number + 1}/{ROUNDS} done", flush=True)
        print()
        print(f"{'configuration':<30}{'turns/s':>10}")
        print("-" * 40)
        for label, _ in configs:
            print(f"{label:<30}{statistics.median(rates[label]):>10,.0f}")
        idle, active = trio.run(memory_per_session, 200)
        print()
        print(f"memory per idle session (state in a memory store): {idle / 1024:,.1f} KiB")
        print(f"memory per active session actor (model call in flight): {active / 1024:,.1f} KiB")
    finally:
        shutil.rmtree(folder)
        os.sync()


if __name__ == "__main__":
    main()
