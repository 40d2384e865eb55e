"""turnbuckle: a durable, in-process runtime kernel for AI agent sessions and long-running tasks.

>>> import turnbuckle
>>> async def main():
...     async with turnbuckle.open_store("memory://") as store:
...         task = await store.tasks.create_task(
...             turnbuckle.TaskRecord(original_method="tools/call"))
...         await store.tasks.complete_task(task.task_id, turnbuckle.TaskSuccess({"ok": True}))
"""

from turnbuckle.adapters.store import Store as Store
from turnbuckle.adapters.store import open_store as open_store
from turnbuckle.errors import *  # noqa: F403
from turnbuckle.errors import __all__ as _error_names
from turnbuckle.sansio.task import TaskOutcome as TaskOutcome
from turnbuckle.sansio.task import TaskPage as TaskPage
from turnbuckle.sansio.task import TaskRecord as TaskRecord
from turnbuckle.sansio.task import TaskRpcError as TaskRpcError
from turnbuckle.sansio.task import TaskStatus as TaskStatus
from turnbuckle.sansio.task import TaskSuccess as TaskSuccess

__version__ = "0.1.0"

__all__ = [
    "Store",
    "TaskOutcome",
    "TaskPage",
    "TaskRecord",
    "TaskRpcError",
    "TaskStatus",
    "TaskSuccess",
    "open_store",
    *_error_names,
]
