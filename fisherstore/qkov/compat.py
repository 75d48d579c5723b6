"""TensorScope compatibility: upstream's Phase-6 accessors, served lazily from a store.

TensorScope's ``QKOVInterferenceMetric.compute_heatmap`` reads two things from its
collector:

* ``contribution_cache[task][f"{task}_{i}"][param]``: sample i's ``C_i = g_i² / T_i``;
* ``gradient_manager.get_task_samples(task)`` and ``get_sample_gradients(task, j)``:
  the sample indices of a task, and sample j's gradients ``{param: g_j / T_j}``.

Upstream keeps these in RAM (and the accessors do not exist there). The adapter reads
them from the store's per-sample arrays on access, one parameter of one sample at a time,
so a TensorScope loop runs unchanged on data collected by fisherstore::

    from fisherstore.compat import TensorScopeAdapter     # fisherstore.qkov.compat, by its short name
    ts = TensorScopeAdapter(store)
    C = ts.contribution_cache["math"]["math_0"]["model.layers.0.self_attn.q_proj.weight"]
    g = ts.gradient_manager.get_sample_gradients("code", 3)["model.layers.0.self_attn.q_proj.weight"]

It is the migration path, not the fast path: the out-of-core heat map
(``QKOVInterference.heatmap_from_store``) reads each block once for all pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import UnknownParamError, UnknownTaskError, close_matches
from ..spec.samples import contributions, signed

__all__ = ["TensorScopeAdapter"]


class _SampleParams(Mapping[str, torch.Tensor]):
    """``{param: tensor}`` of one sample, read on access (``kind``: contributions or signed gradients)."""

    def __init__(self, store: Any, task: str, index: int, kind: str) -> None:
        self._store, self._task, self._i, self._kind = store, task, index, kind

    def _params(self) -> list[str]:
        return self._store.sample_params(self._task)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._params():
            raise UnknownParamError(f"task {self._task!r} has no per-sample gradients of {name!r}."
                                    + close_matches(name, self._params()))
        S = self._store.samples(self._task, name)
        derive = contributions if self._kind == "contribution" else signed
        return derive(S.read([self._i]), S.tokens[[self._i]], reuse=True)[0]  # one sample, read just now

    def __iter__(self) -> Iterator[str]:
        return iter(self._params())

    def __len__(self) -> int:
        return len(self._params())


class _TaskContributions(Mapping[str, Mapping[str, torch.Tensor]]):
    """``{f"{task}_{i}": {param: C_i}}`` for one task."""

    def __init__(self, store: Any, task: str) -> None:
        self._store, self._task = store, task

    def _n(self) -> int:
        return len(self._store.sample_ids(self._task))

    def __getitem__(self, key: str) -> Mapping[str, torch.Tensor]:
        prefix = f"{self._task}_"
        if not (isinstance(key, str) and key.startswith(prefix) and key[len(prefix):].isdigit()):
            raise KeyError(f"{key!r} is not a sample key of task {self._task!r} (keys are '{prefix}<i>')")
        i = int(key[len(prefix):])
        if i >= self._n():
            raise KeyError(f"task {self._task!r} has {self._n()} samples; {key!r} is not one")
        return _SampleParams(self._store, self._task, i, "contribution")

    def __iter__(self) -> Iterator[str]:
        return (f"{self._task}_{i}" for i in range(self._n()))

    def __len__(self) -> int:
        return self._n()


class _ContributionCache(Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]]):
    def __init__(self, store: Any) -> None:
        self._store = store

    def __getitem__(self, task: str) -> Mapping[str, Mapping[str, torch.Tensor]]:
        if task not in self._store.tasks():
            raise UnknownTaskError(f"unknown task {task!r}." + close_matches(str(task), self._store.tasks()))
        return _TaskContributions(self._store, task)

    def __iter__(self) -> Iterator[str]:
        return iter([t for t in self._store.tasks() if self._store.sample_ids(t)])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _GradientManager:
    """Upstream's ``gradient_manager``: the two accessors Phase 6 calls."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def get_task_samples(self, task: str) -> list[int]:
        """The sample indices of ``task``, in order (``store.sample_ids(task)`` has their stable ids)."""
        return list(range(len(self._store.sample_ids(task))))

    def get_sample_gradients(self, task: str, j: int) -> Mapping[str, torch.Tensor]:
        """Sample ``j``'s gradients ``{param: g_j / T_j}`` (fp32), read per parameter on access."""
        if not 0 <= j < len(self._store.sample_ids(task)):
            raise IndexError(f"task {task!r} has {len(self._store.sample_ids(task))} samples; {j} is not one")
        return _SampleParams(self._store, task, j, "signed")


class TensorScopeAdapter:
    """Upstream TensorScope's ``contribution_cache`` and ``gradient_manager``, over a store."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.contribution_cache = _ContributionCache(store)
        self.gradient_manager = _GradientManager(store)

    def __repr__(self) -> str:
        return f"TensorScopeAdapter({self.store!r})"
