"""The :class:`FisherStore` facade: one class, one module per group of public verbs.

==================  ==========================================================
module              job
==================  ==========================================================
:mod:`.facade`      open, close, catalogue questions (the class itself)
:mod:`.writing`     create, set_metadata, update, begin_step, flush, replay
:mod:`.reading`     fisher, read, iter_heads, to_dask, to_xarray, summary
:mod:`.sampling`    per-sample gradients: begin_samples, samples, contribution_fisher
:mod:`.base`        the state and checks the parts share
==================  ==========================================================
"""

from ..step import StepWriter
from .facade import FisherStore

__all__ = ["FisherStore", "StepWriter"]
