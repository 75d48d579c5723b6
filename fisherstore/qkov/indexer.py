"""Which parameter, and which slice of it, holds (layer, head, block): the QK-OV indexer.

Slicing follows the head geometry of :mod:`fisherstore.spec.layout` and differs from
TensorScope's ``QKOVIndexer`` where that one is wrong: GPT-2's Conv1D ``c_proj`` (O) is
sliced by **rows** (upstream: columns); a fused GQA V block starts at ``(H + H_kv)·d``
(upstream: ``2·H·d``, an empty slice); ``head_dim`` comes from the model config (upstream:
``hidden // H``); GPT-NeoX's interleaved ``query_key_value`` is supported (upstream: not
found, scored 0). Every fusion of :mod:`fisherstore.spec.layout` is sliced by its own
``head_range`` (Falcon's grouped, CodeGen's sharded ``qkv_proj``, MLA's ``kv_b_proj`` whose K and V
heads differ in size), so a block's slice length is that block's head size, not one ``d``.

Usage::

    idx = QKOVIndexer.from_model(model)          # or .from_store(store, task), .from_layouts(...)
    sl = idx.block_slice(3, 5, "Q")              # BlockHeadSlice: param_name, rows, cols
    block = sl.apply(store.fisher(task, sl.param_name))   # one chunk read
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..collect.models import layouts_from_model
from ..errors import HeadIndexError, LayoutError, UnknownParamError
from ..spec.layers import layer_keys
from ..spec.layout import BLOCKS, ParamLayout

__all__ = ["BlockHeadSlice", "QKOVIndexer"]

_KEY_RE = re.compile(r"(.*)\.(\d+)(\.cross)?")  # a string layer key of layer_keys()


@dataclass(frozen=True)
class BlockHeadSlice:
    """Which part of which parameter tensor holds (layer, head, block)."""

    param_name: str
    rows: slice
    cols: slice
    layer: int | str
    head: int
    block: str

    def apply(self, t: Any) -> torch.Tensor:
        """``t[rows, cols]`` as one index, so a LazyFisher reads only the block's chunk."""
        return t[self.rows, self.cols]


class QKOVIndexer:
    """Maps (layer, block) to the parameter holding it, and (layer, head, block) to its slice.

    Layers are keyed by :func:`fisherstore.spec.layers.layer_keys`: ints for a model with one
    attention stack (LLaMA, GPT-2, ...), strings such as ``"encoder.3"``, ``"decoder.3"``
    and ``"decoder.3.cross"`` for one with several (BART, T5), so an encoder layer and a
    decoder layer with the same number never overwrite each other.
    Usage: ``QKOVIndexer.from_model(bart).param_name("decoder.1.cross", "K")``.
    """

    def __init__(self, layouts: Mapping[str, ParamLayout]) -> None:
        self.layouts = dict(layouts)
        self._names: dict[tuple[int | str, str], str] = {}
        heads = [n for n, lay in self.layouts.items() if lay.has_heads and not n.endswith("bias")]
        keys = layer_keys(heads)
        order: dict[int | str, tuple[int, int]] = {}  # key -> (its stream's first appearance, layer number)
        streams: dict[str, int] = {}
        for name in heads:
            layer = keys[name]
            if layer is None:
                continue
            lay = self.layouts[name]
            for b in lay.blocks:
                other = self._names.get((layer, b))
                if other is not None and other != name:
                    raise LayoutError(
                        f"{name!r} and {other!r} both hold block {b} of layer {layer!r}; the indexer cannot tell "
                        "them apart. Index them separately: QKOVIndexer.from_layouts({...}) with one of them"
                    )
                self._names[(layer, b)] = name
            if isinstance(layer, str):  # "<stack>.<N>[.cross]": stacks in model order, then N
                m = _KEY_RE.fullmatch(layer)
                order.setdefault(layer, (streams.setdefault(m.group(1) + (m.group(3) or ""), len(streams)),
                                         int(m.group(2))))
            else:
                order.setdefault(layer, (0, layer))
        if not self._names:
            raise UnknownParamError("no attention projection weights found in the layouts; nothing to index")
        #: Layer keys in order: each stack's layers by number, stacks in the order the model has them.
        self.layers = sorted(order, key=order.__getitem__)
        self.num_heads = max(self.layouts[n].num_heads for n in self._names.values())

    @classmethod
    def from_model(cls, model: torch.nn.Module, overrides: Mapping[str, ParamLayout] | None = None) -> QKOVIndexer:
        """Index a model's attention projections (see :func:`fisherstore.layouts_from_model`, and its ``overrides``)."""
        return cls(layouts_from_model(model, overrides=overrides))

    @classmethod
    def from_layouts(cls, layouts: Mapping[str, ParamLayout]) -> QKOVIndexer:
        """Index explicit layouts, e.g. ``{n: store.layout(task, n) for n in store.params(task)}``."""
        return cls(layouts)

    @classmethod
    def from_store(cls, store: Any, task: str) -> QKOVIndexer:
        """Index the layouts recorded in a store (no model needed)."""
        return cls({n: store.layout(task, n) for n in store.params(task) if store.layout(task, n) is not None})

    def param_name(self, layer: int | str, block: str) -> str:
        """The weight holding ``block`` (Q, K, V or O) of ``layer`` (a key in :attr:`layers`)."""
        b = block.upper() if isinstance(block, str) else block
        if b not in BLOCKS:
            raise HeadIndexError(f"block {block!r} is not one of Q, K, V, O")
        try:
            return self._names[(layer, b)]
        except KeyError:
            pass
        keys = ", ".join(repr(k) for k in self.layers)
        if isinstance(layer, int) and any(isinstance(k, str) for k in self.layers):
            raise HeadIndexError(
                f"layer {layer!r} is ambiguous: this model has several attention stacks, so its layers are "
                f"keyed by stack; use one of {keys}"
            ) from None
        raise HeadIndexError(f"no {b} projection for layer {layer!r}; indexed layers are {keys}") from None

    def block_slice(self, layer: int | str, head: int, block: str) -> BlockHeadSlice:
        """The slice of (layer, head, block); raises ``HeadIndexError`` for a bad head."""
        name = self.param_name(layer, block)
        lay = self.layouts[name]
        idx = lay.head_index(head, block, 2)
        return BlockHeadSlice(name, idx[0], idx[1], layer, head, block.upper())

    def __repr__(self) -> str:
        return f"QKOVIndexer(layers={len(self.layers)}, heads={self.num_heads}, params={len(set(self._names.values()))})"
