"""The storage interfaces: an :class:`ArrayBackend` (documents and arrays) over a :class:`Medium` (bytes).

Modelled on zarr-python's abstract ``Store`` and torch.distributed.checkpoint's
``StorageWriter``: the layers above decide *what* to write (EMA folding, generations,
commits); a backend only knows how to create, read, write, list, delete and sync on its
medium, and how much room is left there. Backends know nothing of models, heads, locks or
EMA maths.

Two levels, each an interface here with its implementations beside it:

* :class:`Medium`: bytes by key, with what the commit protocol needs (an atomic replace,
  listings, a durable sync, free space). :class:`~.files.LocalFiles` is a directory,
  :class:`~.objects.ObjectFiles` an ``s3://`` prefix.
* :class:`ArrayBackend`: JSON documents and float arrays by key. The RAM baseline
  (:mod:`.ram`) needs no medium; :class:`~.hierarchy.HierarchyBackend` keeps a Zarr v3
  hierarchy on a medium, through zarr-python (:mod:`.zarr_backend`) or TensorStore
  (:mod:`.tensorstore_backend`).

Every backend passes the same conformance suite, :class:`fisherstore.testing.BackendTests`.

Keys are ``/``-separated paths relative to the store's location; regions are tuples of
slices with positive steps (:mod:`fisherstore.spec.regions`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from ..spec.codecs import CodecSpec
from ..spec.regions import Region
from .dims import array_dimension_names

__all__ = ["ArrayBackend", "Medium", "CARRIERS", "raw_array_doc"]

T = TypeVar("T")

#: How each element type fisherstore writes itself is held in numpy (bfloat16 by its bits).
CARRIERS = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


def raw_array_doc(shape: Sequence[int], chunks: Sequence[int], dtype: str, attributes: dict[str, Any],
                  codecs: list[dict[str, Any]]) -> dict[str, Any]:
    """The Zarr v3 header of an array whose chunks fisherstore writes itself (any float dtype)."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0,
        "codecs": codecs,
        "attributes": attributes,
        "dimension_names": list(array_dimension_names(len(shape), attributes)),  # xarray opens only named arrays
        "storage_transformers": [],
    }


class Medium(Protocol):
    """Bytes by key on a medium: what :class:`~.hierarchy.HierarchyBackend` and the writer lock need of one.

    Keys are ``/``-separated paths relative to :attr:`root`; a key that would leave it is
    refused. :class:`~.files.LocalFiles` (a directory, ``kind = "file"``) and
    :class:`~.objects.ObjectFiles` (``s3://``, ``kind = "s3"``) implement it; a local
    directory also reads straight into buffers (``read_into``), which the direct reader
    uses where it exists.
    """

    kind: str
    root: str
    read_only: bool

    def path(self, key: str) -> str:
        """The medium's own name for ``key`` (a file path, an object key)."""

    def url_of(self, key: str) -> str:
        """Where ``key`` lives, for messages."""

    def get(self, key: str, limit: int = ...) -> bytes | None:
        """The whole value at ``key`` (at most ``limit`` bytes, else damage), or None if absent."""

    def read_bounded(self, key: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of ``key`` in one read, or None if absent."""

    def put(self, key: str, data: bytes, durable: bool = True) -> None:
        """Replace ``key`` atomically: a reader sees the old value or the new one, whole."""

    def write(self, key: str, data: bytes) -> None:
        """Write ``key`` without a sync (chunks no commit names yet; the flush syncs them)."""

    def create(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if absent; False if it exists (the writer lock)."""

    def exists(self, key: str) -> bool: ...

    def version(self, key: str) -> Any:
        """A token that changes when ``key`` is replaced (None if absent)."""

    def list_dirs(self, key: str) -> list[str]:
        """Names of the child nodes directly under ``key``."""

    def entries(self, key: str) -> list[str]:
        """Names of everything directly under ``key``."""

    def list_files(self, key: str) -> list[str]:
        """Keys (relative to ``key``) of every value below ``key``."""

    def delete(self, key: str) -> None:
        """Remove ``key`` and everything below it (no error if absent)."""

    def ensure(self) -> None:
        """Make the root exist (a directory; nothing on object storage)."""

    def is_dir(self) -> bool: ...

    def visible_names(self) -> list[str]:
        """Names at the root that do not start with a dot."""

    def check_no_links(self, key: str) -> None:
        """Refuse a key any of whose directories is a link (nothing to check on object storage)."""

    def size(self, key: str = "", chunks_only: bool = False) -> int:
        """Bytes below ``key`` (only chunk data with ``chunks_only``)."""

    def free_bytes(self) -> int | None: ...

    def temp_files(self, depth: int = 3) -> list[str]:
        """Keys of the temp files interrupted replaces left."""

    def sync(self) -> None:
        """Make everything written so far durable."""

    def check_writable(self) -> None:
        """Raise ``PermissionError`` on a read-only medium."""


class ArrayBackend(abc.ABC):
    """Where a store's documents and arrays live.

    Call order (which callers make each call): the store's writer creates and writes
    arrays and documents, syncs once per flush, then writes a manifest (the commit);
    readers only read. In a rank group every rank writes the generation arrays of the
    parameters it owns, and only the leader (rank 0) writes documents.

    Args:
        location: the medium's address (a directory or ``s3://`` prefix; None in RAM).
        read_only: refuse every mutation.
    """

    #: The name ``fisherstore.open(backend=...)`` knows this backend by.
    name: ClassVar[str]
    #: Whether data survives the process.
    persistent: ClassVar[bool]

    def __init__(self, location: str | None, *, read_only: bool) -> None:
        self.location = location
        self.read_only = read_only
        #: The medium's bytes-by-key store (:mod:`.files`, :mod:`.objects`); None in RAM.
        self.medium: Medium | None = None

    # -- documents ----------------------------------------------------------------------
    @abc.abstractmethod
    def read_json(self, key: str) -> dict[str, Any] | None:
        """The JSON document at ``key`` (e.g. ``"task/zarr.json"``), or None if absent."""

    def read_parsed(self, key: str, parse: Callable[[dict[str, Any] | None], T], kind: Hashable) -> T:
        """``parse(self.read_json(key))``; a backend on a medium parses the same bytes once per process.

        ``parse`` must depend only on the document and on ``kind`` (say what it makes, and
        from which key: ``("manifest", task, key)``), and its result must never be mutated:
        a later read of identical bytes gets the same object.
        """
        return parse(self.read_json(key))

    @abc.abstractmethod
    def write_json(self, key: str, doc: dict[str, Any], durable: bool = True) -> None:
        """Atomically replace the document at ``key``; durably unless ``durable=False`` (then :meth:`sync` does)."""

    # -- arrays -------------------------------------------------------------------------
    @abc.abstractmethod
    def create_array(
        self, key: str, shape: Sequence[int], chunks: Sequence[int], attributes: dict[str, Any], codecs: CodecSpec
    ) -> None:
        """Create (or replace) a float32 array filled with 0, encoded with ``codecs``."""

    @abc.abstractmethod
    def read(self, key: str, region: Region) -> np.ndarray:
        """Read ``region`` of the array at ``key`` as a float32 ndarray."""

    @abc.abstractmethod
    def write(self, key: str, region: Region, data: np.ndarray) -> None:
        """Write ``data`` (float32, region-shaped) into ``region`` of an array this backend created."""

    def set_attributes(self, key: str, attributes: dict[str, Any]) -> None:
        """Replace the attributes in the header of the array at ``key`` (not durably: a hint, synced later)."""
        doc = self.read_json(f"{key}/zarr.json")
        if doc is not None:
            doc["attributes"] = attributes
            self.write_json(f"{key}/zarr.json", doc, durable=False)

    # -- arrays whose chunks fisherstore writes itself (per-sample gradients) ------------------
    @abc.abstractmethod
    def create_raw_array(self, key: str, shape: Sequence[int], chunks: Sequence[int], dtype: str,
                         attributes: dict[str, Any], codecs: list[dict[str, Any]]) -> None:
        """Create (or replace) an array of ``dtype`` (a :data:`CARRIERS` key) written chunk by chunk."""

    @abc.abstractmethod
    def write_chunk(self, key: str, coords: Sequence[int], data: np.ndarray) -> None:
        """Write one whole chunk of an array made by :meth:`create_raw_array` (synced by the next :meth:`sync`)."""

    @abc.abstractmethod
    def read_stored(self, key: str, region: Region) -> np.ndarray:
        """``region`` of an array made by :meth:`create_raw_array`, in its :data:`CARRIERS` dtype."""

    def list_chunks(self, key: str) -> set[tuple[int, ...]]:
        """Grid coordinates of the chunks stored for the array at ``key``."""
        return set()

    def array_meta(self, key: str) -> dict[str, Any] | None:
        """``{"data_type", "shape", "chunks"}`` from the header of the array at ``key`` (None if absent)."""
        return None

    # -- tree ---------------------------------------------------------------------------
    @abc.abstractmethod
    def list(self, key: str) -> list[str]:
        """Names of the child nodes under ``key`` ('' is the root); [] if absent."""

    def is_temp(self, name: str) -> bool:
        """Whether ``name`` is the temp file of an interrupted document write."""
        return False

    def entries(self, key: str) -> list[str]:
        """Names of everything directly under ``key``: child nodes, documents and other files."""
        return self.list(key)

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the node at ``key`` and everything below it (no error if absent)."""

    def version(self, key: str) -> Any:
        """A token that changes when the document at ``key`` is replaced (None if absent or untracked)."""
        return None

    def exists(self) -> bool:
        """Whether the store's root document exists."""
        return self.read_json("zarr.json") is not None

    def ensure_root(self) -> None:  # noqa: B027 - nothing to create without a medium
        """Create the store's location (a directory) if it is missing."""

    def holds_other_files(self) -> bool:
        """Whether the location holds visible entries although no store is there."""
        return False

    # -- capacity and durability ------------------------------------------------------------
    def nbytes(self, key: str = "", chunks_only: bool = False) -> int:
        """Bytes stored under ``key`` (only chunk data with ``chunks_only``; 0 without a disk)."""
        return 0

    def free_bytes(self) -> int | None:
        """Bytes left on the medium (None when unknown or unbounded)."""
        return None

    def temp_files(self) -> list[str]:
        """Keys of the temp files that interrupted document writes left."""
        return []

    def sync(self) -> None:  # noqa: B027 - a no-op is right for non-persistent backends
        """Make everything written so far durable."""

    def close(self) -> None:  # noqa: B027
        """Release handles. The backend is not used afterwards."""

    def url(self, key: str) -> str:
        """Where ``key`` lives, for messages (a path on disk)."""
        return f"<{self.name}>/{key}"

    def io_counters(self) -> dict[str, int]:
        """Counters of the I/O done so far (e.g. ``chunk_files_read``)."""
        return {}

    def __repr__(self) -> str:
        mode = "r" if self.read_only else "rw"
        return f"<{type(self).__name__} {self.location!r} ({mode})>"
