"""The facade's per-sample verbs (Phase 6): write segments of per-sample gradients, read them lazily.

Each is a few lines over :mod:`fisherstore.engine.segments` (segments, lazy reads) and
:mod:`fisherstore.store.contribution` (the contribution Fisher).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..engine.segments import SampleBatch, check_dtype, new_segment, samples_of
from ..errors import StepError
from .base import StoreBase
from .contribution import ContributionSource
from .lazy import LazyFisher
from .lazy_samples import LazySamples


class SampleMethods(StoreBase):
    """``begin_samples``, ``samples``, ``sample_params``, ``sample_tokens``, ``sample_ids``, ``contribution_fisher``."""

    def begin_samples(self, task: str, names: Sequence[str], n: int, *, ids: Sequence[str] | None = None,
                      dtype: str | None = None) -> SampleBatch:
        """Start a segment of ``n`` samples' signed gradients of ``names``; use as a context manager.

        ``with store.begin_samples("math", names, n=8) as sb: sb.add(i, name, g_i); sb.set_tokens(i, T_i)``.
        Committed by the next flush. ``ids``: stable sample ids, unique in the task (default:
        running numbers). ``dtype``: None stores the gradients' own dtype; see
        :class:`~fisherstore.engine.segments.SampleBatch` for the rounded options.
        """
        self._check_writable("begin_samples")
        if self._active is not None:
            raise StepError(f"a step or sample segment of task {self._active.task!r} is still open; finish it first")
        with self._state_lock:
            t = self._cat().task(task)
            names, ids, segment = new_segment(self._catalog, task, names, n, ids, self._number_base)
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
        # a quarter of the budget per read, within [64 MiB, 1 GiB]: a RAM store's budget is the machine's RAM
        budget = min(max(self.plan.total // 4, 64 << 20), 1 << 30)
        source = ContributionSource(self.samples, self.param, self.revision, budget)
        return LazyFisher(source, task, name)
