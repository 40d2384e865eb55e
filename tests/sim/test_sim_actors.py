"""Simulation, actor tier: the real runtime and workers, under trio's MockClock (autojump), on a
memory store whose every operation may fail before it applies, or apply and then fail (the reply
lost). The store keeps the loop's time (``LoopClock``), the one clock the runtime and workers
time themselves by too, so leases run out as virtual time jumps. Invariants at quiescence: every
submitted message delivered exactly once and in submit order per session, nothing parked (every
fault here is transient), every execution ended exactly once. The trio scheduler is not seeded
here, so this tier checks "the invariants hold for whatever interleaving occurred"; exact replay
is the pure tier's job."""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from turnbuckle import ModelRequest, ModelResponse, StoreBusyError, open_runtime
from turnbuckle.actors.worker import ExecutionContext, open_worker
from turnbuckle.adapters.executions import ExecutionFacet
from turnbuckle.adapters.memory import MemoryRunner, MemoryTables
from turnbuckle.adapters.sessions import SessionFacet
from turnbuckle.adapters.store import Store
from turnbuckle.adapters.tasks import TaskFacet
from turnbuckle.sansio.execution import ExecutionState, RetryPolicy
from turnbuckle.testing import LoopClock, SeededIds

from ..figures import record as record_figures


class FaultyRunner(MemoryRunner):
    """Fails operations at random: before they apply, or after (the reply lost)."""

    def __init__(self, rng: random.Random, faults: Counter[str]) -> None:
        super().__init__(MemoryTables())
        self.rng, self.faults, self.enabled = rng, faults, True

    async def run(self, fn: Any, *, writes: bool) -> Any:
        roll = self.rng.random() if self.enabled and writes else 1.0
        if roll < 0.04:
            self.faults["before_apply"] += 1
            await trio.lowlevel.checkpoint()
            raise StoreBusyError("sim", 0.0)
        result = await super().run(fn, writes=writes)
        if roll < 0.06:
            self.faults["after_apply_reply_lost"] += 1
            raise StoreBusyError("sim", 0.0)
        return result


def faulty_store(seed: int, faults: Counter[str]) -> tuple[Store, FaultyRunner]:
    runner = FaultyRunner(random.Random(seed), faults)
    clock, ids = LoopClock(), SeededIds(seed)
    store = Store(
        url="memory://",
        tasks=TaskFacet(
            runner,
            backend_name="in-memory",
            clock=clock,
            ids=ids,
            max_tasks=0,
            max_payload_bytes=1 << 20,
        ),
        sessions=SessionFacet(
            runner, clock=clock, ids=ids, max_payload_bytes=1 << 20, durability_tier="inline"
        ),
        executions=ExecutionFacet(
            runner, backend_name="in-memory", clock=clock, ids=ids, max_payload_bytes=1 << 20
        ),
        closer=runner.aclose,
        clock=clock,
        ids=ids,
    )
    return store, runner


async def retry(call: Any) -> Any:
    """A client that treats a failed call as "outcome unknown" and repeats it (every call it
    repeats is idempotent: a source key, or a read)."""
    while True:
        try:
            return await call()
        except StoreBusyError:
            await trio.sleep(0.01)


async def scenario(seed: int) -> Counter[str]:
    faults: Counter[str] = Counter()
    rng = random.Random(seed)
    store, runner = faulty_store(seed, faults)

    async def model(request: ModelRequest) -> ModelResponse:
        await trio.sleep(rng.choice([0, 0.5, 5, 40]))  # some calls outlive a lease ttl
        return ModelResponse(text=f"ok {len(request.messages)}")

    async def handler(ctx: ExecutionContext) -> Any:
        await trio.sleep(rng.choice([0, 1, 30]))
        return ctx.payload

    sessions = [f"s{i}" for i in range(4)]
    messages = [(s, f"{s}-m{j}") for s in sessions for j in range(4)]
    async with open_runtime(store, model=model, lease_ttl_ms=10_000, resume=False) as runtime:
        async with open_worker(
            store, "lane", [], handler, lease_ttl_ms=10_000, concurrency=3, poll_interval=0.5
        ):
            ids = [f"ex{n}" for n in range(6)]
            for n in range(6):
                with contextlib.suppress(StoreBusyError):  # unknown: reconciled below by id
                    await store.executions.create(
                        "lane",
                        payload=n,
                        execution_id=f"ex{n}",
                        retry=RetryPolicy(max_attempts=50, base_backoff_ms=10, max_backoff_ms=100),
                    )
            for session, text in messages:
                await retry(lambda s=session, t=text: runtime.submit(s, t, source_key=t))
                await trio.sleep(rng.choice([0, 0.1, 2]))
            # Quiescence: keep waking sessions (an actor may have stopped on a fault) until
            # every queue is empty and every execution has ended.
            with trio.fail_after(3600):
                while True:
                    await trio.sleep(20)
                    await retry(runtime.resume)
                    queued = await retry(lambda: store.sessions.list_sessions_with_queued_work())
                    states = []
                    for execution_id in ids:
                        try:
                            states.append(
                                (
                                    await retry(lambda e=execution_id: store.executions.describe(e))
                                ).state
                            )
                        except Exception:  # never created (the create failed before applying)
                            states.append(ExecutionState.COMPLETED)
                    if not queued and all(s.is_terminal for s in states):
                        break
        runner.enabled = False
        assert await store.sessions.list_parked_queued_work() == [], seed
        for session in sessions:
            read = await store.sessions.bind(session).load()
            delivered = [
                n.payload["text"]
                for n in (read.nodes if read else ())  # type: ignore[index, call-overload]
                if n.payload["role"] == "user"  # type: ignore[index, call-overload]
            ]
            expected = [text for s, text in messages if s == session]
            assert delivered == expected, (seed, session, delivered)
        done = Counter(
            e.execution_id
            for e in await store.executions.completion_events(0, 1000)
            if e.kind == "completed"
        )
        assert all(count == 1 for count in done.values()), (seed, done)
    await store.aclose()
    return faults


SEEDS = list(range(8))


@pytest.mark.parametrize("seed", SEEDS)
def test_actors_deliver_exactly_once_under_faults(seed: int) -> None:
    faults = trio.run(scenario, seed, clock=trio.testing.MockClock(autojump_threshold=0))
    assert faults["before_apply"] > 0 or faults["after_apply_reply_lost"] > 0, faults
    record_figures(
        "Deterministic simulation, actor tier: exactly once under store faults",
        "the real runtime and workers under trio's MockClock, on a memory store that fails"
        " operations before they apply or after (reply lost); messages and executions checked"
        " at quiescence",
        seeds=1,
        sessions=4,
        messages=16,
        executions=6,
        violations=0,
        **dict(faults),
    )
