"""FisherStore: the public face of a store. Each method is a few lines over the modules below.

This module opens and closes a store and answers catalogue questions; the verbs live in
one mixin per group, beside it: :mod:`.write_verbs` (create, update, flush),
:mod:`.read_verbs` (fisher, read, iter_heads, views) and :mod:`.sample_verbs` (per-sample
gradients). The engine underneath:

======================  =========================================================
module                  job
======================  =========================================================
``engine.catalog``      tasks and parameters in RAM, with side-effect-free lookups
``engine.step``         one EMA step (:class:`~fisherstore.engine.step.StepWriter`)
``engine.generations``  generations: streamed read-modify-writes, folds
``engine.commit``       the flush transaction
``engine.recovery``     what a crashed writer left, found and removed
``engine.read``         reading at the current state; the head sweep
``engine.memory``       the memory plan; which parameters stay resident
``backends``            bytes and arrays on a medium
======================  =========================================================

docs/architecture.md draws the life of a step, of a read and of a commit.

Usage::

    import fisherstore, torch
    with fisherstore.open("/tmp/fs", mode="w") as store:
        store.create("taskA", "w", (4, 8))
        store.update("taskA", {"w": torch.rand(4, 8)})
        block = store.fisher("taskA", "w")[0:2]
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Hashable, Sequence
from typing import Any

from ..backends import ArrayBackend
from ..engine.catalog import Catalog, ParamInfo, ParamState, TaskState, committed_keys, read_task
from ..engine.commit import Committer
from ..engine.dist import RankGroup
from ..engine.generations import WritePath
from ..engine.iopool import IOPool
from ..engine.lock import StoreLock
from ..engine.memory import MemoryPlan, Residency
from ..engine.opening import Resources, check_identity, open_root, take_lock
from ..engine.options import StoreOptions, default_memory_budget
from ..engine.pins import Pin, pin_commit
from ..engine.read import ReadPath
from ..engine.recovery import recover_leftovers
from ..engine.step.writer import StepWriter
from ..errors import InvalidArgumentError, StepDiscardedWarning
from ..spec.codecs import CodecSpec
from ..spec.format import DOC, doc_key, number_base
from ..spec.layout import ParamLayout
from ..spec.manifest import TaskManifest
from .anchor_verbs import AnchorMethods
from .read_verbs import ReadMethods
from .sample_verbs import SampleMethods
from .write_verbs import WriteMethods

__all__ = ["FisherStore", "StoreSnapshot"]


class FisherStore(WriteMethods, ReadMethods, SampleMethods, AnchorMethods):
    """A store of full elementwise Fisher EMAs, one array per (task, parameter).

    Open one with :func:`fisherstore.open`. ``FisherStore(backend, mode=..., ...)`` opens
    a store on a backend object you built (see :class:`~fisherstore.engine.options.StoreOptions`).

    Threads: one thread writes (steps, flushes); any number of threads may read at the
    same time (``fisher()[...]``, ``read``, ``iter_heads``, ``metadata``), each read whole
    at one step. Creation and ``set_metadata`` touch only RAM: a flush (or ``close``)
    commits them with the steps.
    """

    def __init__(self, backend: ArrayBackend, options: StoreOptions | None = None, **kw: Any) -> None:
        if options is not None and kw:
            raise InvalidArgumentError("pass either options= or keyword options, not both")
        opts = options if options is not None else StoreOptions(**kw)
        self._backend = backend
        self.options = opts
        budget = opts.memory_budget
        if budget is None:  # on disk 1 GiB; in RAM every parameter is resident (no read-modify-writes)
            budget = default_memory_budget(backend.persistent)
        # A RAM store's few array copies (folds, streamed parameters under an explicit budget) run inline.
        self.plan = MemoryPlan.from_budget(budget, opts.io_workers if backend.persistent else 0)
        self._group = opts.group or RankGroup.solo()
        self._catalog = Catalog()
        self._state_lock = threading.RLock()
        self._residency = Residency(self.plan, opts.device_budget)
        # its workers trim the heap after slabs; its queue takes what the resident set leaves
        self._pool = IOPool(self.plan.workers, self._residency.queue_bound)
        self._active: StepWriter | None = None
        self._steps_since_flush = 0
        self._lock: StoreLock | None = None
        if backend.persistent and self.writable and self._group.is_leader:
            self._lock = take_lock(backend, opts.force)
        self._res = Resources(backend, self._pool, self._lock, self._catalog)
        self._finalizer = weakref.finalize(self, self._res.abandon)
        try:
            if self._group.is_leader:
                self._open()
            self._group.barrier()  # the leader creates or cleans the store before any other rank looks
            if not self._group.is_leader:
                self._open()
        except BaseException:
            self._finalizer.detach()
            self._res.release()
            raise
        self._write = WritePath(backend, self._pool, self.plan, self._residency, self.codecs, opts.nonfinite,
                                self._state_lock)
        self._commit = Committer(backend, self._write, self._group, opts.progress)
        # A reader checks after every read that the store was not replaced; on object storage,
        # where that check is a request, the numbering from the uuid (format.number_base)
        # makes a replaced store's reads miss instead, and the miss leads to the same check.
        local = getattr(backend.medium, "kind", None) == "file"
        self._read = ReadPath(backend, self._catalog, self._state_lock, None if self.writable else self._reload,
                              self._check_identity if not self.writable and local else None)

    # -- opening and closing --------------------------------------------------------------
    def _open(self) -> None:
        self._doc, replaced = open_root(self._backend, self.mode, self.options.codecs, self._group.is_leader)
        # On object storage a reader does not check the store's identity per read (a request);
        # numbering its arrays from its uuid makes a replaced store's reads miss instead.
        remote = getattr(self._backend.medium, "kind", "file") != "file"
        self._number_base = number_base(self._doc.uuid) if remote else 0
        self._doc_version = self._backend.version(DOC)
        for name, key in self._doc.tasks.items():
            self._catalog.add(self._load_task(name, key))
        if self.writable and self._group.is_leader:
            recover_leftovers(self._backend, self._catalog, self._lock, quiet=replaced)
        self.codecs = CodecSpec.from_dict(self._doc.codecs)

    def _load_task(self, name: str, key: str) -> TaskState:
        t = read_task(self._backend, name, key)
        for i, p in enumerate(t.params.values()):
            self._place(p, i)
        return t

    def _place(self, p: ParamState, index: int) -> None:
        """Who writes ``p`` (a rank of the group)."""
        p.owned = self._group.owner_of(p.name, index) == self._group.rank
        p.gen_base = self._number_base
        # Whether it stays resident is decided when a step first feeds it (WritePath.admit),
        # where the cost of what the caller feeds is known.

    def _reload(self, task: str) -> bool:
        """Reload ``task`` from its manifest if a writer committed since; True if it changed (readers only)."""
        with self._state_lock:
            self._check_identity()
            t = self._catalog.task(task)
            if TaskManifest.commit_of(self._backend.read_json(doc_key(t.key))) in (None, t.commit):
                return False
            self._catalog.add(self._load_task(task, t.key))
            return True

    def _check_identity(self) -> None:
        with self._state_lock:
            self._doc_version = check_identity(self._backend, self._doc, self._doc_version)

    def close(self) -> None:
        """Flush (when writable) and release the backend. Safe to call twice.

        A step still open is discarded with a :class:`StepDiscardedWarning`; the steps
        before it are flushed.
        """
        if self.closed:
            return
        try:
            if self.writable:
                if self._active is not None:
                    st = self._active
                    st.discard()
                    warnings.warn(f"{self!r}: step {st.t} of task {st.task!r} was still open when the store closed and "
                                  "is discarded; the steps before it are flushed. Leave a step's `with` block before "
                                  "closing its store.", StepDiscardedWarning, stacklevel=2)
                self.flush()
        finally:
            self._finalizer.detach()
            self._res.release()

    def snapshot(self, tasks: Sequence[str] | None = None) -> FisherStore:
        """This store frozen at its newest commit, for reads that must not mix two commits.

        Usage: ``with store.snapshot() as s: df = s.summary("math"); x = s.to_dask("math", q)``.

        Every read of the returned view (``fisher``, ``read``, ``iter_heads``, Dask and
        xarray views, ``samples``, heat maps) is at the one commit it was taken at, however
        many commits a writer in another process makes meanwhile: a *pin* inside the store
        (``.fisherstore.pins/``, docs/format.md) keeps that commit's generations on disk.
        The pin is a lease: it is renewed in the background and lapses ``FISHERSTORE_PIN_TTL``
        seconds (default 60) after its process dies. Closing the view, leaving its ``with``
        block or dropping it releases the pin; the store it came from stays open.

        The views and sweeps of a read-only store take a snapshot themselves. A writable
        store (the writer itself: nobody else deletes its generations) returns a view of its
        live state, whose ``close()`` closes nothing. ``tasks``: pin only these (default: every task).
        """
        self._check_open()
        if self.writable or not self._backend.persistent:
            return StoreSnapshot(self, None, None, owns=False)  # the live state; closing it closes nothing
        names = self._cat().names() if tasks is None else [self._cat().task(n).name for n in tasks]
        keys = self._catalog.keys()

        def current(name: str) -> int | None:
            return TaskManifest.commit_of(self._backend.read_json(doc_key(keys[name])))

        states, pin = pin_commit(getattr(self._backend, "medium", None), names,
                                 lambda n: self._load_task(n, keys[n]), current)
        return StoreSnapshot(self, states, pin)

    def __enter__(self) -> FisherStore:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """Close (flushing); in a rank group, an error leaves the group and commits nothing.

        The other ranks may be anywhere, so this rank cannot take its part in a collective
        flush: it tells them (:meth:`RankGroup.leave`; they raise ``RankFailedError`` naming
        it), releases the store at its last commit, and its own error propagates.
        """
        if exc is not None and self._group.world_size > 1 and self.writable:
            self._group.leave(exc)
            self._finalizer.detach()
            self._res.release()
            return
        self.close()

    # -- properties ---------------------------------------------------------------------
    mode = property(lambda self: self.options.mode, doc="How the store was opened: 'r', 'r+', 'a' or 'w'.")
    decay = property(lambda self: self.options.decay, doc="The default EMA β of new parameters.")
    nonfinite = property(lambda self: self.options.nonfinite, doc="'raise' or 'skip' for NaN/Inf gradients.")
    flush_every = property(
        lambda self: None if self._write.replaying else self.options.flush_every,
        doc="Steps between automatic flushes (None: off; off too while a multi-pass run replays a task, which "
            "writes once at its end).")
    memory_budget = property(lambda self: self.plan.total, doc="Bytes of RAM the store may hold.")

    def memory_reserved(self) -> int:
        """Bytes of host memory the resident set reserves now: one buffer per resident accumulator, plus a
        held copy for each parameter whose steps were not donated (docs/architecture.md, "The memory plan").
        Usage: ``store.memory_reserved() / store.memory_budget``.
        """
        return self._residency.host_bytes
    device_budget = property(lambda self: self.options.device_budget,
                             doc="Bytes of GPU memory for accumulators (None: the device's free memory less a margin).")
    writable = property(lambda self: self.options.writable, doc="Whether the store was opened for writing.")
    closed = property(lambda self: self._res.closed, doc="Whether close() has run.")
    frozen = property(lambda self: False, doc="Whether this is a snapshot, frozen at one commit (store.snapshot()).")

    @property
    def group(self) -> RankGroup:
        """The rank group this store was opened in (:meth:`RankGroup.solo` outside ``torch.distributed``)."""
        return self._group

    @property
    def backend_name(self) -> str:
        """The backend's name: ``"zarr"``, ``"tensorstore"`` or ``"ram"``."""
        return self._backend.name

    @property
    def path(self) -> str | None:
        """The store's directory (None for ``"ram"``)."""
        return self._backend.location

    def __repr__(self) -> str:
        n_params = sum(len(t.params) for t in self._catalog)
        state = "closed" if self.closed else f"mode={self.mode!r}"
        return (
            f"<FisherStore {self.backend_name} {self.path or ''!s} {state} tasks={len(self._catalog)} "
            f"params={n_params}>".replace("  ", " ")
        )

    # -- catalogue ----------------------------------------------------------------------
    def tasks(self) -> list[str]:
        """Names of the tasks in the store."""
        return self._cat().names()

    def params(self, task: str) -> list[str]:
        """Names of the parameters tracked for ``task``, in creation order."""
        with self._state_lock:
            return list(self._cat().task(task).params)

    def param(self, task: str, name: str) -> ParamInfo:
        """Shape, chunks, layout and decay of one tracked parameter."""
        return self._cat().param(task, name).info(task)

    def step(self, task: str) -> int:
        """The task's EMA step count (including steps not yet flushed)."""
        return self._cat().task(task).step

    def layout(self, task: str, name: str) -> ParamLayout | None:
        """The head layout of a parameter (None for a plain tensor)."""
        return self._cat().param(task, name).layout

    def owns(self, task: str, name: str) -> bool:
        """Whether this process writes ``name`` (always True outside a rank group)."""
        return self._cat().param(task, name).owned

    def revision(self, task: str) -> Hashable:
        """A token that changes whenever the values of ``task`` may have changed (for caches)."""
        t = self._cat().task(task)
        return (self._doc.uuid or id(self), t.commit, t.step)

    def metadata(self, task: str | None = None) -> dict[str, Any]:
        """Store metadata (``task=None``) or one task's: step, tokens, estimator, model, ..."""
        cat = self._cat()
        with self._state_lock:
            if task is not None:
                return cat.task(task).metadata()
            return {"format_version": self._doc.format_version, "written_by": self._doc.written_by,
                    "uuid": self._doc.uuid, "backend": self.backend_name, "path": self.path,
                    "codecs": self.codecs.to_dict(), "tasks": cat.names()}

    def nbytes_on_disk(self, task: str | None = None, name: str | None = None, *, chunks_only: bool = False,
                       committed: bool = False, kind: str = "all") -> int:
        """Bytes the store (or a task, or a parameter) takes on its medium.

        ``committed=True`` counts only the arrays the last commits name: what a reader sees,
        not a writer's work; ``kind`` then picks ``"fisher"`` (live generations),
        ``"samples"`` (committed per-sample segments) or ``"all"``.
        """
        cat = self._cat()
        if committed:
            keys = [k for t in (cat if task is None else [cat.task(task)]) for k in committed_keys(t, name, kind)]
            return sum(self._backend.nbytes(k, chunks_only=chunks_only) for k in keys)
        key = "" if task is None else cat.task(task).key if name is None else cat.param(task, name).key
        return self._backend.nbytes(key, chunks_only=chunks_only)

    def io_counters(self) -> dict[str, int]:
        """I/O done so far, e.g. ``{"chunk_files_read": 12}`` on disk backends."""
        return self._backend.io_counters()


class StoreSnapshot(FisherStore):
    """A read-only :class:`FisherStore` frozen at one commit and pinned there; get one from ``store.snapshot()``.

    It shares the store's backend, pool and options; only its catalogue (one commit per
    task) and its read path (which never reloads) are its own. ``close()`` releases the
    pin, never the store.
    """

    def __init__(self, parent: FisherStore, states: dict[str, TaskState] | None, pin: Pin | None,
                 owns: bool = True) -> None:
        self.__dict__.update(parent.__dict__)  # the same backend, pool, resources and options
        self._parent = parent  # keeps the store (and its backend, or the owning snapshot's pin) alive
        self._pin = pin
        self._owns = owns
        self._live = states is None
        if states is None:  # a writer's own store: nobody else deletes its generations, reads stay live
            return
        self._catalog = Catalog()
        for t in states.values():
            self._catalog.add(t)
        self._state_lock = threading.RLock()
        self._read = ReadPath(self._backend, self._catalog, self._state_lock, None, self._read.identity, pinned=True)

    def snapshot(self, tasks: Sequence[str] | None = None) -> FisherStore:
        """The same commit, under the same pin; closing it releases nothing (``tasks`` must be among its tasks).

        So a function may always write ``with store.snapshot() as s:`` whether it was handed
        a store or a snapshot.
        """
        for n in tasks or ():
            self._cat().task(n)
        states = None if self._live else {t.name: t for t in self._catalog}
        return StoreSnapshot(self, states, self._pin, owns=False)

    frozen = property(lambda self: True, doc="Whether this is a snapshot, frozen at one commit: it is.")

    @property
    def commits(self) -> dict[str, int]:
        """The commit each task is read at (task -> the manifest's commit number)."""
        return {t.name: t.commit for t in self._catalog}

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the pin if this snapshot took it (idempotent); the store it came from stays open."""
        if self._pin is not None and self._owns:
            self._pin.release()

    def __repr__(self) -> str:
        at = ", ".join(f"{t.name}@step {t.step}" for t in self._catalog)
        pinned = "pinned" if self._pin is not None and self._pin.alive else "unpinned"
        return f"<FisherStore snapshot {self.backend_name} {self.path or ''} {pinned} [{at}]>"
