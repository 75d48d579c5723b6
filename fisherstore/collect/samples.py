"""Per-sample gradients of a model: streamed to a store one parameter at a time, or held in RAM for a few samples.

Each sample of a batch gets its own forward and backward of its token-summed loss.

* :func:`collect_samples` (``FisherCollector.collect_samples``): a post-accumulate-grad
  hook hands every tracked parameter's gradient to the store's
  :class:`~fisherstore.engine.segments.SampleBatch` the moment it is final, then frees
  it. So at most one sample's gradients exist at a time (and of those, only the
  parameters whose backward has not reached them yet), plus what the store's I/O queue
  holds: memory is bounded by the budget, not by ``n × model``.
* :func:`sample_gradients` (``FisherCollector.sample_gradients``): every sample's gradients
  in RAM (``n × Σ|param|`` fp32), for the few samples a QK-OV heat map in RAM scores.

What is derived from them (``C_i = g_i²/T_i``, ``g_i/T_i``) is :mod:`fisherstore.spec.samples`.

**Commits as it goes, and resumes.** :func:`collect_samples` writes the batch's rows in
segments and flushes after each one, so a kill (``kill -9``, an OOM, a lost node) loses
only the segment in progress: recovery, on the next writer's open, removes its arrays,
and every committed segment is whole. A segment closes after ``commit_every`` samples
(default None: no count) or about ``commit_seconds`` seconds (default 300: each segment
after the first is sized from the time per sample measured so far; the first, before
anything is timed, holds at most 8). Five minutes bounds the work a kill loses while a
commit (one ``store.flush()``: a manifest write, and one array per parameter per
segment) stays noise next to it, and a task gains a dozen segments an hour; a call of
at most 8 samples stays one segment, as before. Each commit is a whole flush, so it also
commits any other task's pending steps. A call again with the same stable ``ids=`` and ``resume=True`` skips the
ids the task already holds, with no forward for them, and collects the rest::

    fc.collect_samples(model, batch, task="math", ids=row_ids, resume=True)   # after a crash: only what is missing

Without ``resume=True`` an id the task holds is refused, naming it (nothing is written).

Usage (through the collector)::

    fc = FisherCollector(backend="zarr", path="fisher.zarr")
    fc.collect_samples(model, batch, task="math")      # commits a segment about every 5 minutes, and at the end
    fc.store.samples("math", "model.layers.0.self_attn.q_proj.weight")   # lazy [n, *shape]
    fc.sample_gradients(model, batch).contributions()  # {name: [n, *shape]} in RAM
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..losses import call_loss
from ..progress import progress_bar
from ..spec.layout import ParamLayout
from ..spec.samples import contributions, signed
from .autograd import grads_of
from .batches import batch_rows, on_device, take_rows

__all__ = ["collect_samples", "SampleGrads", "sample_gradients"]


COMMIT_SECONDS = 300.0  # the default time bound of a segment (a kill loses at most about this much work)
FIRST_SEGMENT = 8  # the most samples of a call's first segment under commit_seconds: nothing is timed yet


def collect_samples(store: Any, model: nn.Module, batch: Mapping[str, Any], task: str, names: Sequence[str],
                    layouts: Mapping[str, ParamLayout], loss_fn: Callable[..., tuple[torch.Tensor, int]], *,
                    ids: Sequence[str] | None = None, dtype: str | None = None, flush: bool = True,
                    progress: bool | None = None, resume: bool = False, commit_every: int | None = None,
                    commit_seconds: float | None = COMMIT_SECONDS) -> list[str]:
    """Write each sample's gradient of each of ``names`` to ``task``; return the ids this call wrote.

    ``loss_fn(model, one_sample_batch) -> (loss_sum, n_tokens)`` (:mod:`fisherstore.losses`)
    gives each sample's token-summed loss and its ``T_i``. The parameters are created in
    the store if new. The rows go in segments, each committed by a flush as soon as it is
    written: a segment closes after ``commit_every`` samples (None: no count) or about
    ``commit_seconds`` seconds (None: no time bound), whichever comes first; a crash loses
    only the segment in progress. ``flush=False`` writes the rows as one segment and
    commits nothing (the caller's next flush does; ``commit_every`` is refused with it
    and ``commit_seconds`` does not apply).

    ``resume=True`` (needs ``ids=``) skips the rows whose ids the task already holds
    (committed, or written by this writer for its next flush): no forward runs for them,
    and they are not in the returned ids. The progress bar counts what is left and says
    how many were skipped. An error discards only the segment in progress: the ones
    before it stay committed, and a call with ``resume=True`` collects the rest.

    Usage: ``collect_samples(store, model, batch, "math", names, layouts, causal_lm, ids=row_ids, resume=True)``.
    """
    named = dict(model.named_parameters())
    missing = [n for n in names if n not in named]
    if missing:
        raise InvalidArgumentError(f"{type(model).__name__} has no parameter {missing[0]!r}")
    _check_commit_options(commit_every, commit_seconds, flush)
    rows = batch_rows(batch)
    if rows == 0:
        raise InvalidArgumentError(f"the batch has no rows: there are no samples to collect into task {task!r}")
    ids = None if ids is None else [str(i) for i in ids]
    todo, skipped = _rows_to_collect(store, task, rows, ids, resume)
    if not todo:
        return []  # everything was there already: no forward, nothing to create or commit
    device = next(model.parameters()).device
    for n in names:
        store.create(task, n, tuple(named[n].shape), layouts.get(n))
    now: dict[str, Any] = {"sb": None, "i": -1}  # the open segment, and the sample of it being computed
    fed: set[str] = set()

    def make_hook(name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            now["sb"].add(now["i"], name, p.grad.detach())
            fed.add(name)
            p.grad = None  # freed as soon as it is on its way to the store
        return hook

    desc = f"samples of {task}" + (f" (resumed: {skipped} of {rows} samples already committed)" if resume else "")
    written: list[str] = []
    seconds = 0.0  # spent computing and writing the samples so far (flushes not counted)
    with grads_of(model, names, {n: make_hook(n) for n in names}), \
            progress_bar(len(todo), progress, desc, unit="sample") as bar:
        while len(written) < len(todo):
            left = len(todo) - len(written)
            n = _segment_size(left, len(written), seconds, commit_every, commit_seconds) if flush else left
            part = todo[len(written):len(written) + n]
            began = time.monotonic()
            with store.begin_samples(task, names, n, ids=None if ids is None else [ids[r] for r in part],
                                     dtype=dtype) as sb:
                now["sb"] = sb
                for i, row in enumerate(part):
                    now["i"] = i
                    fed.clear()
                    one = on_device(take_rows(batch, slice(row, row + 1)), device)
                    loss, n_tok = call_loss(loss_fn, model, one)
                    if n_tok:
                        loss.backward()
                    sb.set_tokens(i, n_tok)
                    for name in names:  # a parameter the sample's loss did not reach has a zero gradient
                        if name not in fed:
                            sb.add(i, name, torch.zeros_like(named[name], memory_format=torch.contiguous_format))
                    bar.update(1)
            seconds += time.monotonic() - began
            if flush:
                store.flush()  # the commit point of this segment
            written += sb.ids
    return written


def _check_commit_options(commit_every: int | None, commit_seconds: float | None, flush: bool) -> None:
    if commit_every is not None and (isinstance(commit_every, bool) or not isinstance(commit_every, int)
                                     or commit_every < 1):
        raise InvalidArgumentError(f"commit_every must be a positive number of samples or None, got {commit_every!r}")
    if commit_seconds is not None and (isinstance(commit_seconds, bool) or not isinstance(commit_seconds, (int, float))
                                       or not math.isfinite(commit_seconds) or commit_seconds <= 0):
        raise InvalidArgumentError(f"commit_seconds must be a positive number of seconds or None, got "
                                   f"{commit_seconds!r}")
    if commit_every is not None and not flush:
        raise InvalidArgumentError(
            f"commit_every={commit_every} commits as the call goes, and flush=False commits nothing: pass one of them")


def _rows_to_collect(store: Any, task: str, rows: int, ids: list[str] | None, resume: bool) -> tuple[list[int], int]:
    """The rows of the batch to collect, and how many a resume skips; refuses ids that cannot be written."""
    if ids is None:
        if resume:
            raise InvalidArgumentError(
                f"resume=True needs ids=: it skips the rows whose ids task {task!r} already holds, and without ids "
                "the store numbers the samples as they arrive, which names other rows on another run. Pass ids= "
                "(one stable id per row of the batch, such as its index in the dataset)")
        return list(range(rows)), 0
    if len(ids) != rows:
        raise InvalidArgumentError(f"ids has {len(ids)} ids for a batch of {rows} rows; pass one id per row")
    first: dict[str, int] = {}
    for row, i in enumerate(ids):
        if i in first:
            raise InvalidArgumentError(f"sample id {i!r} is given twice in ids (rows {first[i]} and {row}); every "
                                       f"sample of task {task!r} needs its own id")
        first[i] = row
    held = set(store.sample_ids(task)) if task in store.tasks() else set()
    if not resume:
        there = [i for i in ids if i in held]
        if there:
            more = f" (and {len(there) - 1} more of these ids)" if len(there) > 1 else ""
            raise InvalidArgumentError(
                f"task {task!r} already holds sample id {there[0]!r}{more}; nothing was written. Pass resume=True "
                "to skip the samples it holds and collect the rest, or give these samples other ids")
    todo = [row for row, i in enumerate(ids) if i not in held]
    return todo, rows - len(todo)


def _segment_size(left: int, done: int, seconds: float, commit_every: int | None,
                  commit_seconds: float | None) -> int:
    """How many of the ``left`` samples the next segment holds (``done`` took ``seconds`` so far)."""
    n = left if commit_every is None else min(left, commit_every)
    if commit_seconds is not None:
        fit = FIRST_SEGMENT if done == 0 else int(commit_seconds * done / max(seconds, 1e-9))
        n = min(n, max(1, fit))
    return n


@dataclass
class SampleGrads:
    """Per-sample gradients of each sample's token-summed loss, and its token counts (in RAM)."""

    grads: dict[str, torch.Tensor]  # name -> [n, *shape]
    tokens: torch.Tensor  # [n]

    def contributions(self) -> dict[str, torch.Tensor]:
        """C_i = g_i² / T_i, a per-sample squared gradient normalised like the Fisher."""
        return {n: contributions(g, self.tokens, _result_dtype(g)) for n, g in self.grads.items()}

    def signed(self) -> dict[str, torch.Tensor]:
        """g_j / T_j, the per-sample gradient of the token-mean loss (signed)."""
        return {n: signed(g, self.tokens, _result_dtype(g)) for n, g in self.grads.items()}


def _result_dtype(g: torch.Tensor) -> torch.dtype:
    """fp32, or ``g``'s dtype where it is wider (the gradients are fp32 when this module collects them)."""
    return torch.promote_types(g.dtype, torch.float32)


def sample_gradients(loss_fn: Any, model: nn.Module, batch: Mapping[str, torch.Tensor], names: list[str]) -> SampleGrads:
    """Per-sample gradients (``loss_fn``'s token-summed loss) of ``names``, on the CPU.

    Memory is ``n × Σ|param|`` fp32: meant for the few samples a QK-OV heat map uses.
    """
    batch = on_device(batch, next(model.parameters()).device)
    rows = batch_rows(batch)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    tokens = []
    with grads_of(model, names) as named:
        for i in range(rows):
            loss, n_tok = call_loss(loss_fn, model, take_rows(batch, slice(i, i + 1)))
            model.zero_grad(set_to_none=True)
            if n_tok:  # a sample with nothing to predict has a zero gradient
                loss.backward()
            tokens.append(n_tok)
            for n in names:
                g = named[n].grad
                grads[n].append(torch.zeros(named[n].shape) if g is None else g.detach().float().cpu())
    return SampleGrads({n: torch.stack(v) for n, v in grads.items()}, torch.tensor(tokens).clamp_min(1))
