"""The ``dimension_names`` both library backends write into an array's Zarr header.

xarray opens a Zarr v3 array only when its header names its dimensions, so every array
fisherstore creates carries them (``docs/format.md``). They follow from what the array's
attributes already say (the parameter's layout, and a leading sample axis), so the
backend interface needs no new argument.

Usage: ``array_dimension_names(2, array_attributes(name, layout))`` → ``("out_heads", "in")``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..spec.format import PARAM_ATTR
from ..spec.layout import ParamLayout, dimension_names

__all__ = ["array_dimension_names"]


def array_dimension_names(ndim: int, attributes: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Dimension names of an array of ``ndim`` axes whose attributes are ``attributes``."""
    body = (attributes or {}).get(PARAM_ATTR)
    body = body if isinstance(body, Mapping) else {}
    layout = body.get("layout")
    try:
        lay = ParamLayout.from_dict(layout) if isinstance(layout, Mapping) else None
    except (TypeError, ValueError):  # a layout this version cannot read: plain names, never a failed write
        lay = None
    leading = ("sample",) if body.get("axis0") == "sample" and ndim >= 1 else ()
    return dimension_names(ndim - len(leading), lay, leading)
