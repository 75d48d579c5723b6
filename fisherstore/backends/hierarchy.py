"""A Zarr v3 hierarchy on a medium (a local directory or an ``s3://`` prefix): what the zarr and TensorStore backends share.

zarr-python and TensorStore write the same Zarr v3 files. Documents, the tree and the
commit protocol's durability go through the store's :class:`~.base.Medium`
(:class:`~.files.LocalFiles` or :class:`~.objects.ObjectFiles`), so both backends commit
identically on both media; only array creation and writes differ.

Reads of arrays in the chains fisherstore writes (``bytes``, optionally ``blosc`` or
``zstd``, optionally ``crc32c``) go straight to the chunk files: read up to a bound, check
the CRC, decompress into exactly the chunk's size, ``frombuffer`` (:mod:`.chunks`). That
skips ~3 ms of library machinery per head-block read and turns a crafted chunk into an
error. ``direct_reads=False`` reads through the array library, trusting its decoders.
"""

from __future__ import annotations

import abc
import contextlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np

from ..errors import CorruptStoreError, InvalidArgumentError
from ..spec.codecs import CodecSpec
from ..spec.format import DOC, chunk_key, doc_key
from ..spec.regions import Region, chunk_coords
from .base import CARRIERS, ArrayBackend, Medium, raw_array_doc
from .chunks import Chain, parse_chain
from .direct import read_region
from .files import TEMP_SUFFIX, LocalFiles, check_regular

__all__ = ["HierarchyBackend", "open_medium", "ParsedDocs"]

T = TypeVar("T")


class ParsedDocs:
    """What documents parsed into, by their exact bytes: a bounded, thread-safe LRU, one per process.

    Opening a store parses its task manifests (~0.5 µs per byte: ~1 ms for a manifest of 128
    parameters); a reader that opens the store again, or reloads a task no writer changed,
    reads the same bytes and gets the parse it made before. Keyed by the bytes themselves
    (never by a file's mtime or inode, which a quick replace can repeat), so a hit is always
    what parsing would give. At most ``entries`` documents and ``max_bytes`` of them.
    """

    def __init__(self, entries: int = 64, max_bytes: int = 32 << 20) -> None:
        self.entries, self.max_bytes = entries, max_bytes
        self._d: OrderedDict[tuple[Hashable, bytes], Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, kind: Hashable, raw: bytes, make: Callable[[], T]) -> T:
        k = (kind, raw)
        with self._lock:
            if k in self._d:
                self._d.move_to_end(k)
                return self._d[k]
        value = make()  # outside the lock: parsing may be slow, and may raise (nothing is kept then)
        if len(raw) <= self.max_bytes // 4:
            with self._lock:
                if k not in self._d:
                    self._d[k] = value
                    self._bytes += len(raw)
                while len(self._d) > self.entries or self._bytes > self.max_bytes:
                    (_, old), _ = self._d.popitem(last=False)
                    self._bytes -= len(old)
        return value

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0


#: The process's parsed documents (task manifests; see :meth:`HierarchyBackend.read_parsed`).
PARSED = ParsedDocs()


def open_medium(root: str, *, read_only: bool, storage_options: dict[str, Any] | None = None) -> Medium:
    """The medium at ``root``: an ``s3://bucket/prefix`` (``storage_options`` over the ``AWS_*`` variables), or a directory."""
    if root.startswith("s3://"):
        from .objects import ObjectFiles  # obstore is the s3 extra: imported only for s3:// stores

        return ObjectFiles(root, read_only=read_only, storage_options=storage_options)
    if storage_options:
        raise InvalidArgumentError("storage_options= is for s3:// locations; a local path takes none")
    return LocalFiles(root, read_only=read_only)


class HierarchyBackend(ArrayBackend):
    """Base of the backends that keep a Zarr v3 hierarchy on a medium (a directory, or ``s3://``).

    Subclasses say how an array library creates, opens, reads and writes arrays; this
    class keeps the library's open handles (one per array key) and forgets them when a
    key is deleted.
    """

    persistent = True

    def __init__(self, root: str | None, *, read_only: bool, direct_reads: bool = True,
                 storage_options: dict[str, Any] | None = None) -> None:
        if root is None:
            raise ValueError(f"backend {self.name!r} needs a path")
        self.files: Medium = open_medium(root, read_only=read_only, storage_options=storage_options)
        super().__init__(self.files.root, read_only=read_only)
        self.medium = self.files
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

    def _lib_errors(self, op: str, key: str, mutate: bool = False) -> contextlib.AbstractContextManager[None]:
        """Where an array library talks to the medium itself: on ``s3://`` its failures become
        :class:`~fisherstore.errors.StorageError` (and a mutation first checks the writer's lease).

        Usage: ``with self._lib_errors("PUT", key, mutate=True): handle[region] = data``.
        """
        errors = getattr(self.files, "errors", None)
        return errors(op, key, mutate) if errors is not None else contextlib.nullcontext()

    # -- arrays -------------------------------------------------------------------------------
    def create_array(self, key: str, shape: Sequence[int], chunks: Sequence[int], attributes: dict[str, Any],
                     codecs: CodecSpec) -> None:
        self.files.check_writable()
        self.files.check_no_links(key)
        self._forget(key)
        self._handles[key] = self._create(key, shape, chunks, attributes, codecs)
        self._codecs[key] = codecs

    def _handle(self, key: str) -> Any:
        h = self._handles.get(key)
        if h is None:
            h = self._handles[key] = self._open(key)
        return h

    def read(self, key: str, region: Region) -> np.ndarray:
        local = self.files.kind == "file"
        meta = self.array_meta(key) if self.direct_reads or local else None
        chain = meta.get("chain") if meta and self.direct_reads else None
        if chain is None or meta["data_type"] != "float32" or any((s.step or 1) != 1 for s in region):
            if local and meta is not None and meta["default_keys"]:
                # The library opens chunk files blocking and unchecked: a FIFO would hang it (files.check_regular).
                base = self.files.path(key)
                check_regular(f"{base}/{chunk_key(c)}" for c in chunk_coords(region, meta["chunks"]))
            return self._read_lib(self._handle(key), region)
        return self._read_direct(key, meta, chain, region)

    def create_raw_array(self, key: str, shape: Sequence[int], chunks: Sequence[int], dtype: str,
                         attributes: dict[str, Any], codecs: list[dict[str, Any]]) -> None:
        self.files.check_writable()
        self.files.check_no_links(key)
        self._forget(key)
        self.files.delete(key)
        self.write_json(doc_key(key), raw_array_doc(shape, chunks, dtype, attributes, codecs), durable=False)

    def write_chunk(self, key: str, coords: Sequence[int], data: np.ndarray) -> None:
        meta = self.array_meta(key)
        if meta is None or meta.get("chain") is None:
            raise CorruptStoreError(f"array {key!r} has no header fisherstore can write chunks for")
        raw = np.ascontiguousarray(data, dtype=CARRIERS[meta["data_type"]])
        self.files.write(f"{key}/{chunk_key(coords)}", meta["chain"].encode(raw.data))

    def read_stored(self, key: str, region: Region) -> np.ndarray:
        meta = self.array_meta(key)
        if meta is None or meta.get("chain") is None or meta["data_type"] not in CARRIERS:
            raise CorruptStoreError(f"array {key!r} is not one fisherstore wrote (header {meta!r})")
        return self._read_direct(key, meta, meta["chain"], region)

    def write(self, key: str, region: Region, data: np.ndarray) -> None:
        self.files.check_writable()
        codecs = self._codecs.get(key)
        self._write_lib(self._handle(key), region, codecs.pre_encode(data) if codecs else data)

    def list_chunks(self, key: str) -> set[tuple[int, ...]]:
        rels = self.files.list_files(f"{key}/c")
        if rels == [""]:
            return {()}  # a 0-d array's one chunk is the file "c" itself
        return {tuple(int(p) for p in rel.split("/")) for rel in rels if all(p.isdigit() for p in rel.split("/"))}

    def array_meta(self, key: str) -> dict[str, Any] | None:
        """Data type, shape and chunk shape of the array at ``key`` from its header (None if absent)."""
        if key not in self._meta:
            self.files.check_no_links(key)  # once per array: its chunks are then opened with O_NOFOLLOW
            doc = self.read_json(doc_key(key))
            meta = None
            if doc is not None and doc.get("node_type") == "array":
                grid = (doc.get("chunk_grid") or {}).get("configuration") or {}
                enc = doc.get("chunk_key_encoding") or {}
                default_keys = enc.get("name") == "default" and (enc.get("configuration") or {}).get("separator",
                                                                                                     "/") == "/"
                meta = {"data_type": doc.get("data_type"), "shape": tuple(doc.get("shape") or ()),
                        "chunks": tuple(grid.get("chunk_shape") or ()), "default_keys": default_keys,
                        "chain": parse_chain(doc.get("codecs")) if default_keys else None}
            self._meta[key] = meta
        return self._meta[key]

    def _read_direct(self, key: str, meta: dict[str, Any], chain: Chain, region: Region) -> np.ndarray:
        self.chunk_files_read += len(chunk_coords(region, meta["chunks"]))
        return read_region(self.files, key, meta["chunks"], np.dtype(CARRIERS[meta["data_type"]]), chain, region)

    # -- documents and tree ---------------------------------------------------------------------
    def read_json(self, key: str) -> dict[str, Any] | None:
        raw = self.files.get(key)
        return None if raw is None else self._decode(key, raw)

    def read_parsed(self, key: str, parse: Callable[[dict[str, Any] | None], T], kind: Hashable) -> T:
        raw = self.files.get(key)
        if raw is None:
            return parse(None)
        return PARSED.get(kind, raw, lambda: parse(self._decode(key, raw)))

    def _decode(self, key: str, raw: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CorruptStoreError(
                f"metadata document {self.files.path(key)!r} is not valid JSON ({type(e).__name__}: {e}); the "
                "store is damaged. Run `fisherstore verify` on it."
            ) from None
        if not isinstance(doc, dict):
            raise CorruptStoreError(
                f"metadata document {self.files.path(key)!r} holds a JSON {type(doc).__name__}, not an object; "
                "the store is damaged. Run `fisherstore verify` on it."
            )
        return doc

    def write_json(self, key: str, doc: dict[str, Any], durable: bool = True) -> None:
        self.files.put(key, json.dumps(doc, indent=1, allow_nan=False).encode(), durable)

    def list(self, key: str) -> list[str]:
        return self.files.list_dirs(key)

    def entries(self, key: str) -> list[str]:
        return self.files.entries(key)

    def is_temp(self, name: str) -> bool:
        return name.startswith(".") and name.endswith(TEMP_SUFFIX)

    def delete(self, key: str) -> None:
        self.files.check_writable()
        self._forget(key)
        self.files.delete(key)

    def exists(self) -> bool:
        return self.files.exists(DOC)

    def version(self, key: str) -> Any:
        return self.files.version(key)

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

    def sync(self) -> None:
        self.files.sync()

    def close(self) -> None:
        self._handles.clear()

    def url(self, key: str) -> str:
        return self.files.url_of(key)

    def io_counters(self) -> dict[str, int]:
        return {"chunk_files_read": self.chunk_files_read}

    def _forget(self, key: str) -> None:
        """Drop cached handles and metadata for ``key`` and below ('' for all)."""
        prefix = key.rstrip("/") + "/" if key else ""
        for d in (self._meta, self._handles, self._codecs):
            for k in [k for k in d if k == key or k.startswith(prefix)]:
                del d[k]
