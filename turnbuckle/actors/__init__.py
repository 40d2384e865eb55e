"""anyio actors: one owner per resource, serving requests serially, replying once.

Today this holds the reply primitive the SQLite adapter's owner thread uses
(:class:`~turnbuckle.actors.oneshot.ThreadReply`); the session runtime (per-session actors,
mailboxes, workers) builds on the same rules: bounded mailboxes, one-shot replies that never
block the actor, and writes never abandoned on cancellation.
"""

from turnbuckle.actors.oneshot import ThreadReply as ThreadReply

__all__ = ["ThreadReply"]
