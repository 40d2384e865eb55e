"""A tour of turnbuckle's durable MCP tasks on a SQLite file (run it with ``make demo``).

An MCP server that runs ``tools/call`` as a task answers at once with a task id, runs the tool in
the background, and lets the client poll ``tasks/get`` and fetch ``tasks/result``. turnbuckle
keeps those tasks in a store, so they survive the server process: this demo creates eight tasks,
runs them concurrently, crashes with two still running, restarts, and recovers them.
"""

from __future__ import annotations

import collections
import os

import attrs
import trio

from turnbuckle import (
    Checkpoint,
    ClaimBoundary,
    DeliveryPolicy,
    GraphAppend,
    MergeKey,
    QueuedWorkDraft,
    RuntimeCommit,
    SessionNode,
    SlotPolicy,
    Store,
    TaskOutcome,
    TaskRecord,
    TaskRpcError,
    TaskStatus,
    TaskSuccess,
    TerminalState,
    TokenUsage,
    TurnCommitStamp,
    UsageEntry,
    open_store,
    turn_commit_hash,
)

DB = "demo-tasks.db"
URL = f"sqlite:///{DB}"  # three slashes: a path relative to the current folder
TTL_MS = 10 * 60_000  # the client may fetch the result for 10 minutes; expire_tasks sweeps later
POLL_MS = 500  # how often the client should poll tasks/get

# (client session, tool, arguments, what the fake tool does, seconds per step)
REQUESTS = [
    ("alice", "search_docs", {"query": "group commit"}, "complete", 0.05),
    ("alice", "deploy", {"service": "api", "env": "prod"}, "ask", 0.09),
    ("alice", "summarize", {"url": "https://example.com/a"}, "complete", 0.11),
    ("alice", "reindex", {"index": "docs"}, "crash", 0.06),
    ("bob", "translate", {"text": "hola", "to": "en"}, "complete", 0.07),
    ("bob", "fetch_logs", {"service": "db", "lines": 100}, "fail", 0.13),
    ("bob", "render_video", {"frames": 1200}, "cancel", 0.15),
    ("bob", "train_model", {"epochs": 50}, "crash", 0.08),
]


def name(task: TaskRecord) -> str:
    assert isinstance(task.original_params, dict)
    return str(task.original_params["name"])


def say(task: TaskRecord, text: str) -> None:
    print(f"   {name(task):<13}{text}")


async def fake_tool(
    store: Store, task: TaskRecord, plan: str, pace: float, stored: dict[str, TaskOutcome]
) -> None:
    """Stands in for a real tool: sleeps instead of working, and reports progress through the
    store, where a client polling tasks/get sees it."""
    await trio.sleep(pace)
    # Progress: a new status message, same status (what tasks/get shows the polling client).
    task = await store.tasks.set_status_message(task.task_id, "50% done")
    say(task, f"working         {task.status_message!r}")
    if plan == "crash":
        await trio.sleep_forever()  # still running when the process "crashes" below
    if plan == "ask":
        # MCP elicitation: the task waits for the client, then resumes.
        task = await store.tasks.update_task_status(
            task.task_id, TaskStatus.INPUT_REQUIRED, "Deploy api to prod? [y/N]"
        )
        say(task, f"input_required  {task.status_message!r}")
        await trio.sleep(pace)  # ... the client answers "y"
        task = await store.tasks.update_task_status(task.task_id, TaskStatus.WORKING, "deploying")
        say(task, f"working         {task.status_message!r}")
    await trio.sleep(pace)
    if plan == "fail":
        error = TaskRpcError(code=-32603, message="log service unreachable", data={"host": "db1"})
        await store.tasks.fail_task(task.task_id, error, "upstream error")
        stored[task.task_id] = error
        say(task, f"failed          {error.message!r}")
        return
    result = {"content": [{"type": "text", "text": f"{name(task)}: done"}], "isError": False}
    try:
        await store.tasks.complete_task(task.task_id, TaskSuccess(result))
    except TerminalState as exc:
        # The client cancelled while we ran. The cancel won; the store refuses our late result
        # instead of overwriting the cancellation, so we just drop it.
        say(task, f"complete_task refused: {exc}")
        return
    stored[task.task_id] = TaskSuccess(result)
    say(task, "completed")


async def client_cancels(store: Store, task: TaskRecord, after: float) -> None:
    await trio.sleep(after)
    task = await store.tasks.cancel_task(task.task_id)  # what tasks/cancel does
    say(task, f"cancelled by the client ({task.status_message!r})")


async def all_tasks(store: Store) -> list[TaskRecord]:
    tasks: list[TaskRecord] = []
    cursor = None
    while True:
        page = await store.tasks.list_tasks(cursor)
        tasks.extend(page.tasks)
        if (cursor := page.next_cursor) is None:
            return tasks


async def main() -> None:
    stored: dict[str, TaskOutcome] = {}
    print(f"1. Eight tools/call requests become tasks in {DB}")
    async with open_store(URL) as store:
        plans = []
        for session, tool, arguments, plan, pace in REQUESTS:
            task = await store.tasks.create_task(
                TaskRecord(
                    session_id=session,
                    original_method="tools/call",
                    original_params={"name": tool, "arguments": arguments},
                    ttl=TTL_MS,
                    poll_interval=POLL_MS,
                )
            )
            plans.append((task, plan, pace))
        print(f"   {len(plans)} tasks, all {task.status}; what tasks/get returns for the last one:")
        print(f"   {task.to_wire()}")

        print("2. The tools run concurrently")
        async with trio.open_nursery() as server:
            async with trio.open_nursery() as finishing:
                for task, plan, pace in plans:
                    nursery = server if plan == "crash" else finishing
                    nursery.start_soon(fake_tool, store, task, plan, pace, stored)
                    if plan == "cancel":
                        finishing.start_soon(client_cancels, store, task, 1.5 * pace)
            in_flight = [task for task, plan, _ in plans if plan == "crash"]
            print(f"3. Crash! The server dies with {len(in_flight)} tasks in flight")
            server.cancel_scope.cancel()  # their workers stop; nothing marks their tasks ended
    # The store is closed, as after a crash. Every acknowledged write is already on disk.

    async with open_store(URL) as store:
        # At startup, fail the tasks whose worker died with the old process: live tasks not
        # updated for more than max_age_ms. 0 means "every live task" here; a real server passes
        # ~5 minutes (the default), so tasks that another process sharing the file is still
        # running (and updating) are left alone. "More than" is strict, so let a moment pass.
        await trio.sleep(0.01)
        recovered = await store.tasks.recover_stuck_tasks(max_age_ms=0)
        assert sorted(recovered) == sorted(task.task_id for task in in_flight)
        print(f"   restarted; recover_stuck_tasks failed {len(recovered)} tasks:")
        for task_id in recovered:
            task = await store.tasks.get_task(task_id)
            assert task is not None
            say(task, f"{task.status}  {await store.tasks.get_task_result(task_id)}")

        # Keyset pagination: the cursor marks a position, so deletions between pages are safe.
        print("4. tasks/list pages through every task, 3 at a time, by (created_at, task_id)")
        page = await store.tasks.list_tasks(limit=3)
        number = 1
        while True:
            print(f"   page {number}: {', '.join(name(t) for t in page.tasks)}")
            if page.next_cursor is None:
                break
            page = await store.tasks.list_tasks(page.next_cursor, limit=3)
            number += 1
        # A session sees only its own tasks (MCP binds tasks to the client that made them).
        page = await store.tasks.list_tasks_for_session("bob")
        print(f"   session 'bob' only: {', '.join(name(t) for t in page.tasks)}")

        print("5. tasks/result returns exactly the outcome that was stored")
        for task in await all_tasks(store):
            outcome = await store.tasks.get_task_result(task.task_id)
            if task.task_id in stored:
                assert outcome == stored[task.task_id]
                say(task, f"{type(outcome).__name__}, equal to what the worker stored")
            elif task.status is TaskStatus.CANCELLED:
                say(task, f"{outcome}: cancelled before a result was stored")

        print("6. Summary")
        counts = collections.Counter(task.status for task in await all_tasks(store))
        print(f"   {'status':<16}tasks")
        for status in TaskStatus:
            print(f"   {status.value:<16}{counts[status]:>5}")
        print(f"   {'total':<16}{await store.tasks.task_count():>5}")


async def session_scene() -> None:
    """Session persistence: one writer per session, durable queued input, atomic turn commits."""
    print("7. Sessions: two runtimes contend for one agent session")
    async with open_store(URL) as store:
        sessions = store.sessions
        # Both runtimes try to take the session's execution lease; only one may run it.
        a = await sessions.try_claim_lease("chat-42", "runtime-a", ttl_ms=30_000)
        b = await sessions.try_claim_lease("chat-42", "runtime-b", ttl_ms=30_000)
        assert a is not None and b is None
        print(f"   runtime-a holds the lease (fencing token {a.fencing_token}); runtime-b waits")

        # Messages arriving while a turn runs are queued durably, never rejected. Two joinable
        # messages are delivered together; the one marked after_current_turn_commit waits.
        def message(text: str, delivery: DeliveryPolicy, key: str) -> QueuedWorkDraft:
            return QueuedWorkDraft(
                session_id="chat-42",
                delivery=delivery,
                slot=SlotPolicy.JOIN,
                merge_key=MergeKey.PAYLOAD_DEFAULT,
                payloads=[{"role": "user", "text": text}],
                source_key=key,  # the client's message id: a resend is the same batch
            )

        now = DeliveryPolicy.EARLIEST_SAFE_BOUNDARY
        later = DeliveryPolicy.AFTER_CURRENT_TURN_COMMIT
        first = await sessions.enqueue(message("also check the logs", now, "m1"))
        await sessions.enqueue(message("and the metrics", now, "m2"))
        await sessions.enqueue(message("then write a summary", later, "m3"))
        resent = await sessions.enqueue(message("also check the logs", now, "m1"))
        assert resent.batch_id == first.batch_id
        claim = await sessions.claim_queued_work(
            "chat-42", a.fence(), "runtime-a", ClaimBoundary.ACTIVE_TURN_CHECKPOINT, 30_000, 10
        )
        assert claim is not None
        texts = [item.payload["text"] for b in claim.batches for item in b.items]  # type: ignore[index, call-overload]
        print(f"   at the turn's checkpoint runtime-a takes {texts}; 'then write a summary' waits")

        # The turn ends with ONE atomic commit: graph, checkpoint, usage, the delivered queue
        # batches, a turn stamp for idempotent replay, and the lease release.
        turn = RuntimeCommit(
            session_id="chat-42",
            graph=GraphAppend(nodes=[SessionNode(node_id="n1", payload={"assistant": "done"})]),
            checkpoint=Checkpoint(turn_state={"turn": 1}, tool_state=b"tool-cache-v1"),
            usage=[UsageEntry(source="turn", model="demo", usage=TokenUsage(input_tokens=120))],
        )
        stamp = TurnCommitStamp(
            session_id="chat-42", turn_id="turn-1", turn_commit_hash=turn_commit_hash(turn)
        )
        final = attrs.evolve(
            turn,
            lease=a.fence(),
            release=a.fence(),
            turn_commit=stamp,
            completed_claims=[claim.completion()],
        )
        head = sessions.bind("chat-42")
        result = await head.commit(final)
        print(f"   turn 1 committed: head revision {result.head_revision}, lease released")
    # "Crash" before runtime-a heard back: after a restart it retries the same final commit.
    async with open_store(URL) as store:
        retried = await store.sessions.bind("chat-42").commit(final)
        assert retried == result
        print(f"   after a restart the retried commit replays: revision {retried.head_revision}")
        pending = await store.sessions.list_pending_queued_work("chat-42")
        print(f"   still queued for the next turn: {len(pending)} batch (delivered exactly once)")
        b = await store.sessions.try_claim_lease("chat-42", "runtime-b", ttl_ms=30_000)
        assert b is not None and b.fencing_token > a.fencing_token
        print(f"   runtime-b now takes the session with a higher fencing token ({b.fencing_token})")


if __name__ == "__main__":
    # Start fresh on every run: remove the database and its WAL side files.
    for path in (DB, f"{DB}-wal", f"{DB}-shm"):
        if os.path.exists(path):
            os.remove(path)
    trio.run(main)
    trio.run(session_scene)
