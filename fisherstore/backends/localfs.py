"""What the two on-disk backends share: documents, listing, deletion and durability.

zarr-python and TensorStore write the same Zarr v3 files; group documents and the
commit protocol are plain files written here, so both backends commit identically.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import json
import math
import os
import shutil
import uuid
from typing import Any

import crc32c
import numpy as np

from ..errors import FisherStoreError
from ..lock import LOCK_NAME
from .base import ArrayBackend, Region, region_shape

_DIRECT_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


class ChunkError(OSError):
    """One chunk file is missing, truncated or fails its checksum; ``chunk`` is its grid index."""

    def __init__(self, err: int, msg: str, path: str, chunk: tuple[int, ...]) -> None:
        super().__init__(err, msg, path)
        self.chunk = tuple(chunk)


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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(d)


class LocalFSBackend(ArrayBackend):
    """Base of the backends that keep a Zarr v3 hierarchy in a local directory.

    Reads of arrays in the default codec chain (``bytes`` + ``crc32c``, documented in
    docs/format.md) go straight to the chunk files: read, check the CRC, ``frombuffer``.
    That skips ~3 ms of library machinery per head-block read; writes always go through
    zarr-python or TensorStore. ``direct_reads=False`` reads through the library too.
    """

    persistent = True

    def __init__(self, root: str | None, *, direct_reads: bool = True, **kw: Any) -> None:
        if root is None:
            raise ValueError(f"backend {self.name!r} needs a path")
        super().__init__(os.path.abspath(os.fspath(root)), **kw)
        self.direct_reads = direct_reads
        self.chunk_files_read = 0  # chunk files read by the direct path (a statistic)
        self._meta: dict[str, dict[str, Any] | None] = {}

    # -- reads --------------------------------------------------------------------------
    def read(self, key: str, region: Region) -> np.ndarray:
        meta = self._direct_meta(key) if self.direct_reads else None
        if meta is None or any((s.step or 1) != 1 for s in region):
            return self._read_lib(key, region)
        return self._read_direct(key, meta, region)

    @abc.abstractmethod
    def _read_lib(self, key: str, region: Region) -> np.ndarray:
        """Read through the array library (codec chains the direct path does not handle)."""

    def _direct_meta(self, key: str) -> dict[str, Any] | None:
        """Shape and chunks of an array whose chunks we can read directly, else None."""
        if key not in self._meta:
            doc = self.read_json(f"{key}/zarr.json")
            ok = (
                doc is not None
                and doc.get("data_type") == "float32"
                and doc.get("codecs") == _DIRECT_CODECS
                and (doc.get("chunk_key_encoding") or {}).get("name") == "default"
                and (doc.get("chunk_key_encoding", {}).get("configuration") or {}).get("separator", "/") == "/"
            )
            self._meta[key] = (
                {"shape": tuple(doc["shape"]), "chunks": tuple(doc["chunk_grid"]["configuration"]["chunk_shape"])}
                if ok
                else None
            )
        return self._meta[key]

    def _read_direct(self, key: str, meta: dict[str, Any], region: Region) -> np.ndarray:
        chunks = meta["chunks"]
        n = math.prod(chunks)
        out_shape = region_shape(region)
        ranges = [range(s.start // c, (s.stop - 1) // c + 1) if s.stop > s.start else range(0)
                  for s, c in zip(region, chunks)]
        single = None
        out = None
        for idx in itertools.product(*ranges):
            rel = "/".join(["c", *map(str, idx)]) if idx else "c"
            path = os.path.join(self._path(key), *rel.split("/"))
            buf = bytearray(4 * n + 4)
            self.chunk_files_read += 1
            try:
                with open(path, "rb") as f:
                    got = f.readinto(buf)
                    extra = f.read(1)
            except FileNotFoundError:
                raise ChunkError(errno.ENOENT, f"chunk file {rel} of {key!r} is missing", path, idx) from None
            if got != len(buf) or extra:
                raise ChunkError(errno.EIO, f"chunk {rel} of {key!r} is truncated or padded "
                                            f"({got + len(extra)} bytes, expected {len(buf)})", path, idx)
            if crc32c.crc32c(memoryview(buf)[:-4]) != int.from_bytes(buf[-4:], "little"):
                raise ChunkError(errno.EIO, f"chunk {rel} of {key!r} failed its crc32c checksum", path, idx)
            arr = np.frombuffer(buf, dtype="<f4", count=n).reshape(chunks)
            src = []
            dst = []
            for s, c, i in zip(region, chunks, idx):
                lo, hi = max(s.start, i * c), min(s.stop, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - s.start, hi - s.start))
            part = arr[tuple(src)]
            if len(ranges) == 0 or all(len(r) == 1 for r in ranges):
                single = part
                break
            if out is None:
                out = np.empty(out_shape, dtype=np.float32)
            out[tuple(dst)] = part
        if single is not None:
            return single
        return out if out is not None else np.zeros(out_shape, dtype=np.float32)

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
                with contextlib.suppress(FileNotFoundError):  # deleted by a writer meanwhile
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total

    def clear(self) -> None:
        self._check_writable()
        self._forget("")
        self.ensure_root()
        for entry in os.scandir(self.root):
            # The writer's lock file stays: removing a held flock file would let a second
            # writer lock a fresh one beside it.
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, onerror=_ignore_missing)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def exists(self) -> bool:
        return os.path.exists(self._path("zarr.json"))

    def remove_temp_files(self) -> None:
        # Documents live in the root, task and parameter directories; temp files inside
        # generations go with the uncommitted generations that hold them.
        self._check_writable()
        dirs = [self.root]
        for depth in range(3):
            nxt = []
            for d in dirs:
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    for e in os.scandir(d):
                        if e.name.endswith(".partial") and e.is_file(follow_symlinks=False):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(e.path)
                        elif depth < 2 and e.is_dir(follow_symlinks=False):
                            nxt.append(e.path)
            dirs = nxt

    def sync(self) -> None:
        if not self.read_only and os.path.isdir(self.root):
            syncfs(self.root)

    def ensure_root(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    # -- hooks for subclasses -----------------------------------------------------------
    def _forget(self, key: str) -> None:
        """Drop cached handles for ``key`` and below ('' for all)."""
        prefix = key.rstrip("/") + "/" if key else ""
        for k in [k for k in self._meta if k == key or k.startswith(prefix)]:
            del self._meta[k]

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(errno.EROFS, "backend is read-only", self.root)


def _ignore_missing(func: Any, path: str, exc_info: Any) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
