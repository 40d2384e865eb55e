"""Tasks that run on executions: keeping a task in step with the execution behind it.

A task made by ``store.tasks.create_running_task`` is backed by the execution with id
``task:<task_id>``. Every change to that execution updates the task in the same transaction, so
the two never disagree, whatever crashes: progress messages become the task's status message,
a retry says so, and the execution's end ends the task (completed with the result as a
``TaskSuccess``, failed with a JSON-RPC internal error, or cancelled). A task that already ended
(cancelled by its client, say) is left as it is: terminal is absorbing.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from turnbuckle.errors import ConcurrentModification, TerminalState
from turnbuckle.sansio.codec import decode_json
from turnbuckle.sansio.execution import ExecutionRow
from turnbuckle.sansio.task import (
    TaskRpcError,
    TaskStatus,
    TaskSuccess,
    apply_message,
    apply_outcome,
    apply_status,
    encode_outcome,
)

__all__ = ["cancel_execution", "cancel_linked_execution", "sync_task", "task_execution_id"]

_PREFIX: Final = "task:"
#: JSON-RPC "internal error": what a task whose execution failed answers on tasks/result.
_FAILED_CODE: Final = -32603


def task_execution_id(task_id: str) -> str:
    """The id of the execution that runs task ``task_id``."""
    return f"{_PREFIX}{task_id}"


def sync_task(table: Any, old: ExecutionRow, new: ExecutionRow, now_ms: int) -> None:
    """Update the task behind ``new`` (if any) after its execution changed from ``old``."""
    if not new.execution_id.startswith(_PREFIX):
        return
    row = table.get(new.execution_id[len(_PREFIX) :])
    if row is None:
        return
    try:
        if new.phase == "terminal" and old.phase != "terminal":
            if new.outcome == "completed":
                value = None if new.result is None else decode_json(new.result)
                updated = apply_outcome(
                    row,
                    encode_outcome(TaskSuccess(value)),
                    status=TaskStatus.COMPLETED,
                    now_ms=now_ms,
                )
            elif new.outcome == "cancelled":
                updated = apply_status(row, TaskStatus.CANCELLED, "Cancelled", now_ms=now_ms)
            else:
                error = TaskRpcError(_FAILED_CODE, new.failure or "the execution failed")
                updated = apply_outcome(
                    row,
                    encode_outcome(error),
                    status=TaskStatus.FAILED,
                    message=new.failure,
                    now_ms=now_ms,
                )
        elif new.phase == "runnable" and old.phase == "active":
            updated = apply_message(row, f"Retrying after: {new.failure}", now_ms=now_ms)
        elif new.progress_message != old.progress_message:
            updated = apply_message(row, new.progress_message, now_ms=now_ms)
        else:
            return
    except TerminalState:
        return  # the task ended first (its client cancelled it): that stands
    table.replace(updated, row.version)


def cancel_linked_execution(table: Any, task_id: str, now_ms: int) -> None:
    """Stop the execution behind a task being cancelled (see :func:`cancel_execution`)."""
    row = table.execution(task_execution_id(task_id))
    if row is not None:
        cancel_execution(table, row, "cancelled with its task", now_ms)


def cancel_execution(table: Any, row: ExecutionRow, failure: str, now_ms: int) -> ExecutionRow:
    """Cancel ``row`` in the open transaction and return it as it now stands: a runnable
    execution ends at once (``failure`` says why), a running one's worker sees the request at
    its next renewal, a finished one is left alone.

    Raises:
        ConcurrentModification: the row changed under the transaction.
    """
    if row.phase == "runnable":
        done = attrs.evolve(
            row, phase="terminal", outcome="cancelled", failure=failure, version=row.version + 1
        )
        if not table.replace_execution(done, row.version):
            raise ConcurrentModification(row.execution_id)
        table.add_event(
            "completion", row.execution_id, "cancelled", row.attempt_index, row.lease_epoch, now_ms
        )
        return done
    if row.phase == "active":
        table.request_cancel(row.execution_id)
    return row
