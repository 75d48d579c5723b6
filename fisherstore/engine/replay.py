"""The write side of a multi-pass run: replay one task's steps once per pass, each pass for some of its parameters.

A multi-pass run (:mod:`fisherstore.collect.multipass`) feeds the same N steps once per pass,
each pass for its own parameters. :class:`Replay` is its hold on the task's RAM state: it rewinds the task's
step and token count before each pass, gives the pass's parameters accumulators (on
the device or in host memory, as planned), and at the pass's end folds them into new
**uncommitted** generations and frees them for the next pass. Nothing is committed until
the run's one flush; :meth:`Replay.abort` puts the RAM state back where the run found it
(the last commit) and deletes what the run wrote, so an interrupted run leaves the store
at its last commit, in this process and on disk (recovery deletes uncommitted generations).

While it replays, a step holds its inputs and folds them into the accumulators in place
once judged, as every step does (:mod:`fisherstore.engine.step.fills`): one buffer per
parameter. Only gradients that cross from a GPU into host accumulators fill the
accumulator as they land (``in_place``: the run is discarded whole on failure), or a twin
where ``nonfinite="skip"`` must be able to drop one parameter's step. The store's
automatic flushes wait.

Usage::

    r = store.replay(task, names)          # a Replay
    r.begin_pass(names, placement, device)   # then one store step per batch
    r.end_pass(names)                   # the pass's state, written once
    r.finish()                          # then store.flush() commits everything
"""

from __future__ import annotations

import contextlib
import copy

import torch

from ..errors import FisherStoreError, StepError
from .catalog import TaskState
from .generations import WritePath
from .memory import MIN_SLAB

__all__ = ["Replay"]


class Replay:
    """A multi-pass run's hold on ``t``: rewinds, placement, one write per pass, rollback."""

    def __init__(self, path: WritePath, t: TaskState, names: list[str], in_place: bool) -> None:
        dirty = [n for n in names if t.params[n].dirty]
        if dirty:
            raise StepError(f"parameters {dirty[:3]} of task {t.name!r} hold unflushed steps; flush() before a "
                            "multi-pass run, which starts from a commit")
        self.path, self.t, self.names = path, t, list(names)
        self.in_place = in_place
        self.copies = 1  # buffers per accumulator; 2 for CUDA gradients into host twins (capacity() says)
        self.t0, self.tok0 = t.step, t.tokens_seen
        self._info, self._changed = copy.deepcopy(t.info), t.changed
        self._counters = {n: (t.params[n].updates, t.params[n].nonfinite_skipped) for n in names}
        self._device: dict[str, torch.device] = {}
        self._host = 0
        self.ends: list[tuple[int, int]] = []
        #: bytes of one chunk of each parameter: the end-of-pass folds write one chunk per task
        self.chunk_bytes = {n: min(4 * _prod(t.params[n].chunks), t.params[n].nbytes) for n in names}
        self.slab = max(self.chunk_bytes.values(), default=0) or MIN_SLAB
        # Each worker then holds a chunk it read and the codec's copy of the chunk it writes (the
        # accumulator is folded in place, not copied); with no generation on disk yet (a new task)
        # there is nothing to read, only the copy. multipass.fold_headroom turns this into bytes.
        reads = any(t.params[n].latest()[0] is not None for n in names)
        self.per_chunk = max(1, path.plan.workers) * (2 if reads else 1)
        with path.lock:
            for n in names:  # the run owns these parameters' residency until it ends
                p = t.params[n]
                path.unplace(t.name, p)
                if p.resident:
                    path.residency.release(p.nbytes, p.held_copy)
                    p.resident = False
            path.replaying, path.in_place = t.name, in_place

    def capacity(self, device: torch.device) -> tuple[int, int]:
        """Accumulator bytes the run may fill: (host memory, ``device``) after the folds' slabs.

        Sets :attr:`copies`: 2 only where CUDA gradients fill host twins (``nonfinite="skip"``).
        """
        self.copies = 2 if device.type == "cuda" and not self.in_place else 1
        host = max(0, self.path.plan.total - self.path.residency.host_bytes)
        dev = self.path.residency.device_left(device) if device.type != "cpu" else 0
        return host, dev

    def begin_pass(self, names: list[str], placement: dict[str, str], device: torch.device) -> None:
        """Rewind the task to where the run started and give ``names`` accumulators where ``placement`` says."""
        res, t = self.path.residency, self.t
        host_cap = self.capacity(device)[0]
        with self.path.lock:
            t.step, t.tokens_seen = self.t0, self.tok0
            for n in names:
                p = t.params[n]
                where = None
                if placement.get(n) == "device" and res.admit_device(p.nbytes, device, self.copies):
                    where = self._device[n] = device
                elif placement.get(n) in ("device", "host") and self._host + self.copies * p.nbytes <= host_cap:
                    where = torch.device("cpu")
                    self._host += self.copies * p.nbytes
                if where is None:
                    continue  # streamed: a read-modify-write of its state per step
                p.resident = True
                p.acc, p.spare, p.a_last = torch.empty(p.shape, dtype=torch.float32, device=where), None, None

    def end_pass(self, names: list[str]) -> None:
        """Write the pass's accumulators once (uncommitted) and free them for the next pass."""
        t = self.t
        self.ends.append((t.step, t.tokens_seen))
        fed = sorted((n for n in names if t.params[n].a_last is not None), key=self.chunk_bytes.__getitem__)
        self.path.fold_to_work(t, fed, self.slab, free=True)  # smallest chunks first, each freed once written
        with self.path.lock:
            for n in names:
                self._evict(n)

    def finish(self) -> None:
        """Every pass ended at the same step and token count: the task takes them; residency as before."""
        if len(set(self.ends)) > 1:
            raise FisherStoreError(
                f"the passes of a multi-pass run of task {self.t.name!r} ended at different (step, tokens) "
                f"{sorted(set(self.ends))}: the batches changed between passes"
            )
        with self.path.lock:
            if self.ends:
                self.t.step, self.t.tokens_seen = self.ends[-1]
            self._release()

    def abort(self) -> None:
        """Put the task back at the run's start (its last commit) and delete what the run wrote."""
        t = self.t
        with self.path.lock:
            for n in self.names:
                p = t.params[n]
                self._evict(n)
                if p.work_gen is not None:
                    with contextlib.suppress(OSError):  # left behind, it is an uncommitted generation recovery deletes
                        self.path.backend.delete(p.gen_key(p.work_gen))
                p.work_gen, p.work_t, p.a_last = None, 0, None
                p.updates, p.nonfinite_skipped = self._counters[n]
            t.step, t.tokens_seen = self.t0, self.tok0
            t.info, t.changed = self._info, self._changed
            self._release()

    def _evict(self, n: str) -> None:
        p = self.t.params[n]
        dev = self._device.pop(n, None)
        if dev is not None:
            self.path.residency.release_device(p.nbytes, dev, self.copies)
        elif p.resident:
            self._host -= self.copies * p.nbytes
        p.acc = p.spare = None
        p.resident = False

    def _release(self) -> None:
        for n in self.names:
            if self.t.params[n].resident:
                self._evict(n)
        # The parameters are decided again at the first step after the run's commit (WritePath.admit).
        self.path.replaying, self.path.in_place = None, False


def _prod(xs: tuple[int, ...]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
