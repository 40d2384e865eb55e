"""Pure state machines and decisions: no IO, no clock, no randomness.

Rules (a test enforces the first): modules here import only the standard library's pure parts and
attrs/cattrs; time is an argument (``now_ms``); ids come from an injected :class:`IdSource`;
values are frozen attrs classes; an illegal input raises a typed error and changes nothing.
"""

from turnbuckle.sansio.task import TaskOutcome as TaskOutcome
from turnbuckle.sansio.task import TaskPage as TaskPage
from turnbuckle.sansio.task import TaskRecord as TaskRecord
from turnbuckle.sansio.task import TaskRpcError as TaskRpcError
from turnbuckle.sansio.task import TaskStatus as TaskStatus
from turnbuckle.sansio.task import TaskSuccess as TaskSuccess

__all__ = ["TaskOutcome", "TaskPage", "TaskRecord", "TaskRpcError", "TaskStatus", "TaskSuccess"]
