"""A power-loss model for SQLite: an apsw VFS that can lose every write not yet synced.

:class:`PowerLossVFS` wraps the default VFS and works on the real files. For each file it keeps
the size the file had at its last ``xSync`` and an undo log of every write and truncate since
then (the bytes each one overwrote or cut off, read just before it ran). ``xSync`` itself is
*not* passed on: durability here is the model's, not the disk's, which keeps the harness fast.

The power is cut after a chosen number of mutating calls (``xWrite``/``xTruncate``/``xSync``):
from then on those calls, and ``xDelete``, succeed without touching anything (the machine is
off; the process may still think it runs, but none of its work reaches the disk). After the
connection is closed, :meth:`PowerLossVFS.restore` rolls every file back to its last synced
content, as if the OS lost its whole page cache (``"drop"``), then may re-apply some of the
unsynced writes, as if part of the page cache had been flushed: a random subset (``"subset"``:
flushed in any order) or everything before a random point (``"ordered"``), at whole-write
granularity, as SQLite's powersafe-overwrite assumption allows. The ``-shm`` file lives in
memory only: it is deleted. Deletions and file creations done before the cut are taken as
durable (SQLite syncs the directory where it matters). Not modelled: torn sectors within one
write, and a disk that lies about sync.

:class:`ApswProxy` stands in for the ``apsw`` module inside ``turnbuckle.adapters.sqlite`` so
that the adapter's ``apsw.Connection(path, flags=...)`` opens through the VFS; everything else
is the real module.
"""

from __future__ import annotations

import os
import random
from typing import Any

import apsw

VFS_NAME = "tb-crash"


class _Log:
    """What one file did since its last sync."""

    def __init__(self, synced_size: int) -> None:
        self.synced_size = synced_size
        #: (call number, "w", offset, old bytes, new bytes) or (call number, "t", new size,
        #: old tail bytes, b""), in order.
        self.undo: list[tuple[int, str, int, bytes, bytes]] = []


class PowerLossVFS(apsw.VFS):
    """See the module docstring. ``cut_after``: mutating calls allowed before the power cut
    (``None``: never, until :meth:`cut_now`)."""

    def __init__(self, name: str = VFS_NAME) -> None:
        self.logs: dict[str, _Log] = {}
        self.ops = 0
        self.cut_after: int | None = None
        self.cut = False
        self.dropped = 0
        super().__init__(name, "")

    def tick(self) -> bool:
        """Count one mutating call; True if the power is on and it may proceed."""
        self.ops += 1
        if self.cut_after is not None and self.ops > self.cut_after:
            self.cut = True
        if self.cut:
            self.dropped += 1
        return not self.cut

    def cut_now(self) -> None:
        self.cut = True

    def arm(self, cut_after: int | None) -> None:
        """Power on: forget earlier history (the files on disk are the durable state)."""
        self.logs.clear()
        self.ops = 0
        self.dropped = 0
        self.cut = False
        self.cut_after = cut_after

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        path = name.filename() if isinstance(name, apsw.URIFilename) else str(name)
        return _File(self, path, name, flags)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        if self.cut:
            return
        self.logs.pop(filename, None)
        super().xDelete(filename, syncdir)

    def restore(self, mode: str = "drop", rng: random.Random | None = None) -> tuple[int, int]:
        """After the cut and after every connection closed: put each file in its durable state.

        ``mode``: ``"drop"`` loses every unsynced write (the page cache is gone); ``"subset"``
        keeps each one with probability 1/2 (flushed in any order); ``"ordered"`` keeps the
        writes made before a random call number, across all files (flushed in order).
        Returns (unsynced writes lost, unsynced writes kept).
        """
        rng = rng or random.Random(0)
        pending = []
        for path, log in self.logs.items():
            if path.endswith("-shm") or not os.path.exists(path):
                continue
            with open(path, "r+b") as f:
                for _, _, where, old, _ in reversed(log.undo):
                    f.seek(where)
                    f.write(old)
                f.truncate(log.synced_size)
            pending += [(entry, path) for entry in log.undo]
        pending.sort()
        horizon = rng.randint(0, len(pending))
        lost = kept = 0
        for index, ((_, kind, where, _, new), path) in enumerate(pending):
            flushed = {"subset": rng.random() < 0.5, "ordered": index < horizon}
            if not flushed.get(mode, False):
                lost += kind == "w"
                continue
            kept += kind == "w"
            with open(path, "r+b") as f:
                if kind == "w":
                    f.seek(where)
                    f.write(new)
                else:
                    f.truncate(where)
        for path in self.logs:
            if path.endswith("-shm") and os.path.exists(path):
                os.remove(path)
        self.logs.clear()
        return lost, kept


class _File(apsw.VFSFile):
    def __init__(self, vfs: PowerLossVFS, path: str, name: Any, flags: list[int]) -> None:
        super().__init__("", name, flags)
        self.vfs = vfs
        self.path = path
        if path not in vfs.logs:
            vfs.logs[path] = _Log(self.xFileSize())
        self.log = vfs.logs[path]

    def _old(self, offset: int, amount: int) -> bytes:
        size = self.xFileSize()
        if offset >= size or amount <= 0:
            return b""
        return bytes(super().xRead(min(amount, size - offset), offset))

    def xWrite(self, data: Any, offset: int) -> None:
        if not self.vfs.tick():
            return
        data = bytes(data)
        self.log.undo.append((self.vfs.ops, "w", offset, self._old(offset, len(data)), data))
        super().xWrite(data, offset)

    def xTruncate(self, newsize: int) -> None:
        if not self.vfs.tick():
            return
        self.log.undo.append(
            (self.vfs.ops, "t", newsize, self._old(newsize, self.xFileSize() - newsize), b"")
        )
        super().xTruncate(newsize)

    def xSync(self, flags: int) -> None:
        if not self.vfs.tick():
            return
        # No real fsync: the model decides what is durable.
        self.log.undo.clear()
        self.log.synced_size = self.xFileSize()


class _SyncOffConnection(apsw.Connection):
    """A connection on which every ``PRAGMA synchronous`` means OFF (the control run)."""

    def execute(self, statements: str, *args: Any, **kwargs: Any) -> apsw.Cursor:
        if statements.strip().upper().startswith("PRAGMA SYNCHRONOUS"):
            statements = "PRAGMA synchronous = OFF"
        return super().execute(statements, *args, **kwargs)


class ApswProxy:
    """The ``apsw`` module, except that ``Connection`` opens through the power-loss VFS.

    ``autocheckpoint``: if set, the connection's ``wal_autocheckpoint`` (pages), so that small
    runs checkpoint too and power cuts land inside checkpoints and WAL restarts.
    """

    def __init__(self, vfs_name: str = VFS_NAME, *, sync_off: bool = False) -> None:
        self._vfs_name = vfs_name
        self._sync_off = sync_off
        self.autocheckpoint: int | None = None

    def Connection(self, filename: str, flags: int) -> apsw.Connection:
        cls = _SyncOffConnection if self._sync_off else apsw.Connection
        conn = cls(filename, flags=flags, vfs=self._vfs_name)
        if self.autocheckpoint is not None:
            conn.wal_autocheckpoint(self.autocheckpoint)
        return conn

    def __getattr__(self, name: str) -> Any:
        return getattr(apsw, name)
