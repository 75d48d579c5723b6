"""The resident side of one EMA step: how each resident parameter's accumulator takes the step.

A step must be applied whole or not at all (a NaN in the last parameter discards the
first). For each resident parameter a step feeds, :class:`Fills` therefore **holds** the
step's input until the step is judged, then folds it into the accumulator in place
(``acc = β^Δ·acc + α·Σx``, :meth:`Fills.apply`). What it holds is the squared gradient
the caller donates (the collector's square of the gradient autograd just produced, which
a plain backward would hold as ``.grad`` anyway), with later micro-batches of the step
summed into it; a caller that does not donate pays one copy. So a resident parameter
costs one buffer of the budget, not two: the twin that an earlier design filled and
swapped in held half of every budget.

The exception is a CUDA input bound for an accumulator in host memory. Its crossing
overlaps backward, piece by piece, so it fills a **twin** (swapped in when the step is
applied), or while a multi-pass run replays the task, the accumulator itself:

* summed on the device over the step's micro-batches where the sums fit (one crossing of
  PCIe per step, started by the last micro-batch), else each one, copied on a side stream
  and added by the stager's host thread as its piece lands
  (:class:`~fisherstore.engine.staging.DeviceStager`);
* CUDA inputs the caller keeps: copied on the caller's stream, added when the step settles.

Usage (from :class:`~fisherstore.engine.step.StepWriter`)::

    fills = Fills(path, task_state, t)
    fills.add(p, region, x, alpha, donate=True, final=False, trusted=True)
    fills.complete(checks)       # at settle: sends, waits, watches what the step holds
    fills.apply()                # the step is judged good: fold it into the accumulators
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ...spec.ema import decay_factor
from ...spec.regions import (
    Region,
    axis_chunk_count,
    chunk_run,
    chunk_span,
    full_region,
    offset_region,
    origin,
    runs,
    split_axis,
)
from ..catalog import ParamState, TaskState
from ..staging import DeviceStager, HostCopy
from .checks import StepChecks

if TYPE_CHECKING:
    from ..generations import WritePath

__all__ = ["Fills"]


@dataclass
class _Fill:
    """A resident parameter's share of this step: held until judged, or filled in a twin (or in place).

    Held (``target`` None): ``held`` is Σx over the step, on the accumulator's device
    (``device``); :meth:`Fills.apply` folds ``acc = β^Δ·acc + α·held``. Twin: ``target[c] =
    β^Δ·acc[c] + Σ (1-β)/T·x`` for each chunk ``c`` the step feeds; the rest is decayed when
    the step settles.
    """

    target: torch.Tensor | None
    covered: np.ndarray  # chunks along the split axis already in `target`
    factor: float  # β^(t - a_last); 0 when the accumulator holds nothing yet
    device: torch.device = torch.device("cpu")  # where the accumulator lives (or will)
    held: torch.Tensor | None = None  # the step's Σx, ours, folded when the step is applied
    held_alpha: float = 0.0
    host: list[tuple[Region, HostCopy, float]] = field(default_factory=list)  # device inputs copied on their stream
    pending: torch.Tensor | None = None  # this step's micro-batches summed on their device, not yet sent
    pending_alpha: float = 0.0
    trusted: bool = False  # some input was a square computed by the caller: check the total at settle


class Fills:
    """The targets of one step's resident parameters (see the module docstring)."""

    def __init__(self, path: WritePath, task: TaskState, t: int) -> None:
        self.path, self.task_state, self.task, self.t = path, task, task.name, t
        self.by_name: dict[str, _Fill] = {}
        self.stagers: set[DeviceStager] = set()

    def add(self, p: ParamState, region: Region, x: torch.Tensor, alpha: float, *, donate: bool, final: bool,
            trusted: bool) -> None:
        fill = self._fill(p, x.device)
        fill.trusted = fill.trusted or trusted
        if fill.target is None:
            self._hold(p, fill, region, x, alpha, donate)
        elif self.path.stages(x, fill.target):
            self._to_host(p, fill, region, x, alpha, donate, final)
        else:  # a replay's accumulator on another device than a non-CUDA input: copied here
            self._accumulate(p, fill, region, x.to(fill.target.device), alpha)

    def _fill(self, p: ParamState, device: torch.device) -> _Fill:
        fill = self.by_name.get(p.name)
        if fill is None:
            have = p.acc if p.acc is not None else p.spare
            where = have.device if have is not None else self.path.place(self.task, p, device, copies=1)
            factor = 0.0 if p.a_last is None else decay_factor(p.decay, self.t - p.a_last)
            covered = np.zeros(axis_chunk_count(p.shape, p.chunks), dtype=bool)
            target = None
            if device.type == "cuda" and where.type == "cpu":  # a crossing that overlaps backward: a twin
                if self.path.in_place and self.path.replaying == self.task:
                    if p.acc is None:
                        p.acc = torch.empty(p.shape, dtype=torch.float32, device=where)
                    target = p.acc
                else:
                    if p.spare is None:
                        p.spare = torch.empty(p.shape, dtype=torch.float32, device=where)
                    target = p.spare
            fill = self.by_name[p.name] = _Fill(target, covered, factor, where)
            if target is not None and target is p.spare:
                self._copies(p, fill, True)  # the twin is a second host buffer: reserved like a held copy
        return fill

    def needs_copy(self, p: ParamState, region: Region, x: torch.Tensor, donate: bool) -> bool:
        """Whether holding ``x`` for ``p`` would take a host buffer its residency has not reserved."""
        fill = self.by_name.get(p.name)
        if fill is not None and (fill.target is not None or fill.held is not None):
            return False  # a twin, or a held sum of ours to add into
        on_host = (p.acc.device.type == "cpu") if p.acc is not None else x.device.type == "cpu"
        return on_host and not p.held_copy and self.path.replaying != self.task and not _kept_as_is(p, region, x,
                                                                                                    donate)

    def _hold(self, p: ParamState, fill: _Fill, region: Region, x: torch.Tensor, alpha: float, donate: bool) -> None:
        """Keep ``x`` for the fold (the step's first, whole and donated input is kept as it is; no copy)."""
        moved = x.device != fill.device  # .to() made it ours
        x = x.to(fill.device)
        fill.held_alpha = alpha
        if fill.held is None:
            if _kept_as_is(p, region, x, donate or moved):
                self._copies(p, fill, False)
                fill.held = x
                return
            self._copies(p, fill, True)
            if region == full_region(p.shape):
                fill.held = x.clone()
                return
            fill.held = torch.zeros(p.shape, dtype=torch.float32, device=fill.device)
        fill.held[region].add_(x)

    def _copies(self, p: ParamState, fill: _Fill, needed: bool) -> None:
        """Keep the residency's reservation of a held copy for ``p`` in step with what its steps need.

        A multi-pass run counts its own accumulators (:mod:`fisherstore.engine.replay`), and a
        device accumulator is counted on its device: neither is in the host reservation.
        """
        if self.path.replaying == self.task or fill.device.type != "cpu":
            return
        if needed != p.held_copy:
            if needed:
                self.path.residency.take_copy(p.nbytes)
            else:
                self.path.residency.drop_copy(p.nbytes)
            p.held_copy = needed

    def undoable(self, name: str) -> bool:
        """Whether ``name``'s share of this step can still be dropped (False once added into the accumulator)."""
        fill = self.by_name.get(name)
        return fill is None or fill.target is None or fill.target is not self.task_state.params[name].acc

    def _accumulate(self, p: ParamState, fill: _Fill, region: Region, x: torch.Tensor | None, alpha: float) -> None:
        """``target = β^Δ·acc + alpha·x`` over ``region`` (``+= alpha·x`` where the step already wrote).

        ``x`` None fills ``region`` with the decayed accumulator alone.
        """
        ax = split_axis(p.shape, p.chunks)
        c0, c1 = chunk_span(region, p.chunks, ax)
        for covered, a, b in runs(fill.covered, c0, c1):
            sub = chunk_run(p.shape, p.chunks, ax, a, b)
            tgt = fill.target[sub]
            xs = None if x is None else x[offset_region(sub, origin(region, ax))]
            if not covered:
                if fill.factor == 0.0:
                    if xs is None:
                        tgt.zero_()
                    else:
                        torch.mul(xs, alpha, out=tgt)
                        continue
                elif fill.target is p.acc:  # in place: the accumulator is the target (same rounding as the twin)
                    if fill.factor != 1.0:
                        tgt.mul_(fill.factor)
                elif fill.factor == 1.0:
                    tgt.copy_(p.acc[sub])
                else:
                    torch.mul(p.acc[sub], fill.factor, out=tgt)
            if xs is not None:
                tgt.add_(xs, alpha=alpha)
        fill.covered[c0:c1] = True

    def _to_host(self, p: ParamState, fill: _Fill, region: Region, x: torch.Tensor, alpha: float, donate: bool,
                 final: bool) -> None:
        """A CUDA input for an accumulator in host memory: sum it on the device, or stage it now."""
        if region == full_region(p.shape) and self.path.may_sum(self.task, p, x.device):
            if fill.pending is None:
                fill.pending = x if donate else x.clone()
            else:
                fill.pending.add_(x)
            fill.pending_alpha = alpha
            if final:  # the step's last micro-batch: cross PCIe once, while backward goes on
                self._send(p, fill, region, fill.pending, alpha)
                fill.pending = None
            return
        if not donate:  # the caller may write to x right after: copy on its own stream, add at settle
            fill.host.append((region, HostCopy.start(x), alpha))
            return
        self._send(p, fill, region, x, alpha)

    def _send(self, p: ParamState, fill: _Fill, region: Region, x: torch.Tensor, alpha: float) -> None:
        stager = self.path.stager(x.device)
        self.stagers.add(stager)
        first = [True]

        def consume(rows: slice | None, host: torch.Tensor) -> None:  # on the stager's host thread
            if first[0]:
                self._accumulate(p, fill, region, None, 0.0)  # decay the region before the first piece lands
                first[0] = False
            view = fill.target[region]
            if rows is None:
                view.add_(host.view(view.shape), alpha=alpha)
            else:
                view[rows].add_(host, alpha=alpha)

        stager.push(x, consume)

    def complete(self, checks: StepChecks) -> None:
        """At settle: send what waits on the device, wait for the host adds, decay what the step did not feed."""
        for name, fill in self.by_name.items():
            if fill.pending is not None:  # no `final` came: send the device sums now
                p = self.task_state.params[name]
                self._send(p, fill, full_region(p.shape), fill.pending, fill.pending_alpha)
                fill.pending = None
        for stager in self.stagers:
            stager.drain()
        for name, fill in self.by_name.items():
            p = self.task_state.params[name]
            if fill.target is None:  # held: its values are judged before anything touches the accumulator
                if fill.trusted and fill.held is not None:
                    checks.watch_total(name, fill.held)
                continue
            for region, copy, alpha in fill.host:
                self._accumulate(p, fill, region, copy.get(), alpha)
            if not fill.covered.all():
                self._accumulate(p, fill, full_region(p.shape), None, 0.0)
            if fill.trusted:
                checks.watch_total(name, fill.target)

    def drop(self, name: str) -> None:
        """Forget ``name``'s target: the accumulator stays as it was (a twin), so the parameter decays lazily."""
        self.by_name.pop(name, None)

    def discard(self) -> None:
        for stager in self.stagers:
            stager.drain(quiet=True)  # no host thread may write into a dropped twin later
        self.by_name.clear()

    def apply(self) -> None:
        """The step is applied: each held input is folded into its accumulator, each filled twin swapped in."""
        for name, fill in self.by_name.items():
            p = self.task_state.params[name]
            if fill.target is None:
                _fold(p, fill)
            elif fill.target is not p.acc:
                p.acc, p.spare = fill.target, p.acc
            p.a_last = self.t


def _kept_as_is(p: ParamState, region: Region, x: torch.Tensor, ours: bool) -> bool:
    """Whether a step's first input of ``p`` is held as it is (no copy): ours, whole, fp32 and contiguous."""
    return ours and region == full_region(p.shape) and x.dtype == torch.float32 and x.is_contiguous()


def _fold(p: ParamState, fill: _Fill) -> None:
    """``acc = β^Δ·acc + α·held`` in place (the same two roundings as the twin's ``β^Δ·acc``, then ``+ α·x``)."""
    if fill.held is None:
        return
    if p.acc is None or fill.factor == 0.0:
        if p.acc is None:
            p.acc = torch.empty(p.shape, dtype=torch.float32, device=fill.device)
        torch.mul(fill.held, fill.held_alpha, out=p.acc)
    else:
        if fill.factor != 1.0:
            p.acc.mul_(fill.factor)
        p.acc.add_(fill.held, alpha=fill.held_alpha)
    fill.held = None
