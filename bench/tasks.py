"""Task lifecycle throughput: turnbuckle's stores against raw apsw on the same disk.

Run it with ``make bench``. One lifecycle is what a server does for one ``tools/call`` task:

    create_task (working) -> update_task_status(input_required, "progress")
                          -> complete_task(TaskSuccess(result))

three durable writes. Each configuration runs ROUNDS times, interleaved with the others (the
machine is noisy), and the table shows the median lifecycles/s with the range seen.

- memory://: the in-memory store (no I/O), the cost of the shared task logic and the event loop.
- SQLite "full" / "process": one store per run, on a fresh file in a temporary folder here.
  "1 client" awaits one operation at a time; "32 clients" are 32 trio tasks sharing one store,
  whose queued operations the owner thread commits together (group commit).
- raw apsw FULL / NORMAL: the floor the disk sets, with no event loop, no thread hop and no
  checks: the same table (turnbuckle's schema), the same three statements per lifecycle, each in
  its own BEGIN IMMEDIATE ... COMMIT, one after another, in WAL mode with synchronous FULL
  (= durability "full") or NORMAL (= durability "process").
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import apsw
import trio

from turnbuckle import TaskRecord, TaskStatus, TaskSuccess, open_store
from turnbuckle.adapters.sqlite import _DDL, Durability, sqlite_version  # _DDL: the tasks schema
from turnbuckle.adapters.store import SystemIds
from turnbuckle.sansio.codec import encode_json
from turnbuckle.sansio.task import format_timestamp, make_task_id

ROUNDS = 3
N_SQLITE = 2000  # lifecycles per SQLite run
N_MEMORY = 20_000
CLIENTS = 32

PARAMS = {"name": "search_docs", "arguments": {"query": "group commit", "limit": 10}}
RESULT = {"content": [{"type": "text", "text": "3 documents found"}], "isError": False}
TTL_MS, POLL_MS = 600_000, 500


# --- turnbuckle ------------------------------------------------------------------------------


async def turnbuckle_run(url: str, n: int, clients: int, durability: Durability) -> float:
    """Seconds for ``n`` lifecycles by ``clients`` concurrent trio tasks on one store."""
    async with open_store(url, durability=durability) as store:
        tasks = store.tasks
        left = n

        async def client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                task = await tasks.create_task(
                    TaskRecord(
                        session_id="bench",
                        original_method="tools/call",
                        original_params=PARAMS,
                        ttl=TTL_MS,
                        poll_interval=POLL_MS,
                    )
                )
                await tasks.update_task_status(task.task_id, TaskStatus.INPUT_REQUIRED, "progress")
                await tasks.complete_task(task.task_id, TaskSuccess(RESULT))

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client)
        elapsed = time.perf_counter() - start
        assert await tasks.task_count() == n
    return elapsed


# --- raw apsw --------------------------------------------------------------------------------

INSERT = (
    "INSERT INTO tasks (task_id, session_id, status, status_message, created_at, created_ms,"
    " last_updated_at, updated_ms, ttl, expires_ms, poll_interval, original_method,"
    " original_params, result, meta, version)"
    " VALUES (?, 'bench', 'working', NULL, ?, ?, ?, ?, ?, ?, ?, 'tools/call', ?, NULL, NULL, 1)"
)
TO_INPUT_REQUIRED = (
    "UPDATE tasks SET status = 'input_required', status_message = 'progress',"
    " last_updated_at = ?, updated_ms = ?, version = 2 WHERE task_id = ? AND version = 1"
)
TO_COMPLETED = (
    "UPDATE tasks SET status = 'completed', status_message = NULL, result = ?,"
    " last_updated_at = ?, updated_ms = ?, version = 3 WHERE task_id = ? AND version = 2"
)


def raw_run(path: str, n: int, synchronous: str) -> float:
    """Seconds for ``n`` lifecycles as three single-statement transactions each."""
    conn = apsw.Connection(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        with conn:
            for statement in _DDL:
                conn.execute(statement)
        params = encode_json(PARAMS)
        result = encode_json({"type": "success", "value": RESULT})  # as turnbuckle stores it
        ids = SystemIds()

        def write(sql: str, args: tuple[object, ...]) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, args)
            assert conn.changes() == 1
            conn.execute("COMMIT")

        start = time.perf_counter()
        for _ in range(n):
            now = time.time_ns() // 1_000_000
            task_id, stamp = make_task_id(now, ids), format_timestamp(now)
            write(INSERT, (task_id, stamp, now, stamp, now, TTL_MS, now + TTL_MS, POLL_MS, params))
            now = time.time_ns() // 1_000_000
            write(TO_INPUT_REQUIRED, (format_timestamp(now), now, task_id))
            now = time.time_ns() // 1_000_000
            write(TO_COMPLETED, (result, format_timestamp(now), now, task_id))
        return time.perf_counter() - start
    finally:
        conn.close()


def fsync_micros(folder: str, count: int = 200) -> float:
    """Median microseconds of one 4 KiB write + fsync here: the price of one durable commit."""
    path = os.path.join(folder, "fsync.probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block, times = b"\0" * 4096, []
        for i in range(count):
            start = time.perf_counter()
            os.pwrite(fd, block, (i % 16) * 4096)
            os.fsync(fd)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6
    finally:
        os.close(fd)
        os.remove(path)


# --- the runs --------------------------------------------------------------------------------


def main() -> None:
    folder = tempfile.mkdtemp(prefix="bench-", dir=".")  # this disk, not a tmpfs /tmp
    try:
        run_all(folder)
    finally:
        shutil.rmtree(folder)


def run_all(folder: str) -> None:
    def db(name: str) -> str:
        return os.path.join(folder, f"{name}-{secrets.token_hex(4)}.db")

    def on_trio(
        url: Callable[[], str], n: int, clients: int, durability: Durability
    ) -> Callable[[], float]:
        return lambda: trio.run(turnbuckle_run, url(), n, clients, durability)

    memory = on_trio(lambda: "memory://", N_MEMORY, 1, "full")  # memory ignores durability
    memory_many = on_trio(lambda: "memory://", N_MEMORY, CLIENTS, "full")
    # (label, raw synchronous setting it compares with, lifecycles per run, the run)
    configs: list[tuple[str, str, int, Callable[[], float]]] = [
        ("memory://        1 client", "", N_MEMORY, memory),
        (f"memory://       {CLIENTS} clients", "", N_MEMORY, memory_many),
    ]
    pairs: list[tuple[Durability, str]] = [("full", "FULL"), ("process", "NORMAL")]
    for durability, synchronous in pairs:
        one = on_trio(lambda: f"sqlite:///{db('tb')}", N_SQLITE, 1, durability)
        many = on_trio(lambda: f"sqlite:///{db('tb')}", N_SQLITE, CLIENTS, durability)
        configs += [
            (f"sqlite {durability:<8} 1 client", synchronous, N_SQLITE, one),
            (f"sqlite {durability:<7} {CLIENTS} clients", synchronous, N_SQLITE, many),
            (f"raw apsw {synchronous:<6} 1 client", synchronous, N_SQLITE,
             lambda s=synchronous: raw_run(db("raw"), N_SQLITE, s)),
        ]  # fmt: skip

    print("turnbuckle task lifecycle: create_task -> update_task_status(input_required)")
    print("                           -> complete_task(TaskSuccess); 3 durable writes each")
    print(
        f"SQLite {sqlite_version()} (apsw {apsw.apsw_version()}), trio {trio.__version__},"
        f" Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(f"one 4 KiB write + fsync on this disk: {fsync_micros(folder):.0f} us (median)")
    print(f"{ROUNDS} rounds, interleaved; SQLite runs {N_SQLITE} lifecycles, memory {N_MEMORY}")

    rates: dict[str, list[float]] = {label: [] for label, *_ in configs}
    for round_number in range(ROUNDS):
        # Rotate the order each round, so no configuration always runs first or last.
        shift = round_number * len(configs) // ROUNDS
        for label, _, n, run in configs[shift:] + configs[:shift]:
            rates[label].append(n / run())
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        print(f"  round {round_number + 1}/{ROUNDS} done", flush=True)

    medians = {label: statistics.median(rates[label]) for label in rates}
    raw = {sync: medians[label] for label, sync, *_ in configs if label.startswith("raw")}
    print()
    print(f"{'configuration':<28}{'lifecycles/s':>13}{'range (min-max)':>20}{'vs raw':>9}")
    print("-" * 70)
    for label, synchronous, _, _ in configs:
        median = medians[label]
        spread = f"{min(rates[label]):,.0f}-{max(rates[label]):,.0f}"
        ratio = f"{median / raw[synchronous]:.2f}x" if synchronous else "-"
        print(f"{label:<28}{median:>13,.0f}{spread:>20}{ratio:>9}")
        if label.startswith("raw"):
            print()
    print("vs raw: turnbuckle / raw apsw at the same durability (full = FULL, process = NORMAL).")


if __name__ == "__main__":
    main()
