"""The write path of a store: generations, streamed read-modify-writes, and the folds a flush writes.

:class:`WritePath` holds what outlives one step: the backend and I/O pool, the memory plan
and residency (which accumulators live on a device), the device stagers, and whether a
multi-pass run replays a task (:mod:`fisherstore.engine.replay`). One step is a
:class:`~fisherstore.engine.step.StepWriter`, which drives this path; its resident side is
:mod:`fisherstore.engine.step.fills`. The life of a step and of a flush: docs/architecture.md.

Usage::

    path = WritePath(backend, pool, plan, residency, codecs, nonfinite="raise")
    new = path.fold(task_state, bar)       # a flush's folds: {param: new generation}
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import torch

from ..backends import ArrayBackend
from ..progress import NoBar
from ..spec.codecs import CodecSpec
from ..spec.ema import fold
from ..spec.format import array_attributes
from ..spec.regions import Region, iter_slabs, region_nbytes, region_shape
from .catalog import ParamState, TaskState
from .iopool import IOPool, wait_all
from .memory import MemoryPlan, Residency
from .read import read_generation
from .staging import DeviceStager, HostCopy, host_tensor

__all__ = ["WritePath"]

class WritePath:
    """Writes generations for one store: streamed steps and flush folds, on a bounded I/O pool.

    It also owns what outlives a step on the way there: the device stagers, which
    accumulators live on a device, and whether a multi-pass run is replaying a task
    (:mod:`fisherstore.engine.replay`): then automatic flushes wait, and ``in_place`` steps add
    into the accumulator itself instead of its twin.
    """

    def __init__(self, backend: ArrayBackend, pool: IOPool, plan: MemoryPlan, residency: Residency,
                 codecs: CodecSpec, nonfinite: str, lock: threading.RLock | None = None) -> None:
        self.backend = backend
        self.lock = lock or threading.RLock()  # guards RAM state against reader threads
        self.pool = pool
        self.plan = plan
        self.residency = residency
        self.codecs = codecs
        self.nonfinite = nonfinite
        self.replaying: str | None = None  # the task a multi-pass run replays
        self.in_place = False
        self.on_device: dict[tuple[str, str], tuple[torch.device, int]] = {}  # accumulators reserved on a device
        self.stager_factory: Callable[[torch.device], DeviceStager] = DeviceStager
        self._stagers: dict[str, DeviceStager] = {}
        self._summable: dict[tuple[str, str], bool] = {}
        pool.on_shutdown(self.close)

    def stager(self, device: torch.device) -> DeviceStager:
        """The stager of ``device`` (made on first use; stopped when the store closes)."""
        key = str(device)
        if key not in self._stagers:
            self._stagers[key] = self.stager_factory(device)
        return self._stagers[key]

    def stages(self, x: torch.Tensor, target: torch.Tensor) -> bool:
        """Whether ``x`` reaches ``target`` through a stager (a CUDA tensor bound for host memory)."""
        return x.device.type == "cuda" and target.device.type == "cpu"

    def may_sum(self, task: str, p: ParamState, device: torch.device) -> bool:
        """Whether ``p``'s micro-batches may be summed on ``device`` before one copy per step (decided once)."""
        key = (task, p.name)
        if key not in self._summable:
            self._summable[key] = self.residency.admit_staging(p.nbytes, device)
        return self._summable[key]

    def place(self, task: str, p: ParamState, device: torch.device, copies: int = 2) -> torch.device:
        """Where a resident accumulator of ``p`` goes whose gradients arrive on ``device``."""
        if device.type != "cpu" and self.residency.admit_device(p.nbytes, device, copies):
            self.on_device[(task, p.name)] = (device, copies)  # resident gradients stay on their GPU
            return device
        return torch.device("cpu")

    def admit(self, t: TaskState, p: ParamState, donated: bool) -> None:
        """Decide, at the first step that feeds ``p`` since its last commit, whether it is resident.

        Only then: a streamed parameter's state since the last commit is a working generation
        on disk, which an accumulator would have to be folded into with other roundings than a
        resident parameter's. At a step's first feed the caller's way of feeding is known:
        ``donated`` (a whole square it hands over) costs one buffer, anything else two
        (:class:`~fisherstore.engine.memory.Residency`). A multi-pass run places the
        parameters of the task it replays itself.
        """
        if p.resident or not p.owned or p.work_gen is not None or self.replaying == t.name:
            return
        copies = 1 if donated else 2
        admitted = self.residency.admit(p.nbytes, held_copy=not donated)
        if not admitted:
            # When every parameter still to place fits with the queue's floor, nothing will stream:
            # the floor may hold accumulators too (1.25 x S keeps all resident on small models).
            # Summed only here, where the plain admission failed: not on every first feed.
            rest = sum(q.nbytes for q in t.params.values() if q.owned and not q.resident)
            if self.residency.host_bytes + rest * copies <= self.plan.resident_bytes + self.plan.queue_bytes:
                admitted = self.residency.admit(p.nbytes, held_copy=not donated, queue_too=True)
        if admitted:
            p.resident, p.held_copy = True, not donated

    def evict(self, t: TaskState, p: ParamState) -> None:
        """Take ``p`` out of the resident set between its steps: its accumulator is folded into a working
        generation (as a streamed step leaves it; the next flush commits it) and freed, and ``p`` streams.

        For a resident parameter whose next step would need a copy the budget cannot hold
        (:meth:`Residency.fits_copy`). On a write error nothing changes: ``p`` stays resident.
        """
        if p.a_last is not None:
            self.fold_to_work(t, [p.name])
        with self.lock:
            self.unplace(t.name, p)
            self.residency.release(p.nbytes, p.held_copy)
            p.resident, p.held_copy = False, True

    def unplace(self, task: str, p: ParamState) -> None:
        """Drop ``p``'s accumulator buffers (holding nothing unflushed) and any device reservation."""
        held = self.on_device.pop((task, p.name), None)
        if held is not None:
            self.residency.release_device(p.nbytes, *held)
        p.acc = p.spare = None

    def close(self) -> None:
        for s in self._stagers.values():
            s.close()
        self._stagers.clear()

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

    def fold(self, t: TaskState, bar: Any, names: Iterable[str] | None = None, slab: int | None = None,
             free: bool = False) -> dict[str, int]:
        """Write every resident accumulator of ``t`` (or of ``names``) into a new generation: ``F' = β^k·F + A``.

        ``free``: write ``names`` one at a time in the order given, and drop each accumulator
        once it is written, so the fold's I/O buffers come out of the
        memory the accumulators before it freed (a multi-pass run: its accumulators are
        spent by the fold; :func:`fisherstore.collect.multipass.fold_headroom`).
        Returns ``{param: new generation}``; on failure deletes what it wrote and raises.
        """
        written: dict[str, int] = {}
        futures: list[Future] = []
        params = t.params.values() if names is None else [t.params[n] for n in names]
        try:
            for p in params:
                if p.a_last is None:
                    continue
                new = p.next_gen()
                src, src_t = p.latest()
                self.create_generation(p, new)
                written[p.name] = new
                mine = [self.pool.submit(region_nbytes(region), self._fold_slab, t.name, p, src, new, region,
                                         p.a_last - src_t, bar)
                        for region in iter_slabs(p.shape, p.chunks, slab or self.plan.slab_target)]
                futures += mine
                if free:  # written whole before the next starts: its accumulator's memory is theirs
                    self._written_free(p, mine)
            exc = wait_all(futures)
            if exc is not None:
                raise exc
        except BaseException:
            wait_all(futures)
            self.discard(t, written)
            raise
        return written

    @staticmethod
    def _written_free(p: ParamState, futures: list[Future]) -> None:
        exc = wait_all(futures)
        if exc is not None:
            raise exc
        p.acc = None  # a_last stays until fold_to_work marks the accumulator spent

    def fold_to_work(self, t: TaskState, names: Iterable[str], slab: int | None = None,
                     free: bool = False) -> dict[str, int]:
        """Fold ``names``' accumulators into new **uncommitted** generations, as a streamed step leaves them.

        The next flush commits them with the task; until then a crash loses them. Used by a
        multi-pass run at the end of each pass (:mod:`fisherstore.engine.replay`).
        """
        written = self.fold(t, NoBar(), names, slab, free)
        with self.lock:
            for name, gen in written.items():
                p = t.params[name]
                if p.work_gen is not None:  # superseded by the fold, which read it
                    with contextlib.suppress(OSError):
                        self.backend.delete(p.gen_key(p.work_gen))
                p.work_gen, p.work_t, p.a_last = gen, p.a_last, None
        return written

    def _fold_slab(self, task: str, p: ParamState, src: int | None, new: int, region: Region, k: int,
                   bar: Any) -> None:
        acc = p.acc[region]
        if acc.device.type != "cpu":
            acc = HostCopy.start(acc).get()
        if src is None:
            out = acc  # the backend copies what it writes; no step runs during a flush
        else:  # into the buffer just read: one chunk-sized buffer per worker besides the codec's
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
