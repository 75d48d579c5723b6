"""A bounded I/O pool: background reads and writes that never hold more bytes than a bound; and read-ahead.

The write path hands read-modify-write and fold tasks to :class:`IOPool`; zarr's event
loop and TensorStore futures release the GIL, so a few threads keep the disk busy while
the caller goes on. A submit blocks while the bytes held by queued work would pass the
bound: backpressure instead of a broken memory budget. ``workers=0`` runs each task inline
(the RAM backend: a memory copy gains nothing from a thread hop).

After each task of a slab or more, the worker hands freed heap memory back to the OS
(:func:`~fisherstore.engine.memory.trim_heap`), so the slab buffers of the I/O threads do not
pile up in their malloc arenas.

:func:`read_ahead` is the reader's side: a window of reads in flight ahead of the code that
uses them (the head sweep, the out-of-core heat map).

Usage::

    pool = IOPool(workers=2, queue_bytes=64 << 20)
    fut = pool.submit(16 << 20, write_slab, region)
    exc = wait_all([fut])
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .memory import MIN_SLAB, trim_heap

__all__ = ["IOPool", "wait_all", "read_ahead"]

T = TypeVar("T")
R = TypeVar("R")
_END = object()


class IOPool:
    """A thread pool whose queued work holds at most ``queue_bytes`` (beyond one task).

    ``queue_bytes`` is a number, or a callable read at each submit (the store's
    :meth:`~fisherstore.engine.memory.Residency.queue_bound`).
    """

    def __init__(self, workers: int, queue_bytes: int | Callable[[], int]) -> None:
        self.workers = max(0, workers)
        # A callable bound follows the memory plan: what the resident set leaves is the queue's.
        self._bound = queue_bytes if callable(queue_bytes) else (lambda: queue_bytes)
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
            while self._held > 0 and self._held + nbytes > self._bound():
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


def read_ahead(items: Iterable[T], read: Callable[[T], R], window: int, workers: int,
               name: str = "fisherstore-read") -> Iterator[tuple[T, R]]:
    """``(item, read(item))`` for each item, in order, with up to ``window`` reads in flight on ``workers`` threads.

    The reads run ahead of the consumer, so a disk never waits for the code that uses what
    it read; ``window`` bounds what is held (a read's result waits until it is taken).
    Usage: ``for name, block in read_ahead(names, load, window=8, workers=4): ...``.
    """
    window = max(1, window)
    with ThreadPoolExecutor(max(1, min(workers, window)), thread_name_prefix=name) as ex:
        pending: deque[tuple[T, Future]] = deque()
        it = iter(items)
        for item in itertools.islice(it, window):
            pending.append((item, ex.submit(read, item)))
        while pending:
            item, fut = pending.popleft()
            nxt = next(it, _END)
            if nxt is not _END:
                pending.append((nxt, ex.submit(read, nxt)))
            yield item, fut.result()
