"""Workers: run executions of a lane with a handler, one pure worker driver per slot.

Theory of operation
-------------------

``async with open_worker(store, lane, capabilities, handler, concurrency=N)`` runs N slots. Each
slot is the shell of a :class:`~turnbuckle.sansio.worker.WorkerDriver`, which makes every
decision (read its theory of operation): claim the best runnable execution the slot can serve
(or reclaim one whose worker's lease ran out), run ``await handler(context)`` while the driver
renews the lease every ttl/3, and record how the handler ended:

- a return value completes the execution with that value as the result (a value the store
  cannot keep fails it for good, saying why);
- :class:`PermanentFailure` fails it for good; any other exception fails the attempt as
  transient, so it is retried under the execution's retry policy (or fails once the attempts are
  used up);
- a cancellation requested through the store (``request_cancel``, or cancelling the task the
  execution backs) cancels the handler and ends the execution ``cancelled``;
- losing the lease (a renewal refused, or the lease run out by the store's clock: the process
  stalled past its ttl and someone may reclaim the work) cancels the handler and writes nothing:
  the new owner finishes it.

A transient store error never ends a slot; it is retried with backoff. An idle slot looks for
work every ``poll_interval`` seconds. The slot keeps time by the store's clock
(``store.clock``), so under trio's ``MockClock`` with ``LoopClock`` a worker runs in virtual time.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Final

import anyio
import anyio.abc
import attrs

from turnbuckle.actors._mailbox import Mailbox
from turnbuckle.adapters.executions import ExecutionInfo
from turnbuckle.adapters.store import Store
from turnbuckle.errors import InvalidArgument
from turnbuckle.sansio.codec import JSON
from turnbuckle.sansio.execution import FailureClass, FrameKind, Handle
from turnbuckle.sansio.worker import (
    CancelHandler,
    Claim,
    Command,
    Describe,
    Described,
    Event,
    ExecutionClaimed,
    Finish,
    Finished,
    HandlerEnded,
    Renew,
    Renewed,
    Report,
    RunHandler,
    StoreFailed,
    TimerFired,
    Woken,
    WorkerConfig,
    WorkerDriver,
)

__all__ = ["ExecutionContext", "PermanentFailure", "open_worker"]

logger = logging.getLogger("turnbuckle.worker")

#: A slot's mailbox: a renewal, the handler's end and a store result can meet in it.
_INBOX: Final = 8


class PermanentFailure(Exception):
    """Raise from a handler to fail the execution without retrying it."""


@attrs.define
class ExecutionContext:
    """What a handler gets: the execution, and ways to report on it."""

    store: Store
    handle: Handle
    info: ExecutionInfo

    @property
    def payload(self) -> JSON:
        return self.info.payload

    @property
    def attempt(self) -> int:
        """0 for the first attempt, 1 for the first retry, ..."""
        return self.handle.attempt_index

    async def progress(self, pct: int | None = None, message: str | None = None) -> None:
        """Report progress (each field optional).

        Raises:
            LeaseConflict, LeaseExpired, ExecutionTerminal: this worker no longer owns it.
        """
        await self.store.executions.progress(self.handle, pct, message)

    async def append(
        self, kind: FrameKind, data: JSON = None, *, summary_patch: JSON = None
    ) -> int:
        """Append an output frame (and merge-patch the summary); returns its sequence number.

        Raises:
            LeaseConflict, LeaseExpired, ExecutionTerminal: this worker no longer owns it.
        """
        return await self.store.executions.append_frame(
            self.handle, kind, data, summary_patch=summary_patch
        )


Handler = Callable[[ExecutionContext], Awaitable[JSON]]


@contextlib.asynccontextmanager
async def open_worker(
    store: Store,
    lane: str,
    capabilities: Iterable[str],
    handler: Handler,
    *,
    concurrency: int = 1,
    lease_ttl_ms: int = 30_000,
    poll_interval: float = 0.05,
    worker_id: str | None = None,
) -> AsyncIterator[None]:
    """Run executions of ``lane`` with ``handler`` until the block ends (running handlers are
    then cancelled; their executions are reclaimed by another worker once their leases expire).

    Raises:
        InvalidArgument: a bad option.
    """
    if type(concurrency) is not int or concurrency < 1:
        raise InvalidArgument(f"concurrency must be a positive int, got {concurrency!r}")
    if not isinstance(poll_interval, int | float) or not poll_interval > 0:
        raise InvalidArgument(f"poll_interval must be > 0 seconds, got {poll_interval!r}")
    name = worker_id or f"worker-{secrets.token_hex(6)}"
    configs = [
        WorkerConfig(
            lane=lane,
            capabilities=tuple(capabilities),
            worker_id=f"{name}/{slot}",
            lease_ttl_ms=lease_ttl_ms,
            poll_ms=max(1, round(poll_interval * 1000)),
        )
        for slot in range(concurrency)
    ]
    async with anyio.create_task_group() as tg:
        for config in configs:
            tg.start_soon(_Slot(store, config, handler).run, name=f"turnbuckle {config.worker_id}")
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


class _Slot:
    """One worker slot: a mailbox loop around its driver (see the module docstring)."""

    def __init__(self, store: Store, config: WorkerConfig, handler: Handler) -> None:
        self.store = store
        self.handler = handler
        self.driver = WorkerDriver(config, ids=store.ids)
        self.mailbox: Mailbox[Event] = Mailbox(_INBOX)
        self._running: anyio.CancelScope | None = None

    async def run(self) -> None:
        clock = self.store.clock
        try:
            async with anyio.create_task_group() as tg:
                commands = self.driver.handle(Woken(), clock.now_ms())
                while True:
                    for command in commands:
                        self._execute(command, tg)
                    if self.driver.finished:
                        break
                    event = await self.mailbox.next(
                        self.driver.next_deadline(), clock, TimerFired()
                    )
                    commands = self.driver.handle(event, clock.now_ms())
                tg.cancel_scope.cancel()
        finally:
            self.mailbox.close()

    def _execute(self, command: Command, tg: anyio.abc.TaskGroup) -> None:
        if isinstance(command, Report):
            event = command.event
            logger.log(
                event.severity, "%s: %s %s", self.driver.config.worker_id, event.type, event.data
            )
        elif isinstance(command, CancelHandler):
            if self._running is not None:
                self._running.cancel()
                self._running = None
        elif isinstance(command, RunHandler):
            self._running = anyio.CancelScope()
            tg.start_soon(self._run_handler, command, self._running)
        else:
            tg.start_soon(self._store_call, command)

    async def _store_call(self, command: Command) -> None:
        executions, config = self.store.executions, self.driver.config
        command_id: int = getattr(command, "command_id", 0)
        result: Event
        try:
            if isinstance(command, Claim):
                claim = executions.reclaim_expired if command.reclaim else executions.claim
                handle = await claim(
                    config.lane, config.capabilities, config.worker_id, config.lease_ttl_ms
                )
                result = ExecutionClaimed(command_id=command_id, handle=handle)
            elif isinstance(command, Describe):
                info = await executions.describe(command.execution_id)
                result = Described(command_id=command_id, info=info)
            elif isinstance(command, Renew):
                cancel = await executions.renew(command.handle)
                result = Renewed(command_id=command_id, cancel_requested=cancel)
            elif isinstance(command, Finish):
                if command.failure is None:
                    await executions.complete(command.handle, command.result)
                else:
                    await executions.fail(command.handle, command.failure, command.message)
                result = Finished(command_id=command_id)
            else:  # pragma: no cover - the union is exhaustive
                raise AssertionError(command)
        except Exception as exc:  # every failure is the driver's to judge, bugs included
            result = StoreFailed(command_id=command_id, error=exc)
        await self.mailbox.post(result)

    async def _run_handler(self, command: RunHandler, scope: anyio.CancelScope) -> None:
        ended: HandlerEnded | None = None
        with scope:
            context = ExecutionContext(self.store, command.handle, command.info)
            try:
                value = await self.handler(context)
            except PermanentFailure as exc:
                ended = HandlerEnded(
                    command_id=command.command_id,
                    failure=FailureClass.PERMANENT,
                    message=f"{exc}",
                )
            except Exception as exc:
                ended = HandlerEnded(
                    command_id=command.command_id,
                    failure=FailureClass.TRANSIENT,
                    message=f"{type(exc).__name__}: {exc}",
                )
            else:
                ended = HandlerEnded(command_id=command.command_id, value=value)
        if ended is not None:  # None: cancelled
            await self.mailbox.post(ended)
