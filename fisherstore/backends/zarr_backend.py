"""zarr-python v3 backend: LocalStore on a directory (atomic chunk writes by temp file and
rename), ObjectStore (obstore) on ``s3://`` (a PUT is atomic)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.storage import LocalStore

from ..spec.codecs import CodecSpec
from ..spec.regions import Region
from .dims import array_dimension_names
from .hierarchy import HierarchyBackend

__all__ = ["ZarrBackend"]


class ZarrBackend(HierarchyBackend):
    """Arrays through zarr-python's ``LocalStore``.

    Args:
        store_wrapper: optional callable wrapping the ``LocalStore`` (for instance
            ``zarr.storage.LoggingStore``) to observe or count every store call.
    """

    name = "zarr"

    def __init__(self, root: str | None, *, store_wrapper: Callable[[Store], Store] | None = None, **kw: Any) -> None:
        super().__init__(root, **kw)
        self._store_wrapper = store_wrapper
        self._zstore: Store | None = None

    @property
    def zstore(self) -> Store:
        if self._zstore is None:
            if not self.read_only:
                self.ensure_root()
            if self.files.kind == "s3":  # the same obstore client the medium uses
                from zarr.storage import ObjectStore

                st: Store = ObjectStore(self.files.store, read_only=self.read_only)
            else:
                st = LocalStore(self.location, read_only=self.read_only)
            self._zstore = self._store_wrapper(st) if self._store_wrapper else st
        return self._zstore

    def _create(self, key: str, shape: Sequence[int], chunks: Sequence[int], attributes: dict[str, Any],
                codecs: CodecSpec) -> zarr.Array:
        with self._lib_errors("create array", key, mutate=True):
            return self._create_lib(key, shape, chunks, attributes, codecs)

    def _create_lib(self, key: str, shape: Sequence[int], chunks: Sequence[int], attributes: dict[str, Any],
                    codecs: CodecSpec) -> zarr.Array:
        return zarr.create_array(
            store=self.zstore,
            name=key,
            shape=tuple(shape),
            chunks=tuple(chunks),
            dtype="float32",
            fill_value=0.0,
            attributes=attributes,
            dimension_names=array_dimension_names(len(shape), attributes),  # xarray opens only named arrays
            zarr_format=3,
            overwrite=True,
            # Every chunk gets a file, so a missing file is damage that verify can see,
            # never a silent zero.
            config={"write_empty_chunks": True},
            **codecs.zarr_codecs(),
        )

    def _open(self, key: str) -> zarr.Array:
        with self._lib_errors("open array", key):
            arr = zarr.open_array(store=self.zstore, path=key, mode="r" if self.read_only else "r+", zarr_format=3)
        return arr.with_config({"write_empty_chunks": True})

    def _read_lib(self, handle: zarr.Array, region: Region) -> np.ndarray:
        with self._lib_errors("GET", handle.path):
            return np.asarray(handle[region], dtype=np.float32)

    def _write_lib(self, handle: zarr.Array, region: Region, data: np.ndarray) -> None:
        with self._lib_errors("PUT", handle.path, mutate=True):
            handle[region] = data

    def close(self) -> None:
        super().close()
        if self._zstore is not None:
            self._zstore.close()
            self._zstore = None
