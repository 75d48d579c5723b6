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

import threading
import warnings
import weakref
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .backends import ArrayBackend
from .catalog import Catalog, ParamInfo, ParamState, TaskState, committed_keys, load_task
from .codecs import CodecSpec
from .commit import Committer
from .dist import RankGroup
from .ema import validate_decay
from .errors import (
    FisherStoreError,
    FlushError,
    InvalidArgumentError,
    ReadOnlyError,
    SliceError,
    StepDiscardedWarning,
    StepError,
)
from .format import DOC, ESTIMATORS, doc_key, encode_name, json_value, number_base
from .iopool import IOPool
from .layout import ParamLayout
from .lazy import LazyFisher
from .lock import StoreLock
from .manifest import TaskManifest
from .opening import Resources, check_identity, open_root, recover_leftovers, take_lock
from .options import StoreOptions, default_memory_budget
from .read import ReadPath
from .regions import Region, full_region
from .replay import Replay
from .residency import MemoryPlan, Residency
from .samples import ContributionSource, LazySamples, SampleBatch, check_dtype, samples_of, segment_count
from .write import StepWriter, WritePath

__all__ = ["FisherStore", "StepWriter"]


class FisherStore:
    """A store of full elementwise Fisher EMAs, one array per (task, parameter).

    Open one with :func:`fisherstore.open`. ``FisherStore(backend, mode=..., ...)`` opens
    a store on a backend object you built (see :class:`~fisherstore.options.StoreOptions`).

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
        self._pool = IOPool(self.plan.workers, self.plan.queue_bytes)  # its workers trim the heap after slabs
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
        t = load_task(self._backend.read_json, name, key)
        for i, p in enumerate(t.params.values()):
            self._place(p, i)
        return t

    def _place(self, p: ParamState, index: int) -> None:
        """Who writes ``p`` (a rank of the group), and whether it stays resident."""
        p.owned = self._group.owner_of(p.name, index) == self._group.rank
        p.gen_base = self._number_base
        if p.owned and self.writable:
            p.resident = self._residency.admit(p.nbytes)

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

    def __enter__(self) -> FisherStore:
        return self

    def __exit__(self, *exc: object) -> None:
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
    device_budget = property(lambda self: self.options.device_budget,
                             doc="Bytes of GPU memory for accumulators (None: the device's free memory less a margin).")
    writable = property(lambda self: self.options.writable, doc="Whether the store was opened for writing.")
    closed = property(lambda self: self._res.closed, doc="Whether close() has run.")

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

    def set_metadata(
        self, task: str, *, estimator: str | None = None, model: Mapping[str, Any] | None = None, **user: Any
    ) -> None:
        """Record the estimator, a model description and free-form fields for ``task`` (committed by the next flush).

        Values must be JSON: numbers (numpy scalars are converted), strings, bools, None,
        lists and dicts. Anything else is refused here, and nothing of the call is kept.
        """
        self._check_writable("set_metadata")
        t = self._cat().task(task)
        if estimator not in ESTIMATORS:
            raise InvalidArgumentError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        model = json_value(dict(model), "model") if model is not None else None
        user = json_value(user, "set_metadata()") if user else {}
        with self._state_lock:
            if estimator is not None:
                t.info["estimator"] = estimator
            if model is not None:
                t.info["model"] = model
            if user:
                t.info.setdefault("user", {}).update(user)
            t.changed = True

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
        Creation is not a commit: the next flush (or ``close``) writes it, in one batch.

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
        with self._state_lock:
            t = self._cat().get(task) or TaskState(task, encode_name(task, "task name"), listed=False)
            p = t.new_param(name, shape, layout, beta, chunks)  # refused before the task is made
            if p is None:
                return t.params[name]
            t = self._task_or_create(task)
            self._place(p, len(t.params))
            t.params[name] = p
            t.changed = True
            return p

    def _task_or_create(self, task: str) -> TaskState:
        t = self._cat().get(task)
        if t is not None:
            return t
        self._check_writable("create a task")
        t = TaskState(name=task, key=encode_name(task, "task name"), listed=False, changed=True)
        if any(o.key == t.key for o in self._catalog):
            raise InvalidArgumentError(f"task {task!r} collides with an existing task's directory {t.key!r}")
        self._catalog.add(t)
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
        normalisation) and the count is added to the task's ``tokens_seen``. Unknown
        parameters are created on the fly when ``layouts`` names them (None: no heads).

        Raises :class:`FlushError` when the step was applied but the automatic flush after
        it (``flush_every``) failed: do not repeat the step. Any other error means the
        step was discarded whole.
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
        with self._state_lock:
            t = self._task_or_create(task) if layouts is not None else self._cat().task(task)
        self._active = StepWriter(self._write, t, tokens, dict(layouts or {}), self._create, self._step_ended)
        return self._active

    def _step_ended(self, st: StepWriter, applied: bool) -> None:
        self._active = None
        if not applied:
            return
        self._steps_since_flush += 1
        if self.flush_every is None or self._steps_since_flush < self.flush_every:
            return
        try:
            self.flush()
        except (FisherStoreError, OSError) as e:
            raise FlushError(
                getattr(e, "errno", None),
                f"step {st.t} of task {st.task!r} was applied and is kept in RAM, but the automatic flush after it "
                f"(flush_every={self.flush_every}) failed: {e}. Do not repeat the step (it would count twice); fix "
                "the cause and call flush() again.",
            ) from e

    def flush(self) -> None:
        """Fold RAM accumulators into new generations, sync once, and commit every dirty task."""
        self._check_open()
        if not self.writable:
            return
        if self._active is not None:
            raise StepError("flush() inside an open step; leave the step's `with` block first")
        self._commit.flush(self._catalog, self._doc)
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
        return self._read.iter_heads(task, names, block, workers, bias_corrected, self.options.progress)

    def replay(self, task: str, names: Sequence[str], *, in_place: bool = True) -> Replay:
        """A multi-pass run's hold on ``task`` (:mod:`fisherstore.replay`): rewind it per pass, write each
        group once, commit with one flush; ``abort()`` puts it back at its last commit.

        Usage: see :meth:`FisherCollector.collect_fisher_dataset`, its one user.
        """
        self._check_writable("replay")
        with self._state_lock:
            return Replay(self._write, self._cat().task(task), list(names), in_place=in_place)

    # -- per-sample gradients (Phase 6) --------------------------------------------------------
    def begin_samples(self, task: str, names: Sequence[str], n: int, *, ids: Sequence[str] | None = None,
                      dtype: str | None = None) -> SampleBatch:
        """Start a segment of ``n`` samples' signed gradients of ``names``; use as a context manager.

        ``with store.begin_samples("math", names, n=8) as sb: sb.add(i, name, g_i); sb.set_tokens(i, T_i)``.
        Committed by the next flush. ``ids``: stable sample ids, unique in the task (default:
        running numbers). ``dtype``: None stores the gradients' own dtype; see
        :class:`~fisherstore.samples.SampleBatch` for the rounded options.
        """
        self._check_writable("begin_samples")
        if self._active is not None:
            raise StepError(f"a step or sample segment of task {self._active.task!r} is still open; finish it first")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgumentError(f"n must be a positive number of samples, got {n!r}")
        with self._state_lock:
            t = self._cat().task(task)
            segments = samples_of(self._catalog, task)
            names = list(names)
            for name in names:
                self._catalog.param(task, name)
            if segments and set(names) != set(segments[0].params):
                raise InvalidArgumentError(
                    f"task {task!r} holds per-sample gradients of {len(segments[0].params)} parameters; a new segment "
                    f"must cover the same ones (got {len(names)}), so every sample has every parameter")
            ids = [str(i) for i in (ids if ids is not None else range(segment_count(segments),
                                                                      segment_count(segments) + n))]
            taken = {i for seg in segments for i in seg.ids}
            if len(ids) != n or len(set(ids)) != n or taken & set(ids):
                raise InvalidArgumentError(f"ids must be {n} distinct sample ids not yet in task {task!r}")
            segment = max((seg.id for seg in segments), default=self._number_base) + 1
        codecs = self.codecs.json_codecs()
        self._active = SampleBatch(self._backend, self._pool, self._state_lock, t, names, n, segment, ids, codecs,
                                   check_dtype(dtype), self._samples_ended)
        return self._active

    def _samples_ended(self, batch: SampleBatch) -> None:
        self._active = None

    def samples(self, task: str, name: str) -> LazySamples:
        """A lazy ``[n, *shape]`` view of ``name``'s per-sample gradients in ``task`` (reads chunks on demand)."""
        with self._state_lock:
            return LazySamples(self._backend, self._cat().task(task), self._catalog.param(task, name),
                               samples_of(self._catalog, task))

    def sample_params(self, task: str) -> list[str]:
        """The parameters ``task`` holds per-sample gradients of ([] before any are collected)."""
        segments = samples_of(self._cat(), task)
        return list(segments[0].params) if segments else []

    def sample_tokens(self, task: str) -> torch.Tensor:
        """Each sample's token count ``T_i``, in sample order: ``[n]`` int64."""
        return torch.tensor([t for seg in samples_of(self._cat(), task) for t in seg.tokens], dtype=torch.long)

    def sample_ids(self, task: str) -> list[str]:
        """Each sample's stable id, in sample order."""
        return [i for seg in samples_of(self._cat(), task) for i in seg.ids]

    def contribution_fisher(self, task: str, name: str) -> LazyFisher:
        """The contribution-based Fisher ``mean_i g_i²/T_i`` of ``name`` (Option 1), lazily and out of core.

        Reads like :meth:`fisher` (slices, ``.head``); each read streams the task's samples
        over just the region it asks for.
        """
        self._cat().param(task, name)
        source = ContributionSource(self.samples, self.param, self.revision, max(self.plan.total // 4, 64 << 20))
        return LazyFisher(source, task, name)

    # -- checks -------------------------------------------------------------------------
    def _cat(self) -> Catalog:
        self._check_open()
        return self._catalog

    def _check_open(self) -> None:
        if self.closed:
            raise FisherStoreError("the store is closed; reopen it with fisherstore.open(path)")

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if not self.writable:
            raise ReadOnlyError(
                f"cannot {what}: the store at {self.path!r} was opened with mode='r'. Reopen it "
                "with mode='r+' (or 'a') to write."
            )

    # -- views and summaries ------------------------------------------------------------
    def to_dask(self, task: str, name: str, *, bias_corrected: bool = True) -> Any:
        """``name``'s Fisher as a lazy Dask array, one Dask chunk per store chunk (needs the ``views`` extra).

        Usage: ``store.to_dask("math", q_name).sum(axis=1).compute()``. See :mod:`fisherstore.views`.
        """
        from .views import to_dask

        self._cat().param(task, name)
        return to_dask(self, task, name, bias_corrected=bias_corrected)

    def to_xarray(self, task: str, names: Sequence[str] | None = None, *, bias_corrected: bool = True) -> Any:
        """The task as an ``xr.DataTree`` of lazy, bias-corrected arrays with layer/head/block coordinates.

        Usage: ``store.to_xarray("math")[q_name]["fisher"].sum("in").groupby("head").sum()``.
        See :func:`fisherstore.views.to_xarray`.
        """
        from .views import to_xarray

        self._cat().task(task)
        return to_xarray(self, task, names, bias_corrected=bias_corrected)

    def summary(self, task: str, names: Sequence[str] | None = None, *, bias_corrected: bool = True,
                progress: bool | None = None) -> Any:
        """Fisher mass per (param, layer, head, block) as a ``pandas.DataFrame`` (needs the ``views`` extra).

        Usage: ``store.summary("math").pivot_table("mass", "layer", "head")``. See :mod:`fisherstore.summary`.
        """
        from .summary import summary

        self._cat().task(task)
        return summary(self, task, names, bias_corrected=bias_corrected, progress=progress)
