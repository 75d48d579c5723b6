"""Storage backends behind one small interface (:class:`ArrayBackend`)."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgumentError
from .base import ArrayBackend

BACKENDS = ("zarr", "tensorstore", "ram")


def make_backend(name: str, location: str | None, *, read_only: bool, **options: Any) -> ArrayBackend:
    """Instantiate the backend called ``name`` (one of :data:`BACKENDS`) at ``location``."""
    if name == "zarr":
        from .zarr_backend import ZarrBackend as cls
    elif name == "tensorstore":
        from .tensorstore_backend import TensorStoreBackend as cls
    elif name == "ram":
        from .ram import RamBackend as cls
    else:
        raise InvalidArgumentError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return cls(location, read_only=read_only, **options)


__all__ = ["ArrayBackend", "BACKENDS", "make_backend"]
