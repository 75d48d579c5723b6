"""Benchmark workloads: real model shapes (from configs/), synthetic heavy-tailed grad².

Gradients are never materialised per model: each parameter is fed in chunk-aligned slabs
of at most 16 MiB, each a view into a small seeded pool of heavy-tailed values
(``(randn·exp(2·randn))²``, ~7 decades), so inputs cost no time and no memory and every
competitor sees exactly the same numbers.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fisherstore import ParamLayout
from fisherstore.spec.layout import chunk_shape
from fisherstore.spec.regions import split_axis

HERE = os.path.dirname(os.path.abspath(__file__))
SLAB_ELEMS = 4 << 20  # 16 MiB of fp32
POOL_BLOCKS = 8

WORKLOADS = {
    "llama2-7b-attn": ("llama2-7b.json", "attn"),
    "llama2-7b-full": ("llama2-7b.json", "full"),
    "mistral-7b-attn": ("mistral-7b.json", "attn"),
}


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    layout: ParamLayout

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        return chunk_shape(self.shape, self.layout)


def load_config(name: str) -> dict:
    with open(os.path.join(HERE, "configs", name)) as f:
        return json.load(f)


def workload(name: str, layers: int | None = None) -> list[Param]:
    """The parameters of a workload; ``layers`` keeps only the first N decoder layers."""
    cfg_file, part = WORKLOADS[name]
    c = load_config(cfg_file)
    h, inter, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    H, Hkv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    d = c.get("head_dim") or h // H
    L = c["num_hidden_layers"] if layers is None else min(layers, c["num_hidden_layers"])
    A = ParamLayout.attention
    out: list[Param] = []
    if part == "full":
        out.append(Param("model.embed_tokens.weight", (V, h), ParamLayout("embedding")))
    for i in range(L):
        pre = f"model.layers.{i}."
        out += [
            Param(pre + "self_attn.q_proj.weight", (H * d, h), A("q", H, d, Hkv)),
            Param(pre + "self_attn.k_proj.weight", (Hkv * d, h), A("k", H, d, Hkv)),
            Param(pre + "self_attn.v_proj.weight", (Hkv * d, h), A("v", H, d, Hkv)),
            Param(pre + "self_attn.o_proj.weight", (h, H * d), A("o", H, d, Hkv)),
        ]
        if part == "full":
            out += [
                Param(pre + "mlp.gate_proj.weight", (inter, h), ParamLayout("mlp")),
                Param(pre + "mlp.up_proj.weight", (inter, h), ParamLayout("mlp")),
                Param(pre + "mlp.down_proj.weight", (h, inter), ParamLayout("mlp")),
                Param(pre + "input_layernorm.weight", (h,), ParamLayout("norm")),
                Param(pre + "post_attention_layernorm.weight", (h,), ParamLayout("norm")),
            ]
    if part == "full":
        out += [Param("model.norm.weight", (h,), ParamLayout("norm")),
                Param("lm_head.weight", (V, h), ParamLayout("other"))]
    return out


def state_bytes(params: list[Param]) -> int:
    return sum(p.nbytes for p in params)


class GradSource:
    """Seeded heavy-tailed grad² slabs, as views into a 128 MiB pool."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pool = []
        for _ in range(POOL_BLOCKS):
            x = torch.randn(SLAB_ELEMS, generator=g) * torch.exp(2 * torch.randn(SLAB_ELEMS, generator=g))
            self.pool.append(x.square_())

    def slabs(self, p: Param, step: int) -> Iterator[tuple[tuple[slice, ...], torch.Tensor]]:
        """(region, grad² view) pairs covering ``p`` once, chunk-aligned, ≤ 16 MiB each."""
        if len(p.shape) == 1:
            yield (slice(0, p.shape[0]),), self.pool[(step + zlib.crc32(p.name.encode())) % POOL_BLOCKS][: p.shape[0]]
            return
        ax = split_axis(p.shape, p.chunks)
        other = p.shape[1 - ax]
        per = max(p.chunks[ax], (SLAB_ELEMS // other) // p.chunks[ax] * p.chunks[ax])
        for k, a in enumerate(range(0, p.shape[ax], per)):
            b = min(a + per, p.shape[ax])
            n = (b - a) * other
            block = self.pool[(step * 7919 + k + len(p.name)) % POOL_BLOCKS][:n]
            if ax == 0:
                yield (slice(a, b), slice(0, other)), block.view(b - a, other)
            else:
                yield (slice(0, other), slice(a, b)), block.view(other, b - a)
