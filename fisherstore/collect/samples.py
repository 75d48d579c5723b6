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

Usage (through the collector)::

    fc = FisherCollector(backend="zarr", path="fisher.zarr")
    fc.collect_samples(model, batch, task="math")      # commits with a flush at the end
    fc.store.samples("math", "model.layers.0.self_attn.q_proj.weight")   # lazy [n, *shape]
    fc.sample_gradients(model, batch).contributions()  # {name: [n, *shape]} in RAM
"""

from __future__ import annotations

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


def collect_samples(store: Any, model: nn.Module, batch: Mapping[str, Any], task: str, names: Sequence[str],
                    layouts: Mapping[str, ParamLayout], loss_fn: Callable[..., tuple[torch.Tensor, int]], *,
                    ids: Sequence[str] | None = None, dtype: str | None = None, flush: bool = True,
                    progress: bool | None = None) -> list[str]:
    """Write each sample's gradient of each of ``names`` to ``task``; return the new samples' ids.

    ``loss_fn(model, one_sample_batch) -> (loss_sum, n_tokens)`` (:mod:`fisherstore.losses`)
    gives each sample's token-summed loss and its ``T_i``. The parameters are created in
    the store if new. ``flush`` commits the segment at the end (a crash before that loses it).
    """
    named = dict(model.named_parameters())
    missing = [n for n in names if n not in named]
    if missing:
        raise InvalidArgumentError(f"{type(model).__name__} has no parameter {missing[0]!r}")
    device = next(model.parameters()).device
    rows = batch_rows(batch)
    for n in names:
        store.create(task, n, tuple(named[n].shape), layouts.get(n))
    i_now = {"i": -1}
    fed: set[str] = set()
    with store.begin_samples(task, names, rows, ids=ids, dtype=dtype) as sb:

        def make_hook(name: str) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                sb.add(i_now["i"], name, p.grad.detach())
                fed.add(name)
                p.grad = None  # freed as soon as it is on its way to the store
            return hook

        with grads_of(model, sb.names, {n: make_hook(n) for n in names}), \
                progress_bar(rows, progress, f"samples of {task}", unit="sample") as bar:
            for i in range(rows):
                i_now["i"] = i
                fed.clear()
                loss, n_tok = call_loss(loss_fn, model, on_device(take_rows(batch, slice(i, i + 1)), device))
                if n_tok:
                    loss.backward()
                sb.set_tokens(i, n_tok)
                for n in names:  # a parameter the sample's loss did not reach has a zero gradient
                    if n not in fed:
                        sb.add(i, n, torch.zeros_like(named[n], memory_format=torch.contiguous_format))
                bar.update(1)
        new_ids = list(sb.ids)
    if flush:
        store.flush()
    return new_ids


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
