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
import os
import shutil
import uuid
from typing import Any

__all__ = ["LocalFiles", "syncfs", "TEMP_SUFFIX"]

#: Suffix of the temp file of an atomic write; one left behind means the write was interrupted.
TEMP_SUFFIX = ".partial"


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def syncfs(path: str) -> None:
    """Flush every dirty page of the filesystem holding ``path`` to the device.

    One ``syncfs`` per flush is far cheaper than an fsync per chunk file (TensorStore's
    default doubles update time, research/measurements.md §5.2); it falls back to
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


class LocalFiles:
    """A directory as a store of bytes by key.

    Args:
        root: the directory (made absolute; created by :meth:`ensure` on first write).
        read_only: refuse every mutation with ``EROFS``.
    """

    def __init__(self, root: str, *, read_only: bool) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.read_only = read_only

    def path(self, key: str) -> str:
        return os.path.join(self.root, *[k for k in key.split("/") if k])

    # -- bytes ----------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        """The bytes at ``key``, or None if absent."""
        try:
            with open(self.path(key), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, key: str, data: bytes) -> None:
        """Replace ``key`` so a reader sees the old value or the new one, whole, and durably."""
        self.check_writable()
        path = self.path(key)
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(d)

    def exists(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    # -- tree -----------------------------------------------------------------------------
    def list_dirs(self, key: str) -> list[str]:
        """Names of the directories directly under ``key`` ('' is the root); [] if absent."""
        try:
            return sorted(e.name for e in os.scandir(self.path(key)) if e.is_dir())
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
        """Remove ``key`` and everything below it (no error if absent)."""
        self.check_writable()
        path = self.path(key)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=_ignore_missing)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        """Remove everything in the directory except the top-level names in ``keep``."""
        self.check_writable()
        self.ensure()
        for entry in os.scandir(self.root):
            if entry.name in keep:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, onerror=_ignore_missing)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

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
