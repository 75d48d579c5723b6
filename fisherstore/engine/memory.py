"""How a memory budget is spent: the memory plan, which parameters stay resident, and the heap.

* :class:`MemoryPlan` splits ``memory_budget`` into I/O buffers (slabs in flight on the
  workers) and the **fixed resident set**, whose parameters accumulate steps in RAM and
  fold on flush; what the resident set leaves over queues squared gradients waiting to be
  streamed (docs/design.md, "Memory"; docs/architecture.md, "The memory plan").
* :class:`Residency` owns the byte counts: it decides, once per parameter, whether it is
  resident, whether a resident parameter whose gradients arrive on a GPU keeps its
  accumulator there (within ``device_budget``, by default the device's free memory less a
  margin, :func:`device_room`), and whether a step's micro-batches may be summed on the
  device first.
* :func:`trim_heap` hands freed heap memory back to the OS after a slab of I/O work.

How squared gradients cross from a GPU into host memory is :mod:`.staging`.

Usage::

    plan = MemoryPlan.from_budget(1 << 30)
    res = Residency(plan, device_budget=None)    # None: from free device memory
    res.admit(4 << 20)                           # True: a 4 MiB parameter joins the resident set
    IOPool(plan.workers, res.queue_bound)        # the queue takes what the resident set leaves
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidArgumentError

__all__ = ["MemoryPlan", "Residency", "device_room", "trim_heap", "MAX_SLAB", "MIN_SLAB"]

MiB = 1 << 20
GiB = 1 << 30
#: Largest slab a worker reads and writes at once (measured on this project's 2-core machine:
#: 16 MiB slabs on 2-4 workers were fastest for both zarr and TensorStore; docs/design.md).
MAX_SLAB = 16 * MiB
MIN_SLAB = 1 * MiB
#: What a default device budget leaves free: activations of the next backward, the caching
#: allocator's fragmentation, other processes. The larger of the two.
DEVICE_MARGIN = 2 * GiB
DEVICE_MARGIN_FRACTION = 0.10


@dataclass(frozen=True)
class MemoryPlan:
    """How a memory budget is spent.

    ``io_bytes`` (``workers`` × 3 slabs: the read buffer, the codec's copy and the
    caller's slice) + ``queue_bytes`` (the floor of the queue of squared gradients held for
    streaming: an eighth of the budget, at least two slabs) + ``resident_bytes`` (the accumulators of the resident set, one
    buffer each) = ``total``. The queue also takes what the resident set leaves unused, up
    to a quarter of the budget (:meth:`Residency.queue_bound`), so a budget that holds most
    of the state spends nearly all of itself on accumulators, and one that holds little
    streams with a deeper queue.

    Slabs are 1/64 of the budget (at most 16 MiB), so the I/O buffers take under a tenth of
    it: at 1/16 (and at least 1 MiB) they took 37 % or more, and a budget of 1.25× the state
    could not hold it. A slab never splits a chunk, so slabs smaller than a chunk mean one
    chunk at a time per buffer.
    Below the floor of one chunk per buffer, the engine streams one chunk at a time on one
    worker; that floor is the only thing a tiny budget cannot bound. ``workers=0`` runs I/O
    inline (the RAM backend: a memory copy gains nothing from threads).
    """

    total: int
    workers: int
    slab_bytes: int
    io_bytes: int
    queue_bytes: int
    resident_bytes: int

    @classmethod
    def from_budget(cls, total: int, workers: int = 2) -> MemoryPlan:
        if total < 0:
            raise InvalidArgumentError(f"memory_budget must be >= 0 bytes, got {total}")
        slab = min(MAX_SLAB, total // 64)
        if total < 16 * MIN_SLAB:  # tiny budgets: one worker, chunk-sized slabs
            workers, slab = min(workers, 1), 0
        io = max(workers, 1) * 3 * slab
        # An eighth for the queue, whatever the resident set takes: with less, a budget that makes
        # most parameters resident streamed the rest slower than one that made fewer resident
        # (backward waits on a full queue; measured on benchmarks.collector part B).
        queue_ = min(max(0, total - io), max(2 * slab, total // 8))
        resident = max(0, total - io - queue_)
        return cls(total, workers, slab, io, queue_, resident)

    @property
    def slab_target(self) -> int:
        """Bytes per slab a worker reads or writes (1: one chunk at a time)."""
        return self.slab_bytes or 1

    def describe(self) -> str:
        f = lambda n: f"{n / MiB:.0f} MiB"  # noqa: E731
        return (
            f"budget {f(self.total)}: {self.workers} I/O workers x 3 slabs of {f(self.slab_bytes)}, "
            f"queue {f(self.queue_bytes)} and what the resident set leaves, resident set up to "
            f"{f(self.resident_bytes)}"
        )


def device_room(device: torch.device) -> int:
    """Bytes fisherstore may take on ``device`` by default: its free memory less a margin.

    Free memory is the driver's plus what torch's caching allocator holds unused; the
    margin is the larger of 2 GiB and 10 % of the device. Only CUDA devices have room:
    elsewhere accumulators stay in host memory unless ``device_budget`` says otherwise.
    """
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(0, free + cached - max(DEVICE_MARGIN, int(total * DEVICE_MARGIN_FRACTION)))


class Residency:
    """Decides where each parameter's accumulator lives, and counts what that costs.

    The resident set is fixed when a parameter is created: the access pattern is cyclic
    (every parameter every step), where LRU eviction would thrash (docs/design.md). A resident
    parameter costs its accumulator, ``nbytes``: a step holds its input (the squared gradient
    the caller donates, summed over micro-batches) until the step is judged, then folds it
    into the accumulator in place (:mod:`fisherstore.engine.step.fills`), so no twin is kept.
    A parameter is admitted when a step first feeds it (:meth:`fisherstore.engine.generations.
    WritePath.admit`), so its cost is known: a donated whole square is held as it is, anything
    else is copied, which :meth:`admit` reserves as a second buffer (``held_copy``);
    :meth:`take_copy` and :meth:`drop_copy` follow a caller that changes its mind.

    On a device, two things may take memory: accumulators (``admit_device``, within
    ``device_budget``; None means the device's free memory less a margin, measured the
    first time a gradient arrives there) and a step's per-parameter sums of micro-batches
    bound for host accumulators (``admit_staging``, within the free memory whatever the
    budget, so even ``device_budget=0`` crosses PCIe once per step where the sums fit).
    """

    def __init__(self, plan: MemoryPlan, device_budget: int | None = None,
                 room: Callable[[torch.device], int] = device_room) -> None:
        self.plan = plan
        self.device_budget = device_budget
        self.host_bytes = 0  # reserved for resident accumulators in RAM
        self.device_bytes = 0  # reserved for accumulators kept on any device
        self._room = room
        self._room_of: dict[str, int] = {}  # device -> bytes fisherstore may take there
        self._acc: dict[str, int] = {}  # device -> bytes reserved for accumulators
        self._staging: dict[str, int] = {}  # device -> bytes reserved for per-step sums

    def admit(self, nbytes: int, held_copy: bool = True, queue_too: bool = False) -> bool:
        """Whether a parameter of ``nbytes`` joins the resident set (reserving its accumulator, and a held copy).

        ``queue_too``: it may take the queue's floor as well, because nothing will be left to
        stream (the caller knows every parameter fits).
        """
        cost = (2 if held_copy else 1) * nbytes
        if self.host_bytes + cost > self.plan.resident_bytes + (self.plan.queue_bytes if queue_too else 0):
            return False
        self.host_bytes += cost
        return True

    def release(self, nbytes: int, held_copy: bool = True) -> None:
        """Give back what :meth:`admit` reserved for a parameter of ``nbytes`` (its held copy too, if still reserved)."""
        self.host_bytes = max(0, self.host_bytes - (2 if held_copy else 1) * nbytes)

    def drop_copy(self, nbytes: int) -> None:
        """A resident parameter's steps come donated: its held copy is not needed."""
        self.host_bytes = max(0, self.host_bytes - nbytes)

    def take_copy(self, nbytes: int) -> None:
        """A resident parameter's step must be copied (the caller keeps its tensor): reserve the copy again.

        The step writer asks :meth:`fits_copy` first; where the copy does not fit it evicts
        the parameter instead (:meth:`fisherstore.engine.generations.WritePath.evict`), so
        the reservation stays within the resident set and the queue's floor.
        """
        self.host_bytes += nbytes

    def fits_copy(self, nbytes: int) -> bool:
        """Whether a held copy of ``nbytes`` fits the resident set and the queue's floor."""
        return self.host_bytes + nbytes <= self.plan.resident_bytes + self.plan.queue_bytes

    @property
    def free_bytes(self) -> int:
        """Resident-set bytes not reserved."""
        return max(0, self.plan.resident_bytes - self.host_bytes)

    def queue_bound(self) -> int:
        """Bytes the I/O queue may hold now: its floor plus what the resident set leaves unused, up to a quarter.

        A deeper queue than a quarter of the budget buys no speed (the disk, not the queue,
        bounds streaming) and only raises peak RSS by the buffers each queued write allocates.
        """
        deep = max(0, (self.plan.total - self.plan.io_bytes) // 4 - self.plan.queue_bytes)
        # Never past what the accumulators leave (they may have taken the floor: admit(queue_too=True)).
        left = max(0, self.plan.total - self.plan.io_bytes - self.host_bytes)
        return min(self.plan.queue_bytes + min(self.free_bytes, deep), left)

    def room(self, device: torch.device) -> int:
        """Bytes fisherstore may take on ``device`` (measured once, at first use)."""
        key = str(device)
        if key not in self._room_of:
            self._room_of[key] = self._room(device)
        return self._room_of[key]

    def device_left(self, device: torch.device) -> int:
        """Accumulator bytes ``device`` can still take."""
        key = str(device)
        if self.device_budget is not None:  # an explicit budget is the caller's word
            limit = self.device_budget
        else:
            limit = self.room(device) - self._staging.get(key, 0)
        return max(0, limit - self._acc.get(key, 0))

    def admit_device(self, nbytes: int, device: torch.device | None = None, copies: int = 2) -> bool:
        """Whether an accumulator of ``nbytes`` (``copies`` buffers) may live on ``device``."""
        if device is None or device.type == "cpu":
            return False
        cost = copies * nbytes
        if cost > self.device_left(device):
            return False
        key = str(device)
        self._acc[key] = self._acc.get(key, 0) + cost
        self.device_bytes += cost
        return True

    def release_device(self, nbytes: int, device: torch.device, copies: int = 2) -> None:
        key, cost = str(device), copies * nbytes
        self._acc[key] = max(0, self._acc.get(key, 0) - cost)
        self.device_bytes = max(0, self.device_bytes - cost)

    def admit_staging(self, nbytes: int, device: torch.device) -> bool:
        """Whether a per-step device sum of ``nbytes`` fits next to the accumulators there."""
        if device.type != "cuda":
            return False
        key = str(device)
        taken = self._acc.get(key, 0) + self._staging.get(key, 0)
        if taken + nbytes > self.room(device):
            return False
        self._staging[key] = self._staging.get(key, 0) + nbytes
        return True


_LIBC: Any = None


def trim_heap() -> bool:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``); False where there is none.

    Called after each slab of I/O work: the slab buffers zarr, numpy and torch allocate on
    the I/O threads are freed into per-thread arenas that keep them, and a 64 MiB budget
    then grew RSS by ~120-145 MiB. This replaces a process-wide ``mallopt`` that pinned
    the mmap threshold at 1 MiB: it bounded RSS the same way but made every allocation of
    1 MiB or more in the whole process an ``mmap`` with fresh page faults, and so slowed a
    plain forward/backward of a 40M-parameter LLaMA on the CPU by ~35 % (1.22 s → 1.65 s).
    Trimming touches nothing while no I/O runs. Set FISHERSTORE_NO_MALLOPT=1 to skip it.
    """
    global _LIBC
    if os.environ.get("FISHERSTORE_NO_MALLOPT"):
        return False
    if _LIBC is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib.malloc_trim
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            _LIBC = False
    return bool(_LIBC) and bool(_LIBC(0))
