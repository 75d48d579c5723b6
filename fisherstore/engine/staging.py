"""Staging: moving squared gradients from a GPU into host memory without making anyone wait.

* :class:`DeviceStager` moves squared gradients from a GPU into host accumulators while
  backward goes on: a side CUDA stream, two pinned staging buffers and events, and a host
  thread that adds each piece once its copy has landed.
* :class:`HostCopy` is the plain stream-ordered copy, for tensors the caller keeps;
  :func:`host_tensor` is the tensor itself or a copy's tensor once it has landed.

Usage::

    stager = DeviceStager(torch.device("cuda"))
    stager.push(x, lambda rows, host: acc[rows].add_(host))   # returns at once
    stager.drain()                                             # every piece added
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["HostCopy", "host_tensor", "CudaCopies", "DeviceStager", "STAGE_BYTES"]

#: Bytes of each of the two pinned staging buffers of a :class:`DeviceStager`.
STAGE_BYTES = 32 << 20


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
