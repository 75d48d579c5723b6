"""Where state lives: how a memory budget is spent, which parameters stay resident, and staging.

* :class:`MemoryPlan` splits ``memory_budget`` into I/O buffers (slabs in flight on the
  workers), a queue of squared gradients waiting to be streamed, and the **fixed resident
  set**, whose parameters accumulate steps in RAM and fold on flush (DESIGN §6).
* :class:`Residency` owns the byte counts: it decides, once per parameter, whether it is
  resident, and whether a resident parameter whose gradients arrive on a GPU keeps its
  accumulator there (within ``device_budget``).
* :class:`HostCopy` is a non-blocking device-to-pinned-host copy, waited on only when used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidArgumentError

__all__ = ["MemoryPlan", "Residency", "HostCopy", "host_tensor", "bound_allocator"]

MiB = 1 << 20
#: Largest slab a worker reads and writes at once (measurements.md §3a: 16 MiB slabs on
#: 2-4 workers were fastest for both zarr and TensorStore).
MAX_SLAB = 16 * MiB
MIN_SLAB = 1 * MiB


@dataclass(frozen=True)
class MemoryPlan:
    """How a memory budget is spent.

    ``io_bytes`` (``workers`` × 3 slabs: the read buffer, the codec's copy and the
    caller's slice) + ``queue_bytes`` (squared gradients held for streaming) +
    ``resident_bytes`` (accumulators and one step of staging for the resident set)
    = ``total``. Below the floor of one chunk per buffer, the engine streams one chunk
    at a time on one worker; that floor is the only thing a tiny budget cannot bound.
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
        slab = max(MIN_SLAB, min(MAX_SLAB, total // 16))
        if total < 8 * MIN_SLAB:  # tiny budgets: one worker, chunk-sized slabs
            workers, slab = 1, 0
        io = workers * 3 * slab
        queue = max(0, (total - io) // 4)
        resident = max(0, total - io - queue)
        return cls(total, workers, slab, io, queue, resident)

    @property
    def slab_target(self) -> int:
        """Bytes per slab a worker reads or writes (1: one chunk at a time)."""
        return self.slab_bytes or 1

    def describe(self) -> str:
        f = lambda n: f"{n / MiB:.0f} MiB"  # noqa: E731
        return (
            f"budget {f(self.total)}: {self.workers} I/O workers x 3 slabs of {f(self.slab_bytes)}, "
            f"queue {f(self.queue_bytes)}, resident set {f(self.resident_bytes)}"
        )


class Residency:
    """Decides where each parameter's accumulator lives, and counts what that costs.

    The resident set is fixed when a parameter is created: the access pattern is cyclic
    (every parameter every step), where LRU eviction would thrash (DESIGN §6b). A resident
    parameter costs its accumulator plus one step's staging, ``2 × nbytes``.
    """

    def __init__(self, plan: MemoryPlan, device_budget: int = 0) -> None:
        self.plan = plan
        self.device_budget = device_budget
        self.host_bytes = 0  # reserved for resident accumulators in RAM
        self.device_bytes = 0  # reserved for accumulators kept on a GPU

    def admit(self, nbytes: int) -> bool:
        """Whether a new parameter of ``nbytes`` joins the resident set (reserving its cost)."""
        cost = 2 * nbytes
        if self.host_bytes + cost > self.plan.resident_bytes:
            return False
        self.host_bytes += cost
        return True

    def admit_device(self, nbytes: int) -> bool:
        """Whether a resident accumulator of ``nbytes`` may live on the GPU its gradients come from."""
        cost = 2 * nbytes
        if self.device_bytes + cost > self.device_budget:
            return False
        self.device_bytes += cost
        return True


class HostCopy:
    """A non-blocking copy of a GPU tensor into pinned host memory; :meth:`get` waits for it.

    ``index`` selects a part of the copy (the same transfer, waited on once per use).
    """

    __slots__ = ("tensor", "event", "index")

    def __init__(self, tensor: torch.Tensor, event: Any, index: Any = None) -> None:
        self.tensor, self.event, self.index = tensor, event, index

    @classmethod
    def start(cls, x: torch.Tensor) -> HostCopy:
        host = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(x, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(x.device))
        return cls(host, ev)

    def sub(self, index: Any) -> HostCopy:
        return HostCopy(self.tensor, self.event, index)

    def get(self) -> torch.Tensor:
        self.event.synchronize()
        return self.tensor if self.index is None else self.tensor[self.index]


def host_tensor(x: torch.Tensor | HostCopy) -> torch.Tensor:
    """The tensor itself, or a host copy's tensor once its transfer is done."""
    return x.get() if isinstance(x, HostCopy) else x


_ALLOCATOR_BOUND = False


def bound_allocator() -> bool:
    """Pin glibc's mmap threshold at 1 MiB so freed slab buffers go back to the OS.

    glibc raises the threshold (up to 32 MiB) each time a large block is freed, after
    which 4-16 MiB slab buffers come from per-thread arenas that keep them: measured
    here, a 64 MiB budget then grew RSS by ~125-150 MiB instead of ~30 MiB. Process-wide
    and idempotent; set FISHERSTORE_NO_MALLOPT=1 to leave the allocator alone.
    Returns True if the threshold is pinned.
    """
    global _ALLOCATOR_BOUND
    if _ALLOCATOR_BOUND or os.environ.get("FISHERSTORE_NO_MALLOPT"):
        return _ALLOCATOR_BOUND
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to pin
        return False
    M_MMAP_THRESHOLD = -3
    _ALLOCATOR_BOUND = bool(mallopt(M_MMAP_THRESHOLD, 1 << 20))
    return _ALLOCATOR_BOUND
