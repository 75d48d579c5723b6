"""Collection: from a model and batches to a store, the TensorScope way (:class:`FisherCollector`).

==========================  ==============================================================
module                      job
==========================  ==============================================================
:mod:`.collector`           :class:`FisherCollector`: the entry point, and its public seams
                            (``prepare``, ``run_step``, ``record_groups``, ``owner_ranks``)
:mod:`.tracking`            which parameters it tracks (``params=``), stored β, option checks
:mod:`.models`              layouts from a PyTorch / Hugging Face model
:mod:`.layout_check`        ``layouts=`` overrides checked against the model's own attention
:mod:`.step_loop`           one collector step: the micro-batch loop and its backward hooks
:mod:`.batches`             what a batch is, micro-batches of it, the same batch on every rank
:mod:`.autograd`            which parameters need gradients during a run, and squares
:mod:`.group_view`          TensorScope's group view: per-head (channel, ...) EMAs in RAM
:mod:`.multipass`           ``collect_fisher_dataset``: ⌈S/B⌉ passes when the state outgrows the budget
:mod:`.samples`             per-sample gradients: streamed to a store, or in RAM
==========================  ==============================================================

Usage::

    from fisherstore import FisherCollector
    fc = FisherCollector(backend="zarr", path="fisher.zarr")
    fc.collect_fisher(model, batch, task="math")
"""

from .collector import FisherCollector, Prepared
from .layout_check import LayoutCheck, check_layouts

__all__ = ["FisherCollector", "Prepared", "LayoutCheck", "check_layouts"]
