"""The SQLite store serves ``store.sessions`` exactly as the memory store does.

- the version-1 -> 2 migration (in place, inside the open transaction, race-free);
- Python ports of the six lash-sqlite-store regression tests (upstream-semantics §3.6), the
  concurrent ones with two threads and with two processes, each with its own store handle;
- a differential property test: random session operations give the same answers (results and
  error types alike) on both adapters.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import threading
from pathlib import Path
from typing import Any

import anyio
import apsw
import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import turnbuckle
from turnbuckle import (
    ActivePath,
    AgentFrame,
    AttachmentIntent,
    Checkpoint,
    ClaimBoundary,
    CorruptRecordError,
    DeliveryPolicy,
    FullGraph,
    GraphAppend,
    GraphReplace,
    GraphUnchanged,
    InvalidArgument,
    MergeKey,
    QueuedWorkClaimExpired,
    QueuedWorkDraft,
    RuntimeCommit,
    SessionExecutionLeaseExpired,
    SessionMeta,
    SessionNode,
    SlotPolicy,
    StoreInternalError,
    SubmitStatus,
    TaskStatus,
    TokenUsage,
    TurnbuckleError,
    TurnCommitStamp,
    UnsupportedSchemaVersion,
    UsageEntry,
    WorkState,
    turn_commit_hash,
)
from turnbuckle.adapters.sqlite import APPLICATION_ID, SCHEMA_VERSION
from turnbuckle.sansio.session import blob_ref
from turnbuckle.testing import FakeClock

from ..figures import record as record_figures
from ..reliability._shared import race_in_threads, reap
from ._session_children import TTL_MS, WAIT_S, Round, race_worker, store_url
from .factories import side_by_side
from .schemas import V1_DDL, V2_DDL, V3_DDL, schema, sql

# --- helpers ---------------------------------------------------------------------------------


def draft(session_id: str, text: str = "work", **changes: Any) -> QueuedWorkDraft:
    fields: dict[str, Any] = {
        "session_id": session_id,
        "delivery": DeliveryPolicy.EARLIEST_SAFE_BOUNDARY,
        "slot": SlotPolicy.EXCLUSIVE,
        "payloads": [{"text": text}],
        **changes,
    }
    return QueuedWorkDraft(**fields)


# --- the migration ---------------------------------------------------------------------------


def make_v1_file(path: Path) -> None:
    """A store file as the version-1 code left it (in WAL), holding one working task."""
    sql(
        path,
        "BEGIN IMMEDIATE",
        *V1_DDL,
        f"PRAGMA application_id = {APPLICATION_ID}",
        "PRAGMA user_version = 1",
        "UPDATE tb_meta SET value = value + 1 WHERE key = 'open_count'",
        "INSERT INTO tasks VALUES ('old-task', 'old-session', 'working', NULL,"
        " '2025-06-01T00:00:00.000Z', 1748736000000, '2025-06-01T00:00:00.000Z', 1748736000000,"
        " NULL, NULL, NULL, 'tools/call', '{\"n\":1}', NULL, NULL, 1)",
        "COMMIT",
        "PRAGMA journal_mode = WAL",
    )


async def use_sessions(store: turnbuckle.Store, session_id: str) -> int:
    """Enqueue, claim, commit, and load one session; the enqueue seq it got."""
    sessions = store.sessions
    batch = await sessions.enqueue(draft(session_id))
    lease = await sessions.try_claim_lease(session_id, "me", TTL_MS)
    assert lease is not None
    claim = await sessions.claim_queued_work(
        session_id, lease.fence(), "me", ClaimBoundary.IDLE, TTL_MS, 10
    )
    assert claim is not None and [b.batch_id for b in claim.batches] == [batch.batch_id]
    result = await sessions.bind(session_id).commit(
        RuntimeCommit(
            session_id=session_id,
            expected_head_revision=0,
            lease=lease.fence(),
            release=lease.fence(),
            graph=GraphAppend(nodes=[SessionNode(node_id="n1", payload="hi")]),
            completed_claims=[claim.completion()],
        )
    )
    assert result.head_revision == 1
    read = await sessions.bind(session_id).load()
    assert read is not None and [n.node_id for n in read.nodes] == ["n1"]
    assert await sessions.list_queued_work(session_id) == []
    return batch.enqueue_seq


async def test_a_version_1_file_is_upgraded_in_place(tmp_path: Path) -> None:
    assert SCHEMA_VERSION == 4
    path = tmp_path / "v1.db"
    make_v1_file(path)
    async with turnbuckle.open_store(store_url(path)) as store:
        task = await store.tasks.get_task("old-task")
        assert task is not None and task.status is TaskStatus.WORKING
        assert task.original_params == {"n": 1}
        assert await use_sessions(store, "s") == 1
        await store.tasks.update_task_status("old-task", TaskStatus.COMPLETED)
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert sql(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert sql(path, "PRAGMA integrity_check") == [("ok",)]
    # The upgraded file has exactly the schema (and counters) of a file made new.
    fresh = tmp_path / "fresh.db"
    async with turnbuckle.open_store(store_url(fresh)):
        pass
    assert schema(path) == schema(fresh)
    assert sql(path, "SELECT key FROM tb_meta ORDER BY key") == sql(
        fresh, "SELECT key FROM tb_meta ORDER BY key"
    )
    # And it opens again as a plain current-version file.
    async with turnbuckle.open_store(store_url(path)) as store:
        assert await use_sessions(store, "t") == 2
        done = await store.tasks.get_task("old-task")
        assert done is not None and done.status is TaskStatus.COMPLETED


def test_concurrent_opens_of_a_version_1_file_all_succeed(tmp_path: Path) -> None:
    path = tmp_path / "v1-race.db"
    make_v1_file(path)
    openers = 8

    async def open_and_use(n: int) -> int:
        async with turnbuckle.open_store(store_url(path)) as store:
            assert await store.tasks.get_task("old-task") is not None
            return (await store.sessions.enqueue(draft(f"s{n}"))).enqueue_seq

    outcomes = race_in_threads(openers, open_and_use)
    assert sorted(outcomes.values()) == list(range(1, openers + 1)), outcomes
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert sql(path, "PRAGMA integrity_check") == [("ok",)]


async def test_a_version_3_file_with_work_in_flight_is_upgraded_and_its_claims_are_void(
    tmp_path: Path,
) -> None:
    """A v3 file left by a runtime that died mid-turn: a held lease (expired now) and a batch
    under a claim that would live for hours. Upgraded to v4, the claim names no lease grant, so
    it is void under the next one: the work is claimed again at once, from the head, and the
    source key of the batch still dedups; deliveries and parking work on the upgraded file."""
    path = tmp_path / "v3.db"
    sql(
        path,
        "BEGIN IMMEDIATE",
        *V1_DDL,
        *V2_DDL,
        *V3_DDL,
        f"PRAGMA application_id = {APPLICATION_ID}",
        "PRAGMA user_version = 3",
        "UPDATE tb_meta SET value = 2 WHERE key = 'enqueue_seq'",
        "INSERT INTO session_leases VALUES ('s', 'dead', 'tok', 4, 1000, 2000)",
        "COMMIT",
    )
    conn = apsw.Connection(str(path))
    hours = 10 * 3_600_000
    for seq, name, key, claim in (
        (1, "a", "key-a", ("qwc:1:1", "dead", "claim-tok", 1, 1000, hours)),
        (2, "b", None, (None, None, None, 0, 0, 0)),
    ):
        items = json.dumps([[f"qwb:{name}:0", json.dumps({"text": name}, separators=(",", ":"))]])
        conn.execute(
            "INSERT INTO queued_work VALUES (?, ?, 's', ?, 'earliest_safe_boundary', 'exclusive',"
            " 'never', 0, 1000, ?, ?, ?, ?, ?, ?, ?)",
            (seq, f"qwb:{name}", key, items, *claim),
        )
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    async with turnbuckle.open_store(store_url(path)) as store:
        sessions = store.sessions
        listed = await sessions.list_queued_work("s")
        assert [(b.batch_id, b.failures, b.parked) for b in listed] == [
            ("qwb:a", 0, False),
            ("qwb:b", 0, False),
        ]
        assert [b.items[0].payload for b in listed] == [{"text": "a"}, {"text": "b"}]
        pending = await sessions.list_pending_queued_work("s")
        assert [b.batch_id for b in pending] == ["qwb:a", "qwb:b"], "the v3 claim holds nothing"
        lease = await sessions.try_claim_lease("s", "new", TTL_MS)
        assert lease is not None and lease.fencing_token == 5
        claim = await sessions.claim_queued_work(
            "s", lease.fence(), "new", ClaimBoundary.ACTIVE_TURN_CHECKPOINT, TTL_MS, 10
        )
        assert claim is not None and [b.batch_id for b in claim.batches] == ["qwb:a"]
        assert claim.fencing_token == 2
        again = await sessions.submit(draft("s", "a", source_key="key-a"))
        assert (again.batch_id, again.status) == ("qwb:a", SubmitStatus.DUPLICATE)
        result = await sessions.bind("s").commit(
            RuntimeCommit(
                session_id="s",
                lease=lease.fence(),
                completed_claims=[claim.completion()],
                outcome={"ok": True},
            )
        )
        status = await sessions.queued_work_status("s", "qwb:a")
        assert status is not None and status.state is WorkState.DELIVERED
        assert (status.outcome, status.head_revision) == ({"ok": True}, result.head_revision)
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert sql(path, "PRAGMA integrity_check") == [("ok",)]
    fresh = tmp_path / "fresh.db"
    async with turnbuckle.open_store(store_url(fresh)):
        pass
    assert schema(path) == schema(fresh)


@pytest.mark.parametrize("version", [99, SCHEMA_VERSION + 1, 0])
async def test_an_unsupported_schema_version_reports_both_versions(
    tmp_path: Path, version: int
) -> None:
    """lash: unsupported_schema_error_reports_real_versions. The file is left as found."""
    path = tmp_path / "odd.db"
    async with turnbuckle.open_store(store_url(path)) as store:
        await store.sessions.enqueue(draft("s"))
    sql(path, f"PRAGMA user_version = {version}")
    before = schema(path)
    with pytest.raises(UnsupportedSchemaVersion) as caught:
        async with turnbuckle.open_store(store_url(path)):
            pass
    assert (caught.value.expected, caught.value.found) == (SCHEMA_VERSION, version)
    words = str(caught.value).replace(str(path), "<path>").replace(",", " ").split()
    assert str(version) in words and str(SCHEMA_VERSION) in words, str(caught.value)
    assert schema(path) == before
    assert sql(path, "PRAGMA user_version") == [(version,)]


# --- lash finding 1: the head CAS across connections, and leases across handles --------------


def commit_for(session_id: str, fence: Any, **changes: Any) -> RuntimeCommit:
    fields: dict[str, Any] = {"session_id": session_id, "expected_head_revision": 0, "lease": fence}
    return RuntimeCommit(**{**fields, **changes})


async def test_a_stale_fence_cannot_commit_after_a_new_grant(tmp_path: Path) -> None:
    url = store_url(tmp_path / "fence.db")
    async with turnbuckle.open_store(url) as a, turnbuckle.open_store(url) as b:
        lease_a = await a.sessions.try_claim_lease("s", "A", TTL_MS)
        assert lease_a is not None
        assert await b.sessions.try_claim_lease("s", "B", TTL_MS) is None  # held
        await a.sessions.release_lease(lease_a.fence())
        lease_b = await b.sessions.try_claim_lease("s", "B", TTL_MS)
        assert lease_b is not None and lease_b.fencing_token == lease_a.fencing_token + 1
        with pytest.raises(SessionExecutionLeaseExpired):
            await a.sessions.bind("s").commit(commit_for("s", lease_a.fence()))
        # A stale release is a no-op: it never frees B's newer grant.
        await a.sessions.release_lease(lease_a.fence())
        result = await b.sessions.bind("s").commit(
            commit_for("s", lease_b.fence(), release=lease_b.fence())
        )
        assert result.head_revision == 1
        with pytest.raises(SessionExecutionLeaseExpired):
            await a.sessions.bind("s").commit(commit_for("s", lease_a.fence()))
        read = await a.sessions.bind("s").load()
        assert read is not None and read.head_revision == 1


ROUNDS = 8
CAS_FIGURES = (
    "Session head CAS and queue claims across connections: one winner, clean errors",
    "two racers at a barrier commit with expected_head_revision=0 (shared and own leases) or"
    " claim the same queued work; exactly one wins, the loser gets HeadRevisionConflict, a busy"
    " lease or nothing, never a raw driver error",
)


def race_rounds() -> list[Round]:
    kinds = ["cas-shared", "cas-own", "claim"]
    return [(kind, f"{kind}-{i}") for i in range(ROUNDS) for kind in kinds]


def check_races(
    path: Path, rounds: list[Round], results: list[tuple[Any, ...]], racers: int = 2
) -> None:
    crashes = [r for r in results if r[0] == "crash"]
    assert not crashes, crashes
    by_round: dict[int, list[tuple[Any, ...]]] = {}
    for status, round_no, worker, value in results:
        by_round.setdefault(round_no, []).append((status, worker, value))
    assert sorted(by_round) == list(range(len(rounds)))
    claims_by_round: dict[str, list[Any]] = {}
    for round_no, (kind, session_id) in enumerate(rounds):
        outcomes = by_round[round_no]
        assert len(outcomes) == racers, (kind, outcomes)
        if kind == "claim":
            # Each racer that got the lease claimed the batch (a later grant voids an earlier
            # grant's claim); the others found the lease busy.
            claims = [v for status, _, v in outcomes if status == "claimed"]
            assert claims and all(c is not None for c in claims), (session_id, outcomes)
            assert all(s in ("busy", "claimed") for s, _, _ in outcomes), (session_id, outcomes)
            assert len({c.fencing_token for c in claims}) == len(claims), "tokens never repeat"
            claims_by_round[session_id] = claims
            continue
        wins = [(w, v) for status, w, v in outcomes if status == "committed"]
        assert [v for _, v in wins] == [1], (session_id, outcomes)
        conflict = ("HeadRevisionConflict", {"expected": 0, "actual": 1})
        for loser_status, _, loser_value in [o for o in outcomes if o[0] != "committed"]:
            if kind == "cas-shared":
                # All held the same live fence: only the CAS stood between them, and it held.
                assert (loser_status, loser_value[:2]) == ("error", conflict), outcomes
            else:
                assert loser_status == "busy" or (
                    loser_status == "error"
                    and (
                        loser_value[:2] == conflict
                        or loser_value[0] == "SessionExecutionLeaseExpired"
                    )
                ), outcomes

    async def verify() -> None:
        async with turnbuckle.open_store(store_url(path)) as store:
            for kind, session_id in rounds:
                if kind == "claim":
                    assert await store.sessions.list_pending_queued_work(session_id) == []
                    continue
                read = await store.sessions.bind(session_id).load()
                assert read is not None and read.head_revision == 1, session_id
                assert len(read.nodes) == 1, read.nodes
            for session_id, claims in claims_by_round.items():
                # Exactly one claim holds the batch (the last grant's), from another handle too.
                live = []
                for claim in claims:
                    try:
                        renewed = await store.sessions.renew_queued_work_claim(claim, TTL_MS)
                    except QueuedWorkClaimExpired:
                        continue
                    assert renewed.claim_id == claim.claim_id
                    live.append(claim)
                assert len(live) == 1, (session_id, claims)
                assert live[0].fencing_token == max(c.fencing_token for c in claims)

    trio.run(verify)


def seed_races(path: Path, rounds: list[Round]) -> None:
    async def seed() -> None:
        async with turnbuckle.open_store(store_url(path)) as store:
            for kind, session_id in rounds:
                if kind == "claim":
                    await store.sessions.enqueue(draft(session_id))

    trio.run(seed)


def collect(results: Any, count: int) -> list[tuple[Any, ...]]:
    return [results.get(timeout=WAIT_S) for _ in range(count)]


def test_races_between_two_threads(tmp_path: Path) -> None:
    """lash: head_revision_cas_holds_across_two_connections and
    concurrent_claims_never_double_own_a_batch, each racer a thread with its own handle."""
    path = tmp_path / "threads.db"
    rounds = race_rounds()
    seed_races(path, rounds)
    barrier = threading.Barrier(2, timeout=WAIT_S)
    results: queue.Queue[tuple[Any, ...]] = queue.Queue()
    threads = [
        threading.Thread(target=race_worker, args=(str(path), n, barrier, results, rounds))
        for n in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    check_races(path, rounds, collect(results, 2 * len(rounds)))
    record_figures(
        *CAS_FIGURES, racers="2 threads", rounds=len(rounds), exactly_one_winner=True, raw_errors=0
    )


@pytest.mark.parametrize("racers", [2, 8])
def test_races_between_processes(tmp_path: Path, racers: int) -> None:
    """The same races, each racer a separate process (spawned: no connection crosses a fork),
    2 and then 8 of them."""
    path = tmp_path / "processes.db"
    rounds = race_rounds()
    seed_races(path, rounds)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(racers, timeout=WAIT_S)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=race_worker, args=(str(path), n, barrier, results, rounds))
        for n in range(racers)
    ]
    for proc in procs:
        proc.start()
    try:
        got = collect(results, racers * len(rounds))
    finally:
        reap(procs, results)
    assert [proc.exitcode for proc in procs] == [0] * racers
    check_races(path, rounds, got, racers)
    record_figures(
        *CAS_FIGURES,
        racers=f"{racers} processes",
        rounds=len(rounds),
        exactly_one_winner=True,
        raw_errors=0,
    )


# --- lash finding 2: a held batch is not claimed twice ----------------------------------------


async def test_a_held_batch_passes_only_to_the_next_lease_grant(tmp_path: Path) -> None:
    """lash: second_claim_on_held_batch_is_not_won, across two handles, with turnbuckle's order
    rule. While A's lease grant is the session's latest, A's claim holds the batch: nobody can
    claim or cancel it. Once B holds a newer grant, A's claim is void: B takes the batch at
    once, with a higher claim fencing token, and A can no longer renew or deliver it."""
    url = store_url(tmp_path / "claim.db")
    async with turnbuckle.open_store(url) as a, turnbuckle.open_store(url) as b:
        batch = await a.sessions.enqueue(draft("s"))
        lease_a = await a.sessions.try_claim_lease("s", "A", TTL_MS)
        assert lease_a is not None
        claim_a = await a.sessions.claim_queued_work(
            "s", lease_a.fence(), "A", ClaimBoundary.IDLE, TTL_MS, 10
        )
        assert claim_a is not None and len(claim_a.batches) == 1
        assert await b.sessions.try_claim_lease("s", "B", TTL_MS) is None
        assert await b.sessions.cancel_queued_work("s", batch.batch_id) is None
        await a.sessions.release_lease(lease_a.fence())
        assert await b.sessions.list_pending_queued_work("s") == [], "held until a new grant"
        renewed = await a.sessions.renew_queued_work_claim(claim_a, TTL_MS)
        assert renewed.claim_id == claim_a.claim_id
        lease_b = await b.sessions.try_claim_lease("s", "B", TTL_MS)
        assert lease_b is not None
        claim_b = await b.sessions.claim_queued_work_by_ids(
            "s", lease_b.fence(), "B", ClaimBoundary.IDLE, TTL_MS, [batch.batch_id]
        )
        assert claim_b is not None and claim_b.fencing_token == claim_a.fencing_token + 1
        with pytest.raises(turnbuckle.QueuedWorkClaimExpired):
            await a.sessions.renew_queued_work_claim(claim_a, TTL_MS)
        await a.sessions.abandon_queued_work_claim(claim_a)  # owns nothing: a no-op
        assert await a.sessions.cancel_queued_work("s", batch.batch_id) is None
        result = await b.sessions.bind("s").commit(
            commit_for(
                "s",
                lease_b.fence(),
                release=lease_b.fence(),
                completed_claims=[claim_b.completion()],
            )
        )
        assert result.head_revision == 1
        assert await a.sessions.list_queued_work("s") == []


# --- lash finding 3: a failure mid-transaction leaves the store usable ------------------------


@pytest.mark.parametrize("url", ["memory://", "sqlite"])
async def test_a_bug_mid_session_write_rolls_back_and_the_store_goes_on(
    tmp_path: Path, url: str
) -> None:
    if url == "sqlite":
        url = store_url(tmp_path / "bug.db")
    async with turnbuckle.open_store(url) as store:
        sessions = store.sessions

        def half_done(table: Any) -> None:
            table.put_meta("s", '{"session_id":"s"}')
            table.put_blob("sha256:x", b"x")
            raise RuntimeError("bug after a write")

        with pytest.raises(StoreInternalError) as caught:
            await sessions._run(half_done, writes=True)
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert await sessions.load_meta("s") is None
        assert await sessions._run(lambda t: t.blob_refs(), writes=False) == []

        # The same in a group of concurrent writes: only the buggy one fails.
        seqs: list[int] = []

        async def enqueue(n: int) -> None:
            seqs.append((await sessions.enqueue(draft("s", f"w{n}"))).enqueue_seq)

        async def buggy() -> None:
            with pytest.raises(StoreInternalError):
                await sessions._run(half_done, writes=True)

        async with anyio.create_task_group() as tg:
            for n in range(10):
                tg.start_soon(enqueue, n)
                if n == 5:
                    tg.start_soon(buggy)
        assert sorted(seqs) == list(range(1, 11))
        assert len(await sessions.list_queued_work("s")) == 10
        assert await sessions.load_meta("s") is None

        # A typed error raised half-way through a commit (after blobs and usage were written)
        # undoes all of it.
        lease = await sessions.try_claim_lease("s", "me", TTL_MS)
        assert lease is not None
        handle = sessions.bind("s")
        node = SessionNode(node_id="n1")
        await handle.commit(commit_for("s", lease.fence(), graph=GraphAppend(nodes=[node])))
        before = await handle.load()
        refs = await sessions._run(lambda t: t.blob_refs(), writes=False)
        with pytest.raises(InvalidArgument):
            await handle.commit(
                commit_for(
                    "s",
                    lease.fence(),
                    expected_head_revision=1,
                    graph=GraphAppend(nodes=[node]),  # n1 exists already
                    checkpoint=Checkpoint(tool_state=b"new"),
                    usage=[UsageEntry(source="x", model="m", usage=TokenUsage(input_tokens=1))],
                )
            )
        assert await handle.load() == before
        assert await sessions._run(lambda t: t.blob_refs(), writes=False) == refs
        await sessions.save_meta(SessionMeta(session_id="s", session_name="fine"))
        assert (await sessions.load_meta("s")) == SessionMeta(session_id="s", session_name="fine")


# --- lash finding 5: GC keeps live checkpoints and is conservative on damage -----------------


async def test_gc_keeps_live_checkpoint_blobs_and_survives_a_corrupt_manifest(
    tmp_path: Path,
) -> None:
    """lash: gc_keeps_live_committed_checkpoint_blobs, plus the corrupt-manifest case: GC
    deletes nothing, reports it, and raises nothing."""
    path = tmp_path / "gc.db"
    async with turnbuckle.open_store(store_url(path)) as store:
        sessions = store.sessions
        lease = await sessions.try_claim_lease("root", "me", TTL_MS)
        assert lease is not None
        checkpoint = Checkpoint(
            tool_state=b"tool-state-3",
            plugin_snapshot=b"{}",
            plugin_snapshot_revision=5,
            execution_state=bytes([0xDE, 0xAD, 0xBE, 0xEF]),
        )
        result = await sessions.bind("root").commit(
            commit_for("root", lease.fence(), checkpoint=checkpoint)
        )
        children = {blob_ref(b"tool-state-3"), blob_ref(b"{}"), blob_ref(b"\xde\xad\xbe\xef")}
        live = {result.checkpoint_ref, *children}
        sql(path, "INSERT INTO blobs (ref, content) VALUES ('sha256:orphan', x'6f7270')")

        report = await sessions.gc_unreachable()
        assert (report.root_count, report.deleted_blob_count, report.retained_blob_count) == (
            1,
            1,
            4,
        )
        assert {r for (r,) in sql(path, "SELECT ref FROM blobs")} == live
        read = await sessions.bind("root").load()
        assert read is not None and read.checkpoint == checkpoint

        # Damage the live manifest from outside; add another orphan.
        sql(
            path,
            f"UPDATE blobs SET content = x'ff00' WHERE ref = '{result.checkpoint_ref}'",
            "INSERT INTO blobs (ref, content) VALUES ('sha256:orphan-2', x'00')",
        )
        report = await sessions.gc_unreachable()
        assert (report.root_count, report.deleted_blob_count, report.retained_blob_count) == (
            1,
            0,
            5,
        )
        assert {r for (r,) in sql(path, "SELECT ref FROM blobs")} == {*live, "sha256:orphan-2"}
        with pytest.raises(CorruptRecordError):
            await sessions.bind("root").load()


# --- lash finding 6: concurrent first opens, with sessions -----------------------------------


def test_16_concurrent_first_opens_serve_sessions(tmp_path: Path) -> None:
    path = tmp_path / "first.db"
    openers = 16

    async def open_and_enqueue(n: int) -> int:
        async with turnbuckle.open_store(store_url(path)) as store:
            return (await store.sessions.enqueue(draft("s", f"opener-{n}"))).enqueue_seq

    outcomes = race_in_threads(openers, open_and_enqueue)
    assert sorted(outcomes.values()) == list(range(1, openers + 1)), outcomes
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


# --- store-wide facts the memory store has too -----------------------------------------------


async def test_enqueue_seq_is_never_reused(tmp_path: Path) -> None:
    """The enqueue order is store-wide and monotonic across handles and reopens, even after
    the last batches are deleted (a counter, not max + 1)."""
    url = store_url(tmp_path / "seq.db")
    async with turnbuckle.open_store(url) as a, turnbuckle.open_store(url) as b:
        assert (await a.sessions.enqueue(draft("s"))).enqueue_seq == 1
        second = await b.sessions.enqueue(draft("t"))
        assert second.enqueue_seq == 2
        assert await b.sessions.cancel_queued_work("t", second.batch_id) is not None
        assert (await a.sessions.enqueue(draft("t"))).enqueue_seq == 3
    async with turnbuckle.open_store(url) as store:
        for batch in await store.sessions.list_queued_work("t"):
            assert await store.sessions.cancel_queued_work("t", batch.batch_id) is not None
        assert (await store.sessions.enqueue(draft("u"))).enqueue_seq == 4
    async with turnbuckle.open_store("memory://") as memory:
        assert (await memory.sessions.enqueue(draft("s"))).enqueue_seq == 1
        second = await memory.sessions.enqueue(draft("t"))
        assert await memory.sessions.cancel_queued_work("t", second.batch_id) is not None
        assert (await memory.sessions.enqueue(draft("t"))).enqueue_seq == 3


async def test_everything_survives_a_reopen(tmp_path: Path) -> None:
    url = store_url(tmp_path / "reopen.db")
    clock = FakeClock()
    async with turnbuckle.open_store(url, clock=clock) as store:
        sessions = store.sessions
        lease = await sessions.try_claim_lease("s", "me", TTL_MS)
        assert lease is not None
        nodes = [
            SessionNode(node_id="a", payload={"k": [1, "é"]}),
            SessionNode(node_id="b", parent_node_id="a", timestamp="t"),
        ]
        commit = commit_for(
            "s",
            lease.fence(),
            release=lease.fence(),
            config={"model": "m"},
            agent_frames=[AgentFrame(frame_id="f", data=[1], execution_snapshot=b"\x00snap")],
            current_agent_frame_id="f",
            graph=GraphAppend(nodes=nodes),
            checkpoint=Checkpoint(turn_state={"x": 1}, tool_state=b"t"),
            usage=[UsageEntry(source="s", model="m", usage=TokenUsage(output_tokens=7))],
        )
        stamp = TurnCommitStamp(session_id="s", turn_id="t1", turn_commit_hash="h")
        commit = attrs.evolve(commit, turn_commit=stamp)
        result = await sessions.bind("s").commit(commit)
        before = await sessions.bind("s").load()
        await sessions.save_meta(SessionMeta(session_id="s", relation={"root": True}))
        await sessions.record_intent(
            AttachmentIntent(attachment_id="att", session_id="s", canonical_uri="u", intent_at_ms=1)
        )
    async with turnbuckle.open_store(url, clock=clock) as store:
        sessions = store.sessions
        assert await sessions.bind("s").load() == before
        assert await sessions.bind("s").load(ActivePath("a")) is not None
        assert (await sessions.load_meta("s")) == SessionMeta(
            session_id="s", relation={"root": True}
        )
        assert [e.attachment_id for e in await sessions.list_uncommitted(2)] == ["att"]
        # The fencing token continues where it was; the turn stamp replays.
        again = await sessions.try_claim_lease("s", "other", TTL_MS)
        assert again is not None and again.fencing_token == lease.fencing_token + 1
        assert await sessions.bind("s").commit(commit) == result


# --- differential: the SQLite store agrees with the memory store -----------------------------

SESSIONS = ["s1", "s2"]
NODE_IDS = ["n1", "n2", "n3"]

_session = st.sampled_from(SESSIONS)
#: Which handle to present: "latest" (this session's newest, the usual case), "none", or an
#: index into every handle seen so far (often stale, or another session's).
_pick = st.sampled_from(["latest", "latest", "latest", "none", 0, 1, 2])
_ttl = st.sampled_from([60_000, 60_000, 10, 0])
_boundary = st.sampled_from([ClaimBoundary.IDLE, ClaimBoundary.IDLE, *ClaimBoundary])

_lease = st.tuples(st.just("lease"), _session, st.sampled_from(["o1", "o2"]), _ttl)
_enqueue = st.tuples(
    st.just("enqueue"),
    _session,
    st.sampled_from(list(DeliveryPolicy)),
    st.sampled_from(list(SlotPolicy)),
    st.sampled_from([None, None, "k1", "k2"]),
    st.sampled_from([MergeKey.NEVER, MergeKey.PAYLOAD_DEFAULT, MergeKey.group("g")]),
    st.sampled_from([0, 0, 20]),
    st.integers(0, 2),
)
_claim = st.tuples(st.just("claim"), _session, _pick, _boundary, _ttl, st.sampled_from([1, 3, 0]))
_commit = st.tuples(
    st.just("commit"),
    _session,
    _pick,
    st.sampled_from(["current", "current", None, 0, 1, 3]),
    st.sampled_from(["unchanged", "append", "append", "replace"]),
    st.lists(st.sampled_from(NODE_IDS), max_size=3),
    st.sampled_from([None, b"", b"a", b"b"]),
    st.lists(_pick, max_size=2),
    st.lists(st.sampled_from(["a1", "a2"]), max_size=2),
    st.sampled_from([None, None, "t1", "t2"]),
    st.booleans(),
    st.sampled_from([False, False, False, True]),
)

operations = st.lists(
    st.one_of(
        _lease,
        _lease,
        st.tuples(st.just("renew"), _session, _pick, _ttl),
        st.tuples(st.just("release"), _session, _pick),
        _enqueue,
        _enqueue,
        _claim,
        _claim,
        st.tuples(
            st.just("claim_ids"),
            _session,
            _pick,
            _boundary,
            st.lists(st.integers(0, 5), max_size=2),
        ),
        st.tuples(st.just("renew_claim"), _session, _pick, _ttl),
        st.tuples(st.just("abandon"), _session, _pick),
        st.tuples(st.just("cancel"), _session, st.integers(0, 5)),
        st.tuples(st.just("list"), _session, st.booleans()),
        _commit,
        _commit,
        st.tuples(st.just("turn"), _session, st.sampled_from(["o1", "o2"]), _commit),
        st.tuples(st.just("turn"), _session, st.sampled_from(["o1", "o2"]), _commit),
        st.tuples(st.just("load"), _session, st.sampled_from([None, "n1", "n2", "leaf"])),
        st.tuples(st.just("load_node"), _session, st.sampled_from(NODE_IDS)),
        st.tuples(st.just("tombstone"), _session, st.lists(st.sampled_from(NODE_IDS), max_size=2)),
        st.tuples(st.just("vacuum")),
        st.tuples(st.just("gc")),
        st.tuples(st.just("meta"), _session, st.sampled_from(["", "x"])),
        st.tuples(st.just("load_meta"), _session),
        st.tuples(st.just("intent"), st.sampled_from(["a1", "a2"]), _session, st.integers(0, 50)),
        st.tuples(st.just("commit_refs"), _session, st.lists(st.sampled_from(["a1", "a2"]))),
        st.tuples(st.just("uncommitted"), st.integers(0, 100)),
        st.tuples(st.just("forget"), st.sampled_from(["a1", "a2"])),
        st.tuples(st.just("tick"), st.sampled_from([1, 15, 2000])),
    ),
    min_size=15,
    max_size=50,
)


class Driver:
    """Applies operations to one store, keeping the handles (fences, claims, batch ids) its
    own earlier answers gave, so that stale handles get presented too."""

    def __init__(self, store: turnbuckle.Store, clock: FakeClock) -> None:
        self.store = store
        self.clock = clock
        self.fences: list[Any] = []
        self.claims: list[Any] = []
        self.batch_ids: list[str] = []
        self.revisions: dict[str, int] = {}

    @staticmethod
    def pick(items: list[Any], session: str, choice: str | int) -> Any:
        if choice == "none":
            return None
        if choice == "latest":
            mine = [item for item in items if item.session_id == session]
            return mine[-1] if mine else None
        assert isinstance(choice, int)
        return items[choice % len(items)] if items else None

    async def apply(self, op: tuple[Any, ...]) -> Any:
        sessions = self.store.sessions
        kind, *args = op
        if kind == "lease":
            lease = await sessions.try_claim_lease(*args)
            if lease is not None:
                self.fences.append(lease.fence())
            return lease
        if kind in ("renew", "release"):
            fence = self.pick(self.fences, args[0], args[1])
            if fence is None:
                return None
            if kind == "renew":
                return await sessions.renew_lease(fence, args[2])
            return await sessions.release_lease(fence)
        if kind == "enqueue":
            session, delivery, slot, source_key, merge_key, available, payload = args
            batch = await sessions.enqueue(
                QueuedWorkDraft(
                    session_id=session,
                    delivery=delivery,
                    slot=slot,
                    payloads=[payload, {"p": payload}],
                    source_key=source_key,
                    merge_key=merge_key,
                    available_at_ms=self.clock.now_ms() + available,
                )
            )
            self.batch_ids.append(batch.batch_id)
            return batch
        if kind in ("claim", "claim_ids"):
            session, choice, boundary, *rest = args
            fence = self.pick(self.fences, session, choice)
            if fence is None:
                return None
            if kind == "claim":
                ttl, most = rest
                claim = await sessions.claim_queued_work(session, fence, "w", boundary, ttl, most)
            else:
                ids = [self.batch_ids[i % len(self.batch_ids)] for i in rest[0] if self.batch_ids]
                claim = await sessions.claim_queued_work_by_ids(
                    session, fence, "w", boundary, 60_000, ids
                )
            if claim is not None:
                self.claims.append(claim)
            return claim
        if kind in ("renew_claim", "abandon"):
            claim = self.pick(self.claims, args[0], args[1])
            if claim is None:
                return None
            if kind == "renew_claim":
                return await sessions.renew_queued_work_claim(claim, args[2])
            return await sessions.abandon_queued_work_claim(claim)
        if kind == "cancel":
            if not self.batch_ids:
                return None
            batch_id = self.batch_ids[args[1] % len(self.batch_ids)]
            return await sessions.cancel_queued_work(args[0], batch_id)
        if kind == "list":
            if args[1]:
                return await sessions.list_pending_queued_work(args[0])
            return await sessions.list_queued_work(args[0])
        if kind == "commit":
            return await self.commit(*args)
        if kind == "turn":
            # A whole turn: take the lease, claim ready work, commit it (with the random parts
            # of the commit op), and release.
            session, owner, commit_op = args
            _, _, _, _, graph_kind, node_ids, blob, _, attachment_ids, turn_id, _, _ = commit_op
            answers = [await self.apply(("lease", session, owner, 60_000))]
            answers.append(
                await self.apply(("claim", session, "latest", ClaimBoundary.IDLE, 60_000, 3))
            )
            answers.append(
                await self.commit(
                    session,
                    "latest",
                    "current",
                    graph_kind,
                    node_ids,
                    blob,
                    ["latest"],
                    attachment_ids,
                    turn_id,
                    True,
                    False,
                )
            )
            return answers
        if kind == "load":
            leaf = args[1]
            scope = FullGraph() if leaf is None else ActivePath(None if leaf == "leaf" else leaf)
            return await sessions.bind(args[0]).load(scope)
        if kind == "load_node":
            return await sessions.bind(args[0]).load_node(args[1])
        if kind == "tombstone":
            return await sessions.bind(args[0]).tombstone_nodes(args[1])
        if kind == "vacuum":
            return await sessions.vacuum()
        if kind == "gc":
            return await sessions.gc_unreachable()
        if kind == "meta":
            return await sessions.save_meta(SessionMeta(session_id=args[0], session_name=args[1]))
        if kind == "load_meta":
            return await sessions.load_meta(args[0])
        if kind == "intent":
            attachment_id, session, ago = args
            intent = AttachmentIntent(
                attachment_id=attachment_id,
                session_id=session,
                canonical_uri=f"file:///{attachment_id}",
                intent_at_ms=self.clock.now_ms() - ago,
            )
            return await sessions.record_intent(intent)
        if kind == "commit_refs":
            return await sessions.commit_refs(args[0], args[1])
        if kind == "uncommitted":
            return await sessions.list_uncommitted(self.clock.now_ms() - args[0])
        if kind == "forget":
            return await sessions.forget(args[0])
        if kind == "tick":
            self.clock.advance(args[0])
            return None
        raise AssertionError(op)

    async def commit(
        self,
        session: str,
        choice: str | int,
        expected: str | int | None,
        graph_kind: str,
        node_ids: list[str],
        blob: bytes | None,
        claim_choices: list[str | int],
        attachment_ids: list[str],
        turn_id: str | None,
        release: bool,
        bogus_hash: bool,
    ) -> Any:
        fence = self.pick(self.fences, session, choice)
        nodes = [SessionNode(node_id=n, payload=n) for n in node_ids]
        graph: Any = GraphUnchanged()
        if graph_kind == "append":
            graph = GraphAppend(nodes=nodes)
        elif graph_kind == "replace":
            graph = GraphReplace(nodes=nodes)
        claims = [self.pick(self.claims, session, c) for c in claim_choices]
        commit = RuntimeCommit(
            session_id=session,
            expected_head_revision=self.revisions.get(session, 0)
            if expected == "current"
            else expected,
            lease=fence,
            release=fence if release else None,
            graph=graph,
            checkpoint=Checkpoint(tool_state=blob, turn_state=len(node_ids)),
            usage=[UsageEntry(source="s", model="m", usage=TokenUsage(input_tokens=len(nodes)))],
            completed_claims=[
                c.completion() for c in claims if c is not None and c.session_id == session
            ],
            committed_attachment_ids=attachment_ids,
        )
        if turn_id is not None:
            digest = "bogus" if bogus_hash else turn_commit_hash(commit)
            stamp = TurnCommitStamp(session_id=session, turn_id=turn_id, turn_commit_hash=digest)
            commit = attrs.evolve(commit, turn_commit=stamp)
        result = await self.store.sessions.bind(session).commit(commit)
        self.revisions[session] = result.head_revision
        return result

    async def outcome(self, op: tuple[Any, ...]) -> Any:
        try:
            return ("ok", await self.apply(op))
        except TurnbuckleError as exc:
            return ("error", exc)

    async def everything(self) -> Any:
        sessions = self.store.sessions
        state = []
        for session in SESSIONS:
            state.append(await sessions.list_queued_work(session))
            state.append(await sessions.bind(session).load())
            state.append(await sessions.load_meta(session))
            state.append(await sessions._run(lambda t, s=session: t.nodes(s), writes=False))
            state.append(await sessions._run(lambda t, s=session: t.lease(s), writes=False))
        state.append(await sessions.list_uncommitted(1 << 62))
        state.append(await sessions._run(lambda t: t.blob_refs(), writes=False))
        return state


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=operations)
async def test_sessions_agree_with_the_memory_store(
    tmp_path: Path, ops: list[tuple[Any, ...]]
) -> None:
    async with side_by_side(tmp_path) as (stores, clocks):
        drivers = [Driver(store, clock) for store, clock in zip(stores, clocks, strict=True)]
        for op in ops:
            results = [await driver.outcome(op) for driver in drivers]
            assert results[0] == results[1], op
        assert await drivers[0].everything() == await drivers[1].everything()
