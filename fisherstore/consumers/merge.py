"""Fisher-weighted model merging (Matena & Raffel, 2022), streamed one parameter at a time.

Each member ``i`` is a set of weights ``θ_i``, a Fisher ``F_i`` (a stored task's
bias-corrected readout) and a weight ``λ_i``; the merge is, elementwise,

    θ = Σ_i λ_i (F_i + ε) θ_i / Σ_i λ_i (F_i + ε)

A member is ``(model, store, task)`` (``θ_i``: the model's weights, or a mapping name ->
tensor) or ``(store, task)`` (``θ_i``: the anchor saved beside the task by
``store.save_anchor``), so a merge may run with no model in RAM at all. Only one
parameter is in RAM at a time: each member's ``F_i`` and ``θ_i`` of it, and three
accumulators; the result goes to ``into=`` (a model, overwritten in place), to ``out=``
(a callable, per parameter), or, by default, into a dict that holds the whole merged model.

Usage::

    merged = fisherstore.merge([(store, "math"), (store, "code")], into=model)
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError, ShapeMismatchError, UnknownParamError, listing
from ..progress import progress_bar
from ..store.anchor_verbs import anchor_task, named_tensors
from .ewc import check_shapes, require_fisher, shapes_of

__all__ = ["merge"]


def merge(
    members: Sequence[tuple[Any, ...]],
    *,
    weights: Sequence[float] | None = None,
    eps: float = 1e-6,
    relative: bool = True,
    names: Sequence[str] | None = None,
    into: torch.nn.Module | None = None,
    out: Callable[[str, torch.Tensor], Any] | None = None,
    progress: bool | None = None,
) -> Any:
    """Fisher-weighted average of ``members``: ``θ = Σ λ_i (F_i + ε) θ_i / Σ λ_i (F_i + ε)`` per element.

    Args:
        members: a sequence of ``(model, store, task)`` (``model``: an ``nn.Module`` or a mapping
            name -> tensor) and ``(store, task)`` (``θ_i`` = ``store.anchor(task, name)``); ``F_i``
            is ``store.read(task, name)``, the task's bias-corrected Fisher.
        weights: ``λ_i``, one per member, finite and >= 0, not all 0 (default: all 1). Only
            their ratios matter.
        eps, relative: the floor ``ε`` added to every Fisher. With ``relative=True`` (default)
            ``ε = eps × (Σ_i λ_i mean(F_i)) / Σ_i λ_i``, ``eps`` times the λ-weighted mean Fisher of
            the parameter: the merge is then unchanged when every Fisher is scaled by one
            factor, elements whose Fishers are all far below the parameter's typical value
            take the λ-weighted average ``Σ λ_i θ_i / Σ λ_i``, and elsewhere the floor moves
            the weights by a relative ``eps · mean/F``. With ``relative=False``, ``ε = eps``
            as given (Fisher values ``g²/T`` can be 1e-12 or smaller, so an absolute floor
            must be chosen against the store's scale). Where ``Σ_i λ_i (F_i + ε)`` is 0 (every
            Fisher 0 and ``ε = 0``, e.g. a parameter no member's data touched), the element
            is the λ-weighted average, the limit of the formula as ``ε → 0``.
        names: merge only these parameters (default: every parameter a member's task stores;
            each must be stored by every member's task).
        into: an ``nn.Module`` whose parameters of these names are overwritten in place
            (under ``no_grad``, cast to their dtype and device); it is returned. It may be
            one of the members: each parameter is read from every member before it is written.
        out: instead, a callable ``out(name, tensor)`` called once per parameter, for output
            that never holds the merged model (e.g. a writer of safetensors shards); the
            call then returns the list of names merged.
        progress: a progress bar (None: on a terminal; True, False).

    Returns ``into``; or the names given to ``out``; or, with neither, a dict name -> float32
    CPU tensor, which holds the whole merged model in RAM.

    The merge is computed on the CPU in float32; each ``F_i`` and ``θ_i`` of one parameter is
    read (and a model's weights copied to the CPU) when that parameter's turn comes. Every
    member's Fisher and stored anchor is read at one commit (``store.snapshot``). Before
    anything is written, every member is checked: a task with no EMA step, a parameter a
    member lacks (the error names it and the member; ``names=`` restricts the merge), and
    shapes that differ between members or from ``into`` are refused.

    Usage: ``fisherstore.merge([(model_a, store, "math"), (model_b, store, "code")], weights=[1, 2])``.
    """
    if into is not None and out is not None:
        raise InvalidArgumentError("pass into= (a model to overwrite) or out= (a callable per parameter), not both")
    if into is not None and not isinstance(into, torch.nn.Module):
        raise InvalidArgumentError(f"into must be an nn.Module, got {type(into).__name__}")
    if out is not None and not callable(out):
        raise InvalidArgumentError(f"out must be a callable out(name, tensor), got {type(out).__name__}")
    parsed = [_parse(m, i) for i, m in enumerate(_as_list(members))]
    lam = _weights(weights, len(parsed))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise InvalidArgumentError(f"eps must be a finite number >= 0, got {eps!r}")
    with contextlib.ExitStack() as stack:
        snaps = [stack.enter_context(_snapshot(store, task, theta is None)) for store, task, theta in parsed]
        sources = [_Source(snap, task, theta, i) for i, (snap, (_, task, theta)) in enumerate(zip(snaps, parsed))]
        todo = _names(sources, names)
        shapes = _check_shapes(sources, todo, into)
        target = named_tensors(into, "into") if into is not None else None
        result: dict[str, torch.Tensor] = {}
        total = sum(4 * math.prod(shapes[n]) for n in todo)
        with progress_bar(total, progress, "merge") as bar:
            for name in todo:
                merged = _merge_one(sources, lam, name, float(eps), relative)
                if target is not None:
                    with torch.no_grad():
                        target[name].copy_(merged)
                elif out is not None:
                    out(name, merged)
                else:
                    result[name] = merged
                del merged
                bar.update(4 * math.prod(shapes[name]))
    if into is not None:
        return into
    return list(todo) if out is not None else result


class _Source:
    """One member, checked: its (snapshot of the) store and task, and where its weights come from."""

    def __init__(self, snap: Any, task: str, theta: Any, index: int) -> None:
        self.snap, self.task = snap, task
        self.label = f"member {index} (task {task!r})"
        require_fisher(snap, task, "be merged")
        self.stored = anchor_task(task) if theta is None else None
        self.weights = named_tensors(theta, f"the model of {self.label}") if theta is not None else {}

    def fisher_names(self) -> list[str]:
        return self.snap.params(self.task)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.stored is not None:
            return {n: tuple(self.snap.param(self.stored, n).shape) for n in self.snap.params(self.stored)}
        return shapes_of(self.weights)

    def fisher(self, name: str) -> torch.Tensor:
        return self.snap.read(self.task, name)

    def theta(self, name: str) -> torch.Tensor:
        if self.stored is not None:
            return self.snap.read(self.stored, name, bias_corrected=False)  # θ* exactly (anchor_verbs)
        return self.weights[name].detach().to("cpu", torch.float32)


def _merge_one(sources: Sequence[_Source], lam: Sequence[float], name: str, eps: float,
               relative: bool) -> torch.Tensor:
    """One parameter: ``(Σ λ F θ + ε Σ λ θ) / (Σ λ F + ε Σ λ)``, reading one member at a time."""
    num = den = plain = None  # Σ λ F θ, Σ λ F, Σ λ θ
    total = 0.0
    for src, w in zip(sources, lam):
        if w == 0:
            continue
        f = src.fisher(name)
        theta = src.theta(name)
        if num is None:
            num, den, plain = torch.zeros_like(f), torch.zeros_like(f), torch.zeros_like(f)
        num.addcmul_(f, theta, value=w)  # never in place on f or θ: a read may share a resident buffer
        den.add_(f, alpha=w)
        plain.add_(theta, alpha=w)
        total += w
        del f, theta
    assert num is not None and den is not None and plain is not None  # some λ > 0 (_weights)
    floor = eps * float(den.sum(dtype=torch.float64)) / (den.numel() * total) if relative and den.numel() else eps
    if floor > 0:
        num.add_(plain, alpha=floor)
        den.add_(total * floor)
    empty = den == 0  # every Fisher 0 here and ε = 0: the λ-weighted average, the formula's limit ε → 0
    num.div_(den)
    if bool(empty.any()):
        num[empty] = plain[empty] / total
    return num


def _as_list(members: Any) -> list[Any]:
    if isinstance(members, (str, bytes, Mapping)) or not isinstance(members, Sequence):
        raise InvalidArgumentError("members must be a list of (model, store, task) or (store, task) tuples, got "
                                   f"{type(members).__name__}")
    if not members:
        raise InvalidArgumentError("merge needs at least one member")
    return list(members)


def _parse(member: Any, index: int) -> tuple[Any, str, Any]:
    """``(store, task, θ source or None: the stored anchor)`` of one member."""
    if isinstance(member, tuple) and len(member) == 3:
        theta, store, task = member
        if not isinstance(theta, (torch.nn.Module, Mapping)):
            raise InvalidArgumentError(f"member {index}: the first of (model, store, task) must be an nn.Module or a "
                                       f"mapping name -> tensor, got {type(theta).__name__}")
    elif isinstance(member, tuple) and len(member) == 2:
        (store, task), theta = member, None
    else:
        raise InvalidArgumentError(f"member {index} must be a tuple (model, store, task) or (store, task), got "
                                   f"{member!r}"[:300])
    if not isinstance(task, str) or not callable(getattr(store, "snapshot", None)):
        raise InvalidArgumentError(f"member {index}: expected an open FisherStore and a task name, got "
                                   f"{type(store).__name__} and {task!r}")
    if theta is None:
        store.require_anchor(task)  # names store.save_anchor when there is none
    return store, task, theta


def _snapshot(store: Any, task: str, with_anchor: bool) -> Any:
    store.metadata(task)  # an unknown task: UnknownTaskError, before any pin is taken
    return store.snapshot([task, anchor_task(task)] if with_anchor else [task])


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    lam = list(weights)
    if len(lam) != n:
        raise InvalidArgumentError(f"weights has {len(lam)} entries for {n} members; give one λ per member")
    if any(isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0 for w in lam):
        raise InvalidArgumentError(f"weights must be finite numbers >= 0, got {lam!r}")
    if sum(lam) == 0:
        raise InvalidArgumentError("weights are all 0: at least one member must have λ > 0")
    return [float(w) for w in lam]


def _names(sources: Sequence[_Source], names: Sequence[str] | None) -> list[str]:
    """The parameters to merge, each stored by every member's task (or the error names what is missing where)."""
    stored = [set(s.fisher_names()) for s in sources]
    if names is None:
        todo = list(dict.fromkeys(n for s in sources for n in s.fisher_names()))
        hint = "; pass names=[...] to merge only the parameters every member stores"
    else:
        if isinstance(names, str):
            raise InvalidArgumentError(f"names must be a list of parameter names, not the string {names!r}")
        todo = list(dict.fromkeys(names))
        hint = ""
    for s, have in zip(sources, stored):
        missing = [n for n in todo if n not in have]
        if missing:
            raise UnknownParamError(f"{s.label} stores no Fisher of {listing(missing)}{hint}")
    return todo


def _check_shapes(sources: Sequence[_Source], todo: Sequence[str],
                  into: torch.nn.Module | None) -> dict[str, tuple[int, ...]]:
    """Every member's Fisher and weights, and ``into``, agree on each parameter's shape."""
    first = sources[0]
    shapes = {n: tuple(first.snap.param(first.task, n).shape) for n in todo}
    for s in sources:
        for n in todo:
            shape = tuple(s.snap.param(s.task, n).shape)
            if shape != shapes[n]:
                raise ShapeMismatchError(f"{s.label} stores {n!r} with shape {shape}, but {first.label} with "
                                         f"{shapes[n]}: the members are not one architecture")
        what = f"the anchor of {s.label}" if s.stored is not None else f"the model of {s.label}"
        check_shapes(s.weight_shapes(), todo, shapes, what)
    if into is not None:
        check_shapes(shapes_of(named_tensors(into, "into")), todo, shapes, "the model into=")
    return shapes
