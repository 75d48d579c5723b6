"""What collection does to a model's autograd state, and undoes: which parameters need gradients, and squares.

Every way fisherstore runs backward (a collector step, per-sample gradients streamed to
a store or held in RAM) needs the same set-up: only the chosen parameters require grad,
every ``.grad`` starts empty (a caller's stale gradient would be summed into the first
micro-batch), dropout is off, and backward hooks hand each final gradient on. Afterwards
the model is exactly as the caller left it. :func:`grads_of` is that, once.

Usage::

    with grads_of(model, names, hooks={n: on_grad for n in names}) as named:
        loss.backward()            # on_grad(param) fires as each gradient is final
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["grads_of", "square", "dense", "square_of"]


@contextlib.contextmanager
def grads_of(model: nn.Module, names: Iterable[str],
             hooks: Mapping[str, Callable[[torch.Tensor], None]] | None = None) -> Iterator[dict[str, nn.Parameter]]:
    """Within the block only ``names`` require grad, every ``.grad`` is None, the model is in eval mode, and
    ``hooks[name]`` is a post-accumulate-grad hook of ``name``; on exit all of it is as it was.

    Yields ``dict(model.named_parameters())``.
    """
    named = dict(model.named_parameters())
    wanted = set(names)
    saved = {n: (p.requires_grad, p.grad) for n, p in named.items()}
    was_training = model.training
    handles: list[Any] = []
    model.eval()
    try:
        for n, p in named.items():
            p.grad = None
            p.requires_grad_(n in wanted)
        handles = [named[n].register_post_accumulate_grad_hook(fn) for n, fn in (hooks or {}).items()]
        yield named
    finally:
        for h in handles:
            h.remove()
        for n, p in named.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
        model.train(was_training)


def dense(g: torch.Tensor) -> torch.Tensor:
    """A gradient as a dense tensor: sparse ones (``nn.Embedding(sparse=True)``) cannot be summed across ranks."""
    g = g.detach()
    return g.to_dense() if g.layout != torch.strided else g


def square(g: torch.Tensor) -> torch.Tensor:
    """``g²`` in fp32, in place when ``g`` is a dense fp32 gradient of our own (no new memory, one kernel).

    A view (``Tensor._base``: torch has no public spelling of it) may share memory with
    another tensor, such as a flat gradient buffer, so it is squared into new memory.
    """
    g = dense(g)
    if g.dtype != torch.float32 or g._base is not None:
        g = g.to(torch.float32, copy=True)
    return g.square_()


def square_of(grad: torch.Tensor, scale: Any) -> torch.Tensor:
    """``(scale · grad)²`` in fp32, in new memory: ``.grad`` itself is left for the optimiser."""
    x = dense(grad).to(torch.float32, copy=True).square_()
    if isinstance(scale, torch.Tensor):
        return x.mul_(scale.to(x.device, torch.float32).square())
    return x.mul_(float(scale) ** 2) if scale != 1 else x
