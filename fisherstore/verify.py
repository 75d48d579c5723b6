"""``fisherstore.verify``: the import path of ``verify_store``, kept. The code lives in :mod:`fisherstore.engine.verify`.

Usage::

    from fisherstore.verify import verify_store
    report = verify_store("fisher.zarr")
    report.ok, report.problems, report.rolled_back
"""

from .engine.verify import Finding, VerifyReport, verify_store

__all__ = ["verify_store", "VerifyReport", "Finding"]
