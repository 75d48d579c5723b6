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

**A rank group** (``group=RankGroup.from_torch()``, data-parallel): each rank passes its own
replayable batches (its shard), and each pass is data-parallel: step ``j`` is one
:meth:`~fisherstore.collect.step_loop.StepRun.data_parallel` step of every rank's batch ``j``, each rank
summing its own squares and reducing each parameter's sum onto its owner rank, with ``T`` the
token count of the union batch. The run equals one process on the union batches (to fp32
rounding: the reduction sums in another order), the owners' group views included. What
makes it so:

* *The same steps.* Every rank must pass the same number of batches. Where every rank's
  count is known (a list, a DataLoader) the counts are compared before anything is created;
  otherwise (a callable) at every batch of pass 1, where a rank that runs out while another
  has a batch stops them all. Either way :class:`~fisherstore.errors.InvalidArgumentError`
  names each rank's count on every rank, and nothing is committed.
* *The same passes.* Each rank plans its **own** parameters (``store.owns``) into passes
  that fit **its** budget, exactly as one process would (first fit decreasing, fold
  headroom); the plans are gathered, and pass ``i`` of the run tracks every rank's pass ``i``
  (the run has as many passes as the rank that needs most). So every rank runs the same
  passes in the same order, with the same parameters requiring gradients: each needs all
  of them, since a parameter's sum is reduced from every rank's gradient. A rank's
  :class:`~fisherstore.engine.replay.Replay` and accumulators hold only what it owns. During
  a step, a rank holds one fp32 sum per parameter of the pass (every rank's share of it, on
  the parameters' device, as a data-parallel ``collect_fisher`` step does for every
  tracked parameter); the budget bounds the accumulators, not these sums.
* *Failing together.* Each rank checks its own batches against its own pass 1; every
  batch position begins with one gather in which each rank says whether it has a batch and
  whether reading or checking it failed, and every local part of the run (the plan, the
  start and end of each pass) ends in :meth:`RankGroup.agree <fisherstore.RankGroup.agree>`.
  A rank that fails raises its own error (a ``BatchesChangedError``), the others a
  :class:`~fisherstore.errors.RankFailedError` naming it and its error; every rank rolls
  back to the last commit and the group stays usable. No rank waits for one that left.
* *One commit*: the closing flush, collective as every flush under a group.

``data_parallel=False`` (every rank the same batches, each writing what it owns from its own
gradients) runs the same plan and checks. :class:`DatasetRun` is the same on every rank: its
groups are the run's passes, its state and capacity the sums over the ranks.
``fisher_type="mc"`` draws per rank, task, step and micro-batch, so every pass draws the
same labels on each rank, and the run equals its data-parallel ``collect_fisher`` steps
(not one process: that would draw other labels).

Usage::

    fc = FisherCollector(backend="zarr", path="fisher.zarr", params="all", memory_budget=4 << 30)
    run = fc.collect_fisher_dataset(model, probe_batches, task="math")   # a list, DataLoader or callable
    run.passes, run.bound        # passes made, and ⌈S/B⌉

    # every rank of a torch.distributed job, each with its own shard of the probe set:
    fc = FisherCollector(backend="zarr", path="fisher.zarr", params="all", memory_budget=4 << 30,
                         group=fisherstore.RankGroup.from_torch())
    run = fc.collect_fisher_dataset(model, this_ranks_batches, task="math")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..engine.dist import RankGroup
from ..engine.replay import Replay
from ..errors import BatchesChangedError, InvalidArgumentError, RankFailedError
from ..spec.layout import ParamLayout
from .batches import changed_keys, fingerprint, take_rows
from .step_loop import Collecting, StepRun

__all__ = ["DatasetRun", "plan_passes", "fold_headroom", "collect_dataset", "Replayable"]


class MultiPassCollector(Collecting, Protocol):
    """What a multi-pass run needs of its collector (:class:`~fisherstore.FisherCollector`): a step's loop,
    plus checking its layouts, preparing a task, running one step, and the group view it restores when a run fails."""

    def prepare(self, model: nn.Module, task: str, *, check_loss: bool = True) -> tuple[list[str],
                                                                                   dict[str, ParamLayout]]: ...

    def run_step(self, model: nn.Module, batch: Any, task: str, order: list[str],
                 layouts: dict[str, ParamLayout]) -> int: ...

    def check_layouts(self, model: nn.Module, batch: Any) -> Any: ...

    def snapshot_groups(self, task: str) -> Any: ...

    def restore_groups(self, task: str, snapshot: Any) -> None: ...


@dataclass
class DatasetRun:
    """What a multi-pass run did. ``bound`` is ⌈S/B⌉ for the state S and the capacity B it had.

    In a rank group it is the same on every rank: ``groups`` and ``streamed`` name every rank's
    parameters, ``state_bytes`` and ``capacity_bytes`` are sums over the ranks, ``tokens`` the
    union batches' (the timings are this rank's). Usage: ``run.passes, run.bound, run.tokens``.
    """

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
                    progress: bool | None = None, check_layouts: bool = False) -> DatasetRun:
    """The body of :meth:`FisherCollector.collect_fisher_dataset` (see the module docstring).

    ``check_layouts``: first check the collector's ``layouts=`` overrides on the first batch
    (every rank its own, agreed before anything is created).
    Usage: ``run = collect_dataset(fc, model, batches, "math")``.
    """
    group, store = fc.group, fc.store
    source = _open_batches(fc, model, batches, task, check_layouts)
    order, layouts = fc.prepare(model, task)
    store.flush()  # the run starts at a commit, and an interrupted run leaves the store there
    owned = [n for n in order if store.owns(task, n)]
    device = dict(model.named_parameters())[order[0]].device
    groups_before = fc.snapshot_groups(task)
    replay: Replay | None = None
    try:
        err: BaseException | None = None
        mine: Any = None
        try:  # local: every rank reaches the agreement below, or the others would wait on it
            replay = store.replay(task, owned, in_place=store.nonfinite == "raise")
            mine = _plan_rank(fc, model, source, task, order, layouts, replay, owned, device)
        except Exception as e:
            err = e
        err = group.agree(err, f"plan the passes of the multi-pass run of task {task!r}")
        if err is not None:
            raise err
        assert replay is not None
        run, where = _plan_group(group, order, mine)
        _run_passes(fc, model, source, task, layouts, replay, run, where, set(owned), device, progress)
        _together(group, f"end the multi-pass run of task {task!r}", replay.finish)
    except BaseException:
        if replay is not None:
            replay.abort()
        fc.restore_groups(task, groups_before)
        raise
    start = time.perf_counter()
    store.flush()  # the run's one commit (collective under a group)
    run.write_seconds += time.perf_counter() - start
    return run


def _open_batches(fc: MultiPassCollector, model: nn.Module, batches: Any, task: str,
                  check_layouts: bool) -> Replayable:
    """The run's batches, checked on every rank together: replayable, the layouts, the same count everywhere."""
    group = fc.group
    source: Replayable | None = None
    err: BaseException | None = None
    has_first = None
    try:
        source = Replayable(batches)
        if check_layouts:  # a replayable set gives its first batch again in the run
            first = next(iter(source), None)
            has_first = first is not None
            if first is not None:
                fc.check_layouts(model, first)
    except Exception as e:
        err = e
    err = group.agree(err, f"open the batches of the multi-pass run of task {task!r}")
    if err is not None:
        raise err
    assert source is not None
    views = group.all_gather((source.length, has_first))
    lengths = [v[0] for v in views]
    if None not in lengths and len(set(lengths)) > 1:
        raise _count_error(task, "", {r: n for r, n in enumerate(lengths)})
    if any(v[1] is True for v in views) and any(v[1] is False for v in views):
        raise _count_error(task, "", {r: "some" if v[1] else 0 for r, v in enumerate(views)})
    return source


def _count_error(task: str, where: str, counts: dict[int, Any]) -> InvalidArgumentError:
    """Ranks that pass different numbers of batches: the same words on every rank."""
    per_rank = ", ".join(f"rank {r}: {n}" for r, n in counts.items())
    return InvalidArgumentError(
        f"the ranks passed different numbers of batches to the multi-pass run of task {task!r}{where} ({per_rank}); "
        "with a rank group, step j is one data-parallel step of every rank's batch j, so every rank must pass "
        "the same number of batches. Give each rank an equal share (a DistributedSampler and a DataLoader with "
        "drop_last=True, or trim each rank's list to the shortest); nothing was committed"
    )


def _plan_rank(fc: MultiPassCollector, model: nn.Module, source: Replayable, task: str, order: list[str],
               layouts: dict[str, Any], replay: Replay, owned: list[str],
               device: torch.device) -> tuple[list[list[str]], dict[str, str], list[str], int, int]:
    """This rank's own plan: its parameters into passes that fit its budget (passes, placement, streamed, S, B)."""
    host, dev = replay.capacity(device)
    if device.type == "cuda" and fc.store.device_budget is None:
        dev = max(0, dev - _activation_bytes(fc, model, source, task, order, layouts))
    sizes = [(n, replay.copies * replay.t.params[n].nbytes) for n in owned]
    passes, where, streamed = plan_passes(sizes, host, dev, replay.chunk_bytes, replay.per_chunk)
    return passes, where, streamed, sum(s for _, s in sizes), host + dev


def _plan_group(group: RankGroup, order: list[str],
                mine: tuple[list[list[str]], dict[str, str], list[str], int, int]) -> tuple[DatasetRun, dict[str, str]]:
    """The run's passes, the same on every rank: pass ``i`` tracks every rank's own pass ``i``, in store order."""
    passes, where, streamed, state, capacity = mine
    views = group.all_gather((passes, streamed, state, capacity))  # no collective in one process
    members: list[set[str]] = [set() for _ in range(max(len(v[0]) for v in views))]
    for v in views:
        for i, names in enumerate(v[0]):
            members[i].update(names)
    late = {n for v in views for n in v[1]}
    groups = [[n for n in order if n in m] for m in members]
    run = DatasetRun(len(groups), groups, [n for n in order if n in late], 0, 0, sum(v[2] for v in views),
                     sum(v[3] for v in views))
    return run, where


def _together(group: RankGroup, what: str, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)``, a local part of the run, then agree: a rank that failed stops every rank."""
    err: BaseException | None = None
    try:
        fn(*args)
    except Exception as e:
        err = e
    err = group.agree(err, what)
    if err is not None:
        raise err


_END = object()  # no batch left


def _run_passes(fc: MultiPassCollector, model: nn.Module, source: Replayable, task: str, layouts: dict[str, Any],
                replay: Replay, run: DatasetRun, where: dict[str, str], owned: set[str], device: torch.device,
                progress: bool | None) -> None:
    from tqdm.auto import tqdm

    group = fc.group
    seen: list[tuple[int, list[tuple[str, str]]]] = []  # pass 1's (tokens, fingerprint) of each of this rank's batches
    total = run.passes * source.length if source.length is not None else None
    enabled = fc.store.options.progress if progress is None else progress
    with tqdm(total=total, unit="batch", desc=f"fisher {task}", leave=False,
              disable=None if enabled is None else not enabled) as bar:
        for i, names in enumerate(run.groups):
            bar.set_description(f"fisher {task}: pass {i + 1}/{run.passes}")
            start = time.perf_counter()
            mine = [n for n in names if n in owned]  # this rank's accumulators; backward runs for all of names
            _together(group, f"begin pass {i + 1} of the multi-pass run of task {task!r}",
                      replay.begin_pass, mine, where, device)
            batches: Iterator[Any] | None = None
            j = 0
            while True:
                batch: Any = _END
                fp: list[tuple[str, str]] = []
                err: BaseException | None = None
                try:  # a rank that fails here still reaches the gather below
                    if batches is None:
                        batches = iter(source)
                    batch = next(batches, _END)
                    if batch is not _END:
                        # Every value of the batch, floats included, is compared before the step runs: a
                        # changed per-token weight would give this pass's parameters another Fisher.
                        fp = fingerprint(batch)
                        if i > 0:
                            _check_same(task, i, j, seen, fp)
                    elif i > 0 and j != len(seen):
                        raise BatchesChangedError(
                            f"pass {i + 1} of the multi-pass run of task {task!r} saw {j} batches, pass 1 saw "
                            f"{len(seen)}; every pass must see the same batches")
                except Exception as e:
                    err = e
                if not _every_rank_has(group, task, i, j, err, batch is not _END):
                    break
                T = fc.run_step(model, batch, task, names, layouts)
                if i == 0:
                    seen.append((T, fp))
                    run.tokens += T
                elif T != seen[j][0]:  # T is the union batch's: every rank raises alike
                    raise BatchesChangedError(
                        f"pass {i + 1} of the multi-pass run of task {task!r} counted {T} tokens in batch {j}, pass 1 "
                        f"counted {seen[j][0]}, though the batch's values are the same; the loss's count_tokens must "
                        "depend on the batch alone"
                    )
                bar.update(1)
                j += 1
            if i == 0:
                run.steps = len(seen)
                if bar.total is None:
                    bar.total = run.passes * len(seen)
                    bar.refresh()
            fold_start = time.perf_counter()
            _together(group, f"write pass {i + 1} of the multi-pass run of task {task!r}", replay.end_pass, mine)
            run.write_seconds += time.perf_counter() - fold_start
            run.pass_seconds.append(time.perf_counter() - start)


def _every_rank_has(group: RankGroup, task: str, i: int, j: int, err: BaseException | None, has: bool) -> bool:
    """Whether every rank has batch ``j`` of pass ``i + 1`` (False: the pass is over on every rank).

    One gather per batch position (none in one process): each rank says whether it has a
    batch and whether reading or checking it failed. A rank that failed raises its own
    error, the others a RankFailedError naming it; ranks that disagree on having a batch
    raise the same InvalidArgumentError. Either way every rank raises, and rolls back.
    """
    views = group.all_gather((None if err is None else _brief(err), has))
    if err is not None:
        raise err
    failed = [(r, note) for r, (note, _) in enumerate(views) if note is not None]
    if failed:
        r, note = failed[0]
        raise RankFailedError(
            f"rank {r} failed to read batch {j} of pass {i + 1} of the multi-pass run of task {task!r} ({note}); "
            "every rank rolls the run back and the store stays at its last commit. Fix what rank "
            f"{r} raised (its own traceback says where) and rerun", rank=r)
    having = [h for _, h in views]
    if any(having) and not all(having):
        raise _count_error(task, f", found in pass 1 at batch {j}",
                           {r: f"more than {j}" if h else j for r, h in enumerate(having)})
    return all(having)


def _brief(err: BaseException) -> str:
    """One line for the other ranks: the error's type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:500]}" if lines else type(err).__name__


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
