"""fisherstore: the full elementwise Fisher information of a large model, on disk.

Stream each parameter's grad² EMA into chunked Zarr arrays (one attention-head block per
chunk) and read back exactly the slice an analysis needs::

    import fisherstore
    with fisherstore.open("fisher.zarr", mode="a") as store:
        store.update("taskA", {"layers.0.q.weight": grad_sq}, tokens=512)
        q_head_5 = store.fisher("taskA", "layers.0.q.weight").head(5, "Q")

This module only re-exports; docs/architecture.md maps the modules behind it.
"""

from __future__ import annotations

from . import errors as _errors
from . import losses
from ._version import __version__
from .api import open
from .catalog import ParamInfo
from .codecs import CodecSpec
from .collector import FisherCollector, StoredDecayWarning
from .dist import RankGroup
from .errors import *  # noqa: F403 - every error class, as errors.__all__ lists them
from .layout import ParamLayout
from .lazy import LazyArray, LazyFisher
from .models import layouts_from_model
from .options import StoreOptions
from .plots import plot_mass
from .qkov import heatmap_png
from .store import FisherStore, StepWriter

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
    "StoredDecayWarning",
    "losses",
    "layouts_from_model",
    "RankGroup",
    "heatmap_png",
    "plot_mass",
    *_errors.__all__,
]
