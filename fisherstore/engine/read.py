"""Reading the Fisher at the current state: generations on disk, plus what RAM holds on top.

The value of a region at task step ``t`` is the newest generation's region scaled by
``β^(t - t_gen)`` (lazy decay) plus, for a resident parameter with steps since its last
fold, its accumulator scaled by ``β^(t - t_acc)``; both divided by ``1 - β^t`` when
bias-corrected (:mod:`fisherstore.spec.ema`).

A read-only store can race a writer: when the generation it knew is superseded and
deleted by a newer commit, the read reloads that task's manifest and repeats itself
whole, so every read is one tensor at one step.

Usage (through the store)::

    store.read("math", "model.layers.3.self_attn.q_proj.weight", (slice(640, 768), slice(None)))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..backends import ArrayBackend
from ..errors import CorruptChunkError, CorruptStoreError, FisherStoreError, HeadIndexError, SnapshotLostError
from ..progress import progress_bar
from ..spec.ema import readout_scale
from ..spec.format import gen_name
from ..spec.regions import Region, bounded, chunk_coords, chunk_region, region_shape
from .catalog import Catalog, ParamState
from .iopool import read_ahead

__all__ = ["ReadPath", "read_generation", "scale_in_place"]

#: How often a racing reader reloads a manifest before it gives up.
RETRIES = 8


def read_generation(backend: ArrayBackend, task: str, p: ParamState, gen: int, region: Region) -> np.ndarray:
    """``region`` of generation ``gen`` of ``p`` as a writeable fp32 array; a bad chunk is named exactly.

    The generation's header must say what the manifest says (float32, the same shape and
    chunks): anything else is a :class:`CorruptStoreError`, never values read another way.
    """
    key = p.gen_key(gen)
    meta = backend.array_meta(key)
    if meta is None:
        raise CorruptChunkError(
            f"cannot read task {task!r}, parameter {p.name!r}: its generation {gen} ({backend.url(key)}) is "
            "missing. Run `fisherstore verify` on the store."
        )
    if meta["data_type"] != "float32" or tuple(meta["shape"]) != p.shape or tuple(meta["chunks"]) != p.chunks:
        raise CorruptStoreError(
            f"task {task!r}, parameter {p.name!r}: generation {gen} is a {meta['data_type']} array of shape "
            f"{tuple(meta['shape'])} in chunks {tuple(meta['chunks'])}, but the manifest says float32 {p.shape} in "
            f"chunks {p.chunks}. The store is damaged or was not written by fisherstore; run `fisherstore verify`."
        )
    try:
        data = backend.read(key, region)
    except FisherStoreError:
        raise
    except Exception as e:  # the libraries raise assorted types for bad chunks
        coords = _bad_chunks(backend, p, gen, region)
        raise CorruptChunkError(
            f"cannot read task {task!r}, parameter {p.name!r}, chunk {', '.join(map(str, coords))} "
            f"(generation {gen}): {type(e).__name__}: {e}. The chunk file is damaged or "
            "missing; run `fisherstore verify` to list every bad chunk."
        ) from e
    # torch.from_numpy needs a writeable, contiguous float32 buffer; copy only if not.
    return np.require(data, np.float32, ["C", "W"])


def scale_in_place(data: np.ndarray, scale: float) -> None:
    """``data *= scale`` in fp32, bit for bit what ``torch.Tensor.mul_(scale)`` gives; nothing when 1.

    On one thread (numpy): a head block is 2 MiB, which one core scales in ~0.05 ms,
    while torch's two-thread kernel waits for a second core that a busy 2-core machine
    may not give it for milliseconds (measured: 0.1 ms to 4 ms per 2 MiB mul_ in a
    new-handle read; benchmarks/results/reads20.md). Both round ``scale`` to fp32 once
    and multiply in IEEE fp32, so the values are identical.
    """
    if scale != 1.0:
        np.multiply(data, np.float32(scale), out=data)


def _bad_chunks(backend: ArrayBackend, p: ParamState, gen: int, region: Region) -> list[tuple[int, ...]]:
    """The chunks of ``region`` that fail to read on their own (error path only; at most 16)."""
    coords = chunk_coords(region, p.chunks, limit=16)
    if len(coords) == 1:
        return coords
    bad = []
    for c in coords:  # name every bad chunk of the read, not only the first one hit
        try:
            backend.read(p.gen_key(gen), chunk_region(c, p.shape, p.chunks))
        except Exception:
            bad.append(c)
    return bad or coords


@dataclass(frozen=True)
class _Snapshot:
    """What one read needs of the state, taken under the lock; the disk is read outside it."""

    param: ParamState
    src: int | None  # the generation to read (None: all zeros)
    src_scale: float
    acc: torch.Tensor | None  # a copy of the accumulator's region
    acc_scale: float
    revision: tuple


class ReadPath:
    """Reads regions of the stored Fisher for one store.

    Args:
        backend: where the generations are.
        catalog: the tasks and their state.
        lock: guards the state against the writing thread.
        reload: ``reload(task) -> bool`` reloads a task's manifest if a writer committed
            since (True if it changed); None for a writable store, which is the writer.
        identity: raises :class:`StoreReplacedError` if the store was replaced since it was
            opened (readers only; checked after every read).
        pinned: the catalog is one commit that a reader pin holds (a snapshot): never
            reload, and a generation gone from disk is a :class:`SnapshotLostError`.
    """

    def __init__(self, backend: ArrayBackend, catalog: Catalog, lock: threading.RLock,
                 reload: Callable[[str], bool] | None = None, identity: Callable[[], None] | None = None,
                 pinned: bool = False) -> None:
        self.backend = backend
        self.catalog = catalog
        self.lock = lock
        self.reload = reload
        self.identity = identity
        self.pinned = pinned

    def region(self, task: str, name: str, region: Region, bias_corrected: bool) -> torch.Tensor:
        """The EMA value of ``region`` at the task's current step, as fp32, whole at one step."""
        for attempt in range(RETRIES + 1):
            snap = self._snapshot(task, name, region, bias_corrected)
            try:
                out = self._combine(task, snap, region)
            except CorruptChunkError:
                # Racing a writer: the generation this read used was superseded and deleted by a
                # newer commit. Read that commit instead, whoever noticed it first (another
                # thread of a head sweep may have reloaded the task already).
                changed = self.reload(task) if self.reload is not None else False
                if attempt < RETRIES and (changed or self._revision(task, name) != snap.revision):
                    continue
                if self.identity is not None:
                    self.identity()
                if self.pinned and snap.src is not None and gen_name(snap.src) not in self.backend.list(snap.param.key):
                    raise SnapshotLostError(
                        f"task {task!r}, parameter {name!r}: generation {snap.src} of the commit this view reads "
                        f"(step {self.catalog.task(task).step}) was deleted by a writer: the view's pin lapsed (a "
                        "pause longer than FISHERSTORE_PIN_TTL) or the store could not be pinned (read-only "
                        "storage, or a writer older than pins). Build the view again to read the newest commit."
                    ) from None
                raise
            if self.identity is not None:
                self.identity()
            return out
        raise AssertionError("unreachable")

    def _revision(self, task: str, name: str) -> tuple:
        with self.lock:
            return _revision(self.catalog.task(task), self.catalog.param(task, name))

    def _snapshot(self, task: str, name: str, region: Region, bias_corrected: bool) -> _Snapshot:
        with self.lock:
            t = self.catalog.task(task)
            p = self.catalog.param(task, name)
            src, src_t = p.latest()
            acc = None
            if p.a_last is not None:
                acc = p.acc[region].to("cpu", dtype=torch.float32, copy=True)
            return _Snapshot(
                p, src, readout_scale(p.decay, t.step, src_t, bias_corrected) if src is not None else 0.0,
                acc, readout_scale(p.decay, t.step, p.a_last, bias_corrected) if acc is not None else 0.0,
                _revision(t, p),
            )

    def _combine(self, task: str, snap: _Snapshot, region: Region) -> torch.Tensor:
        if snap.src is None:
            out = torch.zeros(region_shape(region), dtype=torch.float32)
        else:
            data = read_generation(self.backend, task, snap.param, snap.src, region)
            scale_in_place(data, snap.src_scale)
            out = torch.from_numpy(data)
        if snap.acc is not None:
            out.add_(snap.acc, alpha=snap.acc_scale)
        return out

    def iter_heads(self, task: str, names: Sequence[str] | None, block: str | None, workers: int,
                   bias_corrected: bool, progress: bool | None = None) -> Iterator[tuple[str, int, str, torch.Tensor]]:
        """Yield ``(param, head, block, tensor)`` for every distinct head block, reading ahead.

        K and V blocks come once per key/value head (``head`` is the first query head of
        its group). Up to ``2 * workers`` block reads are in flight across parameter
        boundaries, so the disk never waits on the caller. ``progress``: a bar of blocks
        read (None: on a terminal only, and only for sweeps longer than a second).
        """
        with self.lock:
            t = self.catalog.task(task)
            if names is None:
                names = [n for n, p in t.params.items() if p.layout is not None and p.layout.has_heads]
            todo = []
            for name in names:
                p = self.catalog.param(task, name)
                if p.layout is None or not p.layout.has_heads:
                    raise HeadIndexError(f"parameter {name!r} of task {task!r} has no head layout")
                todo += [(name, h, b, bounded(p.layout.head_index(h, b, len(p.shape)), p.shape))
                         for h, b in p.layout.head_blocks(block or None)]

        def read(job: tuple[str, int, str, Region]) -> torch.Tensor:
            return self.region(task, job[0], job[3], bias_corrected)

        with progress_bar(len(todo), progress, f"head blocks of {task}", unit="block") as bar:
            for (name, h, b, _), blk in read_ahead(todo, read, 2 * workers, workers):
                bar.update(1)
                yield name, h, b, blk


def _revision(t: Any, p: ParamState) -> tuple:
    """Changes whenever what a read of ``p`` would see changes (a commit, a step, a reload)."""
    return id(t), t.commit, t.step, p.gen, p.work_gen, p.a_last
