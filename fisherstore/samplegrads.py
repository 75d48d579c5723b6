"""Per-sample gradients in RAM, for the few samples a QK-OV heat map scores (:mod:`fisherstore.qkov`).

Usage::

    sg = sample_gradients(causal_lm, model, batch, names)   # or FisherCollector.sample_gradients
    sg.contributions()   # {name: [n, *shape]} C_i = g_i² / T_i
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .hooks import batch_rows, call_loss, on_device, take_rows

__all__ = ["SampleGrads", "sample_gradients"]


@dataclass
class SampleGrads:
    """Per-sample gradients of each sample's token-summed loss, and its token counts."""

    grads: dict[str, torch.Tensor]  # name -> [n, *shape]
    tokens: torch.Tensor  # [n]

    def contributions(self) -> dict[str, torch.Tensor]:
        """C_i = g_i² / T_i, a per-sample squared gradient normalised like the Fisher."""
        t = self.tokens.float()
        return {n: g.pow(2) / t.view(-1, *[1] * (g.ndim - 1)) for n, g in self.grads.items()}

    def signed(self) -> dict[str, torch.Tensor]:
        """g_j / T_j, the per-sample gradient of the token-mean loss (signed)."""
        t = self.tokens.float()
        return {n: g / t.view(-1, *[1] * (g.ndim - 1)) for n, g in self.grads.items()}


def sample_gradients(loss_fn: Any, model: nn.Module, batch: Mapping[str, torch.Tensor], names: list[str]) -> SampleGrads:
    """Per-sample gradients (``loss_fn``'s token-summed loss) of ``names``, on the CPU.

    Memory is ``n × Σ|param|`` fp32: meant for the few samples a QK-OV heat map uses.
    """
    batch = on_device(batch, next(model.parameters()).device)
    rows = batch_rows(batch)
    named = dict(model.named_parameters())
    grads = {n: [] for n in names}
    tokens = []
    saved = {n: p.requires_grad for n, p in named.items()}
    saved_grads = {n: p.grad for n, p in named.items()}
    was_training = model.training
    model.eval()
    try:
        for n, p in named.items():
            p.requires_grad_(n in grads)
        for i in range(rows):
            loss, n_tok = call_loss(loss_fn, model, take_rows(batch, slice(i, i + 1)))
            model.zero_grad(set_to_none=True)
            if n_tok:  # a sample with nothing to predict has a zero gradient
                loss.backward()
            tokens.append(n_tok)
            for n in names:
                g = named[n].grad
                grads[n].append(torch.zeros(named[n].shape) if g is None else g.detach().float().cpu())
    finally:
        for n, p in named.items():
            p.requires_grad_(saved[n])
            p.grad = saved_grads[n]
        model.train(was_training)
    return SampleGrads({n: torch.stack(v) for n, v in grads.items()}, torch.tensor(tokens).clamp_min(1))
