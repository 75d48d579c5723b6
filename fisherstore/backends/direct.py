"""Reading a region straight from chunk files: fetch, bound, check and place each chunk.

This is fisherstore's own read path for the chains it can decode (:mod:`.chunks`): every
chunk file is read up to its bound, its crc32c checked, and its bytes placed in the
output, so a damaged or crafted chunk is a :class:`ChunkError` naming it, never a
plausible value. The chunks of one read are fetched on a small pool of threads, and a
whole uncompressed chunk whose place in the output is contiguous is read there directly
(``preadv``, no copy). The files object is a :class:`~.files.LocalFiles` or an
:class:`~.objects.ObjectFiles`; only the former can read into a buffer.

Usage::

    a = read_region(files, "t/w/g00000001", chunks=(128, 4096), carrier=np.dtype("float32"),
                    chain=Chain(None, True), region=(slice(0, 128), slice(0, 4096)))
"""

from __future__ import annotations

import errno
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import ChunkError
from ..spec.format import chunk_key
from ..spec.regions import Region, chunk_coords, chunk_overlap, region_shape
from .chunks import Chain

__all__ = ["read_region", "chunk_pool", "CHUNK_READERS"]

#: Threads that fetch and decode the chunks of one multi-chunk read. A head-block read of
#: every sample is dozens of 1-2 MiB chunk files (GETs on S3); reading them one after the
#: other leaves the disk idle between requests (measured: 0.86 -> 1.04 GB/s cold on the
#: Phase-6 sweep with 8). The pool is a leaf: its tasks never submit to it.
CHUNK_READERS = 8
_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def chunk_pool() -> ThreadPoolExecutor:
    """The process's chunk-reading pool (a new one in a forked child, whose threads did not survive)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(CHUNK_READERS, thread_name_prefix="fisherstore-chunks"))
        return _pool[1]


def read_region(files: Any, key: str, chunks: tuple[int, ...], carrier: np.dtype, chain: Chain,
                region: Region) -> np.ndarray:
    """The values of ``region`` of the array at ``key`` (chunk shape ``chunks``, stored as ``carrier``)."""
    n = carrier.itemsize * math.prod(chunks)
    limit = chain.max_stored(n)
    coords = chunk_coords(region, chunks)

    def fetch(idx: tuple[int, ...]) -> np.ndarray:
        rel = chunk_key(idx)
        stored = files.read_bounded(f"{key}/{rel}", limit + 1)  # one read (one GET on S3)
        path = files.url_of(f"{key}/{rel}")
        if stored is None:
            raise ChunkError(errno.ENOENT, f"chunk file {rel} of {key!r} is missing", path, idx)
        try:
            if len(stored) > limit:
                raise ValueError(f"it is larger than a chunk of {n} bytes can be ({limit})")
            raw = chain.decode(stored, n)
        except ValueError as e:
            raise ChunkError(errno.EIO, f"chunk {rel} of {key!r} is damaged: {e}", path, idx) from None
        return np.frombuffer(raw, dtype=carrier).reshape(chunks)

    def place_whole(idx: tuple[int, ...], target: np.ndarray) -> None:
        # A whole uncompressed chunk into a contiguous ``target`` (its place in the output, or
        # a buffer of its own): read there directly, the crc into 4 bytes beside it, sparing a
        # copy of every byte.
        rel = chunk_key(idx)
        body, tail = memoryview(target.reshape(-1).view(np.uint8)), bytearray(4 if chain.checksum else 0)
        got = read_into(f"{key}/{rel}", [body, memoryview(tail)] if tail else [body])
        if got is None:
            raise ChunkError(errno.ENOENT, f"chunk file {rel} of {key!r} is missing", files.url_of(f"{key}/{rel}"), idx)
        want = n + len(tail)
        problem = (f"it holds {got} bytes, not the chunk's {want} (truncated or padded)" if got != want else
                   "it failed its crc32c checksum" if tail and not chain.crc_matches(body, tail) else None)
        if problem:
            raise ChunkError(errno.EIO, f"chunk {rel} of {key!r} is damaged: {problem}", files.url_of(f"{key}/{rel}"),
                             idx)

    read_into = getattr(files, "read_into", None) if chain.compressor is None else None
    if len(coords) == 1:
        src, _ = chunk_overlap(region, chunks, coords[0])
        if read_into is None:
            return fetch(coords[0])[src]  # one chunk: a view of its buffer, no copy
        # One uncompressed local chunk: read it into a fresh writeable array, checked there, and
        # hand that array over (a whole chunk) or a copy of the part asked for (a small slice
        # must not keep the whole chunk alive). One buffer, no copy: reading into bytes and then
        # copying them into a writeable array cost 2 buffers of fresh pages per read (~1,000
        # page faults, 1.2 ms of a 2 MiB head-block read; benchmarks/results/reads20.md).
        buf = np.empty(chunks, dtype=carrier)
        place_whole(coords[0], buf)
        part = buf[src]
        return buf if part.shape == buf.shape else part.copy()
    if not coords:
        return np.zeros(region_shape(region), dtype=carrier)
    out = np.empty(region_shape(region), dtype=carrier)

    def place(idx: tuple[int, ...]) -> None:
        src, dst = chunk_overlap(region, chunks, idx)
        target = out[dst]
        if read_into is not None and target.shape == chunks and target.flags.c_contiguous:
            return place_whole(idx, target)
        out[dst] = fetch(idx)[src]

    if len(coords) >= 4:  # every chunk written before the caller sees ``out``; the first error raises
        list(chunk_pool().map(place, coords))
    else:
        for idx in coords:
            place(idx)
    return out
