"""The runtime: per-session actors that run agent turns against a store.

Theory of operation
-------------------

``submit`` only enqueues durable work (``store.sessions.enqueue``) and wakes the session's actor;
it never runs a turn itself and never rejects a message because a turn is running. One actor
exists per session while that session has work, and it owns everything that happens to it:

1. take the session execution lease (owner = this runtime); if another runtime holds it, wait
   and try again until it is released or expires;
2. keep the lease: a helper task renews it every ``ttl/3``; if a renewal fails (the lease was
   lost), the running turn is cancelled and its queue claims are abandoned;
3. claim the queued work at the idle boundary, build the turn's input from it, and drive the
   pure :class:`~turnbuckle.sansio.turn.TurnMachine`: model calls, tool batches (one batch's
   tools concurrently), UI events to subscribers, and at every checkpoint a claim of
   ``earliest_safe_boundary`` work, injected into the running turn;
4. commit the turn atomically: the new messages as graph nodes, the checkpoint, token usage, the
   completion of every queue claim the turn took, and a turn stamp (so a retry after an ambiguous
   failure replays instead of applying twice); then take the next work, or release the lease and
   exit.

A crash at any point loses nothing acknowledged: work is deleted only by the commit that
delivered it, and a dead runtime's lease and claims expire. :meth:`Runtime.resume` (run at
start) finds sessions with ready work and wakes their actors; a claim left by the dead runtime
is taken again once it expires.

Mailboxes are bounded: event subscribers get a bounded stream, and an event that does not fit is
dropped for that subscriber (counted in :attr:`EventStream.dropped`) rather than blocking the
session.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from turnbuckle.actors.worker import open_worker
from turnbuckle.adapters.store import Store
from turnbuckle.errors import (
    InvalidArgument,
    QueuedWorkClaimExpired,
    SessionExecutionLeaseExpired,
    TurnbuckleError,
)
from turnbuckle.sansio.codec import JSON
from turnbuckle.sansio.lease import SessionLease
from turnbuckle.sansio.queue import (
    ClaimBoundary,
    DeliveryPolicy,
    MergeKey,
    QueuedWorkBatch,
    QueuedWorkClaim,
    QueuedWorkDraft,
    SlotPolicy,
)
from turnbuckle.sansio.session import (
    ActivePath,
    Checkpoint,
    GraphAppend,
    RuntimeCommit,
    SessionNode,
    TurnCommitStamp,
    UsageEntry,
    turn_commit_hash,
)
from turnbuckle.sansio.turn import (
    CallModel,
    CheckpointDelivered,
    Done,
    Emit,
    Message,
    ModelFailed,
    ModelReplied,
    ModelRequest,
    ModelResponse,
    Progress,
    RunTools,
    ToolCall,
    ToolResult,
    ToolsFinished,
    TurnEvent,
    TurnMachine,
    TurnOutcome,
)

__all__ = ["EventStream", "Model", "Runtime", "Tool", "open_runtime"]

Model = Callable[[ModelRequest], Awaitable[ModelResponse]]
Tool = Callable[[JSON], Awaitable[Any]]
#: How many batches one claim takes at most.
_CLAIM_MAX = 64
_EVENT_BUFFER = 256


@attrs.define
class EventStream:
    """A subscriber's bounded stream of one session's UI events."""

    receive: MemoryObjectReceiveStream[TurnEvent]
    #: Events this subscriber missed because its buffer was full.
    dropped: int = 0

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TurnEvent:
        try:
            return await self.receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


_Subscriber = tuple[MemoryObjectSendStream[TurnEvent], EventStream]


@attrs.define
class _Waiter:
    done: anyio.Event = attrs.field(factory=anyio.Event)
    outcome: TurnOutcome | None = None
    error: BaseException | None = None


def message_to_payload(message: Message) -> JSON:
    return {
        "message_id": message.message_id,
        "role": message.role,
        "text": message.text,
        "tool_calls": [
            {"call_id": c.call_id, "name": c.name, "args": c.args} for c in message.tool_calls
        ],
        "tool_call_id": message.tool_call_id,
    }


def payload_to_message(payload: Any) -> Message:
    return Message(
        message_id=payload["message_id"],
        role=payload["role"],
        text=payload["text"],
        tool_calls=[
            ToolCall(call_id=c["call_id"], name=c["name"], args=c["args"])
            for c in payload["tool_calls"]
        ],
        tool_call_id=payload["tool_call_id"],
    )


class Runtime:
    """Runs agent sessions on a store. Make one with :func:`open_runtime`."""

    def __init__(
        self,
        store: Store,
        *,
        model: Model,
        tools: Mapping[str, Tool],
        task_group: anyio.abc.TaskGroup,
        owner_id: str,
        lease_ttl_ms: int,
        max_turns: int,
    ) -> None:
        self.store = store
        self.owner_id = owner_id
        self._model = model
        self._tools = dict(tools)
        self._tg = task_group
        self._ttl = lease_ttl_ms
        self._max_turns = max_turns
        self._actors: dict[str, _SessionActor] = {}
        self._subscribers: dict[
            str, list[tuple[MemoryObjectSendStream[TurnEvent], EventStream]]
        ] = {}
        self._waiters: dict[tuple[str, str], _Waiter] = {}
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
    ) -> QueuedWorkBatch:
        """Durably enqueue a user message for a session and return at once.

        A message sent while a turn runs is queued, never rejected: ``earliest_safe_boundary``
        input joins the running turn at its next checkpoint, ``after_current_turn_commit`` input
        starts the next turn. The same ``source_key`` twice is one message.

        Raises:
            InvalidArgument, PayloadTooLarge: a bad argument.
            QueuedWorkSourceKeyConflict: ``source_key`` was used for a different message.
            StoreClosedError and other store errors.
        """
        if self._closing:
            raise InvalidArgument("the runtime is shutting down")
        batch = await self.store.sessions.enqueue(
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
        return batch

    async def run_turn(
        self, session_id: str, text: str, *, source_key: str | None = None
    ) -> TurnOutcome:
        """Submit a message and wait for the outcome of the turn that delivers it.

        Raises:
            whatever :meth:`submit` raises, and the error of the turn's actor if it failed
            unexpectedly (a store error, say).
        """
        key = source_key or f"run_turn:{secrets.token_hex(12)}"
        waiter = self._waiters.setdefault((session_id, key), _Waiter())
        try:
            await self.submit(session_id, text, source_key=key)
            await waiter.done.wait()
        finally:
            self._waiters.pop((session_id, key), None)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.outcome is not None
        return waiter.outcome

    @contextlib.asynccontextmanager
    async def events(self, session_id: str) -> AsyncIterator[EventStream]:
        """Subscribe to a session's UI events (text deltas, tool calls, usage, outcomes) for
        the duration of the block."""
        send, receive = anyio.create_memory_object_stream[TurnEvent](_EVENT_BUFFER)
        stream = EventStream(receive)
        entry = (send, stream)
        self._subscribers.setdefault(session_id, []).append(entry)
        try:
            yield stream
        finally:
            self._subscribers[session_id].remove(entry)
            send.close()
            receive.close()

    async def resume(self) -> list[str]:
        """Wake the actors of every session with ready queued work (run after a restart);
        returns their ids."""
        sessions = await self.store.sessions.list_sessions_with_queued_work()
        for session_id in sessions:
            self._wake(session_id)
        return sessions

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

    async def wait_idle(self) -> None:
        """Wait until no session has an actor (every queue this runtime can serve is empty)."""
        while self._actors:
            await next(iter(self._actors.values())).exited.wait()

    # --- the actors' side ---

    def _wake(self, session_id: str) -> None:
        actor = self._actors.get(session_id)
        if actor is not None:
            actor.poke()
            return
        actor = _SessionActor(self, session_id)
        self._actors[session_id] = actor
        self._tg.start_soon(actor.run, name=f"turnbuckle session {session_id}")

    def _publish(self, session_id: str, event: TurnEvent) -> None:
        for send, stream in self._subscribers.get(session_id, ()):
            try:
                send.send_nowait(event)
            except anyio.WouldBlock:
                stream.dropped += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    def _resolve(
        self,
        claims: list[QueuedWorkClaim],
        outcome: TurnOutcome | None,
        error: BaseException | None = None,
    ) -> None:
        for claim in claims:
            for batch in claim.batches:
                if batch.source_key is None:
                    continue
                waiter = self._waiters.get((claim.session_id, batch.source_key))
                if waiter is not None and not waiter.done.is_set():
                    waiter.outcome, waiter.error = outcome, error
                    waiter.done.set()


class _SessionActor:
    """The one actor of one session (see the module docstring)."""

    def __init__(self, runtime: Runtime, session_id: str) -> None:
        self.runtime = runtime
        self.session_id = session_id
        self._poked = anyio.Event()
        self.exited = anyio.Event()
        #: Why the actor stopped early, if it did.
        self.error: Exception | None = None
        #: The queue claims of the running turn.
        self._claims: list[QueuedWorkClaim] = []

    def poke(self) -> None:
        self._poked.set()

    async def run(self) -> None:
        runtime, sessions = self.runtime, self.runtime.store.sessions
        try:
            while True:
                self._poked = anyio.Event()
                lease = await sessions.try_claim_lease(
                    self.session_id, runtime.owner_id, runtime._ttl
                )
                if lease is None:
                    # Another runtime holds the session: look again when poked, or when its
                    # lease could have expired.
                    with anyio.move_on_after(max(runtime._ttl / 3000, 0.05)):
                        await self._poked.wait()
                    if not await self._has_work():
                        break
                    continue
                if await self._hold(lease):
                    continue  # lost the lease: the work went back; wait to take it again
                later = await sessions.next_queued_work_in_ms(self.session_id)
                # No await between this check and leaving the registry: a submit that
                # arrives after it starts a new actor.
                if self._poked.is_set():
                    continue
                if later is None:
                    break
                # Work that is not available yet: come back when it is (or when poked).
                with anyio.move_on_after(later / 1000):
                    await self._poked.wait()
        except Exception as exc:
            # One session's failure (a store error, a bug) never takes the runtime down: its
            # work went back to the queue, and the next submit or resume starts a new actor.
            self.error = exc
        finally:
            if runtime._actors.get(self.session_id) is self:
                del runtime._actors[self.session_id]
            self.exited.set()

    async def _has_work(self) -> bool:
        return await self.runtime.store.sessions.has_queued_work(self.session_id)

    async def _hold(self, lease: SessionLease) -> bool:
        """Serve the session under one lease grant, renewing it and the running turn's queue
        claims; release it however this ends, unless it was lost. True if it was lost."""
        sessions = self.runtime.store.sessions
        lost = False
        try:
            async with anyio.create_task_group() as tg:
                work = anyio.CancelScope()

                async def keep() -> None:
                    nonlocal lost
                    ttl = self.runtime._ttl
                    while True:
                        await anyio.sleep(max(ttl / 3000, 0.01))
                        try:
                            await sessions.renew_lease(lease.fence(), ttl)
                            for claim in list(self._claims):
                                await sessions.renew_queued_work_claim(claim, ttl)
                        except (SessionExecutionLeaseExpired, QueuedWorkClaimExpired):
                            lost = True
                            work.cancel()  # the turn stops; its claims go back
                            return

                tg.start_soon(keep)
                with work:
                    await self._serve(lease)
                tg.cancel_scope.cancel()
        finally:
            if not lost:
                with anyio.CancelScope(shield=True), contextlib.suppress(TurnbuckleError):
                    await sessions.release_lease(lease.fence())
        return lost

    async def _serve(self, lease: SessionLease) -> None:
        runtime = self.runtime
        while True:
            self._poked = anyio.Event()  # a submit from here on is seen below
            claim = await runtime.store.sessions.claim_queued_work(
                self.session_id,
                lease.fence(),
                runtime.owner_id,
                ClaimBoundary.IDLE,
                runtime._ttl,
                _CLAIM_MAX,
            )
            if claim is None:
                if not await self._has_work():
                    return
                # Work is there but not claimable: new work arrived just now (we are poked),
                # or a runtime that died holds a claim on it, which expires within a ttl.
                with anyio.move_on_after(max(runtime._ttl / 3000, 0.05)):
                    await self._poked.wait()
                continue
            await self._turn(lease, claim)

    async def _turn(self, lease: SessionLease, first: QueuedWorkClaim) -> None:
        runtime, sessions = self.runtime, self.runtime.store.sessions
        claims = self._claims = [first]  # shared with the keeper, which renews them
        try:
            handle = sessions.bind(self.session_id)
            read = await handle.load(ActivePath())
            history = [payload_to_message(n.payload) for n in read.nodes] if read else []
            turn_id = f"turn:{first.batches[0].batch_id}"
            machine = TurnMachine.start(
                [*history, *_inputs(first)],
                tools=sorted(runtime._tools),
                max_turns=runtime._max_turns,
                turn_id=turn_id,
            )
            while True:
                effect = machine.poll_effect()
                if effect is None:
                    raise AssertionError("the turn machine stalled")  # a bug, not a state
                if isinstance(effect, Emit):
                    runtime._publish(self.session_id, effect.event)
                elif isinstance(effect, Progress):
                    pass  # kept in memory: the final commit is the durable boundary
                elif isinstance(effect, CallModel):
                    machine.handle_response(await self._call_model(effect))
                elif isinstance(effect, RunTools):
                    machine.handle_response(await self._run_tools(effect))
                elif isinstance(effect, Done):
                    # The commit completes the claims: the keeper must stop renewing them
                    # before they are deleted (on failure they are abandoned below).
                    self._claims = []
                    await self._commit(
                        handle,
                        lease,
                        read.head_revision if read else 0,
                        len(history),
                        effect,
                        machine,
                        claims,
                    )
                    runtime._resolve(claims, effect.outcome)
                    return
                else:  # a checkpoint: inject input queued for this boundary
                    claim = await sessions.claim_queued_work(
                        self.session_id,
                        lease.fence(),
                        runtime.owner_id,
                        ClaimBoundary.ACTIVE_TURN_CHECKPOINT,
                        runtime._ttl,
                        _CLAIM_MAX,
                    )
                    injected: list[Message] = []
                    if claim is not None:
                        claims.append(claim)
                        injected = _inputs(claim)
                    machine.handle_response(
                        CheckpointDelivered(effect_id=effect.effect_id, messages=injected)
                    )
        except BaseException as exc:
            # The work goes back to the queue for the next holder; shielded so that a
            # cancelled turn still hands its claims back.
            with anyio.CancelScope(shield=True), contextlib.suppress(TurnbuckleError):
                for claim in claims:
                    await sessions.abandon_queued_work_claim(claim)
            if isinstance(exc, Exception):
                runtime._resolve(claims, None, exc)
            raise
        finally:
            self._claims = []

    async def _call_model(self, effect: CallModel) -> ModelReplied | ModelFailed:
        try:
            response = await self.runtime._model(effect.request)
        except Exception as exc:
            return ModelFailed(
                effect_id=effect.effect_id,
                message=f"{type(exc).__name__}: {exc}",
                retryable=bool(getattr(exc, "retryable", False)),
            )
        if not isinstance(response, ModelResponse):
            return ModelFailed(
                effect_id=effect.effect_id, message=f"the model returned {type(response).__name__}"
            )
        return ModelReplied(effect_id=effect.effect_id, response=response)

    async def _run_tools(self, effect: RunTools) -> ToolsFinished:
        results: dict[str, ToolResult] = {}

        async def one(call: ToolCall) -> None:
            tool = self.runtime._tools.get(call.name)
            if tool is None:
                results[call.call_id] = ToolResult(
                    call_id=call.call_id,
                    name=call.name,
                    output=f"no tool named {call.name!r}",
                    is_error=True,
                )
                return
            try:
                value = await tool(call.args)
            except Exception as exc:
                results[call.call_id] = ToolResult(
                    call_id=call.call_id,
                    name=call.name,
                    output=f"{type(exc).__name__}: {exc}",
                    is_error=True,
                )
                return
            if isinstance(value, ToolResult):
                results[call.call_id] = attrs.evolve(value, call_id=call.call_id, name=call.name)
            else:
                results[call.call_id] = ToolResult(
                    call_id=call.call_id, name=call.name, output=value
                )

        async with anyio.create_task_group() as tg:
            for call in effect.calls:
                tg.start_soon(one, call)
        return ToolsFinished(
            effect_id=effect.effect_id, results=[results[c.call_id] for c in effect.calls]
        )

    async def _commit(
        self,
        handle: Any,
        lease: SessionLease,
        head_revision: int,
        history_length: int,
        done: Done,
        machine: TurnMachine,
        claims: list[QueuedWorkClaim],
    ) -> None:
        new = done.messages[history_length:]
        parent = None if history_length == 0 else done.messages[history_length - 1].message_id
        nodes = []
        for message in new:
            nodes.append(
                SessionNode(
                    node_id=message.message_id,
                    parent_node_id=parent,
                    payload=message_to_payload(message),
                )
            )
            parent = message.message_id
        commit = RuntimeCommit(
            session_id=self.session_id,
            expected_head_revision=head_revision,
            graph=GraphAppend(nodes=nodes),
            checkpoint=Checkpoint(
                turn_state={
                    "turn_id": machine.state.turn_id,
                    "outcome": attrs.asdict(done.outcome),
                    "iteration": done.iteration,
                }
            ),
            usage=[UsageEntry(source="turn", model="model", usage=machine.state.usage)],
            completed_claims=[c.completion() for c in claims],
        )
        stamp = TurnCommitStamp(
            session_id=self.session_id,
            turn_id=machine.state.turn_id,
            turn_commit_hash=turn_commit_hash(commit),
        )
        final = attrs.evolve(commit, lease=lease.fence(), turn_commit=stamp)
        with anyio.CancelScope(shield=True):
            await handle.commit(final)


def _inputs(claim: QueuedWorkClaim) -> list[Message]:
    messages = []
    for batch in claim.batches:
        for item in batch.items:
            payload: Any = item.payload
            role = payload.get("role", "user") if isinstance(payload, dict) else "user"
            text = payload.get("text", "") if isinstance(payload, dict) else str(payload)
            messages.append(Message(message_id=item.item_id, role=role, text=str(text)))
    return messages


@contextlib.asynccontextmanager
async def open_runtime(
    store: Store,
    *,
    model: Model,
    tools: Mapping[str, Tool] | None = None,
    owner_id: str | None = None,
    lease_ttl_ms: int = 15_000,
    max_turns: int = 8,
    shutdown: Literal["cancel", "finish"] = "cancel",
    resume: bool = True,
) -> AsyncIterator[Runtime]:
    """Run agent sessions on ``store`` for the duration of the block.

    ``model`` is an async callable ``ModelRequest -> ModelResponse`` (an exception becomes a
    provider error in the turn); ``tools`` maps names to async callables taking the call's
    arguments. ``owner_id`` names this runtime in leases (default: random). On exit,
    ``shutdown="cancel"`` cancels running turns (their work returns to the queue, for this or
    another runtime) and ``"finish"`` waits for every session to run out of work. With
    ``resume`` (default), sessions left with ready work (e.g. by a crash) are woken at start.

    Raises:
        InvalidArgument: a bad option.
    """
    if type(lease_ttl_ms) is not int or lease_ttl_ms < 30:
        raise InvalidArgument(f"lease_ttl_ms must be an int >= 30, got {lease_ttl_ms!r}")
    if shutdown not in ("cancel", "finish"):
        raise InvalidArgument(f"shutdown must be 'cancel' or 'finish', got {shutdown!r}")
    async with anyio.create_task_group() as tg:
        runtime = Runtime(
            store,
            model=model,
            tools=tools or {},
            task_group=tg,
            owner_id=owner_id or f"runtime-{secrets.token_hex(6)}",
            lease_ttl_ms=lease_ttl_ms,
            max_turns=max_turns,
        )
        if resume:
            await runtime.resume()
        try:
            yield runtime
            if shutdown == "finish":
                await runtime.wait_idle()
        finally:
            runtime._closing = True
            tg.cancel_scope.cancel()
