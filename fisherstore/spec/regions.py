"""Region and chunk-grid arithmetic: pure functions on tuples of slices. No I/O, no torch.

A *region* is a tuple of slices, one per axis, with ``0 <= start <= stop`` (and a positive
step where one is allowed). A *chunk grid* cuts a shape by a chunk shape; a chunk is named
by its grid coordinates, a tuple of ints. The write path cuts tensors into chunk-aligned
slabs, the read path assembles regions from chunks, and ``verify`` walks the grid: all of
them use these helpers, so the arithmetic lives once.

Usage::

    >>> chunk_coords((slice(0, 256), slice(5, 9)), (128, 4096))
    [(0, 0), (1, 0)]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

from ..errors import ShapeMismatchError, SliceError

__all__ = [
    "Region",
    "region_shape",
    "region_nbytes",
    "full_region",
    "bounded",
    "check_region",
    "axis_region",
    "offset_region",
    "split_axis",
    "grid_shape",
    "iter_grid",
    "chunk_region",
    "chunk_coords",
    "chunk_overlap",
    "chunk_span",
    "chunk_run",
    "axis_chunk_count",
    "origin",
    "runs",
    "iter_slabs",
    "aligned_region",
]

Region = tuple[slice, ...]


def region_shape(region: Region) -> tuple[int, ...]:
    """The shape a region selects (steps honoured)."""
    return tuple(len(range(s.start, s.stop, s.step or 1)) for s in region)


def region_nbytes(region: Region, itemsize: int = 4) -> int:
    return itemsize * math.prod(region_shape(region))


def full_region(shape: Sequence[int]) -> Region:
    return tuple(slice(0, n) for n in shape)


def bounded(index: Sequence[slice], shape: Sequence[int]) -> Region:
    """An index of slices (open ends allowed, as ``ParamLayout.head_index`` gives) as explicit in-bounds ones.

    >>> bounded((slice(4, 8), slice(None)), (16, 3))
    (slice(4, 8, None), slice(0, 3, None))
    """
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def check_region(region: object, shape: Sequence[int], what: str = "read()") -> Region:
    """``region`` if it is ``len(shape)`` in-bounds slices with int starts and stops and positive steps.

    Raises :class:`SliceError` otherwise: the store's region reads take no negative,
    open or out-of-range slices (a LazyFisher's ``[...]`` indexing normalises those).
    """
    if not (isinstance(region, tuple) and len(region) == len(shape) and all(
            isinstance(s, slice) and isinstance(s.start, int) and isinstance(s.stop, int)
            and 0 <= s.start <= s.stop <= n and (s.step is None or isinstance(s.step, int) and s.step >= 1)
            for s, n in zip(region, shape))):
        raise SliceError(f"{what}: region must be {len(shape)} in-bounds slices with explicit starts, stops "
                         f"and positive steps, got {region!r}; index a LazyFisher (store.fisher(task, name)[...]) "
                         "for general slicing")
    return region


def axis_region(shape: Sequence[int], ax: int, start: int, stop: int) -> Region:
    """``[start, stop)`` along axis ``ax`` and everything along the others."""
    return tuple(slice(start, stop) if i == ax else slice(0, n) for i, n in enumerate(shape))


def offset_region(region: Region, base: Region | Sequence[int]) -> Region:
    """``region`` moved by ``base`` (a region's starts, or plain offsets); negative offsets move back."""
    offs = [b.start if isinstance(b, slice) else b for b in base]
    return tuple(slice(s.start + o, s.stop + o) for s, o in zip(region, offs))


def split_axis(shape: Sequence[int], chunks: Sequence[int]) -> int:
    """The axis along which ``chunks`` split ``shape`` (0 when nothing is split)."""
    for ax, (s, c) in enumerate(zip(shape, chunks)):
        if c < s:
            return ax
    return 0


def grid_shape(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    """How many chunks each axis has (0 along an empty axis)."""
    return tuple(-(-n // c) for n, c in zip(shape, chunks))


def iter_grid(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every chunk's coordinates, in C order (a 0-d array has the one chunk ``()``)."""
    return itertools.product(*(range(g) for g in grid_shape(shape, chunks)))


def chunk_region(coords: Sequence[int], shape: Sequence[int], chunks: Sequence[int]) -> Region:
    """The part of the array that chunk ``coords`` holds (clipped at the array's edge)."""
    return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, chunks, shape))


def chunk_coords(region: Region, chunks: Sequence[int], limit: int | None = None) -> list[tuple[int, ...]]:
    """Coordinates of the chunks ``region`` touches, in C order (at most ``limit`` of them)."""
    ranges = [range(s.start // c, (s.stop - 1) // c + 1) if s.stop > s.start else range(0)
              for s, c in zip(region, chunks)]
    return list(itertools.islice(itertools.product(*ranges), limit))


def chunk_overlap(region: Region, chunks: Sequence[int], coords: Sequence[int]) -> tuple[Region, Region]:
    """Where chunk ``coords`` meets ``region``: (index into the chunk, index into the region's output)."""
    src, dst = [], []
    for s, c, i in zip(region, chunks, coords):
        lo, hi = max(s.start, i * c), min(s.stop, (i + 1) * c)
        src.append(slice(lo - i * c, hi - i * c))
        dst.append(slice(lo - s.start, hi - s.start))
    return tuple(src), tuple(dst)


def chunk_span(region: Region, chunks: Sequence[int], ax: int) -> tuple[int, int]:
    """The half-open range of chunk indices ``region`` covers along axis ``ax``."""
    if not region:
        return 0, 1
    s = region[ax]
    return s.start // chunks[ax], -(-s.stop // chunks[ax])


def chunk_run(shape: Sequence[int], chunks: Sequence[int], ax: int, a: int, b: int) -> Region:
    """The region of chunks ``a`` to ``b`` (exclusive) along axis ``ax``, whole along the others (``()`` for 0-d)."""
    if not shape:
        return ()
    return axis_region(shape, ax, a * chunks[ax], min(b * chunks[ax], shape[ax]))


def axis_chunk_count(shape: Sequence[int], chunks: Sequence[int]) -> int:
    """How many chunks ``shape`` has along its split axis (1 for a 0-d array)."""
    return grid_shape(shape, chunks)[split_axis(shape, chunks)] if shape else 1


def origin(region: Region, ax: int) -> list[int]:
    """Offsets that move absolute coordinates into ``region``'s own (for regions that start at 0 but on ``ax``)."""
    return [-region[i].start if i == ax else 0 for i in range(len(region))]


def runs(flags: Sequence[bool], a: int, b: int) -> list[tuple[bool, int, int]]:
    """Maximal runs ``(flag, start, stop)`` of equal flags in ``flags[a:b]``."""
    out = []
    i = a
    while i < b:
        j = i
        while j < b and flags[j] == flags[i]:
            j += 1
        out.append((bool(flags[i]), i, j))
        i = j
    return out


def iter_slabs(
    shape: Sequence[int], chunks: Sequence[int], target_bytes: int = 16 << 20, itemsize: int = 4
) -> Iterator[Region]:
    """Chunk-aligned slabs of about ``target_bytes`` covering ``shape`` exactly once.

    Streaming a tensor slab by slab bounds the I/O buffer, and keeping slabs aligned to
    chunks means no chunk is read or written by two slabs.
    """
    shape = tuple(shape)
    if not shape:
        yield ()
        return
    if 0 in shape:
        return
    ax = split_axis(shape, chunks)
    row = itemsize * math.prod(shape) // shape[ax] * chunks[ax]  # one chunk row along ax, whole elsewhere
    inner = next((a for a in range(ax + 1, len(shape)) if chunks[a] < shape[a]), None)
    if inner is None or row <= target_bytes:
        per = max(1, target_bytes // max(1, row)) * chunks[ax]
        for start in range(0, shape[ax], per):
            yield axis_region(shape, ax, start, min(start + per, shape[ax]))
        return
    # One chunk row is already too big (a 3-D MoE tensor chunked (1, rows, cols)): take
    # each chunk row along ax on its own and cut it along the next split axis.
    for start in range(0, shape[ax], chunks[ax]):
        stop = min(start + chunks[ax], shape[ax])
        sub = shape[:ax] + (stop - start,) + shape[ax + 1:]
        for r in iter_slabs(sub, chunks[:ax] + (stop - start,) + tuple(chunks[ax + 1:]), target_bytes, itemsize):
            yield r[:ax] + (slice(r[ax].start + start, r[ax].stop + start),) + r[ax + 1:]


def aligned_region(region: object, shape: Sequence[int], chunks: Sequence[int], name: str) -> Region:
    """Validate a region fed to a step (``StepWriter.add(region=...)``); return it whole.

    It must be slices with step 1, aligned to the chunks along the split axis and spanning
    every other axis, so a contribution never shares a chunk with another slab's.
    """
    if region is None:
        return full_region(shape)
    reg = region if isinstance(region, tuple) else (region,)
    reg = reg + (slice(None),) * (len(shape) - len(reg))
    if len(reg) != len(shape) or not all(isinstance(s, slice) and s.step in (None, 1) for s in reg):
        raise ShapeMismatchError(f"parameter {name!r}: region must be slices with step 1, got {region!r}")
    try:
        reg = bounded(reg, shape)
    except TypeError:
        raise ShapeMismatchError(f"parameter {name!r}: region bounds must be ints, got {region!r}") from None
    ax = split_axis(shape, chunks)
    for i, (s, n) in enumerate(zip(reg, shape)):
        if i == ax:
            c = chunks[ax]
            if not (s.start % c == 0 and (s.stop % c == 0 or s.stop == n) and s.stop > s.start):
                raise ShapeMismatchError(
                    f"parameter {name!r}: region {s.start}:{s.stop} on axis {ax} is not aligned to its chunks "
                    f"of {c}; feed whole chunks (or the whole tensor)"
                )
        elif (s.start, s.stop) != (0, n):
            raise ShapeMismatchError(
                f"parameter {name!r}: a region must span axis {i} whole (0:{n}); it splits only along axis {ax}"
            )
    return reg
