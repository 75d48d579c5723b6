"""Array views of a store for the PyData stack: Dask arrays and xarray trees, lazy and bias-corrected.

Every view reads through the store (:meth:`FisherStore.read`), so it shows what
``store.fisher(task, name)`` shows: the bias-corrected EMA at the task's current step,
including steps not yet flushed, with every chunk's checksum checked. A view of a
read-only store is built on a pinned :meth:`~fisherstore.store.FisherStore.snapshot`:
it computes at the commit it was built at (``attrs["commit"]``, ``attrs["step"]``), however
many commits a writer makes before ``compute()``. A Dask chunk is
one store chunk, so a head block is one task and one chunk-file read.

Usage::

    x = store.to_dask("math", "model.layers.3.self_attn.q_proj.weight")   # dask.array, chunks = head blocks
    tree = store.to_xarray("math")                                        # xr.DataTree, one node per parameter
    q = tree["model.layers.3.self_attn.q_proj.weight"]["fisher"]          # dims (out_heads, in)
    q.sum("in").groupby("head").sum().compute()                           # Fisher mass per head
    block_sums(store, "math", q_name).compute()                           # each head block's Fisher sum

xarray, Dask and pandas are the ``views`` extra: ``pip install 'fisherstore[views]'``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import require
from ..spec.format import encode_name
from ..spec.layers import layer_keys
from ..spec.layout import dimension_names, head_labels
from ..store.lazy import LazyArray

__all__ = ["to_dask", "to_xarray", "block_sums"]


def to_dask(store: Any, task: str, name: str, *, bias_corrected: bool = True) -> Any:
    """``name``'s Fisher as a lazy ``dask.array.Array`` whose chunks are the store's chunks.

    Usage: ``store.to_dask("math", q_name).sum(axis=1).compute()``.
    """
    da = require("dask.array", "to_dask()")
    # The graph computes at one commit however late it runs: it holds a pinned snapshot (FisherStore.snapshot).
    store = store.snapshot([task])
    arr = LazyArray(store.fisher(task, name, bias_corrected=bias_corrected))
    # meta: the chunks are numpy; without it Dask would slice the view once to find out.
    return da.from_array(arr, chunks=arr.chunks, asarray=True, lock=False,
                         meta=np.empty((0,) * arr.ndim, dtype=arr.dtype))


def block_sums(store: Any, task: str, name: str, *, bias_corrected: bool = True) -> Any:
    """A lazy Dask array of each chunk's Fisher sum (float64), shaped like the chunk grid.

    A head-chunked parameter's chunk is a head block, so this is the per-head mass:
    ``[H, 1]`` for Q rows, ``[1, H]`` for O columns. MLA's ``kv_b_proj`` is the exception:
    its K and V heads differ in size, so its chunks are their gcd and a head block spans
    several (group by the ``head``/``block`` coordinates of :func:`to_xarray` there).
    Usage: ``block_sums(s, "math", q).compute()``.
    """
    x = to_dask(store, task, name, bias_corrected=bias_corrected)
    ones = tuple((1,) * len(c) for c in x.chunks)
    return x.map_blocks(_chunk_sum, chunks=ones, dtype=np.float64, meta=np.empty((0,) * x.ndim, np.float64))


def _chunk_sum(block: np.ndarray) -> np.ndarray:
    return np.full((1,) * block.ndim, block.sum(dtype=np.float64))


def to_xarray(store: Any, task: str, names: Sequence[str] | None = None, *, bias_corrected: bool = True) -> Any:
    """The task's Fisher as an ``xr.DataTree``: one child per parameter, holding a variable ``fisher``.

    Each ``fisher`` is a lazy Dask array whose dims are the array's ``dimension_names``
    (``("out_heads", "in")``, ``("out", "in_heads")``, ``("dim_0", ...)``; docs/format.md).
    Coordinates where a layout exists: ``head`` and ``block`` along the head axis (the
    head's index within its block: query head for Q and O, key/value head for K and V)
    and a scalar ``layer`` (an int, or ``"decoder.3"``-style keys for several stacks).
    Child names are the parameter names (``/`` percent-encoded); the attribute ``name``
    holds the real one. Usage: ``store.to_xarray("math")[q_name]["fisher"]``.
    """
    xr = require("xarray", "to_xarray()")
    store = store.snapshot([task])  # every variable and the attrs at one commit
    names = list(store.params(task) if names is None else names)
    layers = layer_keys(names)
    meta = store.metadata(task)
    children = {}
    for name in names:
        info = store.param(task, name)
        lay = info.layout
        dims = dimension_names(len(info.shape), lay)
        coords: dict[str, Any] = {}
        if lay is not None and lay.has_heads and lay.head_axis < len(info.shape):
            heads, blocks = head_labels(lay, info.shape[lay.head_axis])
            coords["head"] = (dims[lay.head_axis], np.asarray(heads, dtype=np.int64))
            coords["block"] = (dims[lay.head_axis], np.asarray(blocks))
        if layers.get(name) is not None:
            coords["layer"] = layers[name]
        var = xr.DataArray(to_dask(store, task, name, bias_corrected=bias_corrected), dims=dims, coords=coords,
                           name="fisher")
        attrs = {"name": name, "kind": lay.kind if lay is not None else "other", "decay": info.decay,
                 "layout": json.dumps(lay.to_dict() if lay is not None else None)}
        children[encode_name(name, "parameter name")] = xr.Dataset({"fisher": var}, attrs=attrs)
    tree = xr.DataTree.from_dict(children, name=task)
    tree.attrs.update({"task": task, "step": meta["step"], "commit": meta["commit"], "tokens_seen": meta["tokens_seen"],
                       "estimator": meta.get("estimator") or "", "bias_corrected": int(bias_corrected)})
    return tree
