"""Store adapters: the in-memory reference model and the SQLite file store.

Open one with :func:`turnbuckle.open_store`. Every adapter runs the same conformance suites
(:mod:`turnbuckle.testing.conformance`); a new adapter supplies a table and an atomic runner
(:mod:`turnbuckle.adapters.tasks`) and must pass them too.
"""

from turnbuckle.adapters.store import Store as Store
from turnbuckle.adapters.store import open_store as open_store
from turnbuckle.adapters.tasks import TaskFacet as TaskFacet

__all__ = ["Store", "TaskFacet", "open_store"]
