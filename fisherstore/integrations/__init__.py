"""Collect the Fisher from the gradients a training loop already computes: no second backward.

:func:`collect_from_grads` writes one EMA step from the ``.grad`` of a model's tracked
parameters, after ``loss.backward()`` and before gradient clipping and ``optimizer.step()``;
it never changes ``.grad``. :mod:`fisherstore.integrations.hf` wraps it in a Hugging Face
``TrainerCallback``.

What is stored. A training gradient is usually that of the **token-mean** loss over the
optimizer step's batch (all its gradient-accumulation micro-batches): ``g = ∇(Σ ℓ)/T``,
where ``T`` is the number of target tokens of that batch. The step's ``x`` is then the
*batch* estimator of the collector, ``x = (∇ Σ ℓ)² / T = T · g²``: the square of the summed
gradient, divided by the token count (``estimator="batch"`` in the task's metadata; (E g)²,
not E[g²]). Pass ``grad_scale`` when ``.grad`` is scaled otherwise: the factor that turns
``.grad`` into the gradient of the token-*summed* loss (``T`` for a token mean, the default;
``1`` for a summed loss; ``T/k`` for a mean loss further divided by k).

Usage (a custom loop, or Accelerate)::

    fc = FisherCollector(backend="zarr", path="fisher.zarr", params="all")
    loss = model(**batch).loss            # mean over the batch's T target tokens
    loss.backward()
    collect_from_grads(fc, model, "train", tokens=T)     # before clipping and optimizer.step()
    optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..collect.autograd import square_of
from ..collect.group_view import GroupSums
from ..collect.models import model_description
from ..errors import InvalidArgumentError

__all__ = ["collect_from_grads", "square_of"]


def collect_from_grads(collector: Any, model: nn.Module, task: str, tokens: int, *, grad_scale: Any = None) -> None:
    """One EMA step of ``task`` from the gradients now in ``model``'s tracked parameters.

    ``collector``: a :class:`~fisherstore.FisherCollector` (its ``params`` filter, layouts,
    β and group view apply). ``tokens``: T, the target tokens the gradient is over.
    ``grad_scale``: see the module docstring (None: ``tokens``, for a token-mean loss).
    Parameters without a gradient decay lazily, as in a collector step.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise InvalidArgumentError(f"tokens must be a positive int (the target tokens of the batch), got {tokens!r}")
    fc = collector
    order, layouts = fc.prepare(model, task, check_loss=False)
    named = dict(model.named_parameters())
    scale = tokens if grad_scale is None else grad_scale
    sums = GroupSums(layouts)
    with fc.store.begin_step(task, tokens=tokens, layouts={n: layouts[n] for n in order}) as st:
        for n in order:
            g = named[n].grad
            if g is None or not fc.store.owns(task, n):
                continue
            x = square_of(g, scale)
            if fc.reduction == "group":
                sums.add(n, x)
            st.add(n, x, trusted=True, donate=True, final=True)
    mark_training_task(fc, model, task)
    fc.record_groups(task, sums.to_host(), tokens)


def mark_training_task(fc: Any, model: nn.Module, task: str) -> None:
    """Record, on the first step, that ``task`` holds the batch estimator of training gradients."""
    if fc.store.metadata(task).get("estimator") is None:
        fc.store.set_metadata(task, estimator="batch", model=model_description(model), source="training gradients")
