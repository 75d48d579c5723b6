"""FisherStore: the public face of a store. Each method is a few lines over the modules below.

======================  =========================================================
module                  job
======================  =========================================================
:mod:`.catalog`         tasks and parameters in RAM, with side-effect-free lookups
:mod:`.write`           one EMA step (:class:`~fisherstore.write.StepWriter`); folds
:mod:`.commit`          the flush transaction; recovery from a crashed writer
:mod:`.read`            reading at the current state; the head sweep
:mod:`.residency`       the memory plan; which parameters stay resident
:mod:`.backends`        bytes and arrays on a medium
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

import dataclasses
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .backends import ArrayBackend
from .catalog import Catalog, ParamInfo, ParamState, TaskState, load_task
from .codecs import CodecSpec
from .commit import Committer
from .dist import RankGroup
from .ema import validate_decay
from .errors import (
    FisherStoreError,
    InvalidArgumentError,
    ReadOnlyError,
    SliceError,
    StepError,
)
from .format import DOC, ESTIMATORS, TaskManifest, doc_key, encode_name, param_doc
from .iopool import IOPool
from .layout import ParamLayout
from .lazy import LazyFisher
from .lock import StoreLock
from .opening import open_root, recover_leftovers, release_lock, take_lock
from .options import DEFAULT_MEMORY_BUDGET, StoreOptions
from .read import ReadPath
from .regions import Region, full_region
from .residency import MemoryPlan, Residency, bound_allocator
from .write import StepWriter, WritePath

__all__ = ["FisherStore", "StepWriter"]


class FisherStore:
    """A store of full elementwise Fisher EMAs, one array per (task, parameter).

    Open one with :func:`fisherstore.open`. ``FisherStore(backend, mode=..., ...)`` opens
    a store on a backend object you built (see :class:`~fisherstore.options.StoreOptions`).
    """

    def __init__(self, backend: ArrayBackend, options: StoreOptions | None = None, **kw: Any) -> None:
        opts = options if options is not None else StoreOptions(**kw)
        if options is not None and kw:
            raise InvalidArgumentError("pass either options= or keyword options, not both")
        self._backend = backend
        self.options = opts
        budget = opts.memory_budget
        if budget is None:
            budget = DEFAULT_MEMORY_BUDGET if backend.persistent else 0
        self.plan = MemoryPlan.from_budget(budget, opts.io_workers)
        self._group = opts.group or RankGroup.solo()
        self._catalog = Catalog()
        self._residency = Residency(self.plan, opts.device_budget)
        self._pool = IOPool(self.plan.workers, self.plan.queue_bytes)
        if backend.persistent and opts.writable:
            bound_allocator()
        self._closed = False
        self._active: StepWriter | None = None
        self._steps_since_flush = 0
        self._lock: StoreLock | None = None
        try:
            self._acquire_lock()
            if self._group.is_leader:
                self._open()
            self._group.barrier()  # the leader creates or cleans the store before any other rank looks
            if not self._group.is_leader:
                self._open()
        except BaseException:
            self._pool.shutdown()
            self._release_lock()
            raise
        self._write = WritePath(backend, self._pool, self.plan, self._residency, self.codecs, opts.nonfinite)
        self._commit = Committer(backend, self._write, self._group, opts.progress)
        self._read = ReadPath(backend, self._catalog, None if self.writable else self._reload)

    # -- opening and closing --------------------------------------------------------------
    def _acquire_lock(self) -> None:
        # One writer per store. In a rank group, the leader holds the lock for the group
        # (the other ranks write only chunks the leader does not).
        if self._backend.persistent and self.writable and self._group.is_leader:
            self._lock = take_lock(self._backend, self.options.force)

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        release_lock(lock, self._backend)

    def _open(self) -> None:
        self._doc = open_root(self._backend, self.mode, self.options.codecs, self._group.is_leader)
        for name, key in self._doc.tasks.items():
            self._catalog.add(self._load_task(name, key))
        if self.writable and self._group.is_leader:
            recover_leftovers(self._backend, self._catalog, self._lock)
        self.codecs = CodecSpec.from_dict(self._doc.codecs)

    def _load_task(self, name: str, key: str) -> TaskState:
        t = load_task(self._backend.read_json, name, key)
        for i, p in enumerate(t.params.values()):
            self._place(p, i)
        return t

    def _place(self, p: ParamState, index: int) -> None:
        """Who writes ``p`` (a rank of the group), and whether it stays resident."""
        p.owned = self._group.owner_of(p.name, index) == self._group.rank
        if p.owned and self.writable:
            p.resident = self._residency.admit(p.nbytes)

    def _reload(self, task: str) -> bool:
        """Reload ``task`` from its manifest if a writer committed since; True if it changed."""
        t = self._catalog.task(task)
        if TaskManifest.commit_of(self._backend.read_json(doc_key(t.key))) in (None, t.commit):
            return False
        self._catalog.add(self._load_task(task, t.key))
        return True

    def close(self) -> None:
        """Flush (when writable) and release the backend. Safe to call twice."""
        if self._closed:
            return
        try:
            if self.writable and self._active is None:
                self.flush()
        finally:
            self._closed = True
            self._pool.shutdown()
            self._backend.close()
            self._release_lock()

    def __enter__(self) -> FisherStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties ---------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.options.mode

    @property
    def decay(self) -> float:
        return self.options.decay

    @property
    def nonfinite(self) -> str:
        return self.options.nonfinite

    @property
    def flush_every(self) -> int | None:
        return self.options.flush_every

    @property
    def memory_budget(self) -> int:
        return self.plan.total

    @property
    def backend_name(self) -> str:
        """The backend's name: ``"zarr"``, ``"tensorstore"`` or ``"ram"``."""
        return self._backend.name

    @property
    def path(self) -> str | None:
        """The store's directory (None for ``"ram"``)."""
        return self._backend.location

    @property
    def writable(self) -> bool:
        return self.mode != "r"

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        n_params = sum(len(t.params) for t in self._catalog)
        state = "closed" if self._closed else f"mode={self.mode!r}"
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
        return (id(self), self._cat().task(task).step)

    def metadata(self, task: str | None = None) -> dict[str, Any]:
        """Store metadata (``task=None``) or one task's: step, tokens, estimator, model, ..."""
        cat = self._cat()
        if task is None:
            return {"format_version": self._doc.format_version, "written_by": self._doc.written_by,
                    "backend": self.backend_name, "path": self.path, "codecs": self.codecs.to_dict(),
                    "tasks": cat.names()}
        return cat.task(task).metadata()

    def nbytes_on_disk(self, task: str | None = None, name: str | None = None, *, chunks_only: bool = False) -> int:
        """Bytes the store (or a task, or a parameter's generations) takes on its medium."""
        cat = self._cat()
        key = "" if task is None else cat.task(task).key if name is None else cat.param(task, name).key
        return self._backend.nbytes(key, chunks_only=chunks_only)

    def io_counters(self) -> dict[str, int]:
        """I/O done so far, e.g. ``{"chunk_files_read": 12}`` on disk backends."""
        return self._backend.io_counters()

    def set_metadata(
        self, task: str, *, estimator: str | None = None, model: Mapping[str, Any] | None = None, **user: Any
    ) -> None:
        """Record the estimator, a model description and free-form fields for ``task``."""
        self._check_writable("set_metadata")
        t = self._cat().task(task)
        if estimator not in ESTIMATORS:
            raise InvalidArgumentError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if estimator is not None:
            t.info["estimator"] = estimator
        if model is not None:
            t.info["model"] = dict(model)
        if user:
            t.info.setdefault("user", {}).update(user)
        self._commit.write_manifest(t.manifest(), t.key)

    # -- creation -----------------------------------------------------------------------
    def create(
        self,
        task: str,
        name: str,
        shape: Sequence[int],
        layout: ParamLayout | None = None,
        decay: float | None = None,
        *,
        chunks: Sequence[int] | None = None,
    ) -> None:
        """Start tracking parameter ``name`` of ``task`` (creating the task if new).

        Creating an existing parameter with the same shape and layout does nothing.

        Args:
            shape: the parameter's native shape (Linear ``[out, in]``, Conv1D ``[in, out]``).
            layout: head geometry; attention parameters get one chunk per head block.
            decay: EMA β (default: the store's).
            chunks: override the chunk shape (default: from the layout).
        """
        self._create(task, name, shape, layout, decay, chunks)

    def _create(self, task: str, name: str, shape: Sequence[int], layout: ParamLayout | None = None,
                decay: float | None = None, chunks: Sequence[int] | None = None) -> ParamState:
        self._check_writable("create")
        beta = self.decay if decay is None else validate_decay(decay)
        t = self._cat().get(task) or TaskState(task, encode_name(task, "task name"))
        p = t.new_param(name, shape, layout, beta, chunks)  # refused before anything is written
        if p is None:
            return t.params[name]
        t = self._task_or_create(task)
        if self._group.is_leader:
            self._backend.write_json(doc_key(p.key), param_doc(name, p.shape, layout))
        self._place(p, len(t.params))
        t.params[name] = p
        self._commit.write_manifest(t.manifest(), t.key)
        return p

    def _task_or_create(self, task: str) -> TaskState:
        t = self._cat().get(task)
        if t is not None:
            return t
        self._check_writable("create a task")
        t = TaskState(name=task, key=encode_name(task, "task name"))
        if any(o.key == t.key for o in self._catalog):
            raise FisherStoreError(f"task {task!r} collides with an existing task's directory")
        self._commit.write_manifest(t.manifest(), t.key)
        self._catalog.add(t)
        if self._group.is_leader:
            self._backend.write_json(DOC, dataclasses.replace(self._doc, tasks=self._catalog.keys()).to_doc())
        return t

    # -- updating -----------------------------------------------------------------------
    def update(
        self,
        task: str,
        grads_sq: Mapping[str, Any],
        tokens: int | None = None,
        *,
        layouts: Mapping[str, ParamLayout | None] | None = None,
    ) -> None:
        """One EMA step for ``task``.

        Parameters the task tracks but ``grads_sq`` omits get ``x = 0`` by lazy decay (their
        arrays are not rewritten). With ``tokens``, each value is divided by it (token
        normalisation) and the count is added to the task's ``tokens_seen``.

        Unknown parameters are created on the fly when ``layouts`` names them (a value of
        None means "no heads").
        """
        with self.begin_step(task, tokens=tokens, layouts=layouts) as st:
            for name, g in grads_sq.items():
                st.add(name, g)

    def begin_step(
        self, task: str, tokens: int | None = None, *, layouts: Mapping[str, ParamLayout | None] | None = None
    ) -> StepWriter:
        """Start one EMA step fed one parameter at a time; use as a context manager.

        ``with store.begin_step("taskA", tokens=512) as st: st.add(name, grad_sq)``. A
        step whose block raises is discarded whole. Adding the same parameter twice in
        one step sums the two contributions (e.g. micro-batches).
        """
        self._check_writable("begin_step")
        if self._active is not None:
            raise StepError(
                f"a step for task {self._active.task!r} is still open; finish it (leave its "
                "`with` block) before starting another"
            )
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
            raise InvalidArgumentError(f"tokens must be a positive int (the token count T) or None, got {tokens!r}")
        t = self._task_or_create(task) if layouts is not None else self._cat().task(task)
        self._active = StepWriter(self._write, t, tokens, dict(layouts or {}), self._create, self._step_ended)
        return self._active

    def _step_ended(self, st: StepWriter, applied: bool) -> None:
        self._active = None
        if applied:
            self._steps_since_flush += 1
            if self.flush_every is not None and self._steps_since_flush >= self.flush_every:
                self.flush()

    def flush(self) -> None:
        """Fold RAM accumulators into new generations, sync once, and commit every dirty task."""
        self._check_open()
        if not self.writable:
            return
        if self._active is not None:
            raise StepError("flush() inside an open step; leave the step's `with` block first")
        self._commit.flush(self._catalog)
        self._steps_since_flush = 0

    # -- reading ------------------------------------------------------------------------
    def fisher(self, task: str, name: str, bias_corrected: bool = True) -> LazyFisher:
        """A lazy view of the Fisher EMA of ``name``: slicing reads only the chunks it touches."""
        self._cat().param(task, name)
        return LazyFisher(self, task, name, bias_corrected=bias_corrected)

    def read(self, task: str, name: str, region: Region | None = None, *, bias_corrected: bool = True) -> torch.Tensor:
        """The Fisher of ``region`` (a tuple of in-bounds slices; None: all) as an fp32 tensor."""
        p = self._cat().param(task, name)
        if region is None:
            region = full_region(p.shape)
        elif not (isinstance(region, tuple) and len(region) == len(p.shape) and all(
                isinstance(s, slice) and isinstance(s.start, int) and isinstance(s.stop, int)
                and 0 <= s.start <= s.stop <= n and (s.step is None or isinstance(s.step, int) and s.step >= 1)
                for s, n in zip(region, p.shape))):
            raise SliceError(f"read(): region must be {len(p.shape)} in-bounds slices with explicit starts, stops "
                             f"and positive steps, got {region!r}; index a LazyFisher (store.fisher(task, name)[...]) "
                             "for general slicing")
        return self._read.region(task, name, region, bias_corrected)

    def iter_heads(
        self,
        task: str,
        names: Sequence[str] | None = None,
        block: str | None = None,
        workers: int = 4,
        *,
        bias_corrected: bool = True,
    ) -> Iterator[tuple[str, int, str, torch.Tensor]]:
        """Yield ``(param, head, block, tensor)`` for every distinct head block, reading ahead.

        The Phase-6 sweep: ``for name, h, b, blk in store.iter_heads("math"): ...`` over
        every attention parameter with a head layout (or ``names``). K and V blocks come
        once per key/value head (``head`` is the first query head of its group). Up to
        ``2 * workers`` block reads are in flight across parameter boundaries, so the disk
        never waits on the caller.
        """
        self._check_open()
        return self._read.iter_heads(task, names, block, workers, bias_corrected)

    # -- checks -------------------------------------------------------------------------
    def _cat(self) -> Catalog:
        self._check_open()
        return self._catalog

    def _check_open(self) -> None:
        if self._closed:
            raise FisherStoreError("the store is closed; reopen it with fisherstore.open(path)")

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if not self.writable:
            raise ReadOnlyError(
                f"cannot {what}: the store at {self.path!r} was opened with mode='r'. Reopen it "
                "with mode='r+' (or 'a') to write."
            )

