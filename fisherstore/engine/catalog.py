"""Tasks and parameters in RAM: what each one's state is, committed and not yet committed.

A :class:`ParamState` holds a parameter's committed generation (what its manifest entry
says) plus the work since the last commit: an uncommitted streamed generation, or a
resident accumulator. A :class:`TaskState` holds its parameters, its step and token
count, and its last commit. The :class:`Catalog` maps names to them; its lookups never
change anything, and raise a named error with close matches for an unknown name.

What changes these states, and where (each under the store's state lock):

* a step when it is applied: :meth:`fisherstore.engine.step.StepWriter.settle`;
* a commit when it has landed: :func:`fisherstore.engine.commit.apply_commit`;
* a multi-pass run's rewinds and rollback: :class:`fisherstore.engine.replay.Replay`;
* the facade's ``create`` and ``set_metadata`` (RAM only, committed by the next flush);
* a reader reloading a task a writer committed since (the facade's ``_reload``).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import (
    InvalidArgumentError,
    LayoutError,
    ShapeMismatchError,
    UnknownParamError,
    UnknownTaskError,
    close_matches,
    listing,
)
from ..spec.format import doc_key, encode_name, generation_key, sample_key
from ..spec.layout import ParamLayout, chunk_shape
from ..spec.manifest import ParamEntry, SampleSegment, TaskManifest

__all__ = ["ParamInfo", "ParamState", "TaskState", "Catalog", "unknown_param", "load_task", "read_task", "committed_keys"]


@dataclass(frozen=True)
class ParamInfo:
    """A tracked parameter as a reader sees it: ``store.param(task, name)``."""

    task: str
    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    layout: ParamLayout | None
    decay: float
    resident: bool
    owned: bool


@dataclass
class ParamState:
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
    a_last: int | None = None  # None: the accumulator holds nothing
    spare: torch.Tensor | None = None  # the accumulator's twin: a step fills it, then the two swap
    resident: bool = False
    # Its residency reserves one buffer for a step's held input besides the accumulator, until a
    # step holds a donated whole square instead (engine/memory.py, Residency)
    held_copy: bool = True
    owned: bool = True  # False: another rank of the group writes it
    nonfinite_skipped: int = 0
    updates: int = 0
    on_disk: bool = True  # False: created since the last commit, its node not yet written
    gen_base: int = 0  # where this store's numbering starts (format.number_base): stores never share keys

    @classmethod
    def from_entry(cls, name: str, e: ParamEntry) -> ParamState:
        return cls(name=name, key=e.key, shape=e.shape, chunks=e.chunks, layout=e.layout, decay=e.decay,
                   gen=e.generation, t_last=e.t_last, nonfinite_skipped=e.nonfinite_skipped, updates=e.updates)

    def entry(self) -> ParamEntry:
        """The committed state, as a manifest entry."""
        return ParamEntry(key=self.key, shape=self.shape, chunks=self.chunks, layout=self.layout, decay=self.decay,
                          generation=self.gen, t_last=self.t_last, nonfinite_skipped=self.nonfinite_skipped,
                          updates=self.updates)

    def info(self, task: str) -> ParamInfo:
        return ParamInfo(task, self.name, self.shape, self.chunks, self.layout, self.decay, self.resident, self.owned)

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)

    def gen_key(self, gen: int) -> str:
        return generation_key(self.key, gen)

    def latest(self) -> tuple[int | None, int]:
        """The newest generation holding data (committed or working) and its step."""
        if self.work_gen is not None:
            return self.work_gen, self.work_t
        return self.gen, self.t_last

    def next_gen(self) -> int:
        """A generation number no existing generation of this parameter has (numbering starts past ``gen_base``)."""
        return max((g for g in (self.gen, self.work_gen) if g is not None), default=self.gen_base) + 1

    @property
    def dirty(self) -> bool:
        """Whether it has state the last commit does not hold."""
        return self.a_last is not None or self.work_gen is not None

    @property
    def state_step(self) -> int:
        """The step its newest state (accumulator or generation) is current at."""
        return self.latest()[1] if self.a_last is None else self.a_last


@dataclass
class TaskState:
    """In-RAM state of one task."""

    name: str
    key: str
    step: int = 0  # in-RAM step (includes uncommitted steps)
    tokens_seen: int = 0
    committed_step: int = 0
    committed_tokens: int = 0
    commit: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # estimator, model, user
    params: dict[str, ParamState] = field(default_factory=dict)
    listed: bool = True  # False: created since the last commit, not yet in the root document
    changed: bool = False  # parameters or info the last commit does not hold
    samples: list[SampleSegment] = field(default_factory=list)  # committed per-sample segments
    new_samples: list[SampleSegment] = field(default_factory=list)  # written, not yet committed

    @classmethod
    def from_manifest(cls, m: TaskManifest, key: str) -> TaskState:
        return cls(name=m.name, key=key, step=m.step, tokens_seen=m.tokens_seen, committed_step=m.step,
                   committed_tokens=m.tokens_seen, commit=m.commit, info=copy.deepcopy(m.info),
                   params={n: ParamState.from_entry(n, e) for n, e in m.params.items()}, samples=list(m.samples))

    def manifest(self) -> TaskManifest:
        """The committed state, as the manifest that records it."""
        return TaskManifest(name=self.name, step=self.committed_step, tokens_seen=self.committed_tokens,
                            commit=self.commit, info=dict(self.info),
                            params={n: p.entry() for n, p in self.params.items()}, samples=tuple(self.samples))

    @property
    def dirty(self) -> bool:
        """Whether it has steps, state, parameters or info the last commit does not hold."""
        return (self.changed or not self.listed or self.step != self.committed_step or bool(self.new_samples)
                or any(p.dirty for p in self.params.values()))

    def new_param(self, name: str, shape: Sequence[int], layout: ParamLayout | None, decay: float,
                  chunks: Sequence[int] | None = None) -> ParamState | None:
        """A new parameter's state (not yet added), or None if it exists already with this shape and layout.

        Raises :class:`ShapeMismatchError` or :class:`LayoutError` for a shape, layout or
        chunking that does not fit, or that differs from the existing parameter's.
        """
        seg = encode_name(name, "parameter name")
        shape = _dims(shape, name, "shape")
        if any(s < 0 for s in shape):
            raise ShapeMismatchError(f"parameter {name!r}: shape {shape} has a negative dimension")
        if layout is not None:
            if not isinstance(layout, ParamLayout):
                raise LayoutError(f"parameter {name!r}: layout must be a ParamLayout, got {type(layout).__name__}")
            layout.validate_shape(shape, name)
        old = self.params.get(name)
        if old is not None:
            if old.shape != shape or old.layout != layout:
                raise ShapeMismatchError(
                    f"parameter {name!r} of task {self.name!r} already exists with shape {old.shape} and "
                    f"layout {old.layout}; cannot recreate it as {shape} / {layout}"
                )
            return None
        ch = _dims(chunks, name, "chunks") if chunks is not None else chunk_shape(shape, layout)
        if len(ch) != len(shape) or any(c < 1 for c in ch):
            raise ShapeMismatchError(f"parameter {name!r}: chunks {ch} do not fit shape {shape}")
        return ParamState(name=name, key=f"{self.key}/{seg}", shape=shape, chunks=ch, layout=layout, decay=decay,
                          on_disk=False)

    def metadata(self) -> dict[str, Any]:
        """Step, tokens, estimator, model, user fields and every parameter's state, as a dict."""
        return {
            "task": self.name,
            "step": self.step,
            "committed_step": self.committed_step,
            "commit": self.commit,
            "tokens_seen": self.tokens_seen,
            "estimator": self.info.get("estimator"),
            # Absent means empirical: every task collected before the true Fisher existed was.
            "fisher_type": self.info.get("fisher_type", "empirical" if self.info.get("estimator") in (
                "micro_batch", "batch") else None),
            "mc_samples": self.info.get("mc_samples"),
            "model": self.info.get("model"),
            "user": self.info.get("user", {}),
            "params": {
                n: {"shape": p.shape, "chunks": p.chunks, "layout": p.layout, "decay": p.decay,
                    "t_last": p.state_step, "updates": p.updates, "nonfinite_skipped": p.nonfinite_skipped,
                    "resident": p.resident}
                for n, p in self.params.items()
            },
        }


class Catalog:
    """The tasks of a store by name, with lookups that raise named errors."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskState] = {}

    def __iter__(self) -> Iterator[TaskState]:
        return iter(self._tasks.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        return list(self._tasks)

    def keys(self) -> dict[str, str]:
        """Task name -> node key, as the store document lists them."""
        return {t.name: t.key for t in self._tasks.values()}

    def get(self, name: str) -> TaskState | None:
        return self._tasks.get(name)

    def add(self, t: TaskState) -> None:
        self._tasks[t.name] = t

    def remove(self, name: str) -> None:
        """Forget a task that was never committed (an import that failed); a committed one is refused."""
        t = self.task(name)
        if t.listed or t.commit:
            raise ValueError(f"task {name!r} is committed; only a task created since the last commit is forgotten")
        del self._tasks[name]

    def task(self, name: str) -> TaskState:
        t = self._tasks.get(name)
        if t is None:
            raise UnknownTaskError(
                f"unknown task {name!r}; the store has tasks {listing(self._tasks)}." + close_matches(str(name), self._tasks)
            )
        return t

    def param(self, task: str, name: str) -> ParamState:
        t = self.task(task)
        p = t.params.get(name)
        if p is None:
            raise unknown_param(t, name)
        return p


def _dims(dims: Any, name: str, what: str) -> tuple[int, ...]:
    """A shape as ints; floats, strings and bools are refused, never truncated."""
    try:
        items = list(dims)
        if any(isinstance(d, (bool, np.bool_)) for d in items):
            raise TypeError
        return tuple(operator.index(d) for d in items)
    except TypeError:
        raise InvalidArgumentError(f"parameter {name!r}: {what} must be a sequence of ints, got {dims!r}") from None


def unknown_param(t: TaskState, name: str) -> UnknownParamError:
    """The error for a parameter ``t`` does not track, with close matches and the fix."""
    return UnknownParamError(
        f"unknown parameter {name!r} in task {t.name!r} ({len(t.params)} tracked)."
        + close_matches(str(name), t.params)
        + " Create it with store.create(task, name, shape, layout) or pass layouts= to update()."
    )


def load_task(read_json: Callable[[str], dict[str, Any] | None], name: str, key: str) -> TaskState:
    """A task's state as its committed manifest (read with ``read_json``) records it."""
    return TaskState.from_manifest(TaskManifest.from_doc(read_json(doc_key(key)), name, key), key)


def read_task(backend: Any, name: str, key: str) -> TaskState:
    """:func:`load_task` from ``backend``, whose :meth:`~fisherstore.backends.ArrayBackend.read_parsed`
    parses a manifest once per process for the same bytes (opening a store again, a reload that
    finds no new commit). The state is built afresh: the parsed manifest is never mutated."""
    m = backend.read_parsed(doc_key(key), lambda doc: TaskManifest.from_doc(doc, name, key), ("task", name, key))
    return TaskState.from_manifest(m, key)


def committed_keys(t: TaskState, name: str | None = None, kind: str = "all") -> list[str]:
    """The arrays ``t``'s last commit names: live generations (``kind="fisher"``), committed sample
    segments (``"samples"``), or both; of one parameter, or all."""
    keys = [] if kind == "samples" else [
        p.gen_key(p.gen) for n, p in t.params.items() if p.gen is not None and name in (None, n)]
    if kind != "fisher":
        keys += [sample_key(t.params[n].key, seg.id) for seg in t.samples for n in seg.params if name in (None, n)]
    return keys
