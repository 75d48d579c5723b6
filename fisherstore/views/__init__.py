"""Views of a store for notebooks: lazy Dask arrays and xarray trees, pandas tables, and pictures.

============================  ==============================================================
module                        job
============================  ==============================================================
:mod:`.arrays`                :func:`to_dask`, :func:`to_xarray`, :func:`block_sums`: lazy,
                              bias-corrected, one Dask chunk per store chunk
:mod:`.summary`               Fisher mass per (param, layer, head, block) as a DataFrame
:mod:`.plots`                 [layer x head] pictures: mass, QK-OV heat maps, two Fishers compared
:mod:`.figures`               the panels and files every picture is drawn with
============================  ==============================================================

xarray, Dask and pandas are the ``views`` extra, matplotlib the ``plot`` extra; without
them a view raises :class:`~fisherstore.errors.MissingDependencyError` naming the extra.

Usage::

    from fisherstore.views import block_sums
    block_sums(store, "math", "model.layers.3.self_attn.q_proj.weight").compute()   # per-head mass
"""

from .arrays import block_sums, to_dask, to_xarray

__all__ = ["to_dask", "to_xarray", "block_sums"]
