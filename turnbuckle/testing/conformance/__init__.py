"""Conformance suites: plain async functions that take a store factory.

A store adapter is correct when these pass against it. The project runs them against every
adapter it ships; a third-party adapter runs them the same way::

    from turnbuckle.testing import conformance

    async def test_my_store():
        await conformance.task_store(lambda **options: open_my_store(**options))
        await conformance.runtime_persistence(lambda **options: open_my_store(**options))
        await conformance.executions(lambda **options: open_my_store(**options))
"""

from turnbuckle.testing.conformance.executions import (
    EXECUTION_SCENARIOS as EXECUTION_SCENARIOS,
)
from turnbuckle.testing.conformance.executions import corrupt_summary as corrupt_summary
from turnbuckle.testing.conformance.executions import executions as executions
from turnbuckle.testing.conformance.sessions import (
    SESSION_REOPEN_SCENARIOS as SESSION_REOPEN_SCENARIOS,
)
from turnbuckle.testing.conformance.sessions import SESSION_SCENARIOS as SESSION_SCENARIOS
from turnbuckle.testing.conformance.sessions import (
    queued_turn_input_draft as queued_turn_input_draft,
)
from turnbuckle.testing.conformance.sessions import runtime_persistence as runtime_persistence
from turnbuckle.testing.conformance.sessions import (
    runtime_persistence_reopenable as runtime_persistence_reopenable,
)
from turnbuckle.testing.conformance.tasks import REOPEN_SCENARIOS as REOPEN_SCENARIOS
from turnbuckle.testing.conformance.tasks import TASK_STORE_SCENARIOS as TASK_STORE_SCENARIOS
from turnbuckle.testing.conformance.tasks import Corrupt as Corrupt
from turnbuckle.testing.conformance.tasks import StoreFactory as StoreFactory
from turnbuckle.testing.conformance.tasks import corrupt_rows as corrupt_rows
from turnbuckle.testing.conformance.tasks import task_store as task_store
from turnbuckle.testing.conformance.tasks import task_store_reopen as task_store_reopen

__all__ = [
    "EXECUTION_SCENARIOS",
    "REOPEN_SCENARIOS",
    "SESSION_REOPEN_SCENARIOS",
    "SESSION_SCENARIOS",
    "TASK_STORE_SCENARIOS",
    "Corrupt",
    "StoreFactory",
    "corrupt_rows",
    "corrupt_summary",
    "executions",
    "queued_turn_input_draft",
    "runtime_persistence",
    "runtime_persistence_reopenable",
    "task_store",
    "task_store_reopen",
]
