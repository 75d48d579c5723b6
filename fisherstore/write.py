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

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
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
    full_region,
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
                 codecs: CodecSpec, nonfinite: str, lock: threading.RLock | None = None) -> None:
        self.backend = backend
        self.lock = lock or threading.RLock()  # guards RAM state against reader threads
        self.pool = pool
        self.plan = plan
        self.residency = residency
        self.codecs = codecs
        self.nonfinite = nonfinite

    def create_generation(self, p: ParamState, gen: int) -> None:
        """A new generation, marked pending until a commit names it (docs/format.md)."""
        self.backend.create_array(p.gen_key(gen), p.shape, p.chunks, array_attributes(p.name, p.layout, pending=True),
                                  self.codecs)

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
        """Delete generations written for ``t`` that will never be committed.

        Best effort: one that cannot be deleted (a failing disk) is an uncommitted
        generation, which readers ignore and the next writer removes.
        """
        for name, gen in gens.items():
            with contextlib.suppress(OSError):
                self.backend.delete(t.params[name].gen_key(gen))


@dataclass
class _Fill:
    """A resident parameter's accumulator for this step, filled in its twin buffer.

    ``target[c] = β^Δ·acc[c] + Σ (1-β)/T·x`` for each chunk ``c`` the step feeds; the rest
    is decayed when the step settles. The step is applied by swapping ``target`` with the
    accumulator, so a discarded step leaves the accumulator untouched, and a gradient is
    consumed before ``add`` returns (the caller may reuse its buffer).
    """

    target: torch.Tensor
    covered: np.ndarray  # chunks along the split axis already in `target`
    factor: float  # β^(t - a_last); 0 when the accumulator holds nothing yet
    host: list[tuple[Region, HostCopy, float]] = field(default_factory=list)  # GPU grads bound for a RAM acc


class StepWriter:
    """One EMA step under construction; get one from :meth:`FisherStore.begin_step`.

    Use it as a context manager. Leaving the ``with`` block settles the step: it is
    applied whole, or (if the block raised, or a background write failed) discarded whole.
    ``add`` consumes each squared gradient before it returns.
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
        self.fills: dict[str, _Fill] = {}  # resident parameters this step feeds
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
            self.discard()
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
        try:
            if p.resident:
                fill = self._fill(p, x.device)
                if fill.target.device.type == "cpu" and x.device.type != "cpu":
                    # A GPU gradient for an accumulator in RAM: the copy starts now (into our own
                    # pinned buffer) and is added when the step settles, so backward never waits.
                    fill.host.append((region, HostCopy.start(x), alpha))
                else:
                    self._accumulate(p, fill, region, x.to(fill.target.device), alpha)
            else:
                self._stream(p, HostCopy.start(x) if x.device.type != "cpu" else x, alpha, region)
        except OSError as e:
            raise self._failed(e) from e
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

    def _fill(self, p: ParamState, device: torch.device) -> _Fill:
        fill = self.fills.get(p.name)
        if fill is None:
            if p.spare is None:
                if p.acc is not None:
                    where = p.acc.device
                elif device.type != "cpu" and self.path.residency.admit_device(p.nbytes):
                    where = device  # resident gradients stay on their GPU within device_budget
                else:
                    where = torch.device("cpu")
                p.spare = torch.empty(p.shape, dtype=torch.float32, device=where)
            factor = 0.0 if p.a_last is None else decay_factor(p.decay, self.t - p.a_last)
            fill = self.fills[p.name] = _Fill(p.spare, np.zeros(_axis_chunks(p), dtype=bool), factor)
        return fill

    def _accumulate(self, p: ParamState, fill: _Fill, region: Region, x: torch.Tensor | None, alpha: float) -> None:
        """``target = β^Δ·acc + alpha·x`` over ``region`` (``+= alpha·x`` where the step already wrote).

        ``x`` None fills ``region`` with the decayed accumulator alone.
        """
        ax = split_axis(p.shape, p.chunks)
        c0, c1 = chunk_span(region, p.chunks, ax)
        for covered, a, b in runs(fill.covered, c0, c1):
            sub = axis_region(p.shape, ax, a * p.chunks[ax], min(b * p.chunks[ax], p.shape[ax])) if p.shape else ()
            tgt = fill.target[sub]
            xs = None if x is None else x[offset_region(sub, _origin(region, ax))]
            if not covered:
                if fill.factor == 0.0:
                    if xs is None:
                        tgt.zero_()
                    else:
                        torch.mul(xs, alpha, out=tgt)
                        continue
                elif fill.factor == 1.0:
                    tgt.copy_(p.acc[sub])
                else:
                    torch.mul(p.acc[sub], fill.factor, out=tgt)
            if xs is not None:
                tgt.add_(xs, alpha=alpha)
        fill.covered[c0:c1] = True

    def _stream(self, p: ParamState, x: Any, alpha: float, region: Region) -> None:
        dst = self.streamed.get(p.name)
        ax = split_axis(p.shape, p.chunks)
        if dst is None:
            dst = p.next_gen()
            self.path.create_generation(p, dst)
            self.streamed[p.name] = dst
            self.coverage[p.name] = np.zeros(_axis_chunks(p), dtype=bool)
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
                local = offset_region(absr, _origin(region, ax))
                # Our own copy of each slab, so the caller may reuse its buffer once add() returns
                # (a HostCopy is ours already). Slab by slab keeps it within the I/O queue's bound.
                xs = x.sub(local) if isinstance(x, HostCopy) else x[local].clone()
                self._submit(p, dst if covered else src, dst, absr, 1.0 if covered else scale, xs, alpha)
        cov[c0:c1] = True

    def _submit(self, p: ParamState, src: int | None, dst: int, region: Region, scale: float, x: Any,
                alpha: float) -> None:
        fut = self.path.pool.submit(region_nbytes(region), self.path.rmw, self.task, p, src, dst, region, scale, x,
                                    alpha)
        self.futures.append(fut)
        self._param_futures.setdefault(p.name, []).append(fut)

    def _fill_uncovered(self) -> None:
        """What this step did not feed still decays: streamed chunks into the new generation, resident in RAM."""
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
        for name, fill in self.fills.items():
            p = self.task_state.params[name]
            for region, copy, alpha in fill.host:
                self._accumulate(p, fill, region, copy.get(), alpha)
            if not fill.covered.all():
                self._accumulate(p, fill, full_region(p.shape), None, 0.0)

    # -- settling -----------------------------------------------------------------------------
    def settle(self) -> None:
        """Wait for this step's writes, then apply it to RAM; on failure discard it whole and raise."""
        try:
            self._fill_uncovered()
        except BaseException as e:
            self.discard()
            if isinstance(e, OSError) and not isinstance(e, FisherStoreError):
                raise self._failed(e) from e
            raise
        exc = wait_all(self.futures)
        if exc is not None:
            self.discard()
            raise self._failed(exc) from exc
        with self.path.lock:
            self._apply()
        self._state = "committed"
        self._on_end(self, True)

    def discard(self) -> None:
        """Drop this step whole: nothing it fed reaches the store. Safe to call twice."""
        if self._state != "open":
            return
        self._state = "aborted"
        wait_all(self.futures)
        self.path.discard(self.task_state, self.streamed)
        self.fills.clear()
        self._on_end(self, False)

    def _failed(self, exc: BaseException) -> FisherStoreError:
        needed = sum(self.task_state.params[n].nbytes for n in self.streamed)
        cls = StorageError if isinstance(exc, OSError) else FisherStoreError
        args = (exc.errno,) if isinstance(exc, OSError) else ()
        return cls(
            *args,
            f"step {self.t} of task {self.task!r} failed while writing "
            f"({type(exc).__name__}: {exc}); it needed {human_bytes(needed)} for the new generations of its "
            f"streamed parameters. The step was discarded whole and the task stays at step "
            f"{self.task_state.step}. Fix the cause (disk space, permissions) and repeat the step.",
        )

    def _apply(self) -> None:
        """Apply the settled step to the task's RAM state: the one place a step changes it."""
        t = self.task_state
        for name, fill in self.fills.items():
            p = t.params[name]
            p.acc, p.spare = fill.target, p.acc  # the filled twin becomes the accumulator
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


def _axis_chunks(p: ParamState) -> int:
    """How many chunks ``p`` has along its split axis (1 for a 0-d parameter)."""
    return grid_shape(p.shape, p.chunks)[split_axis(p.shape, p.chunks)] if p.shape else 1


def _origin(region: Region, ax: int) -> list[int]:
    """Offsets that move absolute coordinates into ``region``'s own (regions start at 0 but on ``ax``)."""
    return [-region[i].start if i == ax else 0 for i in range(len(region))]
