"""The contribution-based Fisher of a task (the seed's Option 1), read lazily from its per-sample gradients.

``Î = mean_i g_i² / T_i``, never stored: each read streams the task's samples over just the
region it asks for. :meth:`FisherStore.contribution_fisher` wraps it in a
:class:`~fisherstore.store.lazy.LazyFisher`, so it slices and head-indexes like the EMA Fisher.

Usage::

    F = store.contribution_fisher("math", "model.layers.0.self_attn.q_proj.weight")
    F.head(3, "Q")                 # [d, in]: streams every sample's chunk of head 3
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..spec.regions import Region, bounded, full_region, region_nbytes, region_shape
from ..spec.samples import contributions
from .lazy_samples import LazySamples

__all__ = ["ContributionSource"]


class ContributionSource:
    """The contribution-based Fisher of a task (the seed's Option 1): ``Î = mean_i C_i``, read lazily.

    A :class:`~fisherstore.store.lazy.FisherSource`, so ``LazyFisher(ContributionSource(...), task, name)``
    slices and head-indexes it like the EMA Fisher. A read streams the task's samples over
    the requested region in batches that fit ``memory_budget``, summing in fp64: out of core.
    """

    backend_name = "contribution"

    def __init__(self, samples: Callable[[str, str], LazySamples], info: Callable[[str, str], Any],
                 revision: Callable[[str], Hashable], memory_budget: int) -> None:
        self._samples, self._info, self._revision = samples, info, revision
        self.memory_budget = max(1, memory_budget)

    def param(self, task: str, name: str) -> Any:
        return self._info(task, name)

    def step(self, task: str) -> int:
        return 0

    def revision(self, task: str) -> Hashable:
        return ("contribution", self._revision(task))

    def read(self, task: str, name: str, region: Region | None = None, *, bias_corrected: bool = True) -> torch.Tensor:
        S = self._samples(task, name)
        region = full_region(S.shape[1:]) if region is None else region
        n = len(S)
        if n == 0:
            raise InvalidArgumentError(f"task {task!r} has no per-sample gradients of {name!r}; collect some "
                                       "(FisherCollector.collect_samples) before asking for its contribution Fisher")
        per = max(1, self.memory_budget // max(1, 3 * region_nbytes(region)))
        total = torch.zeros(region_shape(region), dtype=torch.float64)
        tokens = S.tokens
        for a in range(0, n, per):
            chunk = slice(a, min(a + per, n))
            total += contributions(S.read(chunk, region), tokens[chunk], torch.float64, reuse=True).sum(0)
        return (total / n).to(torch.float32)

    def iter_heads(self, task: str, names: Sequence[str] | None = None, block: str | None = None,
                   workers: int = 4, *, bias_corrected: bool = True) -> Iterator[tuple[str, int, str, torch.Tensor]]:
        for name in names or []:
            info = self._info(task, name)
            for h, b in info.layout.head_blocks(block or None):
                yield name, h, b, self.read(task, name, bounded(info.layout.head_index(h, b, len(info.shape)), info.shape))
