"""The session execution lease: the reference contract, exhaustively, and by property."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnbuckle.errors import InvalidArgument, SessionExecutionLeaseExpired
from turnbuckle.sansio.lease import (
    MAX_TTL_MS,
    LeaseFence,
    LeaseRow,
    check_fence,
    claim_lease,
    free_lease_row,
    is_live,
    release_lease,
    renew_lease,
)
from turnbuckle.testing import SeededIds

NOW = 1_000_000


def claim(row: LeaseRow, owner: str, ttl: int = 60_000, now: int = NOW, seed: int = 0):  # type: ignore[no-untyped-def]
    return claim_lease(row, owner, ttl, now_ms=now, ids=SeededIds(seed))


def test_the_reference_lease_contract() -> None:
    row = free_lease_row("root")
    row, first = claim(row, "owner-a")
    assert first.fencing_token == 1 and is_live(row, NOW)
    # Re-entry by the same owner: same grant, later expiry.
    row, again = claim(row, "owner-a", ttl=120_000, seed=1)
    assert (again.lease_token, again.fencing_token) == (first.lease_token, first.fencing_token)
    assert again.expires_at_ms >= first.expires_at_ms
    assert claim(row, "owner-b") is None, "a live lease excludes other owners"
    row, renewed = renew_lease(row, again.fence(), 120_000, now_ms=NOW + 1)
    assert renewed.lease_token == first.lease_token
    assert renewed.expires_at_ms >= again.expires_at_ms
    stale = attrs.evolve(first.fence(), lease_token=first.lease_token + ":stale")
    with pytest.raises(SessionExecutionLeaseExpired):
        renew_lease(row, stale, 60_000, now_ms=NOW)
    assert release_lease(row, stale) is None, "a stale release changes nothing"
    assert claim(row, "owner-b") is None
    freed = release_lease(row, renewed.fence())
    assert freed is not None and not is_live(freed, NOW)
    row, second = claim(freed, "owner-b", seed=2)
    assert second.fencing_token > first.fencing_token
    assert release_lease(row, first.fence()) is None, "an old release never frees a newer lease"
    row = release_lease(row, second.fence())
    assert row is not None
    row, expired = claim(row, "owner-expired", ttl=0, seed=3)
    assert not is_live(row, NOW), "a ttl-0 lease is already expired"
    row, reclaimed = claim(row, "owner-reclaim", seed=4)
    assert reclaimed.fencing_token > expired.fencing_token


def test_fences_must_match_in_every_field_and_be_live() -> None:
    row, lease = claim(free_lease_row("s"), "o")
    fence = lease.fence()
    check_fence(row, fence, now_ms=NOW)
    forged = [
        attrs.evolve(fence, session_id="other"),
        attrs.evolve(fence, owner_id="x"),
        attrs.evolve(fence, lease_token="0" * 32),
        attrs.evolve(fence, fencing_token=fence.fencing_token + 1),
        attrs.evolve(fence, fencing_token=fence.fencing_token - 1),
    ]
    for bad in forged:
        with pytest.raises(SessionExecutionLeaseExpired) as caught:
            check_fence(row, bad, now_ms=NOW)
        assert caught.value.session_id == "s"
        assert release_lease(row, bad) is None
    with pytest.raises(SessionExecutionLeaseExpired):
        check_fence(row, fence, now_ms=lease.expires_at_ms)  # expiry is exclusive
    with pytest.raises(SessionExecutionLeaseExpired):
        renew_lease(row, fence, 1000, now_ms=lease.expires_at_ms)
    # An expired grant can still be released by its holder (it frees nothing newer).
    assert release_lease(row, fence) is not None


@pytest.mark.parametrize("ttl", [-1, MAX_TTL_MS + 1, 1.5, True, None])
def test_bad_ttls_are_refused(ttl: object) -> None:
    with pytest.raises(InvalidArgument):
        claim(free_lease_row("s"), "o", ttl=ttl)  # type: ignore[arg-type]
    row, lease = claim(free_lease_row("s"), "o")
    with pytest.raises(InvalidArgument):
        renew_lease(row, lease.fence(), ttl, now_ms=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("owner", ["", None, 5])
def test_bad_owners_are_refused(owner: object) -> None:
    with pytest.raises(InvalidArgument):
        claim(free_lease_row("s"), owner)  # type: ignore[arg-type]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("claim"), st.sampled_from("abc"), st.integers(0, 50)),
        st.tuples(st.just("renew"), st.integers(0, 9), st.integers(0, 50)),
        st.tuples(st.just("release"), st.integers(0, 9)),
        st.tuples(st.just("tick"), st.integers(0, 60)),
    ),
    max_size=60,
)


@given(ops)
def test_fencing_only_grows_and_one_holder_at_a_time(steps: list[tuple[object, ...]]) -> None:
    """Random claims, renewals, releases and clock ticks: a new grant always gets a higher
    fencing token; at any moment at most one fence passes the check, and it is the newest."""
    row, now, ids = free_lease_row("s"), 0, SeededIds(9)
    grants: list[LeaseFence] = []
    for step in steps:
        kind = step[0]
        if kind == "claim":
            got = claim_lease(row, str(step[1]), int(step[2]), now_ms=now, ids=ids)  # type: ignore[call-overload]
            if got is not None:
                row, lease = got
                if not grants or lease.fence() != grants[-1]:
                    assert not grants or lease.fencing_token > grants[-1].fencing_token
                    grants.append(lease.fence())
        elif kind == "renew" and grants:
            fence = grants[int(step[1]) % len(grants)]  # type: ignore[call-overload]
            try:
                row, _ = renew_lease(row, fence, int(step[2]), now_ms=now)  # type: ignore[call-overload]
            except SessionExecutionLeaseExpired:
                pass
            else:
                assert fence == grants[-1]
        elif kind == "release" and grants:
            row = release_lease(row, grants[int(step[1]) % len(grants)]) or row  # type: ignore[call-overload]
        elif kind == "tick":
            now += int(step[1])  # type: ignore[call-overload]
        passing = []
        for fence in grants:
            try:
                check_fence(row, fence, now_ms=now)
                passing.append(fence)
            except SessionExecutionLeaseExpired:
                pass
        assert passing in ([], [grants[-1]] if grants else [])
