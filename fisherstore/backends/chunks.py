"""Decoding one chunk of the codec chains fisherstore writes, into exactly the chunk's bytes.

The chains (docs/format.md, docs/codecs.md) are Zarr v3 spec codecs: ``bytes`` (little
endian), optionally ``blosc`` or ``zstd``, optionally ``crc32c``. Decoding here, rather
than in an array library, lets the read path check everything a crafted or damaged chunk
could get wrong *before* it costs memory: the file is read up to a bound, the checksum
is checked, and a compressed chunk must declare exactly the chunk's size and decompress
into a buffer of that size. A decompression bomb is an error, never an allocation.
Chunks fisherstore writes itself (per-sample arrays, in any float dtype) are encoded here
too, with the same chain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import crc32c

__all__ = ["Chain", "parse_chain"]

_BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}
_ZSTD_MAGIC = 0xFD2FB528


@dataclass(frozen=True)
class Chain:
    """A chain this module encodes and decodes: an optional compressor, and whether a crc32c trails the data."""

    compressor: str | None  # None, "blosc" or "zstd"
    checksum: bool
    config: tuple[tuple[str, Any], ...] = ()  # the compressor's configuration, as the array's header has it

    def encode(self, raw: bytes | memoryview) -> bytes:
        """A chunk's stored bytes from its raw little-endian bytes (what :meth:`decode` undoes)."""
        data = bytes(raw) if self.compressor is None else _codec(self.compressor, dict(self.config)).encode(raw)
        if self.checksum:
            data = bytes(data) + crc32c.crc32c(data).to_bytes(4, "little")
        return bytes(data)

    def max_stored(self, nbytes: int) -> int:
        """The most bytes a chunk of ``nbytes`` can take on disk (compressors' worst case, plus the crc)."""
        slack = 0 if self.compressor is None else nbytes // 64 + 1024
        return nbytes + slack + (4 if self.checksum else 0)

    def crc_matches(self, data: memoryview | bytes, tail: bytes | bytearray) -> bool:
        """Whether ``tail`` is the crc32c of ``data`` (a chunk read in two parts, without a copy)."""
        return crc32c.crc32c(data) == int.from_bytes(tail, "little")

    def decode(self, stored: bytes | bytearray, nbytes: int) -> bytes | bytearray | memoryview:
        """The chunk's raw bytes (exactly ``nbytes``); ``ValueError`` says what is wrong."""
        data: Any = memoryview(stored)
        if self.checksum:
            if len(data) < 4:
                raise ValueError(f"{len(data)} bytes is too short to hold a crc32c")
            if not self.crc_matches(data[:-4], data[-4:]):
                raise ValueError("it failed its crc32c checksum")
            data = data[:-4]
        if self.compressor is None:
            if len(data) != nbytes:
                raise ValueError(f"it holds {len(data)} bytes, not the chunk's {nbytes} (truncated or padded)")
            return data
        declared = _declared_size(self.compressor, data)
        if declared != nbytes:
            raise ValueError(f"its {self.compressor} header declares {declared} bytes, not the chunk's {nbytes}")
        out = bytearray(nbytes)
        _codec(self.compressor).decode(data, out=out)
        return out


def parse_chain(codecs: Any) -> Chain | None:
    """The :class:`Chain` of an array's ``codecs`` JSON, or None for a chain this module does not decode."""
    if not isinstance(codecs, list) or not codecs or codecs[0] != _BYTES_LE:
        return None
    rest = list(codecs[1:])
    checksum = bool(rest) and rest[-1] == {"name": "crc32c"}
    if checksum:
        rest.pop()
    if not rest:
        return Chain(None, checksum)
    if len(rest) == 1 and isinstance(rest[0], dict) and rest[0].get("name") in ("blosc", "zstd"):
        conf = rest[0].get("configuration") or {}
        return Chain(rest[0]["name"], checksum, tuple(sorted(conf.items())) if isinstance(conf, dict) else ())
    return None


def _codec(name: str, config: dict[str, Any] | None = None) -> Any:
    # Decoding needs no configuration (blosc and zstd frames describe themselves); encoding
    # takes the array header's: Zarr v3 spells blosc's shuffle as a word, numcodecs as a number.
    from numcodecs import Blosc, Zstd

    c = config or {}
    if name == "zstd":
        return Zstd(level=c.get("level", 1))
    shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
    return Blosc(cname=c.get("cname", "lz4"), clevel=c.get("clevel", 5),
                 shuffle=shuffle.get(c.get("shuffle", "noshuffle"), Blosc.NOSHUFFLE), typesize=c.get("typesize", 4),
                 blocksize=c.get("blocksize", 0))


def _declared_size(compressor: str, data: memoryview) -> int | None:
    """The decompressed size a blosc or zstd frame declares in its header (None if it declares none)."""
    if compressor == "blosc":
        return struct.unpack_from("<I", data, 4)[0] if len(data) >= 16 else None
    # zstd frame header (RFC 8878 §3.1.1.1): magic, descriptor, [window], [dictionary id], [content size]
    if len(data) < 6 or struct.unpack_from("<I", data, 0)[0] != _ZSTD_MAGIC:
        return None
    desc = data[4]
    fcs_flag, single, did_flag = desc >> 6, (desc >> 5) & 1, desc & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(data) < pos + size:
        return None
    value = int.from_bytes(data[pos:pos + size], "little")
    return value + 256 if size == 2 else value
