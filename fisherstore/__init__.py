"""fisherstore: the full elementwise Fisher information of a large model, on disk.

Stream each parameter's grad² EMA into chunked Zarr arrays (one attention-head block per
chunk) and read back exactly the slice an analysis needs::

    import fisherstore
    with fisherstore.open("fisher.zarr", mode="a") as store:
        store.update("taskA", {"layers.0.q.weight": grad_sq}, tokens=512)
        q_head_5 = store.fisher("taskA", "layers.0.q.weight").head(5, "Q")

The package, one folder per concept (docs/architecture.md draws it, docs/api.md lists
every public name):

==================  ====================================================================
folder              what it holds
==================  ====================================================================
``spec/``           the format and the maths: keys, manifests, head geometry, EMA; no I/O
``backends/``       bytes and arrays on a medium: a directory or ``s3://``, zarr or TensorStore
``engine/``         what a store does underneath: steps, commits, recovery, reads, memory
``store/``          :class:`FisherStore`, :func:`open`, and the lazy views it hands out
``collect/``        :class:`FisherCollector`: models, micro-batch loops, multi-pass, samples
``optimizers/``     an optimizer's own statistics as a Fisher: :func:`import_adam`
``consumers/``      what uses a Fisher, out of core: :func:`ewc_penalty`, :func:`merge`
``qkov/``           QK-OV interference (Phase 6), in RAM and out of core
``views/``          Dask, xarray, pandas and pictures for notebooks
``integrations/``   the Hugging Face ``Trainer`` callback; gradients a training loop has
``cli/``            the ``fisherstore`` command
``testing/``        the conformance suite every storage backend passes
==================  ====================================================================

This module only re-exports. ``errors.py`` holds every exception, ``losses.py`` the losses
a collector differentiates; ``compat.py``, ``phase6.py`` and ``verify.py`` keep older
import paths working.
"""

from __future__ import annotations

from . import errors as _errors
from . import losses
from ._version import __version__
from .collect.collector import FisherCollector
from .collect.models import layouts_from_model
from .consumers import ewc_penalty, merge
from .engine.catalog import ParamInfo
from .engine.dist import RankGroup
from .engine.options import StoreOptions
from .errors import *  # noqa: F403 - every error class, as errors.__all__ lists them
from .optimizers import import_adam
from .spec.codecs import CodecSpec
from .spec.layout import ParamLayout
from .store import FisherStore, StepWriter
from .store.api import open
from .store.lazy import LazyArray, LazyFisher
from .views.plots import heatmap_png, plot_mass

__all__ = [
    "__version__",
    "open",
    "FisherStore",
    "StoreOptions",
    "StepWriter",
    "LazyFisher",
    "LazyArray",
    "ParamInfo",
    "ParamLayout",
    "CodecSpec",
    "FisherCollector",
    "losses",
    "layouts_from_model",
    "RankGroup",
    "heatmap_png",
    "plot_mass",
    "import_adam",
    "ewc_penalty",
    "merge",
    *_errors.__all__,
]
