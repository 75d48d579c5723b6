"""Adam's ``exp_avg_sq`` as a stored EMA Fisher (being written)."""

from __future__ import annotations

from typing import Any

__all__ = ["import_adam"]


def import_adam(store: Any, task: str, model: Any, source: Any, tokens_per_step: int | None = None) -> Any:
    raise NotImplementedError
