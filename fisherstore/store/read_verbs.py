"""The facade's reading verbs: lazy views, region reads, the head sweep, and the notebook views.

Each is a few lines over :mod:`fisherstore.engine.read` (reads at the current commit),
:mod:`fisherstore.store.lazy` (the tensor-like view) and :mod:`fisherstore.views` /
:mod:`fisherstore.views.summary` (Dask, xarray, pandas; imported on first use).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..spec.regions import Region, check_region, full_region
from .base import StoreBase
from .lazy import LazyFisher


class ReadMethods(StoreBase):
    """``fisher``, ``read``, ``iter_heads``, ``to_dask``, ``to_xarray``, ``summary``."""

    def fisher(self, task: str, name: str, bias_corrected: bool = True) -> LazyFisher:
        """A lazy view of the Fisher EMA of ``name``: slicing reads only the chunks it touches."""
        self._cat().param(task, name)
        return LazyFisher(self, task, name, bias_corrected=bias_corrected)

    def read(self, task: str, name: str, region: Region | None = None, *, bias_corrected: bool = True) -> torch.Tensor:
        """The Fisher of ``region`` (a tuple of in-bounds slices; None: all) as an fp32 tensor."""
        shape = self._cat().param(task, name).shape
        region = full_region(shape) if region is None else check_region(region, shape)
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
        snap = self if self.frozen else self.snapshot([task])  # a reader's sweep reads one commit
        if snap is not self:
            return _closing(snap, snap.iter_heads(task, names, block, workers, bias_corrected=bias_corrected))
        return self._read.iter_heads(task, names, block, workers, bias_corrected, self.options.progress)

    def to_dask(self, task: str, name: str, *, bias_corrected: bool = True) -> Any:
        """``name``'s Fisher as a lazy Dask array, one Dask chunk per store chunk (needs the ``views`` extra).

        Usage: ``store.to_dask("math", q_name).sum(axis=1).compute()``. See :mod:`fisherstore.views`.
        """
        from ..views.arrays import to_dask

        self._cat().param(task, name)
        return to_dask(self, task, name, bias_corrected=bias_corrected)

    def to_xarray(self, task: str, names: Sequence[str] | None = None, *, bias_corrected: bool = True) -> Any:
        """The task as an ``xr.DataTree`` of lazy, bias-corrected arrays with layer/head/block coordinates.

        Usage: ``store.to_xarray("math")[q_name]["fisher"].sum("in").groupby("head").sum()``.
        See :func:`fisherstore.views.to_xarray`.
        """
        from ..views.arrays import to_xarray

        self._cat().task(task)
        return to_xarray(self, task, names, bias_corrected=bias_corrected)

    def summary(self, task: str, names: Sequence[str] | None = None, *, bias_corrected: bool = True,
                progress: bool | None = None) -> Any:
        """Fisher mass per (param, layer, head, block) as a ``pandas.DataFrame`` (needs the ``views`` extra).

        Usage: ``store.summary("math").pivot_table("mass", "layer", "head")``. See :mod:`fisherstore.views.summary`.
        """
        from ..views.summary import summary

        self._cat().task(task)
        return summary(self, task, names, bias_corrected=bias_corrected, progress=progress)


def _closing(snap: Any, heads: Iterator[Any]) -> Iterator[Any]:
    """Yield from ``heads``, then release ``snap``'s pin (also when the caller stops early)."""
    try:
        yield from heads
    finally:
        snap.close()
