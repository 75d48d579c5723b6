"""The storage interface: JSON documents and float32 arrays under string keys.

Modelled on zarr-python's abstract ``Store`` and torch.distributed.checkpoint's
``StorageWriter``: the store layer decides *what* to write (EMA folding, generations,
commits); a backend only knows how to create, read, write, delete and sync. Backends
know nothing of models, heads or EMA maths.

Keys are ``/``-separated paths relative to the store root; regions are tuples of slices
with positive steps.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..codecs import CodecSpec

Region = tuple[slice, ...]


class ArrayBackend(abc.ABC):
    """Where a store's documents and arrays live."""

    #: The name ``fisherstore.open(backend=...)`` knows this backend by.
    name: ClassVar[str]
    #: Whether data survives the process.
    persistent: ClassVar[bool]

    def __init__(self, root: str | None, *, read_only: bool, codecs: CodecSpec) -> None:
        self.root = root
        self.read_only = read_only
        self.codecs = codecs

    # -- documents ----------------------------------------------------------------------
    @abc.abstractmethod
    def read_json(self, key: str) -> dict[str, Any] | None:
        """The JSON document at ``key`` (e.g. ``"task/zarr.json"``), or None if absent."""

    @abc.abstractmethod
    def write_json(self, key: str, doc: dict[str, Any]) -> None:
        """Atomically and durably replace the document at ``key``."""

    # -- arrays -------------------------------------------------------------------------
    @abc.abstractmethod
    def create_array(
        self, key: str, shape: Sequence[int], chunks: Sequence[int], attributes: dict[str, Any]
    ) -> None:
        """Create (or replace) a float32 array filled with 0."""

    @abc.abstractmethod
    def read(self, key: str, region: Region) -> np.ndarray:
        """Read ``region`` of the array at ``key`` as a float32 ndarray."""

    @abc.abstractmethod
    def write(self, key: str, region: Region, data: np.ndarray) -> None:
        """Write ``data`` (float32, region-shaped) into ``region`` of the array at ``key``."""

    # -- tree ---------------------------------------------------------------------------
    @abc.abstractmethod
    def list(self, key: str) -> list[str]:
        """Names of the child nodes under ``key`` ('' is the root); [] if absent."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the node at ``key`` and everything below it (no error if absent)."""

    def clear(self) -> None:
        """Remove everything in the store (used by ``mode="w"``)."""
        for child in self.list(""):
            self.delete(child)
        self.delete("zarr.json")

    def exists(self) -> bool:
        """Whether the store root holds anything."""
        return self.read_json("zarr.json") is not None

    def nbytes(self, key: str = "", chunks_only: bool = False) -> int:
        """Bytes stored under ``key`` (only chunk data with ``chunks_only``; 0 without a disk)."""
        return 0

    def remove_temp_files(self) -> None:  # noqa: B027 - nothing to remove without a disk
        """Delete the temp files of document writes a crash interrupted (writer only)."""

    def sync(self) -> None:  # noqa: B027 - a no-op is right for non-persistent backends
        """Make everything written so far durable."""

    def close(self) -> None:  # noqa: B027
        """Release handles. The backend is not used afterwards."""

    def __repr__(self) -> str:
        mode = "r" if self.read_only else "rw"
        return f"<{type(self).__name__} {self.root!r} ({mode})>"


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(len(range(s.start, s.stop, s.step or 1)) for s in region)
