"""Basic indexing of a lazy array, as a plan: which region to read, then what to do with it.

As in zarr-python, the plan is made apart from the I/O that carries it out: a region with
positive steps (what a store reads), the dimensions to flip afterwards (negative steps),
the dimensions to drop (integer indices) and, for an empty selection, its shape (nothing
is read).

Usage::

    plan = plan_index((0, slice(None, None, -1)), (4, 8), "w")
    plan.region    # (slice(0, 1, 1), slice(0, 8, 1)); plan.flips == [1]; plan.squeeze == [0]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import InvalidArgumentError, SliceError
from .regions import Region

__all__ = ["IndexPlan", "plan_index"]


class IndexPlan(NamedTuple):
    """What a basic index reads (``region``, positive steps) and how the result is then shaped."""

    region: Region
    flips: list[int]
    squeeze: list[int]
    empty: tuple[int, ...] | None


def plan_index(key: Any, shape: tuple[int, ...], name: str) -> IndexPlan:
    """Turn a basic index of a ``shape`` array called ``name`` into an :class:`IndexPlan`.

    Raises :class:`SliceError` (out of range, two ellipses, a zero step, too many indices)
    or :class:`InvalidArgumentError` (an index kind a lazy array cannot read, e.g. a mask).
    """
    ndim = len(shape)
    if not isinstance(key, tuple):
        key = (key,)
    n_ell = sum(k is Ellipsis for k in key)
    if n_ell > 1:
        raise SliceError("an index can only have a single ellipsis ('...')")
    if n_ell:
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1 :]
    if len(key) > ndim:
        raise SliceError(f"too many indices for {name!r}: it is {ndim}-D (shape {shape}) but {len(key)} were given")
    key = key + (slice(None),) * (ndim - len(key))
    region, flips, squeeze, out_shape = [], [], [], []
    for dim, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, torch.Tensor) and k.ndim == 0 and not k.is_floating_point() and k.dtype != torch.bool:
            k = int(k)
        if isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)):
            i = int(k)
            if not -n <= i < n:
                raise SliceError(f"index {i} is out of range for dimension {dim} of {name!r}, which has size {n}")
            i %= n
            region.append(slice(i, i + 1, 1))
            squeeze.append(dim)
        elif isinstance(k, slice):
            if k.step == 0:
                raise SliceError(f"slice step cannot be zero (dimension {dim} of {name!r})")
            try:
                start, stop, step = k.indices(n)
            except TypeError:
                raise InvalidArgumentError(
                    f"slice bounds must be ints or None, got {k!r} for dimension {dim} of {name!r}"
                ) from None
            r = range(start, stop, step)
            out_shape.append(len(r))
            if not len(r):
                region.append(slice(0, 0, 1))
            elif step > 0:
                region.append(slice(r[0], r[-1] + 1, step))
            else:
                region.append(slice(r[-1], r[0] + 1, -step))
                flips.append(dim)
        else:
            raise InvalidArgumentError(
                f"indices of {name!r} must be ints, slices or '...', got {type(k).__name__}; "
                "call .load() first for advanced indexing"
            )
    empty = tuple(out_shape) if 0 in out_shape else None
    return IndexPlan(tuple(region), flips, squeeze, empty)
