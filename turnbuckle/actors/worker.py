"""Workers: claim executions of a lane, run them with a handler, keep their leases.

Theory of operation
-------------------

``async with worker(store, lane, capabilities, handler, concurrency=N)`` runs N slots. Each slot
loops: claim the best runnable execution it can serve (or reclaim one whose worker's lease
expired), then run ``await handler(context)`` while a keeper renews the lease every ttl/3. The
handler's end decides the execution's:

- a return value completes it with that value as the result;
- :class:`PermanentFailure` fails it for good; any other exception fails the attempt as
  transient, so it is retried under the execution's retry policy (or fails once the attempts are
  used up);
- a cancellation requested through the store (``request_cancel``, or cancelling the task the
  execution backs) cancels the handler and ends the execution ``cancelled``;
- losing the lease (the keeper's renewal is refused: the process stalled past its ttl and
  someone reclaimed the work) cancels the handler and writes nothing: the new owner finishes it.

An idle slot polls the lane every ``poll_interval`` seconds.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import anyio
import attrs

from turnbuckle.adapters.executions import ExecutionInfo
from turnbuckle.adapters.store import Store
from turnbuckle.errors import (
    ExecutionError,
    InvalidArgument,
    TurnbuckleError,
)
from turnbuckle.sansio.codec import JSON
from turnbuckle.sansio.execution import FailureClass, FrameKind, Handle

__all__ = ["ExecutionContext", "PermanentFailure", "open_worker"]


#: How many times a worker tries to record how a run ended, on retryable store failures.
_FINISH_TRIES = 5


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
    if type(lease_ttl_ms) is not int or lease_ttl_ms < 30:
        raise InvalidArgument(f"lease_ttl_ms must be an int >= 30, got {lease_ttl_ms!r}")
    caps = tuple(capabilities)
    name = worker_id or f"worker-{secrets.token_hex(6)}"
    async with anyio.create_task_group() as tg:
        for slot in range(concurrency):
            tg.start_soon(
                _slot, store, lane, caps, handler, f"{name}/{slot}", lease_ttl_ms, poll_interval
            )
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


async def _slot(
    store: Store,
    lane: str,
    caps: tuple[str, ...],
    handler: Handler,
    worker_id: str,
    ttl: int,
    poll: float,
) -> None:
    executions = store.executions
    while True:
        try:
            handle = await executions.claim(lane, caps, worker_id, ttl)
            if handle is None:
                handle = await executions.reclaim_expired(lane, caps, worker_id, ttl)
        except TurnbuckleError:
            handle = None  # the store is busy or closing: try again after a pause
        if handle is None:
            await anyio.sleep(poll)
            continue
        # Lost or finished meanwhile, or the store failed: nothing more to do here. Work this
        # worker could not finish goes back to the lane when its lease expires.
        with contextlib.suppress(TurnbuckleError):
            await _run_one(store, handle, handler, ttl)


async def _run_one(store: Store, handle: Handle, handler: Handler, ttl: int) -> None:
    executions = store.executions
    info = await executions.describe(handle.execution_id)
    state = {"lost": False, "cancelled": False}
    result: Any = None
    error: BaseException | None = None
    async with anyio.create_task_group() as tg:
        work = anyio.CancelScope()

        async def keep() -> None:
            while True:
                await anyio.sleep(max(ttl / 3000, 0.01))
                try:
                    if await executions.renew(handle):
                        state["cancelled"] = True
                        work.cancel()
                        return
                except ExecutionError:
                    state["lost"] = True
                    work.cancel()
                    return
                except TurnbuckleError:
                    continue  # the store is busy for a moment: renew at the next tick

        tg.start_soon(keep)
        with work:
            try:
                result = await handler(ExecutionContext(store, handle, info))
            except Exception as exc:
                error = exc
        tg.cancel_scope.cancel()
    if state["lost"]:
        return

    async def finish() -> None:
        if state["cancelled"]:
            await executions.fail(handle, FailureClass.CANCELLED, "cancelled on request")
        elif isinstance(error, PermanentFailure):
            await executions.fail(handle, FailureClass.PERMANENT, f"{error}")
        elif error is not None:
            await executions.fail(
                handle, FailureClass.TRANSIENT, f"{type(error).__name__}: {error}"
            )
        else:
            try:
                await executions.complete(handle, result)
            except InvalidArgument as exc:  # the handler returned something not storable
                await executions.fail(handle, FailureClass.PERMANENT, f"bad result: {exc}")

    with anyio.CancelScope(shield=True):
        # A retryable store failure (busy, full) may hide a write that did apply: trying again
        # is safe, since a second end of the same attempt is refused (ExecutionTerminal).
        for attempt in range(_FINISH_TRIES):
            try:
                await finish()
                return
            except TurnbuckleError as exc:
                if not exc.retryable or attempt == _FINISH_TRIES - 1:
                    raise
                await anyio.sleep(0.05 * 2**attempt)
