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

Mixed precision. Under fp16 AMP ``.grad`` holds ``S · g``, ``S`` the loss scale of a
``torch.amp.GradScaler`` (2¹⁶ to start), so pass the scaler: ``scaler=scaler`` divides by
``S`` (``x`` by ``S²``), on top of ``grad_scale``, which stays the loss's own normalisation
and must not include ``S``. Called before ``scaler.unscale_(optimizer)`` (the usual place)
the gradients are divided; called after it (or after ``scaler.step``, but before
``scaler.update()``, which forgets it) they are not, as the scaler records per optimizer.
A step whose gradients hold inf or NaN is the overflow step ``scaler.step`` skips: it is
skipped here too (no EMA step, ``False`` returned), counted in
the task's metadata (``store.metadata(task)["user"]["amp_skipped_steps"]``) and warned
once per collector (:class:`~fisherstore.errors.AmpOverflowWarning`). A disabled scaler,
and bf16 (no scaler), change nothing.

Usage (a custom loop, or Accelerate)::

    fc = FisherCollector(backend="zarr", path="fisher.zarr", params="all")
    loss = model(**batch).loss            # mean over the batch's T target tokens
    scaler.scale(loss).backward()         # or loss.backward() without AMP (and no scaler=)
    collect_from_grads(fc, model, "train", tokens=T, scaler=scaler)   # before clipping and the step
    scaler.unscale_(optimizer); clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer); scaler.update(); optimizer.zero_grad()
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from ..collect.autograd import dense, square_of
from ..collect.group_view import GroupSums
from ..collect.models import model_description
from ..errors import AmpOverflowWarning, InvalidArgumentError

__all__ = ["collect_from_grads", "square_of", "AmpOverflowWarning", "require_empirical"]

#: Collectors already warned of an overflow step: the warning comes once, the count every time.
_warned: weakref.WeakSet[Any] = weakref.WeakSet()

#: The task metadata field (under ``"user"``) counting the overflow steps skipped.
SKIPPED_KEY = "amp_skipped_steps"


def require_empirical(fc: Any, where: str) -> None:
    """Refuse a collector whose ``fisher_type`` is not ``"empirical"``: training gradients are of the data's labels."""
    kind = getattr(fc, "fisher_type", "empirical")
    if kind != "empirical":
        raise InvalidArgumentError(
            f"{where} squares the gradients the training loop computed, which are of the data's own labels: the "
            f"empirical Fisher by nature, not fisher_type={kind!r} (that needs labels drawn from the model, a "
            "backward of its own). Use a collector with fisher_type='empirical' here, and collect the true Fisher "
            "apart with FisherCollector(fisher_type=...).collect_fisher or collect_fisher_dataset")


def collect_from_grads(collector: Any, model: nn.Module, task: str, tokens: int, *, grad_scale: Any = None,
                       scaler: Any = None, optimizer: Any = None) -> bool:
    """One EMA step of ``task`` from the gradients now in ``model``'s tracked parameters.

    ``collector``: a :class:`~fisherstore.FisherCollector` (its ``params`` filter, layouts,
    β and group view apply). ``tokens``: T, the target tokens the gradient is over.
    ``grad_scale``: see the module docstring (None: ``tokens``, for a token-mean loss).
    ``scaler``: the ``torch.amp.GradScaler`` of fp16 training (Accelerate's
    ``accelerator.scaler``): the gradients are divided by its scale unless already
    unscaled, and an overflow step is skipped. ``optimizer``: the optimizer the model's
    gradients belong to, needed only when several optimizers share ``scaler`` and some were
    unscaled (with one optimizer, or none unscaled yet, the scaler alone tells).
    Parameters without a gradient decay lazily, as in a collector step.

    Returns True when a step was written, False when it was skipped as an AMP overflow.
    Usage: ``collect_from_grads(fc, model, "train", tokens=T, scaler=scaler)``.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise InvalidArgumentError(f"tokens must be a positive int (the target tokens of the batch), got {tokens!r}")
    if is_grad_scaler(grad_scale):
        raise InvalidArgumentError("grad_scale is the loss's own normalisation (T for a token mean); pass a "
                                   "GradScaler as scaler=, which divides by its loss scale")
    require_empirical(collector, "collect_from_grads")
    scaler = active_scaler(scaler)
    fc = collector
    order, layouts = fc.prepare(model, task, check_loss=False)
    scale = tokens if grad_scale is None else grad_scale
    if scaler is not None:
        loss_scale, overflow = amp_state(scaler, model, optimizer)
        if overflow:
            skip_overflow(fc, task, _warned)
            return False
        scale = scale / loss_scale  # a float S: exact for the powers of two a GradScaler uses
    named = dict(model.named_parameters())
    sums = GroupSums(layouts)
    with fc.store.begin_step(task, tokens=tokens, layouts={n: layouts[n] for n in order}) as st:
        for n in order:
            g = named[n].grad
            if g is None or not fc.store.owns(task, n):
                continue
            x = square_of(g, scale) if scaler is None else scaled_square(g, scale)
            if fc.reduction == "group":
                sums.add(n, x)
            st.add(n, x, trusted=True, donate=True, final=True)
    mark_training_task(fc, model, task)
    fc.record_groups(task, sums.to_host(), tokens)
    return True


def mark_training_task(fc: Any, model: nn.Module, task: str) -> None:
    """Record, on the first step, that ``task`` holds the batch estimator of training gradients."""
    if fc.store.metadata(task).get("estimator") is None:
        fc.store.set_metadata(task, estimator="batch", model=model_description(model), source="training gradients")


# -- mixed precision ---------------------------------------------------------------------------
def is_grad_scaler(obj: Any) -> bool:
    """Whether ``obj`` looks like a ``torch.amp.GradScaler`` (torch's, Accelerate's, FSDP's sharded one)."""
    return all(callable(getattr(obj, m, None)) for m in ("scale", "unscale_", "get_scale", "is_enabled"))


def active_scaler(scaler: Any) -> Any:
    """``scaler`` when it scales, None when there is none or it is disabled (it then scales by 1, skips nothing).

    Usage: ``scaler = active_scaler(scaler)``.
    """
    if scaler is None:
        return None
    if not is_grad_scaler(scaler):
        raise InvalidArgumentError(f"scaler must be a torch.amp.GradScaler (for Accelerate: accelerator.scaler), "
                                   f"got {type(scaler).__name__}")
    return scaler if scaler.is_enabled() else None


def amp_state(scaler: Any, model: nn.Module, optimizer: Any = None) -> tuple[float, bool]:
    """``(S, overflow)``: the loss scale ``model``'s ``.grad`` still carries (1.0 once unscaled), and whether
    this step overflowed, i.e. whether ``scaler.step`` skips (or skipped) it.

    Once the scaler has unscaled (or stepped) the optimizer, its own inf check decides, over
    exactly the parameters it will skip for. Before, the model's gradients are checked:
    one max-abs reduction over every ``.grad``, as the scaler's own check reads them.
    Usage: ``S, overflow = amp_state(scaler, model)``.
    """
    done = unscaled_states(scaler, optimizer)
    if done:
        found = sum(float(v.sum()) for st in done for v in st.get("found_inf_per_device", {}).values())
        return 1.0, found > 0
    grads = [dense(p.grad) for p in model.parameters() if p.grad is not None]
    finite = not grads or math.isfinite(float(torch.nn.utils.get_total_norm(grads, norm_type=math.inf)))
    return float(scaler.get_scale()), not finite


def unscaled_states(scaler: Any, optimizer: Any = None) -> list[dict[str, Any]]:
    """The scaler's records of the optimizers whose gradients it has unscaled this iteration (empty: none).

    ``torch.amp.GradScaler`` keeps, per optimizer and until ``update()``, whether
    ``unscale_`` (or ``step``, which unscales) ran, and what its inf check found. It has no
    public accessor for this, so it is read from ``_per_optimizer_states``; a scaler without
    one is taken as not unscaled. With ``optimizer`` (Accelerate's wrapper or the torch
    optimizer), only its record counts; without, one optimizer unscaled stands for all (the
    caller passes ``optimizer`` when several share the scaler).
    """
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, "_per_optimizer_states", None)  # see above: torch's own record, no public spelling
    if not isinstance(states, dict):
        return []
    if optimizer is not None:
        # The scaler keys the optimizer it was handed: a wrapper's (Accelerate's AcceleratedOptimizer, itself an
        # Optimizer) is its .optimizer, so the first of the chain it has a record of is the one
        chain = [optimizer]
        while hasattr(chain[-1], "optimizer") and len(chain) < 8:
            chain.append(chain[-1].optimizer)
        picked = [states[id(o)] for o in chain if id(o) in states][:1]
    else:
        picked = list(states.values())
    return [st for st in picked if st.get("stage") in (OptState.UNSCALED, OptState.STEPPED)]


def scaled_square(grad: torch.Tensor, factor: Any) -> torch.Tensor:
    """``(factor · grad)²`` in fp32, in new memory: scaled first, so ``S · g`` (finite) never squares past fp32."""
    x = dense(grad).to(torch.float32, copy=True)
    if isinstance(factor, torch.Tensor):
        return x.mul_(factor.to(x.device, torch.float32)).square_()
    return x.mul_(float(factor)).square_()


def skip_overflow(fc: Any, task: str, warned: Any) -> int:
    """Count an overflow step in ``task``'s metadata and warn once per ``warned`` key; returns the task's total.

    ``warned``: a set the caller keeps (a collector is added to it once warned).
    """
    total = int(fc.store.metadata(task).get("user", {}).get(SKIPPED_KEY, 0)) + 1
    fc.store.set_metadata(task, **{SKIPPED_KEY: total})
    if fc not in warned:
        warned.add(fc)
        warnings.warn(AmpOverflowWarning(
            f"a mixed-precision step of task {task!r} overflowed (inf or NaN in the scaled gradients); the "
            "GradScaler skips its optimizer step, and fisherstore skips its Fisher step. Later overflow steps are "
            f"skipped without a warning and counted in store.metadata({task!r})['user'][{SKIPPED_KEY!r}]. Many "
            "of them mean the loss scale keeps overflowing: lower the GradScaler's init_scale"), stacklevel=3)
    return total
