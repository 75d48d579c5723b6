"""Storage backends: documents and arrays on a medium, behind one small interface (:class:`ArrayBackend`).

==========================  ==============================================================
module                      job
==========================  ==============================================================
:mod:`.base`                the interfaces: :class:`ArrayBackend` over a ``Medium`` (bytes)
:mod:`.files`               a medium: a local directory (atomic replace, ``syncfs``, no links)
:mod:`.objects`             a medium: an ``s3://bucket/prefix`` (obstore)
:mod:`.hierarchy`           a Zarr v3 hierarchy on a medium, shared by the two below
:mod:`.zarr_backend`        arrays through zarr-python
:mod:`.tensorstore_backend` arrays through TensorStore
:mod:`.direct`              fisherstore's own region reader: each chunk bounded, checked, placed
:mod:`.chunks`              encoding and decoding one chunk of fisherstore's codec chains
:mod:`.dims`                the ``dimension_names`` every array header carries
:mod:`.ram`                 the in-memory baseline
==========================  ==============================================================

Every backend passes :class:`fisherstore.testing.BackendTests`. Usage:
``make_backend("zarr", location("s3://bucket/run"), read_only=True)``.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import InvalidArgumentError
from .base import ArrayBackend

BACKENDS = ("zarr", "tensorstore", "ram")


#: URL schemes a store can live at; a local path needs none.
SCHEMES = ("s3",)


def location(path: str | os.PathLike[str]) -> str:
    """A store's location: a local path, or an ``s3://bucket/prefix`` URL. Any other scheme is an error.

    ``fisherstore.open("gs://b/x")`` must never create a local directory named ``gs:``.
    """
    p = os.fspath(path)
    if not isinstance(p, str):
        raise InvalidArgumentError(f"a store's path must be a string or path-like, got {type(path).__name__}")
    scheme, sep, rest = p.partition("://")
    if not sep:
        return p
    if scheme == "file":
        return rest
    if scheme.lower() not in SCHEMES:
        raise InvalidArgumentError(
            f"{p!r} has the URL scheme {scheme!r}, which fisherstore cannot store on; use a local path or "
            "s3://bucket/prefix (S3-compatible object storage)"
        )
    if not rest.split("/", 1)[0]:
        raise InvalidArgumentError(f"{p!r} names no bucket; write s3://bucket/prefix")
    return f"{scheme.lower()}://{rest}"


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


__all__ = ["ArrayBackend", "BACKENDS", "SCHEMES", "location", "make_backend"]
