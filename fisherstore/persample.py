"""Per-sample gradients from a model, streamed to the store one parameter at a time.

Each sample of a batch gets its own forward and backward of its token-summed loss; a
post-accumulate-grad hook hands every tracked parameter's gradient to the store's
:class:`~fisherstore.samples.SampleBatch` the moment it is final, then frees it. So at
most one sample's gradients exist at a time (and of those, only the parameters whose
backward has not reached them yet), plus what the store's I/O queue holds: memory is
bounded by the budget, not by ``n × model``.

Usage (through the collector)::

    fc = FisherCollector(backend="zarr", path="fisher.zarr")
    fc.collect_samples(model, batch, task="math")      # commits with a flush at the end
    fc.store.samples("math", "model.layers.0.self_attn.q_proj.weight")   # lazy [n, *shape]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgumentError
from .layout import ParamLayout

__all__ = ["collect_samples"]


def collect_samples(store: Any, model: nn.Module, batch: Mapping[str, Any], task: str, names: Sequence[str],
                    layouts: Mapping[str, ParamLayout], loss_fn: Callable[..., tuple[torch.Tensor, int]], *,
                    ids: Sequence[str] | None = None, dtype: str | None = None, flush: bool = True,
                    progress: bool | None = None) -> list[str]:
    """Write each sample's gradient of each of ``names`` to ``task``; return the new samples' ids.

    ``loss_fn(model, one_sample_batch) -> (loss_sum, n_tokens)`` (:mod:`fisherstore.losses`)
    gives each sample's token-summed loss and its ``T_i``. The parameters are created in
    the store if new. ``flush`` commits the segment at the end (a crash before that loses it).
    """
    from .progress import progress_bar

    named = dict(model.named_parameters())
    missing = [n for n in names if n not in named]
    if missing:
        raise InvalidArgumentError(f"{type(model).__name__} has no parameter {missing[0]!r}")
    device = next(model.parameters()).device
    rows = _rows(batch)
    for n in names:
        store.create(task, n, tuple(named[n].shape), layouts.get(n))
    saved = {n: (p.requires_grad, p.grad) for n, p in named.items()}
    was_training = model.training
    model.eval()
    handles = []
    i_now = {"i": -1}
    fed: set[str] = set()
    with store.begin_samples(task, names, rows, ids=ids, dtype=dtype) as sb:

        def make_hook(name: str) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                sb.add(i_now["i"], name, p.grad.detach())
                fed.add(name)
                p.grad = None  # freed as soon as it is on its way to the store
            return hook

        try:
            for n, p in named.items():
                p.requires_grad_(n in sb.names)
                p.grad = None
            handles = [named[n].register_post_accumulate_grad_hook(make_hook(n)) for n in names]
            with progress_bar(rows, progress, f"samples of {task}", unit="sample") as bar:
                for i in range(rows):
                    i_now["i"] = i
                    fed.clear()
                    sample = {k: v[i:i + 1].to(device) if isinstance(v, torch.Tensor) and v.ndim >= 1 else v
                              for k, v in batch.items()}
                    loss, n_tok = loss_fn(model, sample)
                    if n_tok:
                        loss.backward()
                    sb.set_tokens(i, int(n_tok))
                    for n in names:  # a parameter the sample's loss did not reach has a zero gradient
                        if n not in fed:
                            sb.add(i, n, torch.zeros_like(named[n], memory_format=torch.contiguous_format))
                    bar.update(1)
        finally:
            for h in handles:
                h.remove()
            for n, p in named.items():
                p.requires_grad_(saved[n][0])
                p.grad = saved[n][1]
            model.train(was_training)
        new_ids = list(sb.ids)
    if flush:
        store.flush()
    return new_ids


def _rows(batch: Mapping[str, Any]) -> int:
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim >= 1}
    if len(sizes) != 1:
        raise InvalidArgumentError(
            "the batch must be a mapping of tensors sharing their first dimension (the samples), got "
            f"{ {k: tuple(getattr(v, 'shape', ())) for k, v in batch.items()} }"
        )
    return sizes.pop()
