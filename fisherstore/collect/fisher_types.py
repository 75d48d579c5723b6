"""Whose labels a collector squares the gradients of: the data's, drawn from the model, or every label.

``fisher_type`` (docs/estimators.md):

* ``"empirical"`` (the default): the gradient of the data's own labels, ``∇ℓ(y_data)``.
* ``"mc"``: at every target position, ``k = mc_samples`` labels ``ŷ ~ p_θ(·|x)`` are drawn from
  the model's predictive distribution (the context stays the data's: teacher forcing). Draw
  ``j`` backpropagates ``Σ_t ℓ_t(ŷ_{t,j})`` over the micro-batch, and its square counts
  ``1/k``. It is **unbiased for the true Fisher at any micro-batch size**: the square of a
  sum over positions is ``Σ_t g_t² + Σ_{t≠s} g_t g_s``, the draws at different positions are
  independent, and the score has mean zero (``E_y ∇log p(y) = Σ_y ∇p(y) = ∇1 = 0``), so every
  cross term vanishes in expectation. A larger micro-batch only adds variance.
* ``"exact"``: the expectation itself, ``Σ_t Σ_y p_t(y) (∇log p_t(y))²``: one backward per
  (position, class), each square weighted by ``p_t(y)``. Independent of micro-batching; it
  costs ``positions × classes`` backward passes, so it is refused above
  :data:`EXACT_MAX_CLASSES` classes (use ``"mc"``).

Either way the step's ``x`` is the sum of those squares divided by ``T`` (the target
positions), as for the empirical Fisher: the three estimate one quantity on one scale.

The loss must expose its predictive distribution: ``loss_fn.logits(model, batch)``
(``[..., C]``) and ``loss_fn.targets(batch)`` (the same leading shape, ``-100`` where
nothing is predicted), as every :class:`~fisherstore.losses.TokenLoss` does. Only *where*
the targets are counts for ``"mc"`` and ``"exact"``, not their values.

Usage::

    passes = backward_passes("mc", causal_lm, model, micro_batch, mc_samples=4, seed=s)
    for loss, weight, more in passes.items:      # square each gradient, times weight
        loss.backward(retain_graph=more)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..losses import IGNORE_INDEX, call_loss, loss_name
from ..spec.manifest import FISHER_TYPES

__all__ = ["FISHER_TYPES", "EXACT_MAX_CLASSES", "Passes", "backward_passes", "check_fisher_type", "draw_seed"]

#: The largest label space ``fisher_type="exact"`` takes: it runs one backward per (position, class).
EXACT_MAX_CLASSES = 1024


@dataclass
class Passes:
    """One micro-batch's backward passes: its target count, how many passes, and each ``(loss, weight, more)``.

    The gradient of ``loss`` is squared and multiplied by ``weight``; ``more`` says whether
    another pass follows on the same graph (``retain_graph``).
    """

    n_tokens: int
    count: int
    items: Iterator[tuple[torch.Tensor, float, bool]]


def check_fisher_type(fisher_type: Any, mc_samples: Any, seed: Any, loss_fn: Any, estimator: str) -> None:
    """Refuse a ``fisher_type`` / ``mc_samples`` / ``seed`` a collector cannot honour, naming the fix."""
    if fisher_type not in FISHER_TYPES:
        raise InvalidArgumentError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise InvalidArgumentError(f"mc_samples must be a positive int, got {mc_samples!r}")
    if mc_samples != 1 and fisher_type != "mc":
        raise InvalidArgumentError(
            f"mc_samples={mc_samples} applies to fisher_type='mc' (labels drawn from the model), but fisher_type is "
            f"{fisher_type!r}. Pass fisher_type='mc', or leave mc_samples at 1")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidArgumentError(f"seed must be an int or None, got {seed!r}")
    if fisher_type == "empirical":
        return
    if estimator != "micro_batch":
        raise InvalidArgumentError(
            f"fisher_type={fisher_type!r} squares the gradient of labels drawn per position, which the "
            f"{estimator!r} estimator would sum over the whole batch before squaring; pass "
            "estimator='micro_batch' (the default)")
    if not (callable(getattr(loss_fn, "logits", None)) and callable(getattr(loss_fn, "targets", None))):
        raise InvalidArgumentError(
            f"fisher_type={fisher_type!r} draws labels from the model's predictive distribution, so loss_fn must "
            f"expose it: loss_fn.logits(model, batch) -> [..., C] and loss_fn.targets(batch) -> labels (-100 where "
            f"nothing is predicted). {loss_name(loss_fn)} does not; use a fisherstore.losses loss (causal_lm, "
            "seq2seq_lm, masked_lm, classification) or subclass fisherstore.losses.TokenLoss (docs/estimators.md)")


def draw_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed for one micro-batch's draws from ``seed`` and where it is (rank, task, step, rows).

    The same step of the same task draws the same labels whatever else ran before it: each
    pass of a multi-pass run sees the labels of the first, and a rerun with ``seed`` repeats.
    """
    h = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def backward_passes(fisher_type: str, loss_fn: Any, model: nn.Module, batch: Mapping[str, Any], *,
                    mc_samples: int = 1, seed: int | None = None) -> Passes:
    """The backward passes of one micro-batch under ``fisher_type`` (see the module docstring).

    ``seed`` seeds the ``"mc"`` draws, on a generator of the logits' device (so a seed repeats
    a run on the same kind of device; a CPU and a GPU draw differently).
    """
    if fisher_type == "empirical":
        loss, n = call_loss(loss_fn, model, batch)
        return Passes(n, 1 if n else 0, iter([(loss, 1.0, False)] if n else []))
    tgt = loss_fn.targets(batch)
    logits = loss_fn.logits(model, batch)
    logits = getattr(logits, "logits", logits)
    if not isinstance(logits, torch.Tensor) or logits.ndim < 2 or tuple(logits.shape[:-1]) != tuple(tgt.shape):
        raise InvalidArgumentError(
            f"{loss_name(loss_fn)}.logits returned {type(logits).__name__} of shape "
            f"{tuple(getattr(logits, 'shape', ()))} for targets of shape {tuple(tgt.shape)}; fisher_type="
            f"{fisher_type!r} needs logits [..., C] whose leading shape is the targets'")
    mask = tgt.to(logits.device) != IGNORE_INDEX
    n = int(mask.sum())
    if n == 0:
        return Passes(0, 0, iter([]))
    logp = F.log_softmax(logits[mask].float(), dim=-1)  # [positions, C]
    p = logp.detach().exp()
    C = p.shape[-1]
    if fisher_type == "mc":
        gen = torch.Generator(device=p.device)
        if seed is not None:
            gen.manual_seed(seed)
        y = torch.multinomial(p, mc_samples, replacement=True, generator=gen)  # [positions, k]
        return Passes(n, mc_samples, _mc(logp, y))
    if C > EXACT_MAX_CLASSES:
        raise InvalidArgumentError(
            f"fisher_type='exact' runs one backward per (position, class), and this model predicts {C} classes "
            f"(more than {EXACT_MAX_CLASSES}): {n * C} backward passes for this micro-batch alone. Use "
            "fisher_type='mc' with mc_samples=k, an unbiased estimate of the same Fisher (docs/estimators.md)")
    live = (p > 0).nonzero()  # a class of probability 0 adds nothing
    weights = p[live[:, 0], live[:, 1]].tolist()  # one transfer, not one device sync per pass
    return Passes(n, len(weights), _exact(logp, live.tolist(), weights))


def _mc(logp: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, float, bool]]:
    k = y.shape[1]
    for j in range(k):
        yield -logp.gather(1, y[:, j:j + 1]).sum(), 1.0 / k, j + 1 < k


def _exact(logp: torch.Tensor, live: list[list[int]], weights: list[float]) -> Iterator[tuple[torch.Tensor, float, bool]]:
    for i, ((t, c), w) in enumerate(zip(live, weights)):
        yield -logp[t, c], w, i + 1 < len(live)
