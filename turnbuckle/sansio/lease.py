"""The session execution lease: one writer per session, fenced, as pure decisions.

Theory of operation
-------------------

Everything that changes a session (a turn, queued-work delivery, a session command) first takes
the session's execution lease. A store keeps one lease row per session, forever: its
``fencing_token`` only ever grows, across release, expiry and reopen, so a holder that stalled
past its lease can never write again with its old token (a zombie's token never becomes valid
again, as it would if the row were deleted and the count restarted)::

    free/expired --claim(owner)------------------> held(owner, token, fencing + 1)
    held ---------claim(same owner)--------------> held (re-entry: same token, later expiry)
    held ---------claim(other owner)-------------> refused (None)
    held ---------renew(live matching fence)-----> held (later expiry)
    held ---------renew(anything else)-----------> SessionExecutionLeaseExpired
    held ---------release(matching fence)--------> free (fencing token kept)
    any ----------release(stale fence)-----------> unchanged (idempotent, never frees a newer lease)

A lease is live while ``now < expires_at_ms``: a lease claimed with ttl 0 is already expired and
anyone may reclaim it. Leases give liveness; fencing gives safety: every fenced write checks the
whole fence (session, owner, token, fencing token) against the live row in the same transaction
as the write it protects, so even a wrong clock cannot let two holders both write.
"""

from __future__ import annotations

from typing import Final

import attrs

from turnbuckle.errors import InvalidArgument, SessionExecutionLeaseExpired
from turnbuckle.sansio.codec import check_int64, check_text
from turnbuckle.sansio.ids import IdSource, random_hex

__all__ = [
    "MAX_TTL_MS",
    "LeaseFence",
    "LeaseRow",
    "SessionLease",
    "check_fence",
    "check_fence_argument",
    "check_ttl",
    "claim_lease",
    "free_lease_row",
    "is_live",
    "release_lease",
    "renew_lease",
]

#: Longest lease a caller may ask for (30 days); a longer one is almost surely a unit mistake.
MAX_TTL_MS: Final = 30 * 86_400_000


@attrs.frozen(kw_only=True)
class LeaseFence:
    """Proof of holding a session's lease: what every fenced write (and a release) presents."""

    session_id: str
    owner_id: str
    lease_token: str
    fencing_token: int


@attrs.frozen(kw_only=True)
class SessionLease:
    """A granted session execution lease."""

    session_id: str
    owner_id: str
    #: Secret to this grant: a re-entry by the same owner gets the same token.
    lease_token: str
    #: Grows by one on every new grant of this session's lease, never reset.
    fencing_token: int
    claimed_at_ms: int
    expires_at_ms: int

    def fence(self) -> LeaseFence:
        """The fence to present on fenced writes, renewals and the release."""
        return LeaseFence(
            session_id=self.session_id,
            owner_id=self.owner_id,
            lease_token=self.lease_token,
            fencing_token=self.fencing_token,
        )


@attrs.frozen(kw_only=True)
class LeaseRow:
    """A session's lease as a store keeps it; ``lease_token`` None means nobody holds it."""

    session_id: str
    owner_id: str | None
    lease_token: str | None
    fencing_token: int
    claimed_at_ms: int
    expires_at_ms: int

    def lease(self) -> SessionLease:
        """The grant this row records (only for a held row)."""
        assert self.owner_id is not None and self.lease_token is not None
        return SessionLease(
            session_id=self.session_id,
            owner_id=self.owner_id,
            lease_token=self.lease_token,
            fencing_token=self.fencing_token,
            claimed_at_ms=self.claimed_at_ms,
            expires_at_ms=self.expires_at_ms,
        )


def free_lease_row(session_id: str) -> LeaseRow:
    """The row of a session whose lease was never claimed."""
    return LeaseRow(
        session_id=session_id,
        owner_id=None,
        lease_token=None,
        fencing_token=0,
        claimed_at_ms=0,
        expires_at_ms=0,
    )


def is_live(row: LeaseRow, now_ms: int) -> bool:
    """True while someone holds the lease and it has not expired."""
    return row.lease_token is not None and now_ms < row.expires_at_ms


def check_ttl(ttl_ms: object) -> int:
    """Validate a lease or claim ttl.

    Raises:
        InvalidArgument: not an int from 0 to :data:`MAX_TTL_MS`.
    """
    ttl = check_int64("ttl_ms", ttl_ms)
    if ttl > MAX_TTL_MS:
        raise InvalidArgument(f"ttl_ms must be at most {MAX_TTL_MS} (30 days), got {ttl}")
    return ttl


def check_fence_argument(fence: object) -> LeaseFence:
    """Validate a fence's shape (before any store is touched).

    Raises:
        InvalidArgument: not a LeaseFence, or a field of the wrong type.
    """
    if not isinstance(fence, LeaseFence):
        raise InvalidArgument(f"expected a LeaseFence, got {fence!r}")
    for name in ("session_id", "owner_id", "lease_token"):
        check_text(name, getattr(fence, name))
    check_int64("fencing_token", fence.fencing_token)
    return fence


def claim_lease(
    row: LeaseRow, owner_id: str, ttl_ms: int, *, now_ms: int, ids: IdSource
) -> tuple[LeaseRow, SessionLease] | None:
    """Try to take (or re-enter) the lease. None: another owner holds it.

    Raises:
        InvalidArgument: an empty owner, or a ttl out of range.
    """
    check_text("owner_id", owner_id)
    if not owner_id:
        raise InvalidArgument("owner_id must not be empty")
    expires = now_ms + check_ttl(ttl_ms)
    if is_live(row, now_ms):
        if row.owner_id != owner_id:
            return None
        # Re-entry: the same grant, held longer (never shorter).
        row = attrs.evolve(row, expires_at_ms=max(row.expires_at_ms, expires))
        return row, row.lease()
    row = LeaseRow(
        session_id=row.session_id,
        owner_id=owner_id,
        lease_token=random_hex(ids),
        fencing_token=row.fencing_token + 1,
        claimed_at_ms=now_ms,
        expires_at_ms=expires,
    )
    return row, row.lease()


def _matches(row: LeaseRow, fence: LeaseFence) -> bool:
    return (
        row.lease_token is not None
        and fence.session_id == row.session_id
        and fence.owner_id == row.owner_id
        and fence.lease_token == row.lease_token
        and fence.fencing_token == row.fencing_token
    )


def check_fence(row: LeaseRow, fence: LeaseFence, *, now_ms: int) -> None:
    """Check that ``fence`` is the session's live lease.

    Raises:
        SessionExecutionLeaseExpired: expired, released, reclaimed, forged, or another
            session's.
    """
    if not (_matches(row, fence) and is_live(row, now_ms)):
        raise SessionExecutionLeaseExpired(row.session_id)


def renew_lease(
    row: LeaseRow, fence: LeaseFence, ttl_ms: int, *, now_ms: int
) -> tuple[LeaseRow, SessionLease]:
    """Extend a live lease to at least ``now + ttl_ms``.

    Raises:
        SessionExecutionLeaseExpired: ``fence`` is not the live lease.
        InvalidArgument: a ttl out of range.
    """
    expires = now_ms + check_ttl(ttl_ms)
    check_fence(row, fence, now_ms=now_ms)
    row = attrs.evolve(row, expires_at_ms=max(row.expires_at_ms, expires))
    return row, row.lease()


def release_lease(row: LeaseRow, fence: LeaseFence) -> LeaseRow | None:
    """Free the lease if ``fence`` is its current grant (expired or not); None if there is
    nothing to do: a stale or repeated release never frees a newer grant."""
    if not _matches(row, fence):
        return None
    return attrs.evolve(row, owner_id=None, lease_token=None)
