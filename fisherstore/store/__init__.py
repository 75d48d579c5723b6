"""The store: :class:`FisherStore` (the facade), :func:`open`, and the lazy views it hands out.

==========================  ==============================================================
module                      job
==========================  ==============================================================
:mod:`.api`                 :func:`fisherstore.open`: pick a backend, check the arguments
:mod:`.facade`              :class:`FisherStore`: open, close, catalogue questions
:mod:`.write_verbs`         create, set_metadata, update, begin_step, flush, replay, write_state
:mod:`.anchor_verbs`        save_anchor, anchor: the weights θ* kept beside a task (EWC, merging)
:mod:`.read_verbs`          fisher, read, iter_heads, to_dask, to_xarray, summary
:mod:`.sample_verbs`        per-sample gradients: begin_samples, samples, contribution_fisher
:mod:`.base`                the state and checks the verbs share
:mod:`.lazy`                :class:`~.lazy.LazyFisher` (and ``LazyArray``) over any Fisher source
:mod:`.lazy_samples`        :class:`~.lazy_samples.LazySamples`: per-sample gradients, read on demand
:mod:`.contribution`        the contribution Fisher ``mean_i g_i²/T_i``, streamed per read
==========================  ==============================================================

The verbs are a few lines each over :mod:`fisherstore.engine`; one EMA step is a
:class:`StepWriter` (:mod:`fisherstore.engine.step`), re-exported here.
"""

from ..engine.step import StepWriter
from .facade import FisherStore

__all__ = ["FisherStore", "StepWriter"]
