"""A seeded, deterministic simulation of many clients sharing one memory store.

Theory of operation
-------------------

This is the pure tier of the simulation (style anchors 10.5): the interleaving is chosen by a
``random.Random(seed)``, never by trio. The whole run happens inside one ``trio.run``, but the
driver awaits exactly one store operation at a time, so trio has nothing to reorder.

Actors:

- *session clients* take a session's execution lease, enqueue queued work (unique source keys),
  claim it under their lease and commit its completion (sometimes with a turn stamp, sometimes
  releasing the lease in the same commit), fail it (a failed turn: at the second failure a batch
  is parked) and unpark it, renew and release; they stall (their lease and claim run out) and
  crash (drop their lease and claim and come back as a new owner);
- *task clients* create MCP tasks and move them through random (legal and illegal)
  transitions, complete, fail and cancel them;
- *execution workers* create executions, claim and reclaim them, renew, complete and fail
  (transient, so they are retried), and stall past their lease so another worker reclaims.

The seed also picks the fault plan (probabilities per kind, some kinds off), injected only at the
store boundary and the clock (:data:`FAULT_KINDS`):

``fail_before_apply``
    the operation is not called; the client sees ``StoreBusyError``;
``reply_lost``
    the operation runs, its reply (or error) is lost; the client reconciles by reading the store
    (or by a retry that is idempotent by design: lease re-entry, turn-stamp replay);
``duplicate_reply``
    an acknowledged enqueue, commit, execution completion or failure, or task ending is sent
    again: it must be refused or be an idempotent replay;
``crash``
    the actor drops its in-memory state and restarts under a new identity;
``clock_jump``
    the clock jumps past every lease and claim ttl;
``storage_full``
    a write fails before it applies with ``StorageFullError``.

A model of acknowledged effects is checked against the store's public read API after every step
(see :class:`_Sim` ``_check``); a violation is reported, never raised. Each step adds one line to
the trace (step, actor, operation, outcome; no wall-clock time, no store-made id), and the report
carries the SHA-256 of the trace: the same seed gives the same hash, byte for byte.

Run it as ``python -m turnbuckle.testing.sim --seed N --steps M [--trace]``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Final, TypeVar

import attrs
import trio

from turnbuckle.adapters.store import Store, open_store
from turnbuckle.errors import (
    ExecutionNotFound,
    ExecutionTerminal,
    InvalidTransition,
    LeaseConflict,
    LeaseExpired,
    QueuedWorkClaimExpired,
    SessionExecutionLeaseExpired,
    StorageFullError,
    StoreBusyError,
    StoreInternalError,
    TerminalState,
    TurnbuckleError,
)
from turnbuckle.sansio.codec import JSON
from turnbuckle.sansio.execution import ExecutionState, FailureClass, Handle, RetryPolicy
from turnbuckle.sansio.lease import SessionLease
from turnbuckle.sansio.queue import (
    ClaimBoundary,
    DeliveryPolicy,
    QueuedWorkClaim,
    QueuedWorkDraft,
    SlotPolicy,
)
from turnbuckle.sansio.session import (
    Checkpoint,
    CommitResult,
    RuntimeCommit,
    TurnCommitStamp,
    turn_commit_hash,
)
from turnbuckle.sansio.task import TRANSITIONS, TaskRecord, TaskRpcError, TaskStatus, TaskSuccess
from turnbuckle.testing.fakes import FakeClock, SeededIds

__all__ = ["FAULT_KINDS", "SimulationReport", "main", "run_simulation", "simulate"]

T = TypeVar("T")

#: The kinds of fault the simulator injects, in the order reports list them.
FAULT_KINDS: Final = (
    "fail_before_apply",
    "reply_lost",
    "duplicate_reply",
    "crash",
    "clock_jump",
    "storage_full",
)

_SESSIONS: Final = ("s0", "s1", "s2")
_LANE: Final = "sim"
_SESSION_CLIENTS: Final = 4
_TASK_CLIENTS: Final = 2
_WORKERS: Final = 3
#: Longest ttl any actor asks for; a clock jump goes past it.
_MAX_TTL_MS: Final = 3000
#: Terminal tasks and executions cannot change, so every step re-reads only live ones, and a
#: full sweep re-reads everything this often (and at the end).
_SWEEP_EVERY: Final = 25
_MAX_VIOLATIONS: Final = 100
_RETRY: Final = RetryPolicy(max_attempts=3, base_backoff_ms=50, max_backoff_ms=400)


@attrs.frozen(kw_only=True)
class SimulationReport:
    """The outcome of one simulation run (read-only: mappings are views, sequences tuples)."""

    seed: int
    steps: int
    #: SHA-256 (hex) of the trace lines joined by newlines.
    trace_hash: str
    #: Faults injected, per kind of :data:`FAULT_KINDS`.
    faults: Mapping[str, int]
    #: Invariant violations, each prefixed with its step; empty when the store held up.
    violations: tuple[str, ...]
    #: Acknowledged operations, per kind (enqueue, commit, lease_grant, ...).
    acknowledged: Mapping[str, int]
    trace: tuple[str, ...] = attrs.field(repr=False)

    @property
    def ok(self) -> bool:
        return not self.violations

    def replay_command(self) -> str:
        """The command line that replays this run."""
        return f"python -m turnbuckle.testing.sim --seed {self.seed} --steps {self.steps} --trace"

    def format(self) -> str:
        """A human-readable summary (deterministic)."""
        lines = [
            f"seed={self.seed} steps={self.steps} trace_hash={self.trace_hash}",
            "faults: " + " ".join(f"{k}={v}" for k, v in self.faults.items()),
            "acknowledged: " + " ".join(f"{k}={v}" for k, v in self.acknowledged.items()),
            f"violations: {len(self.violations)}",
            *(f"  {v}" for v in self.violations),
        ]
        if self.violations:
            lines.append(f"replay: {self.replay_command()}")
        return "\n".join(lines)


class _ReplyLost(Exception):
    """Internal: the operation ran but its reply (or error) never reached the client."""


@attrs.define
class _FaultPlan:
    before: float
    lost: float
    duplicate: float
    crash: float
    jump: float
    full: float

    @classmethod
    def pick(cls, rng: random.Random) -> _FaultPlan:
        def p(high: float) -> float:
            # VOPR style: a kind is sometimes off entirely, else some rate up to ``high``.
            return 0.0 if rng.random() < 0.15 else rng.uniform(high / 10, high)

        return cls(
            before=p(0.08),
            lost=p(0.08),
            duplicate=p(0.3),
            crash=p(0.03),
            jump=p(0.02),
            full=p(0.05),
        )


# --- the model of acknowledged effects -------------------------------------------------------


@attrs.define
class _Grant:
    owner_id: str
    lease_token: str
    fencing_token: int
    expires_at_ms: int
    released: bool = False


@attrs.define
class _BatchModel:
    alias: str
    source_key: str
    seq: int
    #: The token of the latest claim on it (a later claim voids every earlier one).
    claim_token: str | None = None
    delivered_by: str | None = None
    failures: int = 0
    parked: bool = False


@attrs.define
class _SessionModel:
    grant: _Grant | None = None
    max_fencing: int = 0
    commits: int = 0
    batches: dict[str, _BatchModel] = attrs.Factory(dict)


@attrs.define
class _ExecutionModel:
    alias: str
    #: Lease expiry per epoch granted (as the model saw the grants).
    expiry: dict[int, int] = attrs.Factory(dict)
    max_epoch: int = 0
    store_epoch: int = 0
    completed: JSON = None
    terminal: bool = False


@attrs.define
class _TaskModel:
    alias: str
    history: list[TaskStatus]
    ended: TaskStatus | None = None


# --- actors ----------------------------------------------------------------------------------


@attrs.define
class _SessionClient:
    name: str
    incarnation: int = 0
    lease: SessionLease | None = None
    claim: QueuedWorkClaim | None = None
    #: The fencing token of the lease grant ``claim`` was taken under.
    claim_grant: int = 0
    #: Older claims it still remembers, with their grants (a turn that claimed again, or
    #: abandoned one).
    stale: list[tuple[QueuedWorkClaim, int]] = attrs.Factory(list)
    stalled_until: int = -1

    @property
    def owner_id(self) -> str:
        return f"{self.name}.{self.incarnation}"


@attrs.define
class _TaskClient:
    name: str
    incarnation: int = 0
    stalled_until: int = -1


@attrs.define
class _Worker:
    name: str
    incarnation: int = 0
    handles: list[Handle] = attrs.Factory(list)
    stalled_until: int = -1

    @property
    def worker_id(self) -> str:
        return f"{self.name}.{self.incarnation}"


_Actor = _SessionClient | _TaskClient | _Worker


def _err(exc: BaseException) -> str:
    return type(exc).__name__


class _Sim:
    def __init__(self, seed: int, store: Store, clock: FakeClock, rng: random.Random) -> None:
        self.seed = seed
        self.store = store
        self.clock = clock
        self.rng = rng
        self.plan = _FaultPlan.pick(rng)
        self.step = 0
        self.trace: list[str] = []
        self.violations: list[str] = []
        self.faults: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self.acked: dict[str, int] = {}
        self.sessions: dict[str, _SessionModel] = {sid: _SessionModel() for sid in _SESSIONS}
        self.executions: dict[str, _ExecutionModel] = {}
        self.tasks: dict[str, _TaskModel] = {}
        self.burned_keys: list[str] = []
        self.burned_executions: list[str] = []
        self.counter = 0
        self.actors: list[_Actor] = [
            *(_SessionClient(f"sc{i}") for i in range(_SESSION_CLIENTS)),
            *(_TaskClient(f"tc{i}") for i in range(_TASK_CLIENTS)),
            *(_Worker(f"w{i}") for i in range(_WORKERS)),
        ]

    # --- bookkeeping ---

    def now(self) -> int:
        return self.clock.now_ms()

    def next_n(self) -> int:
        self.counter += 1
        return self.counter

    def ack(self, kind: str) -> None:
        self.acked[kind] = self.acked.get(kind, 0) + 1

    def violate(self, message: str) -> None:
        if len(self.violations) < _MAX_VIOLATIONS:
            self.violations.append(f"step {self.step}: {message}")

    def fault(self, kind: str) -> None:
        self.faults[kind] += 1

    async def call(self, fn: Callable[[], Awaitable[T]], *, write: bool = True) -> T:
        """One operation through the faulty boundary: it may fail before applying, or apply and
        lose its reply (``_ReplyLost``)."""
        rng, plan = self.rng, self.plan
        if write and rng.random() < plan.full:
            self.fault("storage_full")
            raise StorageFullError("memory://")
        if rng.random() < plan.before:
            self.fault("fail_before_apply")
            raise StoreBusyError("memory://", 0.0)
        if rng.random() < plan.lost:
            self.fault("reply_lost")
            try:
                await fn()
            except TurnbuckleError as exc:
                self.unexpected(exc)
            raise _ReplyLost
        return await fn()

    def unexpected(self, exc: BaseException) -> None:
        if isinstance(exc, StoreInternalError) or not isinstance(exc, TurnbuckleError):
            self.violate(f"unexpected error {exc!r}")

    def duplicate(self) -> bool:
        if self.rng.random() < self.plan.duplicate:
            self.fault("duplicate_reply")
            return True
        return False

    # --- the loop ---

    async def run(self, steps: int) -> None:
        rng = self.rng
        for step in range(steps):
            self.step = step
            self.clock.advance(rng.randint(0, 80))
            if rng.random() < self.plan.jump:
                self.fault("clock_jump")
                self.clock.advance(_MAX_TTL_MS + rng.randint(1, 1000))
                self.trace.append(f"{step} clock jump")
            actor = rng.choice(self.actors)
            if actor.stalled_until > step:
                line = "stalled"
            elif rng.random() < self.plan.crash:
                self.fault("crash")
                line = self.crash(actor)
            else:
                try:
                    line = await self.act(actor)
                except (StorageFullError, StoreBusyError) as exc:
                    line = f"fault {_err(exc)}"
                except TurnbuckleError as exc:
                    self.violate(f"unexpected error {exc!r}")
                    line = f"error {_err(exc)}"
            self.trace.append(f"{step} {actor.name} {line}")
            await self.check(full=step % _SWEEP_EVERY == _SWEEP_EVERY - 1)
        await self.check(full=True)

    def crash(self, actor: _Actor) -> str:
        actor.incarnation += 1
        if isinstance(actor, _SessionClient):
            actor.lease = actor.claim = None
            actor.stale = []
        elif isinstance(actor, _Worker):
            actor.handles = []
        return f"crash -> incarnation {actor.incarnation}"

    async def act(self, actor: _Actor) -> str:
        if isinstance(actor, _SessionClient):
            return await self.act_session(actor)
        if isinstance(actor, _Worker):
            return await self.act_worker(actor)
        return await self.act_tasks(actor)

    def stall(self, actor: _Actor) -> str:
        actor.stalled_until = self.step + self.rng.randint(5, 40)
        return f"stall until {actor.stalled_until}"

    # --- session clients ---

    async def act_session(self, c: _SessionClient) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.25:
            return await self.enqueue(c, rng.choice(_SESSIONS))
        if r < 0.3:
            return self.stall(c)
        if c.lease is None:
            if c.stale and rng.random() < 0.7:
                # Back to the session it held a claim in (a zombie that woke up).
                return await self.claim_lease(c, c.stale[-1][0].session_id)
            return await self.claim_lease(c, rng.choice(_SESSIONS))
        if r < 0.4:
            return await self.renew_lease(c)
        if r < 0.45:
            return await self.release_lease(c)
        if c.claim is None:
            sid = c.lease.session_id
            if r < 0.5:
                unparked = await self.unpark(sid)
                if unparked is not None:
                    return unparked
            if r < 0.6 and c.stale and c.stale[-1][0].session_id == sid:
                return "zombie: " + await self.commit(c)  # delivers a claim it kept
            return await self.claim_work(c)
        r = rng.random()
        if r < 0.1:
            return await self.abandon(c)
        if r < 0.2:
            self.remember(c, c.claim, c.claim_grant)  # claims again, remembering the old claim
            c.claim = None
            return "claim again: " + await self.claim_work(c)
        if r < 0.3:
            return await self.fail_work(c)
        return await self.commit(c)

    def remember(self, c: _SessionClient, claim: QueuedWorkClaim, grant: int) -> None:
        c.stale = [*c.stale[-1:], (claim, grant)]

    async def abandon(self, c: _SessionClient) -> str:
        assert c.claim is not None
        claim, sessions = c.claim, self.store.sessions
        c.claim = None
        try:
            await self.call(lambda: sessions.abandon_queued_work_claim(claim))
        except _ReplyLost:
            await sessions.abandon_queued_work_claim(claim)  # idempotent
        model = self.sessions[claim.session_id]
        for b in claim.batches:
            bm = model.batches.get(b.batch_id)
            if bm is not None and bm.claim_token == claim.lease_token:
                bm.claim_token = None
        self.remember(c, claim, c.claim_grant)
        self.ack("work_abandon")
        return f"abandon {claim.session_id} ok"

    async def fail_work(self, c: _SessionClient) -> str:
        """A failed turn hands its claim back; a batch's second failure parks it."""
        assert c.claim is not None
        claim, sessions = c.claim, self.store.sessions
        c.claim = None
        try:
            parked = await self.call(lambda: sessions.fail_queued_work(claim, "sim failure", 2))
            tag = ""
        except _ReplyLost:
            # It applied (the reply is what was lost) and gave the claim up: a retry owns
            # nothing and changes nothing.
            parked, tag = await sessions.fail_queued_work(claim, "sim failure", 2), "lost, "
            if parked:
                self.violate(f"{claim.session_id}: a repeated fail parked work again")
        model = self.sessions[claim.session_id]
        expect_parked = []
        for b in claim.batches:
            bm = model.batches.get(b.batch_id)
            if bm is None or bm.claim_token != claim.lease_token:
                continue
            bm.claim_token = None
            bm.failures += 1
            if bm.failures >= 2:
                bm.parked = True
                expect_parked.append(b.batch_id)
        if not tag and [b.batch_id for b in parked] != expect_parked:
            self.violate(f"{claim.session_id}: fail parked {len(parked)}, model {expect_parked}")
        self.ack("work_fail")
        return f"fail {claim.session_id} {tag}ok parked={len(expect_parked)}"

    async def unpark(self, sid: str) -> str | None:
        model = self.sessions[sid]
        parked = [(bm.seq, bid) for bid, bm in model.batches.items() if bm.parked]
        if not parked:
            return None
        _, bid = min(parked)
        sessions = self.store.sessions
        try:
            back = await self.call(lambda: sessions.unpark_queued_work(sid, bid))
            tag = ""
        except _ReplyLost:
            back, tag = await sessions.unpark_queued_work(sid, bid), "lost, "  # now not parked
            if back is not None:
                self.violate(f"{sid}: a repeated unpark found the batch parked again")
        if not tag and back is None:
            self.violate(f"{sid}: unpark of {model.batches[bid].alias} found nothing parked")
        bm = model.batches[bid]
        bm.parked, bm.failures = False, 0
        self.ack("work_unpark")
        return f"unpark {sid} {bm.alias} {tag}ok"

    def lease_live(self, sid: str) -> _Grant | None:
        g = self.sessions[sid].grant
        if g is None or g.released or self.now() >= g.expires_at_ms:
            return None
        return g

    def note_grant(self, sid: str, lease: SessionLease, op: str) -> None:
        model = self.sessions[sid]
        live = self.lease_live(sid)
        if live is not None and live.lease_token == lease.lease_token:
            if lease.fencing_token != live.fencing_token or lease.owner_id != live.owner_id:
                self.violate(f"{sid}: re-entry changed the grant ({op})")
            live.expires_at_ms = max(live.expires_at_ms, lease.expires_at_ms)
            return
        if live is not None:
            self.violate(
                f"{sid}: lease granted to {lease.owner_id} while {live.owner_id} holds it live"
            )
        if lease.fencing_token <= model.max_fencing:
            self.violate(
                f"{sid}: fencing token {lease.fencing_token} does not grow "
                f"(seen {model.max_fencing})"
            )
        model.max_fencing = max(model.max_fencing, lease.fencing_token)
        model.grant = _Grant(
            owner_id=lease.owner_id,
            lease_token=lease.lease_token,
            fencing_token=lease.fencing_token,
            expires_at_ms=lease.expires_at_ms,
        )
        self.ack("lease_grant")

    def check_fenced(self, lease: SessionLease, op: str) -> None:
        """An acknowledged fenced write: the model must agree the fence was live."""
        live = self.lease_live(lease.session_id)
        if (
            live is None
            or live.lease_token != lease.lease_token
            or live.fencing_token != lease.fencing_token
        ):
            self.violate(
                f"{lease.session_id}: {op} accepted a fence that is not live "
                f"(fencing {lease.fencing_token} of {lease.owner_id})"
            )

    def check_refused(self, lease: SessionLease, op: str) -> None:
        live = self.lease_live(lease.session_id)
        if live is not None and live.lease_token == lease.lease_token:
            self.violate(f"{lease.session_id}: {op} refused a live fence")

    async def claim_lease(self, c: _SessionClient, sid: str) -> str:
        ttl = self.rng.randint(300, 1500)
        sessions = self.store.sessions
        try:
            got = await self.call(lambda: sessions.try_claim_lease(sid, c.owner_id, ttl))
            tag = ""
        except _ReplyLost:
            # Reconcile: the same owner re-enters its own live grant, if the lost one applied.
            got = await sessions.try_claim_lease(sid, c.owner_id, ttl)
            tag = "lost, re-entered: "
        if got is None:
            live = self.lease_live(sid)
            if live is None:
                self.violate(f"{sid}: lease refused to {c.owner_id} although nobody holds it")
            return f"claim_lease {sid} {tag}refused"
        self.note_grant(sid, got, "claim")
        c.lease = got
        if c.claim is not None and c.claim.session_id != sid:
            self.remember(c, c.claim, c.claim_grant)
            c.claim = None
        return f"claim_lease {sid} {tag}granted fencing={got.fencing_token}"

    async def renew_lease(self, c: _SessionClient) -> str:
        assert c.lease is not None
        lease, ttl = c.lease, self.rng.randint(300, 1500)
        sessions = self.store.sessions
        try:
            try:
                got = await self.call(lambda: sessions.renew_lease(lease.fence(), ttl))
            except _ReplyLost:
                got = await sessions.renew_lease(lease.fence(), ttl)
        except SessionExecutionLeaseExpired:
            self.check_refused(lease, "renew")
            if c.claim is not None:  # a zombie keeps its claim, and may try to deliver it
                self.remember(c, c.claim, c.claim_grant)
            c.lease = c.claim = None
            return f"renew_lease {lease.session_id} expired"
        self.check_fenced(lease, "renew")
        live = self.lease_live(lease.session_id)
        if live is not None:
            live.expires_at_ms = max(live.expires_at_ms, got.expires_at_ms)
        c.lease = got
        self.ack("lease_renew")
        return f"renew_lease {lease.session_id} ok"

    async def release_lease(self, c: _SessionClient) -> str:
        assert c.lease is not None
        lease = c.lease
        sessions = self.store.sessions
        try:
            await self.call(lambda: sessions.release_lease(lease.fence()))
        except _ReplyLost:
            await sessions.release_lease(lease.fence())  # idempotent
        self.note_release(lease)
        c.lease = c.claim = None
        self.ack("lease_release")
        return f"release_lease {lease.session_id} ok"

    def note_release(self, lease: SessionLease) -> None:
        g = self.sessions[lease.session_id].grant
        if g is not None and g.lease_token == lease.lease_token:
            g.released = True

    async def enqueue(self, c: _SessionClient, sid: str) -> str:
        n = self.next_n()
        key = f"src-{n}"
        draft = QueuedWorkDraft(
            session_id=sid,
            delivery=DeliveryPolicy.EARLIEST_SAFE_BOUNDARY,
            slot=self.rng.choice((SlotPolicy.JOIN, SlotPolicy.EXCLUSIVE)),
            payloads=({"n": n},),
            source_key=key,
        )
        sessions = self.store.sessions
        try:
            batch = await self.call(lambda: sessions.enqueue(draft))
            tag = ""
        except (StorageFullError, StoreBusyError) as exc:
            self.burned_keys.append(key)
            return f"enqueue {sid} {key} fault {_err(exc)}"
        except _ReplyLost:
            found = [b for b in await sessions.list_queued_work(sid) if b.source_key == key]
            if not found:
                return f"enqueue {sid} {key} lost, not applied"
            batch, tag = found[0], "lost, found "
        model = self.sessions[sid]
        if batch.batch_id in model.batches:
            self.violate(f"{sid}: enqueue of {key} returned an existing batch")
            return f"enqueue {sid} {key} {tag}reused"
        model.batches[batch.batch_id] = _BatchModel(
            alias=key, source_key=key, seq=batch.enqueue_seq
        )
        self.ack("enqueue")
        if self.duplicate():
            again = await sessions.enqueue(draft)
            if again.batch_id != batch.batch_id:
                self.violate(f"{sid}: duplicate enqueue of {key} made a second batch")
            return f"enqueue {sid} {key} {tag}ok, duplicate idempotent"
        return f"enqueue {sid} {key} {tag}ok"

    async def claim_work(self, c: _SessionClient) -> str:
        assert c.lease is not None
        lease, ttl = c.lease, self.rng.randint(300, _MAX_TTL_MS)
        sid, sessions = lease.session_id, self.store.sessions
        try:
            claim = await self.call(
                lambda: sessions.claim_queued_work(
                    sid, lease.fence(), c.owner_id, ClaimBoundary.IDLE, ttl, 4
                )
            )
        except _ReplyLost:
            # A claim token cannot be recovered: the work stays claimed until the claim expires.
            return f"claim_work {sid} lost"
        except SessionExecutionLeaseExpired:
            self.check_refused(lease, "claim_work")
            c.lease = None
            return f"claim_work {sid} lease expired"
        self.check_fenced(lease, "claim_work")
        model = self.sessions[sid]
        waiting = self.waiting(sid)
        if claim is None:
            if waiting:
                self.violate(f"{sid}: an idle claim found nothing, {waiting[0].alias} waits")
            return f"claim_work {sid} nothing"
        aliases = []
        for b in claim.batches:
            bm = model.batches.get(b.batch_id)
            if bm is None:
                self.violate(f"{sid}: claimed a batch nobody enqueued")
                continue
            aliases.append(bm.alias)
            if bm.delivered_by is not None:
                self.violate(f"{sid}: claimed {bm.alias}, already delivered by {bm.delivered_by}")
            bm.claim_token = claim.lease_token
        # An idle claim ends every other claim on the session's queue.
        claimed_ids = {b.batch_id for b in claim.batches}
        for bid, bm in model.batches.items():
            if bid not in claimed_ids:
                bm.claim_token = None
        # Order: an idle claim takes the head of the work waiting, whoever held it.
        if aliases != [bm.alias for bm in waiting[: len(aliases)]]:
            head = waiting[0].alias if waiting else None
            self.violate(f"{sid}: an idle claim took {aliases}, not the head ({head})")
        c.claim, c.claim_grant = claim, lease.fencing_token
        self.ack("work_claim")
        return f"claim_work {sid} ok {','.join(aliases)}"

    async def commit(self, c: _SessionClient) -> str:
        assert c.lease is not None
        lease, rng = c.lease, self.rng
        stale = bool(c.stale) and c.stale[-1][0].session_id == lease.session_id
        if c.claim is None or (stale and rng.random() < 0.5):
            claim, grant = c.stale.pop()  # a stale claim: the store decides whether it owns
        else:
            claim, grant, c.claim = c.claim, c.claim_grant, None
        sid, n = lease.session_id, self.next_n()
        commit = RuntimeCommit(
            session_id=sid,
            lease=lease.fence(),
            release=lease.fence() if rng.random() < 0.5 else None,
            checkpoint=Checkpoint(turn_state={"turn": n}),
            completed_claims=(claim.completion(),),
        )
        stamped = rng.random() < 0.5
        if stamped:
            stamp = TurnCommitStamp(
                session_id=sid, turn_id=f"turn-{n}", turn_commit_hash=turn_commit_hash(commit)
            )
            commit = attrs.evolve(commit, turn_commit=stamp)
        handle = self.store.sessions.bind(sid)
        label = f"commit {sid} turn-{n}{' stamped' if stamped else ''}"
        tag = ""
        try:
            try:
                result = await self.call(lambda: handle.commit(commit))
            except _ReplyLost:
                tag = " lost,"
                if stamped:
                    result = await handle.commit(commit)  # replay-safe retry
                    tag += " retried"
                else:
                    # Nothing else ran since: the head moved by one iff it applied.
                    read = await self.store.sessions.bind(sid).load()
                    revision = 0 if read is None else read.head_revision
                    if revision != self.sessions[sid].commits + 1:
                        return f"{label}{tag} not applied"
                    result, tag = CommitResult(head_revision=-1, checkpoint_ref=""), tag + " found"
        except SessionExecutionLeaseExpired:
            self.check_refused(lease, "commit")
            c.lease = c.claim = None
            return f"{label}{tag} lease expired"
        except QueuedWorkClaimExpired:
            return f"{label}{tag} claim expired"
        self.check_fenced(lease, "commit")
        model = self.sessions[sid]
        model.commits += 1
        if grant != lease.fencing_token:
            self.violate(f"{sid}: a commit delivered a claim taken under an older lease grant")
        delivered = {b.batch_id for b in claim.batches}
        first = min((model.batches[i].seq for i in delivered if i in model.batches), default=0)
        skipped = [bm.alias for bm in self.waiting(sid) if bm.seq < first]
        skipped = [a for a in skipped if a not in {model.batches[i].alias for i in delivered}]
        if skipped:
            self.violate(f"{sid}: delivered out of order, before {skipped}")
        if result.head_revision not in (-1, model.commits):
            self.violate(
                f"{sid}: commit reached revision {result.head_revision}, model {model.commits}"
            )
        for b in claim.batches:
            bm = model.batches.get(b.batch_id)
            if bm is None:
                continue
            if bm.claim_token != claim.lease_token:
                self.violate(f"{sid}: commit completed a claim that no longer owns {bm.alias}")
            if bm.delivered_by is not None:
                self.violate(f"{sid}: {bm.alias} delivered twice ({bm.delivered_by}, turn-{n})")
            bm.delivered_by = f"turn-{n}"
        if commit.release is not None:
            self.note_release(lease)
            c.lease = None
        self.ack("commit")
        if self.duplicate():
            try:
                again = await handle.commit(commit)
            except (SessionExecutionLeaseExpired, QueuedWorkClaimExpired) as exc:
                return f"{label}{tag} ok, duplicate refused {_err(exc)}"
            if not stamped:
                self.violate(f"{sid}: a duplicate unstamped commit was applied again")
            elif result.head_revision != -1 and again != result:
                self.violate(f"{sid}: a duplicate stamped commit did not replay its result")
            return f"{label}{tag} ok, duplicate replayed"
        return f"{label}{tag} ok"

    def waiting(self, sid: str) -> list[_BatchModel]:
        """The session's acknowledged work not yet delivered nor parked, in enqueue order."""
        model = self.sessions[sid]
        left = [bm for bm in model.batches.values() if bm.delivered_by is None and not bm.parked]
        return sorted(left, key=lambda bm: bm.seq)

    # --- execution workers ---

    async def act_worker(self, w: _Worker) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.2:
            return await self.create_execution()
        if r < 0.25:
            return self.stall(w)
        if not w.handles or (len(w.handles) < 2 and r < 0.45):
            if rng.random() < 0.3:
                return await self.reclaim(w)
            return await self.claim_execution(w)
        handle = rng.choice(w.handles)
        r = rng.random()
        if r < 0.3:
            return await self.renew_execution(w, handle)
        if r < 0.8:
            return await self.complete_execution(w, handle)
        return await self.fail_execution(w, handle)

    async def create_execution(self) -> str:
        n = self.next_n()
        eid = f"ex{n}"
        executions = self.store.executions
        try:
            await self.call(
                lambda: executions.create(
                    _LANE, payload={"n": n}, retry=_RETRY, execution_id=eid, priority=n % 3
                )
            )
        except (StorageFullError, StoreBusyError) as exc:
            self.burned_executions.append(eid)
            return f"create {eid} fault {_err(exc)}"
        except _ReplyLost:
            try:
                await executions.describe(eid)
            except ExecutionNotFound:
                return f"create {eid} lost, not applied"
        self.executions[eid] = _ExecutionModel(alias=eid)
        self.ack("execution_create")
        return f"create {eid} ok"

    def note_handle(self, h: Handle, op: str) -> None:
        model = self.executions.get(h.execution_id)
        if model is None:
            self.violate(f"{op} returned unknown execution {h.execution_id}")
            return
        if model.terminal:
            self.violate(f"{model.alias}: {op} of an ended execution")
        top = max(model.max_epoch, model.store_epoch)
        if h.lease_epoch <= top:
            self.violate(f"{model.alias}: {op} epoch {h.lease_epoch} does not grow (seen {top})")
        if model.max_epoch and self.now() < model.expiry.get(model.max_epoch, 0):
            self.violate(f"{model.alias}: {op} while epoch {model.max_epoch} is live")
        model.max_epoch = max(model.max_epoch, h.lease_epoch)
        model.expiry[h.lease_epoch] = self.now() + h.lease_ttl_ms

    def check_handle_ok(self, h: Handle, op: str) -> None:
        model = self.executions[h.execution_id]
        top = max(model.max_epoch, model.store_epoch)
        if h.lease_epoch != top:
            self.violate(f"{model.alias}: {op} accepted stale epoch {h.lease_epoch} (now {top})")
        elif self.now() >= model.expiry.get(h.lease_epoch, 0):
            self.violate(f"{model.alias}: {op} accepted an expired lease (epoch {h.lease_epoch})")
        if model.terminal:
            self.violate(f"{model.alias}: {op} accepted on an ended execution")

    async def claim_execution(self, w: _Worker) -> str:
        ttl = self.rng.randint(300, 1500)
        executions = self.store.executions
        try:
            h = await self.call(lambda: executions.claim(_LANE, (), w.worker_id, ttl))
        except _ReplyLost:
            return "claim lost"  # the lease runs out and someone reclaims
        if h is None:
            return "claim nothing"
        self.note_handle(h, "claim")
        w.handles.append(h)
        self.ack("execution_claim")
        return f"claim {h.execution_id} epoch={h.lease_epoch} attempt={h.attempt_index}"

    async def reclaim(self, w: _Worker) -> str:
        ttl = self.rng.randint(300, 1500)
        executions = self.store.executions
        try:
            h = await self.call(lambda: executions.reclaim_expired(_LANE, (), w.worker_id, ttl))
        except _ReplyLost:
            return "reclaim lost"
        if h is None:
            return "reclaim nothing"
        self.note_handle(h, "reclaim")
        w.handles.append(h)
        self.ack("execution_reclaim")
        return f"reclaim {h.execution_id} epoch={h.lease_epoch}"

    async def renew_execution(self, w: _Worker, h: Handle) -> str:
        executions = self.store.executions
        try:
            try:
                await self.call(lambda: executions.renew(h))
            except _ReplyLost:
                await executions.renew(h)
        except (LeaseConflict, LeaseExpired, ExecutionTerminal) as exc:
            w.handles.remove(h)
            return f"renew {h.execution_id} {_err(exc)}"
        self.check_handle_ok(h, "renew")
        self.executions[h.execution_id].expiry[h.lease_epoch] = self.now() + h.lease_ttl_ms
        self.ack("execution_renew")
        return f"renew {h.execution_id} ok"

    async def complete_execution(self, w: _Worker, h: Handle) -> str:
        result: JSON = {"by": w.worker_id, "epoch": h.lease_epoch}
        executions, eid = self.store.executions, h.execution_id
        tag = ""
        try:
            await self.call(lambda: executions.complete(h, result))
        except (LeaseConflict, LeaseExpired, ExecutionTerminal) as exc:
            w.handles.remove(h)
            return f"complete {eid} {_err(exc)}"
        except _ReplyLost:
            info = await executions.describe(eid)
            if info.state is not ExecutionState.COMPLETED or info.result != result:
                w.handles.remove(h)
                return f"complete {eid} lost, not applied"
            tag = " lost, found"
        self.check_handle_ok(h, "complete")
        model = self.executions[eid]
        if model.completed is not None:
            self.violate(f"{model.alias}: completed twice ({model.completed} then {result})")
        model.completed, model.terminal = result, True
        model.expiry[h.lease_epoch] = 0
        w.handles.remove(h)
        self.ack("execution_complete")
        if self.duplicate():
            try:
                await executions.complete(h, result)
            except (LeaseConflict, LeaseExpired, ExecutionTerminal) as exc:
                return f"complete {eid}{tag} ok, duplicate refused {_err(exc)}"
            self.violate(f"{model.alias}: a duplicate completion was accepted")
        return f"complete {eid}{tag} ok"

    async def fail_execution(self, w: _Worker, h: Handle) -> str:
        executions, eid = self.store.executions, h.execution_id
        try:
            try:
                what = await self.call(lambda: executions.fail(h, FailureClass.TRANSIENT, "flaky"))
            except _ReplyLost:
                # Ours applied iff nobody claimed since (same epoch) and the attempt moved on.
                info = await executions.describe(eid)
                if info.lease_epoch != h.lease_epoch or not (
                    info.attempt_index > h.attempt_index or info.state is ExecutionState.FAILED
                ):
                    w.handles.remove(h)
                    return f"fail {eid} lost, not applied"
                what = info.state.value if info.state.is_terminal else "retry_scheduled"
        except (LeaseConflict, LeaseExpired, ExecutionTerminal) as exc:
            w.handles.remove(h)
            return f"fail {eid} {_err(exc)}"
        w.handles.remove(h)
        self.check_handle_ok(h, "fail")
        model = self.executions[eid]
        model.expiry[h.lease_epoch] = 0
        if what != "retry_scheduled":
            model.terminal = True
        self.ack("execution_fail")
        if self.duplicate():
            try:
                await executions.fail(h, FailureClass.TRANSIENT, "flaky")
            except (LeaseConflict, LeaseExpired, ExecutionTerminal) as exc:
                return f"fail {eid} {what}, duplicate refused {_err(exc)}"
            self.violate(f"{model.alias}: a duplicate failure was accepted")
        return f"fail {eid} {what}"

    # --- task clients ---

    async def act_tasks(self, c: _TaskClient) -> str:
        rng = self.rng
        r = rng.random()
        live = [tid for tid, t in self.tasks.items() if t.ended is None]
        if r < 0.05:
            return self.stall(c)
        if r < 0.3 or not self.tasks:
            return await self.create_task(c)
        # Mostly live tasks; sometimes any task, so ended ones get (refused) requests too.
        pool = live if live and r < 0.85 else list(self.tasks)
        tid = rng.choice(pool)
        r = rng.random()
        if r < 0.55:
            return await self.move_task(tid, rng.choice(list(TaskStatus)))
        return await self.end_task(tid, rng.choice(("complete", "fail", "cancel")))

    async def create_task(self, c: _TaskClient) -> str:
        n = self.next_n()
        alias = f"task-{n}"
        record = TaskRecord(original_method="tools/call", original_params={"sim": n})
        tasks = self.store.tasks
        tag = ""
        try:
            got = await self.call(lambda: tasks.create_task(record))
        except _ReplyLost:
            found = await self.find_task(n)
            if found is None:
                return f"create {alias} lost, not applied"
            got, tag = found, " lost, found"
        self.tasks[got.task_id] = _TaskModel(alias=alias, history=[got.status])
        self.ack("task_create")
        return f"create {alias}{tag} {got.status.value}"

    async def find_task(self, n: int) -> TaskRecord | None:
        cursor: str | None = None
        while True:
            page = await self.store.tasks.list_tasks(cursor, 1000)
            for t in page.tasks:
                if t.original_params == {"sim": n}:
                    return t
            if page.next_cursor is None:
                return None
            cursor = page.next_cursor

    def observe(self, tid: str, status: TaskStatus, how: str) -> None:
        model = self.tasks[tid]
        last = model.history[-1]
        if status != last:
            if status not in TRANSITIONS[last]:
                self.violate(f"{model.alias}: illegal move {last.value} -> {status.value} ({how})")
            model.history.append(status)
        if model.ended is not None and status != model.ended:
            self.violate(f"{model.alias}: ended {model.ended.value}, now {status.value}")

    async def move_task(self, tid: str, target: TaskStatus) -> str:
        model, tasks = self.tasks[tid], self.store.tasks
        label = f"move {model.alias} {model.history[-1].value}->{target.value}"
        legal = target in TRANSITIONS[model.history[-1]]
        try:
            try:
                got = await self.call(lambda: tasks.update_task_status(tid, target, "sim"))
            except _ReplyLost:
                found = await tasks.get_task(tid)
                assert found is not None
                self.observe(tid, found.status, "reconciled move")
                if found.status.is_terminal:
                    model.ended = found.status
                return f"{label} lost, now {found.status.value}"
        except (InvalidTransition, TerminalState) as exc:
            if legal:
                self.violate(f"{model.alias}: legal {label} refused with {_err(exc)}")
            return f"{label} refused {_err(exc)}"
        if not legal:
            self.violate(f"{model.alias}: illegal {label} accepted")
        self.observe(tid, got.status, "move")
        if got.status.is_terminal:
            model.ended = got.status
        self.ack("task_move")
        return f"{label} ok"

    async def end_task(self, tid: str, how: str) -> str:
        model, tasks = self.tasks[tid], self.store.tasks
        n = self.next_n()

        async def send() -> TaskRecord:
            if how == "complete":
                return await tasks.complete_task(tid, TaskSuccess({"n": n}))
            if how == "fail":
                return await tasks.fail_task(tid, TaskRpcError(-32000, f"failed {n}"))
            return await tasks.cancel_task(tid)

        label = f"{how} {model.alias}"
        try:
            try:
                got = await self.call(send)
            except _ReplyLost:
                found = await tasks.get_task(tid)
                assert found is not None
                self.observe(tid, found.status, f"reconciled {how}")
                if found.status.is_terminal:
                    model.ended = found.status
                return f"{label} lost, now {found.status.value}"
        except TerminalState as exc:
            if model.ended is None:
                self.violate(f"{model.alias}: {how} of a live task refused")
            return f"{label} refused {_err(exc)}"
        if model.ended is not None:
            self.violate(f"{model.alias}: {how} accepted on a task that ended {model.ended.value}")
        self.observe(tid, got.status, how)
        model.ended = got.status
        self.ack("task_end")
        if self.duplicate():
            try:
                await send()
            except TerminalState as exc:
                return f"{label} ok, duplicate refused {_err(exc)}"
            self.violate(f"{model.alias}: a duplicate {how} was accepted")
        return f"{label} ok"

    # --- invariants ---

    async def check(self, *, full: bool) -> None:
        await self.check_sessions()
        await self.check_executions(full=full)
        await self.check_tasks(full=full)

    async def check_sessions(self) -> None:
        sessions = self.store.sessions
        holders: dict[str, list[SessionLease]] = {sid: [] for sid in _SESSIONS}
        for actor in self.actors:
            if isinstance(actor, _SessionClient) and actor.lease is not None:
                holders[actor.lease.session_id].append(actor.lease)
        for sid, model in self.sessions.items():
            # At most one live holder: probe every fence a client holds (a renewal by 0 ms
            # never shortens a lease, so the probe changes nothing).
            live: list[SessionLease] = []
            for lease in holders[sid]:
                try:
                    await sessions.renew_lease(lease.fence(), 0)
                    live.append(lease)
                except SessionExecutionLeaseExpired:
                    pass
            if len({lease.lease_token for lease in live}) > 1:
                owners = ", ".join(sorted(lease.owner_id for lease in live))
                self.violate(f"{sid}: several live lease holders ({owners})")
            g = self.lease_live(sid)
            for lease in live:
                if g is None or lease.lease_token != g.lease_token:
                    self.violate(f"{sid}: a fence the model says is dead is live")
            # Queued work: acknowledged enqueues are queued or delivered exactly once.
            stored = await sessions.list_queued_work(sid)
            present = {b.batch_id for b in stored}
            for b in stored:
                bm = model.batches.get(b.batch_id)
                if bm is not None and (b.parked, b.failures) != (bm.parked, bm.failures):
                    self.violate(
                        f"{sid}: {bm.alias} parked={b.parked} failures={b.failures}, model"
                        f" parked={bm.parked} failures={bm.failures}"
                    )
            for bid, bm in model.batches.items():
                if bm.delivered_by is None and bid not in present:
                    self.violate(f"{sid}: acknowledged enqueue {bm.alias} lost")
                elif bm.delivered_by is not None and bid in present:
                    self.violate(
                        f"{sid}: {bm.alias} delivered by {bm.delivered_by} but still queued"
                    )
            for b in stored:
                if b.batch_id not in model.batches:
                    why = "failed before apply" if b.source_key in self.burned_keys else "untracked"
                    self.violate(f"{sid}: {why} enqueue {b.source_key} is in the store")
            seqs = [b.enqueue_seq for b in stored]
            if seqs != sorted(seqs):
                self.violate(f"{sid}: queued work out of enqueue order")
            # Every acknowledged commit applied exactly once.
            read = await sessions.bind(sid).load()
            revision = 0 if read is None else read.head_revision
            if revision != model.commits:
                self.violate(
                    f"{sid}: head revision {revision}, acknowledged commits {model.commits}"
                )

    async def check_executions(self, *, full: bool) -> None:
        executions = self.store.executions
        handles: dict[str, list[Handle]] = {}
        for actor in self.actors:
            if isinstance(actor, _Worker):
                for h in actor.handles:
                    handles.setdefault(h.execution_id, []).append(h)
        for eid, model in self.executions.items():
            if model.terminal and not full:
                continue
            try:
                info = await executions.describe(eid)
            except ExecutionNotFound:
                self.violate(f"{eid}: acknowledged execution lost")
                continue
            if info.lease_epoch < model.store_epoch:
                self.violate(
                    f"{eid}: lease epoch went back {model.store_epoch} -> {info.lease_epoch}"
                )
            model.store_epoch = max(model.store_epoch, info.lease_epoch)
            if model.completed is not None:
                if info.state is not ExecutionState.COMPLETED or info.result != model.completed:
                    self.violate(f"{eid}: acknowledged completion lost ({info.state.value})")
            elif info.state is ExecutionState.COMPLETED:
                self.violate(f"{eid}: completed without an acknowledged completion")
            if info.state.is_terminal:
                model.terminal = True
            live = []
            for h in handles.get(eid, ()):
                try:
                    await executions.progress(h)  # no fields: checks the handle, writes nothing
                    live.append(h)
                except (LeaseConflict, LeaseExpired, ExecutionTerminal):
                    pass
            if len(live) > 1:
                self.violate(f"{eid}: {len(live)} live lease holders")
            for h in live:
                if h.lease_epoch != info.lease_epoch or info.state is not ExecutionState.ACTIVE:
                    self.violate(f"{eid}: a handle of epoch {h.lease_epoch} is live")
        if full:
            for eid in self.burned_executions:
                try:
                    await executions.describe(eid)
                    self.violate(f"{eid}: a create that failed before apply is in the store")
                except ExecutionNotFound:
                    pass

    async def check_tasks(self, *, full: bool) -> None:
        tasks = self.store.tasks
        count = await tasks.task_count()
        if count != len(self.tasks):
            self.violate(f"{count} tasks stored, {len(self.tasks)} acknowledged")
        for tid, model in self.tasks.items():
            if model.ended is not None and not full:
                continue
            got = await tasks.get_task(tid)
            if got is None:
                self.violate(f"{model.alias}: acknowledged task lost")
                continue
            self.observe(tid, got.status, "read")


async def simulate(seed: int, steps: int) -> SimulationReport:
    """Run one simulation inside the caller's trio (or asyncio) event loop. Nothing else may
    use the event loop meanwhile if the run is to replay exactly."""
    clock = FakeClock()
    rng = random.Random(seed)
    async with open_store("memory://", clock=clock, ids=SeededIds(seed)) as store:
        sim = _Sim(seed, store, clock, rng)
        await sim.run(steps)
    trace = tuple(sim.trace)
    digest = hashlib.sha256("\n".join(trace).encode()).hexdigest()
    return SimulationReport(
        seed=seed,
        steps=steps,
        trace_hash=digest,
        faults=MappingProxyType(dict(sim.faults)),
        violations=tuple(sim.violations),
        acknowledged=MappingProxyType(dict(sorted(sim.acked.items()))),
        trace=trace,
    )


def run_simulation(seed: int, steps: int) -> SimulationReport:
    """Run one seeded simulation of ``steps`` steps and report; never raises for a violation."""
    return trio.run(simulate, seed, steps)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: print the report (and the trace); exit 1 on a violation."""
    parser = argparse.ArgumentParser(
        prog="python -m turnbuckle.testing.sim", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--trace", action="store_true", help="print the trace too")
    args = parser.parse_args(argv)
    report = run_simulation(args.seed, args.steps)
    if args.trace:
        for line in report.trace:
            print(line)
    print(report.format())
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
