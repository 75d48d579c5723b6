"""What consumes a stored Fisher, out of core: the EWC penalty and Fisher-weighted model merging.

Usage::

    loss = task_loss + lam * fisherstore.ewc_penalty(model, store, "math")
    merged = fisherstore.merge([(model_a, store, "math"), (model_b, store, "code")])
"""

from .ewc import ewc_penalty
from .merge import merge

__all__ = ["ewc_penalty", "merge"]
