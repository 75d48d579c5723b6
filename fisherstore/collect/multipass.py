"""Multi-pass collection: a replayable set of batches, when the state is larger than the budget.

Streaming a state S larger than the budget B re-reads and rewrites ``S - B`` bytes per
batch: minutes per batch for a 7B model on any disk (docs/design.md, "Collection cost"). Over a replayable set of
batches (a probe set) there is a better way: split the tracked parameters into sets
that fit, and make one pass over the batches per set, with only that set requiring
gradients. That is ⌈S/B⌉ forward/backward passes per batch plus **one** write of the
state, and it is exact: every pass sees the same steps, so each parameter's EMA, the
task's step and its token count end as one pass with a budget large enough for all of
them would leave them (bit for bit on the CPU, where the kernels are deterministic).

**Interruption.** A run is atomic. It starts by flushing (so the store is at a commit),
writes each pass's state as uncommitted generations at the end of the pass, and commits
once, at its end. An exception (or Ctrl-C) rolls the store object back to that commit and
deletes what the run wrote; a killed process leaves uncommitted generations, which the
next writer's recovery deletes. Either way the store is at its last commit, and a rerun
starts over. (Resuming a run would commit tasks whose parameters sit at different
steps, which no reader could tell from a finished one.)

**Same batches.** Exactness needs every pass to see the same batches, so each batch of a
later pass is compared, before its step runs, with the same position of pass 1: every
value (a digest of each tensor's dtype, shape and bytes, floats included, and of nested
containers, strings and numbers: :func:`~fisherstore.collect.batches.fingerprint`). A
difference raises :class:`~fisherstore.errors.BatchesChangedError` naming the batch and
the keys that changed, and the run rolls back.

Usage::

    fc = FisherCollector(backend="zarr", path="fisher.zarr", params="all", memory_budget=4 << 30)
    run = fc.collect_fisher_dataset(model, probe_batches, task="math")   # a list, DataLoader or callable
    run.passes, run.bound        # passes made, and ⌈S/B⌉
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..engine.replay import Replay
from ..errors import BatchesChangedError, InvalidArgumentError
from ..spec.layout import ParamLayout
from .batches import changed_keys, fingerprint, take_rows
from .step_loop import Collecting, StepRun

__all__ = ["DatasetRun", "plan_passes", "fold_headroom", "collect_dataset", "Replayable"]


class MultiPassCollector(Collecting, Protocol):
    """What a multi-pass run needs of its collector (:class:`~fisherstore.FisherCollector`): a step's loop,
    plus preparing a task, running one step, and the group view it restores when a run fails."""

    def prepare(self, model: nn.Module, task: str, *, check_loss: bool = True) -> tuple[list[str],
                                                                                   dict[str, ParamLayout]]: ...

    def run_step(self, model: nn.Module, batch: Any, task: str, order: list[str],
                 layouts: dict[str, ParamLayout]) -> int: ...

    def snapshot_groups(self, task: str) -> Any: ...

    def restore_groups(self, task: str, snapshot: Any) -> None: ...


@dataclass
class DatasetRun:
    """What a multi-pass run did. ``bound`` is ⌈S/B⌉ for the state S and the capacity B it had."""

    passes: int
    groups: list[list[str]]  # the parameters each pass tracks (requires grad for)
    streamed: list[str]  # too large for the budget alone: read-modify-written every step
    steps: int
    tokens: int
    state_bytes: int
    capacity_bytes: int
    pass_seconds: list[float] = field(default_factory=list)
    write_seconds: float = 0.0

    @property
    def bound(self) -> int:
        return max(1, math.ceil(self.state_bytes / max(1, self.capacity_bytes)))


def fold_headroom(items: list[tuple[int, int]], per_chunk: int) -> int:
    """Host bytes a pass's end-of-pass fold needs beyond its accumulators: ``items`` are its host (bytes, chunk bytes).

    The fold writes the accumulators in ascending order of chunk size, one parameter at a time,
    each freed once written (:meth:`fisherstore.engine.generations.WritePath.fold`): while
    parameter ``m`` is written, ``per_chunk × c_m`` bytes of I/O buffers are held and the
    accumulators before it are gone. So the headroom is ``max_m(per_chunk·c_m − Σ_{j<m} n_j)``:
    a chunk of the smallest parameters where a pass has several, instead of ``per_chunk`` of
    the largest chunk for every pass.
    """
    need, freed = 0, 0
    for n, chunk in sorted(items, key=lambda it: it[1]):
        need = max(need, per_chunk * chunk - freed)
        freed += n
    return need


def plan_passes(sizes: list[tuple[str, int]], host: int, device: int, chunks: dict[str, int] | None = None,
                per_chunk: int = 0) -> tuple[list[list[str]], dict[str, str], list[str]]:
    """Pack parameters (name, accumulator bytes) into passes of ``device`` + ``host`` bytes, first fit decreasing.

    With ``chunks`` (name -> bytes of its chunk) and ``per_chunk`` (chunk buffers the fold holds
    per parameter in flight), a host side must also leave :func:`fold_headroom`.
    Returns the parameters of each pass (each in the given order), where each name goes (``"device"`` or
    ``"host"``) and the names too large for either alone, which join the last pass streamed.
    """
    chunk_of = chunks or {}

    def host_fits(b: list[Any], name: str, cost: int) -> bool:
        if cost > b[1]:
            return False
        if not per_chunk:
            return True
        items = [(c, chunk_of.get(n, 0)) for n, c in b[3]] + [(cost, chunk_of.get(name, 0))]
        return sum(c for c, _ in items) + fold_headroom(items, per_chunk) <= host

    bins: list[list[Any]] = []  # [device left, host left, names, host items]
    where: dict[str, str] = {}
    oversized = []
    for name, cost in sorted(sizes, key=lambda s: -s[1]):
        if cost > device and not host_fits([device, host, [], []], name, cost):
            oversized.append(name)
            continue
        for b in bins:
            if cost <= b[0] or host_fits(b, name, cost):
                break
        else:
            b = [device, host, [], []]
            bins.append(b)
        side = 0 if cost <= b[0] else 1
        b[side] -= cost
        b[2].append(name)
        if side:
            b[3].append((name, cost))
        where[name] = ("device", "host")[side]
    order = {name: i for i, (name, _) in enumerate(sizes)}
    passes = sorted((sorted(b[2], key=order.__getitem__) for b in bins), key=lambda g: order[g[0]])
    if oversized:
        if not passes:
            passes.append([])
        passes[-1] = sorted(passes[-1] + oversized, key=order.__getitem__)
    return passes, where, sorted(oversized, key=order.__getitem__)


class Replayable:
    """Batches that can be iterated once per pass, in the same order every time."""

    def __init__(self, batches: Any) -> None:
        from torch.utils.data import DataLoader, RandomSampler

        if isinstance(batches, DataLoader):
            samplers = (batches.sampler, getattr(batches.batch_sampler, "sampler", None))
            if any(isinstance(s, RandomSampler) for s in samplers):
                raise InvalidArgumentError(
                    "the DataLoader shuffles (shuffle=True), so every pass would see the batches in another order "
                    "and the passes would not see the same steps; pass DataLoader(..., shuffle=False), or a "
                    "callable that returns the same batches each time"
                )
            self._make: Callable[[], Iterable[Any]] = lambda: batches
        elif isinstance(batches, (list, tuple)):
            self._make = lambda: batches
        elif callable(batches):
            self._make = batches
        elif isinstance(batches, Iterator):
            raise InvalidArgumentError(
                f"batches is an iterator ({type(batches).__name__}), which can be read once; a multi-pass run reads "
                "the batches once per pass. Pass a list, a DataLoader with a fixed order, or a callable that "
                "returns a new iterator of the same batches"
            )
        elif isinstance(batches, Iterable):
            self._make = lambda: batches
        else:
            raise InvalidArgumentError(f"batches must be a list, a DataLoader or a callable returning an iterator of "
                                       f"batches, got {type(batches).__name__}")
        self.length = len(batches) if hasattr(batches, "__len__") and not callable(batches) else None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._make())


def collect_dataset(fc: MultiPassCollector, model: nn.Module, batches: Any, task: str, *,
                    progress: bool | None = None) -> DatasetRun:
    """The body of :meth:`FisherCollector.collect_fisher_dataset` (see the module docstring)."""
    source = Replayable(batches)
    if fc.group.world_size > 1:
        raise InvalidArgumentError(
            "collect_fisher_dataset runs in one process; with a rank group call collect_fisher per batch "
            "(each rank its own batches), or run the multi-pass collection on one rank"
        )
    store = fc.store
    order, layouts = fc.prepare(model, task)
    store.flush()  # the run starts at a commit, and an interrupted run leaves the store there
    device = dict(model.named_parameters())[order[0]].device
    replay = store.replay(task, order, in_place=store.nonfinite == "raise")
    t = replay.t
    groups_before = fc.snapshot_groups(task)
    try:
        host, dev = replay.capacity(device)
        if device.type == "cuda" and store.device_budget is None:
            dev = max(0, dev - _activation_bytes(fc, model, source, task, order, layouts))
        sizes = [(n, replay.copies * t.params[n].nbytes) for n in order]
        passes, where, streamed = plan_passes(sizes, host, dev, replay.chunk_bytes, replay.per_chunk)
        run = DatasetRun(len(passes), passes, streamed, 0, 0, sum(s for _, s in sizes), host + dev)
        _run_passes(fc, model, source, task, layouts, replay, run, where, device, progress)
        replay.finish()
    except BaseException:
        replay.abort()
        fc.restore_groups(task, groups_before)
        raise
    start = time.perf_counter()
    store.flush()  # the run's one commit
    run.write_seconds += time.perf_counter() - start
    return run


def _run_passes(fc: MultiPassCollector, model: nn.Module, source: Replayable, task: str, layouts: dict[str, Any],
                replay: Replay, run: DatasetRun, where: dict[str, str], device: torch.device,
                progress: bool | None) -> None:
    from tqdm.auto import tqdm

    seen: list[tuple[int, list[tuple[str, str]]]] = []  # pass 1's (tokens, fingerprint) of each batch
    total = run.passes * source.length if source.length is not None else None
    enabled = fc.store.options.progress if progress is None else progress
    with tqdm(total=total, unit="batch", desc=f"fisher {task}", leave=False,
              disable=None if enabled is None else not enabled) as bar:
        for i, names in enumerate(run.groups):
            bar.set_description(f"fisher {task}: pass {i + 1}/{run.passes}")
            start = time.perf_counter()
            replay.begin_pass(names, where, device)
            j = -1
            for j, batch in enumerate(source):
                # Every value of the batch, floats included, is compared before the step runs: a
                # changed per-token weight would give this pass's parameters another Fisher.
                fp = fingerprint(batch)
                if i > 0:
                    _check_same(task, i, j, seen, fp)
                T = fc.run_step(model, batch, task, names, layouts)
                if i == 0:
                    seen.append((T, fp))
                    run.tokens += T
                elif T != seen[j][0]:
                    raise BatchesChangedError(
                        f"pass {i + 1} of the multi-pass run of task {task!r} counted {T} tokens in batch {j}, pass 1 "
                        f"counted {seen[j][0]}, though the batch's values are the same; the loss's count_tokens must "
                        "depend on the batch alone"
                    )
                bar.update(1)
            if j + 1 != len(seen):
                raise BatchesChangedError(f"pass {i + 1} of the multi-pass run of task {task!r} saw {j + 1} batches, "
                                          f"pass 1 saw {len(seen)}; every pass must see the same batches")
            if i == 0:
                run.steps = len(seen)
                if bar.total is None:
                    bar.total = run.passes * len(seen)
                    bar.refresh()
            fold_start = time.perf_counter()
            replay.end_pass(names)
            run.write_seconds += time.perf_counter() - fold_start
            run.pass_seconds.append(time.perf_counter() - start)


def _check_same(task: str, i: int, j: int, seen: list[tuple[int, list[tuple[str, str]]]],
                fp: list[tuple[str, str]]) -> None:
    """Refuse batch ``j`` of pass ``i + 1`` unless it is, value for value, batch ``j`` of pass 1."""
    if j >= len(seen):
        raise BatchesChangedError(
            f"pass {i + 1} of the multi-pass run of task {task!r} saw more batches than pass 1 ({len(seen)}); every "
            "pass must see the same batches. Pass a list, a DataLoader with shuffle=False, or a callable that "
            "returns the same batches"
        )
    keys = changed_keys(seen[j][1], fp)
    if keys:
        raise BatchesChangedError(
            f"pass {i + 1} of the multi-pass run of task {task!r} saw another batch at position {j} than pass 1: "
            f"the values of {', '.join(repr(k) for k in keys)} changed; every pass must see the same batches, "
            "value for value, in the same order, or the parameters of different passes would see different data. "
            "Pass a list, a DataLoader with shuffle=False and deterministic transforms, or a callable that returns "
            "the same batches"
        )


def _activation_bytes(fc: MultiPassCollector, model: nn.Module, source: Replayable, task: str, order: list[str],
                      layouts: dict[str, Any]) -> int:
    """Device memory a forward/backward of one micro-batch takes (CUDA only): what the passes must leave free."""
    first = next(iter(source), None)
    if first is None:
        return 0
    dev = dict(model.named_parameters())[order[0]].device
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    probe = StepRun(fc, model, task, order, layouts)
    probe.backward(take_rows(first, slice(0, fc.micro_batch_size)), set(), lambda *a: None)  # gradients dropped
    return max(0, torch.cuda.max_memory_allocated(dev) - before)
