"""fisherstore: the full elementwise Fisher information of a large model, on disk.

Stream each parameter's grad² EMA into chunked Zarr arrays (one attention-head block per
chunk) and read back exactly the slice an analysis needs::

    import fisherstore
    with fisherstore.open("fisher.zarr", mode="a") as store:
        store.update("taskA", {"layers.0.q.weight": grad_sq}, tokens=512)
        q_head_5 = store.fisher("taskA", "layers.0.q.weight").head(5, "Q")
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os
from typing import Any

from .codecs import CodecSpec
from .dist import RankGroup
from .ema import check_state_dtype
from .errors import (
    CorruptChunkError,
    FisherStoreError,
    FormatVersionError,
    HeadIndexError,
    InvalidArgumentError,
    InvalidGradientError,
    LayoutError,
    NonFiniteGradientError,
    NotAFisherStoreError,
    PrecisionError,
    ReadOnlyError,
    RecoveryWarning,
    ShapeMismatchError,
    SliceError,
    StepError,
    StorageError,
    StoreLockedError,
    UnknownParamError,
    UnknownTaskError,
)
from .layout import ParamLayout


def open(  # noqa: A001 - the natural name, as zarr.open and h5py.File
    path: str | _os.PathLike[str] | None = None,
    mode: str = "a",
    backend: str = "zarr",
    *,
    decay: float = 0.99,
    dtype: Any = "float32",
    compression: str | None = None,
    checksum: bool = True,
    lossy_keepbits: int | None = None,
    nonfinite: str = "raise",
    memory_budget: int | None = None,
    flush_every: int | None = None,
    io_workers: int = 2,
    progress: bool | None = None,
    device_budget: int = 0,
    force: bool = False,
    group: RankGroup | None = None,
    **options: Any,
) -> FisherStore:
    """Open (or create) a Fisher store; also a context manager.

    Args:
        path: the store's directory (ignored, and may be None, for ``backend="ram"``).
        mode: ``"r"`` read only; ``"r+"`` read/write, must exist; ``"a"`` read/write,
            created if missing; ``"w"`` create, replacing an existing store.
        backend: ``"zarr"`` (zarr-python), ``"tensorstore"`` or ``"ram"`` (in memory).
        decay: default EMA β for new parameters.
        dtype: EMA state dtype; only float32 is accepted (fp16/bf16 are refused).
        compression / checksum / lossy_keepbits: codec chain of a new store (see
            :class:`~fisherstore.codecs.CodecSpec`); an existing store keeps its own.
        nonfinite: ``"raise"`` (default) or ``"skip"`` for NaN/Inf squared gradients.
        memory_budget: bytes of RAM the store may hold for accumulators and staging
            (default 1 GiB for disk backends).
        flush_every: flush automatically every N steps (default: on flush()/close()).
        io_workers: threads that read and write slabs in the background (default 2).
        progress: tqdm bar for flushes over a second: None (default) shows it on a TTY.
        device_budget: bytes of GPU memory for accumulators of parameters whose squared
            gradients arrive on a GPU (default 0: copy to pinned host memory instead).
        force: take over a stale writer lock whose process is gone (pidfile locks only;
            an ``flock`` lock is released by the kernel when its writer dies).
        group: a :class:`RankGroup` when several processes write this store together
            (``torch.distributed``); each rank then writes only the parameters it owns.
        **options: backend options, e.g. ``store_wrapper=`` for zarr.

    A second writer gets :class:`StoreLockedError` naming the holder's pid and host;
    readers (``mode="r"``) never lock.

    >>> with fisherstore.open("/tmp/f.zarr", mode="w") as s:  # doctest: +SKIP
    ...     s.create("t", "w", (4, 4))
    """
    from .backends import make_backend
    from .store import FisherStore

    check_state_dtype(dtype)
    if mode not in ("r", "r+", "a", "w"):
        raise InvalidArgumentError(f"mode must be 'r', 'r+', 'a' or 'w', got {mode!r}")
    codecs = CodecSpec(compression=compression, checksum=checksum, lossy_keepbits=lossy_keepbits)
    if backend != "ram":
        if path is None:
            raise InvalidArgumentError(f"backend {backend!r} needs a path; use backend='ram' for an in-memory store")
        path = _os.fspath(path)
        if mode in ("r", "r+") and not _os.path.isdir(path):
            raise NotAFisherStoreError(
                f"no fisherstore store at {path!r} (the directory does not exist). Check the path, "
                "or use mode='a' to create one."
            )
    if backend == "ram":
        path = None
    be = make_backend(backend, path, read_only=(mode == "r"), codecs=codecs, **options)
    try:
        return FisherStore(
            be,
            mode=mode,
            decay=decay,
            nonfinite=nonfinite,
            memory_budget=memory_budget,
            flush_every=flush_every,
            codecs=codecs,
            io_workers=io_workers,
            progress=progress,
            device_budget=device_budget,
            force=force,
            group=group,
        )
    except BaseException:
        be.close()
        raise


from .collector import FisherCollector  # noqa: E402
from .lazy import LazyFisher  # noqa: E402
from .models import layouts_from_model  # noqa: E402
from .store import FisherStore, StepWriter  # noqa: E402

__all__ = [
    "__version__",
    "open",
    "FisherStore",
    "StepWriter",
    "LazyFisher",
    "ParamLayout",
    "CodecSpec",
    "FisherCollector",
    "layouts_from_model",
    "FisherStoreError",
    "NotAFisherStoreError",
    "FormatVersionError",
    "ReadOnlyError",
    "UnknownTaskError",
    "UnknownParamError",
    "ShapeMismatchError",
    "InvalidGradientError",
    "NonFiniteGradientError",
    "HeadIndexError",
    "PrecisionError",
    "LayoutError",
    "StepError",
    "CorruptChunkError",
    "StorageError",
    "StoreLockedError",
    "InvalidArgumentError",
    "SliceError",
    "RecoveryWarning",
    "RankGroup",
]
