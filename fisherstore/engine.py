"""The write-back engine's parts: a memory plan and a bounded I/O pool (DESIGN §6).

The store (``store.py``) decides what to write; this module bounds *how much* it may hold
and runs the reads and writes:

* :class:`MemoryPlan` splits ``memory_budget`` into I/O buffers (slabs in flight on the
  workers), a queue of squared gradients waiting to be streamed, and the **fixed
  resident set**, whose parameters accumulate steps in RAM and fold on flush.
* :class:`IOPool` runs read-modify-write tasks on a few threads (zarr's event loop and
  TensorStore futures release the GIL) and blocks the caller when the bytes it holds
  would pass the queue bound: backpressure instead of a broken budget.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError

__all__ = ["MemoryPlan", "IOPool", "bound_allocator"]

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

    def describe(self) -> str:
        f = lambda n: f"{n / MiB:.0f} MiB"  # noqa: E731
        return (
            f"budget {f(self.total)}: {self.workers} I/O workers x 3 slabs of {f(self.slab_bytes)}, "
            f"queue {f(self.queue_bytes)}, resident set {f(self.resident_bytes)}"
        )


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


class IOPool:
    """A thread pool whose queued work holds at most ``queue_bytes`` (beyond one task)."""

    def __init__(self, workers: int, queue_bytes: int) -> None:
        self.workers = max(1, workers)
        self.queue_bytes = queue_bytes
        self._ex: ThreadPoolExecutor | None = None
        self._cv = threading.Condition()
        self._held = 0
        self.peak_held = 0

    def submit(self, nbytes: int, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on a worker; wait first while the queue is full."""
        with self._cv:
            while self._held > 0 and self._held + nbytes > self.queue_bytes:
                self._cv.wait()
            self._held += nbytes
            self.peak_held = max(self.peak_held, self._held)
        if self._ex is None:
            self._ex = ThreadPoolExecutor(self.workers, thread_name_prefix="fisherstore-io")
        try:
            fut = self._ex.submit(fn, *args)
        except BaseException:
            self._release(nbytes)
            raise
        fut.add_done_callback(lambda _f: self._release(nbytes))
        return fut

    def _release(self, nbytes: int) -> None:
        with self._cv:
            self._held -= nbytes
            self._cv.notify_all()

    def shutdown(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True)
            self._ex = None


def wait_all(futures: list[Future]) -> BaseException | None:
    """Wait for every future; return the first exception (after all have finished)."""
    first = None
    for f in futures:
        exc = f.exception()
        if exc is not None and first is None:
            first = exc
    return first
