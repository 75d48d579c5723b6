"""``fisherstore.phase6``: the import path of Phase 6's out-of-core parts and the Fisher comparison, kept.

The code lives in :mod:`fisherstore.qkov.outofcore` (the heat map's parts),
:mod:`fisherstore.qkov.compare` (the EMA Fisher beside the contribution Fisher, and two
tasks' Fishers side by side: the empirical beside the true one),
:mod:`fisherstore.spec.samples` (the per-sample maths) and :mod:`fisherstore.views.plots`
(pictures). The heat map itself is :meth:`fisherstore.qkov.QKOVInterference.heatmap_from_store`.

Usage::

    from fisherstore.phase6 import compare_fishers, compare_tasks, plot_comparison, plot_fisher_types
    plot_comparison(compare_fishers(store, "math"), "ema_vs_contribution.png")
    plot_fisher_types(compare_tasks(store, "emp", "exact"), "empirical_vs_exact.png")
"""

from typing import Any

from .qkov.compare import compare_fishers, compare_tasks, summarize_comparison
from .qkov.outofcore import FISHERS, BlockJob, block_inputs, plan_blocks, top_conflicts, weighted_gram
from .spec.samples import contribution_mean
from .views.plots import plot_comparison, plot_fisher_types

__all__ = ["FISHERS", "BlockJob", "plan_blocks", "block_inputs", "weighted_gram", "top_conflicts",
           "contribution_mean", "compare_fishers", "plot_comparison", "heatmap_from_store", "compare_tasks",
           "summarize_comparison", "plot_fisher_types"]


def heatmap_from_store(qk: Any, store: Any, task_a: str, task_b: str, **kwargs: Any) -> dict[str, Any]:
    """``qk.heatmap_from_store(store, task_a, task_b, **kwargs)``, by its old name (``qk``: a ``QKOVInterference``)."""
    return qk.heatmap_from_store(store, task_a, task_b, **kwargs)
