"""``fisherstore.open``: pick a backend, check the arguments, open a :class:`~fisherstore.store.FisherStore`."""

from __future__ import annotations

import os
from typing import Any

from ..backends import location, make_backend
from ..engine.options import StoreOptions
from ..errors import InvalidArgumentError, NotAFisherStoreError
from ..spec.codecs import CodecSpec
from ..spec.ema import check_state_dtype
from .facade import FisherStore

__all__ = ["open"]

def open(  # noqa: A001 - the natural name, as zarr.open and h5py.File
    path: str | os.PathLike[str] | None = None,
    mode: str = "a",
    backend: str = "zarr",
    *,
    dtype: Any = "float32",
    compression: str | None = None,
    checksum: bool = True,
    lossy_keepbits: int | None = None,
    **options: Any,
) -> FisherStore:
    """Open (or create) a Fisher store; also a context manager.

    Args:
        path: the store's directory, or ``s3://bucket/prefix`` (ignored, and may be None,
            for ``backend="ram"``).
        mode: ``"r"`` read only; ``"r+"`` read/write, must exist; ``"a"`` read/write,
            created if missing; ``"w"`` create, replacing an existing store.
        backend: ``"zarr"`` (zarr-python), ``"tensorstore"`` or ``"ram"`` (in memory).
        dtype: EMA state dtype; only float32 is accepted (fp16/bf16 are refused).
        compression / checksum / lossy_keepbits: codec chain of a new store (see
            :class:`~fisherstore.spec.codecs.CodecSpec`); an existing store keeps its own.
        **options: the store's options (:class:`~fisherstore.engine.options.StoreOptions`:
            ``decay``, ``nonfinite``, ``memory_budget``, ``flush_every``, ``io_workers``,
            ``progress``, ``device_budget``, ``force``, ``group``), and the backend's
            (e.g. ``store_wrapper=`` for zarr, ``direct_reads=False``, and for ``s3://``
            locations ``storage_options={"endpoint": ..., "region": ...}`` over the
            ``AWS_*`` environment variables).

    A second writer gets :class:`StoreLockedError` naming the holder's pid and host;
    readers (``mode="r"``) never lock.

    >>> with fisherstore.open("/tmp/f.zarr", mode="w") as s:  # doctest: +SKIP
    ...     s.create("t", "w", (4, 4))
    """
    check_state_dtype(dtype)
    store_kw, backend_kw = StoreOptions.split(options)
    opts = StoreOptions(mode=mode, codecs=CodecSpec(compression=compression, checksum=checksum,
                                                    lossy_keepbits=lossy_keepbits), **store_kw)
    if backend == "ram":
        path = None
    else:
        if path is None:
            raise InvalidArgumentError(f"backend {backend!r} needs a path; use backend='ram' for an in-memory store")
        path = location(path)
        if "://" not in path and mode in ("r", "r+"):
            if not os.path.exists(path):
                raise NotAFisherStoreError(
                    f"no fisherstore store at {path!r} (the directory does not exist). Check the path, or open "
                    "it with mode='a' to create a store there."
                )
            if not os.path.isdir(path):
                raise NotAFisherStoreError(f"{path!r} is a file, not a fisherstore store (a store is a directory)")
    be = make_backend(backend, path, read_only=(mode == "r"), **backend_kw)
    try:
        return FisherStore(be, opts)
    except BaseException:
        be.close()
        raise
