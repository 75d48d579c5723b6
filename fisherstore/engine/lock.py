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
import stat
import time
from typing import Any

from ..errors import CorruptStoreError, StoreLockedError

LOCK_NAME = ".fisherstore.lock"

__all__ = ["StoreLock", "ObjectLock", "StoreLockedError", "LOCK_NAME", "read_holder", "holder_alive", "make_lock"]


#: A lock record is a few dozen bytes; anything longer is not one of ours.
_MAX_RECORD = 4096
_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _open_lock_file(path: str, flags: int) -> int:
    """Open the lock file without following a link, and only if it is a regular file.

    A crafted store could make ``.fisherstore.lock`` a link to a file of the user's; a
    writer that followed it would truncate that file.
    """
    try:
        fd = os.open(path, flags | _FLAGS, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptStoreError(f"the writer lock {path!r} is a symbolic link; remove it (fisherstore never "
                                    "follows links inside a store)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptStoreError(f"the writer lock {path!r} is not a regular file; remove it")
    return fd


def read_holder(path: str) -> dict[str, Any]:
    """The record ``{pid, host, since}`` in a lock file ({} if none, unreadable, a link or not a file)."""
    try:
        fd = _open_lock_file(path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, CorruptStoreError):
        return {}
    try:
        rec = json.loads(os.read(fd, _MAX_RECORD) or b"{}")
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return rec if isinstance(rec, dict) else {}


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """Whether the recorded writer still runs (None: another host, can't tell)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    return isinstance(pid, int) and pid > 0 and _pid_alive(pid)


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
        when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if isinstance(since, (int, float)) else ""
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            return StoreLockedError(
                f"the store at {os.path.dirname(self.path)!r} is held by this process (pid {os.getpid()}){when}: "
                "another FisherStore object on this path is still open (in a notebook, often the one the cell "
                "made before). Close it with store.close() (or use `with fisherstore.open(...)`), then reopen."
            )
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

        # The file is created once, then the lock is held through a read-only descriptor: a
        # writer between operations keeps nothing open for writing, so its filesystem can
        # still be remounted read-only, and a failing disk cannot keep the lock from closing.
        os.close(_open_lock_file(self.path, os.O_WRONLY | os.O_CREAT))
        fd = _open_lock_file(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._locked_error(self._holder(), stale=False) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            old = self._holder()
            if old.get("pid") and old.get("pid") != os.getpid():
                self.previous = old  # a writer that died without releasing its record
            self._write_record(self._me())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _write_record(self, record: bytes) -> None:
        wfd = _open_lock_file(self.path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(wfd, record)
            os.fsync(wfd)
        finally:
            os.close(wfd)

    def _acquire_pidfile(self) -> None:
        while True:
            try:
                fd = _open_lock_file(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                holder = self._holder()
                same_host = holder.get("host") == socket.gethostname()
                pid = holder.get("pid")
                stale = isinstance(pid, int) and pid > 0 and same_host and not _pid_alive(pid)
                if stale and self.force or (self.force and not same_host):
                    self.previous = holder
                    os.unlink(self.path)
                    continue
                raise self._locked_error(holder, stale=stale) from None
            try:
                os.write(fd, self._me())
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise
            finally:
                os.close(fd)  # the file itself is the lock
            self._fd = -1
            return

    def release(self, remove_file: bool = False) -> None:
        """Release the lock. ``remove_file``: also delete the lock file (the store was never created)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self.mode == "pidfile" or remove_file:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            else:
                self._write_record(b"")  # keep the file: unlinking a flock file races with new lockers
        except OSError:
            pass  # a read-only or failing disk: the record stays, but the lock itself must go
        finally:
            if fd >= 0:
                os.close(fd)  # closing releases the flock, whatever happened above

    @property
    def held(self) -> bool:
        return self._fd is not None


class ObjectLock:
    """The writer lock of a store on object storage: the lock object, created by a conditional PUT.

    ``If-None-Match: *`` makes the creation atomic: of two writers, exactly one creates it.
    Unlike an ``flock``, nothing releases it when its writer dies: a killed writer's lock
    stays until a writer opens with ``force=True`` (CLI: ``fisherstore unlock --force``),
    which takes it over. On a server without conditional writes two writers could both
    "create" it; docs/format.md says what follows.

    Args:
        medium: the store's :class:`~fisherstore.backends.objects.ObjectFiles`.
    """

    mode = "object"

    def __init__(self, medium: Any, *, force: bool = False) -> None:
        self.medium = medium
        self.path = medium.url_of(LOCK_NAME)
        self.force = force
        self.previous: dict[str, Any] | None = None
        self._held = False

    def _me(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()

    def acquire(self) -> None:
        if self.medium.create(LOCK_NAME, self._me()):
            self._held = True
            return
        raw = self.medium.get(LOCK_NAME, limit=_MAX_RECORD) or b"{}"
        try:
            holder = json.loads(raw)
        except ValueError:
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        if not self.force:
            who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            raise StoreLockedError(
                f"the store at {self.medium.url!r} is locked by a writer ({who}); a store has one writer at a time. "
                "Open it with mode='r' to read it. If that writer is gone (object-store locks are not released "
                "when a process dies), take the lock over with force=True (CLI: fisherstore unlock --force URL)."
            )
        self.previous = holder
        self.medium.write(LOCK_NAME, self._me())
        self._held = True

    def release(self, remove_file: bool = False) -> None:
        if not self._held:
            return
        self._held = False
        with contextlib.suppress(OSError, Exception):  # a lock that cannot be deleted is taken over by force
            self.medium.delete(LOCK_NAME)

    @property
    def held(self) -> bool:
        return self._held


def make_lock(medium: Any, force: bool = False) -> StoreLock | ObjectLock:
    """The writer lock for a store on ``medium``: an ``flock`` in a directory, a conditional PUT on S3."""
    if getattr(medium, "kind", "file") == "s3":
        return ObjectLock(medium, force=force)
    return StoreLock(medium.root, force=force)
