"""Opening stores: one door, ``open_store(url)``, for every adapter."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from turnbuckle.adapters.executions import ExecutionFacet
from turnbuckle.adapters.memory import MemoryRunner, MemoryTables
from turnbuckle.adapters.sessions import DurabilityTier, SessionFacet
from turnbuckle.adapters.sqlite import Durability, SqliteRunner
from turnbuckle.adapters.tasks import Clock, TaskFacet
from turnbuckle.errors import InvalidArgument
from turnbuckle.sansio.codec import DEFAULT_MAX_PAYLOAD_BYTES, check_int64
from turnbuckle.sansio.ids import IdSource

__all__ = ["Store", "SystemClock", "SystemIds", "open_store"]


class SystemClock:
    """Wall-clock time, shared by every process on the host (leases and TTLs compare it)."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class SystemIds:
    """Randomness from the operating system's CSPRNG, so ids are unguessable."""

    def random_bits(self, k: int) -> int:
        return secrets.randbits(k)


class Store:
    """An open store. Use it as ``async with open_store(url) as store``.

    Attributes:
        tasks: durable MCP tasks (:class:`~turnbuckle.adapters.tasks.TaskFacet`).
        sessions: session heads, leases and queued work
            (:class:`~turnbuckle.adapters.sessions.SessionFacet`).
        executions: leased work on lanes
            (:class:`~turnbuckle.adapters.executions.ExecutionFacet`).
        backend_name: ``"in-memory"`` or ``"sqlite"``.
        url: the URL it was opened with.
        clock: where the store reads the time. A runtime or a worker on the store times its
            leases and retries by the same clock, so one clock drives everything (a fake one
            runs a whole runtime in simulated time).
        ids: where the store (and a runtime on it) draws randomness.
    """

    def __init__(
        self,
        *,
        url: str,
        tasks: TaskFacet,
        sessions: SessionFacet,
        executions: ExecutionFacet,
        closer: Callable[[], Awaitable[None]],
        clock: Clock,
        ids: IdSource,
    ) -> None:
        self.url = url
        self.clock = clock
        self.ids = ids
        self.tasks = tasks
        self.sessions = sessions
        self.executions = executions
        self.backend_name = tasks.backend_name
        self._closer = closer

    async def aclose(self) -> None:
        """Finish what is in flight and close. Later calls raise ``StoreClosedError``; closing
        twice is a no-op. In a child process made by ``fork`` (where every call raises
        ``StoreUsedInForkedChild``) it returns at once and leaves the parent's store open."""
        await self._closer()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<turnbuckle Store {self.url!r}>"


@contextlib.asynccontextmanager
async def open_store(
    url: str,
    *,
    durability: Durability = "full",
    max_tasks: int = 0,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    verify_on_open: bool = True,
    busy_timeout: float = 5.0,
    clock: Clock | None = None,
    ids: IdSource | None = None,
) -> AsyncIterator[Store]:
    """Open a store and close it when the block ends.

    ``url`` is ``"memory://"`` (a private in-memory store, gone when closed) or
    ``"sqlite:///relative/path.db"`` / ``"sqlite:////absolute/path.db"`` (a file, created if
    missing, shared safely by every process on this host that opens it).

    Options: ``durability`` (SQLite: ``"full"`` survives power loss, ``"process"`` survives a
    process crash); ``max_tasks`` (0 = unlimited); ``max_payload_bytes`` (one encoded payload);
    ``verify_on_open`` (SQLite: run ``quick_check``, O(file size)); ``busy_timeout`` (seconds to
    wait for another process's write lock); ``clock`` and ``ids`` (inject time and randomness, for
    deterministic tests).

    Raises:
        InvalidArgument: an unknown URL scheme or a bad option.
        StoreOpenError and its subclasses, StoreCorruptError, StoreReadOnlyError,
        StoreBusyError: the SQLite file cannot be used (see the error for why).
    """
    check_int64("max_tasks", max_tasks)
    check_int64("max_payload_bytes", max_payload_bytes, minimum=1)
    clock = SystemClock() if clock is None else clock
    ids = SystemIds() if ids is None else ids
    if not isinstance(url, str):
        raise InvalidArgument(f"url must be a str, got {url!r}")
    runner: MemoryRunner | SqliteRunner
    tier: DurabilityTier
    if url == "memory://":
        runner = MemoryRunner(MemoryTables())
        backend, tier = "in-memory", "inline"
    elif url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        runner = SqliteRunner(
            url[len("sqlite:///") :],
            durability=durability,
            busy_timeout_s=busy_timeout,
            verify_on_open=verify_on_open,
        )
        await runner.start()
        backend, tier = "sqlite", "durable"
    else:
        raise InvalidArgument(
            f"unknown store URL {url!r}: use 'memory://' or 'sqlite:///path/to/file.db'"
        )
    store = Store(
        url=url,
        tasks=TaskFacet(
            runner,
            backend_name=backend,
            clock=clock,
            ids=ids,
            max_tasks=max_tasks,
            max_payload_bytes=max_payload_bytes,
        ),
        sessions=SessionFacet(
            runner, clock=clock, ids=ids, max_payload_bytes=max_payload_bytes, durability_tier=tier
        ),
        executions=ExecutionFacet(
            runner, backend_name=backend, clock=clock, ids=ids, max_payload_bytes=max_payload_bytes
        ),
        closer=runner.aclose,
        clock=clock,
        ids=ids,
    )
    try:
        yield store
    finally:
        await store.aclose()
