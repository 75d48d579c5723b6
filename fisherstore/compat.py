"""``fisherstore.compat``: the import path of TensorScope's accessors over a store, kept.

The code lives in :mod:`fisherstore.qkov.compat`. Usage::

    from fisherstore.compat import TensorScopeAdapter
    ts = TensorScopeAdapter(store)
"""

from .qkov.compat import TensorScopeAdapter

__all__ = ["TensorScopeAdapter"]
