"""TensorScope's group view: a full tensor reduced to one value per head, channel or entry.

The reduction is **one reshape and one sum per parameter** (:func:`group_vector`), whatever
the number of heads, and the result of a step stays on the gradients' device until the
step is over: :class:`GroupSums` sums each micro-batch's vectors there and moves all of
them to the host in one transfer per step (one kernel per head and a ``.cpu()`` per
vector inside backward hooks made the GPU wait).

Usage::

    >>> import torch
    >>> from fisherstore import ParamLayout
    >>> lay = ParamLayout.attention("k", num_heads=4, num_kv_heads=2, head_dim=3)
    >>> group_reduce(torch.ones(6, 5), lay)["head"]
    tensor([15., 15.])
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ..errors import UnknownParamError, UnknownTaskError, close_matches, listing
from ..spec.ema import accumulate_, readout_scale, step_weight
from ..spec.layout import ParamLayout
from .tracking import stored_decays

__all__ = ["group_reduce", "group_vector", "split_groups", "GroupSums", "GroupView", "update_group_emas",
           "rebuild_group_emas"]


def group_vector(x: torch.Tensor, layout: ParamLayout | None) -> torch.Tensor:
    """The group sums of ``x`` as one new vector, on ``x``'s device, in one reduction.

    Head layouts give one sum per head block, in the order the tensor stores them
    (:meth:`ParamLayout.segments`: for a block-fused QKV the Q heads, then K, then V; for
    an interleaved or grouped one, repeat by repeat); :func:`split_groups` names them.
    2-D tensors without heads give row sums; anything else is copied whole.
    """
    if layout is not None and layout.has_heads:
        ax, u = layout.head_axis, layout.head_chunk()
        n = x.shape[ax] // u
        if x.ndim == 1:
            v = x.view(n, u).sum(1)
        elif x.ndim == 2 and ax == 0:
            v = x.view(n, -1).sum(1)
        elif x.ndim == 2:
            v = x.view(x.shape[0], n, u).sum((0, 2))
        else:
            v = x.movedim(ax, 0).reshape(n, -1).sum(1)
        return _units_to_blocks(v, layout, u)
    if x.ndim == 2:
        return x.sum(dim=1)
    return x.clone()


def _units_to_blocks(v: torch.Tensor, layout: ParamLayout, unit: int) -> torch.Tensor:
    """Per-chunk-unit sums -> per-head-block sums, still in storage order.

    A no-op when every block is one unit long (all layouts but MLA's ``kv_b_proj``, whose K
    and V heads differ in size and so span several gcd-sized units each). Reshapes and
    sums only, no index tensor: this runs inside backward hooks, where building one would
    copy from the host.
    """
    repeats, parts = layout.pattern()
    if all(dim == unit for _, _, dim in parts):
        return v
    per = v.view(repeats, -1)
    out, at = [], 0
    for _, n, dim in parts:
        k = dim // unit
        out.append(per[:, at:at + n * k].reshape(repeats, n, k).sum(2))
        at += n * k
    return torch.cat(out, dim=1).reshape(-1)


def split_groups(v: torch.Tensor, layout: ParamLayout | None, ndim: int) -> dict[str, torch.Tensor]:
    """Name the parts of a :func:`group_vector`: ``"head"`` (``"head_q"``/``"head_k"``/``"head_v"`` for a fused
    QKV, ``"head_k"``/``"head_v"`` for a fused KV), ``"channel"``, ``"token"`` (embeddings), ``"bias"``, ``"row"``
    or ``"param"``.

    K and V count each GQA key/value head once, in key/value-head order, whatever order
    the fused tensor stores them in.
    """
    if layout is not None and layout.has_heads:
        if len(layout.blocks) == 1:
            return {"head": v}
        repeats, parts = layout.pattern()
        per = v.view(repeats, -1)  # one row per repeat: each part's heads side by side
        at, cols = 0, {}
        for b, n, _ in parts:
            cols[b] = per[:, at:at + n].reshape(-1)  # repeat-major: the block's heads in order
            at += n
        return {f"head_{b.lower()}": cols[b] for b in layout.blocks}
    kind = layout.kind if layout is not None else "other"
    if ndim == 2:
        return {"token" if kind == "embedding" else "channel": v}
    if ndim == 1:
        return {"bias" if kind == "bias" else "row": v}
    return {"param": v}


def group_reduce(x: torch.Tensor, layout: ParamLayout | None) -> dict[str, torch.Tensor]:
    """Reduce a full (squared-gradient or Fisher) tensor to TensorScope's group vectors.

    Attention parameters give one value per head block (``"head"``; a fused QKV gives
    ``"head_q"``, ``"head_k"``, ``"head_v"``, a fused KV ``"head_k"``, ``"head_v"``),
    counting each GQA key/value head once.
    2-D tensors without heads give ``"channel"`` (sum per row), embeddings ``"token"``,
    1-D tensors their full vector (``"bias"`` or ``"row"``), anything else ``"param"``.
    """
    return split_groups(group_vector(x, layout), layout, x.ndim)


class GroupSums:
    """One step's group vectors, summed over micro-batches on their device; to the host once.

    Usage: ``sums.add(name, x)`` per micro-batch (in a backward hook: no sync), then
    ``sums.to_host()`` after backward: ``{name: {group type: cpu vector}}``.
    """

    def __init__(self, layouts: dict[str, ParamLayout]) -> None:
        self.layouts = layouts
        self._sums: dict[str, torch.Tensor] = {}
        self._ndim: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        v = group_vector(x, self.layouts.get(name))
        if name in self._sums:
            self._sums[name].add_(v)
        else:
            self._sums[name] = v
            self._ndim[name] = x.ndim

    def to_host(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every vector of the step on the CPU: one concatenation and one transfer per device."""
        by_device: dict[torch.device, list[str]] = {}
        for name, v in self._sums.items():
            by_device.setdefault(v.device, []).append(name)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for names in by_device.values():
            flat = torch.cat([self._sums[n].reshape(-1) for n in names]).cpu()
            at = 0
            for n in names:
                v = self._sums[n]
                part = flat[at:at + v.numel()].view(v.shape)
                at += v.numel()
                out[n] = split_groups(part, self.layouts.get(n), self._ndim[n])
        self._sums.clear()
        return out


def update_group_emas(groups: dict[str, list[Any]], task: str, increments: dict[str, dict[str, torch.Tensor]], T: int,
                      t: int, decay_of: Callable[[str], float]) -> None:
    """One step of the group view's EMAs ``{"task|param|group": [raw EMA, t_last, β]}``, as the store's."""
    for name, per_type in increments.items():
        beta = decay_of(name)
        w = step_weight(beta, T)
        for gt, v in per_type.items():
            key = f"{task}|{name}|{gt}"
            entry = groups.get(key)
            if entry is None:
                groups[key] = [v * w, t, beta]
            else:
                accumulate_(entry[0], v * w, beta, t - entry[1])
                entry[1] = t


def rebuild_group_emas(store: Any, task: str) -> dict[str, list[Any]]:
    """A task's group EMAs rebuilt by reducing the stored tensors this rank owns (after a reopen)."""
    groups: dict[str, list[Any]] = {}
    if task not in store.tasks():
        return groups
    t = store.step(task)
    for name in store.params(task):
        # Only what this rank writes: another rank's parameters would never be updated
        # here, and would read back as if they had had no gradient since the reopen.
        if not store.owns(task, name):
            continue
        beta = store.param(task, name).decay
        raw = store.fisher(task, name, bias_corrected=False).load()
        for gt, v in group_reduce(raw, store.layout(task, name)).items():
            groups[f"{task}|{name}|{gt}"] = [v, t, beta]
    return groups


class GroupView:
    """TensorScope's group view of a :class:`~fisherstore.FisherCollector`: tiny EMAs in RAM, one per group vector.

    A mixin of the collector: it needs the collector's ``store``, ``reduction`` and
    ``ema_decay``, and keeps its group EMAs in ``self._groups``. Usage:
    ``fc.get_group_fisher("math", name, "head")``.
    """

    store: Any
    reduction: str
    ema_decay: float
    _groups: dict[str, dict[str, list[Any]]]  # {task: {"task|param|group": [raw EMA, t_last, β]}}
    _decay_warned: set[str]

    def record_groups(self, task: str, increments: dict[str, dict[str, torch.Tensor]], T: int) -> None:
        """Add one step's group vectors (``{param: {group type: vector}}``, token count ``T``) to the group view.

        Call it after the step was applied to the store (its step number is the view's).
        """
        if self.reduction != "group":
            # No group increments are kept: a view read before this step would go stale, so
            # the next read rebuilds it from the store.
            self._groups.pop(task, None)
            return
        update_group_emas(self._groups[task], task, increments, T, self.store.step(task),
                          lambda name: self.store.param(task, name).decay)  # the stored β, as the store's tensor

    def snapshot_groups(self, task: str) -> Any:
        """A copy of ``task``'s group view, for :meth:`restore_groups` when a run that changed it fails."""
        return copy.deepcopy(self._groups.get(task))

    def restore_groups(self, task: str, snapshot: Any) -> None:
        """Put ``task``'s group view back as :meth:`snapshot_groups` found it."""
        if snapshot is None:
            self._groups.pop(task, None)
        else:
            self._groups[task] = snapshot

    def _stored_decays(self, task: str) -> list[float]:
        """The distinct stored β of ``task`` (warns once per task when they are not ``ema_decay``)."""
        return stored_decays(self.store, task, self.ema_decay, self._decay_warned)

    def _task_groups(self, task: str) -> dict[str, list[Any]]:
        """This task's group EMAs; after a reopen, rebuilt by reducing the stored tensors this rank owns."""
        if task in self._groups:
            return self._groups[task]
        if task in self.store.tasks():
            self._stored_decays(task)
        groups = rebuild_group_emas(self.store, task)
        self._groups[task] = groups
        return groups

    @property
    def fisher_ema(self) -> dict[str, torch.Tensor]:
        """Group-reduced raw EMA values at each task's current step, keyed ``task|param|group``."""
        out = {}
        for task in self.store.tasks():
            t = self.store.step(task)
            for key, (v, t_last, beta) in self._task_groups(task).items():
                out[key] = v * readout_scale(beta, t, t_last, False)
        return out

    def get_group_fisher(
        self, task: str, param_name: str | None = None, group_type: str | None = None, bias_corrected: bool = True
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """Group vectors of ``task``: a dict keyed ``task|param|group``, or the tensor when one key matches.

        ``param_name`` and ``group_type`` match exactly (``"head"`` does not match
        ``"head_q"``). The per-head value equals the sum of the stored full head block,
        read with the task's stored β. In a rank group it holds the parameters this rank owns.
        """
        if task not in self.store.tasks():
            raise UnknownTaskError(
                f"unknown task {task!r}; collected tasks: {listing(self.store.tasks())}."
                + close_matches(task, self.store.tasks())
            )
        if param_name is not None and param_name not in self.store.params(task):
            raise UnknownParamError(
                f"parameter {param_name!r} is not tracked for task {task!r}." + close_matches(param_name, self.store.params(task))
            )
        t = self.store.step(task)
        out = {}
        for key, (v, t_last, beta) in self._task_groups(task).items():
            _, name, gt = key.split("|")
            if (param_name is None or name == param_name) and (group_type is None or gt == group_type):
                out[key] = v * readout_scale(beta, t, t_last, bias_corrected)
        if len(out) == 1:
            return next(iter(out.values()))
        return out
