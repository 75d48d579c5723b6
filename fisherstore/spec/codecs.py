"""Codec chains, kept apart from array logic.

Default: ``bytes`` (little endian) then ``crc32c``. Both are Zarr v3 spec codecs, so
zarr-python, TensorStore, Dask and xarray read the store. Compression is opt-in: the
measurement in ``docs/codecs.md`` shows that fp32 EMA state compresses only ~1.05-1.2x
while Blosc/zstd cost 1.5-2x in update time on this 2-core machine.

Lossy storage (``lossy_keepbits``) rounds the float32 mantissa with numcodecs'
BitRound *before* the array codecs run, so the data on disk is still plain float32 with
spec codecs only (TensorStore can read it), and bit-shuffled Blosc then compresses it
~2x. Each write has relative error at most ``2**-(keepbits+1)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError

__all__ = ["CodecSpec"]

COMPRESSIONS = (None, "blosc-lz4", "blosc-zstd", "zstd")


@dataclass(frozen=True)
class CodecSpec:
    """The codec chain of every array in a store.

    Args:
        compression: None (default), ``"blosc-lz4"``, ``"blosc-zstd"`` or ``"zstd"``.
        checksum: append a ``crc32c`` codec (default True), which turns silent corruption
            into a named error on read.
        lossy_keepbits: keep this many float32 mantissa bits (1..22) before writing; None
            for lossless. Implies ``compression="blosc-lz4"`` when compression is None.
    """

    compression: str | None = None
    checksum: bool = True
    lossy_keepbits: int | None = None

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise InvalidArgumentError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.lossy_keepbits is not None:
            k = self.lossy_keepbits
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 22:
                raise InvalidArgumentError(f"lossy_keepbits must be an int in 1..22 (float32 has 23), got {k!r}")
            if self.compression is None:
                object.__setattr__(self, "compression", "blosc-lz4")

    @property
    def max_relative_error(self) -> float:
        """Bound on the relative error of one write (0 when lossless)."""
        return 0.0 if self.lossy_keepbits is None else 2.0 ** -(self.lossy_keepbits + 1)

    # -- the chain, spelt once ---------------------------------------------------------
    def json_codecs(self) -> list[dict[str, Any]]:
        """The chain as Zarr v3 JSON: what zarr.json records, TensorStore takes, and zarr-python builds from."""
        codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if self.compression in ("blosc-lz4", "blosc-zstd"):
            cname = self.compression.split("-")[1]
            codecs.append(
                {
                    "name": "blosc",
                    "configuration": {
                        "cname": cname,
                        "clevel": 5 if cname == "lz4" else 1,
                        "shuffle": "bitshuffle",
                        "typesize": 4,
                        "blocksize": 0,
                    },
                }
            )
        elif self.compression == "zstd":
            codecs.append({"name": "zstd", "configuration": {"level": 1, "checksum": False}})
        if self.checksum:
            codecs.append({"name": "crc32c"})
        return codecs

    def zarr_codecs(self) -> dict[str, Any]:
        """Keyword arguments for ``zarr.create_array`` giving the same chain.

        zarr-python builds its codec objects from the JSON form itself, so the chain is
        spelt once (:meth:`json_codecs`): the serializer first, then the bytes-to-bytes
        codecs, no filters.
        """
        serializer, *compressors = self.json_codecs()
        return {"serializer": serializer, "compressors": compressors or None, "filters": None}

    def pre_encode(self, data: np.ndarray) -> np.ndarray:
        """Apply the lossy rounding (if any) to data about to be written."""
        if self.lossy_keepbits is None:
            return data
        from numcodecs import BitRound

        # BitRound works in place on a copy and hands back the bits as an int32 view:
        # reinterpret them (a cast would turn bit patterns into numbers).
        bits = BitRound(keepbits=self.lossy_keepbits).encode(np.array(data, dtype=np.float32, order="C"))
        return np.asarray(bits).view(np.float32).reshape(data.shape)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecSpec:
        """Inverse of :meth:`to_dict`. Keys a newer fisherstore may add are ignored (docs/format.md)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
