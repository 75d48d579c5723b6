"""QK-OV interference ("Phase 6") on full, lazily read Fisher tensors.

For samples i (task A) and j (task B), layer ℓ, head h and block B ∈ {Q, K, V, O}:

    M^B_{ij,ℓ,h} = Σ_{k ∈ slice(ℓ,h,B)} C_{i,k} / (max(Î_k, ε) + λ) · |g_{j,k}|

with ``λ = ridge``, or ``max(ridge, ridge_rel · median(Î_slice))`` when ``ridge_rel > 0``.
The slice is one head block, so with a head-chunked store each score reads one chunk.

Slicing follows DESIGN §3 and differs from TensorScope's ``QKOVIndexer`` where that one is
wrong: GPT-2's Conv1D ``c_proj`` (O) is sliced by **rows** (upstream: columns); a fused
GQA V block starts at ``(H + H_kv)·d`` (upstream: ``2·H·d``, an empty slice); ``head_dim``
comes from the model config (upstream: ``hidden // H``); GPT-NeoX's interleaved
``query_key_value`` is supported (upstream: not found, scored 0).

Usage::

    idx = QKOVIndexer.from_model(model)
    qk = QKOVInterference(idx)
    score, diag = qk.block_head_score(C_i, g_j, fisher, layer=3, head=5, block="Q")
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cachetools
import numpy as np
import torch

from . import phase6
from .errors import HeadIndexError, LayoutError, UnknownParamError, close_matches
from .figures import figure, panel, save
from .layout import BLOCKS, ParamLayout
from .lazy import LazyFisher
from .models import layer_keys, layouts_from_model
from .phase6 import top_conflicts
from .progress import progress_bar

__all__ = ["BlockHeadSlice", "QKOVIndexer", "QKOVInterference", "heatmap_png"]

Tensorish = torch.Tensor | LazyFisher
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

    def apply(self, t: Tensorish) -> torch.Tensor:
        """``t[rows, cols]`` as one index, so a LazyFisher reads only the block's chunk."""
        return t[self.rows, self.cols]


class QKOVIndexer:
    """Maps (layer, block) to the parameter holding it, and (layer, head, block) to its slice.

    Layers are keyed by :func:`fisherstore.models.layer_keys`: ints for a model with one
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


class _BlockCache:
    """LRU cache of decoded Fisher blocks, bounded in bytes (a ``cachetools.LRUCache`` sized by ``nbytes``)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        self._d: cachetools.LRUCache = cachetools.LRUCache(max_bytes, getsizeof=_nbytes)

    @property
    def bytes(self) -> int:
        return int(self._d.currsize)

    def get(self, key: Any, load: Any) -> torch.Tensor:
        v = self._d.get(key)
        if v is not None:
            self.hits += 1
            return v
        self.misses += 1
        v = load()
        if _nbytes(v) <= self.max_bytes:  # a block larger than the whole cache is used once, not kept
            self._d[key] = v
        return v


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class QKOVInterference:
    """Fisher-normalised QK-OV interference scores.

    Args:
        indexer: a :class:`QKOVIndexer`.
        eps: floor ε on the Fisher.
        ridge: λ added to the floored Fisher.
        ridge_rel: if > 0, λ = max(ridge, ridge_rel · median of the block's Fisher).
        cache_bytes: bound of the LRU cache of decoded Fisher blocks.
    """

    def __init__(self, indexer: QKOVIndexer, eps: float = 1e-10, ridge: float = 1e-8, ridge_rel: float = 0.0,
                 cache_bytes: int = 256 << 20) -> None:
        self.indexer = indexer
        self.eps, self.ridge, self.ridge_rel = eps, ridge, ridge_rel
        self.cache = _BlockCache(cache_bytes)

    def fisher_block(self, fisher: Tensorish, sl: BlockHeadSlice) -> torch.Tensor:
        """One Fisher block as fp32, through the cache when it comes from a store."""
        if isinstance(fisher, LazyFisher):
            key = (fisher.cache_key, sl.rows.start, sl.rows.stop, sl.cols.start, sl.cols.stop)
            return self.cache.get(key, lambda: sl.apply(fisher).float())
        return sl.apply(fisher.detach().to(dtype=torch.float32, device="cpu"))

    def denominator(self, block: torch.Tensor, eps: float | None = None, ridge: float | None = None,
                    ridge_rel: float | None = None) -> tuple[torch.Tensor, float]:
        """``max(Î, ε) + λ`` for one Fisher block, and the λ applied (the scorer's ε, ridge, ridge_rel by default)."""
        return self._denominator(block, self.eps if eps is None else eps, self.ridge if ridge is None else ridge,
                                 self.ridge_rel if ridge_rel is None else ridge_rel)

    def _denominator(self, block: torch.Tensor, eps: float, ridge: float, ridge_rel: float) -> tuple[torch.Tensor, float]:
        lam = ridge
        if ridge_rel > 0:
            lam = max(ridge, ridge_rel * float(block.median()))
        return block.clamp_min(eps) + lam, lam

    def block_head_score(self, contrib: Tensorish, grad: Tensorish, fisher: Tensorish, layer: int | str, head: int,
                         block: str, eps: float | None = None, ridge: float | None = None,
                         ridge_rel: float | None = None) -> tuple[float, dict[str, float]]:
        """Score of one (layer, head, block) for one contribution C and one gradient g.

        ``contrib``, ``grad`` and ``fisher`` are the full parameter tensors (or LazyFisher).
        Returns ``(score, diagnostics)``; diagnostics hold the Fisher block's min, median,
        max, the fraction below ε and the λ applied.
        """
        eps = self.eps if eps is None else eps
        ridge = self.ridge if ridge is None else ridge
        ridge_rel = self.ridge_rel if ridge_rel is None else ridge_rel
        sl = self.indexer.block_slice(layer, head, block)
        Fb = self.fisher_block(fisher, sl)
        C = sl.apply(contrib.detach().to(dtype=torch.float32, device="cpu"))
        G = sl.apply(grad.detach().to(dtype=torch.float32, device="cpu"))
        if C.shape != Fb.shape or G.shape != Fb.shape:
            raise ValueError(f"block shapes differ: C {tuple(C.shape)}, g {tuple(G.shape)}, Fisher {tuple(Fb.shape)}")
        den, lam = self._denominator(Fb, eps, ridge, ridge_rel)
        score = float((C / den * G.abs()).sum(dtype=torch.float64))
        return score, self._diag(Fb, lam, eps, C, G)

    def block_head_scores(self, contribs: torch.Tensor, grads: torch.Tensor, fisher: Tensorish, layer: int | str,
                          head: int, block: str) -> torch.Tensor:
        """Batched scores: ``contribs`` [n_a, *shape], ``grads`` [n_b, *shape] → [n_a, n_b].

        One Fisher block read and one matmul: ``(C/(Î+λ)) @ |g|ᵀ`` over the flattened block.
        """
        sl = self.indexer.block_slice(layer, head, block)
        Fb = self.fisher_block(fisher, sl)
        den, _ = self._denominator(Fb, self.eps, self.ridge, self.ridge_rel)
        C = contribs[:, sl.rows, sl.cols].float().cpu().reshape(contribs.shape[0], -1)
        G = grads[:, sl.rows, sl.cols].float().cpu().abs().reshape(grads.shape[0], -1)
        return (C / den.reshape(1, -1)).double() @ G.double().T

    def heatmap(self, contribs: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
                fisher: Mapping[str, Tensorish], layers: Iterable[int | str] | None = None,
                heads: Iterable[int] | None = None, blocks: Iterable[str] = BLOCKS,
                progress: bool | None = None) -> dict[str, Any]:
        """Mean interference over all (i, j) pairs, per block: ``{"Q": array [layers, heads], ...}``.

        ``contribs``/``grads`` map parameter names to per-sample tensors [n, *shape];
        ``fisher`` maps them to the Fisher (e.g. ``collector.full_fisher(task)``). Also
        returns ``"layers"``, ``"heads"`` and ``"scores"`` ({block: [n_a, n_b, L, H]}).
        ``progress``: a bar of scored head blocks (None: on a terminal only).
        """
        layers = list(self.indexer.layers if layers is None else layers)
        heads = list(range(self.indexer.num_heads) if heads is None else heads)
        blocks = list(blocks)
        out: dict[str, Any] = {"layers": layers, "heads": heads, "scores": {}}
        with progress_bar(len(blocks) * len(layers) * len(heads), progress, "QK-OV scores", unit="block") as bar:
            self._score(out, contribs, grads, fisher, layers, heads, blocks, bar)
        first = next(iter(out["scores"].values()))
        ids = (list(range(first.shape[0])), list(range(first.shape[1])))
        out["sample_ids"] = ids
        out["top_conflicts"] = {b: top_conflicts(sc, layers, heads, *ids) for b, sc in out["scores"].items()}
        return out

    def heatmap_from_store(self, store: Any, task_a: str, task_b: str, fisher: str = "ema",
                           fisher_task: str | None = None, layers: Iterable[int | str] | None = None,
                           heads: Iterable[int] | None = None, blocks: Iterable[str] = "QKVO",
                           memory_budget: int | None = None, device: Any = None,
                           progress: bool | None = None) -> dict[str, Any]:
        """The heat map straight from a store's per-sample gradients, out of core (Phase 6 at 7B).

        For each (layer, head, block): task A's ``C_i = g_i²/T_i`` ``[n_a, block]``, task B's
        ``|g_j|/T_j`` ``[n_b, block]`` and the Fisher block (``fisher="ema"``: the EMA of
        ``fisher_task``, default task A; ``"contribution"``: ``mean_i C_i``), then one matmul
        ``(C/(Î+λ)) @ |g|ᵀ`` on ``device`` (default CPU). Reads run ahead on threads, within
        ``memory_budget`` (default: the store's); a subset of layers, heads or blocks reads
        only their chunks. Returns what :meth:`heatmap` does: ``scores`` [n_a, n_b, L, H]
        per block, the [L, H] means, ``top_conflicts`` with the stores' sample ids.

        Usage: ``qk.heatmap_from_store(store, "math", "code", fisher="contribution", device="cuda")``.
        """
        return phase6.heatmap_from_store(self, store, task_a, task_b, fisher=fisher, fisher_task=fisher_task,
                                  layers=None if layers is None else list(layers),
                                  heads=None if heads is None else list(heads), blocks=list(blocks),
                                  memory_budget=memory_budget, device=device, progress=progress)

    def _score(self, out: dict[str, Any], contribs: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
               fisher: Mapping[str, Tensorish], layers: list[int | str], heads: list[int], blocks: list[str],
               bar: Any) -> None:
        for b in blocks:
            b = b.upper()
            first = self.indexer.param_name(layers[0], b)
            n_a, n_b = contribs[first].shape[0], grads[first].shape[0]
            scores = torch.zeros(n_a, n_b, len(layers), len(heads), dtype=torch.float64)
            for li, layer in enumerate(layers):
                name = self.indexer.param_name(layer, b)
                for key, src in (("contribs", contribs), ("grads", grads), ("fisher", fisher)):
                    if name not in src:
                        raise UnknownParamError(f"{key} has no entry for {name!r}." + close_matches(name, src))
                for hi, h in enumerate(heads):
                    scores[:, :, li, hi] = self.block_head_scores(contribs[name], grads[name], fisher[name], layer, h, b)
                    bar.update(1)
            out["scores"][b] = scores
            out[b] = scores.mean(dim=(0, 1)).numpy()

    @staticmethod
    def _diag(Fb: torch.Tensor, lam: float, eps: float, C: torch.Tensor, G: torch.Tensor) -> dict[str, float]:
        flat = Fb.reshape(-1)
        return {
            "fisher_min": float(flat.min()) if flat.numel() else math.nan,
            "fisher_median": float(flat.median()) if flat.numel() else math.nan,
            "fisher_max": float(flat.max()) if flat.numel() else math.nan,
            "frac_below_eps": float((flat < eps).float().mean()) if flat.numel() else math.nan,
            "ridge_applied": lam,
            "contrib_norm": float(C.norm()),
            "grad_norm": float(G.norm()),
        }


def heatmap_png(heat: Mapping[str, Any], path: str, title: str = "QK-OV interference") -> str:
    """Draw a QK-OV heat map, one [layers x heads] panel per block, into one PNG; returns ``path``.

    ``heat`` is what :meth:`QKOVInterference.heatmap` returns (``{"Q": [L, H], ...,
    "layers": [...]}``); needs matplotlib (``pip install 'fisherstore[plot]'``).
    Usage: ``fisherstore.heatmap_png(qk.heatmap(C, g, F), "qkov.png")``.
    """
    blocks = [b for b in BLOCKS if b in heat]
    plt, fig, axes = figure(1, len(blocks), (3.2, 3.0), what="heatmap_png")
    for ax, b in zip(axes[0], blocks):
        arr = np.asarray(heat[b])
        panel(fig, ax, arr, list(heat.get("layers", range(arr.shape[0]))), b, "magma")
    return save(plt, fig, path, title)
