"""The facade's anchor verbs: the weights θ* a Fisher was taken at, stored beside its task.

EWC (:func:`fisherstore.ewc_penalty`) and Fisher-weighted merging (:func:`fisherstore.merge`)
need, besides the Fisher ``F̂`` of a task, the weights ``θ*`` it belongs to. They are kept in
a companion task, :func:`anchor_task` ``(task)`` = ``"<task>@anchor"``, with one array per
parameter the Fisher task tracks, written once with :meth:`~fisherstore.FisherStore.write_state`
(raw values, step 1, β = 0.5: the raw readout is the weights exactly) and marked
``estimator="anchor"``, ``anchor_of=<task>`` in its metadata. Any reader of the store sees
it as an ordinary task; ``store.anchor(task, name)`` reads it back.

Usage::

    store.save_anchor("math", model)           # after collecting the Fisher of "math"
    theta_star = store.anchor("math", "lm_head.weight")
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from ..errors import (
    InvalidArgumentError,
    ShapeMismatchError,
    StepError,
    UnknownParamError,
    UnknownTaskError,
    close_matches,
    listing,
)
from ..spec.format import json_value
from .base import StoreBase

__all__ = ["AnchorMethods", "anchor_task", "ANCHOR_SUFFIX", "named_tensors", "describe"]

#: What names an anchor task after its Fisher task.
ANCHOR_SUFFIX = "@anchor"
#: The anchor's β: any β in (0, 1) gives a raw readout equal to what was written (step 1, ``t_last`` 1).
ANCHOR_DECAY = 0.5


def anchor_task(task: str) -> str:
    """The name of the companion task that holds ``task``'s anchor weights: ``f"{task}@anchor"``.

    Usage: ``store.read(anchor_task("math"), name, bias_corrected=False)`` (what ``store.anchor`` does).
    """
    return f"{task}{ANCHOR_SUFFIX}"


class AnchorMethods(StoreBase):
    """``save_anchor``, ``anchor``, ``has_anchor``."""

    def save_anchor(self, task: str, model: Any, *, names: Iterable[str] | None = None,
                    description: Mapping[str, Any] | None = None) -> str:
        """Store ``model``'s current weights as the anchor ``θ*`` of ``task``; return the anchor task's name.

        One array per parameter ``task`` tracks (``store.params(task)``: the Fisher task must
        exist, so collect it first), or per name of ``names`` (then ``task`` need not exist).
        ``model`` is an ``nn.Module`` (its ``named_parameters``, tied aliases included) or a
        mapping name -> tensor. Weights are stored as float32: fp32, bf16 and fp16 weights
        come back bit for bit; float64 weights are rounded to float32. Only one parameter's
        weights are copied to the CPU at a time.

        The anchor task :func:`anchor_task` ``(task)`` gets ``estimator="anchor"``, the model's
        description (``description``, default its class name and config's ``model_type``) and
        ``anchor_of=task`` as metadata, and the call ends with a :meth:`flush`, which commits
        every task with news (a Fisher step still unflushed included).

        Refused: a store whose codec is lossy (``lossy_keepbits``: θ* would be rounded), a
        task that already has an anchor (the store cannot delete a task: anchor the new
        weights under a new task name), NaN/Inf weights, and a name the model lacks or
        whose shape differs from the Fisher's (nothing is written then).
        Usage: ``store.save_anchor("math", model)``.
        """
        self._check_writable("save an anchor")
        if self.group.world_size > 1:
            raise InvalidArgumentError(
                "save_anchor runs in one process: open the store without a group on one rank to save the anchor")
        if self.codecs.lossy_keepbits is not None:
            raise InvalidArgumentError(
                f"the store at {self.path!r} is lossy (lossy_keepbits={self.codecs.lossy_keepbits}): it would round "
                "the anchor weights θ*. Save anchors to a lossless store (fisherstore.open(..., lossy_keepbits=None))")
        anchor = anchor_task(task)
        if names is None:
            if task not in self.tasks():
                raise UnknownTaskError(
                    f"task {task!r} is not in the store, so it says no parameters to anchor; collect its Fisher first, "
                    f"or pass names=[...] to store.save_anchor({task!r}, model, names=...)")
            wanted = self.params(task)
        else:
            if isinstance(names, str):
                raise InvalidArgumentError(f"names must be an iterable of parameter names, not the string {names!r}")
            wanted = list(dict.fromkeys(names))
        weights = named_tensors(model, "model")
        shapes = {}
        for name in wanted:  # every check before anything is created: a refusal leaves nothing behind
            w = weights.get(name)
            if w is None:
                raise UnknownParamError(
                    f"the model has no parameter {name!r}, which task {task!r} tracks; its parameters are "
                    f"{listing(weights)}." + close_matches(name, weights))
            if task in self.tasks() and name in self.params(task) and tuple(self.param(task, name).shape) != \
                    tuple(w.shape):
                raise ShapeMismatchError(
                    f"the model's {name!r} has shape {tuple(w.shape)}, but task {task!r} tracks it with shape "
                    f"{tuple(self.param(task, name).shape)}: is this the model the Fisher was collected on?")
            if w.is_complex() or not w.is_floating_point():
                raise InvalidArgumentError(f"the model's {name!r} is {w.dtype}; anchors hold real floating-point weights")
            shapes[name] = tuple(w.shape)
        if anchor in self.tasks() and self.step(anchor) != 0:
            raise StepError(
                f"task {task!r} already has an anchor ({anchor!r}, saved at commit {self.metadata(anchor)['commit']}); "
                "an anchor is written once and the store cannot delete a task. Save the new weights beside a new "
                "task name (collect or copy its Fisher there), or open a new store")
        desc = json_value(dict(description), "description") if description is not None else describe(model)
        for name, shape in shapes.items():
            self.create(anchor, name, shape, layout=None, decay=ANCHOR_DECAY)
        # Marked an anchor before its weights land; a failed write forgets the new task whole (write_state).
        self.set_metadata(anchor, estimator="anchor", model=desc, anchor_of=task)
        self.write_state(anchor, _one_at_a_time(weights, shapes), step=1)
        self.flush()
        return anchor

    def anchor(self, task: str, name: str) -> torch.Tensor:
        """The anchor weights θ* of ``name`` saved beside ``task`` (:meth:`save_anchor`), as an fp32 CPU tensor.

        Usage: ``theta_star = store.anchor("math", "lm_head.weight")``.
        """
        anchor = self.require_anchor(task)
        if name not in self.params(anchor):
            raise UnknownParamError(
                f"the anchor of task {task!r} holds no parameter {name!r}; it holds {listing(self.params(anchor))}."
                + close_matches(name, self.params(anchor)))
        return self.read(anchor, name, bias_corrected=False)

    def has_anchor(self, task: str) -> bool:
        """Whether :meth:`save_anchor` stored (and, on a reader, committed) weights beside ``task``.

        Usage: ``if not store.has_anchor("math"): store.save_anchor("math", model)``.
        """
        anchor = anchor_task(task)
        return (anchor in self.tasks() and self.step(anchor) >= 1
                and self.metadata(anchor).get("estimator") == "anchor")

    def require_anchor(self, task: str) -> str:
        """The anchor task of ``task``, or an :class:`UnknownTaskError` saying how to save one.

        Usage: ``store.read(store.require_anchor("math"), name, bias_corrected=False)``.
        """
        if not self.has_anchor(task):
            raise UnknownTaskError(
                f"task {task!r} has no anchor weights in the store at {self.path!r}; save them where the Fisher "
                f"was collected: store.save_anchor({task!r}, model), or pass anchor= (a model or a mapping name -> "
                "tensor)")
        return anchor_task(task)


def named_tensors(source: Any, what: str) -> dict[str, torch.Tensor]:
    """Name -> tensor of an ``nn.Module`` (``named_parameters``, tied aliases included) or a mapping.

    Usage: ``named_tensors(model, "model")["lm_head.weight"]``.
    """
    if isinstance(source, torch.nn.Module):
        return dict(source.named_parameters(remove_duplicate=False))
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise InvalidArgumentError(f"{what} must map parameter names (str) to tensors; these entries do not: "
                                       f"{listing(map(str, bad))}")
        return dict(source)
    raise InvalidArgumentError(f"{what} must be an nn.Module or a mapping name -> tensor, got {type(source).__name__}")


def describe(model: Any) -> dict[str, Any]:
    """A small JSON description of a model: its class, and its config's ``model_type`` when it has one.

    Usage: ``store.set_metadata(task, model=describe(model))``.
    """
    desc: dict[str, Any] = {"class": type(model).__name__}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str):
        desc["architecture"] = model_type
    return desc


def _one_at_a_time(weights: Mapping[str, torch.Tensor], shapes: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Each weight detached, as ``write_state`` takes it (which copies it to the CPU as fp32, one at a time)."""
    for name in shapes:
        yield name, weights[name].detach()
