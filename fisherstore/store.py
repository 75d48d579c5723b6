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

import math
import os
from collections.abc import Mapping, Sequence
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
    accumulate_,
    as_grad_sq,
    decay_factor,
    fold,
    readout_scale,
    step_weight,
    validate_decay,
)
from .errors import (
    CorruptChunkError,
    FisherStoreError,
    LayoutError,
    NotAFisherStoreError,
    ReadOnlyError,
    ShapeMismatchError,
    StepError,
    UnknownParamError,
    UnknownTaskError,
    close_matches,
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
from .layout import ParamLayout, chunk_shape, iter_slabs

if TYPE_CHECKING:
    from .lazy import LazyFisher

__all__ = ["FisherStore", "StepWriter"]

#: Default bound on what a disk-backed store holds in RAM (accumulators and staging).
DEFAULT_MEMORY_BUDGET = 1 << 30
#: Chunk-aligned slab size for streaming reads and writes (measurements.md §3a).
SLAB_BYTES = 16 << 20
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
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if flush_every is not None and (not isinstance(flush_every, int) or flush_every < 1):
            raise ValueError(f"flush_every must be a positive int or None, got {flush_every!r}")
        if memory_budget is None:
            memory_budget = 0 if not backend.persistent else DEFAULT_MEMORY_BUDGET
        if not isinstance(memory_budget, int) or memory_budget < 0:
            raise ValueError(f"memory_budget must be a non-negative number of bytes, got {memory_budget!r}")
        self._backend = backend
        self.mode = mode
        self.decay = validate_decay(decay)
        self.nonfinite = nonfinite
        self.memory_budget = memory_budget
        self.flush_every = flush_every
        self._closed = False
        self._active_step: StepWriter | None = None
        self._tasks: dict[str, _Task] = {}
        self._resident_bytes = 0
        self._steps_since_flush = 0
        self._open(codecs or CodecSpec())

    # -- opening ------------------------------------------------------------------------
    def _open(self, codecs: CodecSpec) -> None:
        be = self._backend
        where = be.root or "<ram>"
        if self.mode == "w" and be.exists():
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
        if self.writable:
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
        for pname, e in body.get("params", {}).items():
            p = _Param(
                name=pname,
                key=e["key"],
                shape=tuple(e["shape"]),
                chunks=tuple(e["chunks"]),
                layout=ParamLayout.from_dict(e["layout"]) if e.get("layout") else None,
                decay=e["decay"],
                gen=e.get("generation"),
                t_last=e.get("t_last", 0),
                nonfinite_skipped=e.get("nonfinite_skipped", 0),
                updates=e.get("updates", 0),
            )
            self._assign_residency(p)
            task.params[pname] = p
        return task

    def _remove_orphans(self) -> None:
        """Delete what a crashed writer left: uncommitted generations and unlisted nodes."""
        be = self._backend
        known_tasks = {t.key: t for t in self._tasks.values()}
        for tkey in be.list(""):
            task = known_tasks.get(tkey)
            if task is None:
                if self._is_ours(f"{tkey}/zarr.json", TASK_ATTR):
                    be.delete(tkey)
                continue
            known_params = {p.key.rsplit("/", 1)[-1]: p for p in task.params.values()}
            for pkey in be.list(tkey):
                p = known_params.get(pkey)
                if p is None:
                    if self._is_ours(f"{tkey}/{pkey}/zarr.json", PARAM_ATTR):
                        be.delete(f"{tkey}/{pkey}")
                    continue
                for child in be.list(p.key):
                    g = parse_gen(child)
                    if g is not None and g != p.gen:
                        be.delete(f"{p.key}/{child}")

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
        return self._task(task).step

    def layout(self, task: str, name: str) -> ParamLayout | None:
        """The head layout of a parameter (None for a plain tensor)."""
        return self._param(task, name).layout

    def metadata(self, task: str | None = None) -> dict[str, Any]:
        """Store metadata (``task=None``) or one task's: step, tokens, estimator, model, ..."""
        self._check_open()
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
        t = self._task(task)
        self._check_writable("set_metadata")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
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
        self._backend.write_json(f"{p.key}/zarr.json", group_doc(PARAM_ATTR, body))
        self._assign_residency(p)
        t.params[name] = p
        self._write_manifest(t)

    def _assign_residency(self, p: _Param) -> None:
        # The resident set is fixed at creation: the access pattern is cyclic (every
        # parameter every step), where LRU eviction would thrash (DESIGN §6b). A resident
        # parameter costs its accumulator plus one step's staging.
        cost = 2 * p.nbytes
        if self._resident_bytes + cost <= max(0, self.memory_budget - 2 * SLAB_BYTES):
            p.resident = True
            self._resident_bytes += cost

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
            raise ValueError(f"tokens must be a positive int (the token count T) or None, got {tokens!r}")
        t = self._task(task, create=layouts is not None)
        st = StepWriter(self, t, tokens, dict(layouts or {}))
        self._active_step = st
        return st

    def _commit_step(self, st: StepWriter) -> None:
        t = st.task_state
        for name, staged in st.staged.items():
            p = t.params[name]
            if p.acc is None:
                p.acc = torch.zeros(p.shape, dtype=torch.float32)
                p.a_last = None
            if p.a_last is None:
                p.acc.copy_(staged)
            else:
                accumulate_(p.acc, staged, p.decay, st.t - p.a_last)
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
        self._steps_since_flush += 1
        if self.flush_every is not None and self._steps_since_flush >= self.flush_every:
            self.flush()

    def _abort_step(self, st: StepWriter) -> None:
        for name, gen in st.streamed.items():
            self._backend.delete(st.task_state.params[name].gen_key(gen))

    # -- flushing -----------------------------------------------------------------------
    def flush(self) -> None:
        """Fold RAM accumulators into new generations, sync, and commit every dirty task."""
        self._check_open()
        if not self.writable:
            return
        if self._active_step is not None:
            raise StepError("flush() inside an open step; leave the step's `with` block first")
        for t in self._tasks.values():
            if t.step != t.committed_step or any(p.dirty for p in t.params.values()):
                self._flush_task(t)
        self._steps_since_flush = 0

    def _flush_task(self, t: _Task) -> None:
        written: list[tuple[_Param, int]] = []
        try:
            for p in t.params.values():
                if p.a_last is None:
                    continue
                new = p.next_gen()
                src, src_t = p.latest()
                self._backend.create_array(p.gen_key(new), p.shape, p.chunks, self._array_attrs(p))
                written.append((p, new))
                k = p.a_last - src_t
                for region in iter_slabs(p.shape, p.chunks, SLAB_BYTES):
                    if src is None:
                        out = p.acc[region].clone()
                    else:
                        out = fold(torch.from_numpy(self._read_array(t, p, src, region)), p.acc[region], p.decay, k)
                    self._backend.write(p.gen_key(new), region, out.numpy())
            self._backend.sync()
        except BaseException:
            for p, new in written:
                self._backend.delete(p.gen_key(new))
            raise
        # The data is durable; switch every parameter to its new generation at once.
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
            self._write_manifest(t)
        except BaseException:
            t.committed_step, t.committed_tokens, t.commit = prev
            for n, p in t.params.items():
                p.gen, p.t_last, p.work_gen, p.work_t = old[n]
                p.superseded = [g for g in p.superseded if g not in (p.gen, p.work_gen)]
            for p, new in written:
                self._backend.delete(p.gen_key(new))
            raise
        for p, _ in written:
            p.acc.zero_()
            p.a_last = None
        for p in t.params.values():
            for g in p.superseded:
                self._backend.delete(p.gen_key(g))
            p.superseded.clear()

    def _write_manifest(self, t: _Task) -> None:
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
            self._backend.close()

    # -- reading ------------------------------------------------------------------------
    def fisher(self, task: str, name: str, bias_corrected: bool = True) -> LazyFisher:
        """A lazy view of the Fisher EMA of ``name``: slicing reads only the chunks it touches."""
        from .lazy import LazyFisher

        self._param(task, name)
        return LazyFisher(self, task, name, bias_corrected=bias_corrected)

    def _read_region(self, task: str, name: str, region: Region, bias_corrected: bool) -> torch.Tensor:
        """The EMA value of ``region`` at the task's current step, as fp32."""
        t = self._task(task)
        p = self._param(task, name)
        src, src_t = p.latest()
        if src is None:
            out = torch.zeros(_shape(region), dtype=torch.float32)
        else:
            out = torch.from_numpy(self._read_array(t, p, src, region))
            out.mul_(readout_scale(p.decay, t.step, src_t, bias_corrected))
        if p.a_last is not None:
            out.add_(p.acc[region], alpha=readout_scale(p.decay, t.step, p.a_last, bias_corrected))
        return out

    def _read_array(self, t: _Task, p: _Param, gen: int, region: Region) -> np.ndarray:
        try:
            data = self._backend.read(p.gen_key(gen), region)
        except FisherStoreError:
            raise
        except Exception as e:  # the libraries raise assorted types for bad chunks
            coords = _chunk_coords(region, p.chunks)
            raise CorruptChunkError(
                f"cannot read task {t.name!r}, parameter {p.name!r}, chunk(s) {coords} "
                f"(generation {gen}): {type(e).__name__}: {e}. The chunk file is damaged or "
                "missing; run `fisherstore verify` to list every bad chunk."
            ) from e
        # torch.from_numpy needs a writeable, contiguous float32 buffer; copy only if not.
        return np.require(data, np.float32, ["C", "W"])

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

    def _param_for_add(self, st: StepWriter, name: str, x: Any) -> _Param:
        p = st.task_state.params.get(name)
        if p is None and name in st.layouts:
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
        self.t = task.step + 1
        self.staged: dict[str, torch.Tensor] = {}
        self.streamed: dict[str, int] = {}
        self.touched: set[str] = set()
        self.skipped: dict[str, int] = {}
        self._state = "open"

    def __enter__(self) -> StepWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._state != "open":
            return
        self.store._active_step = None
        if exc_type is None:
            self._state = "committed"
            self.store._commit_step(self)
        else:
            self._state = "aborted"
            self.store._abort_step(self)

    def __repr__(self) -> str:
        return f"<StepWriter task={self.task!r} step={self.t} params={len(self.touched)} {self._state}>"

    def add(self, name: str, grad_sq: Any) -> None:
        """Add one parameter's squared gradient to this step."""
        if self._state != "open":
            raise StepError(f"step {self.t} of task {self.task!r} is {self._state}; start a new step")
        store = self.store
        p = store._param_for_add(self, name, grad_sq)
        x = as_grad_sq(grad_sq, name, p.shape, store.nonfinite)
        if x is None:
            self.skipped[name] = self.skipped.get(name, 0) + 1
            return
        alpha = step_weight(p.decay, self.tokens)
        if p.resident:
            staged = self.staged.get(name)
            if staged is None:
                self.staged[name] = torch.mul(x, alpha)
            else:
                staged.add_(x, alpha=alpha)
        else:
            self._stream(p, x, alpha)
        self.touched.add(name)

    def _stream(self, p: _Param, x: torch.Tensor, alpha: float) -> None:
        be = self.store._backend
        t = self.task_state
        dst = self.streamed.get(p.name)
        if dst is None:
            dst = p.next_gen()
            be.create_array(p.gen_key(dst), p.shape, p.chunks, self.store._array_attrs(p))
            self.streamed[p.name] = dst
            src, src_t = p.latest()
            scale = decay_factor(p.decay, self.t - src_t)
        else:
            src, scale = dst, 1.0  # a second contribution to the same step
        for region in iter_slabs(p.shape, p.chunks, SLAB_BYTES):
            if src is None:
                F = torch.zeros(_shape(region))
            else:
                F = torch.from_numpy(self.store._read_array(t, p, src, region))
                F.mul_(scale)
            F.add_(x[region], alpha=alpha)
            be.write(p.gen_key(dst), region, F.numpy())


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

