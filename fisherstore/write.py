"""The write path: one EMA step (:class:`StepWriter`), and the folds a flush writes.

The life of a step (docs/architecture.md)::

    st = store.begin_step(task, tokens)   # a StepWriter for step t = task.step + 1
    st.add(name, grad_sq)                 # resident: staged for the accumulator
                                          # streamed: read-modify-writes into a new
                                          #   uncommitted generation, on the I/O pool
    (leave the with block)                # settle(): wait for the writes, then apply the
                                          #   step to RAM, or discard it whole and raise

A step is applied in exactly one place, :meth:`StepWriter.settle`, when its ``with``
block ends. Nothing reaches the disk's committed state until a flush commits
(:mod:`fisherstore.commit`); the folds it writes are :meth:`WritePath.fold`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from .backends import ArrayBackend
from .catalog import ParamState, TaskState, unknown_param
from .codecs import CodecSpec
from .ema import as_grad_sq, decay_factor, fold, step_weight
from .errors import FisherStoreError, StepError, StorageError, UnknownParamError, human_bytes
from .format import array_attributes
from .iopool import IOPool, wait_all
from .layout import ParamLayout
from .read import read_generation
from .regions import (
    Region,
    aligned_region,
    axis_region,
    chunk_span,
    covers_once,
    grid_shape,
    iter_slabs,
    offset_region,
    region_nbytes,
    region_shape,
    runs,
    split_axis,
)
from .residency import HostCopy, MemoryPlan, Residency, host_tensor

__all__ = ["WritePath", "StepWriter"]

#: ``create(task, name, shape, layout) -> ParamState``: how a step adds a parameter named in ``layouts=``.
CreateParam = Callable[[str, str, tuple[int, ...], ParamLayout | None], ParamState]


class WritePath:
    """Writes generations for one store: streamed steps and flush folds, on a bounded I/O pool."""

    def __init__(self, backend: ArrayBackend, pool: IOPool, plan: MemoryPlan, residency: Residency,
                 codecs: CodecSpec, nonfinite: str) -> None:
        self.backend = backend
        self.pool = pool
        self.plan = plan
        self.residency = residency
        self.codecs = codecs
        self.nonfinite = nonfinite

    def create_generation(self, p: ParamState, gen: int) -> None:
        self.backend.create_array(p.gen_key(gen), p.shape, p.chunks, array_attributes(p.name, p.layout), self.codecs)

    def rmw(self, task: str, p: ParamState, src: int | None, dst: int, region: Region, scale: float, x: Any,
            alpha: float) -> None:
        """``dst[region] = scale · src[region] + alpha · x`` (``x`` may be None: decay only). Runs on a worker."""
        if src is None:
            F = torch.zeros(region_shape(region), dtype=torch.float32)
        else:
            F = torch.from_numpy(read_generation(self.backend, task, p, src, region))
            if scale != 1.0:
                F.mul_(scale)
        if x is not None:
            F.add_(host_tensor(x), alpha=alpha)
        self.backend.write(p.gen_key(dst), region, F.numpy())

    def fold(self, t: TaskState, bar: Any) -> dict[str, int]:
        """Write every resident accumulator of ``t`` into a new generation: ``F' = β^k·F + A``.

        Returns ``{param: new generation}``; on failure deletes what it wrote and raises.
        """
        written: dict[str, int] = {}
        futures: list[Future] = []
        try:
            for p in t.params.values():
                if p.a_last is None:
                    continue
                new = p.next_gen()
                src, src_t = p.latest()
                self.create_generation(p, new)
                written[p.name] = new
                for region in iter_slabs(p.shape, p.chunks, self.plan.slab_target):
                    futures.append(self.pool.submit(region_nbytes(region), self._fold_slab, t.name, p, src, new,
                                                    region, p.a_last - src_t, bar))
            exc = wait_all(futures)
            if exc is not None:
                raise exc
        except BaseException:
            wait_all(futures)
            self.discard(t, written)
            raise
        return written

    def _fold_slab(self, task: str, p: ParamState, src: int | None, new: int, region: Region, k: int,
                   bar: Any) -> None:
        acc = p.acc[region]
        if acc.device.type != "cpu":
            acc = HostCopy.start(acc).get()
        if src is None:
            out = acc.clone()
        else:
            out = fold(torch.from_numpy(read_generation(self.backend, task, p, src, region)), acc, p.decay, k)
        self.backend.write(p.gen_key(new), region, out.numpy())
        bar.update(out.numel() * 4)

    def discard(self, t: TaskState, gens: dict[str, int]) -> None:
        """Delete generations written for ``t`` that will never be committed."""
        for name, gen in gens.items():
            self.backend.delete(t.params[name].gen_key(gen))


class StepWriter:
    """One EMA step under construction; get one from :meth:`FisherStore.begin_step`.

    Use it as a context manager. Leaving the ``with`` block settles the step: it is
    applied whole, or (if the block raised, or a background write failed) discarded whole.
    """

    def __init__(self, path: WritePath, task: TaskState, tokens: int | None, layouts: dict[str, Any],
                 create: CreateParam, on_end: Callable[[StepWriter, bool], None]) -> None:
        self.path = path
        self.task_state = task
        self.task = task.name
        self.tokens = tokens
        self.layouts = layouts
        self.t = task.step + 1
        self._create = create
        self._on_end = on_end
        # name -> [(region, grad², weight)]: resident contributions, applied when the step settles.
        self.staged: dict[str, list[tuple[Region, Any, float]]] = {}
        self.streamed: dict[str, int] = {}  # name -> the new uncommitted generation
        self.coverage: dict[str, np.ndarray] = {}  # name -> which chunks (along the split axis) it wrote
        self.futures: list[Future] = []
        self._param_futures: dict[str, list[Future]] = {}
        self.touched: set[str] = set()
        self.skipped: dict[str, int] = {}
        self._state = "open"

    def __enter__(self) -> StepWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._state != "open":
            return
        if exc_type is not None:
            self._abort()
            return
        self.settle()

    def __repr__(self) -> str:
        return f"<StepWriter task={self.task!r} step={self.t} params={len(self.touched)} {self._state}>"

    # -- feeding ------------------------------------------------------------------------------
    def add(self, name: str, grad_sq: Any, region: Any = None) -> None:
        """Add one parameter's squared gradient to this step.

        ``region`` (optional) feeds a slab of the parameter: a slice, or tuple of slices,
        aligned to the parameter's chunks along its split axis and covering the other
        axes, so a huge tensor can be streamed without ever being whole in RAM.
        """
        if self._state != "open":
            raise StepError(f"step {self.t} of task {self.task!r} is {self._state}; start a new step")
        p = self._param_for(name, grad_sq, region)
        if not p.owned:
            raise StepError(
                f"parameter {name!r} of task {self.task!r} is written by another rank of the group; "
                "add it on its owner (check store.owns(task, name))"
            )
        region = aligned_region(region, p.shape, p.chunks, p.name)
        x = as_grad_sq(grad_sq, name, region_shape(region), self.path.nonfinite)
        if x is None:
            self.skipped[name] = self.skipped.get(name, 0) + 1
            return
        alpha = step_weight(p.decay, self.tokens)
        if p.resident:
            # Staged by reference and applied when the step is: a step that raises leaves
            # the accumulator untouched. The caller must not modify grad_sq until then.
            self.staged.setdefault(name, []).append((region, self._stage(p, x), alpha))
        else:
            self._stream(p, HostCopy.start(x) if x.device.type != "cpu" else x, alpha, region)
        self.touched.add(name)

    def _param_for(self, name: str, x: Any, region: Any) -> ParamState:
        p = self.task_state.params.get(name)
        if p is None and name in self.layouts:
            if region is not None:
                raise UnknownParamError(f"create parameter {name!r} before feeding it by region")
            p = self._create(self.task, name, tuple(getattr(x, "shape", ())), self.layouts[name])
        if p is None:
            raise unknown_param(self.task_state, name)
        return p

    def _stage(self, p: ParamState, x: torch.Tensor) -> torch.Tensor | HostCopy:
        """Resident gradients stay on their GPU within ``device_budget``, else go to pinned RAM."""
        if x.device.type == "cpu":
            return x
        if p.acc is not None:
            on_device = p.acc.device == x.device
        else:
            on_device = self.path.residency.admit_device(p.nbytes)
        return x if on_device else HostCopy.start(x)

    def _stream(self, p: ParamState, x: Any, alpha: float, region: Region) -> None:
        dst = self.streamed.get(p.name)
        ax = split_axis(p.shape, p.chunks)
        if dst is None:
            dst = p.next_gen()
            self.path.create_generation(p, dst)
            self.streamed[p.name] = dst
            self.coverage[p.name] = np.zeros(grid_shape(p.shape, p.chunks)[ax] if p.shape else 1, dtype=bool)
        cov = self.coverage[p.name]
        c0, c1 = chunk_span(region, p.chunks, ax)
        if cov[c0:c1].any():  # a second contribution to the same chunks: wait for the first
            wait_all(self._param_futures.get(p.name, []))
        src, src_t = p.latest()
        scale = decay_factor(p.decay, self.t - src_t)
        for covered, a, b in runs(cov, c0, c1):
            sub = axis_region(p.shape, ax, a * p.chunks[ax], min(b * p.chunks[ax], p.shape[ax])) if p.shape else ()
            for slab in iter_slabs(region_shape(sub), p.chunks, self.path.plan.slab_target):
                absr = offset_region(slab, sub)
                local = offset_region(absr, [-region[i].start if i == ax else 0 for i in range(len(absr))])
                xs = x.sub(local) if isinstance(x, HostCopy) else x[local]
                self._submit(p, dst if covered else src, dst, absr, 1.0 if covered else scale, xs, alpha)
        cov[c0:c1] = True

    def _submit(self, p: ParamState, src: int | None, dst: int, region: Region, scale: float, x: Any,
                alpha: float) -> None:
        fut = self.path.pool.submit(region_nbytes(region), self.path.rmw, self.task, p, src, dst, region, scale, x,
                                    alpha)
        self.futures.append(fut)
        self._param_futures.setdefault(p.name, []).append(fut)

    def _fill_uncovered(self) -> None:
        """Chunks of a streamed parameter this step did not touch still decay into the new generation."""
        for name, cov in self.coverage.items():
            if cov.all():
                continue
            p = self.task_state.params[name]
            ax = split_axis(p.shape, p.chunks)
            src, src_t = p.latest()
            scale = decay_factor(p.decay, self.t - src_t)
            for covered, a, b in runs(cov, 0, len(cov)):
                if covered:
                    continue
                sub = axis_region(p.shape, ax, a * p.chunks[ax], min(b * p.chunks[ax], p.shape[ax]))
                for slab in iter_slabs(region_shape(sub), p.chunks, self.path.plan.slab_target):
                    self._submit(p, src, self.streamed[name], offset_region(slab, sub), scale, None, 0.0)

    # -- settling -----------------------------------------------------------------------------
    def settle(self) -> None:
        """Wait for this step's writes, then apply it to RAM; on failure discard it whole and raise."""
        try:
            self._fill_uncovered()
        except BaseException:
            self._abort()
            raise
        exc = wait_all(self.futures)
        if exc is not None:
            self._abort()
            needed = sum(self.task_state.params[n].nbytes for n in self.streamed)
            cls = StorageError if isinstance(exc, OSError) else FisherStoreError
            args = (exc.errno,) if isinstance(exc, OSError) else ()
            raise cls(
                *args,
                f"step {self.t} of task {self.task!r} failed while writing in the background "
                f"({type(exc).__name__}: {exc}); it needed {human_bytes(needed)} for the new generations of its "
                f"streamed parameters. The step was discarded whole and the task stays at step "
                f"{self.task_state.step}. Fix the cause (disk space, permissions) and repeat the step.",
            ) from exc
        self._apply()
        self._state = "committed"
        self._on_end(self, True)

    def _abort(self) -> None:
        self._state = "aborted"
        wait_all(self.futures)
        self.path.discard(self.task_state, self.streamed)
        self.staged.clear()
        self._on_end(self, False)

    def _apply(self) -> None:
        """Apply the settled step to the task's RAM state: the one place a step changes it."""
        t = self.task_state
        for name, entries in self.staged.items():
            p = t.params[name]
            first = host_tensor(entries[0][1])
            fresh = p.a_last is None  # the accumulator holds nothing (new, or folded by a flush)
            if p.acc is None:
                p.acc = torch.empty(p.shape, dtype=torch.float32, device=first.device)
            f = 0.0 if fresh else decay_factor(p.decay, self.t - p.a_last)
            if covers_once(p.shape, p.chunks, [r for r, _, _ in entries]):
                # Decay and add one region at a time, so the second pass over a slab hits
                # the cache: half the memory traffic of decaying the whole tensor first.
                for region, x, alpha in entries:
                    a = p.acc[region]
                    if fresh:
                        torch.mul(host_tensor(x), alpha, out=a)
                    else:
                        if f != 1.0:
                            a.mul_(f)
                        a.add_(host_tensor(x), alpha=alpha)
            else:  # overlapping or partial regions: decay everything, then add each
                if fresh:
                    p.acc.zero_()
                elif f != 1.0:
                    p.acc.mul_(f)
                for region, x, alpha in entries:
                    p.acc[region].add_(host_tensor(x), alpha=alpha)
            p.a_last = self.t
        for name, gen in self.streamed.items():
            p = t.params[name]
            if p.work_gen is not None:  # the previous uncommitted generation is superseded
                self.path.backend.delete(p.gen_key(p.work_gen))
            p.work_gen, p.work_t = gen, self.t
        for name in self.touched:
            t.params[name].updates += 1
        for name, n in self.skipped.items():
            t.params[name].nonfinite_skipped += n
        t.step = self.t
        t.tokens_seen += self.tokens or 0
