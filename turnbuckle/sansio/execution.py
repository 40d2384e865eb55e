"""Executions: leased work on lanes, with attempts, retries, progress and streamed output.

Theory of operation
-------------------

An execution is one unit of work on a *lane*, with the *capabilities* a worker needs to run it
and a *priority*. A worker claims the best execution it can serve: the highest priority, then the
oldest, among the runnable ones whose required capabilities it has (it walks past the ones it
cannot serve, so a lower-priority match is never starved by a higher one nobody here can run).
Claiming starts (or continues) an *attempt* under a *lease*::

    runnable --claim--> active --complete--------------------------> completed
       ^                  |  \\--fail(transient | infra_crash)--> runnable (next attempt,
       |                  |        after a backoff; failed once max_attempts are used)
       |                  |  \\--fail(permanent | timeout)-------> failed
       |                  |  \\--fail(cancelled)----------------> cancelled
       |                  \\--lease expires, reclaim------------> active (same attempt, new epoch)

Fencing is strict, unlike the reference: every operation a worker makes with its handle (renew,
complete, fail, progress, append) checks, in the same transaction, that the handle's epoch is
the execution's current one (else ``LeaseConflict``: reclaimed by someone else), that the lease
is still live (else ``LeaseExpired``), and that the execution is not terminal (else
``ExecutionTerminal``). So an expired, reclaimed or finished handle can never write again. The
lease epoch grows on every claim and reclaim and never resets, across attempts.

Progress is two optional fields (percent, message); an update keeps a field it does not name,
and an update naming neither is a no-op. Output is a stream of frames (stdout, stderr, event,
blob) numbered from 1, plus an optional summary document updated by RFC 7396 JSON merge patch,
with a version that counts the patches. Lease events (acquired, renewed, revoked, reclaimed) and
completion events (completed, failed, cancelled, retry_scheduled) go to a durable outbox in the
same transaction as the change they report.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs

from turnbuckle.errors import (
    CorruptRecordError,
    ExecutionTerminal,
    InvalidArgument,
    LeaseConflict,
    LeaseExpired,
)
from turnbuckle.sansio.codec import (
    JSON,
    check_int64,
    check_text,
    decode_json,
    encode_json,
    sequence,
)

__all__ = [
    "ExecutionRow",
    "ExecutionState",
    "FailureClass",
    "FrameKind",
    "Handle",
    "RetryPolicy",
    "check_handle",
    "check_lease_ttl",
    "claim_execution",
    "complete_execution",
    "fail_execution",
    "merge_patch",
    "new_execution",
    "public_state",
    "reclaim_execution",
    "renew_execution",
    "report_progress",
    "select_for_claim",
]


class FailureClass(enum.Enum):
    TRANSIENT = "transient"
    INFRA_CRASH = "infra_crash"
    PERMANENT = "permanent"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


_RETRIED: Final = frozenset({FailureClass.TRANSIENT, FailureClass.INFRA_CRASH})


class FrameKind(enum.Enum):
    STDOUT = "stdout"
    STDERR = "stderr"
    EVENT = "event"
    BLOB = "blob"


class ExecutionState(enum.Enum):
    """The public state, derived from the stored fields."""

    WAITING = "waiting"
    DELAYED = "delayed"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (ExecutionState.COMPLETED, ExecutionState.FAILED, ExecutionState.CANCELLED)


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Retries of transient failures: at most ``max_attempts`` attempts in all, the n-th retry
    after ``min(base_backoff_ms * 2**(n-1), max_backoff_ms)``."""

    max_attempts: int = 3
    base_backoff_ms: int = 1000
    max_backoff_ms: int = 60_000

    def backoff_ms(self, failed_attempts: int) -> int:
        return int(
            min(self.base_backoff_ms * 2 ** max(failed_attempts - 1, 0), self.max_backoff_ms)
        )


@attrs.frozen(kw_only=True)
class ExecutionRow:
    """An execution as a store keeps it (payloads as canonical JSON text)."""

    execution_id: str
    lane: str
    priority: int
    capabilities: tuple[str, ...] = attrs.field(converter=sequence)
    created_at_ms: int
    payload: str | None
    #: "runnable", "active" or "terminal".
    phase: str
    attempt_index: int = 0
    lease_epoch: int = 0
    worker_id: str | None = None
    lease_expires_at_ms: int | None = None
    lease_ttl_ms: int = 0
    not_before_ms: int = 0
    #: For terminal executions: "completed", "failed" or "cancelled".
    outcome: str | None = None
    result: str | None = None
    failure: str | None = None
    progress_pct: int | None = None
    progress_message: str | None = None
    max_attempts: int = 3
    base_backoff_ms: int = 1000
    max_backoff_ms: int = 60_000
    summary: str | None = None
    summary_version: int = 0
    frame_count: int = 0
    version: int = 1

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            base_backoff_ms=self.base_backoff_ms,
            max_backoff_ms=self.max_backoff_ms,
        )


@attrs.frozen(kw_only=True)
class Handle:
    """What a claim gives a worker; opaque to it. ``store_id`` and ``backend`` name the store
    that issued it, so a handle is refused by any other store."""

    store_id: str
    backend: str
    execution_id: str
    attempt_index: int
    lease_epoch: int
    lease_ttl_ms: int
    worker_id: str
    #: "fresh" (a claim) or "reclaimed" (a resume of an expired lease).
    kind: str = "fresh"


def new_execution(
    *,
    execution_id: str,
    lane: str,
    capabilities: Iterable[str],
    priority: int,
    payload: JSON,
    retry: RetryPolicy,
    now_ms: int,
    limit: int,
) -> ExecutionRow:
    """Validate and make a new runnable execution.

    Raises:
        InvalidArgument, PayloadNotSerializable, PayloadTooLarge: a bad field.
    """
    check_text("lane", lane, limit=limit)
    if not lane:
        raise InvalidArgument("lane must not be empty")
    caps = tuple(sorted(set(_check_capabilities(capabilities))))
    if type(priority) is not int or not -(1 << 31) <= priority < 1 << 31:
        raise InvalidArgument(f"priority must be a 32-bit int, got {priority!r}")
    if not isinstance(retry, RetryPolicy):
        raise InvalidArgument(f"retry must be a RetryPolicy, got {retry!r}")
    check_int64("max_attempts", retry.max_attempts, minimum=1)
    for name in ("base_backoff_ms", "max_backoff_ms"):
        if check_int64(name, getattr(retry, name)) > _MAX_BACKOFF_MS:
            raise InvalidArgument(f"{name} must be at most 30 days, got {getattr(retry, name)}")
    return ExecutionRow(
        execution_id=execution_id,
        lane=lane,
        priority=priority,
        capabilities=caps,
        created_at_ms=now_ms,
        payload=encode_json(payload, limit=limit),
        phase="runnable",
        max_attempts=retry.max_attempts,
        base_backoff_ms=retry.base_backoff_ms,
        max_backoff_ms=retry.max_backoff_ms,
    )


_MAX_BACKOFF_MS: Final = 30 * 86_400_000


def _check_capabilities(capabilities: Iterable[str]) -> list[str]:
    if isinstance(capabilities, str) or not isinstance(capabilities, Iterable):
        raise InvalidArgument(f"capabilities must be a collection of str, got {capabilities!r}")
    caps = list(capabilities)
    for cap in caps:
        check_text("capability", cap)
    return caps


def is_claimable(row: ExecutionRow, now_ms: int) -> bool:
    return row.phase == "runnable" and row.not_before_ms <= now_ms


def select_for_claim(
    candidates: Sequence[ExecutionRow], capabilities: Iterable[str], *, now_ms: int
) -> ExecutionRow | None:
    """The execution a worker with ``capabilities`` claims among a lane's ``candidates``: the
    highest priority, then the oldest, whose required capabilities it has."""
    have = set(_check_capabilities(capabilities))
    ordered = sorted(
        (r for r in candidates if is_claimable(r, now_ms)),
        key=lambda r: (-r.priority, r.created_at_ms, r.execution_id),
    )
    for row in ordered:
        if set(row.capabilities) <= have:
            return row
    return None


def check_lease_ttl(ttl_ms: object) -> int:
    """Validate a worker lease ttl.

    Raises:
        InvalidArgument: not an int from 1 ms to 30 days.
    """
    return _check_ttl(ttl_ms)


def _check_ttl(ttl_ms: object) -> int:
    ttl = check_int64("lease_ttl_ms", ttl_ms, minimum=1)
    if ttl > 30 * 86_400_000:
        raise InvalidArgument(f"lease_ttl_ms must be at most 30 days, got {ttl}")
    return ttl


def _bump(row: ExecutionRow, **changes: Any) -> ExecutionRow:
    return attrs.evolve(row, version=row.version + 1, **changes)


def claim_execution(
    row: ExecutionRow, worker_id: str, ttl_ms: int, *, now_ms: int, store_id: str, backend: str
) -> tuple[ExecutionRow, Handle]:
    """Start (or continue) the execution's current attempt under a new lease."""
    check_text("worker_id", worker_id)
    ttl = _check_ttl(ttl_ms)
    epoch = row.lease_epoch + 1
    claimed = _bump(
        row,
        phase="active",
        lease_epoch=epoch,
        worker_id=worker_id,
        lease_expires_at_ms=now_ms + ttl,
        lease_ttl_ms=ttl,
    )
    return claimed, Handle(
        store_id=store_id,
        backend=backend,
        execution_id=row.execution_id,
        attempt_index=row.attempt_index,
        lease_epoch=epoch,
        lease_ttl_ms=ttl,
        worker_id=worker_id,
    )


def reclaim_execution(
    row: ExecutionRow, worker_id: str, ttl_ms: int, *, now_ms: int, store_id: str, backend: str
) -> tuple[ExecutionRow, Handle] | None:
    """Take over an active execution whose lease expired (its worker died): same attempt, a
    higher epoch. None while the lease is live, or when the execution is not active."""
    if row.phase != "active" or (row.lease_expires_at_ms or 0) > now_ms:
        return None
    claimed, handle = claim_execution(
        row, worker_id, ttl_ms, now_ms=now_ms, store_id=store_id, backend=backend
    )
    return claimed, attrs.evolve(handle, kind="reclaimed")


def check_handle(row: ExecutionRow, handle: Handle, *, now_ms: int) -> None:
    """Strict fencing: the handle's epoch is current, its lease live, the execution running.

    Raises:
        ExecutionTerminal: the execution ended.
        LeaseConflict: another claim or reclaim has the execution now.
        LeaseExpired: the lease ran out (and nobody reclaimed it yet).
    """
    if row.phase == "terminal":
        raise ExecutionTerminal(row.execution_id, row.outcome)
    if (
        row.phase != "active"
        or handle.lease_epoch != row.lease_epoch
        or handle.attempt_index != row.attempt_index
    ):
        raise LeaseConflict(row.execution_id, handle.lease_epoch, row.lease_epoch)
    if (row.lease_expires_at_ms or 0) <= now_ms:
        raise LeaseExpired(row.execution_id)


def renew_execution(row: ExecutionRow, handle: Handle, *, now_ms: int) -> ExecutionRow:
    """Extend a live lease to ``now + ttl``."""
    check_handle(row, handle, now_ms=now_ms)
    return _bump(row, lease_expires_at_ms=now_ms + row.lease_ttl_ms)


def complete_execution(
    row: ExecutionRow, handle: Handle, result: str | None, *, now_ms: int
) -> ExecutionRow:
    """End the execution successfully with ``result`` (encoded JSON)."""
    check_handle(row, handle, now_ms=now_ms)
    return _bump(
        row,
        phase="terminal",
        outcome="completed",
        result=result,
        worker_id=None,
        lease_expires_at_ms=None,
    )


def fail_execution(
    row: ExecutionRow, handle: Handle, failure: FailureClass, message: str, *, now_ms: int
) -> tuple[ExecutionRow, str]:
    """Fail the current attempt; returns the new row and what happened: ``"retry_scheduled"``,
    ``"failed"`` or ``"cancelled"``."""
    check_handle(row, handle, now_ms=now_ms)
    if not isinstance(failure, FailureClass):
        raise InvalidArgument(f"failure must be a FailureClass, got {failure!r}")
    released = {"worker_id": None, "lease_expires_at_ms": None, "failure": message}
    if failure in _RETRIED and row.attempt_index + 1 < row.max_attempts:
        delay = row.retry_policy.backoff_ms(row.attempt_index + 1)
        return _bump(
            row,
            phase="runnable",
            attempt_index=row.attempt_index + 1,
            not_before_ms=now_ms + delay,
            **released,
        ), "retry_scheduled"
    outcome = "cancelled" if failure is FailureClass.CANCELLED else "failed"
    return _bump(row, phase="terminal", outcome=outcome, **released), outcome


def report_progress(
    row: ExecutionRow, handle: Handle, pct: int | None, message: str | None, *, now_ms: int
) -> ExecutionRow | None:
    """Progress: each field optional, an absent one kept; None when there is nothing to write.

    Raises:
        InvalidArgument: ``pct`` not an int from 0 to 100, or ``message`` not a str.
    """
    if pct is not None and (type(pct) is not int or not 0 <= pct <= 100):
        raise InvalidArgument(f"progress percent must be an int from 0 to 100, got {pct!r}")
    check_text("progress message", message, optional=True)
    check_handle(row, handle, now_ms=now_ms)
    if pct is None and message is None:
        return None
    return _bump(
        row,
        progress_pct=row.progress_pct if pct is None else pct,
        progress_message=row.progress_message if message is None else message,
    )


def merge_patch(target: JSON, patch: JSON) -> JSON:
    """RFC 7396 JSON merge patch: objects merge recursively, ``null`` deletes a member, and
    anything else replaces the target."""
    if not isinstance(patch, dict):
        return patch
    result: dict[str, JSON] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_summary_patch(row: ExecutionRow, patch: JSON, *, limit: int) -> ExecutionRow:
    """Merge ``patch`` into the summary document and bump its version.

    Raises:
        CorruptRecordError: the stored document is not JSON.
        PayloadNotSerializable, PayloadTooLarge: the patch or the result is not plain JSON or
            too large.
    """
    encode_json(patch, limit=limit)
    try:
        current = None if row.summary is None else decode_json(row.summary)
    except ValueError as exc:
        raise CorruptRecordError(
            "executions", row.execution_id, f"summary document: {exc}"
        ) from exc
    merged = merge_patch(current, patch)
    return _bump(
        row, summary=encode_json(merged, limit=limit), summary_version=row.summary_version + 1
    )


def public_state(row: ExecutionRow, now_ms: int) -> ExecutionState:
    """The state a caller sees."""
    if row.phase == "terminal":
        return ExecutionState(row.outcome)
    if row.phase == "active":
        return ExecutionState.ACTIVE
    return ExecutionState.DELAYED if row.not_before_ms > now_ms else ExecutionState.WAITING
