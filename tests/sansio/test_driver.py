"""The session driver: every (state, event type) pair, straight-line scenarios with exact
command lists, and a simulated environment that answers the driver's commands in a random
order, with faults and timers at random times.

The driver is only ever moved through its public interface (``handle``, ``next_deadline``,
``state``, ``lease``, ``last_error``), by event scripts answered from a small fake store built
on the pure sansio decisions (lease, queue, commit), so every lease, claim and session read the
driver sees is one a real store could have returned.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeAlias

import attrs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from turnbuckle.errors import (
    CorruptRecordError,
    HeadRevisionConflict,
    PayloadTooLarge,
    QueuedWorkClaimExpired,
    SessionExecutionLeaseExpired,
    StoreBusyError,
    StoreClosedError,
    TurnbuckleError,
)
from turnbuckle.sansio.driver import (
    CallModel,
    CancelTurn,
    ClaimWork,
    Command,
    Commit,
    Committed,
    DriverConfig,
    DriverError,
    DriverState,
    Event,
    Exit,
    HandBack,
    LeaseReleased,
    LeaseRenewed,
    LeaseTaken,
    LoadSession,
    ModelAnswered,
    ModelRaised,
    PeekQueue,
    Publish,
    QueuePeeked,
    ReleaseLease,
    RenewLease,
    Resolve,
    RunTool,
    SessionDriver,
    SessionEvent,
    SessionLoaded,
    Severity,
    StopRequested,
    StoreFailed,
    TakeLease,
    TimerFired,
    ToolFinished,
    Woken,
    WorkClaimed,
    WorkHandedBack,
    message_payload,
)
from turnbuckle.sansio.lease import (
    LeaseFence,
    LeaseRow,
    SessionLease,
    check_fence,
    claim_lease,
    free_lease_row,
    release_lease,
    renew_lease,
)
from turnbuckle.sansio.queue import (
    ClaimBoundary,
    DeliveryPolicy,
    DeliveryRow,
    MergeKey,
    QueuedBatchRow,
    QueuedWorkBatch,
    QueuedWorkClaim,
    QueuedWorkDraft,
    SlotPolicy,
    abandon_rows,
    claim_rows,
    ended_claims,
    fail_rows,
    new_batch_row,
    renew_rows,
    select_claim_prefix,
)
from turnbuckle.sansio.session import (
    ActivePath,
    CommitResult,
    GraphAppend,
    HeadRow,
    RuntimeCommit,
    SessionNode,
    SessionRead,
    TokenUsage,
    TurnCommitStamp,
    TurnStampRow,
    UsageEntry,
    build_read,
    check_commit,
    turn_commit_hash,
)
from turnbuckle.sansio.session import Checkpoint as SessionCheckpoint
from turnbuckle.sansio.turn import (
    Message,
    ModelRequest,
    ModelResponse,
    StopReason,
    ToolCall,
    ToolResult,
    TurnOutcome,
)
from turnbuckle.testing import SeededIds

SID: Final = "s1"
OWNER: Final = "rt-a"
OTHER: Final = "rt-b"
TTL: Final = 15_000
T0: Final = 1_000_000
#: The driver stops working under a lease this long before it runs out (the keeper's
#: docstring: a tenth of the ttl, so the next holder never works at the same time).
STOP_EARLY: Final = TTL // 10
IDLE_B, CHECKPOINT_B = ClaimBoundary.IDLE, ClaimBoundary.ACTIVE_TURN_CHECKPOINT
D = DriverState
INFO, WARNING, ERROR, DEBUG = Severity.INFO, Severity.WARNING, Severity.ERROR, Severity.DEBUG
#: The result events, and the commands whose results they are.
RESULT_OF: Final[dict[type[Any], tuple[type[Any], ...]]] = {
    LeaseTaken: (TakeLease,),
    LeaseRenewed: (RenewLease,),
    WorkClaimed: (ClaimWork,),
    QueuePeeked: (PeekQueue,),
    SessionLoaded: (LoadSession,),
    ModelAnswered: (CallModel,),
    ModelRaised: (CallModel,),
    ToolFinished: (RunTool,),
    Committed: (Commit,),
    WorkHandedBack: (HandBack,),
    LeaseReleased: (ReleaseLease,),
    StoreFailed: (
        TakeLease,
        RenewLease,
        ClaimWork,
        PeekQueue,
        LoadSession,
        Commit,
        HandBack,
        ReleaseLease,
    ),
}
EVENT_TYPES: Final[list[type[Any]]] = [
    Woken,
    TimerFired,
    StopRequested,
    *RESULT_OF,
]
#: The commands whose results come back (with their command_id).
WithId: TypeAlias = (
    TakeLease
    | RenewLease
    | ClaimWork
    | PeekQueue
    | LoadSession
    | Commit
    | HandBack
    | ReleaseLease
    | CallModel
    | RunTool
)


# --- a fake store: one session's lease, queue and head, kept with the sansio decisions ----------


class Store:
    """What a store would answer, decided by the same pure functions the real adapters use."""

    def __init__(self, seed: int = 1) -> None:
        self.ids = SeededIds(seed)
        self.lease_row: LeaseRow = free_lease_row(SID)
        self.rows: list[QueuedBatchRow] = []
        self.head: HeadRow | None = None
        self.nodes: list[SessionNode] = []
        self.blobs: dict[str, bytes] = {}
        self.stamps: dict[str, TurnStampRow] = {}
        self.deliveries: list[DeliveryRow] = []
        #: Every commit applied (not replayed), in order.
        self.applied: list[Any] = []
        self._seq = 0

    def enqueue(
        self,
        text: str,
        now: int,
        *,
        slot: SlotPolicy = SlotPolicy.EXCLUSIVE,
        delivery: DeliveryPolicy = DeliveryPolicy.EARLIEST_SAFE_BOUNDARY,
        available_at_ms: int = 0,
    ) -> QueuedBatchRow:
        self._seq += 1
        draft = QueuedWorkDraft(
            session_id=SID,
            delivery=delivery,
            slot=slot,
            payloads=[{"text": text}],
            merge_key=MergeKey.PAYLOAD_DEFAULT,
            available_at_ms=available_at_ms,
        )
        row = new_batch_row(draft, enqueue_seq=self._seq, now_ms=now, ids=self.ids, limit=1 << 20)
        self.rows.append(row)
        return row

    def row(self, batch_id: str) -> QueuedBatchRow | None:
        return next((r for r in self.rows if r.batch_id == batch_id), None)

    def _put(self, changed: Sequence[QueuedBatchRow]) -> None:
        by_id = {r.batch_id: r for r in changed}
        self.rows = [by_id.get(r.batch_id, r) for r in self.rows]

    def take_lease(self, owner: str, ttl_ms: int, now: int) -> SessionLease | None:
        got = claim_lease(self.lease_row, owner, ttl_ms, now_ms=now, ids=self.ids)
        if got is None:
            return None
        self.lease_row = got[0]
        return got[1]

    def answer(self, command: Command, now: int) -> Event:
        """Carry out a store command at ``now``: its result, or the error it raised."""
        command_id: int = getattr(command, "command_id", 0)
        try:
            return self._answer(command, now)
        except TurnbuckleError as exc:
            return StoreFailed(command_id=command_id, error=exc)

    def _answer(self, command: Command, now: int) -> Event:
        grant = self.lease_row.fencing_token
        if isinstance(command, TakeLease):
            lease = self.take_lease(OWNER, command.ttl_ms, now)
            return LeaseTaken(command_id=command.command_id, lease=lease)
        if isinstance(command, RenewLease):
            row, lease = renew_lease(self.lease_row, command.fence, command.ttl_ms, now_ms=now)
            renewed: list[QueuedBatchRow] = []
            claims: list[QueuedWorkClaim] = []
            for claim in command.claims:  # all or nothing, like one transaction
                rows = [self.row(b.batch_id) for b in claim.batches]
                fresh_rows, fresh = renew_rows(
                    rows, claim, command.ttl_ms, now_ms=now, lease_fencing=grant
                )
                renewed += fresh_rows
                claims.append(fresh)
            self.lease_row = row
            self._put(renewed)
            return LeaseRenewed(command_id=command.command_id, lease=lease, claims=claims)
        if isinstance(command, ClaimWork):
            check_fence(self.lease_row, command.fence, now_ms=now)
            selected = select_claim_prefix(
                self.rows, command.boundary, command.max_batches, now_ms=now, lease_fencing=grant
            )
            if not selected:
                return WorkClaimed(command_id=command.command_id, claim=None)
            claimed, claim = claim_rows(
                selected,
                command.fence.owner_id,
                command.ttl_ms,
                now_ms=now,
                ids=self.ids,
                lease_fencing=grant,
            )
            if command.boundary is ClaimBoundary.IDLE:  # as the facet: a turn starts
                self._put(ended_claims(self.rows, selected))
            self._put(claimed)
            return WorkClaimed(command_id=command.command_id, claim=claim)
        if isinstance(command, PeekQueue):
            live = [r for r in self.rows if not r.parked]
            later = [r.available_at_ms - now for r in live if r.available_at_ms > now]
            return QueuePeeked(
                command_id=command.command_id,
                ready=any(r.available_at_ms <= now for r in live),
                due_in_ms=min(later) if later else None,
            )
        if isinstance(command, LoadSession):
            return SessionLoaded(command_id=command.command_id, read=self.read())
        if isinstance(command, Commit):
            return Committed(command_id=command.command_id, result=self.commit(command, now))
        if isinstance(command, HandBack):
            parked: list[QueuedWorkBatch] = []
            for claim in command.claims:
                rows = [self.row(b.batch_id) for b in claim.batches]
                if command.error is None:
                    self._put(abandon_rows(rows, claim))
                else:
                    failed = fail_rows(rows, claim, command.error, command.max_failures)
                    self._put(failed)
                    parked += [r.batch() for r in failed if r.parked]
            return WorkHandedBack(command_id=command.command_id, parked=parked)
        if isinstance(command, ReleaseLease):
            freed = release_lease(self.lease_row, command.fence)
            if freed is not None:
                self.lease_row = freed
            return LeaseReleased(command_id=command.command_id)
        raise AssertionError(f"not a store command: {command!r}")

    def read(self) -> SessionRead | None:
        if self.head is None:
            return None
        return build_read(self.head, self.nodes, [], self.blobs, ActivePath())

    def commit(self, command: Commit, now: int) -> CommitResult:
        commit = command.commit
        stamp = None if commit.turn_commit is None else self.stamps.get(commit.turn_commit.turn_id)
        claimed = [[self.row(i) for i in c.batch_ids] for c in commit.completed_claims]
        plan = check_commit(
            commit,
            bound_session=SID,
            head=self.head,
            lease=self.lease_row,
            stamp=stamp,
            claimed=claimed,
            now_ms=now,
        )
        if not plan.replay:
            assert plan.head is not None
            known = {n.node_id for n in self.nodes}
            assert not known & {n.node_id for n in plan.nodes}, "a node committed twice"
            self.blobs.update(plan.blobs)
            self.nodes += plan.nodes
            self.head = plan.head
            gone = {d.row.batch_id for d in plan.deliveries}
            self.rows = [r for r in self.rows if r.batch_id not in gone]
            self.deliveries += plan.deliveries
            if plan.stamp is not None:
                self.stamps[plan.stamp.turn_id] = plan.stamp
            self.applied.append(commit)
        if plan.lease is not None:
            self.lease_row = plan.lease
        return plan.result


# --- a harness: one driver, the store, the clock, and what the driver sent --------------------


def text_reply(text: str = "4") -> ModelResponse:
    return ModelResponse(text=text, usage=TokenUsage(input_tokens=10, output_tokens=2))


def tool_reply(*names: str) -> ModelResponse:
    return ModelResponse(
        tool_calls=[ToolCall(call_id=f"c{i}", name=n, args={"i": i}) for i, n in enumerate(names)],
        stop_reason=StopReason.TOOL_USE,
    )


class Run:
    """A driver fed event scripts at a clock that only moves forward."""

    def __init__(
        self,
        *,
        tools: Sequence[str] = ("add", "mul"),
        max_failures: int = 3,
        ttl: int = TTL,
        seed: int = 0,
    ) -> None:
        self.config = DriverConfig(
            owner_id=OWNER, lease_ttl_ms=ttl, tools=tools, max_failures=max_failures
        )
        self.driver = SessionDriver(SID, self.config, ids=SeededIds(seed))
        self.store = Store(seed + 1)
        self.now = T0
        #: Every command the driver returned, in order.
        self.sent: list[Command] = []
        #: Commands sent whose result was not reported yet, by id.
        self.outstanding: dict[int, Command] = {}
        #: The claims the driver was given, in order.
        self.claims: list[QueuedWorkClaim] = []

    def state(self) -> DriverState:
        """Where the driver is now (a call: it changes under every event)."""
        return self.driver.state

    def feed(self, event: Event, at: int | None = None) -> list[Command]:
        if at is not None:
            assert at >= self.now, "time only moves forward"
            self.now = at
        out = self.driver.handle(event, self.now)
        self.sent += out
        command_id = getattr(event, "command_id", None)
        if command_id is not None:
            self.outstanding.pop(command_id, None)
        if isinstance(event, WorkClaimed) and event.claim is not None:
            self.claims.append(event.claim)
        self.outstanding.update({c.command_id: c for c in out if isinstance(c, WithId)})
        return out

    def last(self, kind: type[Any]) -> Any:
        """The last command of this type the driver sent."""
        for command in reversed(self.sent):
            if isinstance(command, kind):
                return command
        raise AssertionError(f"the driver sent no {kind.__name__}")

    def answer(self, kind: type[Any], at: int | None = None) -> list[Command]:
        """Let the store carry out the last command of ``kind`` and report its result."""
        if at is not None:
            self.now = at
        return self.feed(self.store.answer(self.last(kind), self.now))

    def fail(self, kind: type[Any], error: BaseException, at: int | None = None) -> list[Command]:
        return self.feed(StoreFailed(command_id=self.last(kind).command_id, error=error), at)

    def fire(self, at: int | None = None) -> list[Command]:
        """A TimerFired at ``at``, or at the deadline the driver asked for."""
        deadline = self.driver.next_deadline()
        if at is None:
            assert deadline is not None
            at = max(deadline, self.now)
        return self.feed(TimerFired(), at)

    def model(self, response: Any) -> list[Command]:
        return self.feed(
            ModelAnswered(command_id=self.last(CallModel).command_id, response=response)
        )

    def tool(self, call_id: str, output: Any = 4, **extra: Any) -> list[Command]:
        run = next(
            c for c in reversed(self.sent) if isinstance(c, RunTool) and c.call.call_id == call_id
        )
        result = ToolResult(call_id=call_id, name=run.call.name, output=output, **extra)
        return self.feed(ToolFinished(command_id=run.command_id, result=result))

    def lease(self) -> SessionLease:
        assert self.driver.lease is not None
        return self.driver.lease

    def fence(self) -> LeaseFence:
        return self.lease().fence()


def norm(commands: Sequence[Command]) -> list[object]:
    """Commands as comparable values: ids zeroed, publishes as (type, severity), turn calls
    and commits by what identifies them."""
    out: list[object] = []
    for c in commands:
        if isinstance(c, Publish):
            out.append(pub(c.event.type, c.event.severity))
        elif isinstance(c, CallModel):
            out.append(("CallModel", c.request.iteration))
        elif isinstance(c, RunTool):
            out.append(("RunTool", c.call.call_id))
        elif isinstance(c, Commit):
            stamp = c.commit.turn_commit
            out.append(("Commit", None if stamp is None else stamp.turn_id))
        elif isinstance(c, WithId):
            out.append(attrs.evolve(c, command_id=0))
        else:
            out.append(c)
    return out


def pub(kind: str, severity: Severity = DEBUG) -> tuple[str, str, Severity]:
    return ("publish", kind, severity)


def data_of(command: Command) -> dict[str, Any]:
    """The data of a published event (an object)."""
    assert isinstance(command, Publish) and isinstance(command.event.data, dict)
    return command.event.data


# --- putting a driver in each state, through its public interface only ------------------------

#: How a RUNNING driver waits: for the model, for a tool, or for its checkpoint claim; or, in
#: any state that renews the lease, with a renewal in flight.
MODEL, TOOLS, CHECKPOINT, RENEWING = "model", "tools", "checkpoint", "renewing"
#: The states that hold the lease (the keeper renews it in all but RELEASING).
HOLDING: Final = (
    D.CLAIMING,
    D.PEEKING,
    D.LOADING,
    D.RUNNING,
    D.COMMITTING,
    D.HANDING_BACK,
    D.RELEASING,
)
#: States with no work queued when reached (so a claim finds nothing and a peek says so).
_NO_WORK: Final = (D.WAITING, D.CHECKING, D.PEEKING, D.RELEASING, D.SLEEPING, D.STOPPED)


def reach(state: DriverState, how: str = MODEL) -> Run:
    """A driver in ``state``, reached by a realistic event script at T0 (the store answers
    every store command; the model answers as ``how`` needs)."""
    r = Run()
    if state is D.SLEEPING:
        r.store.enqueue("later", r.now, available_at_ms=T0 + 60_000)
    elif state not in _NO_WORK:
        r.store.enqueue("hi", r.now)
    if state is D.IDLE:
        return r
    if state in (D.WAITING, D.CHECKING):
        r.store.take_lease(OTHER, TTL, r.now)
    r.feed(Woken())
    if state is D.ACQUIRING:
        return r
    r.answer(TakeLease)
    if state is D.CHECKING:
        assert r.fire() == [PeekQueue(command_id=r.last(PeekQueue).command_id)]
    if state in (D.WAITING, D.CHECKING):
        return _checked(r, state)
    if state is D.CLAIMING:
        return _renewing(r, how)
    r.answer(ClaimWork)
    if state in (D.PEEKING, D.RELEASING, D.SLEEPING, D.STOPPED):
        if how == RENEWING and state is D.RELEASING:
            _renewing(r, how)  # sent while peeking, still in flight while releasing
        if state is D.PEEKING:
            return _renewing(r, how)
        r.answer(PeekQueue)
        if state is D.RELEASING:
            return _checked(r, state)
        r.answer(ReleaseLease)
        return _checked(r, state)
    if state is D.LOADING:
        return _renewing(r, how)
    if state is D.HANDING_BACK:
        r.fail(LoadSession, CorruptRecordError("sessions", SID, "bad"))
        return _renewing(r, how)
    r.answer(LoadSession)
    if state is D.RUNNING and how in (MODEL, RENEWING):
        return _renewing(r, how)
    r.model(tool_reply("add") if how == TOOLS else text_reply())
    if state is D.RUNNING:
        return _checked(r, state)
    r.answer(ClaimWork)
    assert state is D.COMMITTING
    return _renewing(r, how)


def _renewing(r: Run, how: str) -> Run:
    if how == RENEWING:
        assert r.fire() == [r.last(RenewLease)]
    return _checked(r, r.state())


def _checked(r: Run, state: DriverState) -> Run:
    assert r.state() is state
    return r


def ways(state: DriverState) -> list[str]:
    """The ways a state is waited in."""
    if state is D.RUNNING:
        return [MODEL, TOOLS, CHECKPOINT, RENEWING]
    return [MODEL, RENEWING] if state in HOLDING else [MODEL]


STATE_WAYS: Final = [(s, w) for s in DriverState for w in ways(s)]


def snapshot(d: SessionDriver) -> tuple[object, ...]:
    """What the driver shows of itself."""
    return (d.state, d.lease, d.last_error, d.finished, d.next_deadline())


def probe(r: Run) -> list[object]:
    """Drive ``r`` on (every outstanding command answered, the timer, a stop) and record what
    it does: two drivers in the same condition record the same."""
    seen: list[object] = []

    def step(event: Event) -> None:
        try:
            seen.append(r.feed(event))
        except Exception as exc:  # recorded, so a difference shows
            seen.append(repr(exc))

    for command in sorted(r.outstanding.values(), key=lambda c: getattr(c, "command_id", 0)):
        step(answer_of(r, command))
    if r.driver.next_deadline() is not None:
        step(TimerFired())
    step(StopRequested())
    return seen


def answer_of(r: Run, command: Command) -> Event:
    """The (successful) result of a command: from the store, or a model or tool answer."""
    if isinstance(command, CallModel):
        return ModelAnswered(command_id=command.command_id, response=text_reply())
    if isinstance(command, RunTool):
        result = ToolResult(call_id=command.call.call_id, name=command.call.name, output=4)
        return ToolFinished(command_id=command.command_id, result=result)
    return r.store.answer(command, r.now)


# --- 1. every (state, event type) pair ----------------------------------------------------------

DUMMY_LEASE: Final = SessionLease(
    session_id=SID,
    owner_id=OWNER,
    lease_token="f" * 32,
    fencing_token=99,
    claimed_at_ms=T0,
    expires_at_ms=T0 + TTL,
)
BUSY: Final = StoreBusyError("db", 5.0)


def dummy(kind: type[Any], command_id: int) -> Event:
    """A result of ``kind`` for ``command_id`` (its content does not matter)."""
    made: dict[type[Any], Callable[[], Event]] = {
        LeaseTaken: lambda: LeaseTaken(command_id=command_id, lease=None),
        LeaseRenewed: lambda: LeaseRenewed(command_id=command_id, lease=DUMMY_LEASE),
        WorkClaimed: lambda: WorkClaimed(command_id=command_id, claim=None),
        QueuePeeked: lambda: QueuePeeked(command_id=command_id, ready=False, due_in_ms=None),
        SessionLoaded: lambda: SessionLoaded(command_id=command_id, read=None),
        ModelAnswered: lambda: ModelAnswered(command_id=command_id, response=text_reply()),
        ModelRaised: lambda: ModelRaised(command_id=command_id, message="down"),
        ToolFinished: lambda: ToolFinished(
            command_id=command_id, result=ToolResult(call_id="c0", name="add", output=4)
        ),
        Committed: lambda: Committed(
            command_id=command_id, result=CommitResult(head_revision=1, checkpoint_ref="r")
        ),
        WorkHandedBack: lambda: WorkHandedBack(command_id=command_id),
        LeaseReleased: lambda: LeaseReleased(command_id=command_id),
        StoreFailed: lambda: StoreFailed(command_id=command_id, error=BUSY),
    }
    return made[kind]()


def canonical(kind: type[Any], r: Run) -> tuple[Event, int]:
    """The event of ``kind`` to feed ``r``, and when: a timer at the deadline asked for; a
    result for the outstanding command of the right kind (the store's answer, a model or tool
    answer, or a busy store), else for any outstanding command, else for none."""
    if kind in (Woken, StopRequested):
        return kind(), r.now
    if kind is TimerFired:
        deadline = r.driver.next_deadline()
        return TimerFired(), r.now if deadline is None else max(deadline, r.now)
    right = sorted(
        (c for c in r.outstanding.values() if isinstance(c, RESULT_OF[kind])),
        key=lambda c: getattr(c, "command_id", 0),
    )
    if not right:
        command_id = min(r.outstanding, default=999_999)
        return dummy(kind, command_id), r.now
    command = right[0]
    command_id = getattr(command, "command_id", 0)
    if kind is StoreFailed:
        return StoreFailed(command_id=command_id, error=BUSY), r.now
    if kind is ModelRaised:
        return ModelRaised(command_id=command_id, message="the provider is down"), r.now
    event = answer_of(r, command)
    assert isinstance(event, kind), event
    return event, r.now


#: The way each event type is best met in a state (a RUNNING driver waits for one thing).
WAY_FOR: Final[dict[type[Any], str]] = {
    ToolFinished: TOOLS,
    WorkClaimed: CHECKPOINT,
    StoreFailed: CHECKPOINT,
    LeaseRenewed: RENEWING,
}


def way_for(state: DriverState, kind: type[Any]) -> str:
    way = WAY_FOR.get(kind, MODEL)
    return way if way in ways(state) else MODEL


def take() -> TakeLease:
    return TakeLease(command_id=0, ttl_ms=TTL)


def claim_idle(fence: LeaseFence) -> ClaimWork:
    return ClaimWork(command_id=0, fence=fence, boundary=IDLE_B, ttl_ms=TTL, max_batches=64)


def claim_checkpoint(fence: LeaseFence) -> ClaimWork:
    return ClaimWork(command_id=0, fence=fence, boundary=CHECKPOINT_B, ttl_ms=TTL, max_batches=64)


def renew(fence: LeaseFence, claims: Sequence[QueuedWorkClaim] = ()) -> RenewLease:
    return RenewLease(command_id=0, fence=fence, claims=claims, ttl_ms=TTL)


def release(fence: LeaseFence) -> ReleaseLease:
    return ReleaseLease(command_id=0, fence=fence)


def turn_of(r: Run) -> str:
    return f"turn:{r.claims[0].batches[0].batch_id}"


def tickets(r: Run) -> tuple[str, ...]:
    return tuple(b.batch_id for c in r.claims for b in c.batches)


def answered(r: Run, head_revision: int = 1) -> Resolve:
    """The Resolve of the turn the driver last committed: its tickets, with its answer."""
    commit = r.last(Commit).commit
    assert commit.turn_commit is not None and isinstance(commit.outcome, dict)
    return Resolve(
        batch_ids=[i for c in commit.completed_claims for i in c.batch_ids],
        turn_id=commit.turn_commit.turn_id,
        outcome=TurnOutcome(**commit.outcome),
        head_revision=head_revision,
    )


def finish_turn(r: Run) -> list[Command]:
    """Answer the running turn's model calls with text and its checkpoint claims from the
    store, up to its commit's result."""
    while r.state() is D.RUNNING:
        if isinstance(r.sent[-1], CallModel):
            r.model(text_reply())
        else:
            r.answer(ClaimWork)
    return r.answer(Commit)


Expect = Callable[[Run, Any], tuple[list[object], DriverState]]


def _same(r: Run, e: Event) -> tuple[list[object], DriverState]:
    return [], r.state()


def _take(r: Run, e: Event) -> tuple[list[object], DriverState]:
    return [take()], D.ACQUIRING


def _exit(r: Run, e: Event) -> tuple[list[object], DriverState]:
    return [Exit()], D.STOPPED


def _renew(r: Run, e: Event) -> tuple[list[object], DriverState]:
    return [renew(r.fence())], r.state()


def _renew_with_claims(r: Run, e: Event) -> tuple[list[object], DriverState]:
    return [renew(r.fence(), r.claims)], r.state()


def _release_exit(r: Run, e: Event) -> tuple[list[object], DriverState]:
    return [release(r.fence()), Exit()], D.STOPPED


def _hand_back_release_exit(r: Run, e: Event) -> tuple[list[object], DriverState]:
    hand_back = HandBack(command_id=0, claims=r.claims, error=None, max_failures=1)
    return [CancelTurn(), hand_back, release(r.fence()), Exit()], D.STOPPED


def _store_retry(r: Run, e: Event) -> tuple[list[object], DriverState]:
    return [pub("store_retry", WARNING)], r.state()


#: What every accepted (state, event type) pair does, in the canonical condition above: the
#: commands (normalised) and the state after. The keys must be exactly the driver's table.
EXPECTED: Final[dict[tuple[DriverState, type[Any]], Expect]] = {
    # A wake starts a stopped driver, retries a wait at once, and is remembered otherwise.
    (D.IDLE, Woken): _take,
    (D.WAITING, Woken): _take,
    (D.SLEEPING, Woken): _take,
    (D.STOPPED, Woken): _take,
    **{(s, Woken): _same for s in (D.ACQUIRING, D.CHECKING, *HOLDING)},
    # A timer at the deadline: look again, wake up, or renew (with the turn's claims, none
    # while committing or handing back); nothing where nothing is due.
    (D.IDLE, TimerFired): _same,
    (D.ACQUIRING, TimerFired): _same,
    (D.CHECKING, TimerFired): _same,
    (D.STOPPED, TimerFired): _same,
    (D.WAITING, TimerFired): lambda r, e: ([PeekQueue(command_id=0)], D.CHECKING),
    (D.SLEEPING, TimerFired): _take,
    (D.CLAIMING, TimerFired): _renew,
    (D.PEEKING, TimerFired): _renew,
    (D.LOADING, TimerFired): _renew_with_claims,
    (D.RUNNING, TimerFired): _renew_with_claims,
    (D.COMMITTING, TimerFired): _renew,
    (D.HANDING_BACK, TimerFired): _renew,
    # Releasing, only the stop is a deadline: then the lease is gone anyway.
    (D.RELEASING, TimerFired): _exit,
    # A stop: hand the turn's claims back, release, exit.
    (D.IDLE, StopRequested): _exit,
    (D.ACQUIRING, StopRequested): _exit,
    (D.WAITING, StopRequested): _exit,
    (D.CHECKING, StopRequested): _exit,
    (D.SLEEPING, StopRequested): _exit,
    (D.STOPPED, StopRequested): _same,
    (D.CLAIMING, StopRequested): _release_exit,
    (D.PEEKING, StopRequested): _release_exit,
    (D.LOADING, StopRequested): _hand_back_release_exit,
    (D.RUNNING, StopRequested): _hand_back_release_exit,
    (D.COMMITTING, StopRequested): _release_exit,  # the commit lands or not by itself
    (D.HANDING_BACK, StopRequested): _release_exit,
    (D.RELEASING, StopRequested): _release_exit,
    # The lease.
    (D.ACQUIRING, LeaseTaken): lambda r, e: ([claim_idle(e.lease.fence())], D.CLAIMING),
    **{(s, LeaseRenewed): _same for s in HOLDING},
    (D.RELEASING, LeaseReleased): _exit,
    # Claims and the queue.
    (D.CLAIMING, WorkClaimed): lambda r, e: ([LoadSession(command_id=0)], D.LOADING),
    (D.RUNNING, WorkClaimed): lambda r, e: ([("Commit", turn_of(r))], D.COMMITTING),
    (D.PEEKING, QueuePeeked): lambda r, e: ([release(r.fence())], D.RELEASING),
    (D.CHECKING, QueuePeeked): _exit,
    (D.HANDING_BACK, WorkHandedBack): lambda r, e: ([], D.CLAIMING),  # after a backoff
    # The turn.
    (D.LOADING, SessionLoaded): lambda r, e: (
        [pub("turn_started", INFO), pub("llm_request"), ("CallModel", 0)],
        D.RUNNING,
    ),
    (D.RUNNING, ModelAnswered): lambda r, e: (
        [pub("token_usage"), pub("text_delta"), claim_checkpoint(r.fence())],
        D.RUNNING,
    ),
    (D.RUNNING, ModelRaised): lambda r, e: (
        [pub("error"), ("Commit", turn_of(r))],
        D.COMMITTING,
    ),
    (D.RUNNING, ToolFinished): lambda r, e: (
        [pub("tool_call"), claim_checkpoint(r.fence())],
        D.RUNNING,
    ),
    (D.COMMITTING, Committed): lambda r, e: (
        [pub("turn_outcome", INFO), answered(r, e.result.head_revision), claim_idle(r.fence())],
        D.CLAIMING,
    ),
    # A busy store: the same call again after a backoff, said once as a warning.
    **{(s, StoreFailed): _store_retry for s in (*HOLDING, D.ACQUIRING, D.CHECKING)},
}


def test_the_table_holds_exactly_the_expected_pairs() -> None:
    from turnbuckle.sansio.driver import _TRANSITIONS

    assert set(_TRANSITIONS) == set(EXPECTED)
    assert {kind for _, kind in _TRANSITIONS} == set(EVENT_TYPES)


@pytest.mark.parametrize("kind", EVENT_TYPES, ids=lambda k: k.__name__)
@pytest.mark.parametrize("state", list(DriverState), ids=lambda s: s.name)
def test_every_state_and_event_type(state: DriverState, kind: type[Any]) -> None:
    how = way_for(state, kind)
    r = reach(state, how)
    event, at = canonical(kind, r)
    expect = EXPECTED.get((state, kind))
    if expect is not None:
        want, after = expect(r, event)
        assert norm(r.feed(event, at)) == want
        assert r.state() is after
        if isinstance(event, LeaseRenewed):
            assert r.driver.lease == event.lease
            if state is not D.RELEASING:  # releasing: no renewal is due any more
                assert r.driver.next_deadline() == r.now + TTL // 3
        return
    command_id = getattr(event, "command_id", None)
    assert command_id is not None, "only results are refused"
    if command_id not in r.outstanding:
        # Nothing is awaited in this state: the result is late, and ignored.
        assert state in (D.IDLE, D.WAITING, D.SLEEPING, D.STOPPED)
        before = snapshot(r.driver)
        assert r.feed(event, at) == []
        assert snapshot(r.driver) == before
    else:
        before = snapshot(r.driver)
        with pytest.raises(DriverError) as raised:
            r.driver.handle(event, at)
        assert str(raised.value) == (
            f"the session driver in state {state.value} cannot take {kind.__name__}"
        )
        assert snapshot(r.driver) == before
    assert probe(r) == probe(reach(state, how)), "the driver changed, or stopped working"


RESULT_TYPES: Final = list(RESULT_OF)


@pytest.mark.parametrize(("state", "how"), STATE_WAYS, ids=str)
def test_a_result_for_a_command_not_awaited_is_ignored(state: DriverState, how: str) -> None:
    r = reach(state, how)
    # Never sent, or sent and answered already (a duplicate): both are ignored, in any state.
    answered = [c for c in r.sent if isinstance(c, WithId) and c.command_id not in r.outstanding]
    cases = [(kind, 999_999) for kind in RESULT_TYPES] + [
        (kind, c.command_id)
        for c in answered
        for kind in RESULT_TYPES
        if isinstance(c, RESULT_OF[kind])
    ]
    for kind, command_id in cases:
        before = snapshot(r.driver)
        assert r.feed(dummy(kind, command_id)) == [], (kind, command_id)
        assert snapshot(r.driver) == before
    assert probe(r) == probe(reach(state, how))


@pytest.mark.parametrize(("state", "how"), STATE_WAYS, ids=str)
def test_a_result_of_the_wrong_kind_is_refused(state: DriverState, how: str) -> None:
    """A result naming an awaited command of another kind (a ToolFinished for a model call) is
    a host bug: DriverError, nothing changed (the DriverError docstring)."""
    wrong: list[str] = []
    for command in list(reach(state, how).outstanding.values()):
        for kind in RESULT_TYPES:
            if isinstance(command, RESULT_OF[kind]):
                continue
            r = reach(state, how)
            before = snapshot(r.driver)
            event = dummy(kind, getattr(command, "command_id", 0))
            try:
                out = r.driver.handle(event, r.now)
            except DriverError:
                if snapshot(r.driver) == before and probe(r) == probe(reach(state, how)):
                    continue
                wrong.append(f"{kind.__name__} for {type(command).__name__}: changed the driver")
            except Exception as exc:
                wrong.append(f"{kind.__name__} for {type(command).__name__}: raised {exc!r}")
            else:
                wrong.append(
                    f"{kind.__name__} for {type(command).__name__}: taken, returned {norm(out)}"
                )
    assert not wrong, "\n".join(wrong)


# --- 2. scenarios ---------------------------------------------------------------------------


def exact(commands: Sequence[Command]) -> list[Command]:
    """Commands with their ids zeroed (ids are only compared for uniqueness)."""
    return [attrs.evolve(c, command_id=0) if isinstance(c, WithId) else c for c in commands]


def event(kind: str, data: Any, turn_id: str | None, severity: Severity = DEBUG) -> Publish:
    return Publish(event=SessionEvent(type=kind, data=data, turn_id=turn_id, severity=severity))


def user(batch: QueuedBatchRow, text: str) -> Message:
    return Message(message_id=f"{batch.batch_id}:0", role="user", text=text)


def usage_data(input_tokens: int, output_tokens: int, total: TokenUsage) -> dict[str, Any]:
    return {
        "usage": attrs.asdict(TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens)),
        "cumulative": attrs.asdict(total),
    }


def expected_commit(
    *,
    turn_id: str,
    history: Sequence[Message],
    new: Sequence[Message],
    head_revision: int,
    claims: Sequence[QueuedWorkClaim],
    outcome: dict[str, Any],
    iteration: int,
    usage: TokenUsage,
    fence: LeaseFence,
) -> RuntimeCommit:
    """The commit the spec describes: the new messages as nodes chained to the history, the
    checkpoint, the usage, every claim completed, the outcome, and a stamp over the rest."""
    parent = history[-1].message_id if history else None
    nodes = []
    for message in new:
        nodes.append(
            SessionNode(
                node_id=message.message_id, parent_node_id=parent, payload=message_payload(message)
            )
        )
        parent = message.message_id
    body = RuntimeCommit(
        session_id=SID,
        expected_head_revision=head_revision,
        graph=GraphAppend(nodes=nodes),
        checkpoint=SessionCheckpoint(
            turn_state={"turn_id": turn_id, "outcome": outcome, "iteration": iteration}
        ),
        usage=[UsageEntry(source="turn", model="model", usage=usage)],
        completed_claims=[c.completion() for c in claims],
        outcome=outcome,
    )
    stamp = TurnCommitStamp(
        session_id=SID, turn_id=turn_id, turn_commit_hash=turn_commit_hash(body)
    )
    return attrs.evolve(body, lease=fence, turn_commit=stamp)


ANSWER_4: Final = {
    "kind": "assistant_message",
    "text": "4",
    "tool_name": None,
    "value": None,
    "reason": None,
}


def test_a_simple_turn() -> None:
    r = Run()
    batch = r.store.enqueue("what is 2+2?", r.now)
    ticket = batch.batch_id
    turn = f"turn:{ticket}"
    assert exact(r.feed(Woken())) == [take()]
    assert r.state() is D.ACQUIRING and r.driver.next_deadline() is None
    assert exact(r.answer(TakeLease)) == [claim_idle(r.fence())]
    lease = r.driver.lease
    assert lease is not None and lease.owner_id == OWNER
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]
    [claim] = r.claims
    question = user(batch, "what is 2+2?")
    request = ModelRequest(messages=[question], tools=("add", "mul"), iteration=0)
    assert exact(r.answer(LoadSession)) == [
        event("turn_started", {"tickets": [ticket]}, turn, INFO),
        event("llm_request", {"iteration": 0, "message_count": 1}, turn),
        CallModel(command_id=0, request=request),
    ]
    usage = TokenUsage(input_tokens=10, output_tokens=2)
    assert exact(r.model(text_reply())) == [
        event("token_usage", usage_data(10, 2, usage), turn),
        event("text_delta", {"text": "4"}, turn),
        claim_checkpoint(r.fence()),
    ]
    answer = Message(message_id=f"{turn}:m1", role="assistant", text="4")
    commit = expected_commit(
        turn_id=turn,
        history=[],
        new=[question, answer],
        head_revision=0,
        claims=[claim],
        outcome=ANSWER_4,
        iteration=0,
        usage=usage,
        fence=r.fence(),
    )
    assert exact(r.answer(ClaimWork)) == [Commit(command_id=0, commit=commit)]
    sent = r.last(Commit).commit
    assert sent.turn_commit.turn_commit_hash == turn_commit_hash(
        attrs.evolve(sent, turn_commit=None, lease=None)
    )
    assert r.state() is D.COMMITTING
    assert exact(r.answer(Commit)) == [
        event(
            "turn_outcome",
            {"tickets": [ticket], "outcome": ANSWER_4, "head_revision": 1},
            turn,
            INFO,
        ),
        answered(r),
        claim_idle(r.fence()),
    ]
    assert exact(r.answer(ClaimWork)) == [PeekQueue(command_id=0)]
    assert exact(r.answer(PeekQueue)) == [release(r.fence())]
    assert r.state() is D.RELEASING
    assert exact(r.answer(ReleaseLease)) == [Exit()]
    assert r.state() is D.STOPPED and r.driver.finished
    assert r.driver.lease is None and r.driver.next_deadline() is None
    # The store: the work delivered with the turn's outcome, the lease free, the history kept.
    assert r.store.rows == [] and r.store.lease_row.lease_token is None
    [delivered] = r.store.deliveries
    assert (delivered.row.batch_id, delivered.turn_id) == (ticket, turn)
    assert [n.node_id for n in r.store.nodes] == [question.message_id, answer.message_id]


def test_the_next_turn_continues_the_history() -> None:
    r = Run()
    first = r.store.enqueue("one", r.now)
    # Not injected into the first turn: it waits for that turn's commit.
    second = r.store.enqueue("two", r.now, delivery=DeliveryPolicy.AFTER_CURRENT_TURN_COMMIT)
    r.feed(Woken())
    r.answer(TakeLease)
    r.answer(ClaimWork)
    r.answer(LoadSession)
    r.model(text_reply("1"))
    r.answer(ClaimWork)
    out = r.answer(Commit)
    assert exact(out)[-1] == claim_idle(r.fence())  # the next message at once
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]
    history = [
        user(first, "one"),
        Message(message_id=f"turn:{first.batch_id}:m1", role="assistant", text="1"),
    ]
    turn = f"turn:{second.batch_id}"
    out = r.answer(LoadSession)
    assert norm(out) == [pub("turn_started", INFO), pub("llm_request"), ("CallModel", 0)]
    assert r.last(CallModel).request.messages == (*history, user(second, "two"))
    r.model(text_reply("2"))
    answer = Message(message_id=f"{turn}:m1", role="assistant", text="2")
    commit = expected_commit(
        turn_id=turn,
        history=history,
        new=[user(second, "two"), answer],
        head_revision=1,
        claims=r.claims[1:],
        outcome={**ANSWER_4, "text": "2"},
        iteration=0,
        usage=TokenUsage(input_tokens=10, output_tokens=2),
        fence=r.fence(),
    )
    assert exact(r.answer(ClaimWork)) == [Commit(command_id=0, commit=commit)]
    assert norm(r.answer(Commit)) == [
        pub("turn_outcome", INFO),
        answered(r, 2),
        claim_idle(r.fence()),
    ]
    assert r.store.head is not None and r.store.head.head_revision == 2


def test_a_lease_held_by_another_runtime_is_waited_for() -> None:
    r = Run()
    r.store.take_lease(OTHER, TTL, r.now)
    batch = r.store.enqueue("hi", r.now)
    r.feed(Woken())
    assert r.answer(TakeLease) == []
    assert r.state() is D.WAITING and r.driver.lease is None
    # Look again within a third of the other's ttl, jittered (not in lockstep with it).
    deadline = r.driver.next_deadline()
    assert deadline is not None and T0 + TTL // 6 <= deadline <= T0 + TTL // 3
    assert r.fire(deadline - 1) == []
    assert exact(r.fire()) == [PeekQueue(command_id=0)]
    assert r.state() is D.CHECKING and r.driver.next_deadline() is None
    # Work is left: try the lease again (still held: wait again).
    assert exact(r.answer(PeekQueue)) == [take()]
    assert r.answer(TakeLease) == [] and r.state() is D.WAITING
    # A wake while waiting tries at once.
    assert exact(r.feed(Woken())) == [take()]
    assert r.answer(TakeLease) == [] and r.state() is D.WAITING
    # The other runtime answers the message and keeps its lease: nothing is left, exit.
    r.store.rows = [row for row in r.store.rows if row.batch_id != batch.batch_id]
    assert exact(r.fire()) == [PeekQueue(command_id=0)]
    assert r.answer(PeekQueue) == [Exit()]
    assert r.state() is D.STOPPED and r.driver.next_deadline() is None


def test_work_due_later_is_slept_for_without_the_lease() -> None:
    r = Run()
    r.store.enqueue("later", r.now, available_at_ms=T0 + 60_000)
    r.feed(Woken())
    r.answer(TakeLease)
    assert exact(r.answer(ClaimWork)) == [PeekQueue(command_id=0)]
    assert exact(r.answer(PeekQueue)) == [release(r.fence())]
    assert r.answer(ReleaseLease) == []
    assert r.state() is D.SLEEPING and r.driver.lease is None
    assert r.driver.next_deadline() == T0 + 60_000
    assert exact(r.fire()) == [take()]
    assert exact(r.answer(TakeLease)) == [claim_idle(r.fence())]
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]
    # Without the lease, a peek that finds work due later sleeps too.
    r = Run()
    r.store.take_lease(OTHER, TTL, r.now)
    r.feed(Woken())
    r.answer(TakeLease)
    r.fire()
    assert (
        r.feed(QueuePeeked(command_id=r.last(PeekQueue).command_id, ready=False, due_in_ms=700))
        == []
    )
    assert r.state() is D.SLEEPING and r.driver.next_deadline() == r.now + 700


def test_a_wake_during_the_last_claim_is_not_lost() -> None:
    r = reach(D.CLAIMING)
    r.store.rows.clear()
    # The claim finds nothing; meanwhile a message is submitted and the actor woken.
    nothing = r.store.answer(r.last(ClaimWork), r.now)
    batch = r.store.enqueue("late", r.now)
    assert r.feed(Woken()) == []
    assert exact(r.feed(nothing)) == [claim_idle(r.fence())]  # claim again, not exit
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]
    assert tickets(r) == (batch.batch_id,)


def test_a_wake_during_the_peek_is_not_lost() -> None:
    r = reach(D.PEEKING)
    peeked = r.store.answer(r.last(PeekQueue), r.now)
    batch = r.store.enqueue("late", r.now)
    assert r.feed(Woken()) == []
    assert exact(r.feed(peeked)) == [claim_idle(r.fence())]
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]
    assert tickets(r) == (batch.batch_id,)
    # The wake was used up by that claim: an empty queue afterwards means exit.
    r = reach(D.PEEKING)
    r.feed(Woken())
    r.answer(PeekQueue)
    assert exact(r.answer(ClaimWork)) == [PeekQueue(command_id=0)]
    assert exact(r.answer(PeekQueue)) == [release(r.fence())]


def test_a_wake_during_the_release_is_not_lost() -> None:
    r = reach(D.RELEASING)
    released = r.store.answer(r.last(ReleaseLease), r.now)
    r.store.enqueue("late", r.now)
    assert r.feed(Woken()) == []
    assert exact(r.feed(released)) == [take()]  # take the lease again, not exit
    assert r.driver.lease is None and r.state() is D.ACQUIRING
    assert exact(r.answer(TakeLease)) == [claim_idle(r.fence())]
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]


def test_a_wake_while_checking_without_the_lease_is_not_lost() -> None:
    r = reach(D.CHECKING)
    peeked = r.store.answer(r.last(PeekQueue), r.now)
    r.store.enqueue("late", r.now)
    assert r.feed(Woken()) == []
    assert exact(r.feed(peeked)) == [take()]


def test_a_wake_after_exit_starts_again() -> None:
    r = reach(D.STOPPED)
    batch = r.store.enqueue("again", r.now)
    assert exact(r.feed(Woken())) == [take()]
    assert exact(r.answer(TakeLease)) == [claim_idle(r.fence())]
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]
    assert tickets(r) == (batch.batch_id,)
    ids = [c.command_id for c in r.sent if isinstance(c, WithId)]
    assert len(ids) == len(set(ids)), "command ids are never reused"


def test_tool_calls_run_one_command_each_and_unknown_tools_are_answered() -> None:
    r = reach(D.RUNNING)
    turn = turn_of(r)
    calls = tool_reply("add", "nope", "mul").tool_calls
    out = r.model(tool_reply("add", "nope", "mul"))

    def started(call: ToolCall) -> Publish:
        data = {"phase": "started", "call_id": call.call_id, "name": call.name, "args": call.args}
        return event("tool_call", data, turn)

    def finished(call: ToolCall, output: Any, is_error: bool = False) -> Publish:
        data = {
            "phase": "finished",
            "call_id": call.call_id,
            "name": call.name,
            "output": output,
            "is_error": is_error,
        }
        return event("tool_call", data, turn)

    assert exact(out) == [
        event("token_usage", usage_data(0, 0, TokenUsage()), turn),
        started(calls[0]),
        RunTool(command_id=0, call=calls[0]),
        started(calls[1]),
        finished(calls[1], "no tool named 'nope'", is_error=True),  # no RunTool for it
        started(calls[2]),
        RunTool(command_id=0, call=calls[2]),
    ]
    # Results come back in any order; each is reported as it finishes.
    assert exact(r.tool("c2", output=6)) == [finished(calls[2], 6)]
    # A tool's result answers its call, whatever ids the tool put in it.
    run = next(c for c in r.sent if isinstance(c, RunTool) and c.call.call_id == "c0")
    stray = ToolResult(call_id="zz", name="other", output=3)
    out = r.feed(ToolFinished(command_id=run.command_id, result=stray))
    assert exact(out) == [finished(calls[0], 3), claim_checkpoint(r.fence())]
    out = r.answer(ClaimWork)
    assert norm(out) == [pub("llm_request"), ("CallModel", 1)]
    messages = r.last(CallModel).request.messages
    assert [(m.role, m.tool_call_id, m.text) for m in messages[2:]] == [
        ("tool", "c0", "3"),
        ("tool", "c1", "\"no tool named 'nope'\""),
        ("tool", "c2", "6"),
    ]
    # Every call: one started event, then one finished event, started in call order.
    phases = [
        (data_of(c)["call_id"], data_of(c)["phase"])
        for c in r.sent
        if isinstance(c, Publish) and c.event.type == "tool_call"
    ]
    assert [i for i, p in phases if p == "started"] == ["c0", "c1", "c2"]
    for call_id in ("c0", "c1", "c2"):
        assert [p for i, p in phases if i == call_id] == ["started", "finished"]
    # A late or repeated tool result is ignored.
    assert r.feed(ToolFinished(command_id=run.command_id, result=stray)) == []


def test_a_checkpoint_claim_injects_work_that_the_same_commit_completes() -> None:
    r = reach(D.RUNNING)
    first = r.claims[0].batches[0].batch_id
    r.model(tool_reply("add"))
    second = r.store.enqueue("and 3+3?", r.now)  # submitted while the tool runs
    assert exact(r.tool("c0"))[-1] == claim_checkpoint(r.fence())
    out = r.answer(ClaimWork)
    turn = turn_of(r)
    assert exact(out[:2]) == [
        event("injected_input", {"count": 1, "checkpoint": "after_work"}, turn),
        event("llm_request", {"iteration": 1, "message_count": 4}, turn),
    ]
    assert norm(out[2:]) == [("CallModel", 1)]
    messages = r.last(CallModel).request.messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "user"]
    assert (messages[-1].role, messages[-1].text) == ("user", "and 3+3?")
    # The renewal now carries both claims.
    assert exact(r.fire()) == [renew(r.fence(), r.claims)]
    assert len(r.claims) == 2
    r.answer(RenewLease)
    r.model(text_reply())
    r.answer(ClaimWork)  # nothing more
    commit = r.last(Commit).commit
    assert commit.completed_claims == tuple(c.completion() for c in r.claims)
    out = r.answer(Commit)
    assert exact(out)[:2] == [
        event(
            "turn_outcome",
            {"tickets": [first, second.batch_id], "outcome": ANSWER_4, "head_revision": 1},
            turn,
            INFO,
        ),
        answered(r),
    ]
    assert [d.row.batch_id for d in r.store.deliveries] == [first, second.batch_id]
    assert r.store.rows == []


def test_the_lease_is_renewed_every_third_of_its_ttl() -> None:
    r = reach(D.LOADING)
    lease = r.driver.lease
    assert lease is not None and r.driver.next_deadline() == T0 + TTL // 3
    assert r.fire(T0 + TTL // 3 - 1) == []
    out = r.fire()
    assert exact(out) == [renew(r.fence(), r.claims)]  # with the turn's claims
    # In flight: only the stop, a little before the expiry.
    assert r.driver.next_deadline() == lease.expires_at_ms - STOP_EARLY
    assert r.fire(r.now + 1) == []  # not twice
    assert r.answer(RenewLease) == []
    renewed = r.driver.lease
    assert renewed is not None and renewed.expires_at_ms == r.now + TTL
    assert renewed.fence() == lease.fence()
    assert r.driver.next_deadline() == r.now + TTL // 3
    # The loaded turn runs with the renewed claim; while committing, no claims are renewed
    # (the commit settles them).
    r.answer(LoadSession)
    r.model(text_reply())
    r.answer(ClaimWork)
    assert r.state() is D.COMMITTING
    assert exact(r.fire()) == [renew(r.fence())]


def test_a_grant_whose_reply_comes_late_is_renewed_before_the_driver_stops_under_it() -> None:
    """Renewals come every third of the ttl "so two renewals can fail before it runs out"
    (the keeper's docstring); a grant that reaches the driver late must still be renewed
    before the driver gives it up, not lost unrenewed."""
    r = Run()
    r.store.enqueue("hi", r.now)
    r.feed(Woken())
    granted = r.store.answer(r.last(TakeLease), r.now)  # until T0 + TTL, by the store
    r.feed(granted, at=T0 + 9_000)  # the reply comes late
    deadline = r.driver.next_deadline()
    assert deadline is not None and deadline < T0 + TTL - STOP_EARLY
    assert exact(r.fire()) == [renew(r.fence())]


def test_a_transient_renewal_failure_is_retried_before_the_expiry() -> None:
    r = reach(D.RUNNING)
    r.fire()
    # Said once as a warning (and at DEBUG after), like every store call retried.
    assert norm(r.fail(RenewLease, BUSY)) == [pub("store_retry", WARNING)]
    deadline = r.driver.next_deadline()
    assert deadline is not None and r.now + 12 <= deadline <= r.now + 25
    assert exact(r.fire()) == [renew(r.fence(), r.claims)]
    # Failing until the very end: every try is before the stop, then the lease is lost.
    stop = r.lease().expires_at_ms - STOP_EARLY
    tries = 0
    while True:
        assert norm(r.fail(RenewLease, BUSY)) == [pub("store_retry", DEBUG)]
        deadline = r.driver.next_deadline()
        assert deadline is not None and r.now < deadline <= stop
        if deadline == stop:
            break
        assert exact(r.fire()) == [renew(r.fence(), r.claims)]
        tries += 1
    assert tries >= 5  # backing off, capped: not once, not a flood
    fence = r.fence()
    out = r.fire(stop)
    # Given up before it is taken again: the next grant is a new one.
    assert norm(out) == [pub("lease_lost", WARNING), CancelTurn(), release(fence)]
    assert exact(r.answer(ReleaseLease)) == [take()]


def test_a_lease_run_out_by_the_clock_cancels_the_turn_and_late_results_are_ignored() -> None:
    r = reach(D.RUNNING)
    lease = r.driver.lease
    assert lease is not None
    r.model(tool_reply("add"))
    tool = r.last(RunTool)
    r.fire()  # a renewal, never answered
    renewal = r.last(RenewLease)
    out = r.fire(lease.expires_at_ms)
    turn = turn_of(r)
    assert exact(out) == [
        event(
            "lease_lost",
            {"reason": "the lease ran out before it could be renewed", "tickets": list(tickets(r))},
            turn,
            WARNING,
        ),
        CancelTurn(),
        release(lease.fence()),
    ]
    assert r.state() is D.RELEASING and r.driver.lease is None
    before = snapshot(r.driver)
    late = ToolResult(call_id="c0", name="add", output=4)
    assert r.feed(ToolFinished(command_id=tool.command_id, result=late)) == []
    assert r.feed(r.store.answer(renewal, r.now)) == []  # refused by the store, or not
    assert r.feed(LeaseRenewed(command_id=renewal.command_id, lease=lease)) == []
    assert snapshot(r.driver) == before
    # Released, then a new grant: the work is claimed again from the head of the queue.
    assert exact(r.answer(ReleaseLease)) == [take()]
    assert exact(r.answer(TakeLease)) == [claim_idle(r.fence())]
    assert r.fence() != lease.fence()
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]
    assert r.claims[-1].batches == r.claims[0].batches


# --- store errors, for each store command ---------------------------------------------------

#: Each store command, in the state that sends it: (state, way, command type).
SITUATIONS: Final[dict[str, tuple[DriverState, str, type[Any]]]] = {
    "TakeLease": (D.ACQUIRING, MODEL, TakeLease),
    "RenewLease": (D.RUNNING, RENEWING, RenewLease),
    "ClaimWork(idle)": (D.CLAIMING, MODEL, ClaimWork),
    "ClaimWork(checkpoint)": (D.RUNNING, CHECKPOINT, ClaimWork),
    "PeekQueue": (D.PEEKING, MODEL, PeekQueue),
    "PeekQueue(no lease)": (D.CHECKING, MODEL, PeekQueue),
    "LoadSession": (D.LOADING, MODEL, LoadSession),
    "Commit": (D.COMMITTING, MODEL, Commit),
    "HandBack": (D.HANDING_BACK, MODEL, HandBack),
    "ReleaseLease": (D.RELEASING, MODEL, ReleaseLease),
}
CORRUPT: Final = CorruptRecordError("sessions", SID, "not JSON")
TOO_LARGE: Final = PayloadTooLarge(9_000_000, 1_000_000)
LEASE_GONE: Final = SessionExecutionLeaseExpired(SID)


def situation(name: str) -> tuple[Run, Any]:
    """A driver waiting for the result of the store command ``name``, and that command."""
    state, how, kind = SITUATIONS[name]
    r = reach(state, how)
    command = r.last(kind)
    assert command.command_id in r.outstanding
    return r, command


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def turn_id_of(r: Run) -> str | None:
    return turn_of(r) if r.state() in (D.LOADING, D.RUNNING, D.COMMITTING) else None


@pytest.mark.parametrize("name", list(SITUATIONS))
def test_a_busy_store_is_retried_with_backoff_and_never_fatal(name: str) -> None:
    r, command = situation(name)
    state, turn = r.state(), turn_id_of(r)
    windows = [(12, 25), (25, 50), (50, 100), (100, 200)]
    tries = 4 if name == "ReleaseLease" else len(windows)  # a release gives up at the fifth
    for attempt, (low, high) in enumerate(windows[:tries], 1):
        out = r.fail(type(command), BUSY)
        deadline = r.driver.next_deadline()
        assert deadline is not None and r.now + low <= deadline <= r.now + high
        data = {
            "operation": type(command).__name__,
            "error": describe(BUSY),
            "attempt": attempt,
            "delay_ms": deadline - r.now,
        }
        severity = WARNING if attempt == 1 else DEBUG
        assert exact(out) == [event("store_retry", data, turn, severity)]
        assert r.state() is state
        assert r.fire(deadline - 1) == []
        # The same call again (a commit with the same stamp, so it applies at most once).
        assert exact(r.fire()) == exact([command])
    # It finally goes through.
    assert r.answer(type(command)) != [] or name in ("RenewLease", "HandBack")
    if name == "ReleaseLease":
        r, command = situation(name)
        for _ in range(4):
            r.fail(ReleaseLease, BUSY)
            r.fire()
        # The fifth busy release: the lease is left to run out by itself.
        assert r.fail(ReleaseLease, BUSY) == [Exit()]
        assert r.driver.lease is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("RenewLease", [pub("lease_lost", WARNING), CancelTurn(), "release"]),
        ("ClaimWork(idle)", [pub("lease_lost", WARNING), "release"]),
        ("ClaimWork(checkpoint)", [pub("lease_lost", WARNING), CancelTurn(), "release"]),
        ("Commit", [pub("lease_lost", WARNING), CancelTurn(), "release"]),
        ("ReleaseLease", [Exit()]),  # gone anyway
    ],
)
def test_a_lost_lease_ends_the_turn_and_is_taken_again(name: str, expected: list[object]) -> None:
    r, command = situation(name)
    fence = r.fence()
    turn_calls = [c for c in r.outstanding.values() if isinstance(c, CallModel | RunTool)]
    out = r.fail(type(command), LEASE_GONE)
    # The grant is given up (a no-op if it is gone already), so the next one is new.
    assert norm(out) == [release(fence) if c == "release" else c for c in expected]
    assert r.driver.lease is None
    if name == "ReleaseLease":
        assert r.state() is D.STOPPED
        return
    lost = next(c for c in out if isinstance(c, Publish)).event
    assert lost.data == {"reason": describe(LEASE_GONE), "tickets": list(tickets(r))}
    assert r.state() is D.RELEASING and r.driver.next_deadline() is None
    for call in turn_calls:  # the cancelled turn's results are ignored
        assert r.feed(answer_of(r, call)) == []
    assert exact(r.answer(ReleaseLease)) == [take()]
    assert r.state() is D.ACQUIRING and r.driver.next_deadline() is None
    # The other runtime's grant ran out: ours voids the old claims; the head is claimed again.
    r.now += TTL
    assert exact(r.answer(TakeLease)) == [claim_idle(r.fence())]
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]


@pytest.mark.parametrize(
    "error", [QueuedWorkClaimExpired(SID, "qwc:1:1"), HeadRevisionConflict(0, 1)]
)
def test_a_commit_that_lost_its_claims_or_head_drops_the_turn(error: BaseException) -> None:
    r, _ = situation("Commit")
    turn = turn_of(r)
    out = r.fail(Commit, error)
    assert exact(out) == [
        event("turn_lost", {"reason": describe(error), "tickets": list(tickets(r))}, turn, WARNING),
        CancelTurn(),
        claim_idle(r.fence()),
    ]
    assert r.state() is D.CLAIMING
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]
    assert r.claims[-1].batches[0].batch_id == r.claims[0].batches[0].batch_id


@pytest.mark.parametrize("state", [D.LOADING, D.RUNNING])
def test_a_renewal_that_finds_the_turns_claim_void_drops_the_turn(state: DriverState) -> None:
    r = reach(state, RENEWING)
    error = QueuedWorkClaimExpired(SID, r.claims[0].claim_id)
    out = r.fail(RenewLease, error)
    assert norm(out) == [pub("turn_lost", WARNING), CancelTurn(), claim_idle(r.fence())]
    assert r.state() is D.CLAIMING


def test_a_renewal_that_finds_another_claim_void_changes_nothing() -> None:
    r = reach(D.CLAIMING, RENEWING)
    assert r.fail(RenewLease, QueuedWorkClaimExpired(SID, "qwc:old")) == []
    assert r.state() is D.CLAIMING and r.driver.lease is not None


@pytest.mark.parametrize("name", list(SITUATIONS))
def test_a_closed_store_stops_the_driver(name: str) -> None:
    r, command = situation(name)
    turn = turn_id_of(r)
    closed = StoreClosedError("memory")
    out = r.fail(type(command), closed)
    cancel = [CancelTurn()] if turn is not None else []
    assert exact(out) == [
        event("session_stopped", {"reason": describe(closed)}, turn),
        *cancel,
        Exit(),
    ]
    assert r.state() is D.STOPPED and r.driver.lease is None
    assert r.driver.next_deadline() is None


@pytest.mark.parametrize("name", ["ClaimWork(checkpoint)", "LoadSession", "Commit"])
def test_a_failing_turn_is_handed_back_counted_then_the_queue_is_claimed_again(
    name: str,
) -> None:
    r, command = situation(name)
    error = TOO_LARGE if name == "Commit" else CORRUPT
    turn, claims = turn_of(r), tuple(r.claims)
    out = r.fail(type(command), error)
    assert exact(out) == [
        event("turn_failed", {"error": describe(error), "tickets": list(tickets(r))}, turn, ERROR),
        CancelTurn(),
        HandBack(command_id=0, claims=claims, error=describe(error), max_failures=3),
    ]
    assert r.state() is D.HANDING_BACK and r.driver.last_error == describe(error)
    # The failure is counted in the store; after a backoff, the queue is claimed again.
    assert r.answer(HandBack) == []
    assert r.store.rows[0].failures == 1 and r.store.rows[0].claim_id is None
    assert r.state() is D.CLAIMING
    deadline = r.driver.next_deadline()
    assert deadline is not None and r.now + 12 <= deadline <= r.now + 25
    assert r.fire(deadline - 1) == []
    assert exact(r.fire()) == [claim_idle(r.fence())]
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]


@pytest.mark.parametrize(
    ("name", "doing", "state"),
    [
        ("TakeLease", "TakeLease", D.ACQUIRING),
        ("RenewLease", "renewing the lease", D.RUNNING),
        ("ClaimWork(idle)", "ClaimWork", D.CLAIMING),
        ("PeekQueue", "PeekQueue", D.PEEKING),
        ("PeekQueue(no lease)", "PeekQueue", D.CHECKING),
        ("HandBack", "handing work back", D.CLAIMING),
    ],
)
def test_a_failing_store_call_outside_a_turn_is_reported_and_tried_later(
    name: str, doing: str, state: DriverState
) -> None:
    r, command = situation(name)
    out = r.fail(type(command), CORRUPT)
    turn = turn_of(r) if name == "RenewLease" else None
    assert exact(out) == [
        event("session_error", {"while": doing, "error": describe(CORRUPT)}, turn, ERROR)
    ]
    assert r.state() is state and r.driver.last_error == describe(CORRUPT)
    again = claim_idle(r.fence()) if name == "HandBack" else attrs.evolve(command, command_id=0)
    if name == "RenewLease":
        again = renew(r.fence(), r.claims)
    assert exact(r.fire()) == [again]


def test_a_failing_release_is_reported_and_the_driver_exits() -> None:
    r, _ = situation("ReleaseLease")
    assert norm(r.fail(ReleaseLease, CORRUPT)) == [pub("session_error", ERROR), Exit()]
    assert r.state() is D.STOPPED and r.driver.lease is None


def test_a_hand_back_that_parks_work_says_so_and_resolves_it() -> None:
    r = Run(max_failures=2)
    batch = r.store.enqueue("poison", r.now)
    r.feed(Woken())
    r.answer(TakeLease)
    for failures in (1, 2):
        r.answer(ClaimWork)
        out = r.fail(LoadSession, CORRUPT)
        assert out[-1] == HandBack(
            command_id=r.last(HandBack).command_id,
            claims=[r.claims[-1]],
            error=describe(CORRUPT),
            max_failures=2,
        )
        out = r.answer(HandBack)
        if failures == 1:
            assert out == []
            low, high = 12, 25
        else:
            [parked] = r.store.rows
            assert parked.parked
            assert exact(out) == [
                event(
                    "work_parked",
                    {"ticket": batch.batch_id, "failures": 2, "error": describe(CORRUPT)},
                    None,
                    ERROR,
                ),
                Resolve(batch_ids=[batch.batch_id]),
            ]
            low, high = 25, 50  # the second failure in a row waits longer
        deadline = r.driver.next_deadline()
        assert deadline is not None and r.now + low <= deadline <= r.now + high
        assert exact(r.fire()) == [claim_idle(r.fence())]
    # Parked work is not claimed: the driver goes on to exit.
    assert exact(r.answer(ClaimWork)) == [PeekQueue(command_id=0)]
    assert exact(r.answer(PeekQueue)) == [release(r.fence())]


def test_a_history_that_is_not_messages_fails_the_turn() -> None:
    r = reach(D.LOADING)
    load = r.last(LoadSession)
    read = SessionRead(
        session_id=SID,
        head_revision=3,
        config=None,
        agent_frames=(),
        current_agent_frame_id=None,
        nodes=(SessionNode(node_id="n1", payload={"not": "a message"}),),
        leaf_node_id="n1",
        checkpoint=SessionCheckpoint(),
        checkpoint_ref="r",
        usage=(),
    )
    out = r.feed(SessionLoaded(command_id=load.command_id, read=read))
    error = r.last(HandBack).error
    assert error.startswith("the session's history cannot be read: ")
    assert exact(out) == [
        event("turn_failed", {"error": error, "tickets": list(tickets(r))}, turn_of(r), ERROR),
        CancelTurn(),
        HandBack(command_id=0, claims=r.claims, error=error, max_failures=3),
    ]
    assert r.state() is D.HANDING_BACK


def test_a_commit_whose_reply_was_lost_past_the_lease_is_retried_and_answered() -> None:
    r, command = situation("Commit")
    lease = r.driver.lease
    assert lease is not None
    # The store applies the commit, but its reply is lost (the call reports busy).
    r.store.answer(command, r.now)
    assert norm(r.fail(Commit, BUSY)) == [pub("store_retry", WARNING)]
    # The lease runs out before the retry: the commit still decides what happened.
    # The same commit, the same stamp, retried as it falls due with the lease's end.
    assert exact(r.fire(lease.expires_at_ms)) == exact([command])
    assert r.state() is D.COMMITTING
    out = r.answer(Commit)  # a replay: answered from the stamp, without a lease
    assert norm(out) == [
        pub("turn_outcome", INFO),
        answered(r),
        pub("lease_lost", WARNING),
        release(lease.fence()),
    ]
    assert data_of(out[0])["head_revision"] == 1
    assert len(r.store.applied) == 1
    assert r.state() is D.RELEASING and r.driver.lease is None
    assert exact(r.answer(ReleaseLease)) == [take()]
    assert exact(r.answer(TakeLease)) == [claim_idle(r.fence())]


def test_a_commit_that_did_not_land_before_the_lease_ran_out_drops_the_turn() -> None:
    r, _ = situation("Commit")
    lease = r.driver.lease
    assert lease is not None
    r.fail(Commit, BUSY)
    assert [type(c) for c in r.fire(lease.expires_at_ms)] == [Commit]
    # The retry finds no stamp and no live lease: the turn is over, the work claimed again.
    out = r.answer(Commit)
    assert norm(out) == [pub("lease_lost", WARNING), CancelTurn(), release(lease.fence())]
    assert r.store.applied == []
    assert exact(r.answer(ReleaseLease)) == [take()]
    assert exact(r.answer(TakeLease)) == [claim_idle(r.fence())]
    assert exact(r.answer(ClaimWork)) == [LoadSession(command_id=0)]


def test_a_renewal_refused_while_committing_waits_for_the_commit() -> None:
    """The lease is lost while the commit is out: the commit's answer decides, as when the
    lease runs out by the clock (above)."""
    r = reach(D.COMMITTING, RENEWING)
    fence = r.fence()
    assert r.fail(RenewLease, LEASE_GONE) == []
    assert r.state() is D.COMMITTING and r.driver.lease is not None
    out = r.answer(Commit)
    assert norm(out) == [
        pub("turn_outcome", INFO),
        answered(r),
        pub("lease_lost", WARNING),
        release(fence),
    ]


def test_a_stop_hands_the_turn_back_and_releases_the_lease() -> None:
    r = reach(D.RUNNING)
    r.model(tool_reply("add"))
    claims, fence = tuple(r.claims), r.fence()
    out = r.feed(StopRequested())
    assert exact(out) == [
        CancelTurn(),
        HandBack(command_id=0, claims=claims, error=None, max_failures=1),
        release(fence),
        Exit(),
    ]
    assert r.state() is D.STOPPED and r.driver.lease is None
    assert r.driver.next_deadline() is None
    for command in out:
        if isinstance(command, HandBack | ReleaseLease):
            assert r.feed(r.store.answer(command, r.now)) == []  # results after exit: ignored
    # The work is back in the queue, unclaimed and not counted as failed; the lease is free.
    [row] = r.store.rows
    assert (row.claim_id, row.failures) == (None, 0)
    assert r.store.lease_row.lease_token is None
    late = ToolResult(call_id="c0", name="add", output=4)
    assert r.feed(ToolFinished(command_id=r.last(RunTool).command_id, result=late)) == []


@pytest.mark.parametrize("state", [D.ACQUIRING, D.CHECKING])
def test_a_stop_while_a_store_call_is_out_ignores_its_late_result(state: DriverState) -> None:
    """After an exit, a late result is ignored (the module docstring), and a wake starts
    the driver again with its own calls."""
    r = reach(state)
    late = r.outstanding[max(r.outstanding)]
    assert r.feed(StopRequested()) == [Exit()]
    result = r.store.answer(late, r.now)
    before = snapshot(r.driver)
    assert r.feed(result) == []
    assert snapshot(r.driver) == before
    assert exact(r.feed(Woken())) == [take()]


def test_a_restart_does_not_take_a_result_meant_for_the_stopped_run() -> None:
    r = reach(D.ACQUIRING)
    old = r.last(TakeLease)
    r.feed(StopRequested())
    r.feed(Woken())
    new = r.last(TakeLease)
    assert new.command_id != old.command_id
    # The old call's result comes in first; the driver must not take it for the new one.
    r.feed(LeaseTaken(command_id=old.command_id, lease=None))
    assert r.state() is D.ACQUIRING
    assert exact(r.answer(TakeLease)) == [claim_idle(r.fence())]


@pytest.mark.parametrize(("state", "how"), STATE_WAYS, ids=str)
def test_a_timer_at_the_deadline_moves_the_deadline_on(state: DriverState, how: str) -> None:
    """A driver that asks for a timer it has already had, and does nothing with it, makes
    its actor spin (``next_deadline`` in the past, forever)."""
    r = reach(state, how)
    deadline = r.driver.next_deadline()
    if deadline is None:
        return
    r.fire()
    after = r.driver.next_deadline()
    assert after is None or after > r.now, (r.state(), after, r.now)


# --- 3. properties: a simulated world, random latencies, faults and timers ---------------------


def fence_of(command: Command) -> LeaseFence | None:
    if isinstance(command, RenewLease | ClaimWork | ReleaseLease):
        return command.fence
    if isinstance(command, Commit):
        return command.commit.lease
    return None


@attrs.frozen
class World:
    """What the world does, drawn by hypothesis: messages submitted at times, latencies of the
    calls the driver makes (so results come back in any order, some after the lease ran out),
    faults of store and model calls, other runtimes taking the lease, stray wakes and timers.
    Once a list runs out, the world is calm: no latency, no faults."""

    #: (delay after the previous one, "plain" or "tool": whether the model calls a tool).
    messages: tuple[tuple[int, str], ...]
    latencies: tuple[int, ...] = ()
    #: Per store or model call: 0 busy, 1 busy after applying (a commit's reply lost),
    #: 2 failing for good (a load or a commit), else fine.
    faults: tuple[int, ...] = ()
    #: When another runtime starts to want the lease: it tries every 500 ms until it gets it
    #: (once this one's ran out, by its own clock, ``skew`` ms ahead of this one's).
    steals: tuple[int, ...] = ()
    skew: int = 0
    wakes: tuple[int, ...] = ()
    timers: tuple[int, ...] = ()


class Sim:
    """The driver's actor and world as a discrete-event simulation: a store, a model that
    calls a tool for messages that ask for one, the tools, and calls that take time. Checks
    the driver's invariants after every event it is fed."""

    #: Faults of one command kind in a row, at most (a transient error is transient).
    MAX_FAULTS_IN_A_ROW: Final = 3

    def __init__(self, world: World) -> None:
        self.world = world
        self.run = Run(tools=("add",), max_failures=1_000)
        self._latencies = list(world.latencies)
        self._faults = list(world.faults)
        self._queue: list[tuple[int, int, str, Any]] = []
        self._seq = 0
        self.enqueued: list[str] = []
        self.resolved: set[str] = set()
        self.ids: set[int] = set()
        #: Every grant the driver held (a release may give up any of them).
        self.fences: set[LeaseFence] = set()
        #: Commands sent and not carried out yet (the store may still apply them).
        self.unapplied: dict[int, Command] = {}
        #: Results of cancelled model and tool calls (to be ignored if they come).
        self.cancelled: set[int] = set()
        self.turn_live = False
        self.in_a_row: dict[type[Any], int] = {}
        #: The last events fed, and what came of them (for failure messages).
        self.log: deque[str] = deque(maxlen=6)
        at = T0
        for delay, text in world.messages:
            at += delay
            self.schedule(at, "submit", text)
        for kind in ("steals", "wakes", "timers"):
            for delay in getattr(world, kind):
                self.schedule(T0 + delay, kind, None)

    @property
    def driver(self) -> SessionDriver:
        return self.run.driver

    def schedule(self, at: int, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, payload))

    def latency(self) -> int:
        return self._latencies.pop(0) if self._latencies else 0

    def fault(self, kind: type[Any]) -> int:
        code = self._faults.pop(0) if self._faults else 9
        if code < 3 and self.in_a_row.get(kind, 0) < self.MAX_FAULTS_IN_A_ROW:
            self.in_a_row[kind] = self.in_a_row.get(kind, 0) + 1
            return code
        self.in_a_row[kind] = 0
        return 9

    # --- the run ---

    def play(self) -> None:
        for _ in range(3_000):
            deadline = self.driver.next_deadline()
            if self._queue and (deadline is None or self._queue[0][0] <= deadline):
                at, _, kind, payload = heapq.heappop(self._queue)
                self.run.now = max(self.run.now, at)
                self.happen(kind, payload)
            elif deadline is not None:
                self.timer(deadline)
            else:
                assert self.driver.state in (D.IDLE, D.STOPPED), (
                    f"stalled in {self.driver.state}: no deadline, nothing in flight"
                )
                return
        raise AssertionError(f"did not settle, in {self.driver.state}: {list(self.log)}")

    def happen(self, kind: str, payload: Any) -> None:
        r = self.run
        if kind == "submit":
            self.enqueued.append(r.store.enqueue(payload, r.now).batch_id)
            self.schedule(r.now + self.latency() // 10, "wakes", None)
        elif kind == "wakes":
            self.feed(Woken())
        elif kind == "timers":
            self.timer(r.now)
        elif kind == "steals":
            if r.store.take_lease(OTHER, TTL // 2, r.now + self.world.skew) is None:
                self.schedule(r.now + 500, kind, None)
        elif kind == "carry_out":
            self.carry_out(payload)
        elif kind == "report":
            self.feed(payload)
        else:  # pragma: no cover
            raise AssertionError(kind)

    def carry_out(self, command: Command) -> None:
        r = self.run
        command_id: int = getattr(command, "command_id", 0)
        if self.unapplied.pop(command_id, None) is None:
            return  # a cancelled model or tool call: it never runs
        result: Event
        if isinstance(command, CallModel):
            if self.fault(CallModel) == 0:
                result = ModelRaised(command_id=command_id, message="overloaded")
            else:
                users = [m.text for m in command.request.messages if m.role == "user"]
                tool = command.request.iteration == 0 and users[-1] == "tool"
                reply = tool_reply("add", "nope") if tool else text_reply()
                result = ModelAnswered(command_id=command_id, response=reply)
        elif isinstance(command, RunTool):
            result = answer_of(r, command)
        else:
            fault = self.fault(type(command))
            if fault in (0, 1):
                if fault == 1 and isinstance(command, Commit):
                    r.store.answer(command, r.now)  # applied; its reply is lost
                result = StoreFailed(command_id=command_id, error=BUSY)
            elif fault == 2 and isinstance(command, LoadSession):
                result = StoreFailed(command_id=command_id, error=CORRUPT)
            elif fault == 2 and isinstance(command, Commit) and not self.applied(command):
                result = StoreFailed(command_id=command_id, error=TOO_LARGE)
            else:
                result = r.store.answer(command, r.now)
        self.schedule(r.now + self.latency(), "report", result)

    def applied(self, command: Commit) -> bool:
        """True if this commit landed already (a refusal of its retry would be a new error,
        not the same one again)."""
        stamp = command.commit.turn_commit
        return stamp is not None and stamp.turn_id in self.run.store.stamps

    def timer(self, at: int) -> None:
        self.run.now = max(at, self.run.now)
        self.feed(TimerFired())
        deadline = self.driver.next_deadline()
        if deadline is not None and deadline <= self.run.now:
            # Due again at once (the actor fires again): this time it must get somewhere.
            self.feed(TimerFired())
            deadline = self.driver.next_deadline()
            assert deadline is None or deadline > self.run.now, (
                f"spins: in {self.driver.state}, asks for {deadline} at {self.run.now} again"
            )

    def feed(self, event: Event) -> None:
        r = self.run
        before = r.driver.lease
        late = getattr(event, "command_id", None) in self.cancelled
        out = r.feed(event)  # the driver never raises: any exception fails the test
        self.log.append(
            f"{r.now - T0}: {type(event).__name__} -> {[type(c).__name__ for c in out]}"
        )
        if late:
            assert out == [], "a result of a cancelled turn was not ignored"
        for command in out:
            if isinstance(command, CancelTurn):
                calls = [c for c in self.unapplied.values() if isinstance(c, CallModel | RunTool)]
                for call in calls:
                    del self.unapplied[call.command_id]
                self.cancelled |= {c.command_id for c in calls}
            elif isinstance(command, Resolve):
                self.resolved.update(command.batch_ids)
            elif isinstance(command, WithId):
                self.unapplied[command.command_id] = command
                self.schedule(r.now + self.latency(), "carry_out", command)
        self.check(before, out)

    # --- the invariants ---

    def check(self, before: SessionLease | None, out: list[Command]) -> None:
        d = self.driver
        after = d.lease
        for command in out:
            if isinstance(command, WithId):
                assert command.command_id not in self.ids, f"command id reused: {command}"
                self.ids.add(command.command_id)
            fence = fence_of(command)
            for lease in (before, after):
                if lease is not None:
                    self.fences.add(lease.fence())
            if isinstance(command, ReleaseLease):
                # A release gives up a grant the driver held (a lost one too, retried).
                assert fence in self.fences, f"a release of a grant never held: {command}"
            elif fence is not None:
                # Only under the lease held.
                held = [after]
                assert any(h is not None and h.fence() == fence for h in held), (
                    f"{type(command).__name__} under a lease the driver does not hold:"
                    f" {list(self.log)[-8:]}"
                )
            if isinstance(command, Publish) and command.event.type == "turn_started":
                self.turn_live = True
            elif isinstance(command, CancelTurn | Commit):
                self.turn_live = False
            elif isinstance(command, CallModel | RunTool):
                assert self.turn_live, f"{type(command).__name__} after its turn was cancelled"
        if after is not None:
            first = [
                c
                for c in self.unapplied.values()
                if (isinstance(c, ClaimWork) and c.boundary is IDLE_B) or isinstance(c, Commit)
                if fence_of(c) == after.fence()
            ]
            assert len(first) <= 1, f"more than one idle claim or commit in flight: {first}"
        if d.next_deadline() is None:
            assert d.state in (D.IDLE, D.STOPPED) or self.unapplied or self._queue, (
                f"stuck in {d.state}: no deadline and nothing in flight"
            )


DELAYS: Final = st.sampled_from([0, 1, 20, 300, 4_000, 9_000, 12_000, 20_000])
WORLDS: Final = st.builds(
    World,
    messages=st.lists(
        st.tuples(DELAYS, st.sampled_from(["plain", "tool"])), min_size=1, max_size=4
    ).map(tuple),
    latencies=st.lists(DELAYS, max_size=40).map(tuple),
    faults=st.lists(st.integers(0, 5), max_size=30).map(tuple),
    steals=st.lists(st.integers(0, 60_000), max_size=3).map(tuple),
    skew=st.sampled_from([0, 100, 3_000]),
    wakes=st.lists(st.integers(0, 60_000), max_size=3).map(tuple),
    timers=st.lists(st.integers(0, 60_000), max_size=3).map(tuple),
)


@settings(max_examples=100, deadline=None)
@given(world=WORLDS)
# Found by this test (kept, so they are always tried first):
# the grant's reply comes late, the driver stops under it before renewing, and takes it again
# while its first idle claim is still on its way to the store, under the same grant;
@example(World(messages=((1, "plain"),), latencies=(0, 9_000, 0, 9_000), wakes=(0,)))
# the claim's reply comes late, the claim runs out in the store while loading, and every
# renewal with it is refused (the lease is never renewed, the renewals never stop).
@example(
    World(
        messages=((0, "plain"),),
        latencies=(0, 0, 0, 0, 0, 4_000, 12_000, 0, 0, 0, 4_000, 4_000),
        faults=(0,),
    )
)
def test_any_world_keeps_the_invariants_and_answers_every_message_once_in_order(
    world: World,
) -> None:
    sim = Sim(world)
    sim.play()
    store, d = sim.run.store, sim.driver
    # Every message answered once, in the order submitted, and the lease given back.
    assert [row.row.batch_id for row in store.deliveries] == sim.enqueued
    assert store.rows == []
    assert sim.resolved == set(sim.enqueued)
    users = [n for n in store.nodes if isinstance(n.payload, dict) and n.payload["role"] == "user"]
    assert len(users) == len(sim.enqueued)
    assert d.state is D.STOPPED and d.lease is None
    row = store.lease_row
    assert row.owner_id != OWNER or row.lease_token is None or row.expires_at_ms <= sim.run.now


def test_work_claimed_by_a_turn_lost_with_its_lease_is_not_skipped() -> None:
    """The module docstring: when the lease is lost "the claims it held are void under the
    next grant, so nothing behind them is delivered first". The driver stops a little before
    the lease runs out in the store, so the next TakeLease can re-enter the same grant."""
    r = Run()
    first, second, third = (r.store.enqueue(text, r.now) for text in ("one", "two", "three"))
    r.feed(Woken())
    r.answer(TakeLease)
    r.answer(ClaimWork)
    r.answer(LoadSession)
    r.model(text_reply())
    r.answer(ClaimWork)  # "two" is injected into the turn
    assert tickets(r) == (first.batch_id, second.batch_id)
    # The store is busy for a while: renewals fail until the driver stops under the lease.
    fence = r.fence()
    out = r.fire()
    while r.state() is D.RUNNING:
        r.fail(RenewLease, BUSY)
        out = r.fire(max(r.driver.next_deadline() or 0, r.now + 1))
    assert norm(out) == [pub("lease_lost", WARNING), CancelTurn(), release(fence)]
    # The store is back: the grant is given up, the lease taken again (a new grant) and the
    # queue claimed from its head; the turn runs to its commit.
    r.answer(ReleaseLease)
    r.answer(TakeLease)
    r.answer(ClaimWork)
    r.answer(LoadSession)
    finish_turn(r)
    delivered = [d.row.batch_id for d in r.store.deliveries]
    order = [first.batch_id, second.batch_id, third.batch_id]
    assert delivered == order[: len(delivered)], "work delivered before work enqueued ahead of it"


def test_a_dropped_turn_does_not_let_later_work_overtake_its_checkpoint_claims() -> None:
    """A commit refused because the head moved drops the turn, and "the work is claimed
    again" (module docstring), from the head. The work its checkpoint claimed must not be left
    behind while work submitted after it goes first."""
    r = Run()
    first, second = r.store.enqueue("one", r.now), r.store.enqueue("two", r.now)
    r.feed(Woken())
    r.answer(TakeLease)
    r.answer(ClaimWork)
    r.answer(LoadSession)
    r.model(text_reply())
    r.answer(ClaimWork)  # "two" is injected into the turn
    r.model(text_reply())
    r.answer(ClaimWork)  # nothing more: commit
    assert tickets(r) == (first.batch_id, second.batch_id)
    out = r.fail(Commit, HeadRevisionConflict(0, 1))
    assert norm(out) == [pub("turn_lost", WARNING), CancelTurn(), claim_idle(r.fence())]
    third = r.store.enqueue("three", r.now)  # submitted meanwhile
    r.answer(ClaimWork)
    r.answer(LoadSession)
    finish_turn(r)
    delivered = [d.row.batch_id for d in r.store.deliveries]
    order = [first.batch_id, second.batch_id, third.batch_id]
    assert delivered == order[: len(delivered)], "work delivered before work enqueued ahead of it"
