"""The session driver: everything a runtime decides about one session, as a pure machine.

Theory of operation
-------------------

A runtime runs one actor per session that has work. The actor decides nothing: it feeds this
driver *events* (what happened: a store call returned, the model answered, a timer fired, a
message was submitted) with the current time, and carries out the *commands* it gets back
(take the lease, claim work, call the model, commit...), reporting each result as another event.
Like aioquic's connection, the driver never schedules a timer: :meth:`SessionDriver.next_deadline`
says when it next needs a :class:`TimerFired`, and the actor sleeps until then or until the next
event, whichever is first. Every command that expects a result carries a ``command_id``; a result
for an id the driver no longer waits for (a cancelled model call, a renewal from before the lease
was lost) is ignored, so late and duplicate results are harmless by construction.

One session, one serial stream of events, in the states of :class:`DriverState`::

    IDLE --woken--> ACQUIRING --held by another--> WAITING --timer--> CHECKING --none--> STOPPED
                      ^  |                            \\--woken--> ACQUIRING   |--work--> ACQUIRING
                      |  | (granted)                                          \\--later--> SLEEPING
                      |  v
       +-------> CLAIMING --nothing--> PEEKING --due later, or none--> RELEASING --> SLEEPING
       |             | (work claimed)                                       \\--> STOPPED
       |             v
       |         LOADING --history--> RUNNING --turn done--> COMMITTING --committed--+
       |             |                   |                       |                  |
       |             +---- a failure ----+-----------------------+--> HANDING_BACK  |
       +---------------------------------------------------------------+-----------+
    a state holding the lease --lease lost--> ACQUIRING (a commit out decides first)
    RELEASING, SLEEPING, STOPPED --woken--> ACQUIRING

While the lease is held (CLAIMING to HANDING_BACK), a :class:`~turnbuckle.sansio.keeper.LeaseKeeper`
renews it, with the running turn's queue claims, every ttl/3, in the same transaction. The turn
itself is a :class:`~turnbuckle.sansio.turn.TurnMachine`, driven from here: its model calls and
tool calls become commands (one per tool call, so each reports when it starts and ends), its
checkpoints become checkpoint claims whose work is injected into the turn, and its end becomes
one atomic commit: the new messages, the checkpoint, token usage, the completion of every claim
the turn took (each delivered batch keeps the turn's outcome: the durable answer to it), and a
turn stamp, so a commit retried after an ambiguous failure replays instead of applying twice.

What each store error means (:func:`~turnbuckle.sansio.keeper.classify`) decides what comes next:

- a transient error (busy, full disk) never ends anything: the same call is sent again after a
  capped, jittered backoff; a commit is retried with its stamp, so it is applied at most once;
- the lease lost (a renewal or a fenced write refused, or the lease run out by the shared
  clock): the running turn is cancelled at once and the lease taken again; the claims it held
  are void under a newer grant, and ended by the next idle claim under the same one (taken
  back before anyone else took it), so nothing behind them is delivered first;
- a claim lost (voided, or the head moved): the turn is dropped and the work claimed again
  from the head of the queue;
- the store closed: stop;
- anything else (a value the store refuses, a corrupt record, a bug): the turn fails, and its
  claims go back counting the failure; after ``max_failures`` failures a batch is parked with
  its error. Failures are never silent: each is a published event at ERROR severity.

Submitting a message only enqueues it and wakes the actor (:class:`Woken`); a wake that arrives
while the driver is deciding the queue is empty is remembered and answered with another claim,
so a message is never left behind by an exiting actor. The driver exits (:class:`Exit`) when
its queue is empty or parked, after releasing the lease (or, if the store keeps refusing the
release, leaving it to run out).
"""

from __future__ import annotations

import enum
from typing import Any, Final, TypeAlias, final

import attrs

from turnbuckle.errors import (
    HeadRevisionConflict,
    InvalidArgument,
    QueuedWorkClaimExpired,
    SessionExecutionLeaseExpired,
)
from turnbuckle.sansio.codec import JSON, check_int64, check_text, sequence
from turnbuckle.sansio.ids import IdSource
from turnbuckle.sansio.keeper import (
    Backoff,
    CommandMachine,
    DriverError,
    Fault,
    LeaseKeeper,
    Severity,
    classify,
    describe,
    store_retry,
)
from turnbuckle.sansio.lease import LeaseFence, SessionLease
from turnbuckle.sansio.queue import ClaimBoundary, QueuedWorkBatch, QueuedWorkClaim
from turnbuckle.sansio.session import (
    Checkpoint as SessionCheckpoint,
)
from turnbuckle.sansio.session import (
    CommitResult,
    GraphAppend,
    RuntimeCommit,
    SessionNode,
    SessionRead,
    TurnCommitStamp,
    UsageEntry,
    turn_commit_hash,
)
from turnbuckle.sansio.turn import (
    CallModel as CallModelEffect,
)
from turnbuckle.sansio.turn import (
    Checkpoint as CheckpointEffect,
)
from turnbuckle.sansio.turn import (
    CheckpointDelivered,
    Done,
    Emit,
    Message,
    ModelFailed,
    ModelReplied,
    ModelRequest,
    Progress,
    RunTools,
    ToolCall,
    ToolResult,
    ToolsFinished,
    TurnMachine,
    TurnOutcome,
    UnexpectedResponse,
)

__all__ = [
    "Resolve",
    "CallModel",
    "CancelTurn",
    "ClaimWork",
    "Command",
    "Commit",
    "Committed",
    "DriverConfig",
    "DriverError",
    "DriverState",
    "Event",
    "Exit",
    "HandBack",
    "LeaseReleased",
    "LeaseRenewed",
    "LeaseTaken",
    "LoadSession",
    "ModelAnswered",
    "ModelRaised",
    "PeekQueue",
    "Publish",
    "QueuePeeked",
    "ReleaseLease",
    "RenewLease",
    "RunTool",
    "SessionDriver",
    "SessionEvent",
    "SessionLoaded",
    "Severity",
    "StopRequested",
    "StoreFailed",
    "TakeLease",
    "TimerFired",
    "ToolFinished",
    "Woken",
    "WorkClaimed",
    "WorkHandedBack",
    "message_from_payload",
    "message_payload",
]


class DriverState(enum.Enum):
    """Where one session's actor is (see the module docstring)."""

    #: Made, not started: waits for its first :class:`Woken`.
    IDLE = "idle"
    #: Taking the session lease.
    ACQUIRING = "acquiring"
    #: Another runtime holds the lease: look again at a deadline, or when woken.
    WAITING = "waiting"
    #: No lease: asking whether the session still has work (after a wait).
    CHECKING = "checking"
    #: Holding the lease, claiming work at the idle boundary.
    CLAIMING = "claiming"
    #: Nothing was claimable: asking whether work is due later, or left at all.
    PEEKING = "peeking"
    #: Work claimed: loading the session's history for the turn.
    LOADING = "loading"
    #: The turn runs: a model call, tool calls or a checkpoint claim in flight.
    RUNNING = "running"
    #: The turn's commit is in flight.
    COMMITTING = "committing"
    #: A failed turn's claims go back to the queue, counting the failure.
    HANDING_BACK = "handing_back"
    #: Giving the lease up (nothing to do now).
    RELEASING = "releasing"
    #: No lease: the only work left is due later.
    SLEEPING = "sleeping"
    #: Done: the actor may leave (a later wake starts it again).
    STOPPED = "stopped"


@attrs.frozen(kw_only=True)
class SessionEvent:
    """What the driver tells subscribers: the turn machine's UI events (``llm_request``,
    ``token_usage``, ``text_delta``, ``error``, ``injected_input``) and its own
    (``turn_started``, ``tool_call``, ``turn_outcome``, ``turn_failed``, ``work_parked``,
    ``turn_lost``, ``lease_lost``, ``store_retry``, ``session_error``, ``session_stopped``)."""

    type: str
    data: JSON = None
    turn_id: str | None = None
    severity: Severity = Severity.DEBUG


@attrs.frozen(kw_only=True)
class DriverConfig:
    """How a session's actor behaves; the runtime's options."""

    owner_id: str
    lease_ttl_ms: int = 15_000
    max_turns: int = 8
    #: The names of the tools the host can run.
    tools: tuple[str, ...] = attrs.field(default=(), converter=sequence)
    #: Failed turns after which a batch is parked.
    max_failures: int = 3
    #: Most batches one claim takes.
    max_batches: int = 64
    backoff: Backoff = attrs.field(factory=Backoff)

    def __attrs_post_init__(self) -> None:
        check_text("owner_id", self.owner_id)
        if not self.owner_id:
            raise InvalidArgument("owner_id must not be empty")
        if type(self.lease_ttl_ms) is not int or self.lease_ttl_ms < 30:
            raise InvalidArgument(f"lease_ttl_ms must be an int >= 30, got {self.lease_ttl_ms!r}")
        check_int64("max_turns", self.max_turns, minimum=1)
        check_int64("max_failures", self.max_failures, minimum=1)
        check_int64("max_batches", self.max_batches, minimum=1)
        for name in self.tools:
            check_text("tool name", name)


# --- events: what happened (the actor reports them) -----------------------------------------


@final
@attrs.frozen
class Woken:
    """The session may have new work (a submit, a resume, an outcome asked for)."""


@final
@attrs.frozen
class TimerFired:
    """The time :meth:`SessionDriver.next_deadline` asked for has come."""


@final
@attrs.frozen
class StopRequested:
    """The runtime is shutting down: hand back, release, exit."""


@final
@attrs.frozen(kw_only=True)
class LeaseTaken:
    command_id: int
    #: None: another runtime holds the lease.
    lease: SessionLease | None


@final
@attrs.frozen(kw_only=True)
class LeaseRenewed:
    command_id: int
    lease: SessionLease
    claims: tuple[QueuedWorkClaim, ...] = attrs.field(default=(), converter=sequence)


@final
@attrs.frozen(kw_only=True)
class WorkClaimed:
    command_id: int
    #: None: nothing was ready at that boundary.
    claim: QueuedWorkClaim | None


@final
@attrs.frozen(kw_only=True)
class QueuePeeked:
    command_id: int
    #: Unparked work is available now (claimed by someone or not).
    ready: bool
    #: Milliseconds until the earliest work that is not available yet becomes so.
    due_in_ms: int | None


@final
@attrs.frozen(kw_only=True)
class SessionLoaded:
    command_id: int
    #: None: the session was never committed.
    read: SessionRead | None


@final
@attrs.frozen(kw_only=True)
class ModelAnswered:
    command_id: int
    #: What the model returned (checked by the turn machine, never trusted).
    response: Any


@final
@attrs.frozen(kw_only=True)
class ModelRaised:
    command_id: int
    message: str
    retryable: bool = False


@final
@attrs.frozen(kw_only=True)
class ToolFinished:
    command_id: int
    #: The tool's result; an exception is reported as ``is_error`` output.
    result: ToolResult


@final
@attrs.frozen(kw_only=True)
class Committed:
    command_id: int
    result: CommitResult


@final
@attrs.frozen(kw_only=True)
class WorkHandedBack:
    command_id: int
    #: The batches parked by this hand-back.
    parked: tuple[QueuedWorkBatch, ...] = attrs.field(default=(), converter=sequence)


@final
@attrs.frozen(kw_only=True)
class LeaseReleased:
    command_id: int


@final
@attrs.frozen(kw_only=True)
class StoreFailed:
    """A store command raised ``error`` (a library error, or anything else: a bug)."""

    command_id: int
    error: BaseException


Event: TypeAlias = (
    Woken
    | TimerFired
    | StopRequested
    | LeaseTaken
    | LeaseRenewed
    | WorkClaimed
    | QueuePeeked
    | SessionLoaded
    | ModelAnswered
    | ModelRaised
    | ToolFinished
    | Committed
    | WorkHandedBack
    | LeaseReleased
    | StoreFailed
)

# --- commands: what to do (the actor carries them out) --------------------------------------


@final
@attrs.frozen(kw_only=True)
class TakeLease:
    command_id: int
    ttl_ms: int


@final
@attrs.frozen(kw_only=True)
class RenewLease:
    """Renew the lease and these claims in one transaction."""

    command_id: int
    fence: LeaseFence
    claims: tuple[QueuedWorkClaim, ...] = attrs.field(converter=sequence)
    ttl_ms: int


@final
@attrs.frozen(kw_only=True)
class ClaimWork:
    command_id: int
    fence: LeaseFence
    boundary: ClaimBoundary
    ttl_ms: int
    max_batches: int


@final
@attrs.frozen(kw_only=True)
class PeekQueue:
    """Ask whether unparked work is available now, and when delayed work becomes so."""

    command_id: int


@final
@attrs.frozen(kw_only=True)
class LoadSession:
    command_id: int


@final
@attrs.frozen(kw_only=True)
class CallModel:
    command_id: int
    request: ModelRequest


@final
@attrs.frozen(kw_only=True)
class RunTool:
    command_id: int
    call: ToolCall


@final
@attrs.frozen(kw_only=True)
class Commit:
    command_id: int
    commit: RuntimeCommit


@final
@attrs.frozen(kw_only=True)
class HandBack:
    """Give claims back to the queue: abandoned (``error`` None) or failed (counted, parked at
    ``max_failures``)."""

    command_id: int
    claims: tuple[QueuedWorkClaim, ...] = attrs.field(converter=sequence)
    error: str | None
    max_failures: int


@final
@attrs.frozen(kw_only=True)
class ReleaseLease:
    command_id: int
    fence: LeaseFence


@final
@attrs.frozen
class CancelTurn:
    """Cancel the running turn's model and tool calls (their results will be ignored)."""


@final
@attrs.frozen(kw_only=True)
class Publish:
    event: SessionEvent


@final
@attrs.frozen(kw_only=True)
class Resolve:
    """These batches changed for good: wake whoever waits for them. Delivered, with the turn
    that answered them (what the store recorded, so a waiter need not read it back); parked,
    with none (a waiter reads why)."""

    batch_ids: tuple[str, ...] = attrs.field(converter=sequence)
    turn_id: str | None = None
    outcome: TurnOutcome | None = None
    head_revision: int | None = None


@final
@attrs.frozen
class Exit:
    """Leave, unless a wake arrived meanwhile (then report :class:`Woken` instead)."""


Command: TypeAlias = (
    TakeLease
    | RenewLease
    | ClaimWork
    | PeekQueue
    | LoadSession
    | CallModel
    | RunTool
    | Commit
    | HandBack
    | ReleaseLease
    | CancelTurn
    | Publish
    | Resolve
    | Exit
)
_StoreCommand: TypeAlias = (
    TakeLease | RenewLease | ClaimWork | PeekQueue | LoadSession | Commit | HandBack | ReleaseLease
)

#: Store errors that mean "what this session held is gone".
_LOST: Final = (SessionExecutionLeaseExpired, QueuedWorkClaimExpired, HeadRevisionConflict)
#: Tries of a release before the lease is left to run out by itself.
_RELEASE_TRIES: Final = 5
#: A wait for another runtime's lease looks again at least this often.
_MAX_WAIT_MS: Final = 5_000


# --- messages as session nodes ---------------------------------------------------------------


def message_payload(message: Message) -> JSON:
    """A conversation message as the payload of its session node."""
    return {
        "message_id": message.message_id,
        "role": message.role,
        "text": message.text,
        "tool_calls": [
            {"call_id": c.call_id, "name": c.name, "args": c.args} for c in message.tool_calls
        ],
        "tool_call_id": message.tool_call_id,
    }


def message_from_payload(payload: JSON) -> Message:
    """The message a session node holds.

    Raises:
        ValueError: the payload is not a message this code wrote.
    """
    try:
        body: Any = payload
        return Message(
            message_id=_text(body["message_id"]),
            role=_text(body["role"]),
            text=_text(body["text"]),
            tool_calls=[
                ToolCall(call_id=_text(c["call_id"]), name=_text(c["name"]), args=c["args"])
                for c in body["tool_calls"]
            ],
            tool_call_id=None if body["tool_call_id"] is None else _text(body["tool_call_id"]),
        )
    except (KeyError, TypeError, InvalidArgument) as exc:
        raise ValueError(f"not a message: {exc!r}") from exc


def _text(value: object) -> str:
    if type(value) is not str:
        raise TypeError(f"expected a str, got {value!r}")
    return value


def _inputs(claim: QueuedWorkClaim) -> list[Message]:
    """The messages a claim's batches bring into a turn (the host's user payloads)."""
    messages = []
    for batch in claim.batches:
        for item in batch.items:
            payload: Any = item.payload
            if isinstance(payload, dict):
                role, text = payload.get("role", "user"), payload.get("text", "")
            else:
                role, text = "user", payload
            if role not in ("user", "system"):
                role = "user"
            messages.append(
                Message(
                    message_id=item.item_id,
                    role=role,
                    text=text if isinstance(text, str) else str(text),
                )
            )
    return messages


# --- the turn in progress --------------------------------------------------------------------


@attrs.define
class _Turn:
    """One turn: its claims, its machine, and what it waits for."""

    turn_id: str
    claims: list[QueuedWorkClaim]
    machine: TurnMachine | None = None
    head_revision: int = 0
    history_length: int = 0
    #: The RunTools effect whose calls are out, and the results in so far.
    tools: RunTools | None = None
    calls: dict[int, ToolCall] = attrs.Factory(dict)
    results: dict[str, ToolResult] = attrs.Factory(dict)
    #: The commit, once built (a retry sends the same one).
    commit: RuntimeCommit | None = None
    #: The outcome of the turn, once done.
    outcome: TurnOutcome | None = None

    @property
    def batch_ids(self) -> list[JSON]:
        """The batches the turn delivers (its tickets), in claim order."""
        return [b.batch_id for claim in self.claims for b in claim.batches]


_Handler: TypeAlias = "Any"


class SessionDriver(CommandMachine[DriverState, Event, Command]):
    """The decisions of one session's actor (see the module docstring).

    ``handle(event, now_ms)`` returns the commands to carry out, in order; ``next_deadline()``
    says when to report :class:`TimerFired` (None: only an event can wake it). Commands whose
    results come back carry a ``command_id``; report the result with the same id.
    """

    NAME = "session driver"

    def __init__(self, session_id: str, config: DriverConfig, *, ids: IdSource) -> None:
        check_text("session_id", session_id)
        super().__init__()
        self.session_id = session_id
        self.config = config
        self._ids = ids
        self.state = DriverState.IDLE
        self.lease: SessionLease | None = None
        self._keeper = LeaseKeeper(ttl_ms=config.lease_ttl_ms, backoff=config.backoff)
        self._turn: _Turn | None = None
        #: A store command to send again (after a transient failure), and when.
        self._retry: tuple[int, _StoreCommand] | None = None
        self._retries = 0
        #: When WAITING or SLEEPING end.
        self._wake_at: int | None = None
        #: A wake arrived since the last idle claim (so the queue may have new work).
        self._poked = False
        #: Failed turns and failures outside turns in a row (for their backoff).
        self._failures = 0
        self._release_tries = 0
        self._sleep_after_release: int | None = None
        #: The release under way is of a lost lease: take the lease again once it is done.
        self._retake = False
        #: The lease was lost while the commit was in flight: its result decides first.
        self._lost_while_committing: str | None = None
        #: The last failure, for whoever asks how the session is doing.
        self.last_error: str | None = None

    # --- the interface ---

    @property
    def finished(self) -> bool:
        """True once the driver exited (a :class:`Woken` starts it again)."""
        return self.state is DriverState.STOPPED

    def next_deadline(self) -> int | None:
        """When the driver next needs a :class:`TimerFired` (None: only events)."""
        times = []
        if self.lease is not None:
            # Releasing, only the expiry matters (no renewal is due any more).
            renewing = self.state in _RENEWING
            times.append(self._keeper.deadline() if renewing else self._keeper.stop_at_ms)
        if self._retry is not None:
            times.append(self._retry[0])
        if self._wake_at is not None:
            times.append(self._wake_at)
        return min(times) if times else None

    # --- helpers ---

    def _publish(
        self, kind: str, data: JSON = None, *, severity: Severity = Severity.DEBUG
    ) -> None:
        turn_id = None if self._turn is None else self._turn.turn_id
        self._out.append(
            Publish(event=SessionEvent(type=kind, data=data, turn_id=turn_id, severity=severity))
        )

    def _fence(self) -> LeaseFence:
        assert self.lease is not None
        return self.lease.fence()

    def _take_lease(self) -> None:
        self.state = DriverState.ACQUIRING
        self._wake_at = None
        self._send(TakeLease(command_id=self._new_id(), ttl_ms=self.config.lease_ttl_ms))

    def _claim(self, boundary: ClaimBoundary) -> None:
        if boundary is ClaimBoundary.IDLE:
            self.state = DriverState.CLAIMING
            self._poked = False  # this claim sees everything enqueued before the wake
        self._send(
            ClaimWork(
                command_id=self._new_id(),
                fence=self._fence(),
                boundary=boundary,
                ttl_ms=self.config.lease_ttl_ms,
                max_batches=self.config.max_batches,
            )
        )

    def _release(self, then_sleep_until: int | None) -> None:
        self.state = DriverState.RELEASING
        self._sleep_after_release = then_sleep_until
        self._release_tries, self._retake = 0, False
        self._send(ReleaseLease(command_id=self._new_id(), fence=self._fence()))

    def _drop_lease(self) -> None:
        """Forget the lease and everything sent under it (late results are then ignored)."""
        self.lease = None
        self._keeper.in_flight = None
        self._retry = None
        self._pending.clear()
        self._lost_while_committing = None

    def _exit(self) -> None:
        self.state = DriverState.STOPPED
        self._wake_at = None
        self._retry = None
        # A late result of what was still out is ignored, even after a restart.
        self._pending.clear()
        self._out.append(Exit())

    def _schedule_retry(self, command: _StoreCommand, error: BaseException, now_ms: int) -> None:
        delay = self.config.backoff.delay_ms(self._retries, self._ids)
        self._retries += 1
        self._retry = (now_ms + delay, command)
        data, severity = store_retry(type(command).__name__, error, self._retries, delay)
        self._publish("store_retry", data, severity=severity)

    def _resend(self, command: _StoreCommand) -> None:
        self._send(attrs.evolve(command, command_id=self._new_id()))

    def _failure_backoff(self, now_ms: int) -> int:
        delay = self.config.backoff.delay_ms(self._failures, self._ids)
        self._failures += 1
        return now_ms + delay

    # --- the lease ---

    def _hold(self, lease: SessionLease, now_ms: int) -> None:
        self.lease = lease
        self._keeper.hold(now_ms, lease.expires_at_ms)

    def _lose_lease(self, why: str, now_ms: int, *, settled: bool = False) -> None:
        """The lease is gone: stop the turn at once, give the grant up, and take the lease
        again. Given up first, the next grant is a new one (not this one re-entered, as a lease
        that only ran out by our own clock would be), under which every claim of the turn is
        void and a claim of this grant still on its way to the store is refused; nothing needs
        handing back.

        A turn whose commit is out is the exception, until the commit itself says
        (``settled``): it may have landed (a reply lost), and a retry of a stamped commit
        replays without a lease, so the commit is tried until it answers for good."""
        if self.state is DriverState.COMMITTING and not settled:
            self._lost_while_committing = why
            if self._keeper.in_flight is not None:
                self._pending.pop(self._keeper.in_flight, None)
            self._keeper.in_flight = None
            self._keeper.expires_at_ms = self._keeper.renew_at_ms = 2**62
            return
        if self.state is DriverState.RELEASING:
            self._after_release()  # it was being given up anyway
            return
        turn = self._turn
        self._publish(
            "lease_lost",
            {"reason": why, "tickets": [] if turn is None else turn.batch_ids},
            severity=Severity.WARNING,
        )
        fence = self._fence()
        self._cancel_turn()
        self._drop_lease()
        self.state = DriverState.RELEASING
        self._retake, self._sleep_after_release, self._release_tries = True, None, 0
        self._send(ReleaseLease(command_id=self._new_id(), fence=fence))

    def _cancel_turn(self) -> None:
        turn = self._turn
        if turn is None:
            return
        self._turn = None
        self._forget(_TURN_COMMANDS)
        if self._retry is not None and isinstance(self._retry[1], _TURN_COMMANDS):
            self._retry = None
        self._out.append(CancelTurn())

    def _on_timer(self, event: TimerFired, now_ms: int) -> None:
        if self.lease is not None and self._keeper.expired(now_ms):
            # Run out by the shared clock: whatever a renewal in flight says, stop now.
            self._lose_lease("the lease ran out before it could be renewed", now_ms)
            if self.state is not DriverState.COMMITTING:
                return  # a commit's retry (below) still decides whether the turn landed
        if self.lease is not None and self._keeper.due(now_ms) and self.state in _RENEWING:
            command_id = self._new_id()
            self._keeper.sent(command_id)
            # A committing turn's claims are the commit's to settle.
            turn = None if self.state is DriverState.COMMITTING else self._turn
            claims = () if turn is None else tuple(turn.claims)
            self._send(
                RenewLease(
                    command_id=command_id,
                    fence=self._fence(),
                    claims=claims,
                    ttl_ms=self.config.lease_ttl_ms,
                )
            )
        if self._retry is not None and now_ms >= self._retry[0]:
            command = self._retry[1]
            self._retry = None
            self._resend(command)
        if self._wake_at is not None and now_ms >= self._wake_at:
            self._wake_at = None
            if self.state is DriverState.WAITING:
                self.state = DriverState.CHECKING
                self._send(PeekQueue(command_id=self._new_id()))
            elif self.state is DriverState.SLEEPING:
                self._take_lease()

    def _on_renewed(self, event: LeaseRenewed, now_ms: int) -> None:
        self._hold(event.lease, now_ms)
        turn = self._turn
        if turn is not None and event.claims:
            renewed = {c.claim_id: c for c in event.claims}
            turn.claims = [renewed.get(c.claim_id, c) for c in turn.claims]

    def _on_woken(self, event: Woken, now_ms: int) -> None:
        self._poked = True

    # --- store failures ---

    def _on_store_failed(self, event: StoreFailed, now_ms: int) -> None:
        assert self._current is not None
        command = self._current[0]
        assert isinstance(command, _STORE_COMMANDS), command
        fault = classify(event.error, _LOST)
        if fault is Fault.CLOSED:
            self._publish("session_stopped", {"reason": describe(event.error)})
            self._cancel_turn()
            self._drop_lease()
            self._exit()
            return
        if isinstance(command, RenewLease):
            if isinstance(event.error, SessionExecutionLeaseExpired):
                self._lose_lease(describe(event.error), now_ms)
                return
            turn = self._turn
            renewed = {c.claim_id for c in command.claims}
            if (
                fault is Fault.LOST
                and self.state in (DriverState.LOADING, DriverState.RUNNING)
                and turn is not None
                and renewed & {c.claim_id for c in turn.claims}
            ):
                # A claim of the turn was voided (and, in the same transaction, the lease not
                # renewed): the turn is lost; its claims are ended by the next idle claim.
                self._keeper.retry_later(now_ms, self._ids)
                self._turn_lost(describe(event.error), now_ms)
                return
            # Transient, or about claims that are no longer the turn's: renew again soon.
            delay = self._keeper.retry_later(now_ms, self._ids)
            if fault is Fault.FAIL:
                self._report(event.error, "renewing the lease")
            elif fault is Fault.RETRY:
                data, severity = store_retry(
                    "RenewLease", event.error, self._keeper.failures, delay
                )
                self._publish("store_retry", data, severity=severity)
            return
        if fault is Fault.RETRY:
            if isinstance(command, ReleaseLease):
                self._release_tries += 1
                if self._release_tries >= _RELEASE_TRIES:
                    self._after_release()  # it runs out by itself
                    return
            self._schedule_retry(command, event.error, now_ms)
            return
        self._retries = 0
        if fault is Fault.LOST:
            if isinstance(event.error, SessionExecutionLeaseExpired):
                self._lose_lease(describe(event.error), now_ms, settled=True)
            elif isinstance(command, HandBack):
                self._after_hand_back(now_ms)  # void already: nothing left to hand back
            else:
                self._turn_lost(describe(event.error), now_ms)
            return
        # FAIL: retrying the same call will not help.
        self.last_error = describe(event.error)
        if self._turn is not None and isinstance(command, ClaimWork | LoadSession | Commit):
            self._fail_turn(self.last_error)
        elif isinstance(command, HandBack):
            self._report(event.error, "handing work back")
            self._after_hand_back(now_ms)
        elif isinstance(command, ReleaseLease):
            self._report(event.error, "releasing the lease")
            self._after_release()
        else:
            # No turn to fail (taking the lease, claiming, peeking): the session cannot go
            # on for now. Say so, and try again later: an operator may fix the cause.
            self._report(event.error, f"{type(command).__name__}")
            self._retry = (self._failure_backoff(now_ms), command)

    def _report(self, error: BaseException, doing: str) -> None:
        self.last_error = describe(error)
        self._publish(
            "session_error",
            {"while": doing, "error": self.last_error},
            severity=Severity.ERROR,
        )

    def _turn_lost(self, why: str, now_ms: int) -> None:
        """The turn's claims or head are gone (the store refused them): drop the turn and
        claim again from the head of the queue, under the same lease (if it is still ours)."""
        if self._lost_while_committing is not None:
            self._lose_lease(self._lost_while_committing, now_ms, settled=True)
            return
        turn = self._turn
        self._publish(
            "turn_lost",
            {"reason": why, "tickets": [] if turn is None else turn.batch_ids},
            severity=Severity.WARNING,
        )
        self._cancel_turn()
        self._claim(ClaimBoundary.IDLE)

    def _fail_turn(self, error: str) -> None:
        """The turn failed for a reason retrying will not cure: its claims go back counting
        the failure (parked at the limit)."""
        turn = self._turn
        assert turn is not None
        self.last_error = error
        self._publish(
            "turn_failed", {"error": error, "tickets": turn.batch_ids}, severity=Severity.ERROR
        )
        claims = tuple(turn.claims)
        self._cancel_turn()
        self.state = DriverState.HANDING_BACK
        self._send(
            HandBack(
                command_id=self._new_id(),
                claims=claims,
                error=error,
                max_failures=self.config.max_failures,
            )
        )

    # --- idle ---

    def _on_start(self, event: Woken, now_ms: int) -> None:
        self._poked = False
        self._take_lease()

    def _on_stop_without_lease(self, event: StopRequested, now_ms: int) -> None:
        self._exit()

    def _on_lease_taken(self, event: LeaseTaken, now_ms: int) -> None:
        self._retries = 0
        if event.lease is None:
            self.state = DriverState.WAITING
            # Held by another runtime: its lease runs out within a ttl unless renewed; look
            # again a third of the way (with jitter), or when woken.
            wait = min(max(self.config.lease_ttl_ms // 3, 2), _MAX_WAIT_MS)
            self._wake_at = now_ms + Backoff(base_ms=wait, cap_ms=wait).delay_ms(0, self._ids)
            return
        self._hold(event.lease, now_ms)
        self._claim(ClaimBoundary.IDLE)

    def _on_woken_while_waiting(self, event: Woken, now_ms: int) -> None:
        self._take_lease()

    def _on_claimed_idle(self, event: WorkClaimed, now_ms: int) -> None:
        self._retries = 0
        claim = event.claim
        if claim is None:
            if self._poked:
                self._claim(ClaimBoundary.IDLE)
            else:
                self.state = DriverState.PEEKING
                self._send(PeekQueue(command_id=self._new_id()))
            return
        self._turn = _Turn(turn_id=f"turn:{claim.batches[0].batch_id}", claims=[claim])
        self.state = DriverState.LOADING
        self._send(LoadSession(command_id=self._new_id()))

    def _on_peeked(self, event: QueuePeeked, now_ms: int) -> None:
        self._retries = 0
        due = None if event.due_in_ms is None else now_ms + event.due_in_ms
        if self.lease is None:
            if event.ready or self._poked:
                self._take_lease()
            elif due is not None:
                self.state, self._wake_at = DriverState.SLEEPING, due
            else:
                self._exit()
            return
        if event.ready or self._poked:
            self._claim(ClaimBoundary.IDLE)
        else:
            self._release(then_sleep_until=due)

    def _on_released(self, event: LeaseReleased, now_ms: int) -> None:
        self._retries = 0
        self._after_release()

    def _after_release(self) -> None:
        retake, self._retake = self._retake, False
        self._drop_lease()
        if retake or self._poked:
            self._take_lease()
        elif self._sleep_after_release is not None:
            self.state, self._wake_at = DriverState.SLEEPING, self._sleep_after_release
        else:
            self._exit()

    def _on_stop_holding(self, event: StopRequested, now_ms: int) -> None:
        if self.lease is None:  # given up already (a lost lease, being released)
            self._exit()
            return
        turn = self._turn
        claims = () if turn is None else tuple(turn.claims)
        fence = self._fence()
        self._cancel_turn()
        if claims:
            self._send(
                HandBack(command_id=self._new_id(), claims=claims, error=None, max_failures=1)
            )
        self._send(ReleaseLease(command_id=self._new_id(), fence=fence))
        self._drop_lease()
        self._exit()

    # --- the turn ---

    def _on_loaded(self, event: SessionLoaded, now_ms: int) -> None:
        self._retries = 0
        turn = self._turn
        assert turn is not None
        read = event.read
        try:
            history = [message_from_payload(n.payload) for n in read.nodes] if read else []
        except ValueError as exc:
            self._fail_turn(f"the session's history cannot be read: {exc}")
            return
        turn.head_revision = 0 if read is None else read.head_revision
        turn.history_length = len(history)
        turn.machine = TurnMachine.start(
            [*history, *_inputs(turn.claims[0])],
            tools=self.config.tools,
            max_turns=self.config.max_turns,
            turn_id=turn.turn_id,
        )
        self.state = DriverState.RUNNING
        self._publish("turn_started", {"tickets": turn.batch_ids}, severity=Severity.INFO)
        self._drain()

    def _drain(self) -> None:
        """Carry the turn machine's effects out until it awaits a reply."""
        turn = self._turn
        assert turn is not None and turn.machine is not None
        while (effect := turn.machine.poll_effect()) is not None:
            if isinstance(effect, Emit):
                self._publish(effect.event.type, effect.event.data)
            elif isinstance(effect, Progress):
                pass  # kept in memory: the final commit is the durable boundary
            elif isinstance(effect, CallModelEffect):
                self._send(CallModel(command_id=self._new_id(), request=effect.request))
            elif isinstance(effect, RunTools):
                self._run_tools(turn, effect)
            elif isinstance(effect, CheckpointEffect):
                self._claim(ClaimBoundary.ACTIVE_TURN_CHECKPOINT)
            elif isinstance(effect, Done):
                self._commit(turn, effect)
            else:  # pragma: no cover - the union is exhaustive
                raise AssertionError(effect)

    def _run_tools(self, turn: _Turn, effect: RunTools) -> None:
        turn.tools, turn.calls, turn.results = effect, {}, {}
        known = set(self.config.tools)
        for call in effect.calls:
            self._publish(
                "tool_call",
                {"phase": "started", "call_id": call.call_id, "name": call.name, "args": call.args},
            )
            if call.name in known:
                command_id = self._new_id()
                turn.calls[command_id] = call
                self._send(RunTool(command_id=command_id, call=call))
            else:
                self._tool_done(
                    turn,
                    ToolResult(
                        call_id=call.call_id,
                        name=call.name,
                        output=f"no tool named {call.name!r}",
                        is_error=True,
                    ),
                )
        self._tools_finished(turn)

    def _tool_done(self, turn: _Turn, result: ToolResult) -> None:
        turn.results[result.call_id] = result
        self._publish(
            "tool_call",
            {
                "phase": "finished",
                "call_id": result.call_id,
                "name": result.name,
                "output": result.output,
                "is_error": result.is_error,
            },
        )

    def _tools_finished(self, turn: _Turn) -> None:
        effect = turn.tools
        assert effect is not None and turn.machine is not None
        if len(turn.results) < len(effect.calls):
            return
        results = [turn.results[c.call_id] for c in effect.calls]
        turn.tools, turn.calls, turn.results = None, {}, {}
        self._feed(ToolsFinished(effect_id=effect.effect_id, results=results))

    def _feed(
        self, response: ModelReplied | ModelFailed | ToolsFinished | CheckpointDelivered
    ) -> None:
        turn = self._turn
        assert turn is not None and turn.machine is not None
        try:
            turn.machine.handle_response(response)
        except UnexpectedResponse as exc:  # a bug here or in the machine: fail the turn
            self._fail_turn(describe(exc))
            return
        self._drain()

    def _awaited_id(self) -> int:
        turn = self._turn
        assert turn is not None and turn.machine is not None
        waiting = turn.machine.state.waiting
        assert waiting is not None
        return waiting.effect_id

    def _on_model_answered(self, event: ModelAnswered, now_ms: int) -> None:
        self._feed(ModelReplied(effect_id=self._awaited_id(), response=event.response))

    def _on_model_raised(self, event: ModelRaised, now_ms: int) -> None:
        self._feed(
            ModelFailed(
                effect_id=self._awaited_id(), message=event.message, retryable=event.retryable
            )
        )

    def _on_tool_finished(self, event: ToolFinished, now_ms: int) -> None:
        turn = self._turn
        assert turn is not None
        call = turn.calls.pop(event.command_id)
        # The result answers this call, whatever ids the tool put in it.
        self._tool_done(turn, attrs.evolve(event.result, call_id=call.call_id, name=call.name))
        self._tools_finished(turn)

    def _on_claimed_at_checkpoint(self, event: WorkClaimed, now_ms: int) -> None:
        self._retries = 0
        turn = self._turn
        assert turn is not None
        injected: list[Message] = []
        if event.claim is not None:
            turn.claims.append(event.claim)
            injected = _inputs(event.claim)
        self._feed(CheckpointDelivered(effect_id=self._awaited_id(), messages=injected))

    def _commit(self, turn: _Turn, done: Done) -> None:
        assert turn.machine is not None
        new = done.messages[turn.history_length :]
        parent = (
            None if turn.history_length == 0 else done.messages[turn.history_length - 1].message_id
        )
        nodes = []
        for message in new:
            nodes.append(
                SessionNode(
                    node_id=message.message_id,
                    parent_node_id=parent,
                    payload=message_payload(message),
                )
            )
            parent = message.message_id
        outcome: JSON = attrs.asdict(done.outcome)
        commit = RuntimeCommit(
            session_id=self.session_id,
            expected_head_revision=turn.head_revision,
            graph=GraphAppend(nodes=nodes),
            checkpoint=SessionCheckpoint(
                turn_state={
                    "turn_id": turn.turn_id,
                    "outcome": outcome,
                    "iteration": done.iteration,
                }
            ),
            usage=[UsageEntry(source="turn", model="model", usage=turn.machine.state.usage)],
            completed_claims=[c.completion() for c in turn.claims],
            outcome=outcome,
        )
        stamp = TurnCommitStamp(
            session_id=self.session_id,
            turn_id=turn.turn_id,
            turn_commit_hash=turn_commit_hash(commit),
        )
        turn.commit = attrs.evolve(commit, turn_commit=stamp)
        turn.outcome = done.outcome
        self.state = DriverState.COMMITTING
        self._send_commit(turn)

    def _send_commit(self, turn: _Turn) -> None:
        assert turn.commit is not None
        # The fence is the current grant's: a retry after a renewal presents the same one.
        commit = attrs.evolve(turn.commit, lease=self._fence())
        self._send(Commit(command_id=self._new_id(), commit=commit))

    def _on_committed(self, event: Committed, now_ms: int) -> None:
        self._retries = 0
        self._failures = 0
        turn = self._turn
        assert turn is not None and turn.outcome is not None
        self._publish(
            "turn_outcome",
            {
                "tickets": turn.batch_ids,
                "outcome": attrs.asdict(turn.outcome),
                "head_revision": event.result.head_revision,
            },
            severity=Severity.INFO,
        )
        self._out.append(
            Resolve(
                batch_ids=turn.batch_ids,
                turn_id=turn.turn_id,
                outcome=turn.outcome,
                head_revision=event.result.head_revision,
            )
        )
        self._turn = None
        lost = self._lost_while_committing
        if lost is not None:
            self._lose_lease(lost, now_ms, settled=True)  # nothing more under that lease
            return
        self._claim(ClaimBoundary.IDLE)

    def _on_handed_back(self, event: WorkHandedBack, now_ms: int) -> None:
        self._retries = 0
        for batch in event.parked:
            self._publish(
                "work_parked",
                {
                    "ticket": batch.batch_id,
                    "failures": batch.failures,
                    "error": batch.last_error,
                },
                severity=Severity.ERROR,
            )
        if event.parked:
            self._out.append(Resolve(batch_ids=[b.batch_id for b in event.parked]))
        self._after_hand_back(now_ms)

    def _after_hand_back(self, now_ms: int) -> None:
        # Claim again after a backoff: a failure that is not the message's (a bug that depends
        # on timing) gets a moment; one that is reaches max_failures and is parked.
        self.state = DriverState.CLAIMING
        self._poked = False
        command = ClaimWork(
            command_id=0,
            fence=self._fence(),
            boundary=ClaimBoundary.IDLE,
            ttl_ms=self.config.lease_ttl_ms,
            max_batches=self.config.max_batches,
        )
        self._retry = (self._failure_backoff(now_ms), command)

    def _on_stop_committing(self, event: StopRequested, now_ms: int) -> None:
        # The commit lands or not on its own; the lease goes either way (a commit that did not
        # land leaves its claims void under the next grant).
        fence = self._fence()
        self._turn = None
        self._send(ReleaseLease(command_id=self._new_id(), fence=fence))
        self._drop_lease()
        self._exit()

    def _on_woken_stopped(self, event: Woken, now_ms: int) -> None:
        self._poked = False
        self._take_lease()

    def _ignore(self, event: Event, now_ms: int) -> None:
        pass


# The states in which the driver holds the session lease (the keeper renews it).
_HOLDING: Final = frozenset(
    {
        DriverState.CLAIMING,
        DriverState.PEEKING,
        DriverState.LOADING,
        DriverState.RUNNING,
        DriverState.COMMITTING,
        DriverState.HANDING_BACK,
        DriverState.RELEASING,
    }
)
#: The states in which the keeper renews it (a release is on its way out).
_RENEWING: Final = _HOLDING - {DriverState.RELEASING}
#: The commands that belong to the running turn (cancelled with it).
_TURN_COMMANDS: Final = (CallModel, RunTool, ClaimWork, LoadSession, Commit)
_STORE_COMMANDS: Final = (
    TakeLease,
    RenewLease,
    ClaimWork,
    PeekQueue,
    LoadSession,
    Commit,
    HandBack,
    ReleaseLease,
)

#: Which commands each result answers (a result naming a command of another kind is a bug).
_ANSWERS: Final[dict[type[Any], tuple[type[Any], ...]]] = {
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
    StoreFailed: _STORE_COMMANDS,
}

D = DriverState
S = SessionDriver

#: (state, event type) -> handler: every pair the driver accepts. A result for a command the
#: driver is not waiting for is ignored before this table is consulted; any other pair missing
#: here is a host bug (DriverError).
_TRANSITIONS: Final[dict[tuple[DriverState, type[Any]], _Handler]] = {
    # Start, stop, wake-ups and timers.
    (D.IDLE, Woken): S._on_start,
    (D.IDLE, TimerFired): S._ignore,
    (D.IDLE, StopRequested): S._on_stop_without_lease,
    (D.STOPPED, Woken): S._on_woken_stopped,
    (D.STOPPED, TimerFired): S._ignore,
    (D.STOPPED, StopRequested): S._ignore,
    (D.WAITING, Woken): S._on_woken_while_waiting,
    (D.SLEEPING, Woken): S._on_woken_while_waiting,
    **{(state, Woken): S._on_woken for state in (*_HOLDING, D.ACQUIRING, D.CHECKING)},
    **{(state, TimerFired): S._on_timer for state in set(DriverState) - {D.IDLE, D.STOPPED}},
    **{
        (state, StopRequested): S._on_stop_without_lease
        for state in (D.ACQUIRING, D.WAITING, D.CHECKING, D.SLEEPING)
    },
    **{(state, StopRequested): S._on_stop_holding for state in _HOLDING - {D.COMMITTING}},
    (D.COMMITTING, StopRequested): S._on_stop_committing,
    # The lease.
    (D.ACQUIRING, LeaseTaken): S._on_lease_taken,
    **{(state, LeaseRenewed): S._on_renewed for state in _HOLDING},
    (D.RELEASING, LeaseReleased): S._on_released,
    # Claims and the queue.
    (D.CLAIMING, WorkClaimed): S._on_claimed_idle,
    (D.RUNNING, WorkClaimed): S._on_claimed_at_checkpoint,
    (D.PEEKING, QueuePeeked): S._on_peeked,
    (D.CHECKING, QueuePeeked): S._on_peeked,
    (D.HANDING_BACK, WorkHandedBack): S._on_handed_back,
    # The turn.
    (D.LOADING, SessionLoaded): S._on_loaded,
    (D.RUNNING, ModelAnswered): S._on_model_answered,
    (D.RUNNING, ModelRaised): S._on_model_raised,
    (D.RUNNING, ToolFinished): S._on_tool_finished,
    (D.COMMITTING, Committed): S._on_committed,
    # Failures of store commands (the failed command decides what they mean).
    **{(state, StoreFailed): S._on_store_failed for state in (*_HOLDING, D.ACQUIRING, D.CHECKING)},
}
SessionDriver.TRANSITIONS, SessionDriver.ANSWERS = _TRANSITIONS, _ANSWERS
