"""In-memory backend: the baseline with the same API and no persistence."""

from __future__ import annotations

import copy
import errno
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..spec.codecs import CodecSpec
from ..spec.regions import Region, chunk_region, iter_grid, region_shape
from .base import CARRIERS, ArrayBackend

__all__ = ["RamBackend"]


class RamBackend(ArrayBackend):
    """Arrays are numpy arrays in a dict; nothing survives the process. Codecs do not apply.

    ``read_only`` refuses every mutation, as a read-only medium does (``PermissionError``).
    """

    name = "ram"
    persistent = False

    def __init__(self, location: str | None = None, *, read_only: bool = False) -> None:
        super().__init__(None, read_only=read_only)
        self._docs: dict[str, dict[str, Any]] = {}
        self._arrays: dict[str, np.ndarray] = {}

    def read_json(self, key: str) -> dict[str, Any] | None:
        doc = self._docs.get(key)
        return copy.deepcopy(doc) if doc is not None else None

    def write_json(self, key: str, doc: dict[str, Any], durable: bool = True) -> None:
        self._check_writable()
        self._docs[key] = copy.deepcopy(doc)

    def create_array(self, key: str, shape: Sequence[int], chunks: Sequence[int], attributes: dict[str, Any],
                     codecs: CodecSpec) -> None:
        self._check_writable()
        self._arrays[key] = np.zeros(tuple(shape), dtype=np.float32)
        self._docs[key + "/zarr.json"] = {"node_type": "array", "attributes": copy.deepcopy(attributes),
                                          "chunks": list(chunks)}

    def create_raw_array(self, key: str, shape: Sequence[int], chunks: Sequence[int], dtype: str,
                         attributes: dict[str, Any], codecs: list[dict[str, Any]]) -> None:
        self._check_writable()
        self.delete(key)
        self._arrays[key] = np.zeros(tuple(shape), dtype=CARRIERS[dtype])
        self._docs[key + "/zarr.json"] = {"node_type": "array", "attributes": copy.deepcopy(attributes),
                                          "chunks": list(chunks), "data_type": dtype}

    def write_chunk(self, key: str, coords: Sequence[int], data: np.ndarray) -> None:
        self._check_writable()
        a = self._arrays[key]
        region = chunk_region(coords, a.shape, self._docs[key + "/zarr.json"]["chunks"])
        a[region] = np.asarray(data, dtype=a.dtype).reshape(region_shape(region))

    def read_stored(self, key: str, region: Region) -> np.ndarray:
        return self._arrays[key][region].copy()

    def list_chunks(self, key: str) -> set[tuple[int, ...]]:
        a = self._arrays.get(key)
        doc = self._docs.get(key + "/zarr.json") or {}
        return set(iter_grid(a.shape, doc.get("chunks", a.shape))) if a is not None else set()

    def array_meta(self, key: str) -> dict[str, Any] | None:
        a = self._arrays.get(key)
        if a is None:
            return None
        doc = self._docs[key + "/zarr.json"]
        return {"data_type": doc.get("data_type", "float32"), "shape": a.shape, "chunks": tuple(doc["chunks"])}

    def read(self, key: str, region: Region) -> np.ndarray:
        return self._arrays[key][region].copy()

    def write(self, key: str, region: Region, data: np.ndarray) -> None:
        self._check_writable()
        self._arrays[key][region] = data

    def list(self, key: str) -> list[str]:
        prefix = key.rstrip("/") + "/" if key else ""
        names = set()
        for k in list(self._docs) + list(self._arrays):
            if k.startswith(prefix):
                head = k[len(prefix):].split("/", 1)[0]
                if head and head != "zarr.json":
                    names.add(head)
        return sorted(names)

    def delete(self, key: str) -> None:
        self._check_writable()
        prefix = key.rstrip("/") + "/"
        for d in (self._docs, self._arrays):
            for k in [k for k in d if k == key or k.startswith(prefix)]:
                del d[k]

    def nbytes(self, key: str = "", chunks_only: bool = False) -> int:
        prefix = key.rstrip("/") + "/" if key else ""
        return sum(a.nbytes for k, a in self._arrays.items() if k.startswith(prefix) or k == key)

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(errno.EROFS, "backend is read-only", "<ram>")
