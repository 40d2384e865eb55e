"""anyio actors: the runtime, per-session actors and workers.

The session runtime arrives with the turn machine. Today the one actor is the SQLite adapter's
owner thread (:mod:`turnbuckle.adapters.sqlite`), which serves each store's queue of operations.
"""
