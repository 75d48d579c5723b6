"""A unit of work that a ``with`` block settles on success and discards on error.

One EMA step (:class:`~fisherstore.engine.step.StepWriter`) and one per-sample segment
(:class:`~fisherstore.engine.segments.SampleBatch`) are both applied whole or not at all: leaving
the block normally settles them, an exception discards them, and either happens once.

Usage::

    with store.begin_step("math", tokens=512) as st:   # a Transaction
        st.add(name, grad_sq)                           # settled at the end of the block
"""

from __future__ import annotations

import abc
from typing import Any

__all__ = ["Transaction"]


class Transaction(abc.ABC):
    """``state`` is ``"open"`` until :meth:`settle` or :meth:`discard` ends it."""

    state: str = "open"

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.state != "open":
            return
        if exc_type is not None:
            self.discard()
            return
        self.settle()

    @abc.abstractmethod
    def settle(self) -> None:
        """Apply the unit whole."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Drop the unit whole."""
