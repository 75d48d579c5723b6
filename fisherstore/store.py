"""FisherStore: per-(task, parameter) EMA of grad², on a backend, with crash-safe commits.

This module decides *what* to write (EMA folding, generations, commits); the backend in
:mod:`fisherstore.backends` decides *how*. The protocol (docs/format.md):

* Each parameter's EMA state lives in generation arrays ``<task>/<param>/g<N>``. A
  generation is never modified after the task manifest names it.
* Parameters in the **resident set** accumulate steps in RAM (``A ← β^Δ·A + (1-β)·x``)
  and fold on flush into a *new* generation (``F' = β^k·F + A``).
* The other parameters **stream**: each step reads the latest generation slab by slab,
  decays it, adds ``(1-β)·x`` and writes a new uncommitted generation.
* ``flush()`` writes the folds, makes the data durable (one ``syncfs``), then atomically
  replaces the task manifest, and only then deletes the generations it superseded. A
  crash at any point leaves the previous manifest and the generations it names intact.

Usage::

    import fisherstore, torch
    with fisherstore.open("/tmp/fs", mode="w") as store:
        store.create("taskA", "w", (4, 8))
        store.update("taskA", {"w": torch.rand(4, 8)})
        block = store.fisher("taskA", "w")[0:2]
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import __version__
from .backends import ArrayBackend
from .backends.base import Region
from .codecs import CodecSpec
from .ema import (
    NONFINITE_POLICIES,
    as_grad_sq,
    decay_factor,
    fold,
    readout_scale,
    step_weight,
    validate_decay,
)
from .engine import IOPool, MemoryPlan, bound_allocator, wait_all
from .errors import (
    CorruptChunkError,
    FisherStoreError,
    HeadIndexError,
    InvalidArgumentError,
    LayoutError,
    NotAFisherStoreError,
    ReadOnlyError,
    RecoveryWarning,
    ShapeMismatchError,
    StepError,
    StorageError,
    UnknownParamError,
    UnknownTaskError,
    close_matches,
    human_bytes,
    listing,
)
from .format import (
    ESTIMATORS,
    PARAM_ATTR,
    ROOT_ATTR,
    TASK_ATTR,
    check_root,
    encode_name,
    gen_name,
    group_doc,
    parse_gen,
    root_body,
)
from .layout import ParamLayout, chunk_shape, iter_slabs, split_axis
from .lock import StoreLock

if TYPE_CHECKING:
    from .dist import RankGroup
    from .lazy import LazyFisher

__all__ = ["FisherStore", "StepWriter"]

#: Default bound on what a disk-backed store holds in RAM (accumulators and staging).
DEFAULT_MEMORY_BUDGET = 1 << 30
MODES = ("r", "r+", "a", "w")


@dataclass
class _Param:
    """In-RAM state of one (task, parameter)."""

    name: str
    key: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    layout: ParamLayout | None
    decay: float
    gen: int | None = None  # committed generation (None: all zeros)
    t_last: int = 0  # step at which `gen` is current
    work_gen: int | None = None  # uncommitted streamed generation
    work_t: int = 0
    acc: torch.Tensor | None = None  # resident accumulator, current at a_last
    a_last: int | None = None  # None: accumulator holds nothing
    resident: bool = False
    owned: bool = True  # False: another rank of the group writes it
    nonfinite_skipped: int = 0
    updates: int = 0
    superseded: list[int] = field(default_factory=list)  # generations to delete after commit

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)

    def gen_key(self, gen: int) -> str:
        return f"{self.key}/{gen_name(gen)}"

    def latest(self) -> tuple[int | None, int]:
        """The newest generation holding data (committed or working) and its step."""
        if self.work_gen is not None:
            return self.work_gen, self.work_t
        return self.gen, self.t_last

    def next_gen(self) -> int:
        used = [g for g in (self.gen, self.work_gen, *self.superseded) if g is not None]
        return max(used, default=0) + 1

    @property
    def dirty(self) -> bool:
        return self.a_last is not None or self.work_gen is not None

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "shape": list(self.shape),
            "chunks": list(self.chunks),
            "layout": self.layout.to_dict() if self.layout else None,
            "decay": self.decay,
            "generation": self.gen,
            "t_last": self.t_last,
            "nonfinite_skipped": self.nonfinite_skipped,
            "updates": self.updates,
        }


@dataclass
class _Task:
    name: str
    key: str
    step: int = 0  # in-RAM step (includes uncommitted steps)
    tokens_seen: int = 0
    committed_step: int = 0
    committed_tokens: int = 0
    commit: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # estimator, model, user
    params: dict[str, _Param] = field(default_factory=dict)


class FisherStore:
    """A store of full elementwise Fisher EMAs, one array per (task, parameter).

    Open one with :func:`fisherstore.open`; don't construct it directly.
    """

    def __init__(
        self,
        backend: ArrayBackend,
        *,
        mode: str,
        decay: float = 0.99,
        nonfinite: str = "raise",
        memory_budget: int | None = None,
        flush_every: int | None = None,
        codecs: CodecSpec | None = None,
        io_workers: int = 2,
        progress: bool | None = None,
        device_budget: int = 0,
        force: bool = False,
        group: RankGroup | None = None,
    ) -> None:
        if mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise InvalidArgumentError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if flush_every is not None and (not isinstance(flush_every, int) or flush_every < 1):
            raise InvalidArgumentError(f"flush_every must be a positive int or None, got {flush_every!r}")
        if memory_budget is None:
            memory_budget = 0 if not backend.persistent else DEFAULT_MEMORY_BUDGET
        if not isinstance(memory_budget, int) or memory_budget < 0:
            raise InvalidArgumentError(f"memory_budget must be a non-negative number of bytes, got {memory_budget!r}")
        self._backend = backend
        self.mode = mode
        self.decay = validate_decay(decay)
        self.nonfinite = nonfinite
        self.memory_budget = memory_budget
        self.flush_every = flush_every
        self.progress = progress
        self.plan = MemoryPlan.from_budget(memory_budget, io_workers)
        self.device_budget = device_budget
        self._pool = IOPool(self.plan.workers, self.plan.queue_bytes)
        if backend.persistent and mode != "r":
            bound_allocator()
        self._closed = False
        self._active_step: StepWriter | None = None
        self._closing: StepWriter | None = None  # exited step whose writes may be in flight
        self._tasks: dict[str, _Task] = {}
        self._resident_bytes = 0
        self._device_bytes = 0
        self._steps_since_flush = 0
        self._group = group
        self._lock: StoreLock | None = None
        try:
            self._acquire_lock(force)
            if self._is_root:
                self._open(codecs or CodecSpec())
            if group is not None:
                # Rank 0 creates or cleans the store before any other rank looks at it.
                group.barrier()
            if not self._is_root:
                self._open(codecs or CodecSpec())
        except BaseException:
            self._pool.shutdown()
            self._release_lock()
            raise

    def _acquire_lock(self, force: bool) -> None:
        # One writer per store: the lock is taken before anything is read or cleaned up,
        # so orphan removal never races another writer. In a rank group, rank 0 holds it
        # for the group (the other ranks write only chunks rank 0 does not).
        be = self._backend
        if not be.persistent or self.mode == "r" or (self._group is not None and self._group.rank != 0):
            return
        fresh = not os.path.isdir(be.root)
        be.ensure_root()
        self._lock = StoreLock(be.root, force=force)
        try:
            self._lock.acquire()
        except BaseException:
            self._lock = None
            if fresh:
                shutil.rmtree(be.root, ignore_errors=True)
            raise

    @property
    def _is_root(self) -> bool:
        """Whether this process writes the metadata documents (always, without a group)."""
        return self._group is None or self._group.rank == 0

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        lock.release()
        root = self._backend.root
        if root and not self._backend.exists():  # we created nothing: leave no lock file behind
            with contextlib.suppress(OSError):
                os.unlink(lock.path)

    # -- opening ------------------------------------------------------------------------
    def _open(self, codecs: CodecSpec) -> None:
        be = self._backend
        where = be.root or "<ram>"
        if self.mode == "w" and be.exists() and self._is_root:
            check_root(be.read_json("zarr.json"), where)  # never wipe a directory that isn't ours
            be.clear()
        doc = be.read_json("zarr.json")
        if doc is None and self.mode in ("a", "w"):
            if hasattr(be, "ensure_root"):
                be.ensure_root()
                self._refuse_foreign_dir()
            self._root = root_body(__version__, codecs.to_dict())
            be.write_json("zarr.json", group_doc(ROOT_ATTR, self._root))
            return
        self._root = check_root(doc, where)
        be.codecs = CodecSpec.from_dict(self._root.get("codecs") or {})
        for task_name, task_key in self._root.get("tasks", {}).items():
            self._tasks[task_name] = self._load_task(task_name, task_key)
        if self.writable and self._is_root:
            self._remove_orphans()

    def _refuse_foreign_dir(self) -> None:
        root = self._backend.root
        if root and os.path.isdir(root) and any(not n.startswith(".") for n in os.listdir(root)):
            raise NotAFisherStoreError(
                f"{root!r} is a non-empty directory that is not a fisherstore store; refusing to "
                "create a store inside it. Pick an empty or new directory."
            )

    def _load_task(self, name: str, key: str) -> _Task:
        doc = self._backend.read_json(f"{key}/zarr.json")
        body = ((doc or {}).get("attributes") or {}).get(TASK_ATTR)
        if not isinstance(body, dict):
            raise FisherStoreError(
                f"task {name!r} is listed in the store root but its manifest {key}/zarr.json is "
                "missing or damaged. Run `fisherstore verify` on the store."
            )
        task = _Task(
            name=name,
            key=key,
            step=body["step"],
            tokens_seen=body.get("tokens_seen", 0),
            committed_step=body["step"],
            committed_tokens=body.get("tokens_seen", 0),
            commit=body.get("commit", 0),
            info={k: body.get(k) for k in ("estimator", "model", "user") if body.get(k) is not None},
        )
        layouts: dict[str, ParamLayout] = {}  # a model has a handful of distinct layouts: parse each once
        for pname, e in body.get("params", {}).items():
            lay = e.get("layout")
            if lay:
                k = repr(sorted(lay.items()))
                if k not in layouts:
                    layouts[k] = ParamLayout.from_dict(lay)
            p = _Param(
                name=pname,
                key=e["key"],
                shape=tuple(e["shape"]),
                chunks=tuple(e["chunks"]),
                layout=layouts[k] if lay else None,
                decay=e["decay"],
                gen=e.get("generation"),
                t_last=e.get("t_last", 0),
                nonfinite_skipped=e.get("nonfinite_skipped", 0),
                updates=e.get("updates", 0),
            )
            self._assign_owner(p, len(task.params))
            self._assign_residency(p)
            task.params[pname] = p
        return task

    def _remove_orphans(self) -> None:
        """Delete what a crashed writer left: uncommitted generations and unlisted nodes."""
        be = self._backend
        be.remove_temp_files()
        removed: list[str] = []
        known_tasks = {t.key: t for t in self._tasks.values()}
        for tkey in be.list(""):
            task = known_tasks.get(tkey)
            if task is None:
                if self._is_ours(f"{tkey}/zarr.json", TASK_ATTR):
                    be.delete(tkey)
                    removed.append(tkey)
                continue
            known_params = {p.key.rsplit("/", 1)[-1]: p for p in task.params.values()}
            for pkey in be.list(tkey):
                p = known_params.get(pkey)
                if p is None:
                    if self._is_ours(f"{tkey}/{pkey}/zarr.json", PARAM_ATTR):
                        be.delete(f"{tkey}/{pkey}")
                        removed.append(f"{tkey}/{pkey}")
                    continue
                for child in be.list(p.key):
                    g = parse_gen(child)
                    if g is not None and g != p.gen:
                        be.delete(f"{p.key}/{child}")
                        removed.append(f"{p.key}/{child}")
        if removed:
            prev = self._lock.previous if self._lock is not None else None
            who = f" (pid {prev.get('pid')} on host {prev.get('host')})" if prev else ""
            warnings.warn(
                f"{self.path}: a previous writer{who} stopped without closing the store; its steps after "
                f"the last flush were rolled back and {len(removed)} uncommitted node(s) removed: "
                f"{listing(removed, 4)}. Every task is at its last commit.",
                RecoveryWarning,
                stacklevel=4,
            )

    def _is_ours(self, key: str, attr: str) -> bool:
        try:
            doc = self._backend.read_json(key)
        except FisherStoreError:
            return True  # a half-written document of ours
        return doc is None or attr in (doc.get("attributes") or {})

    # -- properties ---------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend's name: ``"zarr"``, ``"tensorstore"`` or ``"ram"``."""
        return self._backend.name

    @property
    def path(self) -> str | None:
        """The store's root directory (None for ``"ram"``)."""
        return self._backend.root

    @property
    def writable(self) -> bool:
        return self.mode != "r"

    @property
    def codecs(self) -> CodecSpec:
        return self._backend.codecs

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        n_params = sum(len(t.params) for t in self._tasks.values())
        state = "closed" if self._closed else f"mode={self.mode!r}"
        return (
            f"<FisherStore {self.backend} {self.path or ''!s} {state} tasks={len(self._tasks)} "
            f"params={n_params}>".replace("  ", " ")
        )

    def __enter__(self) -> FisherStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- catalogue ----------------------------------------------------------------------
    def tasks(self) -> list[str]:
        """Names of the tasks in the store."""
        self._check_open()
        return list(self._tasks)

    def params(self, task: str) -> list[str]:
        """Names of the parameters tracked for ``task``, in creation order."""
        return list(self._task(task).params)

    def step(self, task: str) -> int:
        """The task's EMA step count (including steps not yet flushed)."""
        self._finalize_closing()
        return self._task(task).step

    def layout(self, task: str, name: str) -> ParamLayout | None:
        """The head layout of a parameter (None for a plain tensor)."""
        return self._param(task, name).layout

    def metadata(self, task: str | None = None) -> dict[str, Any]:
        """Store metadata (``task=None``) or one task's: step, tokens, estimator, model, ..."""
        self._check_open()
        self._finalize_closing()
        if task is None:
            return {
                "format_version": self._root["format_version"],
                "written_by": self._root.get("written_by"),
                "backend": self.backend,
                "path": self.path,
                "codecs": self.codecs.to_dict(),
                "tasks": self.tasks(),
            }
        t = self._task(task)
        return {
            "task": t.name,
            "step": t.step,
            "committed_step": t.committed_step,
            "tokens_seen": t.tokens_seen,
            "estimator": t.info.get("estimator"),
            "model": t.info.get("model"),
            "user": t.info.get("user", {}),
            "params": {
                n: {
                    "shape": p.shape,
                    "chunks": p.chunks,
                    "layout": p.layout,
                    "decay": p.decay,
                    "t_last": p.latest()[1] if p.a_last is None else p.a_last,
                    "updates": p.updates,
                    "nonfinite_skipped": p.nonfinite_skipped,
                    "resident": p.resident,
                }
                for n, p in t.params.items()
            },
        }

    def set_metadata(
        self, task: str, *, estimator: str | None = None, model: Mapping[str, Any] | None = None, **user: Any
    ) -> None:
        """Record the estimator, a model description and free-form fields for ``task``."""
        self._check_writable("set_metadata")
        self._finalize_closing()
        t = self._task(task)
        if estimator not in ESTIMATORS:
            raise InvalidArgumentError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if estimator is not None:
            t.info["estimator"] = estimator
        if model is not None:
            t.info["model"] = dict(model)
        if user:
            t.info.setdefault("user", {}).update(user)
        self._write_manifest(t)

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
        self._check_writable("create")
        if self._active_step is None:
            self._finalize_closing()
        encode_name(name, "parameter name")
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ShapeMismatchError(f"parameter {name!r}: shape {shape} has a negative dimension")
        if layout is not None:
            if not isinstance(layout, ParamLayout):
                raise LayoutError(f"parameter {name!r}: layout must be a ParamLayout, got {type(layout).__name__}")
            layout.validate_shape(shape, name)
        beta = self.decay if decay is None else validate_decay(decay)
        t = self._task(task, create=True)
        old = t.params.get(name)
        if old is not None:
            if old.shape != shape or old.layout != layout:
                raise ShapeMismatchError(
                    f"parameter {name!r} of task {task!r} already exists with shape {old.shape} and "
                    f"layout {old.layout}; cannot recreate it as {shape} / {layout}"
                )
            return
        ch = tuple(chunks) if chunks is not None else chunk_shape(shape, layout)
        if len(ch) != len(shape) or any(c < 1 for c in ch):
            raise ShapeMismatchError(f"parameter {name!r}: chunks {ch} do not fit shape {shape}")
        p = _Param(name=name, key=f"{t.key}/{encode_name(name, 'parameter name')}", shape=shape,
                   chunks=ch, layout=layout, decay=beta)
        body = {"name": name, "shape": list(shape), "layout": layout.to_dict() if layout else None}
        if self._is_root:
            self._backend.write_json(f"{p.key}/zarr.json", group_doc(PARAM_ATTR, body))
        self._assign_owner(p, len(t.params))
        self._assign_residency(p)
        t.params[name] = p
        self._write_manifest(t)

    def _assign_owner(self, p: _Param, index: int) -> None:
        if self._group is not None:
            p.owned = self._group.owner_of(p.name, index) == self._group.rank

    def owns(self, task: str, name: str) -> bool:
        """Whether this process writes ``name`` (always True outside a rank group)."""
        return self._param(task, name).owned

    def _assign_residency(self, p: _Param) -> None:
        # The resident set is fixed at creation: the access pattern is cyclic (every
        # parameter every step), where LRU eviction would thrash (DESIGN §6b). A resident
        # parameter costs its accumulator plus one step's staging.
        if not p.owned or not self.writable:
            return
        cost = 2 * p.nbytes
        if self._resident_bytes + cost <= self.plan.resident_bytes:
            p.resident = True
            self._resident_bytes += cost

    def _slab_bytes(self) -> int:
        return self.plan.slab_bytes or 1  # 0: one chunk per slab

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
        if self._active_step is not None:
            raise StepError(
                f"a step for task {self._active_step.task!r} is still open; finish it (leave its "
                "`with` block) before starting another"
            )
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
            raise InvalidArgumentError(f"tokens must be a positive int (the token count T) or None, got {tokens!r}")
        t = self._task(task, create=layouts is not None)
        st = StepWriter(self, t, tokens, dict(layouts or {}))
        self._active_step = st
        return st

    def _finalize_closing(self) -> None:
        """Wait for the previous step's writes, then apply it (or discard it and raise)."""
        st = self._closing
        if st is None:
            return
        self._closing = None
        exc = wait_all(st.futures)
        if exc is not None:
            self._abort_step(st)
            needed = sum(st.task_state.params[n].nbytes for n in st.streamed)
            cls = StorageError if isinstance(exc, OSError) else FisherStoreError
            args = (exc.errno,) if isinstance(exc, OSError) else ()
            raise cls(
                *args,
                f"step {st.t} of task {st.task!r} failed while writing in the background "
                f"({type(exc).__name__}: {exc}); it needed {human_bytes(needed)} for the new generations of its "
                f"streamed parameters. The step was discarded whole and the task stays at step "
                f"{st.task_state.step}. Fix the cause (disk space, permissions) and repeat the step.",
            ) from exc
        self._commit_step(st)

    def _commit_step(self, st: StepWriter) -> None:
        t = st.task_state
        for name, entries in st.staged.items():
            p = t.params[name]
            first = _wait_host(entries[0][1])
            fresh = p.a_last is None  # the accumulator holds nothing (new, or folded by a flush)
            if p.acc is None:
                p.acc = torch.empty(p.shape, dtype=torch.float32, device=first.device)
            f = 0.0 if fresh else decay_factor(p.decay, st.t - p.a_last)
            if _tiles_once(p, entries):
                # Decay and add one region at a time, so the second pass over a slab hits
                # the cache: half the memory traffic of decaying the whole tensor first.
                for region, x, alpha in entries:
                    a = p.acc[region]
                    if fresh:
                        torch.mul(_wait_host(x), alpha, out=a)
                    else:
                        if f != 1.0:
                            a.mul_(f)
                        a.add_(_wait_host(x), alpha=alpha)
            else:  # overlapping or partial regions: decay everything, then add each
                if fresh:
                    p.acc.zero_()
                elif f != 1.0:
                    p.acc.mul_(f)
                for region, x, alpha in entries:
                    p.acc[region].add_(_wait_host(x), alpha=alpha)
            p.a_last = st.t
        for name, gen in st.streamed.items():
            p = t.params[name]
            if p.work_gen is not None:
                self._backend.delete(p.gen_key(p.work_gen))
            p.work_gen, p.work_t = gen, st.t
        for name in st.touched:
            t.params[name].updates += 1
        for name, n in st.skipped.items():
            t.params[name].nonfinite_skipped += n
        t.step = st.t
        t.tokens_seen += st.tokens or 0

    def _abort_step(self, st: StepWriter) -> None:
        wait_all(st.futures)
        for name, gen in st.streamed.items():
            self._backend.delete(st.task_state.params[name].gen_key(gen))
        st.staged.clear()

    # -- flushing -----------------------------------------------------------------------
    def flush(self) -> None:
        """Fold RAM accumulators into new generations, sync once, and commit every dirty task."""
        self._check_open()
        if not self.writable:
            return
        if self._active_step is not None:
            raise StepError("flush() inside an open step; leave the step's `with` block first")
        self._finalize_closing()
        dirty = [t for t in self._tasks.values() if t.step != t.committed_step or any(p.dirty for p in t.params.values())]
        if self._group is not None:  # collective: commit a task if any rank has news for it
            names = set().union(*self._group.all_gather([t.name for t in dirty]))
            dirty = [t for t in self._tasks.values() if t.name in names]
        if dirty:
            total = sum(p.nbytes for t in dirty for p in t.params.values() if p.a_last is not None)
            written: dict[str, list[tuple[_Param, int]]] = {}
            err: BaseException | None = None
            try:
                with _progress(total, self.progress, f"flush {self.path or ''}") as bar:
                    for t in dirty:
                        written[t.name] = self._fold_task(t, bar)
                self._backend.sync()  # one durable sync for every task's new generations
            except BaseException as e:
                err = e
            err = self._agree(err, "write its part of the flush")
            if err is not None:
                for ws in written.values():
                    for p, new in ws:
                        self._backend.delete(p.gen_key(new))
                raise self._storage_error(err, "flush", total, dirty) from err
            for t in dirty:
                self._commit_task(t, written[t.name])
        self._steps_since_flush = 0

    def _agree(self, err: BaseException | None, what: str) -> BaseException | None:
        """In a rank group, every rank learns whether any rank failed (so none commits alone)."""
        if self._group is None:
            return err
        msgs = self._group.all_gather(None if err is None else f"{type(err).__name__}: {err}")
        if err is None:
            bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
            if bad:
                err = FisherStoreError(f"rank {bad[0][0]} failed to {what} ({bad[0][1]}); nothing was committed")
        return err

    def _storage_error(self, err: BaseException, what: str, needed: int, tasks: Sequence[_Task]) -> BaseException:
        """Turn an OS error from the disk into one that says what was needed and what is kept."""
        if not isinstance(err, OSError) or isinstance(err, FisherStoreError):
            return err
        where = f" writing {err.filename!r}" if err.filename else ""
        free = ""
        with contextlib.suppress(OSError, TypeError):
            free = f", and {human_bytes(shutil.disk_usage(self.path).free)} is free there"
        at = ", ".join(f"task {t.name!r} at step {t.committed_step}" for t in tasks)
        return StorageError(
            err.errno,
            f"{what} of {self.path!r} failed{where}: {err.strerror or err}. It needed "
            f"{human_bytes(needed)} ({needed} bytes) for new generations{free}. The store stays at its last "
            f"commit ({at}) and the steps since are kept in RAM: free space (or fix the device) and call "
            "flush() again.",
        )

    def _fold_task(self, t: _Task, bar: Any) -> list[tuple[_Param, int]]:
        """Write every resident accumulator of ``t`` into a new generation (on the pool)."""
        written: list[tuple[_Param, int]] = []
        futures = []
        try:
            for p in t.params.values():
                if p.a_last is None:
                    continue
                new = p.next_gen()
                src, src_t = p.latest()
                self._backend.create_array(p.gen_key(new), p.shape, p.chunks, self._array_attrs(p))
                written.append((p, new))
                k = p.a_last - src_t
                for region in iter_slabs(p.shape, p.chunks, self._slab_bytes()):
                    nb = _nbytes(region)
                    futures.append(self._pool.submit(nb, self._fold_slab, t, p, src, new, region, k, bar))
            exc = wait_all(futures)
            if exc is not None:
                raise exc
        except BaseException:
            wait_all(futures)
            for p, new in written:
                self._backend.delete(p.gen_key(new))
            raise
        return written

    def _fold_slab(self, t: _Task, p: _Param, src: int | None, new: int, region: Region, k: int, bar: Any) -> None:
        acc = p.acc[region]
        if acc.device.type != "cpu":
            acc = _to_pinned(acc)[0]
            torch.cuda.current_stream(p.acc.device).synchronize()
        if src is None:
            out = acc.clone()
        else:
            out = fold(torch.from_numpy(self._read_array(t, p, src, region)), acc, p.decay, k)
        self._backend.write(p.gen_key(new), region, out.numpy())
        bar.update(out.numel() * 4)

    def _commit_task(self, t: _Task, written: list[tuple[_Param, int]]) -> None:
        """Switch ``t`` to its new generations with one atomic manifest write."""
        old = {n: (p.gen, p.t_last, p.work_gen, p.work_t) for n, p in t.params.items()}
        for p, new in written:
            if p.work_gen is not None:
                p.superseded.append(p.work_gen)
            p.work_gen, p.work_t = new, p.a_last
        for p in t.params.values():
            if p.work_gen is not None:
                if p.gen is not None:
                    p.superseded.append(p.gen)
                p.gen, p.t_last, p.work_gen = p.work_gen, p.work_t, None
        prev = (t.committed_step, t.committed_tokens, t.commit)
        t.committed_step, t.committed_tokens, t.commit = t.step, t.tokens_seen, t.commit + 1
        try:
            if self._group is not None:
                self._merge_from_ranks(t)
            err: BaseException | None = None
            try:
                self._write_manifest(t)
            except BaseException as e:
                err = e
            err = self._agree(err, f"commit task {t.name!r}")
            if err is not None:
                raise err
        except BaseException:
            t.committed_step, t.committed_tokens, t.commit = prev
            for n, p in t.params.items():
                p.gen, p.t_last, p.work_gen, p.work_t = old[n]
                p.superseded = [g for g in p.superseded if g not in (p.gen, p.work_gen)]
            for p, new in written:
                self._backend.delete(p.gen_key(new))
            raise
        for p, _ in written:
            p.a_last = None  # the accumulator is spent; the next step overwrites it
        for p in t.params.values():
            for g in p.superseded:
                self._backend.delete(p.gen_key(g))
            p.superseded.clear()

    def _merge_from_ranks(self, t: _Task) -> None:
        """Learn the new generations of the parameters other ranks own (for rank 0's manifest)."""
        mine = {n: p.manifest_entry() for n, p in t.params.items() if p.owned}
        for entries in self._group.all_gather(mine):
            for n, e in entries.items():
                p = t.params.get(n)
                if p is None or p.owned:
                    continue
                p.gen, p.t_last = e["generation"], e["t_last"]
                p.updates, p.nonfinite_skipped = e["updates"], e["nonfinite_skipped"]

    def _write_manifest(self, t: _Task) -> None:
        if not self._is_root:
            return
        body: dict[str, Any] = {
            "name": t.name,
            "step": t.committed_step,
            "tokens_seen": t.committed_tokens,
            "commit": t.commit,
            "params": {n: p.manifest_entry() for n, p in t.params.items()},
        }
        body.update(t.info)
        self._backend.write_json(f"{t.key}/zarr.json", group_doc(TASK_ATTR, body))

    def _array_attrs(self, p: _Param) -> dict[str, Any]:
        return {PARAM_ATTR: {"name": p.name, "layout": p.layout.to_dict() if p.layout else None}}

    def close(self) -> None:
        """Flush (when writable) and release the backend. Safe to call twice."""
        if self._closed:
            return
        try:
            if self.writable and self._active_step is None:
                self.flush()
        finally:
            self._closed = True
            self._pool.shutdown()
            self._backend.close()
            self._release_lock()

    # -- reading ------------------------------------------------------------------------
    def fisher(self, task: str, name: str, bias_corrected: bool = True) -> LazyFisher:
        """A lazy view of the Fisher EMA of ``name``: slicing reads only the chunks it touches."""
        from .lazy import LazyFisher

        self._param(task, name)
        return LazyFisher(self, task, name, bias_corrected=bias_corrected)

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
        from .lazy import LazyFisher

        t = self._task(task)
        if names is None:
            names = [n for n, p in t.params.items() if p.layout is not None and p.layout.has_heads]
        todo = []
        for name in names:
            layout = self._param(task, name).layout
            if layout is None or not layout.has_heads:
                raise HeadIndexError(f"parameter {name!r} of task {task!r} has no head layout")
            for b in [block.upper()] if block else list(layout.blocks):
                step = layout.group_size if b in "KV" else 1
                todo += [(name, h, b) for h in range(0, layout.num_heads, step)]
        self._finalize_closing()
        views = {n: LazyFisher(self, task, n, bias_corrected=bias_corrected) for n in names}
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="fisherstore-read") as ex:
            pending: deque = deque()
            it = iter(todo)
            for name, h, b in itertools.islice(it, 2 * workers):
                pending.append((name, h, b, ex.submit(views[name].head, h, b)))
            while pending:
                name, h, b, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((*nxt, ex.submit(views[nxt[0]].head, nxt[1], nxt[2])))
                yield name, h, b, fut.result()

    def _read_region(self, task: str, name: str, region: Region, bias_corrected: bool) -> torch.Tensor:
        """The EMA value of ``region`` at the task's current step, as fp32."""
        for _ in range(8):
            try:
                return self._read_region_once(task, name, region, bias_corrected)
            except CorruptChunkError:
                # A reader racing a writer: the generation it knew was superseded and deleted
                # by a newer commit. Read that commit instead (each read is whole, at one step).
                if self.writable or not self._refresh_task(task):
                    raise
        return self._read_region_once(task, name, region, bias_corrected)

    def _refresh_task(self, task: str) -> bool:
        """Reload ``task`` from its manifest if a writer committed since; True if it changed."""
        t = self._task(task)
        doc = self._backend.read_json(f"{t.key}/zarr.json") or {}
        body = (doc.get("attributes") or {}).get(TASK_ATTR) or {}
        if body.get("commit", t.commit) == t.commit:
            return False
        self._tasks[task] = self._load_task(task, t.key)
        return True

    def _read_region_once(self, task: str, name: str, region: Region, bias_corrected: bool) -> torch.Tensor:
        self._finalize_closing()
        t = self._task(task)
        p = self._param(task, name)
        src, src_t = p.latest()
        if src is None:
            out = torch.zeros(_shape(region), dtype=torch.float32)
        else:
            out = torch.from_numpy(self._read_array(t, p, src, region))
            out.mul_(readout_scale(p.decay, t.step, src_t, bias_corrected))
        if p.a_last is not None:
            out.add_(p.acc[region].cpu(), alpha=readout_scale(p.decay, t.step, p.a_last, bias_corrected))
        return out

    def _read_array(self, t: _Task, p: _Param, gen: int, region: Region) -> np.ndarray:
        try:
            data = self._backend.read(p.gen_key(gen), region)
        except FisherStoreError:
            raise
        except Exception as e:  # the libraries raise assorted types for bad chunks
            coords = self._bad_chunks(p, gen, region, e)
            raise CorruptChunkError(
                f"cannot read task {t.name!r}, parameter {p.name!r}, chunk {', '.join(map(str, coords))} "
                f"(generation {gen}): {type(e).__name__}: {e}. The chunk file is damaged or "
                "missing; run `fisherstore verify` to list every bad chunk."
            ) from e
        # torch.from_numpy needs a writeable, contiguous float32 buffer; copy only if not.
        return np.require(data, np.float32, ["C", "W"])

    def _bad_chunks(self, p: _Param, gen: int, region: Region, err: Exception) -> list[tuple[int, ...]]:
        """The grid coordinates of the chunks of ``region`` that fail to read (error path only)."""
        coords = _chunk_coords(region, p.chunks)
        if len(coords) == 1:
            return coords
        bad = []
        for c in coords:  # name every bad chunk of the read, not only the first one hit
            sub = tuple(slice(i * n, min((i + 1) * n, size)) for i, n, size in zip(c, p.chunks, p.shape))
            try:
                self._backend.read(p.gen_key(gen), sub)
            except Exception:
                bad.append(c)
        return bad or coords

    # -- lookups and checks -------------------------------------------------------------
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

    def _task(self, task: str, create: bool = False) -> _Task:
        self._check_open()
        t = self._tasks.get(task)
        if t is not None:
            return t
        if not create:
            raise UnknownTaskError(
                f"unknown task {task!r}; the store has tasks {listing(self._tasks)}."
                + close_matches(str(task), self._tasks)
            )
        self._check_writable("create a task")
        t = _Task(name=task, key=encode_name(task, "task name"))
        if any(o.key == t.key for o in self._tasks.values()):
            raise FisherStoreError(f"task {task!r} collides with an existing task's directory")
        self._write_manifest(t)
        self._tasks[task] = t
        self._root.setdefault("tasks", {})[task] = t.key
        if self._is_root:
            self._backend.write_json("zarr.json", group_doc(ROOT_ATTR, self._root))
        return t

    def _param(self, task: str, name: str) -> _Param:
        t = self._task(task)
        p = t.params.get(name)
        if p is None:
            raise UnknownParamError(
                f"unknown parameter {name!r} in task {task!r} ({len(t.params)} tracked)."
                + close_matches(str(name), t.params)
                + " Create it with store.create(task, name, shape, layout) or pass layouts= to update()."
            )
        return p

    def _param_for_add(self, st: StepWriter, name: str, x: Any, region: Any = None) -> _Param:
        p = st.task_state.params.get(name)
        if p is None and name in st.layouts:
            if region is not None:
                raise UnknownParamError(f"create parameter {name!r} before feeding it by region")
            shape = tuple(getattr(x, "shape", ()))
            self.create(st.task, name, shape, st.layouts[name])
            p = st.task_state.params[name]
        if p is None:
            self._param(st.task, name)  # raises UnknownParamError with suggestions
        return p


class StepWriter:
    """One EMA step under construction; see :meth:`FisherStore.begin_step`."""

    def __init__(self, store: FisherStore, task: _Task, tokens: int | None, layouts: dict[str, Any]) -> None:
        self.store = store
        self.task_state = task
        self.task = task.name
        self.tokens = tokens
        self.layouts = layouts
        # The previous step may still be closing (its writes in flight): count it. If it
        # fails, the first add() of this step raises and this step is discarded too.
        closing = store._closing
        self.t = task.step + 1 + (1 if closing is not None and closing.task_state is task else 0)
        # name -> [(region, grad², weight)]: resident contributions, applied with the step.
        self.staged: dict[str, list[tuple[Region, Any, float]]] = {}
        self.streamed: dict[str, int] = {}
        self.coverage: dict[str, np.ndarray] = {}
        self.futures: list[Future] = []
        self._param_futures: dict[str, list[Future]] = {}
        self.touched: set[str] = set()
        self.skipped: dict[str, int] = {}
        self._state = "open"

    def __enter__(self) -> StepWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._state != "open":
            return
        store = self.store
        store._active_step = None
        if exc_type is not None:
            self._state = "aborted"
            store._abort_step(self)
            return
        try:
            self._fill_uncovered()
        except BaseException:
            self._state = "aborted"
            store._abort_step(self)
            raise
        self._state = "committed"
        # The step is applied once its writes land, at the store's next call; until then
        # they overlap with the caller's next forward pass.
        store._finalize_closing()
        store._closing = self
        store._steps_since_flush += 1
        if store.flush_every is not None and store._steps_since_flush >= store.flush_every:
            store.flush()

    def __repr__(self) -> str:
        return f"<StepWriter task={self.task!r} step={self.t} params={len(self.touched)} {self._state}>"

    def add(self, name: str, grad_sq: Any, region: Any = None) -> None:
        """Add one parameter's squared gradient to this step.

        ``region`` (optional) feeds a slab of the parameter: a slice, or tuple of slices,
        aligned to the parameter's chunks along its split axis and covering the other
        axes, so a huge tensor can be streamed without ever being whole in RAM.
        """
        if self._state != "open":
            raise StepError(f"step {self.t} of task {self.task!r} is {self._state}; start a new step")
        store = self.store
        store._finalize_closing()
        p = store._param_for_add(self, name, grad_sq, region)
        if not p.owned:
            raise StepError(
                f"parameter {name!r} of task {self.task!r} is written by another rank of the group; "
                "add it on its owner (check store.owns(task, name))"
            )
        region = _check_region(p, region)
        x = as_grad_sq(grad_sq, name, _shape(region), store.nonfinite)
        if x is None:
            self.skipped[name] = self.skipped.get(name, 0) + 1
            return
        alpha = step_weight(p.decay, self.tokens)
        if p.resident:
            # Staged by reference and applied when the step is: a step that raises leaves
            # the accumulator untouched. The caller must not modify grad_sq until then.
            self.staged.setdefault(name, []).append((region, self._to_device_or_host(p, x), alpha))
        else:
            if x.device.type != "cpu":
                x = _to_pinned(x)
            self._stream(p, x, alpha, region)
        self.touched.add(name)

    def _to_device_or_host(self, p: _Param, x: torch.Tensor) -> torch.Tensor | tuple:
        """Resident gradients stay on their GPU within ``device_budget``, else go to pinned RAM."""
        if x.device.type == "cpu":
            return x
        store = self.store
        on_device = p.acc is not None and p.acc.device == x.device
        if not on_device and p.acc is None and store._device_bytes + 2 * p.nbytes <= store.device_budget:
            store._device_bytes += 2 * p.nbytes
            on_device = True
        return x if on_device else _to_pinned(x)

    def _stream(self, p: _Param, x: Any, alpha: float, region: Region) -> None:
        be = self.store._backend
        dst = self.streamed.get(p.name)
        ax = split_axis(p.shape, p.chunks)
        n_chunks = -(-p.shape[ax] // p.chunks[ax]) if p.shape else 1
        if dst is None:
            dst = p.next_gen()
            be.create_array(p.gen_key(dst), p.shape, p.chunks, self.store._array_attrs(p))
            self.streamed[p.name] = dst
            self.coverage[p.name] = np.zeros(n_chunks, dtype=bool)
        cov = self.coverage[p.name]
        c0, c1 = _chunk_range(region, p, ax)
        if cov[c0:c1].any():  # a second contribution to the same chunks: wait for the first
            wait_all(self._param_futures.get(p.name, []))
        src, src_t = p.latest()
        scale = decay_factor(p.decay, self.t - src_t)
        offset = region[ax].start if p.shape else 0
        for covered, a, b in _runs(cov, c0, c1):
            sub = _axis_region(p, ax, a * p.chunks[ax], min(b * p.chunks[ax], p.shape[ax])) if p.shape else ()
            for slab in iter_slabs(_shape(sub), p.chunks, self.store._slab_bytes()):
                absr = _shift(slab, sub)
                xs = x[_shift_back(absr, ax, offset)] if not isinstance(x, tuple) else (x, _shift_back(absr, ax, offset))
                if covered:
                    self._submit(p, dst, dst, absr, 1.0, xs, alpha)
                else:
                    self._submit(p, src, dst, absr, scale, xs, alpha)
        cov[c0:c1] = True

    def _submit(self, p: _Param, src: int | None, dst: int, region: Region, scale: float, xs: Any, alpha: float) -> None:
        fut = self.store._pool.submit(_nbytes(region), self._rmw, p, src, dst, region, scale, xs, alpha)
        self.futures.append(fut)
        self._param_futures.setdefault(p.name, []).append(fut)

    def _rmw(self, p: _Param, src: int | None, dst: int, region: Region, scale: float, xs: Any, alpha: float) -> None:
        """Worker: ``dst[region] = scale · src[region] + alpha · x`` (x may be None: decay only)."""
        store = self.store
        if src is None:
            F = torch.zeros(_shape(region), dtype=torch.float32)
        else:
            F = torch.from_numpy(store._read_array(self.task_state, p, src, region))
            if scale != 1.0:
                F.mul_(scale)
        if xs is not None:
            if isinstance(xs, tuple):  # (pinned copy with its event, index)
                xs = _wait_host(xs[0])[xs[1]]
            F.add_(xs, alpha=alpha)
        store._backend.write(p.gen_key(dst), region, F.numpy())

    def _fill_uncovered(self) -> None:
        """Chunks of a streamed parameter this step did not touch still decay into the new generation."""
        for name, cov in self.coverage.items():
            if cov.all():
                continue
            p = self.task_state.params[name]
            ax = split_axis(p.shape, p.chunks)
            src, src_t = p.latest()
            scale = decay_factor(p.decay, self.t - src_t)
            for covered, a, b in _runs(cov, 0, len(cov)):
                if covered:
                    continue
                sub = _axis_region(p, ax, a * p.chunks[ax], min(b * p.chunks[ax], p.shape[ax]))
                for slab in iter_slabs(_shape(sub), p.chunks, self.store._slab_bytes()):
                    self._submit(p, src, self.streamed[name], _shift(slab, sub), scale, None, 0.0)


def _nbytes(region: Region) -> int:
    return 4 * math.prod(_shape(region))


def _axis_region(p: _Param, ax: int, start: int, stop: int) -> Region:
    return tuple(slice(start, stop) if i == ax else slice(0, n) for i, n in enumerate(p.shape))


def _shift(slab: Region, base: Region) -> Region:
    return tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(slab, base))


def _shift_back(region: Region, ax: int, offset: int) -> Region:
    return tuple(slice(s.start - offset, s.stop - offset) if i == ax else s for i, s in enumerate(region))


def _chunk_range(region: Region, p: _Param, ax: int) -> tuple[int, int]:
    if not p.shape:
        return 0, 1
    s = region[ax]
    return s.start // p.chunks[ax], -(-s.stop // p.chunks[ax])


def _runs(cov: np.ndarray, a: int, b: int) -> list[tuple[bool, int, int]]:
    """Maximal runs ``(covered, start, stop)`` of equal coverage in ``cov[a:b]``."""
    runs = []
    i = a
    while i < b:
        j = i
        while j < b and cov[j] == cov[i]:
            j += 1
        runs.append((bool(cov[i]), i, j))
        i = j
    return runs


def _tiles_once(p: _Param, entries: list[tuple[Region, Any, float]]) -> bool:
    """Whether the regions of one step's contributions cover ``p`` exactly once."""
    if not p.shape:
        return len(entries) == 1
    ax = split_axis(p.shape, p.chunks)
    pos = 0
    for s in sorted(r[ax].start for r, _, _ in entries):
        if s != pos:
            return False
        pos = next(r[ax].stop for r, _, _ in entries if r[ax].start == s)
    return pos == p.shape[ax]


def _check_region(p: _Param, region: Any) -> Region:
    """Validate an ``add(region=...)``; return the full region tuple."""
    full = tuple(slice(0, n) for n in p.shape)
    if region is None:
        return full
    reg = region if isinstance(region, tuple) else (region,)
    reg = reg + (slice(None),) * (len(p.shape) - len(reg))
    if len(reg) != len(p.shape) or not all(isinstance(s, slice) and s.step in (None, 1) for s in reg):
        raise ShapeMismatchError(f"parameter {p.name!r}: region must be slices with step 1, got {region!r}")
    reg = tuple(slice(*s.indices(n)[:2]) for s, n in zip(reg, p.shape))
    ax = split_axis(p.shape, p.chunks)
    for i, (s, n) in enumerate(zip(reg, p.shape)):
        if i == ax:
            aligned = s.start % p.chunks[ax] == 0 and (s.stop % p.chunks[ax] == 0 or s.stop == n) and s.stop > s.start
            if not aligned:
                raise ShapeMismatchError(
                    f"parameter {p.name!r}: region {s.start}:{s.stop} on axis {ax} is not aligned to its chunks "
                    f"of {p.chunks[ax]}; feed whole chunks (or the whole tensor)"
                )
        elif (s.start, s.stop) != (0, n):
            raise ShapeMismatchError(
                f"parameter {p.name!r}: a region must span axis {i} whole (0:{n}); it splits only along axis {ax}"
            )
    return reg


def _to_pinned(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start a non-blocking copy of a GPU tensor into pinned host memory."""
    host = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(x, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(x.device))
    return host, ev


def _wait_host(x: Any) -> torch.Tensor:
    """The tensor of a pinned copy once its transfer is done (a tensor passes through)."""
    if isinstance(x, tuple):
        x[1].synchronize()
        return x[0]
    return x


class _NoBar:
    """The progress bar of a flush too small (or a run too quiet) to show one."""

    def update(self, n: int) -> None:
        return None


@contextlib.contextmanager
def _progress(total: int, progress: bool | None, desc: str) -> Iterator[Any]:
    """A tqdm bar for flushes longer than a second (off when not a TTY or progress=False)."""
    if progress is False or total <= 0:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc.strip(), delay=1.0,
              disable=None if progress is None else not progress, leave=False) as bar:
        yield bar


def _shape(region: Region) -> tuple[int, ...]:
    return tuple(len(range(s.start, s.stop, s.step or 1)) for s in region)


def _chunk_coords(region: Region, chunks: Sequence[int]) -> list[tuple[int, ...]]:
    ranges = []
    for s, c in zip(region, chunks):
        stop = max(s.start + 1, s.stop)
        ranges.append(range(s.start // c, (stop - 1) // c + 1))
    coords = [()]
    for r in ranges:
        coords = [co + (i,) for co in coords for i in r]
        if len(coords) > 16:
            break
    return coords[:16]

