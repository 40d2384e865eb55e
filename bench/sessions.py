"""Session persistence throughput: turns and queued-work deliveries, against raw apsw.

Run it with ``make bench``. Two workloads, each on memory, SQLite "full" and SQLite "process",
with 1 client and with 32 clients (each client its own session, so they never contend for a
lease; their operations share the owner thread's group commits):

- turn: ``try_claim_lease`` -> ``commit`` (one graph node, a checkpoint with a tool snapshot, one
  usage entry, releasing the lease): 2 durable transactions.
- delivery: ``enqueue`` -> ``try_claim_lease`` -> ``claim_queued_work`` -> ``commit`` completing
  the claim and releasing the lease: 4 durable transactions.

The raw apsw baseline runs, sequentially, the same number of transactions per unit with the
statements a store needs at minimum (a lease upsert; a commit writing a blob, a node, a usage
row, the head and the lease release; an enqueue insert; a claim update), on the same disk, in WAL
with synchronous FULL or NORMAL. Figures are medians of 3 interleaved rounds.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import apsw
import trio

from turnbuckle import (
    Checkpoint,
    ClaimBoundary,
    DeliveryPolicy,
    GraphAppend,
    QueuedWorkDraft,
    RuntimeCommit,
    SessionNode,
    SlotPolicy,
    TokenUsage,
    UsageEntry,
    open_store,
)
from turnbuckle.adapters.sqlite import Durability

ROUNDS = 3
N = 1000  # units per SQLite run
N_MEMORY = 5000
CLIENTS = 32


async def run_store(url: str, workload: str, n: int, clients: int, durability: Durability) -> float:
    async with open_store(url, durability=durability) as store:
        sessions = store.sessions
        left = n

        async def client(index: int) -> None:
            nonlocal left
            session_id, owner, turn = f"session-{index}", f"runtime-{index}", 0
            handle = sessions.bind(session_id)
            while left > 0:
                left -= 1
                turn += 1
                claim = None
                if workload == "delivery":
                    await sessions.enqueue(
                        QueuedWorkDraft(
                            session_id=session_id,
                            delivery=DeliveryPolicy.EARLIEST_SAFE_BOUNDARY,
                            slot=SlotPolicy.JOIN,
                            payloads=[{"text": f"message {turn}"}],
                        )
                    )
                lease = await sessions.try_claim_lease(session_id, owner, 60_000)
                assert lease is not None
                if workload == "delivery":
                    claim = await sessions.claim_queued_work(
                        session_id, lease.fence(), owner, ClaimBoundary.IDLE, 60_000, 8
                    )
                    assert claim is not None
                await handle.commit(
                    RuntimeCommit(
                        session_id=session_id,
                        lease=lease.fence(),
                        release=lease.fence(),
                        graph=GraphAppend(
                            nodes=[SessionNode(node_id=f"n{turn}", payload={"text": "reply"})]
                        ),
                        checkpoint=Checkpoint(turn_state={"turn": turn}, tool_state=b"t" * 64),
                        usage=[
                            UsageEntry(
                                source="turn",
                                model="m",
                                usage=TokenUsage(input_tokens=100, output_tokens=20),
                            )
                        ],
                        completed_claims=[] if claim is None else [claim.completion()],
                    )
                )

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(clients):
                nursery.start_soon(client, index)
        return time.perf_counter() - start


RAW_DDL = (
    "CREATE TABLE leases (session_id TEXT PRIMARY KEY, owner TEXT, token TEXT, fence INTEGER,"
    " expires INTEGER) STRICT",
    "CREATE TABLE heads (session_id TEXT PRIMARY KEY, revision INTEGER, state TEXT) STRICT",
    "CREATE TABLE nodes (seq INTEGER PRIMARY KEY, session_id TEXT, node_id TEXT, body TEXT,"
    " UNIQUE (session_id, node_id)) STRICT",
    "CREATE TABLE usage (seq INTEGER PRIMARY KEY, session_id TEXT, entry TEXT) STRICT",
    "CREATE TABLE blobs (ref TEXT PRIMARY KEY, content BLOB) STRICT",
    "CREATE TABLE queue (seq INTEGER PRIMARY KEY, session_id TEXT, items TEXT, claim TEXT) STRICT",
)


def run_raw(path: str, workload: str, n: int, synchronous: str) -> float:
    conn = apsw.Connection(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        for statement in RAW_DDL:
            conn.execute(statement)

        def txn(*statements: tuple[str, tuple[object, ...]]) -> None:
            conn.execute("BEGIN IMMEDIATE")
            for sql, args in statements:
                conn.execute(sql, args)
            conn.execute("COMMIT")

        start = time.perf_counter()
        for turn in range(n):
            if workload == "delivery":
                txn(
                    (
                        "INSERT INTO queue (session_id, items) VALUES ('s', ?)",
                        (f'[{{"text":"message {turn}"}}]',),
                    )
                )
            txn(
                (
                    "INSERT INTO leases VALUES ('s', 'o', ?, 1, 0) ON CONFLICT (session_id) DO"
                    " UPDATE SET token = excluded.token, fence = fence + 1",
                    (str(turn),),
                )
            )
            if workload == "delivery":
                txn(
                    (
                        "UPDATE queue SET claim = ? WHERE session_id = 's' AND claim IS NULL",
                        (str(turn),),
                    )
                )
            deletes = (
                [("DELETE FROM queue WHERE claim = ?", (str(turn),))]
                if workload == "delivery"
                else []
            )
            txn(
                ("INSERT OR IGNORE INTO blobs VALUES (?, ?)", (f"sha256:{turn}", b"t" * 64)),
                (
                    "INSERT INTO nodes (session_id, node_id, body) VALUES ('s', ?, ?)",
                    (f"n{turn}", '{"text":"reply"}'),
                ),
                ("INSERT INTO usage (session_id, entry) VALUES ('s', ?)", ('["turn","m",100]',)),
                (
                    "INSERT INTO heads VALUES ('s', ?, '{}') ON CONFLICT (session_id) DO UPDATE SET"
                    " revision = excluded.revision, state = excluded.state",
                    (turn + 1,),
                ),
                *deletes,
                ("UPDATE leases SET owner = NULL, token = NULL WHERE session_id = 's'", ()),
            )
        return time.perf_counter() - start
    finally:
        conn.close()


def main() -> None:
    folder = tempfile.mkdtemp(prefix="bench-", dir=".")
    try:
        run_all(folder)
    finally:
        shutil.rmtree(folder)


def run_all(folder: str) -> None:
    counter = iter(range(1_000_000))

    def db() -> str:
        return os.path.join(folder, f"s{next(counter)}.db")

    configs: list[tuple[str, str, str, int, Callable[[], float]]] = []
    for workload in ("turn", "delivery"):
        for clients in (1, CLIENTS):
            configs.append(
                (
                    workload,
                    f"memory://    {clients:>2} client(s)",
                    "",
                    N_MEMORY,
                    lambda w=workload, c=clients: trio.run(
                        run_store, "memory://", w, N_MEMORY, c, "full"
                    ),
                )
            )
        for durability, synchronous in (("full", "FULL"), ("process", "NORMAL")):
            for clients in (1, CLIENTS):
                configs.append(
                    (
                        workload,
                        f"sqlite {durability:<7} {clients:>2} client(s)",
                        synchronous,
                        N,
                        lambda w=workload, c=clients, d=durability: trio.run(
                            run_store, f"sqlite:///{db()}", w, N, c, d
                        ),
                    )
                )
            configs.append(
                (
                    workload,
                    f"raw apsw {synchronous:<6}  1 client",
                    synchronous,
                    N,
                    lambda w=workload, s=synchronous: run_raw(db(), w, N, s),
                )
            )

    print(
        "turnbuckle sessions: turn = claim lease + commit (2 txns);"
        " delivery = enqueue + lease + claim + commit (4 txns)"
    )
    rates: dict[tuple[str, str], list[float]] = {(w, label): [] for w, label, *_ in configs}
    for round_number in range(ROUNDS):
        shift = round_number * len(configs) // ROUNDS
        for workload, label, _, n, run in configs[shift:] + configs[:shift]:
            rates[(workload, label)].append(n / run())
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        print(f"  round {round_number + 1}/{ROUNDS} done", flush=True)
    medians = {key: statistics.median(values) for key, values in rates.items()}
    for workload in ("turn", "delivery"):
        raw = {
            sync: medians[(w, label)]
            for w, label, sync, *_ in configs
            if w == workload and label.startswith("raw")
        }
        print()
        title = {"turn": "turns/s", "delivery": "deliveries/s"}[workload]
        print(f"{title:<32}{'median':>10}{'vs raw':>9}")
        print("-" * 51)
        for w, label, synchronous, _, _ in configs:
            if w != workload:
                continue
            median = medians[(w, label)]
            ratio = f"{median / raw[synchronous]:.2f}x" if synchronous else "-"
            print(f"{label:<32}{median:>10,.0f}{ratio:>9}")


if __name__ == "__main__":
    main()
