"""Where state lives: how a memory budget is spent, which parameters stay resident, and staging.

* :class:`MemoryPlan` splits ``memory_budget`` into I/O buffers (slabs in flight on the
  workers), a queue of squared gradients waiting to be streamed, and the **fixed resident
  set**, whose parameters accumulate steps in RAM and fold on flush (DESIGN §6).
* :class:`Residency` owns the byte counts: it decides, once per parameter, whether it is
  resident, whether a resident parameter whose gradients arrive on a GPU keeps its
  accumulator there (within ``device_budget``, by default the device's free memory less a
  margin), and whether a step's micro-batches may be summed on the device first.
* :class:`DeviceStager` moves squared gradients from a GPU into host accumulators while
  backward goes on: a side CUDA stream, two pinned staging buffers and events, and a host
  thread that adds each piece once its copy has landed. :class:`HostCopy` is the plain
  stream-ordered copy, for tensors the caller keeps.
* :func:`trim_heap` hands freed heap memory back to the OS after a slab of I/O work.

Usage::

    plan = MemoryPlan.from_budget(1 << 30)
    res = Residency(plan, device_budget=None)    # None: from free device memory
    res.admit(4 << 20)                           # True: a 4 MiB parameter joins the resident set
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidArgumentError

__all__ = ["MemoryPlan", "Residency", "HostCopy", "DeviceStager", "CudaCopies", "host_tensor", "device_room",
           "trim_heap", "bound_allocator"]

MiB = 1 << 20
GiB = 1 << 30
#: Largest slab a worker reads and writes at once (measurements.md §3a: 16 MiB slabs on
#: 2-4 workers were fastest for both zarr and TensorStore).
MAX_SLAB = 16 * MiB
MIN_SLAB = 1 * MiB
#: What a default device budget leaves free: activations of the next backward, the caching
#: allocator's fragmentation, other processes. The larger of the two.
DEVICE_MARGIN = 2 * GiB
DEVICE_MARGIN_FRACTION = 0.10
#: Bytes of each of the two pinned staging buffers of a :class:`DeviceStager`.
STAGE_BYTES = 32 * MiB


@dataclass(frozen=True)
class MemoryPlan:
    """How a memory budget is spent.

    ``io_bytes`` (``workers`` × 3 slabs: the read buffer, the codec's copy and the
    caller's slice) + ``queue_bytes`` (squared gradients held for streaming) +
    ``resident_bytes`` (accumulators and one step of staging for the resident set)
    = ``total``. Below the floor of one chunk per buffer, the engine streams one chunk
    at a time on one worker; that floor is the only thing a tiny budget cannot bound.
    ``workers=0`` runs I/O inline (the RAM backend: a memory copy gains nothing from threads).
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
            workers, slab = min(workers, 1), 0
        io = max(workers, 1) * 3 * slab
        queue_ = max(0, (total - io) // 4)
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
            f"queue {f(self.queue_bytes)}, resident set {f(self.resident_bytes)}"
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
    (every parameter every step), where LRU eviction would thrash (DESIGN §6b). A resident
    parameter costs its accumulator plus one step's staging, ``2 × nbytes``.

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

    def admit(self, nbytes: int) -> bool:
        """Whether a new parameter of ``nbytes`` joins the resident set (reserving its cost)."""
        cost = 2 * nbytes
        if self.host_bytes + cost > self.plan.resident_bytes:
            return False
        self.host_bytes += cost
        return True

    def release(self, nbytes: int) -> None:
        """Give back what :meth:`admit` reserved for a parameter of ``nbytes``."""
        self.host_bytes = max(0, self.host_bytes - 2 * nbytes)

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


class HostCopy:
    """A non-blocking copy of a GPU tensor into pinned host memory; :meth:`get` waits for it.

    The copy runs on the current stream, so it is ordered before anything the caller
    does to the tensor afterwards. ``index`` selects a part of the copy.
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


class CudaCopies:
    """The CUDA side of a :class:`DeviceStager`: a side stream, pinned buffers, events."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def pinned(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.float32, pin_memory=True)

    def mark(self) -> Any:
        """An event on the current stream: the tensor to copy is complete once it fires."""
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def copy(self, host: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        """Queue ``host ← src`` on the side stream behind ``after``; return its completion event."""
        self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            host.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        src.record_stream(self.stream)  # the allocator must not reuse src before the copy ran
        return done

    def wait(self, event: Any) -> None:
        event.synchronize()  # on the stager's host thread: waits for one copy, never for the device


class DeviceStager:
    """Device-to-host transfers that overlap backward, with bounded pinned memory.

    :meth:`push` cuts a tensor into pieces of whole leading rows that fit a staging buffer,
    queues each piece's copy on a side stream behind an event recorded on the current
    stream (so backward's kernels keep running), and hands it to a host thread. That
    thread waits for the piece's own copy event, calls ``consume(rows, host_piece)``
    and frees the buffer for the next piece. With two buffers, one copy is in flight
    while the host adds the other. The caller waits only when both buffers are busy
    (backpressure on host work), never on the device.

    ``ops`` is the device side (:class:`CudaCopies`); tests pass a CUDA-free stand-in.
    Usage: ``stager.push(x, consume); ...; stager.drain()``.
    """

    def __init__(self, device: torch.device, stage_bytes: int = STAGE_BYTES, ops: Any = None) -> None:
        self.ops = ops if ops is not None else CudaCopies(device)
        self.capacity = max(1, stage_bytes // 4)  # fp32 elements per buffer
        self._buffers = [self.ops.pinned(self.capacity) for _ in range(2)]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(self._buffers)):
            self._free.put(i)
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fisherstore-d2h", daemon=True)
        self._thread.start()

    def push(self, x: torch.Tensor, consume: Callable[[slice | None, torch.Tensor], None]) -> None:
        """Copy ``x`` (contiguous fp32 on the device) to the host piece by piece; ``consume`` adds each."""
        after = self.ops.mark()
        if x.ndim == 0:
            pieces = [(None, x.reshape(1), ())]
        else:
            per_row = math.prod(x.shape[1:])
            rows = max(1, self.capacity // max(1, per_row))
            pieces = [(slice(a, min(a + rows, x.shape[0])), x[a:a + rows].reshape(-1), None)
                      for a in range(0, x.shape[0], rows)]
        for rows, src, shape in pieces:
            n = src.numel()
            if n > self.capacity:  # one row larger than a buffer: a pinned buffer of its own
                i, host = None, self.ops.pinned(n)
            else:
                i = self._free.get()
                host = self._buffers[i][:n]
            done = self.ops.copy(host, src, after)
            piece_shape = shape if shape is not None else (rows.stop - rows.start, *x.shape[1:])
            with self._cv:
                self._pending += 1
            self._work.put((i, done, host, piece_shape, rows, consume))

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            i, done, host, shape, rows, consume = item
            try:
                self.ops.wait(done)
                if self._error is None:
                    consume(rows, host.view(shape))
            except BaseException as e:  # noqa: BLE001 - handed to the caller by drain()
                if self._error is None:
                    self._error = e
            finally:
                if i is not None:
                    self._free.put(i)
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()

    def drain(self, quiet: bool = False) -> None:
        """Wait until every piece pushed so far was consumed; raise the first error (unless ``quiet``)."""
        with self._cv:
            while self._pending:
                self._cv.wait()
        err, self._error = self._error, None
        if err is not None and not quiet:
            raise err

    def close(self) -> None:
        self.drain(quiet=True)
        self._work.put(None)
        self._thread.join()


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


def bound_allocator() -> bool:
    """Deprecated: the process-wide ``mallopt`` is gone (see :func:`trim_heap`). Returns False."""
    return False
