"""Workers run executions, and MCP tasks run on executions: results, retries, failures,
cancellation, lease loss, concurrency; on every adapter, under trio and asyncio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import turnbuckle
from turnbuckle import TaskRecord, TaskRpcError, TaskStatus, TaskSuccess
from turnbuckle.actors.worker import ExecutionContext, PermanentFailure, open_worker
from turnbuckle.sansio.execution import ExecutionState, FrameKind, RetryPolicy
from turnbuckle.testing import FakeClock

FAST_RETRY = RetryPolicy(max_attempts=3, base_backoff_ms=0, max_backoff_ms=0)


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/w.db"


async def until(store: turnbuckle.Store, execution_id: str, state: ExecutionState) -> None:
    """Poll the store (the only channel a worker in another process would share)."""
    while (await store.executions.describe(execution_id)).state is not state:  # noqa: ASYNC110
        await anyio.sleep(0.02)


def task() -> TaskRecord:
    return TaskRecord(original_method="tools/call", original_params={"name": "job"})


async def test_a_task_runs_on_an_execution_to_its_result(url: str) -> None:
    async def handler(ctx: ExecutionContext) -> Any:
        await ctx.progress(50, "halfway")
        await ctx.append(FrameKind.STDOUT, "working", summary_patch={"step": 1})
        return {"sum": ctx.payload["a"] + ctx.payload["b"]}  # type: ignore[index, call-overload]

    async with turnbuckle.open_store(url) as store, open_worker(store, "math", [], handler):
        created = await store.tasks.create_running_task(task(), "math", payload={"a": 2, "b": 3})
        with anyio.fail_after(20):
            outcome = await store.tasks.wait_result(created.task_id)
        assert outcome == TaskSuccess({"sum": 5})
        info = await store.executions.describe(f"task:{created.task_id}")
        assert info.state is ExecutionState.COMPLETED and info.result == {"sum": 5}
        assert (info.progress_pct, info.progress_message) == (50, "halfway")
        frames = await store.executions.read_stream(info.execution_id)
        assert [(f.kind, f.data) for f in frames] == [(FrameKind.STDOUT, "working")]
        assert await store.executions.read_summary(info.execution_id) == ({"step": 1}, 1)
        done = await store.tasks.get_task(created.task_id)
        assert done is not None and done.status is TaskStatus.COMPLETED


async def test_transient_failures_retry_then_succeed(url: str) -> None:
    attempts: list[int] = []

    async def handler(ctx: ExecutionContext) -> Any:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise RuntimeError("flaky")
        return "ok"

    async with turnbuckle.open_store(url) as store, open_worker(store, "l", [], handler):
        created = await store.tasks.create_running_task(task(), "l", retry=FAST_RETRY)
        with anyio.fail_after(20):
            assert await store.tasks.wait_result(created.task_id) == TaskSuccess("ok")
    assert attempts == [0, 1, 2]


async def test_permanent_failures_and_exhausted_retries_fail_the_task(url: str) -> None:
    async def handler(ctx: ExecutionContext) -> Any:
        if ctx.payload == "permanent":
            raise PermanentFailure("bad input")
        raise RuntimeError("always")

    async with turnbuckle.open_store(url) as store, open_worker(store, "l", [], handler):
        permanent = await store.tasks.create_running_task(task(), "l", payload="permanent")
        exhausted = await store.tasks.create_running_task(
            task(), "l", payload="x", retry=FAST_RETRY
        )
        with anyio.fail_after(20):
            first = await store.tasks.wait_result(permanent.task_id)
            second = await store.tasks.wait_result(exhausted.task_id)
        assert first == TaskRpcError(-32603, "bad input")
        assert isinstance(second, TaskRpcError) and "always" in second.message
        info = await store.executions.describe(f"task:{exhausted.task_id}")
        assert (info.state, info.attempt_index) == (ExecutionState.FAILED, 2)


async def test_cancelling_the_task_cancels_the_running_handler(url: str) -> None:
    started, cancelled = anyio.Event(), anyio.Event()

    async def handler(ctx: ExecutionContext) -> Any:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async with (
        turnbuckle.open_store(url) as store,
        open_worker(store, "l", [], handler, lease_ttl_ms=300),
    ):
        created = await store.tasks.create_running_task(task(), "l")
        with anyio.fail_after(20):
            await started.wait()
            await store.tasks.cancel_task(created.task_id)
            await cancelled.wait()
            await until(store, f"task:{created.task_id}", ExecutionState.CANCELLED)
        final = await store.tasks.get_task(created.task_id)
        assert final is not None and final.status is TaskStatus.CANCELLED


async def test_a_cancelled_task_that_never_started_never_runs(url: str) -> None:
    async with turnbuckle.open_store(url) as store:
        created = await store.tasks.create_running_task(task(), "idle-lane")
        await store.tasks.cancel_task(created.task_id)
        info = await store.executions.describe(f"task:{created.task_id}")
        assert info.state is ExecutionState.CANCELLED
        assert await store.executions.claim("idle-lane", [], "w", 1000) is None


async def test_a_worker_that_loses_its_lease_stops_and_another_finishes(url: str) -> None:
    clock = FakeClock()
    first_started, stopped = anyio.Event(), anyio.Event()
    runs: list[str] = []

    async def stalls(ctx: ExecutionContext) -> Any:
        runs.append("first")
        first_started.set()
        try:
            await anyio.sleep_forever()
        finally:
            stopped.set()

    async def finishes(ctx: ExecutionContext) -> Any:
        runs.append("second")
        return "finished by the second worker"

    async with turnbuckle.open_store(url, clock=clock) as store:
        info = await store.executions.create("l")
        async with open_worker(store, "l", [], stalls, lease_ttl_ms=300):
            with anyio.fail_after(20):
                await first_started.wait()
                clock.advance(1000)  # the first worker's lease runs out
                await stopped.wait()  # its next renewal is refused: the handler is cancelled
        async with open_worker(store, "l", [], finishes, lease_ttl_ms=300):
            with anyio.fail_after(20):
                await until(store, info.execution_id, ExecutionState.COMPLETED)
        final = await store.executions.describe(info.execution_id)
        assert final.result == "finished by the second worker" and runs == ["first", "second"]
        kinds = [e.kind for e in await store.executions.lease_events()]
        assert kinds[0] == "acquired" and "reclaimed" in kinds and kinds[-1] == "revoked"


async def test_concurrency_runs_executions_side_by_side(url: str) -> None:
    running = 0
    both = anyio.Event()

    async def handler(ctx: ExecutionContext) -> Any:
        nonlocal running
        running += 1
        if running == 2:
            both.set()
        await both.wait()  # each finishes only once the other runs too
        return ctx.payload

    async with (
        turnbuckle.open_store(url) as store,
        open_worker(store, "l", [], handler, concurrency=2),
    ):
        a = await store.executions.create("l", payload="a")
        b = await store.executions.create("l", payload="b")
        with anyio.fail_after(20):
            for info in (a, b):
                await until(store, info.execution_id, ExecutionState.COMPLETED)


def test_under_asyncio(tmp_path: Path) -> None:
    async def main() -> None:
        async def handler(ctx: ExecutionContext) -> Any:
            await ctx.progress(message="on asyncio")
            return "ok"

        async with (
            turnbuckle.open_store(f"sqlite:///{tmp_path}/a.db") as store,
            open_worker(store, "l", [], handler),
        ):
            created = await store.tasks.create_running_task(task(), "l")
            with anyio.fail_after(20):
                assert await store.tasks.wait_result(created.task_id) == TaskSuccess("ok")

    anyio.run(main, backend="asyncio")
