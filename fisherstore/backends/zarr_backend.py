"""zarr-python v3 backend (LocalStore): atomic chunk writes by temp file and rename."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.storage import LocalStore

from .base import Region
from .localfs import LocalFSBackend


class ZarrBackend(LocalFSBackend):
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
        self._arrays: dict[str, zarr.Array] = {}

    @property
    def zstore(self) -> Store:
        if self._zstore is None:
            if not self.read_only:
                self.ensure_root()
            st: Store = LocalStore(self.root, read_only=self.read_only)
            self._zstore = self._store_wrapper(st) if self._store_wrapper else st
        return self._zstore

    def create_array(self, key: str, shape: Sequence[int], chunks: Sequence[int], attributes: dict[str, Any]) -> None:
        self._check_writable()
        self._forget(key)
        self._arrays[key] = zarr.create_array(
            store=self.zstore,
            name=key,
            shape=tuple(shape),
            chunks=tuple(chunks),
            dtype="float32",
            fill_value=0.0,
            attributes=attributes,
            zarr_format=3,
            overwrite=True,
            # Every chunk gets a file, so a missing file is damage that verify can see,
            # never a silent zero.
            config={"write_empty_chunks": True},
            **self.codecs.zarr_codecs(),
        )

    def _array(self, key: str) -> zarr.Array:
        arr = self._arrays.get(key)
        if arr is None:
            arr = zarr.open_array(store=self.zstore, path=key, mode="r" if self.read_only else "r+", zarr_format=3)
            arr = arr.with_config({"write_empty_chunks": True})
            self._arrays[key] = arr
        return arr

    def _read_lib(self, key: str, region: Region) -> np.ndarray:
        return np.asarray(self._array(key)[region], dtype=np.float32)

    def write(self, key: str, region: Region, data: np.ndarray) -> None:
        self._check_writable()
        self._array(key)[region] = self.codecs.pre_encode(data)

    def _forget(self, key: str) -> None:
        super()._forget(key)
        prefix = key.rstrip("/") + "/" if key else ""
        for k in [k for k in self._arrays if k == key or k.startswith(prefix)]:
            del self._arrays[k]

    def close(self) -> None:
        self._arrays.clear()
        if self._zstore is not None:
            self._zstore.close()
            self._zstore = None
