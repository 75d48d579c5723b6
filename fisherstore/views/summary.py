"""Fisher mass per (param, layer, head, block): a table a notebook hands to pandas.

One row per head block of every attention parameter (read with the store's head sweep,
one chunk per block), and one row per parameter without heads (read slab by slab). The
*mass* of a block is the sum of its bias-corrected Fisher entries, summed in float64.

Usage::

    df = store.summary("math")                          # pandas.DataFrame
    df[df.block == "Q"].pivot_table("mass", "layer", "head")   # [layer x head] for Q
    df.groupby("param").mass.sum()                       # per parameter

Columns: ``param``, ``layer`` (int, or ``"decoder.3"``-style for several stacks; None
without one), ``block`` (Q/K/V/O, None without heads), ``head`` (the index within its
block: query head for Q and O, key/value head for K and V; <NA> without heads), ``kind``,
``numel``, ``mass``, ``mean``, ``max`` and ``share`` (mass over the task's total mass).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import require
from ..progress import progress_bar
from ..spec.layers import layer_keys
from ..spec.regions import iter_slabs

__all__ = ["summary", "COLUMNS"]

COLUMNS = ("param", "layer", "block", "head", "kind", "numel", "mass", "mean", "max", "share")

#: Bytes per read when a parameter without heads is summed (bounds RAM, not the result).
SLAB_BYTES = 64 << 20


def summary(store: Any, task: str, names: Sequence[str] | None = None, *, bias_corrected: bool = True,
            workers: int = 4, progress: bool | None = None) -> Any:
    """Fisher mass per (param, layer, head, block) of ``task`` as a ``pandas.DataFrame`` (module docstring).

    ``names``: the parameters to include (default: all of the task). ``progress``: None
    shows a bar on a terminal, False never, True always.
    """
    pd = require("pandas", "summary()")
    with store.snapshot([task]) as snap:  # every row at one commit, however long the sweep
        return _summary(pd, snap, task, names, bias_corrected, workers, progress)


def _summary(pd: Any, store: Any, task: str, names: Sequence[str] | None, bias_corrected: bool, workers: int,
             progress: bool | None) -> Any:
    names = list(store.params(task) if names is None else names)
    layers = layer_keys(names)
    headed = [n for n in names if _has_heads(store.layout(task, n), len(store.param(task, n).shape))]
    rows: dict[tuple[str, str | None, int | None], dict[str, Any]] = {}
    for name, h, b, blk in store.iter_heads(task, headed, workers=workers, bias_corrected=bias_corrected):
        lay = store.layout(task, name)
        own = lay.block_head(h, b)
        rows[(name, b, own)] = _row(name, layers.get(name), b, own, lay.kind, blk.numpy())
    plain = [n for n in names if n not in set(headed)]
    total = sum(4 * int(np.prod(store.param(task, n).shape)) for n in plain)
    with progress_bar(total, progress, f"summary {task}") as bar:
        for name in plain:
            info = store.param(task, name)
            rows[(name, None, None)] = _plain_row(store, task, name, info, layers.get(name), bias_corrected, bar)
    order = {n: i for i, n in enumerate(names)}
    ranked = sorted(rows.items(), key=lambda kv: (order[kv[0][0]], "QKVO".find(kv[0][1] or ""),
                                                 -1 if kv[0][2] is None else kv[0][2]))
    df = pd.DataFrame([r for _, r in ranked], columns=list(COLUMNS[:-1]))
    df["head"] = pd.array([r["head"] for _, r in ranked], dtype="Int64")
    layer_values = [r["layer"] for _, r in ranked]
    if all(v is None or isinstance(v, int) for v in layer_values):  # one stack: ints, <NA> outside layers
        df["layer"] = pd.array(layer_values, dtype="Int64")
    mass = float(df["mass"].sum()) if len(df) else 0.0
    df["share"] = df["mass"] / mass if mass > 0 else 0.0
    df.attrs.update({"task": task, "step": store.step(task), "bias_corrected": bias_corrected})
    return df


def _has_heads(layout: Any, ndim: int) -> bool:
    return layout is not None and layout.has_heads and layout.head_axis < ndim


def _row(name: str, layer: Any, block: str | None, head: int | None, kind: str, a: np.ndarray) -> dict[str, Any]:
    mass = float(a.sum(dtype=np.float64))
    return {"param": name, "layer": layer, "block": block, "head": head, "kind": kind, "numel": int(a.size),
            "mass": mass, "mean": mass / a.size if a.size else 0.0, "max": float(a.max()) if a.size else 0.0}


def _plain_row(store: Any, task: str, name: str, info: Any, layer: Any, bias_corrected: bool,
               bar: Any) -> dict[str, Any]:
    """A parameter without heads, read slab by slab so a large MLP never sits in RAM whole."""
    mass, top, numel = 0.0, 0.0, 0
    for region in iter_slabs(info.shape, info.chunks, SLAB_BYTES):
        a = store.read(task, name, region, bias_corrected=bias_corrected).numpy()
        mass += float(a.sum(dtype=np.float64))
        top = max(top, float(a.max())) if a.size else top
        numel += a.size
        bar.update(4 * a.size)
    kind = info.layout.kind if info.layout is not None else "other"
    return {"param": name, "layer": layer, "block": None, "head": None, "kind": kind, "numel": numel, "mass": mass,
            "mean": mass / numel if numel else 0.0, "max": top}
