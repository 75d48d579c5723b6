"""The EWC penalty from a stored Fisher and anchor (being written)."""

from __future__ import annotations

from typing import Any

__all__ = ["ewc_penalty"]


def ewc_penalty(model: Any, store: Any, task: str, anchor: Any = None) -> Any:
    raise NotImplementedError
