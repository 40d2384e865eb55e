"""Hypothesis stateful test: memory and SQLite side by side, same random operations.

Random session-lease, queued-work, commit, task and execution operations, with stale fences,
stale claims and stale handles kept on purpose, clock advances past expiry, and crash-and-reopen
of the SQLite store (its connection closed mid-run and the file reopened; the memory store, the
reference model, keeps its state). Every step must give the same result, or the same error type
and fields, on both adapters; after every step the queues and leases agree.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

import turnbuckle
from turnbuckle import (
    ClaimBoundary,
    DeliveryPolicy,
    GraphAppend,
    QueuedWorkDraft,
    RuntimeCommit,
    SessionNode,
    SlotPolicy,
    TaskRecord,
    TaskStatus,
    TaskSuccess,
    TurnbuckleError,
)
from turnbuckle.sansio.execution import FailureClass
from turnbuckle.testing import FakeClock, SeededIds

SESSIONS = ("s1", "s2")
OWNERS = ("a", "b")
SOAK = os.environ.get("TURNBUCKLE_SOAK") == "1"
_counter = itertools.count()


def outcome(value: Any) -> Any:
    """A comparable form of a result: tokens and ids are equal across the two stores because
    both draw from the same seeded ids in the same order."""
    if isinstance(value, TurnbuckleError):
        return ("error", type(value).__name__, repr(value))
    return ("ok", value)


class SideBySide(RuleBasedStateMachine):
    fences = Bundle("fences")
    claims = Bundle("claims")
    handles = Bundle("handles")
    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = start_blocking_portal(backend="trio")
        self.portal: BlockingPortal = self._portal_cm.__enter__()
        self.folder = tempfile.mkdtemp(prefix="tb-stateful-")
        self.path = os.path.join(self.folder, f"s{next(_counter)}.db")
        self.clocks = [FakeClock(), FakeClock()]
        # One id source per adapter for the whole run: a reopened store draws on where the
        # crashed one stopped, as the memory store does.
        self.ids = [SeededIds(7), SeededIds(7)]
        self.memory = self._open("memory://", 0)
        self.sqlite = self._open(f"sqlite:///{self.path}", 1)
        self.steps = 0

    def _open(self, url: str, index: int) -> Any:
        cm = turnbuckle.open_store(
            url,
            clock=self.clocks[index],
            ids=self.ids[index],
            durability="process",
            verify_on_open=False,
        )
        store = self.portal.call(cm.__aenter__)
        return (cm, store)

    def _both(self, op: Callable[[turnbuckle.Store], Awaitable[Any]]) -> Any:
        results = []
        for _, store in (self.memory, self.sqlite):
            try:
                results.append(outcome(self.portal.call(op, store)))
            except TurnbuckleError as exc:
                results.append(outcome(exc))
        assert results[0] == results[1], results
        self.steps += 1
        return results[0]

    # --- leases ---

    @rule(
        target=fences,
        session=st.sampled_from(SESSIONS),
        owner=st.sampled_from(OWNERS),
        ttl=st.integers(0, 100),
    )
    def claim_lease(self, session: str, owner: str, ttl: int) -> Any:
        result = self._both(lambda s: s.sessions.try_claim_lease(session, owner, ttl))
        if result[0] == "ok" and result[1] is not None:
            return result[1].fence()
        return attrs.evolve(_stale_fence(session, owner))

    @rule(fence=fences, ttl=st.integers(0, 100))
    def renew_lease(self, fence: Any, ttl: int) -> None:
        self._both(lambda s: s.sessions.renew_lease(fence, ttl))

    @rule(fence=fences)
    def release_lease(self, fence: Any) -> None:
        self._both(lambda s: s.sessions.release_lease(fence))

    # --- queued work and commits ---

    @rule(
        session=st.sampled_from(SESSIONS),
        key=st.integers(0, 5),
        delivery=st.sampled_from(list(DeliveryPolicy)),
        slot=st.sampled_from(list(SlotPolicy)),
    )
    def enqueue(self, session: str, key: int, delivery: DeliveryPolicy, slot: SlotPolicy) -> None:
        draft = QueuedWorkDraft(
            session_id=session,
            delivery=delivery,
            slot=slot,
            payloads=[{"key": key}],
            source_key=f"k{key}",
        )
        self._both(lambda s: s.sessions.enqueue(draft))

    @rule(
        target=claims,
        fence=fences,
        boundary=st.sampled_from(list(ClaimBoundary)),
        ttl=st.integers(0, 100),
        most=st.integers(1, 3),
    )
    def claim_work(self, fence: Any, boundary: ClaimBoundary, ttl: int, most: int) -> Any:
        result = self._both(
            lambda s: s.sessions.claim_queued_work(
                fence.session_id, fence, fence.owner_id, boundary, ttl, most
            )
        )
        return result[1] if result[0] == "ok" else None

    @rule(claim=claims, ttl=st.integers(0, 100))
    def renew_claim(self, claim: Any, ttl: int) -> None:
        if claim is not None:
            self._both(lambda s: s.sessions.renew_queued_work_claim(claim, ttl))

    @rule(claim=claims)
    def abandon_claim(self, claim: Any) -> None:
        if claim is not None:
            self._both(lambda s: s.sessions.abandon_queued_work_claim(claim))

    @rule(fence=fences, claim=claims, release=st.booleans(), node=st.integers(0, 10**6))
    def commit(self, fence: Any, claim: Any, release: bool, node: int) -> None:
        completed = (
            [] if claim is None or claim.session_id != fence.session_id else [claim.completion()]
        )
        commit = RuntimeCommit(
            session_id=fence.session_id,
            lease=fence,
            release=fence if release else None,
            graph=GraphAppend(nodes=[SessionNode(node_id=f"n{node}-{self.steps}")]),
            completed_claims=completed,
        )
        self._both(lambda s: s.sessions.bind(fence.session_id).commit(commit))

    # --- tasks ---

    @rule(target=tasks, ttl=st.none() | st.integers(0, 50))
    def create_task(self, ttl: int | None) -> Any:
        # A new millisecond per task: ids are then the same on both stores even across a
        # reopen (within one millisecond a store handle orders its own ids, which a reopened
        # handle cannot know about).
        self.advance_clock(1)
        result = self._both(
            lambda s: s.tasks.create_task(TaskRecord(original_method="tools/call", ttl=ttl))
        )
        return result[1].task_id if result[0] == "ok" else "missing"

    @rule(task_id=tasks, status=st.sampled_from(list(TaskStatus)))
    def move_task(self, task_id: str, status: TaskStatus) -> None:
        self._both(lambda s: s.tasks.update_task_status(task_id, status, "moved"))

    @rule(task_id=tasks)
    def complete_task(self, task_id: str) -> None:
        self._both(lambda s: s.tasks.complete_task(task_id, TaskSuccess(task_id)))

    @rule()
    def expire_tasks(self) -> None:
        self._both(lambda s: s.tasks.expire_tasks())

    # --- executions ---

    @rule(priority=st.integers(0, 2))
    def create_execution(self, priority: int) -> None:
        self._both(lambda s: s.executions.create("lane", priority=priority, payload=priority))

    @rule(target=handles, ttl=st.integers(1, 100))
    def claim_execution(self, ttl: int) -> Any:
        # Handles carry their store's identity, so each store gets its own claim; the
        # comparable parts (id, attempt, epoch) must agree.
        handles = [
            self.portal.call(s.executions.claim, "lane", [], "w", ttl)
            for _, s in (self.memory, self.sqlite)
        ]
        assert [
            None if h is None else (h.execution_id, h.attempt_index, h.lease_epoch) for h in handles
        ] == [
            None
            if handles[0] is None
            else (handles[0].execution_id, handles[0].attempt_index, handles[0].lease_epoch)
        ] * 2
        self.steps += 1
        return tuple(handles)

    @rule(pair=handles, action=st.sampled_from(["renew", "complete", "fail", "progress"]))
    def use_handle(self, pair: Any, action: str) -> None:
        if pair[0] is None:
            return
        results = []
        for handle, (_, store) in zip(pair, (self.memory, self.sqlite), strict=True):
            ex = store.executions
            call = {
                "renew": lambda ex=ex, h=handle: ex.renew(h),
                "complete": lambda ex=ex, h=handle: ex.complete(h, "done"),
                "fail": lambda ex=ex, h=handle: ex.fail(h, FailureClass.TRANSIENT, "flaky"),
                "progress": lambda ex=ex, h=handle: ex.progress(h, 50, "half"),
            }[action]
            try:
                results.append(outcome(self.portal.call(call)))
            except TurnbuckleError as exc:
                results.append(outcome(exc))
        assert results[0] == results[1], results

    # --- time and crashes ---

    @rule(ms=st.integers(0, 150))
    def advance_clock(self, ms: int) -> None:
        for clock in self.clocks:
            clock.advance(ms)

    @rule()
    def crash_and_reopen(self) -> None:
        """The SQLite store's process dies and restarts: reopen the file. Nothing acknowledged
        may be lost, so the two stores must still agree afterwards."""
        cm, _ = self.sqlite
        self.portal.call(cm.__aexit__, None, None, None)
        self.sqlite = self._open(f"sqlite:///{self.path}", 1)

    @invariant()
    def queues_and_leases_agree(self) -> None:
        for session in SESSIONS:
            self._both(lambda s, session=session: s.sessions.list_queued_work(session))
            self._both(lambda s, session=session: s.sessions.list_pending_queued_work(session))
        self._both(lambda s: s.executions.completion_events(0, 1000))

    def teardown(self) -> None:
        try:
            for cm, _ in (self.memory, self.sqlite):
                self.portal.call(cm.__aexit__, None, None, None)
            self._portal_cm.__exit__(None, None, None)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _stale_fence(session: str, owner: str) -> Any:
    from turnbuckle.sansio.lease import LeaseFence

    return LeaseFence(session_id=session, owner_id=owner, lease_token="0" * 32, fencing_token=0)


SideBySide.TestCase.settings = settings(
    max_examples=300 if SOAK else 60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_memory_and_sqlite_agree = SideBySide.TestCase
