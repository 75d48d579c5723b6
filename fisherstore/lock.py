"""One writer per store: a lock file at ``<root>/.fisherstore.lock``.

The lock is an ``flock`` on that file, so the kernel releases it when the writer dies,
even by ``kill -9``; the file also records the holder's pid, host and start time, so a
second writer's error can name them. Where ``flock`` is unavailable (some network
filesystems), or with ``FISHERSTORE_LOCK=pidfile``, the file itself is the lock
(created exclusively); a writer killed then leaves it behind, and ``force=True`` (CLI:
``--force``) takes over a lock whose pid is gone.

Readers never lock: a reader sees the last commit (see docs/format.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from typing import Any

from .errors import StoreLockedError

LOCK_NAME = ".fisherstore.lock"

__all__ = ["StoreLock", "StoreLockedError", "LOCK_NAME", "read_holder", "holder_alive"]


def read_holder(path: str) -> dict[str, Any]:
    """The record ``{pid, host, since}`` in a lock file ({} if none or unreadable)."""
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read() or b"{}")
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """Whether the recorded writer still runs (None: another host, can't tell)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    return bool(pid) and _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """The writer lock of one store. ``acquire()`` raises :class:`StoreLockedError` if held."""

    def __init__(self, root: str, *, force: bool = False) -> None:
        self.path = os.path.join(root, LOCK_NAME)
        self.force = force
        self.mode = "pidfile" if os.environ.get("FISHERSTORE_LOCK") == "pidfile" else "flock"
        self.previous: dict[str, Any] | None = None  # a dead holder's record we replaced
        self._fd: int | None = None

    def _me(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()

    def _holder(self) -> dict[str, Any]:
        return read_holder(self.path)

    def _locked_error(self, holder: dict[str, Any], stale: bool) -> StoreLockedError:
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        since = holder.get("since")
        when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
        if stale:
            return StoreLockedError(
                f"the store at {os.path.dirname(self.path)!r} has a stale writer lock from {who}{when}: that "
                "process is gone. Make sure no writer runs, then reopen with force=True "
                "(CLI: fisherstore unlock --force PATH)."
            )
        return StoreLockedError(
            f"the store at {os.path.dirname(self.path)!r} is being written by {who}{when}; a store has one "
            "writer at a time. Wait for it to close, or open this store with mode='r' to read it."
        )

    def acquire(self) -> None:
        if self.mode == "flock":
            try:
                self._acquire_flock()
                return
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.mode = "pidfile"
        self._acquire_pidfile()

    def _acquire_flock(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._locked_error(self._holder(), stale=False) from None
        except BaseException:
            os.close(fd)
            raise
        old = self._holder()
        if old.get("pid") and old.get("pid") != os.getpid():
            self.previous = old  # a writer that died without releasing its record
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._me(), 0)
        os.fsync(fd)
        self._fd = fd

    def _acquire_pidfile(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                same_host = holder.get("host") == socket.gethostname()
                pid = holder.get("pid")
                stale = bool(pid) and same_host and not _pid_alive(int(pid))
                if stale and self.force or (self.force and not same_host):
                    self.previous = holder
                    os.unlink(self.path)
                    continue
                raise self._locked_error(holder, stale=stale) from None
            os.write(fd, self._me())
            os.fsync(fd)
            self._fd = fd
            return

    def release(self, remove_file: bool = False) -> None:
        """Release the lock. ``remove_file``: also delete the lock file (the store was never created)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if self.mode == "pidfile" or remove_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        else:
            os.ftruncate(fd, 0)  # keep the file: unlinking a flock file races with new lockers
        os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None
