"""QK-OV interference ("Phase 6"): which samples of two tasks interfere through which attention heads.

============================  ==============================================================
module                        job
============================  ==============================================================
:mod:`.indexer`               (layer, head, block) -> the parameter and slice that hold it
:mod:`.scores`                :class:`QKOVInterference`: scores in RAM, and the heat map
                              straight from a store
:mod:`.outofcore`             the out-of-core heat map's parts: plan, read ahead, score a block
:mod:`.compare`               the EMA Fisher beside the contribution Fisher, per block
                              (:func:`~.compare.compare_fishers`), or two tasks' EMA Fishers
                              (:func:`~.compare.compare_tasks`: the empirical beside the true one)
:mod:`.compat`                TensorScope's ``contribution_cache`` / ``gradient_manager`` over a store
============================  ==============================================================

Usage::

    from fisherstore.qkov import QKOVIndexer, QKOVInterference, heatmap_png
    qk = QKOVInterference(QKOVIndexer.from_store(store, "math"))
    heat = qk.heatmap_from_store(store, "math", "code")
    heatmap_png(heat, "qkov.png")
"""

from ..views.plots import heatmap_png
from .indexer import BlockHeadSlice, QKOVIndexer
from .scores import QKOVInterference

__all__ = ["BlockHeadSlice", "QKOVIndexer", "QKOVInterference", "heatmap_png"]
