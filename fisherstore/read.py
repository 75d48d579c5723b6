"""Reading the Fisher at the current state: generations on disk, plus what RAM holds on top.

The value of a region at task step ``t`` is the newest generation's region scaled by
``β^(t - t_gen)`` (lazy decay) plus, for a resident parameter with steps since its last
fold, its accumulator scaled by ``β^(t - t_acc)``; both divided by ``1 - β^t`` when
bias-corrected (:mod:`fisherstore.ema`).

A read-only store can race a writer: when the generation it knew is superseded and
deleted by a newer commit, the read reloads that task's manifest and repeats itself
whole, so every read is one tensor at one step.

Usage (through the store)::

    store.read("math", "model.layers.3.self_attn.q_proj.weight", (slice(640, 768), slice(None)))
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .backends import ArrayBackend
from .catalog import Catalog, ParamState
from .ema import readout_scale
from .errors import CorruptChunkError, FisherStoreError, HeadIndexError
from .regions import Region, chunk_coords, chunk_region, region_shape

__all__ = ["ReadPath", "read_generation"]

#: How often a racing reader reloads a manifest before it gives up.
RETRIES = 8


def read_generation(backend: ArrayBackend, task: str, p: ParamState, gen: int, region: Region) -> np.ndarray:
    """``region`` of generation ``gen`` of ``p`` as a writeable fp32 array; a bad chunk is named exactly."""
    try:
        data = backend.read(p.gen_key(gen), region)
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


class ReadPath:
    """Reads regions of the stored Fisher for one store.

    Args:
        backend: where the generations are.
        catalog: the tasks and their state.
        reload: ``reload(task) -> bool`` reloads a task's manifest if a writer committed
            since (True if it changed); None for a writable store, which is the writer.
    """

    def __init__(self, backend: ArrayBackend, catalog: Catalog, reload: Callable[[str], bool] | None) -> None:
        self.backend = backend
        self.catalog = catalog
        self.reload = reload

    def region(self, task: str, name: str, region: Region, bias_corrected: bool) -> torch.Tensor:
        """The EMA value of ``region`` at the task's current step, as fp32."""
        for _ in range(RETRIES):
            try:
                return self._once(task, name, region, bias_corrected)
            except CorruptChunkError:
                # A reader racing a writer: the generation it knew was superseded and deleted
                # by a newer commit. Read that commit instead (each read is whole, at one step).
                if self.reload is None or not self.reload(task):
                    raise
        return self._once(task, name, region, bias_corrected)

    def _once(self, task: str, name: str, region: Region, bias_corrected: bool) -> torch.Tensor:
        t = self.catalog.task(task)
        p = self.catalog.param(task, name)
        src, src_t = p.latest()
        if src is None:
            out = torch.zeros(region_shape(region), dtype=torch.float32)
        else:
            out = torch.from_numpy(read_generation(self.backend, task, p, src, region))
            out.mul_(readout_scale(p.decay, t.step, src_t, bias_corrected))
        if p.a_last is not None:
            out.add_(p.acc[region].cpu(), alpha=readout_scale(p.decay, t.step, p.a_last, bias_corrected))
        return out

    def iter_heads(self, task: str, names: Sequence[str] | None, block: str | None, workers: int,
                   bias_corrected: bool) -> Iterator[tuple[str, int, str, torch.Tensor]]:
        """Yield ``(param, head, block, tensor)`` for every distinct head block, reading ahead.

        K and V blocks come once per key/value head (``head`` is the first query head of
        its group). Up to ``2 * workers`` block reads are in flight across parameter
        boundaries, so the disk never waits on the caller.
        """
        t = self.catalog.task(task)
        if names is None:
            names = [n for n, p in t.params.items() if p.layout is not None and p.layout.has_heads]
        todo = []
        for name in names:
            layout = self.catalog.param(task, name).layout
            if layout is None or not layout.has_heads:
                raise HeadIndexError(f"parameter {name!r} of task {task!r} has no head layout")
            ndim = len(self.catalog.param(task, name).shape)
            for b in [block.upper()] if block else list(layout.blocks):
                step = layout.group_size if b in "KV" else 1
                todo += [(name, h, b, layout.head_index(h, b, ndim)) for h in range(0, layout.num_heads, step)]

        def read(name: str, idx: tuple[slice, ...]) -> torch.Tensor:
            shape = self.catalog.param(task, name).shape
            region = tuple(slice(*s.indices(n)[:2]) for s, n in zip(idx, shape))
            return self.region(task, name, region, bias_corrected)

        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="fisherstore-read") as ex:
            pending: deque = deque()
            it = iter(todo)
            for name, h, b, idx in itertools.islice(it, 2 * workers):
                pending.append((name, h, b, ex.submit(read, name, idx)))
            while pending:
                name, h, b, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((*nxt[:3], ex.submit(read, nxt[0], nxt[3])))
                yield name, h, b, fut.result()
