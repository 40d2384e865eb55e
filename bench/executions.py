"""Execution throughput: claimed and completed per second, by 1, 4 and 16 concurrent workers.

Run it with ``make bench``. N executions are created up front (not timed); then W worker slots
(``open_worker(..., concurrency=W)``, a handler that returns at once) drain the lane: each
execution costs a claim and a complete (two durable transactions, with the lease and completion
outbox events), plus the worker's describe. The raw baseline is an apsw loop on the same disk
doing a guarded claim (``UPDATE ... WHERE id = (SELECT ... ORDER BY priority DESC, created LIMIT
1) RETURNING``) and a fenced complete, one transaction each, sequentially. Medians of 3
interleaved rounds.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from typing import Any

import apsw
import trio

from turnbuckle import open_store
from turnbuckle.actors.worker import ExecutionContext, open_worker
from turnbuckle.adapters.sqlite import Durability
from turnbuckle.sansio.execution import ExecutionState

ROUNDS = 3
N = 600


async def drain(url: str, workers: int, durability: Durability) -> float:
    async def handler(ctx: ExecutionContext) -> Any:
        return ctx.payload

    async with open_store(url, durability=durability) as store:
        ids = [(await store.executions.create("bench", payload=i)).execution_id for i in range(N)]
        done = trio.Event()
        start = time.perf_counter()
        async with open_worker(
            store, "bench", [], handler, concurrency=workers, poll_interval=0.002
        ):

            async def watch() -> None:
                after = 0
                finished = 0
                while finished < N:
                    events = await store.executions.completion_events(after, 1000)
                    finished += sum(1 for e in events if e.kind == "completed")
                    after = events[-1].event_id if events else after
                    if not events:
                        await trio.sleep(0.002)
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await done.wait()
        elapsed = time.perf_counter() - start
        last = await store.executions.describe(ids[-1])
        assert last.state is ExecutionState.COMPLETED
    return N / elapsed


def raw(path: str, synchronous: str) -> float:
    conn = apsw.Connection(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(
            "CREATE TABLE jobs (id INTEGER PRIMARY KEY, lane TEXT, state TEXT,"
            " priority INTEGER, created INTEGER, epoch INTEGER, expires INTEGER,"
            " result TEXT) STRICT"
        )
        conn.execute("CREATE INDEX jobs_ready ON jobs (lane, state, priority DESC, created)")
        with conn:
            for i in range(N):
                conn.execute(
                    "INSERT INTO jobs VALUES (?, 'bench', 'runnable', 0, ?, 0, NULL, NULL)", (i, i)
                )
        start = time.perf_counter()
        while True:
            conn.execute("BEGIN IMMEDIATE")
            got = conn.execute(
                "UPDATE jobs SET state = 'active', epoch = epoch + 1, expires = ? WHERE id ="
                " (SELECT id FROM jobs WHERE lane = 'bench' AND state = 'runnable'"
                " ORDER BY priority DESC, created LIMIT 1) RETURNING id, epoch",
                (int(time.time() * 1000) + 30_000,),
            ).fetchall()
            conn.execute("COMMIT")
            if not got:
                break
            job, epoch = got[0]
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE jobs SET state = 'done', result = '1' WHERE id = ? AND"
                " epoch = ? AND state = 'active'",
                (job, epoch),
            )
            conn.execute("COMMIT")
        return N / (time.perf_counter() - start)
    finally:
        conn.close()


def main() -> None:
    folder = tempfile.mkdtemp(prefix="bench-", dir=".")
    counter = iter(range(1_000_000))
    try:
        configs: list[tuple[str, str, Any]] = []
        for workers in (1, 4, 16):
            configs.append(
                (
                    f"memory://       {workers:>2} workers",
                    "",
                    lambda w=workers: trio.run(drain, "memory://", w, "full"),
                )
            )
            for durability, synchronous in (("full", "FULL"), ("process", "NORMAL")):
                configs.append(
                    (
                        f"sqlite {durability:<7}  {workers:>2} workers",
                        synchronous,
                        lambda w=workers, d=durability: trio.run(
                            drain, f"sqlite:///{folder}/e{next(counter)}.db", w, d
                        ),
                    )
                )
        for synchronous in ("FULL", "NORMAL"):
            configs.append(
                (
                    f"raw apsw {synchronous:<6}  1 loop",
                    synchronous,
                    lambda s=synchronous: raw(f"{folder}/raw{next(counter)}.db", s),
                )
            )
        rates: dict[str, list[float]] = {label: [] for label, _, _ in configs}
        print(f"executions claimed + completed per second ({N} per run)")
        for round_number in range(ROUNDS):
            shift = round_number * len(configs) // ROUNDS
            for label, _, run in configs[shift:] + configs[:shift]:
                rates[label].append(run())
            print(f"  round {round_number + 1}/{ROUNDS} done", flush=True)
        medians = {label: statistics.median(values) for label, values in rates.items()}
        raws = {sync: medians[label] for label, sync, _ in configs if label.startswith("raw")}
        print()
        print(f"{'configuration':<30}{'per second':>12}{'vs raw':>9}")
        print("-" * 51)
        for label, synchronous, _ in configs:
            ratio = f"{medians[label] / raws[synchronous]:.2f}x" if synchronous else "-"
            print(f"{label:<30}{medians[label]:>12,.0f}{ratio:>9}")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
