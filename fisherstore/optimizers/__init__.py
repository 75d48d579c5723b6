"""Optimizers' own curvature statistics, taken into a store: Adam's second moment as a Fisher estimate.

Usage::

    fisherstore.import_adam(store, "adam", model, "checkpoint-500/optimizer.pt")
"""

from .adam import import_adam

__all__ = ["import_adam"]
