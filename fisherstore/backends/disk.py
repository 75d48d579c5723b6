"""What the two on-disk backends share: documents, listing, deletion, durability and direct reads.

zarr-python and TensorStore write the same Zarr v3 files. Documents, the tree and the
commit protocol's durability go through :class:`~fisherstore.backends.files.LocalFiles`,
so both backends commit identically; only array creation and writes differ.

Reads of arrays in the default codec chain (``bytes`` + ``crc32c``, docs/format.md) go
straight to the chunk files: read, check the CRC, ``frombuffer``. That skips ~3 ms of
library machinery per head-block read. ``direct_reads=False`` reads through the library.
"""

from __future__ import annotations

import abc
import errno
import json
import math
from collections.abc import Sequence
from typing import Any

import crc32c
import numpy as np

from ..codecs import CodecSpec
from ..errors import FisherStoreError
from ..format import DOC, chunk_key, doc_key
from ..regions import Region, chunk_coords, chunk_overlap, region_shape
from .base import ArrayBackend, ChunkError
from .files import LocalFiles

__all__ = ["DiskBackend"]

_DIRECT_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


class DiskBackend(ArrayBackend):
    """Base of the backends that keep a Zarr v3 hierarchy in a local directory.

    Subclasses say how an array library creates, opens, reads and writes arrays; this
    class keeps the library's open handles (one per array key) and forgets them when a
    key is deleted.
    """

    persistent = True

    def __init__(self, root: str | None, *, read_only: bool, direct_reads: bool = True) -> None:
        if root is None:
            raise ValueError(f"backend {self.name!r} needs a path")
        self.files = LocalFiles(root, read_only=read_only)
        super().__init__(self.files.root, read_only=read_only)
        self.direct_reads = direct_reads
        self.chunk_files_read = 0  # chunk files read by the direct path (a statistic)
        self._meta: dict[str, dict[str, Any] | None] = {}  # array key -> direct-read metadata
        self._handles: dict[str, Any] = {}  # array key -> the library's open array
        self._codecs: dict[str, CodecSpec] = {}  # array key -> the chain it was created with

    # -- what a library adds ----------------------------------------------------------------
    @abc.abstractmethod
    def _create(self, key: str, shape: Sequence[int], chunks: Sequence[int], attributes: dict[str, Any],
                codecs: CodecSpec) -> Any:
        """Create the array at ``key`` and return its open handle."""

    @abc.abstractmethod
    def _open(self, key: str) -> Any:
        """Open the existing array at ``key``."""

    @abc.abstractmethod
    def _read_lib(self, handle: Any, region: Region) -> np.ndarray:
        """Read through the array library (codec chains the direct path does not handle)."""

    @abc.abstractmethod
    def _write_lib(self, handle: Any, region: Region, data: np.ndarray) -> None:
        """Write through the array library."""

    # -- arrays -------------------------------------------------------------------------------
    def create_array(self, key: str, shape: Sequence[int], chunks: Sequence[int], attributes: dict[str, Any],
                     codecs: CodecSpec) -> None:
        self.files.check_writable()
        self._forget(key)
        self._handles[key] = self._create(key, shape, chunks, attributes, codecs)
        self._codecs[key] = codecs

    def _handle(self, key: str) -> Any:
        h = self._handles.get(key)
        if h is None:
            h = self._handles[key] = self._open(key)
        return h

    def read(self, key: str, region: Region) -> np.ndarray:
        meta = self._direct_meta(key) if self.direct_reads else None
        if meta is None or any((s.step or 1) != 1 for s in region):
            return self._read_lib(self._handle(key), region)
        return self._read_direct(key, meta, region)

    def write(self, key: str, region: Region, data: np.ndarray) -> None:
        self.files.check_writable()
        codecs = self._codecs.get(key)
        self._write_lib(self._handle(key), region, codecs.pre_encode(data) if codecs else data)

    def list_chunks(self, key: str) -> set[tuple[int, ...]]:
        rels = self.files.list_files(f"{key}/c")
        if rels == [""]:
            return {()}  # a 0-d array's one chunk is the file "c" itself
        return {tuple(int(p) for p in rel.split("/")) for rel in rels if all(p.isdigit() for p in rel.split("/"))}

    def _direct_meta(self, key: str) -> dict[str, Any] | None:
        """Shape and chunks of an array whose chunks we can read directly, else None."""
        if key not in self._meta:
            doc = self.read_json(doc_key(key))
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
        coords = chunk_coords(region, chunks)
        out = None
        for idx in coords:
            rel = chunk_key(idx)
            path = self.files.path(f"{key}/{rel}")
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
            src, dst = chunk_overlap(region, chunks, idx)
            part = np.frombuffer(buf, dtype="<f4", count=n).reshape(chunks)[src]
            if len(coords) == 1:
                return part  # one chunk: a view of its buffer, no copy
            if out is None:
                out = np.empty(region_shape(region), dtype=np.float32)
            out[dst] = part
        return out if out is not None else np.zeros(region_shape(region), dtype=np.float32)

    # -- documents and tree ---------------------------------------------------------------------
    def read_json(self, key: str) -> dict[str, Any] | None:
        raw = self.files.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise FisherStoreError(
                f"metadata document {self.files.path(key)!r} is not valid JSON ({e}); the store is "
                "damaged. Run `fisherstore verify` on it."
            ) from None

    def write_json(self, key: str, doc: dict[str, Any]) -> None:
        self.files.put(key, json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode())

    def list(self, key: str) -> list[str]:
        return self.files.list_dirs(key)

    def delete(self, key: str) -> None:
        self.files.check_writable()
        self._forget(key)
        self.files.delete(key)

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        self._forget("")
        self.files.clear(keep)

    def exists(self) -> bool:
        return self.files.exists(DOC)

    def ensure_root(self) -> None:
        self.files.ensure()

    def holds_other_files(self) -> bool:
        return self.files.is_dir() and not self.exists() and bool(self.files.visible_names())

    def nbytes(self, key: str = "", chunks_only: bool = False) -> int:
        return self.files.size(key, chunks_only)

    def free_bytes(self) -> int | None:
        return self.files.free_bytes()

    def temp_files(self) -> list[str]:
        return self.files.temp_files()

    def remove_temp_files(self) -> None:
        self.files.check_writable()
        for key in self.temp_files():
            self.files.delete(key)

    def sync(self) -> None:
        self.files.sync()

    def close(self) -> None:
        self._handles.clear()

    def url(self, key: str) -> str:
        return self.files.path(key)

    def io_counters(self) -> dict[str, int]:
        return {"chunk_files_read": self.chunk_files_read}

    def _forget(self, key: str) -> None:
        """Drop cached handles and metadata for ``key`` and below ('' for all)."""
        prefix = key.rstrip("/") + "/" if key else ""
        for d in (self._meta, self._handles, self._codecs):
            for k in [k for k in d if k == key or k.startswith(prefix)]:
                del d[k]
