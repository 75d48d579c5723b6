"""A bounded I/O pool: background reads and writes that never hold more bytes than a bound.

The write path hands read-modify-write and fold tasks to :class:`IOPool`; zarr's event
loop and TensorStore futures release the GIL, so a few threads keep the disk busy while
the caller goes on. A submit blocks while the bytes held by queued work would pass the
bound: backpressure instead of a broken memory budget.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["IOPool", "wait_all"]


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
