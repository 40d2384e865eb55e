"""turnbuckle: a durable, in-process runtime kernel for AI agent sessions and long-running tasks.

>>> import turnbuckle
>>> async def main():
...     async with turnbuckle.open_store("memory://") as store:
...         task = await store.tasks.create_task(
...             turnbuckle.TaskRecord(original_method="tools/call"))
...         await store.tasks.complete_task(task.task_id, turnbuckle.TaskSuccess({"ok": True}))
"""

from turnbuckle.actors.runtime import IdleReport as IdleReport
from turnbuckle.actors.runtime import Reply as Reply
from turnbuckle.actors.runtime import Runtime as Runtime
from turnbuckle.actors.runtime import RuntimeEvent as RuntimeEvent
from turnbuckle.actors.runtime import open_runtime as open_runtime
from turnbuckle.adapters.store import Store as Store
from turnbuckle.adapters.store import open_store as open_store
from turnbuckle.errors import *  # noqa: F403
from turnbuckle.errors import __all__ as _error_names
from turnbuckle.sansio.lease import LeaseFence as LeaseFence
from turnbuckle.sansio.lease import SessionLease as SessionLease
from turnbuckle.sansio.queue import ClaimBoundary as ClaimBoundary
from turnbuckle.sansio.queue import DeliveryPolicy as DeliveryPolicy
from turnbuckle.sansio.queue import MergeKey as MergeKey
from turnbuckle.sansio.queue import QueuedWorkBatch as QueuedWorkBatch
from turnbuckle.sansio.queue import QueuedWorkClaim as QueuedWorkClaim
from turnbuckle.sansio.queue import QueuedWorkDraft as QueuedWorkDraft
from turnbuckle.sansio.queue import QueuedWorkStatus as QueuedWorkStatus
from turnbuckle.sansio.queue import SlotPolicy as SlotPolicy
from turnbuckle.sansio.queue import SubmitStatus as SubmitStatus
from turnbuckle.sansio.queue import Ticket as Ticket
from turnbuckle.sansio.queue import WorkState as WorkState
from turnbuckle.sansio.session import ActivePath as ActivePath
from turnbuckle.sansio.session import AgentFrame as AgentFrame
from turnbuckle.sansio.session import AttachmentIntent as AttachmentIntent
from turnbuckle.sansio.session import Checkpoint as Checkpoint
from turnbuckle.sansio.session import CommitResult as CommitResult
from turnbuckle.sansio.session import FullGraph as FullGraph
from turnbuckle.sansio.session import GraphAppend as GraphAppend
from turnbuckle.sansio.session import GraphReplace as GraphReplace
from turnbuckle.sansio.session import GraphUnchanged as GraphUnchanged
from turnbuckle.sansio.session import RuntimeCommit as RuntimeCommit
from turnbuckle.sansio.session import SessionMeta as SessionMeta
from turnbuckle.sansio.session import SessionNode as SessionNode
from turnbuckle.sansio.session import SessionRead as SessionRead
from turnbuckle.sansio.session import TokenUsage as TokenUsage
from turnbuckle.sansio.session import TurnCommitStamp as TurnCommitStamp
from turnbuckle.sansio.session import UsageEntry as UsageEntry
from turnbuckle.sansio.session import turn_commit_hash as turn_commit_hash
from turnbuckle.sansio.task import TaskOutcome as TaskOutcome
from turnbuckle.sansio.task import TaskPage as TaskPage
from turnbuckle.sansio.task import TaskRecord as TaskRecord
from turnbuckle.sansio.task import TaskRpcError as TaskRpcError
from turnbuckle.sansio.task import TaskStatus as TaskStatus
from turnbuckle.sansio.task import TaskSuccess as TaskSuccess
from turnbuckle.sansio.turn import Message as Message
from turnbuckle.sansio.turn import ModelRequest as ModelRequest
from turnbuckle.sansio.turn import ModelResponse as ModelResponse
from turnbuckle.sansio.turn import StopReason as StopReason
from turnbuckle.sansio.turn import ToolCall as ToolCall
from turnbuckle.sansio.turn import ToolResult as ToolResult
from turnbuckle.sansio.turn import TurnEvent as TurnEvent
from turnbuckle.sansio.turn import TurnOutcome as TurnOutcome

__version__ = "0.1.0"

__all__ = [
    "ActivePath",
    "AgentFrame",
    "AttachmentIntent",
    "Checkpoint",
    "ClaimBoundary",
    "CommitResult",
    "DeliveryPolicy",
    "FullGraph",
    "GraphAppend",
    "GraphReplace",
    "GraphUnchanged",
    "IdleReport",
    "LeaseFence",
    "Message",
    "ModelRequest",
    "ModelResponse",
    "MergeKey",
    "QueuedWorkBatch",
    "QueuedWorkClaim",
    "QueuedWorkDraft",
    "QueuedWorkStatus",
    "Reply",
    "Runtime",
    "RuntimeCommit",
    "RuntimeEvent",
    "SessionLease",
    "SessionMeta",
    "SessionNode",
    "SessionRead",
    "SlotPolicy",
    "StopReason",
    "Store",
    "SubmitStatus",
    "TaskOutcome",
    "TaskPage",
    "TaskRecord",
    "TaskRpcError",
    "TaskStatus",
    "TaskSuccess",
    "Ticket",
    "TokenUsage",
    "ToolCall",
    "ToolResult",
    "TurnEvent",
    "TurnOutcome",
    "TurnCommitStamp",
    "UsageEntry",
    "WorkState",
    "open_runtime",
    "open_store",
    "turn_commit_hash",
    *_error_names,
]
