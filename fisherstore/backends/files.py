"""Bytes by key in a local directory: the medium under the on-disk backends.

Modelled on zarr-python's abstract ``Store``: keys are ``/``-separated paths relative to
the store's directory, values are bytes. What the commit protocol needs from a medium is
here and nowhere else: an atomic, durable replace (temp file, fsync, rename, fsync the
directory), a listing of child nodes, deletion of a subtree, one filesystem-wide sync, and
the free space left. The array libraries (zarr-python, TensorStore) write chunk files into
the same directory through their own stores.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import stat
import uuid
from collections.abc import Iterable
from typing import Any

from ..errors import CorruptStoreError

__all__ = ["LocalFiles", "syncfs", "check_regular", "TEMP_SUFFIX", "MAX_DOC_BYTES"]

#: Suffix of the temp file of an atomic write; one left behind means the write was interrupted.
TEMP_SUFFIX = ".partial"
#: The largest metadata document fisherstore reads (a manifest of 100,000 parameters is ~40 MB).
MAX_DOC_BYTES = 256 << 20


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def syncfs(path: str) -> None:
    """Flush every dirty page of the filesystem holding ``path`` to the device.

    One ``syncfs`` per flush is far cheaper than an fsync per chunk file (TensorStore's
    default doubled update time on this project's machines; docs/design.md, "Durability"); it falls back to
    ``os.sync`` where ``syncfs`` is missing.
    """
    fn = getattr(_LIBC, "syncfs", None) if _LIBC is not None else None
    if fn is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", path)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ignore_missing(func: Any, path: str, exc_info: Any) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def open_regular(path: str) -> int | None:
    """A read descriptor of the regular file at ``path``, or None if absent; a link, device or FIFO is refused.

    ``O_NOFOLLOW`` and ``O_NONBLOCK``: a link in a crafted store must not make a reader
    read outside it, and a FIFO must not hang it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _not_regular(path, stat.S_IFLNK) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    return fd


@functools.lru_cache(maxsize=4096)
def _key_path(root: str, key: str) -> str:
    """``key``'s file under ``root`` (a pure function, so remembered: a read names its chunk, header and the
    root document each time, and a head-block read is a quarter of a millisecond all told)."""
    parts = [k for k in key.split("/") if k]
    if any(k in (".", "..") or os.sep in k or (os.altsep and os.altsep in k) for k in parts):
        raise CorruptStoreError(f"key {key!r} would leave the store at {root!r}; fisherstore never goes there")
    return os.path.join(root, *parts)


def _read_upto(fd: int, first: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``fd`` from its start (fewer at its end), in plain ``read`` calls.

    ``first`` sizes the first call (a document's size plus one: one call reads it whole);
    the calls go on until the end of the file or ``limit``, in pieces of at most 1 MiB.
    A buffered file object (``open``/``fdopen``) costs ~15 µs more per small document,
    half the time of reading one (benchmarks/results/reads20.md).
    """
    parts, got = [], 0
    size = max(1, min(first, limit))
    while got < limit:
        more = os.read(fd, size)
        if not more:
            break
        parts.append(more)
        got += len(more)
        size = min(limit - got, 1 << 20)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _not_regular(path: str, mode: int) -> CorruptStoreError:
    """The one error for a link, device, FIFO or directory where fisherstore keeps a file (both read paths)."""
    if stat.S_ISLNK(mode):
        return CorruptStoreError(f"{path!r} is a symbolic link where fisherstore keeps a file; remove it")
    return CorruptStoreError(f"{path!r} is not a regular file (a device, FIFO or directory); remove it")


def check_regular(paths: Iterable[str]) -> None:
    """Refuse a link, device, FIFO or directory among ``paths`` as :func:`open_regular` does; absent ones pass.

    For the reads an array library makes itself (``direct_reads=False``, or a chain the
    direct path does not decode): zarr-python and TensorStore open chunk files without
    ``O_NONBLOCK`` or a file-type check, so a FIFO in place of a chunk would block the read
    forever and a link would read outside the store. One ``lstat`` per chunk, no open:
    about 1.7 µs each (measured: 1.7 ms for a 1000-chunk read that takes 6-150 ms through
    the libraries). A missing file is left to the library, as it always was.
    Usage: ``check_regular([files.path("t/w/g00000001/c/0/0")])``.
    """
    for path in paths:
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)


class LocalFiles:
    """A directory as a store of bytes by key (``kind = "file"``).

    Args:
        root: the directory (made absolute; created by :meth:`ensure` on first write).
        read_only: refuse every mutation with ``EROFS``.
    """

    kind = "file"

    def __init__(self, root: str, *, read_only: bool) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.read_only = read_only

    def path(self, key: str) -> str:
        """The file of ``key``; a key that would leave the directory is refused."""
        return _key_path(self.root, key)

    def check_no_links(self, key: str) -> None:
        """Refuse a key any of whose directories is a symbolic link (before writing, deleting or reading there).

        A crafted store could link a task or parameter directory to another store: a writer
        following the link would overwrite or delete data that is not its own, and a reader
        would return another store's values as this one's.
        """
        path = self.root
        for part in [k for k in key.split("/") if k]:
            path = os.path.join(path, part)
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                return
            if stat.S_ISLNK(st.st_mode):
                raise CorruptStoreError(
                    f"{path!r} is a symbolic link; fisherstore never reads, writes or deletes through a link inside "
                    "a store. Remove the link (or open the store it points to directly)."
                )

    # -- bytes ----------------------------------------------------------------------------
    def get(self, key: str, limit: int = MAX_DOC_BYTES) -> bytes | None:
        """The bytes at ``key`` (a regular file of at most ``limit`` bytes), or None if absent.

        A link, a device, a FIFO or a huge file where a document should be is an error,
        never a hang or an exhausted memory.
        """
        path = self.path(key)
        fd = open_regular(path)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            if st.st_size > limit:
                raise CorruptStoreError(
                    f"{path!r} is {st.st_size} bytes, more than the {limit} a fisherstore document can be; "
                    "the store is damaged or crafted"
                )
            data = _read_upto(fd, min(limit, st.st_size) + 1, limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise CorruptStoreError(f"{path!r} grew past {limit} bytes while it was read")
        return data

    def put(self, key: str, data: bytes, durable: bool = True) -> None:
        """Replace ``key`` so a reader sees the old value or the new one, whole.

        ``durable``: fsync the file and its directory before returning. Without it the
        next :meth:`sync` makes the write durable (cheaper for many small documents).
        """
        self.check_writable()
        self.check_no_links(key)
        path = self.path(key)
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if durable:
            _fsync_dir(d)

    def read_bounded(self, key: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of ``key`` (more would mean damage: the caller checks), or None if absent."""
        fd = open_regular(self.path(key))
        if fd is None:
            return None
        try:
            return _read_upto(fd, limit, limit)
        finally:
            os.close(fd)

    def read_into(self, key: str, buffers: list[memoryview]) -> int | None:
        """Fill ``buffers`` from the start of ``key`` in one ``preadv`` (no copy); bytes read, one more if the file
        is longer than they are (the caller checks), or None if absent."""
        fd = open_regular(self.path(key))
        if fd is None:
            return None
        try:
            return os.preadv(fd, [*buffers, bytearray(1)], 0)  # a byte more in the same call shows a longer file
        finally:
            os.close(fd)

    def create(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if absent (``O_EXCL``); False if it exists."""
        self.check_writable()
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def url_of(self, key: str) -> str:
        return self.path(key)

    def write(self, key: str, data: bytes) -> None:
        """Write ``key`` in place, without a sync: for chunks no commit names yet (the flush syncs them)."""
        self.check_writable()
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def exists(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def version(self, key: str) -> tuple[int, int, int] | None:
        """(inode, mtime, size) of ``key``: an atomic replace always changes the inode. None if absent."""
        try:
            st = os.stat(self.path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    # -- tree -----------------------------------------------------------------------------
    def list_dirs(self, key: str) -> list[str]:
        """Names of the directories directly under ``key`` ('' is the root; links are not followed)."""
        try:
            return sorted(e.name for e in os.scandir(self.path(key)) if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def entries(self, key: str) -> list[str]:
        """Names of everything directly under ``key`` (files, directories, links); [] if absent."""
        try:
            return sorted(os.listdir(self.path(key)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_files(self, key: str) -> list[str]:
        """Keys (relative to ``key``) of every file below ``key``; [""] if ``key`` is a file, [] if absent."""
        base = self.path(key)
        if os.path.isfile(base):
            return [""]
        out = []
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            out += [prefix + f for f in files]
        return out

    def delete(self, key: str) -> None:
        """Remove ``key`` and everything below it (no error if absent); links are removed, never followed."""
        self.check_writable()
        self.check_no_links(key.rsplit("/", 1)[0] if "/" in key else "")
        path = self.path(key)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=_ignore_missing)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def ensure(self) -> None:
        """Create the directory if it is missing."""
        os.makedirs(self.root, exist_ok=True)

    def is_dir(self) -> bool:
        return os.path.isdir(self.root)

    def visible_names(self) -> list[str]:
        """Names in the directory that do not start with a dot."""
        try:
            return [n for n in os.listdir(self.root) if not n.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return []

    # -- capacity and durability ----------------------------------------------------------
    def size(self, key: str = "", chunks_only: bool = False) -> int:
        """Bytes of the files below ``key`` (only chunk files, under a ``c/`` directory, with ``chunks_only``)."""
        total = 0
        for dirpath, _, files in os.walk(self.path(key)):
            if chunks_only and f"{os.sep}c{os.sep}" not in dirpath + os.sep:
                continue
            for f in files:
                with contextlib.suppress(FileNotFoundError):  # deleted by a writer meanwhile
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total

    def free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return None

    def temp_files(self, depth: int = 3) -> list[str]:
        """Keys of the temp files of interrupted writes in the top ``depth`` directory levels.

        Documents live in the root, task and parameter directories; temp files inside
        generations go with the uncommitted generations that hold them.
        """
        found: list[str] = []
        dirs = [""]
        for level in range(depth):
            nxt = []
            for d in dirs:
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    for e in os.scandir(self.path(d)):
                        key = f"{d}/{e.name}" if d else e.name
                        if e.name.endswith(TEMP_SUFFIX) and e.is_file(follow_symlinks=False):
                            found.append(key)
                        elif level < depth - 1 and e.is_dir(follow_symlinks=False):
                            nxt.append(key)
            dirs = nxt
        return found

    def sync(self) -> None:
        if not self.read_only and os.path.isdir(self.root):
            syncfs(self.root)

    def check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(errno.EROFS, "backend is read-only", self.root)
