"""One EMA step under construction: :class:`StepWriter`, from ``begin_step`` to settle.

The life of a step (docs/architecture.md)::

    st = store.begin_step(task, tokens)   # a StepWriter for step t = task.step + 1
    st.add(name, grad_sq)                 # resident: into the step's target (fisherstore.engine.step.fills)
                                          # streamed: read-modify-writes into a new
                                          #   uncommitted generation, on the I/O pool
    (leave the with block)                # settle(): wait for copies and writes, read the value
                                          #   checks once, then apply the step to RAM, or discard
                                          #   it whole and raise

A step is applied in exactly one place, :meth:`StepWriter.settle`. ``add`` never waits for
a device: value checks are read once per step when it settles (:mod:`fisherstore.engine.step.checks`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import FisherStoreError, StepError, StorageError, StoreLockedError, UnknownParamError, human_bytes
from ...spec.ema import decay_factor, step_weight
from ...spec.layout import ParamLayout
from ...spec.regions import (
    Region,
    aligned_region,
    axis_chunk_count,
    chunk_run,
    chunk_span,
    full_region,
    iter_slabs,
    offset_region,
    origin,
    region_nbytes,
    region_shape,
    runs,
    split_axis,
)
from ..catalog import ParamState, TaskState, unknown_param
from ..iopool import wait_all
from ..staging import HostCopy
from ..transaction import Transaction
from .checks import StepChecks, prepare_grad_sq, verdict_error
from .fills import Fills

if TYPE_CHECKING:
    from ..generations import WritePath

__all__ = ["StepWriter"]

#: ``create(task, name, shape, layout) -> ParamState``: how a step adds a parameter named in ``layouts=``.
CreateParam = Callable[[str, str, tuple[int, ...], ParamLayout | None], ParamState]


class StepWriter(Transaction):
    """One EMA step under construction; get one from :meth:`FisherStore.begin_step`.

    Use it as a context manager. Leaving the ``with`` block settles the step: it is
    applied whole, or (if the block raised, a background write failed, or a value check
    failed) discarded whole. ``add`` consumes each squared gradient before it returns,
    unless the caller donates it.
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
        self.fills = Fills(path, task, self.t)  # resident parameters this step feeds
        self.streamed: dict[str, int] = {}  # name -> the new uncommitted generation
        self.coverage: dict[str, np.ndarray] = {}  # name -> which chunks (along the split axis) it wrote
        self.futures: list[Future] = []
        self._param_futures: dict[str, list[Future]] = {}
        self.touched: set[str] = set()
        self.skipped: dict[str, int] = {}
        self.checks = StepChecks()
        self.state = "open"

    def __enter__(self) -> StepWriter:
        return self

    def __repr__(self) -> str:
        return f"<StepWriter task={self.task!r} step={self.t} params={len(self.touched)} {self.state}>"

    # -- feeding ------------------------------------------------------------------------------
    def add(self, name: str, grad_sq: Any, region: Any = None, *, trusted: bool = False, donate: bool = False,
            final: bool = False) -> None:
        """Add one parameter's squared gradient to this step.

        ``region`` (optional) feeds a slab of the parameter: a slice, or tuple of slices,
        aligned to the parameter's chunks along its split axis and covering the other
        axes, so a huge tensor can be streamed without ever being whole in RAM.

        Keywords for callers that feed from backward hooks (the collector):
        ``trusted``: the value is a square the caller computed, so it cannot be negative;
        NaN/Inf is then found once per step on the accumulated result instead of per call.
        ``donate``: the caller will not touch the tensor again, so it is kept or copied
        without a snapshot (on a side stream). ``final``: no more contributions of ``name``
        come this step, so a sum kept on the device starts its one copy to the host now.
        """
        if self.state != "open":
            raise StepError(f"step {self.t} of task {self.task!r} is {self.state}; start a new step")
        p = self._param_for(name, grad_sq, region)
        if not p.owned:
            raise StepError(
                f"parameter {name!r} of task {self.task!r} is written by another rank of the group; "
                "add it on its owner (check store.owns(task, name))"
            )
        region = aligned_region(region, p.shape, p.chunks, p.name)
        x = prepare_grad_sq(grad_sq, name, region_shape(region))
        if p.name not in self.streamed:  # streamed earlier in this step: it stays streamed until the commit
            self.path.admit(self.task_state, p, donated=donate and region == full_region(p.shape))
        if p.resident and self.fills.needs_copy(p, region, x, donate) and not self.path.residency.fits_copy(p.nbytes):
            # A kept input needs a copy the budget cannot hold: the accumulator goes to disk (a working
            # generation at its last step) and the parameter streams from here, within the budget.
            self.path.evict(self.task_state, p)
        if not (trusted and p.resident):
            bad = self.checks.watch(name, x)  # CPU: judged now; a device: read at settle
            if bad is not None:
                if bad.negative or self.path.nonfinite == "raise":
                    raise verdict_error(name, bad, x.numel())
                return  # skipped at settle, with the rest of this parameter's step
        alpha = step_weight(p.decay, self.tokens)
        try:
            if p.resident:
                self.fills.add(p, region, x, alpha, donate=donate, final=final, trusted=trusted)
            else:
                self._stream(p, HostCopy.start(x) if x.device.type == "cuda" else x.to("cpu"), alpha, region)
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

    def _stream(self, p: ParamState, x: Any, alpha: float, region: Region) -> None:
        dst = self.streamed.get(p.name)
        ax = split_axis(p.shape, p.chunks)
        if dst is None:
            dst = p.next_gen()
            self.path.create_generation(p, dst)
            self.streamed[p.name] = dst
            self.coverage[p.name] = np.zeros(axis_chunk_count(p.shape, p.chunks), dtype=bool)
        cov = self.coverage[p.name]
        c0, c1 = chunk_span(region, p.chunks, ax)
        if cov[c0:c1].any():  # a second contribution to the same chunks: wait for the first
            wait_all(self._param_futures.get(p.name, []))
        src, src_t = p.latest()
        scale = decay_factor(p.decay, self.t - src_t)
        for covered, a, b in runs(cov, c0, c1):
            sub = chunk_run(p.shape, p.chunks, ax, a, b)
            for slab in iter_slabs(region_shape(sub), p.chunks, self.path.plan.slab_target):
                absr = offset_region(slab, sub)
                local = offset_region(absr, origin(region, ax))
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

    def _decay_streamed(self, name: str, everywhere: bool = False) -> None:
        """Streamed chunks this step did not feed (all, for a skipped parameter) decay into the new generation."""
        cov = self.coverage[name]
        p = self.task_state.params[name]
        ax = split_axis(p.shape, p.chunks)
        src, src_t = p.latest()
        scale = decay_factor(p.decay, self.t - src_t)
        for covered, a, b in runs(np.zeros_like(cov) if everywhere else cov, 0, len(cov)):
            if covered:
                continue
            sub = chunk_run(p.shape, p.chunks, ax, a, b)
            for slab in iter_slabs(region_shape(sub), p.chunks, self.path.plan.slab_target):
                self._submit(p, src, self.streamed[name], offset_region(slab, sub), scale, None, 0.0)

    # -- settling -----------------------------------------------------------------------------
    def settle(self) -> None:
        """Wait for this step's copies and writes, check its values, then apply it to RAM; else discard it whole."""
        try:
            for name, cov in self.coverage.items():
                if not cov.all():
                    self._decay_streamed(name)
            self.fills.complete(self.checks)
            exc = wait_all(self.futures)
            if exc is not None:
                raise self._failed(exc) from exc
            self._judge(self.checks.verdicts())
        except BaseException as e:
            self.discard()
            if isinstance(e, OSError) and not isinstance(e, FisherStoreError):
                raise self._failed(e) from e
            raise
        with self.path.lock:
            self._apply()
        self.state = "committed"
        self._on_end(self, True)

    def _judge(self, bad: dict[str, Any]) -> None:
        """Raise for a bad value (the step is then discarded), or skip the parameters ``nonfinite="skip"`` lets go."""
        for name, v in bad.items():
            if v.negative or self.path.nonfinite == "raise":
                raise verdict_error(name, v, self.task_state.params[name].nbytes // 4)
        for name in bad:
            if not self.fills.undoable(name):
                raise StepError(f"a skipped update of {name!r} cannot be undone in place; a multi-pass run with "
                                "nonfinite='skip' fills twins")  # replay.py never lets this happen
            self.fills.drop(name)
            if name in self.streamed:
                wait_all(self._param_futures.get(name, []))
                self._decay_streamed(name, everywhere=True)  # rewrite the generation without this step's x
            self.touched.discard(name)
            self.skipped[name] = self.skipped.get(name, 0) + 1
        exc = wait_all(self.futures)
        if exc is not None:
            raise self._failed(exc) from exc

    def discard(self) -> None:
        """Drop this step whole: nothing it fed reaches the store. Safe to call twice."""
        if self.state != "open":
            return
        self.state = "aborted"
        self.fills.discard()
        wait_all(self.futures)
        self.path.discard(self.task_state, self.streamed)
        self._on_end(self, False)

    def _failed(self, exc: BaseException) -> FisherStoreError:
        if isinstance(exc, StoreLockedError):  # the writer's lease was taken over: not the disk, and no retry
            return StoreLockedError(f"step {self.t} of task {self.task!r} was discarded: {exc}")
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
        self.fills.apply()
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
