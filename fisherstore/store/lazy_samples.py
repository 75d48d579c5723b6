"""LazySamples: a lazy ``[n, *param_shape]`` view of one parameter's per-sample gradients.

Indexing reads only the chunks it touches (one chunk per sample and head block), in the
stored dtype; the per-sample maths (``C_i = g_i²/T_i``, ``g_i/T_i``) is
:mod:`fisherstore.spec.samples`'. Writing samples is :mod:`fisherstore.engine.segments`.

Usage::

    S = store.samples("math", "model.layers.0.self_attn.q_proj.weight")   # lazy [n, *shape]
    S[3]                             # sample 3's whole gradient
    S.head(5, "Q")                   # [n, d, in]: one chunk per sample
    S.contributions(5, "Q")          # C_i over the same block, fp32
    np.asarray(S); torch.as_tensor(S)   # every sample, read once, in the stored dtype
    for g in S: ...                  # one sample at a time
    S.to_dask()                      # lazy dask.array, one chunk per stored chunk (sample x head block)

Every read, whatever asked for it, goes through :meth:`LazySamples._read` (one segment's
array over one region): the one place that touches the backend.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..backends import ArrayBackend
from ..engine.catalog import ParamState, TaskState
from ..errors import CorruptChunkError, FisherStoreError, InvalidArgumentError, SliceError, require
from ..spec.format import sample_key
from ..spec.indexing import plan_index
from ..spec.layout import ParamLayout
from ..spec.manifest import SampleSegment
from ..spec.regions import Region, bounded, full_region, region_shape
from ..spec.samples import TORCH_DTYPES, contributions, signed, to_carrier, to_torch

__all__ = ["LazySamples"]


class LazySamples:
    """A lazy ``[n, *param_shape]`` view of one parameter's per-sample gradients; get one from ``store.samples``.

    Indexing reads only the chunks it touches: ``S[i]`` is sample i's whole gradient,
    ``S[:, rows, cols]`` every sample's block, ``S[[0, 5]]`` two samples, :meth:`head` one
    head block of every sample. The parameter axes take what a
    :class:`~fisherstore.store.lazy.LazyFisher` takes (ints, slices with any step, ``...``).
    Values come back in the stored dtype; :meth:`contributions` gives ``C_i = g_i²/T_i``
    in fp32 and :meth:`signed` ``g_i/T_i`` in fp32.

    It is also an array to numpy, torch and Dask: ``np.asarray(S)`` and ``torch.as_tensor(S)``
    read every sample once, ``for g in S`` one sample at a time, :meth:`to_dask` a lazy
    Dask array; ``S[len(S)]`` raises an ``IndexError`` (:class:`~fisherstore.errors.SliceError`).
    In numpy a bfloat16 store is ``ml_dtypes.bfloat16`` (the same bits; tensorstore's
    dtype package), so nothing is rounded; ``np.asarray(S, dtype=np.float32)`` widens it.
    """

    def __init__(self, backend: ArrayBackend, task: TaskState, p: ParamState, segments: Sequence[SampleSegment]):
        self._backend, self._task, self._p = backend, task, p
        self._segments = [s for s in segments if p.name in s.params]
        self.name = p.name

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(s.n for s in self._segments), *self._p.shape))

    @property
    def dtype(self) -> torch.dtype:
        dtypes = {TORCH_DTYPES[s.dtype] for s in self._segments}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    @property
    def layout(self) -> ParamLayout | None:
        return self._p.layout

    @property
    def tokens(self) -> torch.Tensor:
        return torch.tensor([t for s in self._segments for t in s.tokens], dtype=torch.long)

    @property
    def ids(self) -> list[str]:
        return [i for s in self._segments for i in s.ids]

    @property
    def ndim(self) -> int:
        return 1 + len(self._p.shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        """The stored chunk shape: one sample by one head block (the parameter's chunks)."""
        return (1, *self._p.chunks)

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Sample by sample, each ``[*param_shape]`` in the stored dtype (one read each)."""
        for i in range(len(self)):
            yield self.read([i])[0]

    def __repr__(self) -> str:
        return (f"LazySamples(task={self._task.name!r}, name={self.name!r}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype}, segments={len(self._segments)})")

    def read(self, samples: Sequence[int] | slice | None = None, region: Region | None = None) -> torch.Tensor:
        """Samples ``samples`` (indices or a slice; None: all) over ``region`` of the parameter, stored dtype.

        ``region``: in-bounds slices with positive steps (None: all of it); a step reads the
        slices' span and keeps every step-th element.
        """
        region = full_region(self._p.shape) if region is None else region
        n = len(self)
        idx = range(n)[samples] if isinstance(samples, slice) else (range(n) if samples is None else samples)
        idx = [int(i) for i in idx]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:  # an IndexError, as S[n] is: iterating and np.asarray stop there
            raise SliceError(f"sample index {bad[0]} is out of range for the {n} samples of {self.name!r}")
        span = tuple(slice(s.start, s.stop) for s in region)
        steps = tuple(slice(None, None, s.step) for s in region)
        parts: list[torch.Tensor] = []
        start = 0
        for seg in self._segments:  # each segment's wanted samples, in order, one read each
            mine = [i - start for i in idx if start <= i < start + seg.n]
            start += seg.n
            if not mine:
                continue
            lo, hi = min(mine), max(mine) + 1
            a = self._read(seg, (slice(lo, hi), *span))
            parts.append(a if hi - lo == len(mine) and mine == list(range(lo, hi)) else a[[m - lo for m in mine]])
        if not parts:
            return torch.zeros((0, *region_shape(region)), dtype=self.dtype)
        out = parts[0] if len(parts) == 1 else torch.cat([p.to(self.dtype) for p in parts])
        # keep the caller's order when indices cross segments out of order
        if idx != sorted(idx):
            order = sorted(range(len(idx)), key=idx.__getitem__)
            out = out[torch.argsort(torch.tensor(order))]
        if any(s.step not in (None, 1) for s in region):
            out = out[(slice(None), *steps)]
        return out

    def _read(self, seg: SampleSegment, region: Region) -> torch.Tensor:
        """Segment ``seg``'s array over ``region`` (samples first): every read of this view comes here."""
        key = sample_key(self._p.key, seg.id)
        try:
            a = self._backend.read_stored(key, region)
        except FisherStoreError:
            raise
        except Exception as e:
            raise CorruptChunkError(
                f"cannot read the per-sample gradients of task {self._task.name!r}, parameter {self.name!r} "
                f"(segment {seg.id}): {type(e).__name__}: {e}. Run `fisherstore verify`.") from e
        return to_torch(a, seg.dtype)

    def __getitem__(self, key: Any) -> torch.Tensor:
        """``S[samples, *param_index]``: samples an int, slice or list of ints; the parameter axes as a LazyFisher's."""
        key = key if isinstance(key, tuple) else (key,)
        if key and _is_sample_list(key[0]):  # a list of samples, then a basic index of the parameter
            plan = plan_index(key[1:], tuple(self._p.shape), self.name)
            samples: Sequence[int] | slice = self._sample_list(key[0])
            region, flips, squeeze = plan.region, [d + 1 for d in plan.flips], [d + 1 for d in plan.squeeze]
            empty = None if plan.empty is None else (len(samples), *plan.empty)
        else:
            plan = plan_index(key, tuple(self.shape), self.name)
            first, region = plan.region[0], plan.region[1:]
            samples, flips, squeeze, empty = first, plan.flips, plan.squeeze, plan.empty
        if empty is not None:
            out = torch.zeros(empty, dtype=self.dtype)
            return out[tuple(0 if d in squeeze else slice(None) for d in range(out.ndim))]
        out = self.read(samples, region)
        if flips:
            out = out.flip(flips)
        return out[tuple(0 if d in squeeze else slice(None) for d in range(out.ndim))]

    def _sample_list(self, key: Any) -> list[int]:
        """A list (numpy / torch 1-D integer array) of sample indices, negatives counted from the end."""
        items = key.tolist() if isinstance(key, (np.ndarray, torch.Tensor)) else list(key)
        n = len(self)
        out = []
        for i in items:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise InvalidArgumentError(
                    f"a list of samples of {self.name!r} must hold ints, got {type(i).__name__} {i!r}; for a mask "
                    "pass the indices of its True entries (np.flatnonzero(mask))")
            if not -n <= int(i) < n:  # SliceError is an IndexError: out of range reads as numpy's
                raise SliceError(f"sample index {int(i)} is out of range for the {n} samples of {self.name!r}; "
                                 f"use an index in [-{n}, {n})")
            out.append(int(i) % n)
        return out

    def head(self, head: int, block: str, samples: Sequence[int] | slice | None = None) -> torch.Tensor:
        """Every sample's (head, block) slice: ``[n, *block_shape]``, one chunk per sample."""
        layout = self._p.layout
        if layout is None or not layout.has_heads:
            raise InvalidArgumentError(f"parameter {self.name!r} has no head layout")
        return self.read(samples, bounded(layout.head_index(head, block, len(self._p.shape)), self._p.shape))

    def _block(self, head: int | None, block: str | None, region: Region | None) -> torch.Tensor:
        return self.head(head, block) if head is not None else self.read(None, region)

    def contributions(self, head: int | None = None, block: str | None = None,
                      region: Region | None = None) -> torch.Tensor:
        """``C_i = g_i² / max(T_i, 1)`` over a head block or a region (all of it by default), fp32."""
        return contributions(self._block(head, block, region), self.tokens, reuse=True)  # a buffer just read

    def signed(self, head: int | None = None, block: str | None = None,
               region: Region | None = None) -> torch.Tensor:
        """``g_i / max(T_i, 1)``, the gradient of each sample's token-mean loss, over a head block or region, fp32."""
        return signed(self._block(head, block, region), self.tokens, reuse=True)

    # -- other libraries: numpy, torch, Dask ------------------------------------------------
    def numpy(self) -> np.ndarray:
        """Every sample as one numpy array ``[n, *param_shape]`` in the stored dtype (bfloat16: ``ml_dtypes``)."""
        return _to_numpy(self.read())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """``np.asarray(S)``: every sample, read once; ``copy`` is moot, the array is new and shares nothing."""
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        """``torch.as_tensor(S)`` / ``torch.tensor(S)``: every sample, in the stored dtype (bfloat16 too)."""
        return self.read().__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> tuple[Any, int]:
        return torch.empty(0).__dlpack_device__()  # reads land in host memory

    def __dask_tokenize__(self) -> Hashable:
        where = self._backend.location if self._backend.location is not None else id(self._backend)
        return ("LazySamples", self._backend.name, where, self._task.name, self.name,
                tuple(s.id for s in self._segments), str(self.dtype))

    def to_dask(self, chunks: Any = None, dtype: Any = None) -> Any:
        """The samples as a lazy ``dask.array.Array`` ``[n, *param_shape]``, read chunk by chunk through this view.

        ``chunks``: Dask's chunks (None: the stored ones, one sample by one head block, so a
        Dask chunk is one chunk read); ``dtype``: a numpy dtype to cast each chunk to (None:
        the stored dtype; bfloat16 is ``ml_dtypes.bfloat16``). Dask is the ``views`` extra.
        Usage: ``S.to_dask()[:, :8].sum(axis=(1, 2)).compute()``.
        """
        da = require("dask.array", "LazySamples.to_dask()")
        arr = _DaskSource(self, _numpy_dtype(self.dtype) if dtype is None else np.dtype(dtype))
        # meta: the chunks are numpy; without it Dask would read a slice to find out
        return da.from_array(arr, chunks=self.chunks if chunks is None else chunks, asarray=False, lock=False,
                             meta=np.empty((0,) * arr.ndim, dtype=arr.dtype))


def _is_sample_list(k: Any) -> bool:
    if isinstance(k, (list, tuple)):
        return True
    return isinstance(k, (np.ndarray, torch.Tensor)) and k.ndim == 1


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype == torch.bfloat16:
        import ml_dtypes  # numpy's bfloat16; installed with tensorstore, a dependency

        return np.dtype(ml_dtypes.bfloat16)
    return torch.empty(0, dtype=dtype).numpy().dtype


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy, bfloat16 as ``ml_dtypes.bfloat16`` over the same bits."""
    return to_carrier(t).view(_numpy_dtype(torch.bfloat16)) if t.dtype == torch.bfloat16 else to_carrier(t)


class _DaskSource:
    """What ``da.from_array`` reads: a LazySamples whose slices come back as numpy of one dtype."""

    __slots__ = ("samples", "dtype")

    def __init__(self, samples: LazySamples, dtype: np.dtype) -> None:
        self.samples, self.dtype = samples, dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape)

    @property
    def ndim(self) -> int:
        return self.samples.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        return _to_numpy(self.samples[key]).astype(self.dtype, copy=False)

    def __dask_tokenize__(self) -> Hashable:
        return ("LazySamples.to_dask", self.samples.__dask_tokenize__(), str(self.dtype))
