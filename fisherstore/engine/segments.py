"""Per-sample segments: planning one, writing it, and settling it whole (Phase 6's inputs).

For each (task, parameter) the store keeps the **signed** gradient of each sample's
token-summed loss, ``g_i``, with its token count ``T_i`` and a stable id
(:mod:`fisherstore.spec.samples` says what is derived from them). Samples arrive in
*segments* (one :class:`SampleBatch`, usually one ``collect_samples`` call): each
parameter's part of a segment is one Zarr v3 array ``<param>/s<id>`` of shape
``[n, *param_shape]``, chunked one sample by one head block, in the gradient's own dtype
(a bf16 model's gradients stay bf16, losslessly). A segment is committed by the next
flush, like a step; a crash loses only segments no commit names. Reading them back is
:class:`~fisherstore.store.lazy_samples.LazySamples`.

Usage::

    with store.begin_samples("math", names, n=8) as sb:       # usually via FisherCollector.collect_samples
        sb.add(0, "model.layers.0.self_attn.q_proj.weight", grad)
        sb.set_tokens(0, 37)
    store.flush()
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from ..backends import ArrayBackend
from ..errors import (
    FisherStoreError,
    InvalidArgumentError,
    InvalidGradientError,
    NonFiniteGradientError,
    ShapeMismatchError,
    StepError,
    StorageError,
    UnknownParamError,
)
from ..spec.format import sample_attributes, sample_key
from ..spec.manifest import SAMPLE_DTYPES, SampleSegment
from ..spec.regions import chunk_region, iter_grid
from ..spec.samples import TORCH_DTYPES, dtype_name, to_carrier
from .catalog import Catalog, ParamState, TaskState
from .iopool import IOPool, wait_all
from .transaction import Transaction

__all__ = ["SampleBatch", "new_segment", "samples_of", "check_dtype", "segment_count"]


class SampleBatch(Transaction):
    """Writes one segment of ``n`` samples' gradients; use as a context manager.

    Each :meth:`add` copies one sample's gradient of one parameter and writes its head-block
    chunks on the store's I/O pool, so at most the pool's queue bound is held. Leaving the
    ``with`` block settles the segment: every (sample, parameter) must have been added once;
    then it joins the task's uncommitted segments, and the next flush commits it. A block
    that raises, or a failed write, discards the segment whole.

    Args:
        dtype: the stored dtype. None (default): the gradients' own dtype (they must all
            share it). ``"bfloat16"``/``"float16"`` store fp32 gradients rounded, with a
            relative error of at most 2⁻⁸ / 2⁻¹¹ (float16 also refuses values beyond its range).
    """

    def __init__(self, backend: ArrayBackend, pool: IOPool, lock: threading.RLock, task: TaskState,
                 names: Sequence[str], n: int, segment: int, ids: Sequence[str], codecs: list[dict[str, Any]],
                 dtype: str | None, on_end: Callable[[SampleBatch], None]) -> None:
        self.backend, self.pool, self.lock, self.task = backend, pool, lock, task
        self.names, self.n, self.segment, self.ids = list(names), n, segment, list(ids)
        self.codecs, self.dtype, self.lossy = codecs, dtype, dtype is not None
        self.tokens: list[int | None] = [None] * n
        self._done: dict[str, np.ndarray] = {name: np.zeros(n, dtype=bool) for name in self.names}
        self._created: set[str] = set()
        self._futures: list[Future] = []
        self._on_end = on_end
        self.state = "open"

    def __enter__(self) -> SampleBatch:
        return self

    def __repr__(self) -> str:
        return f"<SampleBatch task={self.task.name!r} segment={self.segment} n={self.n} {self.state}>"

    def set_tokens(self, i: int, tokens: int) -> None:
        """Sample ``i``'s token count ``T_i`` (the tokens its loss sums over)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise InvalidArgumentError(f"tokens of sample {i} must be an int >= 0, got {tokens!r}")
        self.tokens[self._index(i)] = tokens

    def add(self, i: int, name: str, grad: torch.Tensor) -> None:
        """Sample ``i``'s signed gradient of parameter ``name`` (zeros for a parameter the sample did not reach)."""
        if self.state != "open":
            raise StepError(f"sample segment {self.segment} of task {self.task.name!r} is {self.state}")
        i = self._index(i)
        p = self.task.params.get(name)
        if p is None or name not in self._done:
            raise UnknownParamError(f"parameter {name!r} is not part of this sample segment ({len(self.names)} "
                                    "parameters); pass it to begin_samples")
        if self._done[name][i]:
            raise StepError(f"sample {i} of parameter {name!r} was added twice")
        x = self._check(p, grad)
        if name not in self._created:
            shape, chunks = (self.n, *p.shape), (1, *p.chunks)
            try:
                self.backend.create_raw_array(sample_key(p.key, self.segment), shape, chunks, self.dtype,
                                              sample_attributes(p.name, p.layout, pending=True), self.codecs)
            except OSError as e:
                raise self._storage_error(e) from e
            self._created.add(name)
        # Our own host copy, so the caller's buffer may be reused as soon as add() returns.
        host = x.to(device="cpu", dtype=TORCH_DTYPES[self.dtype], copy=True)
        self._futures.append(self.pool.submit(host.numel() * host.element_size(), self._write, p, i, host))
        self._done[name][i] = True

    def _index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n:
            raise InvalidArgumentError(f"sample index {i!r} is out of range for a segment of {self.n}")
        return i

    def _check(self, p: ParamState, grad: torch.Tensor) -> torch.Tensor:
        if not isinstance(grad, torch.Tensor) or not grad.is_floating_point() or grad.is_complex():
            raise InvalidGradientError(f"gradient of {p.name!r} must be a real floating-point tensor, got "
                                       f"{getattr(grad, 'dtype', type(grad).__name__)}")
        if tuple(grad.shape) != p.shape:
            raise ShapeMismatchError(f"gradient of {p.name!r} has shape {tuple(grad.shape)}; the parameter has "
                                     f"{p.shape}")
        if grad.layout != torch.strided:
            grad = grad.to_dense()
        if self.dtype is None:
            name = dtype_name(grad.dtype)
            if name is None:
                raise InvalidGradientError(
                    f"gradient of {p.name!r} is {grad.dtype}, which per-sample arrays do not store as it is; pass "
                    "dtype='float32' to begin_samples to store it rounded to fp32")
            self.dtype = name
        elif not self.lossy and TORCH_DTYPES[self.dtype] != grad.dtype:
            raise InvalidGradientError(
                f"gradient of {p.name!r} is {grad.dtype} but this segment stores {self.dtype}: one segment holds "
                "one dtype. Pass dtype= to begin_samples to convert (a narrower dtype rounds, see its bound)")
        return grad.detach()

    def _write(self, p: ParamState, i: int, host: torch.Tensor) -> None:
        """Worker: sample ``i``'s chunks of ``p``, checked finite (a NaN would poison every score)."""
        if not bool(torch.isfinite(host).all()):
            raise NonFiniteGradientError(
                f"sample {i}'s gradient of {p.name!r} has NaN or Inf values (stored as {self.dtype}); the segment "
                "is discarded. Check the loss scale, or store float32")
        carrier = to_carrier(host)
        key = sample_key(p.key, self.segment)
        for coords in iter_grid(p.shape, p.chunks):
            region = chunk_region(coords, p.shape, p.chunks)
            self.backend.write_chunk(key, (i, *coords), carrier[region])

    def settle(self) -> None:
        """Wait for the writes; then the segment joins the task's uncommitted ones (or is discarded, raising)."""
        exc = wait_all(self._futures)
        missing = [(name, int(np.flatnonzero(~d)[0])) for name, d in self._done.items() if not d.all()]
        no_tokens = [i for i, t in enumerate(self.tokens) if t is None]
        if exc is not None or missing or no_tokens:
            self.discard()
            if exc is not None:
                raise (self._storage_error(exc) if isinstance(exc, OSError) and not isinstance(exc, FisherStoreError)
                       else exc) from exc
            what = (f"sample {missing[0][1]} of parameter {missing[0][0]!r} was never added" if missing
                    else f"sample {no_tokens[0]} has no token count (set_tokens)")
            raise StepError(f"sample segment {self.segment} of task {self.task.name!r} is incomplete: {what}; "
                            "it was discarded")
        seg = SampleSegment(self.segment, self.n, tuple(self.tokens), tuple(self.ids), self.dtype or "float32",
                            tuple(self.names))
        with self.lock:
            self.task.new_samples.append(seg)
        self.state = "settled"
        self._on_end(self)

    def discard(self) -> None:
        """Drop the segment whole (its arrays are deleted). Safe to call twice."""
        if self.state != "open":
            return
        self.state = "discarded"
        wait_all(self._futures)
        for name in self._created:
            try:
                self.backend.delete(sample_key(self.task.params[name].key, self.segment))
            except OSError:
                pass  # an uncommitted segment left behind is removed by the next writer
        self._on_end(self)

    def _storage_error(self, e: BaseException) -> StorageError:
        return StorageError(getattr(e, "errno", None),
                            f"sample segment {self.segment} of task {self.task.name!r} failed while writing "
                            f"({type(e).__name__}: {e}); it was discarded whole and the task keeps its committed "
                            "samples. Fix the cause (disk space, permissions) and collect the samples again.")


def samples_of(catalog: Catalog, task: str) -> list[SampleSegment]:
    """A task's segments: committed ones, then the writer's uncommitted ones (what its readers see)."""
    t = catalog.task(task)
    return [*t.samples, *t.new_samples]


def new_segment(catalog: Catalog, task: str, names: Sequence[str], n: int, ids: Sequence[str] | None,
                number_base: int) -> tuple[list[str], list[str], int]:
    """Check a new segment of ``n`` samples of ``names`` against ``task``'s; its names, sample ids and number.

    Every segment of a task covers the same parameters (so every sample has each), and
    sample ids are unique in the task (default: running numbers after the last one).
    Numbers continue from the task's last segment (from ``number_base`` on object storage).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"n must be a positive number of samples, got {n!r}")
    segments = samples_of(catalog, task)
    names = list(names)
    for name in names:
        catalog.param(task, name)
    if segments and set(names) != set(segments[0].params):
        raise InvalidArgumentError(
            f"task {task!r} holds per-sample gradients of {len(segments[0].params)} parameters; a new segment "
            f"must cover the same ones (got {len(names)}), so every sample has every parameter")
    first = segment_count(segments)
    ids = [str(i) for i in (ids if ids is not None else range(first, first + n))]
    taken = {i for seg in segments for i in seg.ids}
    if len(ids) != n or len(set(ids)) != n or taken & set(ids):
        raise InvalidArgumentError(f"ids must be {n} distinct sample ids not yet in task {task!r}")
    return names, ids, max((seg.id for seg in segments), default=number_base) + 1


def check_dtype(dtype: str | None) -> str | None:
    if dtype is not None and dtype not in SAMPLE_DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {SAMPLE_DTYPES} or None (the gradients' own), got {dtype!r}")
    return dtype


def segment_count(segments: Sequence[SampleSegment]) -> int:
    return sum(s.n for s in segments)
