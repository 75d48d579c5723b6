"""What the two on-disk backends share: documents, listing, deletion and durability.

zarr-python and TensorStore write the same Zarr v3 files; group documents and the
commit protocol are plain files written here, so both backends commit identically.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import uuid
from typing import Any

from ..errors import FisherStoreError
from .base import ArrayBackend


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


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, whole.

    Temp file in the same directory, fsync, rename over the target, fsync the directory.
    """
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(d)


class LocalFSBackend(ArrayBackend):
    """Base of the backends that keep a Zarr v3 hierarchy in a local directory."""

    persistent = True

    def __init__(self, root: str | None, **kw: Any) -> None:
        if root is None:
            raise ValueError(f"backend {self.name!r} needs a path")
        super().__init__(os.path.abspath(os.fspath(root)), **kw)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *[k for k in key.split("/") if k])

    def read_json(self, key: str) -> dict[str, Any] | None:
        try:
            with open(self._path(key), "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise FisherStoreError(
                f"metadata document {self._path(key)!r} is not valid JSON ({e}); the store is "
                "damaged. Run `fisherstore verify` on it."
            ) from None

    def write_json(self, key: str, doc: dict[str, Any]) -> None:
        self._check_writable()
        data = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode()
        atomic_write_bytes(self._path(key), data)

    def list(self, key: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._path(key)) if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> None:
        self._check_writable()
        self._forget(key)
        shutil.rmtree(self._path(key), ignore_errors=False, onerror=_ignore_missing)

    def nbytes(self, key: str = "", chunks_only: bool = False) -> int:
        total = 0
        for dirpath, _, files in os.walk(self._path(key)):
            if chunks_only and f"{os.sep}c{os.sep}" not in dirpath + os.sep:
                continue
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except FileNotFoundError:
                    pass
        return total

    def clear(self) -> None:
        self._check_writable()
        self._forget("")
        shutil.rmtree(self.root, onerror=_ignore_missing)
        self.ensure_root()

    def exists(self) -> bool:
        return os.path.exists(self._path("zarr.json"))

    def sync(self) -> None:
        if not self.read_only and os.path.isdir(self.root):
            syncfs(self.root)

    def ensure_root(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    # -- hooks for subclasses -----------------------------------------------------------
    def _forget(self, key: str) -> None:
        """Drop cached handles for ``key`` and below ('' for all)."""

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(errno.EROFS, "backend is read-only", self.root)


def _ignore_missing(func: Any, path: str, exc_info: Any) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
