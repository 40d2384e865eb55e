"""Executions and the MCP tasks that run on them (run by ``make demo``, after the agents).

Six ``tools/call`` tasks each run on an execution on the "render" lane. Two workers serve the
lane: one on a machine with a GPU, one without; the GPU job waits for the GPU worker while the
others go to whichever worker is free. One job fails transiently and is retried; one is
cancelled by its client while it runs. The tasks follow their executions: progress becomes the
status message, the result the task's outcome.
"""

from __future__ import annotations

import os
import time

import trio

from turnbuckle import TaskRecord, open_store
from turnbuckle.actors.worker import ExecutionContext, open_worker
from turnbuckle.sansio.codec import JSON
from turnbuckle.sansio.execution import FrameKind, RetryPolicy

DB = "demo-executions.db"
URL = f"sqlite:///{DB}"
START = time.monotonic()


def log(who: str, text: str) -> None:
    print(f"  {time.monotonic() - START:6.2f}s  {who:<12} {text}")


def handler(worker: str):  # type: ignore[no-untyped-def]
    async def render(ctx: ExecutionContext) -> JSON:
        job = ctx.payload["job"]  # type: ignore[index, call-overload]
        log(worker, f"runs {job} (attempt {ctx.attempt})")
        steps = 40 if job == "long" else 3  # "long" is still running when it is cancelled
        for step in range(1, steps + 1):
            await trio.sleep(0.05)
            pct = 100 * step // (steps + 1)
            await ctx.progress(pct, f"{job}: {pct}%")
            await ctx.append(FrameKind.STDOUT, f"{job} frame {step}", summary_patch={"pct": pct})
        if job == "flaky" and ctx.attempt == 0:
            raise ConnectionError("the render farm hiccuped")
        return {"job": job, "frames": 3, "by": worker}

    return render


async def main() -> None:
    print("11. Tasks that run on executions: two workers, capabilities, a retry, a cancel")
    async with open_store(URL) as store:
        jobs = ["intro", "credits", "flaky", "gpu-shader", "long", "outro"]
        tasks = {}
        for job in jobs:
            record = TaskRecord(
                original_method="tools/call",
                original_params={"name": "render", "arguments": {"job": job}},
            )
            tasks[job] = await store.tasks.create_running_task(
                record,
                "render",
                capabilities=["gpu"] if job == "gpu-shader" else [],
                priority=1 if job == "intro" else 0,
                payload={"job": job},
                retry=RetryPolicy(max_attempts=3, base_backoff_ms=100),
            )
        log("client", f"created {len(jobs)} tasks, each backed by an execution")
        async with (
            open_worker(
                store, "render", [], handler("cpu-worker"), concurrency=2, lease_ttl_ms=2000
            ),
            open_worker(
                store, "render", ["gpu"], handler("gpu-worker"), concurrency=1, lease_ttl_ms=2000
            ),
        ):
            await trio.sleep(0.4)
            long = tasks["long"].task_id
            current = await store.tasks.get_task(long)
            assert current is not None
            log("client", f"'long' says {current.status_message!r}; cancelling it")
            await store.tasks.cancel_task(long)
            with trio.fail_after(20):
                results = {
                    job: await store.tasks.wait_result(t.task_id) for job, t in tasks.items()
                }
                # The task ended at once; its worker sees the request at its next renewal.
                long_run = f"task:{long}"
                while (await store.executions.describe(long_run)).state.value != "cancelled":  # noqa: ASYNC110
                    await trio.sleep(0.05)
            log("cpu-worker", "saw the cancel at its lease renewal and stopped 'long'")
        print("   task            status      outcome")
        for job, task in tasks.items():
            final = await store.tasks.get_task(task.task_id)
            assert final is not None
            print(f"   {job:<15} {final.status.value:<11} {results[job]}")
        info = await store.executions.describe(f"task:{tasks['flaky'].task_id}")
        print(
            f"   'flaky' succeeded on attempt {info.attempt_index}; its summary: "
            f"{await store.executions.read_summary(info.execution_id)}"
        )
        kinds: dict[str, int] = {}
        for event in await store.executions.lease_events(limit=1000):
            kinds[event.kind] = kinds.get(event.kind, 0) + 1
        print(f"   lease events in the durable outbox: {kinds}")


if __name__ == "__main__":
    for path in (DB, f"{DB}-wal", f"{DB}-shm"):
        if os.path.exists(path):
            os.remove(path)
    trio.run(main)
