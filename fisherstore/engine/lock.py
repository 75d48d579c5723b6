"""One writer per store: a lock file at ``<root>/.fisherstore.lock``.

The lock is an ``flock`` on that file, so the kernel releases it when the writer dies,
even by ``kill -9``; the file also records the holder's pid, host and start time, so a
second writer's error can name them. Where ``flock`` is unavailable (some network
filesystems), or with ``FISHERSTORE_LOCK=pidfile``, the file itself is the lock
(created exclusively); a writer killed then leaves it behind, and ``force=True`` (CLI:
``--force``) takes over a lock whose pid is gone.

On object storage (``s3://``) nothing releases a lock when its writer dies, and a pid on
another host cannot be checked: the lock is a lease (:class:`ObjectLock`), renewed by a
heartbeat, that ``force=True`` takes over only once it has expired.

Readers never lock: a reader sees the last commit (see docs/format.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import threading
import time
import uuid
from typing import Any

from ..errors import CorruptStoreError, InvalidArgumentError, StoreLockedError

LOCK_NAME = ".fisherstore.lock"

__all__ = ["StoreLock", "ObjectLock", "LeaseState", "StoreLockedError", "LOCK_NAME", "DEFAULT_LEASE", "lease_ttl",
           "read_holder", "holder_alive", "make_lock", "break_object_lock"]

#: Seconds an object-storage writer's lease lasts past its last renewal (``FISHERSTORE_LOCK_TTL``).
DEFAULT_LEASE = 60.0


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


def lease_ttl() -> float:
    """The object-storage lease in seconds: ``FISHERSTORE_LOCK_TTL`` or :data:`DEFAULT_LEASE`.

    Usage: ``FISHERSTORE_LOCK_TTL=10 python train.py`` (tests shorten it; production keeps 60 s).
    """
    raw = os.environ.get("FISHERSTORE_LOCK_TTL")
    if raw is None:
        return DEFAULT_LEASE
    try:
        ttl = float(raw)
    except ValueError:
        ttl = -1.0
    if not 0 < ttl < 1e6:
        raise InvalidArgumentError(f"FISHERSTORE_LOCK_TTL must be a positive number of seconds (default "
                                   f"{DEFAULT_LEASE:g}), got {raw!r}")
    return ttl


def _parse_record(raw: bytes | None) -> dict[str, Any]:
    try:
        rec = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


def _who(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"


def _clock(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "?"


class LeaseState:
    """The writer lock of a store on object storage, as found: its holder, and whether the lease is live.

    Usage: ``st = LeaseState.read(medium); if st and not st.live: ...``.
    """

    def __init__(self, holder: dict[str, Any], e_tag: str | None, age: float | None) -> None:
        self.holder, self.e_tag, self.age = holder, e_tag, age

    @property
    def ttl(self) -> float | None:
        """The lease the holder promised to renew (None: a lock written before leases, never renewed)."""
        ttl = self.holder.get("ttl")
        return float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl > 0 else None

    @property
    def live(self) -> bool:
        """Whether the holder renewed its lease within its ttl (on the server's clock)."""
        return self.ttl is not None and (self.age is None or self.age <= self.ttl)

    @classmethod
    def read(cls, medium: Any, measure: bool = True) -> LeaseState | None:
        """The lock object at ``medium``, or None if there is none. ``measure``: the lease's age on the server's clock
        (a PUT and a HEAD; needs write access)."""
        got = medium.get_tagged(LOCK_NAME, limit=_MAX_RECORD)
        if got is None:
            return None
        raw, e_tag, modified = got
        age = (medium.server_now() - modified).total_seconds() if measure else None
        return cls(_parse_record(raw), e_tag, age)

    def describe(self, url: str) -> str:
        """The holder in words: who, since when, its last heartbeat."""
        h = self.holder
        beat = f", last heartbeat {self.age:.0f} s ago" if self.age is not None else \
            f", last heartbeat at {_clock(h.get('heartbeat'))} (its clock)" if "heartbeat" in h else ""
        return f"{_who(h)}, writing since {_clock(h.get('since'))}{beat}"


class ObjectLock:
    """The writer lock of a store on object storage: a **lease** on the lock object.

    A writer creates the lock object by a conditional PUT (``If-None-Match: *``: of two
    writers, exactly one creates it), then a daemon thread renews it every ``ttl / 3``
    seconds by a conditional PUT (``If-Match`` its last ETag), so a renewal fails if anyone
    else replaced the object. The lease lasts ``ttl`` seconds past its last renewal
    (``FISHERSTORE_LOCK_TTL``, default :data:`DEFAULT_LEASE` = 60 s), measured on the
    server's clock (:meth:`~fisherstore.backends.objects.ObjectFiles.server_now`).

    * ``force=True`` takes over only a lease that has expired (its writer stopped renewing:
      killed, hung, cut off); a live lease is a :class:`StoreLockedError` naming its holder
      (pid, host, last heartbeat). The takeover is itself conditional on the ETag it judged.
    * A writer whose lease was taken over stops: every mutation of the store (a chunk
      written through the medium, a document, a commit, a delete: :attr:`ObjectFiles.guard`)
      first checks that the lease is held and was renewed within ``ttl / 2``, renewing it
      then and there if not, and raises :class:`StoreLockedError` naming the new holder if
      the renewal fails. The window left: a request already on the wire when the lease
      lapsed (a process frozen mid-request for longer than ``ttl / 2``).
    * Releasing deletes the lock object only if it still holds this writer's token (read
      right before the DELETE: S3 has no conditional DELETE; the window is one request).

    A lock record without ``ttl`` (fisherstore before leases) is never renewed, so
    ``force=True`` takes it over, as before.

    Args:
        medium: the store's :class:`~fisherstore.backends.objects.ObjectFiles`.
        force: take over an expired lease.
    """

    mode = "object"

    def __init__(self, medium: Any, *, force: bool = False) -> None:
        self.medium = medium
        self.path = medium.url_of(LOCK_NAME)
        self.force = force
        self.ttl = lease_ttl()
        self.previous: dict[str, Any] | None = None  # an expired holder's record we replaced
        self.token = uuid.uuid4().hex
        self._since = time.time()
        self._beat = 0
        self._e_tag: str | None = None
        self._renewed = 0.0  # time.monotonic() when the last renewal the server accepted was sent
        self._lost: dict[str, Any] | None = None  # the holder that took the lease from us
        self._held = False
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": self._since,
                           "heartbeat": time.time(), "ttl": self.ttl, "token": self.token, "beat": self._beat}).encode()

    def acquire(self) -> None:
        sent = time.monotonic()
        e_tag = self.medium.create_tagged(LOCK_NAME, self._record())
        if e_tag is None:
            sent, e_tag = self._take_over()
        self._e_tag, self._renewed, self._held = e_tag, sent, True
        self.medium.guard = self.check
        self._thread = threading.Thread(target=self._heartbeat, name="fisherstore-lease", daemon=True)
        self._thread.start()

    def _take_over(self) -> tuple[float, str]:
        state = LeaseState.read(self.medium, measure=self.force)
        if state is None:  # released between our create and our read: try once more
            sent = time.monotonic()
            e_tag = self.medium.create_tagged(LOCK_NAME, self._record())
            if e_tag is not None:
                return sent, e_tag
            state = LeaseState.read(self.medium, measure=self.force)
            if state is None:
                raise StoreLockedError(f"the writer lock of {self.medium.url!r} keeps changing: another writer is "
                                       "taking it at the same time. Try again.")
        url = self.medium.url
        if not self.force:
            raise StoreLockedError(
                f"the store at {url!r} is being written by {state.describe(url)}; a store has one writer at a "
                "time. Open it with mode='r' to read it. If that writer is gone, its lease expires "
                f"{state.ttl or self.ttl:g} s after its last heartbeat; then take the lock over with force=True "
                "(CLI: fisherstore unlock --force URL)."
            )
        if state.live:
            raise StoreLockedError(
                f"the store at {url!r} is being written by {state.describe(url)}: its lease is live (it expires "
                f"{state.ttl:g} s after the last heartbeat), so force=True does not take it over. Stop that writer, "
                "or wait for it to close; a writer that died loses its lease "
                f"{state.ttl:g} s after its last heartbeat, and force=True then takes it over."
            )
        sent = time.monotonic()
        e_tag = self.medium.replace_if(LOCK_NAME, self._record(), state.e_tag)
        if e_tag is None:
            raise StoreLockedError(f"the writer lock of {url!r} changed while this writer was taking it over "
                                   f"from {_who(state.holder)}: that writer renewed it, or another took it. Try again.")
        self.previous = state.holder
        return sent, e_tag

    # -- the lease -----------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except StoreLockedError:
                return  # lost: every mutation now raises (check)
            except Exception:  # noqa: S112 - a failed request: the next beat retries, and check() stops writes
                continue       # once the lease may have lapsed

    def renew(self) -> None:
        """Push the lease ``ttl`` seconds ahead (conditional on our last ETag); StoreLockedError if it was taken."""
        with self._mutex:
            if self._lost is not None:
                raise self._lost_error()
            if not self._held:
                return
            self._beat += 1
            sent = time.monotonic()
            e_tag = self.medium.replace_if(LOCK_NAME, self._record(), self._e_tag)
            if e_tag is None:
                state = LeaseState.read(self.medium, measure=False)
                self._lost = state.holder if state is not None else {}
                raise self._lost_error()
            self._e_tag, self._renewed = e_tag, sent

    def check(self) -> None:
        """Raise :class:`StoreLockedError` unless this writer still holds its lease (renewing it if due).

        The medium calls it before every mutation. It costs no request while the heartbeat
        keeps up: a lease renewed less than ``ttl / 2`` ago cannot have expired, and
        nobody takes over a lease before it expires.
        """
        if self._lost is not None:
            raise self._lost_error()
        if time.monotonic() - self._renewed > self.ttl / 2:
            self.renew()

    def _lost_error(self) -> StoreLockedError:
        new = self._lost or {}
        by = f"{_who(new)} (writing since {_clock(new.get('since'))})" if new else "nobody (the lock was removed)"
        return StoreLockedError(
            f"this writer's lease on {self.medium.url!r} was taken over: the lock is now held by {by}. This writer "
            f"went more than {self.ttl:g} s without renewing its lease (frozen, or cut off from the server), so it "
            "stops: nothing more is written, committed or deleted. Its steps since the last flush are lost; the store "
            "is at its last commit. Close this store and reopen it once the other writer is done."
        )

    def release(self, remove_file: bool = False) -> None:
        """Stop renewing, and delete the lock object if it is still ours (never another writer's)."""
        with self._mutex:
            if not self._held:
                return
            self._held = False
            self._stop.set()
            if self.medium.guard == self.check:
                self.medium.guard = None
            if self._lost is not None:
                return  # the lock is another writer's now
            with contextlib.suppress(Exception):  # an unreachable server: the lease expires on its own
                state = LeaseState.read(self.medium, measure=False)
                if state is not None and state.holder.get("token") == self.token:
                    self.medium.remove(LOCK_NAME)

    @property
    def held(self) -> bool:
        return self._held

    @property
    def lost(self) -> bool:
        """Whether another writer took this writer's lease over."""
        return self._lost is not None


def break_object_lock(medium: Any) -> LeaseState | None:
    """Remove the lock object of an expired lease (``fisherstore unlock --force s3://...``); the state removed, or None.

    Raises :class:`StoreLockedError` naming the holder if its lease is live. The DELETE
    follows a re-read that the lock is unchanged (S3 has no conditional DELETE).

    Usage: ``break_object_lock(open_medium("s3://b/p", read_only=False))``.
    """
    state = LeaseState.read(medium)
    if state is None:
        return None
    if state.live:
        raise StoreLockedError(
            f"the store at {medium.url!r} is being written by {state.describe(medium.url)}: its lease is live (it "
            f"expires {state.ttl:g} s after the last heartbeat). Stop that writer first, or let it finish."
        )
    again = medium.get_tagged(LOCK_NAME, limit=_MAX_RECORD)
    if again is not None and again[1] != state.e_tag:
        raise StoreLockedError(f"the writer lock of {medium.url!r} changed while it was being removed: a writer "
                               "renewed or took it. Run the command again to see who holds it.")
    if again is not None:
        medium.remove(LOCK_NAME)
    return state


def make_lock(medium: Any, force: bool = False) -> StoreLock | ObjectLock:
    """The writer lock for a store on ``medium``: an ``flock`` in a directory, a lease on S3."""
    if getattr(medium, "kind", "file") == "s3":
        return ObjectLock(medium, force=force)
    return StoreLock(medium.root, force=force)
