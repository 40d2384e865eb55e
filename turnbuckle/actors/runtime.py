"""The runtime: one actor per session with work, each the shell of a pure session driver.

Theory of operation
-------------------

``submit`` durably enqueues a message (``store.sessions.submit``), wakes the session's actor and
returns a :class:`~turnbuckle.sansio.queue.Ticket` at once; it never runs a turn itself and never
rejects a message because a turn is running. A source key makes the submit idempotent for as
long as the session's history is kept: the same key again returns the original ticket, answered
or not, and never runs a second turn.

Each session with work has one actor, and the actor decides nothing: every decision is the
:class:`~turnbuckle.sansio.driver.SessionDriver`'s (read its theory of operation). The actor is a
mailbox loop: it feeds the driver one event at a time (a wake, a store result, a model or tool
result, a timer) with the time from the store's clock, and carries out the commands it gets:
store calls, model and tool calls run as tasks whose results come back through the same bounded
mailbox; events go to subscribers; when the driver says exit, the actor leaves the registry in
the same step in which it checks for a last-moment wake, so a message is never stranded.

The clock is the store's (``store.clock``): the driver's deadlines are in its milliseconds, and
the actor sleeps until the next one on the event loop. With ``LoopClock`` under trio's
``MockClock`` a whole runtime runs in virtual time.

Answers are durable: a turn's commit records, for every message it delivered, the turn's outcome.
:meth:`Runtime.outcome` reads it from the store, so it works after a restart and from another
process; a local commit only makes it return sooner. A message whose turns keep failing is
parked (dead-lettered) with its error after ``max_failures`` failures: ``outcome`` then raises
:class:`~turnbuckle.errors.QueuedWorkParked`, :meth:`Runtime.resubmit` puts it back.

Events go to subscribers of one session or of all, each with a sequence number; the runtime keeps
the last ``event_history`` of them, so a subscriber can replay from a cursor (``since=0``: all it
kept) and lose nothing emitted before it attached. A subscriber that falls behind by more than
its buffer loses events, counted in :attr:`EventStream.dropped`; it never slows a session down.

Shutting down (leaving the ``open_runtime`` block) cancels the running turns: each actor hands
its claims back and releases its lease, shielded, within ``shutdown_grace`` seconds; with
``shutdown="finish"`` the runtime first waits until every session it serves is idle.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, Literal

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from turnbuckle.actors._mailbox import Mailbox
from turnbuckle.actors.worker import open_worker
from turnbuckle.adapters.store import Store
from turnbuckle.errors import (
    CorruptRecordError,
    InvalidArgument,
    QueuedWorkNotFound,
    QueuedWorkParked,
    StoreClosedError,
    TurnbuckleError,
)
from turnbuckle.sansio.codec import JSON, check_int64
from turnbuckle.sansio.driver import (
    CallModel,
    CancelTurn,
    ClaimWork,
    Command,
    Commit,
    Committed,
    DriverConfig,
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
)
from turnbuckle.sansio.queue import (
    DeliveryPolicy,
    MergeKey,
    QueuedWorkBatch,
    QueuedWorkDraft,
    SlotPolicy,
    Ticket,
    WorkState,
)
from turnbuckle.sansio.session import ActivePath
from turnbuckle.sansio.turn import ModelRequest, ModelResponse, ToolResult, TurnOutcome

__all__ = [
    "EventStream",
    "IdleReport",
    "Model",
    "Reply",
    "Runtime",
    "RuntimeEvent",
    "Tool",
    "open_runtime",
]

Model = Callable[[ModelRequest], Awaitable[ModelResponse]]
Tool = Callable[[JSON], Awaitable[Any]]

logger = logging.getLogger("turnbuckle.runtime")

#: A subscriber's buffer: events past it are dropped for that subscriber (and counted).
_SUBSCRIBER_BUFFER: Final = 256
#: An actor's mailbox: results wait here while the driver handles the one before.
_INBOX: Final = 64


@attrs.frozen(kw_only=True)
class RuntimeEvent:
    """One event of one session, numbered in the order the runtime emitted it."""

    #: Grows by one per event of this runtime; pass it as ``since`` to resume after it.
    seq: int
    session_id: str
    #: ``turn_started``, ``llm_request``, ``token_usage``, ``text_delta``, ``tool_call``
    #: (``data["phase"]``: ``started`` or ``finished``), ``injected_input``, ``turn_outcome``
    #: (``data["tickets"]``: the messages it answered), ``error``, ``turn_failed``,
    #: ``work_parked``, ``turn_lost``, ``lease_lost``, ``store_retry``, ``session_error``,
    #: ``session_stopped``.
    type: str
    data: JSON = None
    turn_id: str | None = None
    severity: Severity = Severity.DEBUG


@attrs.frozen(kw_only=True)
class Reply:
    """The durable answer to one message: the outcome of the turn that delivered it."""

    ticket: Ticket
    turn_id: str | None
    outcome: TurnOutcome
    #: The session's head revision after that turn.
    head_revision: int | None

    @property
    def text(self) -> str:
        """The answer's text (the assistant's message, or why the turn stopped)."""
        return self.outcome.text


@attrs.frozen(kw_only=True)
class IdleReport:
    """What :meth:`Runtime.wait_idle` found: every queue empty, or parked."""

    #: The parked (dead-lettered) batches in the store, with their errors.
    parked: tuple[QueuedWorkBatch, ...]


@attrs.define(eq=False)
class EventStream:
    """A subscriber's bounded stream of runtime events."""

    receive: MemoryObjectReceiveStream[RuntimeEvent]
    #: Events this subscriber missed because its buffer was full (or its cursor was older than
    #: the history kept).
    dropped: int = 0

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> RuntimeEvent:
        try:
            return await self.receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


@attrs.define(eq=False)
class _Waiter:
    """Callers of ``outcome`` for one message: woken when a commit here answers it (with the
    answer), or when it is parked."""

    done: anyio.Event = attrs.Factory(anyio.Event)
    reply: tuple[str | None, TurnOutcome, int | None] | None = None


@attrs.define(eq=False)
class _Subscriber:
    session_id: str | None
    send: MemoryObjectSendStream[RuntimeEvent]
    stream: EventStream


def _outcome(value: JSON) -> TurnOutcome:
    """The TurnOutcome a commit recorded (as ``attrs.asdict``).

    Raises:
        ValueError: not an outcome this runtime recorded.
    """
    if not isinstance(value, dict):
        raise ValueError(f"not a recorded turn outcome: {value!r}")
    try:
        return TurnOutcome(**value)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ValueError(f"not a recorded turn outcome: {value!r}") from exc


class Runtime:
    """Runs agent sessions on a store. Make one with :func:`open_runtime`."""

    def __init__(
        self,
        store: Store,
        *,
        model: Model,
        tools: Mapping[str, Tool],
        task_group: anyio.abc.TaskGroup,
        config: DriverConfig,
        event_history: int,
        shutdown_grace: float,
    ) -> None:
        self.store = store
        self.owner_id = config.owner_id
        self._model = model
        self._tools = dict(tools)
        self._tg = task_group
        self._config = config
        self._grace = shutdown_grace
        self._actors: dict[str, _SessionActor] = {}
        self._subscribers: list[_Subscriber] = []
        self._history: deque[RuntimeEvent] = deque(maxlen=event_history)
        self._seq = 0
        #: Who waits for which message's answer (several callers share one waiter).
        self._answered: dict[str, _Waiter] = {}
        self._closing = False

    # --- the host's side ---

    async def submit(
        self,
        session_id: str,
        text: str,
        *,
        delivery: DeliveryPolicy = DeliveryPolicy.EARLIEST_SAFE_BOUNDARY,
        slot: SlotPolicy = SlotPolicy.JOIN,
        merge_key: MergeKey = MergeKey.PAYLOAD_DEFAULT,
        source_key: str | None = None,
        available_at_ms: int = 0,
    ) -> Ticket:
        """Durably enqueue a user message for a session and return its ticket at once.

        A message sent while a turn runs is queued, never rejected: ``earliest_safe_boundary``
        input joins the running turn at its next checkpoint, ``after_current_turn_commit``
        input starts the next turn. ``source_key`` makes the submit idempotent for as long as
        the session's history is kept: the same key again returns the original ticket
        (``status`` says ``duplicate``, or ``conflict`` if the text differs: the original is
        kept and nothing is enqueued), never a second turn.

        Raises:
            InvalidArgument, PayloadTooLarge: a bad argument, or the runtime is shutting down.
            StoreClosedError and other store errors.
        """
        if self._closing:
            raise InvalidArgument("the runtime is shutting down")
        ticket = await self.store.sessions.submit(
            QueuedWorkDraft(
                session_id=session_id,
                delivery=delivery,
                slot=slot,
                merge_key=merge_key,
                payloads=[{"role": "user", "text": text}],
                source_key=source_key,
                available_at_ms=available_at_ms,
            )
        )
        self._wake(session_id)
        return ticket

    async def outcome(self, ticket: Ticket, *, poll_interval: float = 0.25) -> Reply:
        """Wait for the answer to a submitted message and return it. The answer is durable:
        this works after a restart and from another process than the one that ran the turn
        (it is read from the store; a turn committed here wakes it at once, one committed
        elsewhere within ``poll_interval`` seconds). The message's session is woken, so this
        runtime serves it if nobody else does.

        Raises:
            QueuedWorkParked: the message was parked after failing turns (see :meth:`resubmit`).
            QueuedWorkNotFound: the session has no such message (it was cancelled).
            InvalidArgument: a bad ticket or interval.
            CorruptRecordError: the recorded outcome cannot be read.
            StoreClosedError and other store errors.
        """
        if not isinstance(ticket, Ticket):
            raise InvalidArgument(f"expected a Ticket, got {ticket!r}")
        if not isinstance(poll_interval, int | float) or not poll_interval > 0:
            raise InvalidArgument(f"poll_interval must be > 0 seconds, got {poll_interval!r}")
        sessions, woke = self.store.sessions, False
        while True:
            waiter = self._answered.setdefault(ticket.batch_id, _Waiter())
            try:
                status = await sessions.queued_work_status(ticket.session_id, ticket.batch_id)
            except TurnbuckleError as exc:
                if not exc.retryable:
                    raise
                await anyio.sleep(poll_interval)  # a busy store: waiting is what this call does
                continue
            if status is None:
                raise QueuedWorkNotFound(ticket.session_id, ticket.batch_id)
            if status.state is WorkState.DELIVERED:
                try:
                    outcome = _outcome(status.outcome)
                except ValueError as exc:
                    raise CorruptRecordError("queued_work", ticket.batch_id, str(exc)) from exc
                return Reply(
                    ticket=ticket,
                    turn_id=status.turn_id,
                    outcome=outcome,
                    head_revision=status.head_revision,
                )
            if status.state is WorkState.PARKED:
                batch = status.batch
                raise QueuedWorkParked(
                    ticket.session_id, ticket.batch_id, batch.failures, batch.last_error or ""
                )
            if not woke and not self._closing:
                self._wake(ticket.session_id)
                woke = True
            with anyio.move_on_after(poll_interval):
                await waiter.done.wait()
            if waiter.reply is not None:  # a commit here answered it: what the store recorded
                turn_id, outcome, head_revision = waiter.reply
                return Reply(
                    ticket=ticket, turn_id=turn_id, outcome=outcome, head_revision=head_revision
                )

    async def run_turn(
        self, session_id: str, text: str, *, source_key: str | None = None
    ) -> TurnOutcome:
        """Submit a message and wait for the outcome of the turn that answers it.

        Raises:
            whatever :meth:`submit` and :meth:`outcome` raise.
        """
        key = source_key or f"run_turn:{secrets.token_hex(12)}"
        return (await self.outcome(await self.submit(session_id, text, source_key=key))).outcome

    async def resubmit(self, ticket: Ticket) -> Ticket:
        """Put a parked message back in its session's queue, at its old place, and wake the
        session. A message that is not parked (queued or answered) is left as it is.

        Raises:
            QueuedWorkNotFound: the session has no such message.
            InvalidArgument: a bad ticket.
            StoreClosedError and other store errors.
        """
        if not isinstance(ticket, Ticket):
            raise InvalidArgument(f"expected a Ticket, got {ticket!r}")
        sessions = self.store.sessions
        unparked = await sessions.unpark_queued_work(ticket.session_id, ticket.batch_id)
        if (
            unparked is None
            and await sessions.queued_work_status(ticket.session_id, ticket.batch_id) is None
        ):
            raise QueuedWorkNotFound(ticket.session_id, ticket.batch_id)
        self._wake(ticket.session_id)
        return ticket

    @contextlib.asynccontextmanager
    async def events(
        self, session_id: str | None = None, *, since: int | None = None
    ) -> AsyncIterator[EventStream]:
        """Subscribe to the events of one session (or of every session, for None) for the
        duration of the block. With ``since``, the stream starts with the kept events after
        that sequence number (``since=0``: every event kept, so nothing emitted before the
        subscriber attached is lost); without it, with the next event.

        Raises:
            InvalidArgument: a bad session id or cursor.
        """
        if session_id is not None and (type(session_id) is not str or not session_id):
            raise InvalidArgument(f"session_id must be a non-empty str or None, got {session_id!r}")
        if since is not None:
            check_int64("since", since)
        send, receive = anyio.create_memory_object_stream[RuntimeEvent](_SUBSCRIBER_BUFFER)
        subscriber = _Subscriber(session_id, send, EventStream(receive))
        if since is not None:
            # Events after the cursor that are no longer kept are lost to this subscriber.
            oldest = self._history[0].seq if self._history else self._seq + 1
            subscriber.stream.dropped += max(0, oldest - since - 1)
            for event in self._history:
                if event.seq > since:
                    self._deliver(subscriber, event)
        self._subscribers.append(subscriber)
        try:
            yield subscriber.stream
        finally:
            self._subscribers.remove(subscriber)
            send.close()
            receive.close()

    async def resume(self) -> list[str]:
        """Wake the actors of every session with ready, unparked work (run at start, and every
        ``sweep_interval``, by default); returns their ids.

        Raises:
            StoreClosedError and other store errors.
        """
        sessions = await self.store.sessions.list_sessions_with_queued_work()
        for session_id in sessions:
            self._wake(session_id)
        return sessions

    async def _sweep(self, interval: float) -> None:
        """Look for work nobody told this runtime about, every ``interval`` seconds: submitted
        in another process, or left by a runtime that died (its lease runs out; a runtime that
        looks again serves it)."""
        while True:
            await anyio.sleep(interval)
            try:
                await self.resume()
            except StoreClosedError:
                return
            except TurnbuckleError as exc:  # busy, say: the next sweep tries again
                logger.log(Severity.WARNING, "sweeping for sessions with work: %r", exc)

    def worker(
        self,
        lane: str,
        capabilities: Iterable[str],
        handler: Callable[[Any], Awaitable[Any]],
        *,
        concurrency: int = 1,
        lease_ttl_ms: int = 30_000,
        poll_interval: float = 0.05,
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Run executions of ``lane`` on this runtime's store (see
        :func:`turnbuckle.actors.worker.open_worker`)."""
        return open_worker(
            self.store,
            lane,
            capabilities,
            handler,
            concurrency=concurrency,
            lease_ttl_ms=lease_ttl_ms,
            poll_interval=poll_interval,
            worker_id=f"{self.owner_id}:{lane}",
        )

    @property
    def active_sessions(self) -> list[str]:
        """Sessions that have an actor right now."""
        return sorted(self._actors)

    def last_error(self, session_id: str) -> str | None:
        """The last failure of a session's running actor (None: none, or no actor)."""
        actor = self._actors.get(session_id)
        return None if actor is None else actor.driver.last_error

    async def wait_idle(self) -> IdleReport:
        """Wait until every session this runtime serves is idle: its queue empty, or holding
        only parked work (which the report lists, for every session of the store).

        Raises:
            StoreClosedError and other store errors (reading the parked work).
        """
        while self._actors:
            await next(iter(self._actors.values())).exited.wait()
        parked = await self.store.sessions.list_parked_queued_work()
        return IdleReport(parked=tuple(parked))

    # --- the actors' side ---

    def _wake(self, session_id: str) -> None:
        actor = self._actors.get(session_id)
        if actor is not None:
            actor.wake()
            return
        if self._closing:
            return
        actor = _SessionActor(self, session_id)
        self._actors[session_id] = actor
        self._tg.start_soon(actor.run, name=f"turnbuckle session {session_id}")

    def _publish(self, session_id: str, event: SessionEvent) -> None:
        self._seq += 1
        published = RuntimeEvent(
            seq=self._seq,
            session_id=session_id,
            type=event.type,
            data=event.data,
            turn_id=event.turn_id,
            severity=event.severity,
        )
        if logger.isEnabledFor(event.severity):
            logger.log(event.severity, "session %s: %s %s", session_id, event.type, event.data)
        self._history.append(published)
        for subscriber in self._subscribers:
            if subscriber.session_id in (None, session_id):
                self._deliver(subscriber, published)

    @staticmethod
    def _deliver(subscriber: _Subscriber, event: RuntimeEvent) -> None:
        if subscriber.session_id not in (None, event.session_id):
            return
        try:
            subscriber.send.send_nowait(event)
        except anyio.WouldBlock:
            subscriber.stream.dropped += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def _resolve(self, resolved: Resolve) -> None:
        for batch_id in resolved.batch_ids:
            waiter = self._answered.pop(batch_id, None)
            if waiter is not None:
                if resolved.outcome is not None:
                    waiter.reply = (resolved.turn_id, resolved.outcome, resolved.head_revision)
                waiter.done.set()


class _SessionActor:
    """The one actor of one session: a mailbox loop around its driver (see the module
    docstring)."""

    def __init__(self, runtime: Runtime, session_id: str) -> None:
        self.runtime = runtime
        self.session_id = session_id
        self.driver = SessionDriver(session_id, runtime._config, ids=runtime.store.ids)
        self.mailbox: Mailbox[Event] = Mailbox(_INBOX)
        #: A wake that did not fit in the mailbox (it is never lost, only merged).
        self._woken = False
        #: The running turn's model and tool calls, and which turn they belong to (a call that
        #: starts after its turn was cancelled does not run).
        self._turn_calls: set[anyio.CancelScope] = set()
        self._turn_generation = 0
        #: Store calls go to one task of the actor, in order (a store serves one call at a time
        #: anyway), so the loop itself never waits on a store: a store that hangs cannot keep
        #: it from seeing its lease run out and stopping the turn.
        self._to_store, self._store_calls = anyio.create_memory_object_stream[Command](_INBOX)
        self._store_done = anyio.Event()
        self.exited = anyio.Event()

    def wake(self) -> None:
        if not self.mailbox.post_nowait(Woken()):
            self._woken = True

    async def run(self) -> None:
        runtime, clock = self.runtime, self.runtime.store.clock
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._serve_store_calls)
                commands = self.driver.handle(Woken(), clock.now_ms())
                while True:
                    self._execute(commands, tg)
                    if self.driver.finished and not (self._woken or self.mailbox.waiting):
                        # No await between that check and leaving the registry: a submit from
                        # here on starts a new actor; one before it woke this driver again.
                        if runtime._actors.get(self.session_id) is self:
                            del runtime._actors[self.session_id]
                        break
                    event = await self._next_event()
                    commands = self.driver.handle(event, clock.now_ms())
                # The calls still queued (a release, a hand-back) finish before the actor goes.
                self._to_store.close()
                with anyio.move_on_after(runtime._grace, shield=True):
                    await self._store_done.wait()
                tg.cancel_scope.cancel()
        finally:
            if not self.driver.finished:
                # Cancelled (the runtime is shutting down): hand back and release, shielded.
                with anyio.CancelScope(shield=True), anyio.move_on_after(runtime._grace):
                    for command in self.driver.handle(StopRequested(), clock.now_ms()):
                        if isinstance(command, HandBack | ReleaseLease):
                            await self._perform(command)
            if runtime._actors.get(self.session_id) is self:
                del runtime._actors[self.session_id]
            self.mailbox.close()
            self._to_store.close()
            self._store_calls.close()
            self.exited.set()

    async def _next_event(self) -> Event:
        if self._woken:
            self._woken = False
            return Woken()
        clock = self.runtime.store.clock
        return await self.mailbox.next(self.driver.next_deadline(), clock, TimerFired())

    def _execute(self, commands: list[Command], tg: anyio.abc.TaskGroup) -> None:
        """Carry commands out, in order: model and tool calls as tasks, store calls through
        the actor's store task; every result comes back through the mailbox."""
        runtime = self.runtime
        for command in commands:
            if isinstance(command, Publish):
                runtime._publish(self.session_id, command.event)
            elif isinstance(command, Resolve):
                runtime._resolve(command)
            elif isinstance(command, CancelTurn):
                self._turn_generation += 1
                for scope in self._turn_calls:
                    scope.cancel()
                self._turn_calls.clear()
            elif isinstance(command, CallModel | RunTool):
                tg.start_soon(self._turn_call, command, self._turn_generation)
            elif isinstance(command, Exit):
                pass  # the loop leaves once the driver is finished and nothing is waiting
            else:
                # Never full: the driver has a handful of store calls out at most.
                self._to_store.send_nowait(command)

    async def _serve_store_calls(self) -> None:
        try:
            async for command in self._store_calls:
                await self.mailbox.post(await self._perform(command))
        finally:
            self._store_done.set()

    async def _perform(self, command: Command) -> Event:
        """One store command; its result, or the error it raised, as an event."""
        sessions, sid = self.runtime.store.sessions, self.session_id
        command_id: int = getattr(command, "command_id", 0)
        try:
            if isinstance(command, TakeLease):
                lease = await sessions.try_claim_lease(sid, self.runtime.owner_id, command.ttl_ms)
                return LeaseTaken(command_id=command_id, lease=lease)
            if isinstance(command, RenewLease):
                lease, claims = await sessions.renew_lease_and_claims(
                    command.fence, command.claims, command.ttl_ms
                )
                return LeaseRenewed(command_id=command_id, lease=lease, claims=claims)
            if isinstance(command, ClaimWork):
                claim = await sessions.claim_queued_work(
                    sid,
                    command.fence,
                    self.runtime.owner_id,
                    command.boundary,
                    command.ttl_ms,
                    command.max_batches,
                )
                return WorkClaimed(command_id=command_id, claim=claim)
            if isinstance(command, PeekQueue):
                ready = await sessions.has_queued_work(sid)
                due = await sessions.next_queued_work_in_ms(sid)
                return QueuePeeked(command_id=command_id, ready=ready, due_in_ms=due)
            if isinstance(command, LoadSession):
                read = await sessions.bind(sid).load(ActivePath())
                return SessionLoaded(command_id=command_id, read=read)
            if isinstance(command, Commit):
                result = await sessions.bind(sid).commit(command.commit)
                return Committed(command_id=command_id, result=result)
            if isinstance(command, HandBack):
                parked: list[QueuedWorkBatch] = []
                for claim in command.claims:
                    if command.error is None:
                        await sessions.abandon_queued_work_claim(claim)
                    else:
                        parked += await sessions.fail_queued_work(
                            claim, command.error, command.max_failures
                        )
                return WorkHandedBack(command_id=command_id, parked=parked)
            if isinstance(command, ReleaseLease):
                await sessions.release_lease(command.fence)
                return LeaseReleased(command_id=command_id)
        except Exception as exc:  # every failure is the driver's to judge, bugs included
            return StoreFailed(command_id=command_id, error=exc)
        raise AssertionError(f"not a store command: {command!r}")

    async def _turn_call(self, command: CallModel | RunTool, generation: int) -> None:
        if generation != self._turn_generation:
            return  # its turn was cancelled before it started
        result: Event | None = None
        with anyio.CancelScope() as scope:
            self._turn_calls.add(scope)
            try:
                if isinstance(command, CallModel):
                    result = await self._call_model(command)
                else:
                    result = await self._run_tool(command)
            finally:
                self._turn_calls.discard(scope)
        if result is not None:  # None: cancelled with its turn
            await self.mailbox.post(result)

    async def _call_model(self, command: CallModel) -> Event:
        try:
            response = await self.runtime._model(command.request)
        except Exception as exc:
            return ModelRaised(
                command_id=command.command_id,
                message=f"{type(exc).__name__}: {exc}",
                retryable=bool(getattr(exc, "retryable", False)),
            )
        return ModelAnswered(command_id=command.command_id, response=response)

    async def _run_tool(self, command: RunTool) -> Event:
        call = command.call
        tool = self.runtime._tools[call.name]  # the driver runs only known tools
        try:
            value = await tool(call.args)
        except Exception as exc:  # reported to the model, which may carry on
            value = ToolResult(
                call_id=call.call_id,
                name=call.name,
                output=f"{type(exc).__name__}: {exc}",
                is_error=True,
            )
        if not isinstance(value, ToolResult):
            value = ToolResult(call_id=call.call_id, name=call.name, output=value)
        return ToolFinished(command_id=command.command_id, result=value)


@contextlib.asynccontextmanager
async def open_runtime(
    store: Store,
    *,
    model: Model,
    tools: Mapping[str, Tool] | None = None,
    owner_id: str | None = None,
    lease_ttl_ms: int = 15_000,
    max_turns: int = 8,
    max_failures: int = 3,
    shutdown: Literal["cancel", "finish"] = "cancel",
    shutdown_grace: float = 5.0,
    resume: bool = True,
    sweep_interval: float | None = None,
    event_history: int = 10_000,
) -> AsyncIterator[Runtime]:
    """Run agent sessions on ``store`` for the duration of the block.

    ``model`` is an async callable ``ModelRequest -> ModelResponse`` (an exception becomes a
    provider error in the turn, a reply that is not a well-formed ``ModelResponse`` an
    ``invalid_model_response`` outcome); ``tools`` maps names to async callables taking the
    call's arguments and returning plain JSON (an exception is reported to the model as an
    error result; a value that is not JSON ends the turn ``invalid_tool_result``). ``owner_id``
    names this runtime in leases (default: random); ``max_failures`` is how many failed turns
    park a message. On exit, ``shutdown="cancel"`` cancels running turns (their work returns to
    the queue, for this or another runtime) and ``"finish"`` waits for every session to run
    out of work; either way leases are released within ``shutdown_grace`` seconds. With
    ``resume`` (default), sessions left with ready work (by a crash, say) are woken at start,
    and again every ``sweep_interval`` seconds (default: the lease ttl; 0: never), so work
    submitted in another process, or left by a runtime that died, is served without a restart;
    ``event_history`` events are kept for subscribers that replay from a cursor.

    Raises:
        InvalidArgument: a bad option.
        StoreClosedError: the store is closed.
    """
    if shutdown not in ("cancel", "finish"):
        raise InvalidArgument(f"shutdown must be 'cancel' or 'finish', got {shutdown!r}")
    check_int64("event_history", event_history, minimum=1)
    if sweep_interval is None:
        sweep_interval = lease_ttl_ms / 1000 if type(lease_ttl_ms) is int else 0.0
    if not isinstance(sweep_interval, int | float) or not 0 <= sweep_interval < math.inf:
        raise InvalidArgument(f"sweep_interval must be >= 0 seconds, got {sweep_interval!r}")
    if not isinstance(shutdown_grace, int | float) or not 0 <= shutdown_grace < math.inf:
        raise InvalidArgument(f"shutdown_grace must be >= 0 seconds, got {shutdown_grace!r}")
    tools = dict(tools or {})
    config = DriverConfig(
        owner_id=owner_id or f"runtime-{secrets.token_hex(6)}",
        lease_ttl_ms=lease_ttl_ms,
        max_turns=max_turns,
        tools=sorted(tools),
        max_failures=max_failures,
    )
    # Before the task group: a closed store fails here, as itself (not in an ExceptionGroup).
    ready = await store.sessions.list_sessions_with_queued_work()
    async with anyio.create_task_group() as tg:
        runtime = Runtime(
            store,
            model=model,
            tools=tools,
            task_group=tg,
            config=config,
            event_history=event_history,
            shutdown_grace=float(shutdown_grace),
        )
        if resume:
            for session_id in ready:
                runtime._wake(session_id)
            if sweep_interval > 0:
                tg.start_soon(runtime._sweep, float(sweep_interval), name="turnbuckle sweep")
        try:
            yield runtime
            if shutdown == "finish":
                await runtime.wait_idle()
        finally:
            runtime._closing = True
            tg.cancel_scope.cancel()
