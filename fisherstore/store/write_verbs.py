"""The facade's writing verbs: creation, metadata, EMA steps, flushes and multi-pass replays.

Each is a few lines over :mod:`fisherstore.engine.step` (one step), :mod:`fisherstore.engine.commit`
(the flush transaction) and :mod:`fisherstore.engine.replay` (a multi-pass run's hold on a task).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..engine.catalog import ParamState, TaskState
from ..engine.replay import Replay
from ..engine.step.writer import StepWriter
from ..errors import (
    FisherStoreError,
    FlushError,
    InvalidArgumentError,
    NonFiniteGradientError,
    ShapeMismatchError,
    StepError,
    StorageError,
    UnknownParamError,
)
from ..spec.ema import validate_decay
from ..spec.format import encode_name, json_value
from ..spec.layout import ParamLayout
from ..spec.manifest import ESTIMATORS, FISHER_TYPES
from .base import StoreBase


class WriteMethods(StoreBase):
    """``create``, ``set_metadata``, ``update``, ``begin_step``, ``flush``, ``replay``."""

    def set_metadata(
        self, task: str, *, estimator: str | None = None, model: Mapping[str, Any] | None = None,
        fisher_type: str | None = None, mc_samples: int | None = None, **user: Any
    ) -> None:
        """Record the estimator, a model description and free-form fields for ``task`` (committed by the next flush).

        ``fisher_type`` (``"empirical"``, ``"mc"``, ``"exact"``) and ``mc_samples`` say whose
        labels the squares are of; :class:`~fisherstore.FisherCollector` records them.
        Values must be JSON: numbers (numpy scalars are converted), strings, bools, None,
        lists and dicts. Anything else is refused here, and nothing of the call is kept.
        Usage: ``store.set_metadata("math", estimator="micro_batch", lr=3e-4)``.
        """
        self._check_writable("set_metadata")
        t = self._cat().task(task)
        if estimator not in (*ESTIMATORS, None):
            raise InvalidArgumentError(f"estimator must be one of {ESTIMATORS} (or None: unchanged), got {estimator!r}")
        if fisher_type not in (*FISHER_TYPES, None):
            raise InvalidArgumentError(f"fisher_type must be one of {FISHER_TYPES} (or None: unchanged), got {fisher_type!r}")
        if mc_samples is not None and (isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1):
            raise InvalidArgumentError(f"mc_samples must be a positive int (or None: unchanged), got {mc_samples!r}")
        model = json_value(dict(model), "model") if model is not None else None
        user = json_value(user, "set_metadata()") if user else {}
        with self._state_lock:
            if estimator is not None:
                t.info["estimator"] = estimator
            if fisher_type is not None:
                t.info["fisher_type"] = fisher_type
            if mc_samples is not None:
                t.info["mc_samples"] = mc_samples
            if model is not None:
                t.info["model"] = model
            if user:
                t.info.setdefault("user", {}).update(user)
            t.changed = True

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

    def write_state(self, task: str, states: Mapping[str, Any] | Iterable[tuple[str, Any]], step: int, *,
                    tokens: int = 0) -> list[str]:
        """Write ``task``'s raw EMA state ``F`` as it stands at ``step``, one parameter at a time: an import.

        For state computed elsewhere with the same recurrence, ``F_t = β·F_{t-1} + (1-β)·x_t``:
        Adam's ``exp_avg_sq`` with β = β2 (:func:`fisherstore.import_adam`), or weights kept as
        they are (:meth:`~fisherstore.FisherStore.save_anchor`). The readout is then exactly
        ``F / (1 - β^step)`` (``bias_corrected=False``: ``F`` itself). Each parameter must be
        created first (:meth:`create`, with its β) and hold nothing: the task must be new (step
        0, nothing flushed). ``states`` may be a generator, so only one parameter's tensor
        need be in RAM: each is written to an uncommitted generation as it comes, and the
        next flush commits the task at ``step`` with ``tokens`` seen.

        All or nothing: on any error (a refused value, a failing disk, Ctrl-C) what the call
        wrote is deleted, and a task created since the last commit is forgotten whole (its
        parameters and metadata), so no flush can commit half an import; a committed task is
        left as it was. Returns the names written, in order.
        Usage: ``store.create("adam", n, shape, decay=0.999); store.write_state("adam", {n: v}, step=1000)``.
        """
        self._check_writable("write_state")
        t = self._cat().task(task)
        # A task that holds nothing yet (created for this import) is forgotten whole if the import fails.
        fresh = not t.listed and not t.commit and t.step == 0 and not any(p.dirty for p in t.params.values())
        written: dict[str, int] = {}
        touched: list[str] = []
        name = None
        try:
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                raise InvalidArgumentError(f"step must be a positive int (the step the state is current at), got {step!r}")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise InvalidArgumentError(f"tokens must be an int >= 0, got {tokens!r}")
            if self.group.world_size > 1:
                raise InvalidArgumentError(
                    "an import (write_state, import_adam, save_anchor) runs in one process: open the store without "
                    "a group to import a state")
            if self._active is not None:
                raise StepError(f"write_state inside an open step of task {self._active.task!r}; leave the step first")
            if t.step != 0 or t.tokens_seen != 0:
                raise StepError(
                    f"task {task!r} is at step {t.step} with {t.tokens_seen} tokens seen; write_state imports a whole "
                    "state into a new task. Write it under a new task name, or open the store with mode='w'"
                )
            for name, value in (states.items() if isinstance(states, Mapping) else states):
                p = t.params.get(name)
                if p is None:
                    raise UnknownParamError(
                        f"task {task!r} has no parameter {name!r}; create it first: store.create({task!r}, {name!r}, "
                        "shape, layout, decay=β)")
                if name in written or p.latest()[0] is not None or p.a_last is not None:
                    raise StepError(f"parameter {name!r} of task {task!r} already holds a state; write_state writes "
                                    "each parameter of a new task once")
                x = torch.as_tensor(value).detach()
                if tuple(x.shape) != p.shape:
                    raise ShapeMismatchError(
                        f"the state of {name!r} has shape {tuple(x.shape)}, but the parameter was created with "
                        f"{p.shape}")
                x = x.to("cpu", torch.float32).contiguous()  # no copy if it is one: the fold only reads it
                if not bool(torch.isfinite(x).all()):
                    raise NonFiniteGradientError(
                        f"the state of {name!r} holds NaN or Inf; nothing of task {task!r} was written. Check the "
                        "source (an optimizer state after an overflow?)")
                with self._state_lock:
                    p.acc, p.a_last = x, step
                    touched.append(name)  # reset on failure even if its own fold is what fails
                written.update(self._write.fold_to_work(t, [name], free=True))
        except BaseException as e:
            self._undo_import(t, written, touched, forget=fresh)
            if isinstance(e, OSError) and not isinstance(e, FisherStoreError):
                raise StorageError(
                    e.errno, f"writing the state of {name!r} into task {task!r} failed: {e.strerror or e}. Nothing of "
                    "the call was kept" + ("" if task in self._cat() else f" (the new task {task!r} is forgotten)")
                    + "; fix the device and import again") from e
            raise
        with self._state_lock:
            for name in written:
                t.params[name].updates = step
            t.step, t.tokens_seen, t.changed = step, tokens, True
        return list(written)

    def _undo_import(self, t: TaskState, written: dict[str, int], touched: list[str], forget: bool) -> None:
        """Delete what a failed write_state wrote; ``forget`` its task (new, holding nothing before the call)."""
        with self._state_lock:
            self._write.discard(t, written)
            for name in touched:
                p = t.params[name]
                p.work_gen, p.work_t, p.a_last, p.acc = None, 0, None, None
            if forget and t.name in self._cat():
                self._cat().remove(t.name)

    def replay(self, task: str, names: Sequence[str], *, in_place: bool = True) -> Replay:
        """A multi-pass run's hold on ``task`` (:mod:`fisherstore.engine.replay`): rewind it per pass, write each
        group once, commit with one flush; ``abort()`` puts it back at its last commit.

        Usage: see :meth:`FisherCollector.collect_fisher_dataset`, its one user.
        """
        self._check_writable("replay")
        with self._state_lock:
            return Replay(self._write, self._cat().task(task), list(names), in_place=in_place)
