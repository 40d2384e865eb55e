"""anyio actors: one owner per resource, serving requests serially, replying once.

The runtime (:func:`open_runtime`) runs one actor per active session
(:mod:`turnbuckle.actors.runtime`); the SQLite adapter's owner thread replies through
:class:`~turnbuckle.actors.oneshot.ThreadReply`. Rules: bounded mailboxes, one-shot replies that
never block the actor, writes never abandoned on cancellation.
"""

from turnbuckle.actors.oneshot import ThreadReply as ThreadReply
from turnbuckle.actors.runtime import Runtime as Runtime
from turnbuckle.actors.runtime import open_runtime as open_runtime

__all__ = ["Runtime", "ThreadReply", "open_runtime"]
