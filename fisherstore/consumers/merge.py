"""Fisher-weighted model merging (being written)."""

from __future__ import annotations

from typing import Any

__all__ = ["merge"]


def merge(models_or_stores: Any, *args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError
