"""The runtime commit decision, the turn-commit hash and the graph reads, as pure functions."""

from __future__ import annotations

import attrs
import pytest

from turnbuckle.errors import (
    HeadRevisionConflict,
    InvalidArgument,
    QueuedWorkClaimExpired,
    RuntimeTurnCommitConflict,
    SessionBindingMismatch,
    SessionExecutionLeaseExpired,
)
from turnbuckle.sansio.lease import claim_lease, free_lease_row
from turnbuckle.sansio.queue import QueuedWorkCompletion
from turnbuckle.sansio.session import (
    ActivePath,
    Checkpoint,
    FullGraph,
    GraphAppend,
    GraphReplace,
    GraphUnchanged,
    HeadRow,
    RuntimeCommit,
    SessionNode,
    TurnCommitStamp,
    TurnStampRow,
    active_path,
    build_read,
    check_commit,
    manifest_children,
    turn_commit_hash,
)
from turnbuckle.testing import SeededIds

NOW = 5_000


def leased(session: str = "s"):  # type: ignore[no-untyped-def]
    got = claim_lease(free_lease_row(session), "owner", 60_000, now_ms=NOW, ids=SeededIds(1))
    assert got is not None
    return got


def node(node_id: str, parent: str | None = None, **payload: object) -> SessionNode:
    return SessionNode(node_id=node_id, parent_node_id=parent, timestamp="t", payload=payload)


def decide(commit: RuntimeCommit, **overrides: object):  # type: ignore[no-untyped-def]
    row, _ = leased(commit.session_id)
    kwargs: dict[str, object] = {
        "bound_session": None,
        "head": None,
        "lease": row,
        "stamp": None,
        "claimed": [[] for _ in commit.completed_claims],
        "now_ms": NOW,
    }
    kwargs.update(overrides)
    return check_commit(commit, **kwargs)  # type: ignore[arg-type]


def test_checks_come_in_the_reference_order() -> None:
    row, lease = leased()
    fence = lease.fence()
    stamp = TurnCommitStamp(session_id="s", turn_id="t", turn_commit_hash="h")
    claim = QueuedWorkCompletion(session_id="s", claim_id="c", lease_token="x", batch_ids=("b",))
    commit = RuntimeCommit(
        session_id="s",
        lease=fence,
        expected_head_revision=3,
        turn_commit=stamp,
        completed_claims=[claim],
    )
    head = HeadRow(session_id="s", head_revision=1, state="{}")
    other_stamp = TurnStampRow(
        session_id="s", turn_id="t", turn_commit_hash="other", head_revision=1, checkpoint_ref="r"
    )
    everything_wrong = {
        "bound_session": "x",
        "head": head,
        "stamp": other_stamp,
        "lease": free_lease_row("s"),
        "claimed": [[None]],
    }
    expected = [
        SessionBindingMismatch("x", "s"),
        RuntimeTurnCommitConflict("s", "t"),
        SessionExecutionLeaseExpired("s"),
        HeadRevisionConflict(3, 1),
        QueuedWorkClaimExpired("s", "c"),
    ]
    fixes = [
        ("bound_session", None),
        ("stamp", None),
        ("lease", row),
        ("head", attrs.evolve(head, head_revision=3)),
        ("claimed", None),
    ]
    for error, (name, fix) in zip(expected, fixes, strict=True):
        with pytest.raises(type(error)) as caught:
            decide(commit, **everything_wrong)
        assert caught.value == error
        everything_wrong.pop(name) if fix is None else everything_wrong.update({name: fix})


def test_a_recorded_stamp_replays_without_a_lease_and_still_releases() -> None:
    row, lease = leased()
    commit = RuntimeCommit(
        session_id="s",
        release=lease.fence(),
        turn_commit=TurnCommitStamp(session_id="s", turn_id="t", turn_commit_hash="h"),
    )
    stored = TurnStampRow(
        session_id="s",
        turn_id="t",
        turn_commit_hash="h",
        head_revision=7,
        checkpoint_ref="sha256:x",
    )
    plan = decide(commit, stamp=stored, lease=row)
    assert plan.replay and (plan.result.head_revision, plan.result.checkpoint_ref) == (
        7,
        "sha256:x",
    )
    assert plan.lease is not None and plan.lease.lease_token is None


def test_the_hash_ignores_what_may_differ_between_retries() -> None:
    base = RuntimeCommit(
        session_id="s",
        graph=GraphAppend(nodes=[node("a", text="hi")]),
        checkpoint=Checkpoint(turn_state={"turn": 1}),
    )
    _, lease = leased()
    retry = attrs.evolve(
        base,
        expected_head_revision=9,
        lease=lease.fence(),
        release=lease.fence(),
        graph=GraphAppend(nodes=[attrs.evolve(node("other-id", text="hi"), timestamp="later")]),
        turn_commit=TurnCommitStamp(session_id="s", turn_id="t", turn_commit_hash="x"),
    )
    assert turn_commit_hash(base) == turn_commit_hash(retry)
    for changed in (
        attrs.evolve(base, checkpoint=Checkpoint(turn_state={"turn": 2})),
        attrs.evolve(base, graph=GraphAppend(nodes=[node("a", text="bye")])),
        attrs.evolve(base, config={"model": "m"}),
    ):
        assert turn_commit_hash(changed) != turn_commit_hash(base)
    assert len(turn_commit_hash(base)) == 64


def test_an_accepted_commit_plans_every_write() -> None:
    _, lease = leased()
    commit = RuntimeCommit(
        session_id="s",
        lease=lease.fence(),
        release=lease.fence(),
        graph=GraphAppend(nodes=[node("a"), node("b", "a")]),
        checkpoint=Checkpoint(turn_state=1, tool_state=b"tool", execution_state=b"vm"),
        turn_commit=TurnCommitStamp(session_id="s", turn_id="t", turn_commit_hash="h"),
    )
    plan = decide(commit)
    assert not plan.replay and plan.result.head_revision == 1
    refs = dict(plan.blobs)
    manifest = refs[plan.result.checkpoint_ref]
    assert sorted(manifest_children(manifest)) == sorted(
        r for r in refs if r != plan.result.checkpoint_ref
    )
    assert plan.stamp is not None and plan.stamp.head_revision == 1
    assert [n.node_id for n in plan.nodes] == ["a", "b"] and not plan.replace_graph
    assert plan.lease is not None and plan.lease.lease_token is None
    read = build_read(plan.head, plan.nodes, (), refs, FullGraph())  # type: ignore[arg-type]
    assert read.checkpoint == commit.checkpoint and read.leaf_node_id == "b"


@pytest.mark.parametrize(
    "field", ["agent_frames", "usage", "completed_claims", "committed_attachment_ids"]
)
@pytest.mark.parametrize("bad", [None, 5, "ab", {"a": 1}], ids=repr)
def test_a_commit_with_a_non_sequence_field_is_refused_when_made(field: str, bad: object) -> None:
    """A typed error at construction, naming what is wrong, not a raw TypeError (or, for a str,
    a silent list of letters) somewhere later."""
    with pytest.raises(InvalidArgument, match="sequence"):
        RuntimeCommit(session_id="s", **{field: bad})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="sequence"):
        GraphAppend(nodes=bad)  # type: ignore[arg-type]


def test_leaf_follows_the_delta() -> None:
    _, lease = leased()
    first = decide(
        RuntimeCommit(
            session_id="s",
            lease=lease.fence(),
            graph=GraphAppend(nodes=[node("a"), node("b", "a")]),
        )
    )
    head = first.head
    for graph, leaf in [
        (GraphUnchanged(), "b"),
        (GraphUnchanged(leaf="a"), "a"),
        (GraphAppend(nodes=[node("c", "b")]), "c"),
        (GraphReplace(nodes=[node("x")]), None),
        (GraphReplace(nodes=[node("x")], leaf="x"), "x"),
    ]:
        plan = decide(RuntimeCommit(session_id="s", lease=lease.fence(), graph=graph), head=head)
        read = build_read(plan.head, (), (), dict(plan.blobs), FullGraph())
        assert read.leaf_node_id == leaf, graph


def test_active_path_selects_one_ancestry() -> None:
    nodes = [
        node("root"),
        node("left", "root"),
        node("left-leaf", "left"),
        node("right-leaf", "root"),
    ]
    assert [n.node_id for n in active_path(nodes, "left-leaf")] == ["root", "left", "left-leaf"]
    assert [n.node_id for n in active_path(nodes, "right-leaf")] == ["root", "right-leaf"]
    assert active_path(nodes, "unknown") == () and active_path(nodes, None) == ()
    # A tombstoned (missing) parent ends the path; a cycle does not loop forever.
    assert [n.node_id for n in active_path(nodes[2:], "left-leaf")] == ["left-leaf"]
    loop = [node("a", "b"), node("b", "a")]
    assert [n.node_id for n in active_path(loop, "a")] == ["b", "a"]
    _, lease = leased()
    plan = decide(
        RuntimeCommit(
            session_id="s", lease=lease.fence(), graph=GraphReplace(nodes=nodes, leaf="left-leaf")
        )
    )
    read = build_read(plan.head, nodes, (), dict(plan.blobs), ActivePath())
    assert [n.node_id for n in read.nodes] == ["root", "left", "left-leaf"]
    read = build_read(plan.head, nodes, (), dict(plan.blobs), ActivePath("right-leaf"))
    assert read.leaf_node_id == "right-leaf" and len(read.nodes) == 2
