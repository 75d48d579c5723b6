"""A bounded I/O pool: background reads and writes that never hold more bytes than a bound.

The write path hands read-modify-write and fold tasks to :class:`IOPool`; zarr's event
loop and TensorStore futures release the GIL, so a few threads keep the disk busy while
the caller goes on. A submit blocks while the bytes held by queued work would pass the
bound: backpressure instead of a broken memory budget. ``workers=0`` runs each task inline
(the RAM backend: a memory copy gains nothing from a thread hop).

After each task of a slab or more, the worker hands freed heap memory back to the OS
(:func:`~fisherstore.residency.trim_heap`), so the slab buffers of the I/O threads do not
pile up in their malloc arenas.

Usage::

    pool = IOPool(workers=2, queue_bytes=64 << 20)
    fut = pool.submit(16 << 20, write_slab, region)
    exc = wait_all([fut])
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .residency import MIN_SLAB, trim_heap

__all__ = ["IOPool", "wait_all"]


class IOPool:
    """A thread pool whose queued work holds at most ``queue_bytes`` (beyond one task)."""

    def __init__(self, workers: int, queue_bytes: int) -> None:
        self.workers = max(0, workers)
        self.queue_bytes = queue_bytes
        self._ex: ThreadPoolExecutor | None = None
        self._cv = threading.Condition()
        self._held = 0
        self.peak_held = 0
        self._closers: list[Callable[[], None]] = []

    def submit(self, nbytes: int, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on a worker (inline with no workers); wait first while the queue is full."""
        if self.workers == 0:
            fut: Future = Future()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - a future carries it, as a worker's would
                fut.set_exception(e)
            return fut
        with self._cv:
            while self._held > 0 and self._held + nbytes > self.queue_bytes:
                self._cv.wait()
            self._held += nbytes
            self.peak_held = max(self.peak_held, self._held)
        if self._ex is None:
            self._ex = ThreadPoolExecutor(self.workers, thread_name_prefix="fisherstore-io")
        try:
            fut = self._ex.submit(_run, nbytes, fn, args)
        except BaseException:
            self._release(nbytes)
            raise
        fut.add_done_callback(lambda _f: self._release(nbytes))
        return fut

    def _release(self, nbytes: int) -> None:
        with self._cv:
            self._held -= nbytes
            self._cv.notify_all()

    def on_shutdown(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` when the pool shuts down (the store closes): other threads of the write path stop then."""
        self._closers.append(fn)

    def shutdown(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True)
            self._ex = None
        closers, self._closers = self._closers, []
        for fn in closers:
            fn()


def _run(nbytes: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    finally:
        if nbytes >= MIN_SLAB:
            trim_heap()


def wait_all(futures: list[Future]) -> BaseException | None:
    """Wait for every future; return the first exception (after all have finished)."""
    first = None
    for f in futures:
        exc = f.exception()
        if exc is not None and first is None:
            first = exc
    return first
