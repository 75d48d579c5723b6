"""The EMA Fisher beside the contribution Fisher, per (layer, head, block): do they rank the same?

The EMA Fisher (Option 2: what a collector streams) and the contribution Fisher (Option 1:
``mean_i C_i`` over a task's stored per-sample gradients) are two estimates of one
quantity. :func:`compare_fishers` sets them side by side, block by block: the rank
correlation of their elements and the ratio of their masses.
:func:`fisherstore.views.plots.plot_comparison` draws the result.

Usage::

    rows = compare_fishers(store, "math")   # [{"param", "layer", "head", "block", "spearman", "mass_ratio", ...}]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..spec.layers import layer_keys
from .outofcore import require_ema_step

__all__ = ["compare_fishers", "spearman"]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two flattened tensors (ties broken by position); NaN for constant ones."""
    ra = torch.empty(a.numel(), dtype=torch.float64)
    rb = torch.empty(b.numel(), dtype=torch.float64)
    ra[a.reshape(-1).argsort()] = torch.arange(a.numel(), dtype=torch.float64)
    rb[b.reshape(-1).argsort()] = torch.arange(b.numel(), dtype=torch.float64)
    ra -= ra.mean()
    rb -= rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den else float("nan")


def compare_fishers(store: Any, task: str, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The EMA Fisher beside the contribution Fisher of ``task``, per (param, head, block).

    Each row: ``param``, ``layer`` (as the parameter name's layer key), ``head``, ``block``,
    ``spearman`` (rank correlation of the two blocks' elements), ``mass_ema``,
    ``mass_contribution`` and ``mass_ratio`` (contribution / EMA). Reads block by block.

    Refused: a task with no EMA step (:class:`~fisherstore.errors.NoEmaStepError`: its EMA
    is zeros, every ratio infinite and every correlation NaN) and a task with no
    per-sample gradients (no contribution Fisher to compare).
    """
    with store.snapshot([task]) as snap:  # every block at one commit
        return _compare(snap, task, names)


def _compare(store: Any, task: str, names: Sequence[str] | None) -> list[dict[str, Any]]:
    require_ema_step(store, task, "be compared with its contribution Fisher",
                     "collect its EMA first with FisherCollector.collect_fisher, or use its contribution Fisher "
                     "alone (store.contribution_fisher(task, name); heat maps: fisher=\"contribution\")")
    if not store.sample_ids(task):
        raise InvalidArgumentError(f"task {task!r} has no per-sample gradients, so it has no contribution Fisher to "
                                   "compare its EMA with; collect them first (FisherCollector.collect_samples)")
    names = list(names) if names is not None else [
        n for n in store.params(task) if (store.layout(task, n) or None) is not None and store.layout(task, n).has_heads
        and not n.endswith("bias")]
    keys = layer_keys(names)
    rows = []
    for name in names:
        ema, contrib = store.fisher(task, name), store.contribution_fisher(task, name)
        for h, b in store.layout(task, name).head_blocks():
            e, c = ema.head(h, b), contrib.head(h, b)
            me, mc = float(e.sum(dtype=torch.float64)), float(c.sum(dtype=torch.float64))
            rows.append({"param": name, "layer": keys.get(name), "head": h, "block": b,
                         "spearman": spearman(e, c), "mass_ema": me, "mass_contribution": mc,
                         "mass_ratio": mc / me if me else float("nan")})
    return rows
