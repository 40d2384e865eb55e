"""The task lifecycle and its pure decisions, exhaustively and by property."""

from __future__ import annotations

import contextlib
import itertools
import json

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnbuckle.errors import (
    CorruptRecordError,
    InvalidArgument,
    InvalidCursor,
    InvalidTransition,
    PayloadNotSerializable,
    PayloadTooLarge,
    TerminalState,
)
from turnbuckle.sansio.codec import MAX_DEPTH, decode_json, encode_json
from turnbuckle.sansio.task import (
    TRANSITIONS,
    TaskRecord,
    TaskRpcError,
    TaskStatus,
    TaskSuccess,
    apply_outcome,
    apply_status,
    check_transition,
    decode_cursor,
    encode_cursor,
    encode_outcome,
    format_timestamp,
    make_task_id,
    new_row,
    parse_timestamp,
    row_to_record,
)
from turnbuckle.testing import SeededIds

W, IR = TaskStatus.WORKING, TaskStatus.INPUT_REQUIRED
C, F, X = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED
NOW = 1_748_736_000_000


def row_in(status: TaskStatus):  # type: ignore[no-untyped-def]
    record = TaskRecord(task_id="t", status=status, original_method="m")
    return new_row(record, now_ms=NOW, ids=SeededIds())


def test_wire_values() -> None:
    assert [s.value for s in TaskStatus] == [
        "working",
        "input_required",
        "completed",
        "failed",
        "cancelled",
    ]
    assert {s for s in TaskStatus if s.is_terminal} == {C, F, X}


@pytest.mark.parametrize(("current", "requested"), list(itertools.product(TaskStatus, TaskStatus)))
def test_every_status_pair(current: TaskStatus, requested: TaskStatus) -> None:
    """Each pair either moves, or raises the right error and leaves the row as it was."""
    row = row_in(current)
    legal = {
        W: {IR, C, F, X},
        IR: {W, C, F, X},
    }.get(current, set())
    if requested in legal:
        moved = apply_status(row, requested, "msg", now_ms=NOW + 5)
        assert (moved.status, moved.status_message) == (requested.value, "msg")
        assert (moved.version, moved.updated_ms) == (row.version + 1, NOW + 5)
        assert moved.created_ms == row.created_ms
        check_transition(current, requested)
    else:
        expected = (
            TerminalState(current) if current.is_terminal else InvalidTransition(current, requested)
        )
        with pytest.raises(type(expected)) as caught:
            apply_status(row, requested, "msg", now_ms=NOW + 5)
        assert caught.value == expected
        assert row == row_in(current)
    assert (requested in TRANSITIONS[current]) == (requested in legal)


@pytest.mark.parametrize("current", list(TaskStatus))
@pytest.mark.parametrize("ending", [C, F, None])
def test_outcomes_obey_the_lifecycle(current: TaskStatus, ending: TaskStatus | None) -> None:
    row = row_in(current)
    outcome = TaskRpcError(code=-1, message="x")
    if current.is_terminal:
        with pytest.raises(TerminalState):
            apply_outcome(row, encode_outcome(outcome), status=ending, now_ms=NOW)
        return
    done = apply_outcome(row, encode_outcome(outcome), status=ending, now_ms=NOW)
    assert row_to_record(done).result == outcome
    assert done.status == (current if ending is None else ending).value


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_categories=["Cs"])),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_json_round_trips_canonically(value: object) -> None:
    text = encode_json(value)
    assert decode_json(text) == value
    assert text == encode_json(decode_json(text))
    assert json.loads(text) == value


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"a": [1, {"b": {1}}]}, "$.a[1].b"),
        ([b"x"], "$[0]"),
        ({"k": float("-inf")}, "$.k"),
        ({"a": {2: 1}}, "$.a"),
        ("\udfff", "$"),
        ((1,), "$"),
    ],
)
def test_non_json_names_the_path(value: object, path: str) -> None:
    with pytest.raises(PayloadNotSerializable) as caught:
        encode_json(value)
    assert caught.value.path == path


def test_cycles_are_refused() -> None:
    loop: list[object] = [1]
    loop.append(loop)
    with pytest.raises(PayloadNotSerializable) as caught:
        encode_json({"a": loop})
    assert caught.value.path == "$.a[1]"
    shared = {"x": 1}
    assert encode_json([shared, shared]) == '[{"x":1},{"x":1}]'  # shared is not a cycle
    with pytest.raises(PayloadNotSerializable) as caught:
        encode_json([shared, shared, {1: 2}])
    assert caught.value.path == "$[2]"


def nest(levels: int) -> object:
    value: object = None
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_limit_is_exact() -> None:
    assert decode_json(encode_json(nest(MAX_DEPTH))) == nest(MAX_DEPTH)
    with pytest.raises(PayloadNotSerializable):
        encode_json(nest(MAX_DEPTH + 1))


def test_deep_nesting_is_refused_not_crashed() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(PayloadNotSerializable) as caught:
        encode_json(deep)
    assert "nested" in caught.value.reason
    with pytest.raises(CorruptRecordError):
        row_to_record(attrs.evolve(row_in(W), meta='{"a":' + "[" * 100_000 + "]" * 100_000 + "}"))


def test_size_limit_counts_utf8_bytes() -> None:
    assert encode_json("é" * 4, limit=10) == '"éééé"'
    with pytest.raises(PayloadTooLarge) as caught:
        encode_json("é" * 5, limit=11)
    assert (caught.value.size, caught.value.limit) == (12, 11)


@given(st.integers(min_value=0, max_value=253_402_300_799_999))
def test_timestamps_round_trip(ms: int) -> None:
    text = format_timestamp(ms)
    assert text.endswith("Z") and len(text) == 24
    assert parse_timestamp("t", text) == ms


def test_timestamps_need_a_zone() -> None:
    assert parse_timestamp("t", "2025-06-01T02:00:00+02:00") == NOW
    for bad in ["2025-06-01T00:00:00", "soon", ""]:
        with pytest.raises(InvalidArgument):
            parse_timestamp("t", bad)


@given(
    st.lists(st.integers(min_value=0, max_value=2**48 - 1), min_size=2, max_size=20),
    st.integers(min_value=0),
)
def test_task_ids_sort_by_time(times: list[int], seed: int) -> None:
    ids = SeededIds(seed)
    made = [(t, make_task_id(t, ids)) for t in sorted(times)]
    for (t1, a), (t2, b) in itertools.pairwise(made):
        assert len(a) == 32 and a[12] == "7" and a[16] in "89ab"
        if t1 < t2:
            assert a < b


@given(
    st.lists(st.integers(min_value=0, max_value=2**48 - 1), min_size=2, max_size=30),
    st.integers(min_value=0),
)
def test_one_makers_ids_sort_in_making_order(times: list[int], seed: int) -> None:
    """Any clock, same millisecond or stepping back: each id sorts after the one before."""
    ids, previous = SeededIds(seed), None
    for t in times:
        made = make_task_id(t, ids, previous)
        assert previous is None or made > previous
        assert len(made) == 32 and made[12] == "7" and made[16] in "89ab"
        previous = made


def test_seeded_ids_replay() -> None:
    assert make_task_id(NOW, SeededIds(3)) == make_task_id(NOW, SeededIds(3))
    assert make_task_id(NOW, SeededIds(3)) != make_task_id(NOW, SeededIds(4))


@given(st.none() | st.text(), st.integers(min_value=0, max_value=2**62), st.text())
def test_cursors_round_trip_within_their_listing(scope: str | None, ms: int, task_id: str) -> None:
    cursor = encode_cursor(scope, ms, task_id)
    assert decode_cursor(cursor, scope) == (ms, task_id)
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor, "other" if scope is None else None)


def test_forged_cursor_positions_are_refused() -> None:
    for forged in (2**63, -(2**63) - 1, 10**30):
        with pytest.raises(InvalidCursor):
            decode_cursor(encode_cursor(None, forged, "t"), None)


@given(st.text())
def test_garbage_cursors_are_invalid_cursor(garbage: str) -> None:
    with contextlib.suppress(InvalidCursor):
        decode_cursor(garbage, None)


def test_corrupt_rows_name_the_column() -> None:
    row = row_in(W)
    for column, raw in [
        ("meta", "[1]"),
        ("original_params", "{"),
        ("result", "3"),
        ("status", "zombie"),
        ("result", '{"type":"success"}'),
    ]:
        with pytest.raises(CorruptRecordError) as caught:
            row_to_record(attrs.evolve(row, **{column: raw}))
        assert caught.value.key == "t" and column in caught.value.reason


def test_outcomes_round_trip() -> None:
    for outcome in [
        TaskSuccess(None),
        TaskSuccess({"a": [1.5]}),
        TaskRpcError(code=-32602, message="bad", data={"x": 1}),
    ]:
        row = apply_outcome(row_in(W), encode_outcome(outcome), status=None, now_ms=NOW)
        assert row_to_record(row).result == outcome


def test_wire_form() -> None:
    record = row_to_record(row_in(IR))
    assert record.to_wire() == {
        "taskId": "t",
        "status": "input_required",
        "createdAt": "2025-06-01T00:00:00.000Z",
        "lastUpdatedAt": "2025-06-01T00:00:00.000Z",
        "ttl": None,
    }
