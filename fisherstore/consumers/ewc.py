"""The EWC penalty ``Σ F̂ (θ − θ*)²`` from a stored Fisher and anchor, in bounded memory.

Elastic weight consolidation (Kirkpatrick et al., 2017) keeps a model near the weights
``θ*`` where an old task's Fisher ``F̂`` was taken, in proportion to ``F̂``::

    loss = new_task_loss + lam / 2 * fisherstore.ewc_penalty(model, store, "math")
    loss.backward()

:func:`ewc_penalty` returns the bare sum (no ``λ/2``). Its memory does not grow with the
model: the value is computed under ``no_grad`` one parameter at a time, and the gradient
``2 F̂ (θ − θ*)`` comes from a custom :class:`torch.autograd.Function` whose backward reads
``F̂`` and ``θ*`` again, one parameter at a time. The graph holds only references to the
parameters (no copy), so the peak is one parameter's ``F̂``, ``θ*`` and difference, plus
the gradients themselves. The plain ``(F * (p - a) ** 2).sum()`` over every parameter
keeps ``F̂`` and ``θ − θ*`` of *all* of them alive until backward: twice the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..errors import (
    InvalidArgumentError,
    NoEmaStepError,
    ShapeMismatchError,
    StepError,
    UnknownParamError,
    close_matches,
    listing,
)
from ..store.anchor_verbs import anchor_task, named_tensors

__all__ = ["ewc_penalty", "require_fisher", "check_shapes", "shapes_of"]


def ewc_penalty(model: torch.nn.Module, store: Any, task: str, anchor: Any = None) -> torch.Tensor:
    """``Σ_params Σ_elements F̂ (θ − θ*)²``: the EWC term of ``task``, a scalar that backpropagates into ``model``.

    Args:
        model: the model being trained; its parameters are ``θ`` (names as ``named_parameters``).
        store: an open :class:`~fisherstore.FisherStore` (or a snapshot) holding ``task``'s Fisher.
        task: the old task. ``F̂`` is its bias-corrected readout (``store.read(task, name)``).
        anchor: ``θ*``. None (default): the weights saved beside ``task`` by
            ``store.save_anchor(task, model)``; an ``nn.Module`` (its current weights, e.g. a
            frozen copy); or a mapping name -> tensor.

    Returns a 0-dim tensor on the device of the model's first stored parameter, in float32
    (float64 if a parameter is). Multiply by ``λ/2`` yourself: the contract is the bare sum.
    Only the parameters ``task`` stores contribute; each must be in ``model`` (and in
    ``anchor``) with the stored shape, or nothing is computed and the error names it.
    Parameters that do not require grad count in the value and get no gradient.

    Memory: one parameter's ``F̂``, ``θ*`` and ``θ − θ*`` at a time, in the forward and again
    in the backward, which reads them anew (module docstring). Every ``F̂`` and a stored
    ``θ*`` are read at one commit: the call takes ``store.snapshot`` of the task and its
    anchor, and the graph holds it until it is freed (a pinned snapshot keeps that commit
    on disk against other writers). A writable store's snapshot is its live state: if this
    process writes a step to ``task`` between the forward and the backward, the backward
    raises :class:`StepError` rather than mix two Fishers. An ``anchor=`` model or mapping is
    read again in the backward too: keep it unchanged until then (a frozen copy). The
    parameters themselves are saved as autograd saves them: an in-place change before the
    backward is refused by torch.

    Usage: ``(task_loss + lam / 2 * ewc_penalty(model, store, "math")).backward()``.
    """
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"model must be an nn.Module (the model being trained), got {type(model).__name__}")
    require_fisher(store, task, "be an EWC penalty")
    pinned = [task]
    if anchor is None:
        pinned.append(store.require_anchor(task))
    snap = store.snapshot(pinned)
    kept = False
    try:
        terms = _Terms(snap, task, model, anchor)
        params = [terms.params[n] for n in terms.names]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            out = _EWC.apply(terms, *params)
            kept = True  # the graph holds terms, and terms the snapshot, until the graph is freed
            return out
        with torch.no_grad():
            return terms.value(params)
    finally:
        if not kept:
            snap.close()


def require_fisher(store: Any, task: str, use: str) -> None:
    """Refuse a task that is not a Fisher with at least one EMA step (unknown, an anchor, or step 0).

    Usage: ``require_fisher(store, "math", "be merged")``.
    """
    meta = store.metadata(task)  # UnknownTaskError, naming close matches
    if meta.get("estimator") == "anchor":
        raise InvalidArgumentError(
            f"task {task!r} holds anchor weights (of task {meta.get('user', {}).get('anchor_of')!r}), not a Fisher; "
            "pass the Fisher task's name")
    if store.step(task) == 0:
        raise NoEmaStepError(
            f"task {task!r} holds no EMA step (step 0), so its Fisher is all zeros and cannot {use}; collect its "
            "Fisher first (FisherCollector.collect_fisher)")


def check_shapes(have: Mapping[str, Sequence[int]], names: Sequence[str], shapes: Mapping[str, Sequence[int]],
                 what: str) -> None:
    """Every name of ``names`` is in ``have`` (name -> shape) with the shape ``shapes`` gives, or the error names it.

    Usage: ``check_shapes({n: p.shape for n, p in model.named_parameters()}, names, shapes, "the model")``.
    """
    for name in names:
        shape = have.get(name)
        if shape is None:
            raise UnknownParamError(f"{what} has no parameter {name!r}; it has {listing(have)}."
                                    + close_matches(name, have))
        if tuple(shape) != tuple(shapes[name]):
            raise ShapeMismatchError(f"{what}'s {name!r} has shape {tuple(shape)}, but the store holds it with "
                                     f"shape {tuple(shapes[name])}")


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a mapping of tensors. Usage: ``check_shapes(shapes_of(weights), names, shapes, "x")``."""
    return {n: tuple(t.shape) for n, t in tensors.items()}


class _Terms:
    """Reads ``F̂`` and ``θ*`` of one parameter at a time, for the forward and again for the backward."""

    def __init__(self, snap: Any, task: str, model: torch.nn.Module, anchor: Any) -> None:
        self.snap, self.task = snap, task
        self.names = snap.params(task)
        shapes = {n: tuple(snap.param(task, n).shape) for n in self.names}
        self.params = named_tensors(model, "model")
        check_shapes(shapes_of(self.params), self.names, shapes, "the model")
        self.stored = anchor_task(task) if anchor is None else None
        self.anchor: dict[str, torch.Tensor] = {}
        if self.stored is not None:
            check_shapes({n: snap.param(self.stored, n).shape for n in snap.params(self.stored)}, self.names, shapes,
                         f"the anchor saved beside task {task!r}")
        else:
            self.anchor = {n: t.detach() for n, t in named_tensors(anchor, "anchor").items()}
            check_shapes(shapes_of(self.anchor), self.names, shapes, "the anchor")
        self.steps = self._steps()

    def _steps(self) -> tuple[int, int | None]:
        """The step of the task and of its stored anchor: a new step is what changes what they read."""
        return self.snap.step(self.task), None if self.stored is None else self.snap.step(self.stored)

    def pair(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F̂, θ*)`` of ``name`` on ``device`` as ``dtype`` (read from the store now)."""
        f = self.snap.read(self.task, name).to(device, dtype)
        if self.stored is not None:
            a = self.snap.read(self.stored, name, bias_corrected=False)  # θ* exactly (anchor_verbs)
        else:
            a = self.anchor[name]
        return f, a.to(device, dtype)

    def value(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The penalty's value, one parameter at a time (call under no_grad)."""
        dtype = _result_dtype(params)
        device = params[0].device if params else torch.device("cpu")
        acc = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        total = torch.zeros((), dtype=acc, device=device)
        for name, p in zip(self.names, params):
            f, a = self.pair(name, p.device, _compute_dtype(p))
            d = p.detach().to(a.dtype) - a  # a new tensor: the in-place ops below leave θ alone
            del a
            part = d.square_().mul_(f).sum(dtype=torch.float32 if p.device.type == "mps" else torch.float64)
            total += part.to(device, acc)
            del f, d
        return total.to(dtype)

    def gradients(self, params: Sequence[torch.Tensor], grad: torch.Tensor,
                  wanted: Sequence[bool]) -> list[torch.Tensor | None]:
        """``grad · 2 F̂ (θ − θ*)`` of each parameter ``wanted``, reading ``F̂`` and ``θ*`` again."""
        if self._steps() != self.steps:
            raise StepError(
                f"task {self.task!r} (or its anchor) changed between the EWC penalty's forward and its backward (a "
                "step was written to it in between); compute the penalty again after the step")
        out: list[torch.Tensor | None] = []
        for name, p, want in zip(self.names, params, wanted):
            if not want:
                out.append(None)
                continue
            f, a = self.pair(name, p.device, _compute_dtype(p))
            d = p.detach().to(a.dtype) - a
            del a
            d.mul_(f).mul_(2 * grad.to(p.device, d.dtype))
            del f
            out.append(d.to(p.dtype))
        return out


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 for fp32, bf16 and fp16 parameters (θ − θ* in half precision would round); float64 stays."""
    return torch.promote_types(p.dtype, torch.float32)


def _result_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, _compute_dtype(p))
    return dtype


class _EWC(torch.autograd.Function):
    """The penalty as one autograd node over the parameters: saves them (references), never ``F̂`` or ``θ − θ*``."""

    @staticmethod
    def forward(ctx: Any, terms: _Terms, *params: torch.Tensor) -> torch.Tensor:
        ctx.terms = terms
        ctx.save_for_backward(*params)  # the parameters themselves: no copy, and torch's in-place check
        return terms.value(params)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        params = ctx.saved_tensors
        return (None, *ctx.terms.gradients(params, grad, ctx.needs_input_grad[1:]))
