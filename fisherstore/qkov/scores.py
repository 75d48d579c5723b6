"""QK-OV interference ("Phase 6"): Fisher-normalised scores of sample pairs, per (layer, head, block).

For samples i (task A) and j (task B), layer ℓ, head h and block B ∈ {Q, K, V, O}:

    M^B_{ij,ℓ,h} = Σ_{k ∈ slice(ℓ,h,B)} C_{i,k} / (max(Î_k, ε) + λ) · |g_{j,k}|

with ``λ = ridge``, or ``max(ridge, ridge_rel · median(Î_slice))`` when ``ridge_rel > 0``.
The slice is one head block (:mod:`.indexer`), so with a head-chunked store each score
reads one chunk. :meth:`QKOVInterference.heatmap` scores tensors in RAM;
:meth:`QKOVInterference.heatmap_from_store` reads a store's per-sample gradients block by
block, out of core (:mod:`.outofcore`).

Usage::

    qk = QKOVInterference(QKOVIndexer.from_model(model))
    score, diag = qk.block_head_score(C_i, g_j, fisher, layer=3, head=5, block="Q")
    heat = qk.heatmap_from_store(store, "math", "code")
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import cachetools
import torch

from ..engine.dist import RankGroup
from ..errors import (
    HeadIndexError,
    InvalidArgumentError,
    LayoutError,
    RankFailedError,
    UnknownParamError,
    close_matches,
)
from ..progress import progress_bar
from ..spec.layout import BLOCKS
from ..spec.samples import token_divisors
from ..store.lazy import LazyFisher
from .indexer import BlockHeadSlice, QKOVIndexer
from .outofcore import (
    BlockJob,
    block_bytes,
    block_inputs,
    check_block_inputs,
    deal_blocks,
    plan_blocks,
    scoring_threads,
    top_conflicts,
    weighted_gram,
)

__all__ = ["QKOVInterference"]

Tensorish = torch.Tensor | LazyFisher


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
        returns ``"layers"``, ``"heads"``, ``"scores"`` ({block: [n_a, n_b, L, H]}) and ``"group_size"``
        ({layer: H / H_kv}, for the figures' K/V labels).
        ``progress``: a bar of scored head blocks (None: on a terminal only).
        """
        layers, heads, blocks = self.selection(layers, heads, blocks)
        with progress_bar(len(blocks) * len(layers) * len(heads), progress, "QK-OV scores", unit="block") as bar:
            scores = self._score(contribs, grads, fisher, layers, heads, blocks, bar)
        first = next(iter(scores.values()))
        return {**_result(scores, layers, heads, list(range(first.shape[0])), list(range(first.shape[1]))),
                "group_size": self.group_sizes(layers)}

    def heatmap_from_store(self, store: Any, task_a: str, task_b: str, fisher: str = "ema",
                           fisher_task: str | None = None, layers: Iterable[int | str] | None = None,
                           heads: Iterable[int] | None = None, blocks: Iterable[str] = "QKVO",
                           memory_budget: int | None = None, device: Any = None,
                           progress: bool | None = None, *, top_k: int = 100,
                           group: RankGroup | None = None) -> dict[str, Any]:
        """The heat map straight from a store's per-sample gradients, out of core (Phase 6 at 7B).

        For each (layer, head, block): task A's ``C_i = g_i²/T_i`` ``[n_a, block]``, task B's
        ``|g_j|/T_j`` ``[n_b, block]`` and the Fisher block (``fisher="ema"``: the EMA of
        ``fisher_task``, default task A; ``"contribution"``: ``mean_i C_i``), then one matmul
        ``(C/(Î+λ)) @ |g|ᵀ`` on ``device`` (default CPU). Reads run ahead on threads, within
        ``memory_budget`` (default: the store's); a subset of layers, heads or blocks reads
        only their chunks. Returns what :meth:`heatmap` does: ``scores`` [n_a, n_b, L, H]
        per block, the [L, H] means, ``top_conflicts`` (``top_k`` per block) with the stores'
        sample ids. The parts are :mod:`fisherstore.qkov.outofcore`'s.

        Refused before any chunk is read: ``fisher="ema"`` on a task with no EMA step
        (:class:`~fisherstore.errors.NoEmaStepError`: its EMA is zeros), a task B (or
        ``fisher_task``) whose shapes or heads differ from task A's
        (:class:`~fisherstore.errors.TaskMismatchError`), an indexer whose layouts are not
        task A's (:class:`~fisherstore.errors.LayoutError`), and a selection of no layers,
        heads or blocks (:class:`~fisherstore.errors.InvalidArgumentError`).

        ``group``: a :class:`~fisherstore.RankGroup` of several processes, each making this
        call with the same arguments on the same store. The distinct blocks are dealt across
        the ranks, balanced by the bytes each reads (:func:`~fisherstore.qkov.outofcore.deal_blocks`);
        each rank reads and scores only its own, and every rank returns the whole heat map,
        what one process returns (scores equal to fp32 tolerance, the same top conflicts).
        A refusal, or a failed read, on any rank makes every rank raise: the rank that met it
        its own error, every other one a :class:`~fisherstore.errors.RankFailedError` naming
        it; ranks whose plans differ (other arguments, another commit of the store) raise a
        ``RankFailedError`` naming the first difference. None (default): this process alone.

        Usage: ``qk.heatmap_from_store(store, "math", "code", fisher="contribution", device="cuda")``;
        on every rank: ``qk.heatmap_from_store(store, "math", "code", group=fisherstore.RankGroup.from_torch())``.
        """
        if group is not None and group.world_size > 1:
            try:
                return self._heatmap_on_group(group, store, task_a, task_b, fisher, fisher_task, layers, heads,
                                              blocks, memory_budget, device, progress, top_k)
            except BaseException as e:
                if not isinstance(e, Exception):  # an interrupt: tell the others, who would wait for this rank
                    group.leave(e)
                raise
        layers, heads, blocks = self.selection(layers, heads, blocks)
        budget = memory_budget if memory_budget is not None else store.memory_budget or (1 << 30)
        device = torch.device(device) if device is not None else torch.device("cpu")
        ids_a, ids_b = store.sample_ids(task_a), store.sample_ids(task_b)
        # The divisions by T_i and T_j move out of the sum: one [n_a, n_b] scale per block.
        t_a, t_b = (token_divisors(store.sample_tokens(t), torch.float64) for t in (task_a, task_b))
        per_pair = 1.0 / (t_a[:, None] * t_b[None, :])
        scores = {b: torch.zeros(len(ids_a), len(ids_b), len(layers), len(heads), dtype=torch.float64) for b in blocks}
        jobs = plan_blocks(self.indexer, layers, heads, blocks)
        self._check_indexer(store, task_a, jobs)
        inputs = block_inputs(store, jobs, task_a, task_b, fisher, fisher_task, budget)  # refuses before reading
        with progress_bar(len(jobs), progress, "QK-OV blocks", unit="block") as bar, scoring_threads(device):
            for job, gram in self._grams(inputs, device, bar):
                _place(scores, job, gram.to(torch.float64) * per_pair)
        return {**_result(scores, layers, heads, ids_a, ids_b, top_k), "group_size": self.group_sizes(layers)}

    def _grams(self, inputs: Iterable[tuple[BlockJob, torch.Tensor, torch.Tensor, torch.Tensor]], device: torch.device,
               bar: Any) -> Iterator[tuple[BlockJob, torch.Tensor]]:
        """Each block's ``Σ g_A² · (1/den) · |g_B|`` [n_a, n_b], fp32 on the CPU, not yet divided by ``T_i·T_j``."""
        for job, g_a, g_b, F in inputs:
            den, _ = self.denominator(F)
            yield job, weighted_gram(g_a, g_b, den.reciprocal_(), device).to("cpu")
            bar.update(1)

    def _heatmap_on_group(self, group: RankGroup, store: Any, task_a: str, task_b: str, fisher: str,
                          fisher_task: str | None, layers: Iterable[int | str] | None, heads: Iterable[int] | None,
                          blocks: Iterable[str], memory_budget: int | None, device: Any, progress: bool | None,
                          top_k: int) -> dict[str, Any]:
        """:meth:`heatmap_from_store` on several ranks: plan alike, read apart, gather, finish alike.

        1. Every rank plans on a snapshot of the store (the refusals, the blocks, what each
           reads) and the ranks exchange whether they could, with a fingerprint of the plan
           (one ``gather_agreed``): a refusal on any rank raises on every rank, and so do
           plans that differ, naming the first difference.
        2. The blocks are dealt by bytes (``deal_blocks``, the same on every rank); each rank
           reads and scores its own.
        3. The ranks exchange their blocks' fp32 scores (one ``gather_agreed``: a failed read
           raises on every rank), and each places them all and ranks the top conflicts on
           the whole tensor, as one process does: the same scores give the same list.
        """
        fisher_task = fisher_task or task_a
        err: Exception | None = None
        snap: Any = None
        fingerprint: list[tuple[str, int, str]] = []
        try:
            try:
                # Everything that can refuse comes before the first collective, inside this try.
                layers, heads, blocks = self.selection(layers, heads, blocks)
                budget = memory_budget if memory_budget is not None else store.memory_budget or (1 << 30)
                device = torch.device(device) if device is not None else torch.device("cpu")
                # One commit for the plan and the reads: what a rank plans is what it reads.
                snap = store.snapshot(list(dict.fromkeys([task_a, task_b, fisher_task])))
                ids_a, ids_b = snap.sample_ids(task_a), snap.sample_ids(task_b)
                jobs = plan_blocks(self.indexer, layers, heads, blocks)
                self._check_indexer(snap, task_a, jobs)
                check_block_inputs(snap, jobs, task_a, task_b, fisher, fisher_task)
                sizes = block_bytes(snap, jobs, task_a, task_b, fisher, fisher_task)
                t_a, t_b = (token_divisors(snap.sample_tokens(t), torch.float64) for t in (task_a, task_b))
                per_pair = 1.0 / (t_a[:, None] * t_b[None, :])
                fingerprint = _fingerprint([
                    ("tasks (task_a, task_b, fisher, fisher_task)", (task_a, task_b, fisher, fisher_task)),
                    ("layers", layers), ("heads", heads), ("blocks", blocks),
                    ("scoring (eps, ridge, ridge_rel, top_k)", (self.eps, self.ridge, self.ridge_rel, top_k)),
                    ("commits", getattr(snap, "commits", None)),
                    ("sample ids (task_a, task_b)", (ids_a, ids_b)),
                    ("sample tokens", (t_a.tolist(), t_b.tolist())),
                    ("blocks to read (parameter, region, bytes)",
                     [(j.name, j.region, j.head_pos, n) for j, n in zip(jobs, sizes)]),
                ])
            except Exception as e:
                err = e
            _same_plan(group.gather_agreed(fingerprint, err, "plan the heat map"))
            owners = deal_blocks(sizes, group.world_size)
            mine = [i for i, r in enumerate(owners) if r == group.rank]
            grams: list[torch.Tensor] = []
            try:
                inputs = block_inputs(snap, jobs, task_a, task_b, fisher, fisher_task, budget,
                                      read=[jobs[i] for i in mine])
                with progress_bar(len(mine), progress, f"QK-OV blocks (rank {group.rank})", unit="block") as bar, \
                        scoring_threads(device):
                    grams = [g for _, g in self._grams(inputs, device, bar)]
            except Exception as e:
                err = e
            part = (mine, torch.stack(grams) if grams else torch.zeros(0, len(ids_a), len(ids_b)))
            parts = group.gather_agreed(part if err is None else None, err,
                                        "read and score its blocks of the heat map")
        finally:
            if snap is not None:
                snap.close()
        scores = {b: torch.zeros(len(ids_a), len(ids_b), len(layers), len(heads), dtype=torch.float64) for b in blocks}
        placed = 0
        for idx, got in parts:
            for i, gram in zip(idx, got):
                _place(scores, jobs[i], gram.to(torch.float64) * per_pair)
            placed += len(idx)
        if placed != len(jobs):  # the deal is the same on every rank; this guards the code, not the caller
            raise RankFailedError(f"the ranks returned {placed} blocks of the heat map's {len(jobs)}", rank=None)
        return {**_result(scores, layers, heads, ids_a, ids_b, top_k), "group_size": self.group_sizes(layers)}

    def selection(self, layers: Iterable[int | str] | None = None, heads: Iterable[int] | None = None,
                  blocks: Iterable[str] = BLOCKS) -> tuple[list[int | str], list[int], list[str]]:
        """The layers, heads and blocks a heat map scores (None: all); a selection of none is refused.

        An empty ``blocks`` (``""``), ``layers`` or ``heads`` would score nothing and return
        an empty map as if it were a result. Blocks are upper-cased, each kept once.
        Usage: ``layers, heads, blocks = qk.selection(heads=[0, 1], blocks="qk")``.
        """
        layers = list(self.indexer.layers if layers is None else layers)
        heads = list(range(self.indexer.num_heads) if heads is None else heads)
        blocks = list(dict.fromkeys(b.upper() if isinstance(b, str) else b for b in blocks))
        for what, chosen, valid in (("layers", layers, ", ".join(repr(k) for k in self.indexer.layers)),
                                    ("heads", heads, f"0 to {self.indexer.num_heads - 1}"),
                                    ("blocks", blocks, ", ".join(BLOCKS))):
            if not chosen:
                raise InvalidArgumentError(f"the selection of {what} is empty, so there is nothing to score; choose "
                                           f"one or more of {valid} (or None for all)")
        return layers, heads, blocks

    def group_sizes(self, layers: Iterable[int | str]) -> dict[int | str, int]:
        """``{layer: H / H_kv}``: query heads per key/value head, so a figure can name the kv head of a K/V column.

        A heat map's columns are query heads; its K/V value at query head ``h`` is kv head
        ``h // g``'s (views/figures.py's ``KV_RULE``). A layer with no K or V weight is left out.
        """
        out: dict[int | str, int] = {}
        for layer in layers:
            for b in ("K", "V"):
                try:
                    out[layer] = self.indexer.layouts[self.indexer.param_name(layer, b)].group_size
                    break
                except HeadIndexError:
                    continue
        return out

    def _check_indexer(self, store: Any, task: str, jobs: Sequence[BlockJob]) -> None:
        """Refuse an indexer whose layouts are not the ones ``task`` records (a model other than the task's)."""
        held: dict[str, tuple[Any, tuple[int, ...]]] = {}
        for job in jobs:  # every job: a region past the end would be clipped in silence (outofcore's ``bounded``)
            if job.name not in held:
                held[job.name] = (store.layout(task, job.name), tuple(store.param(task, job.name).shape))
            (stored, shape), mine = held[job.name], self.indexer.layouts[job.name]
            outside = any(s.stop is not None and s.stop > n for s, n in zip(job.region, shape))
            if (stored is not None and stored != mine) or outside:
                raise LayoutError(
                    f"the indexer's layout of {job.name!r} is {mine!r}, but task {task!r} holds it with shape "
                    f"{shape} and layout {stored!r}: the indexer comes from another model. Index the task's "
                    f"own layouts (QKOVIndexer.from_store(store, {task!r})) or the model it was collected from"
                )

    def _score(self, contribs: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
               fisher: Mapping[str, Tensorish], layers: list[int | str], heads: list[int], blocks: list[str],
               bar: Any) -> dict[str, torch.Tensor]:
        out = {}
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
            out[b] = scores
        return out

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


def _place(scores: dict[str, torch.Tensor], job: BlockJob, s: torch.Tensor) -> None:
    """One block's [n_a, n_b] scores into the heat map: a K/V block scores every query head of its group alike."""
    for hi in job.head_pos:
        scores[job.block][:, :, job.layer_pos, hi] = s


def _fingerprint(fields: Sequence[tuple[str, Any]]) -> list[tuple[str, int, str]]:
    """``(field, crc32 of its repr, its repr cut short)`` for each field of a plan, to compare across ranks."""
    out = []
    for name, value in fields:
        text = repr(value)
        out.append((name, zlib.crc32(text.encode()), text if len(text) <= 160 else text[:157] + "..."))
    return out


def _same_plan(views: Sequence[list[tuple[str, int, str]]]) -> None:
    """Raise :class:`RankFailedError` on every rank when a rank's plan differs from rank 0's, naming the field.

    Every rank holds the same ``views`` (one per rank, from one gather), so every rank raises alike.
    """
    for k, (field, digest, text) in enumerate(views[0]):
        for r, view in enumerate(views[1:], start=1):
            if len(view) != len(views[0]) or view[k][:2] != (field, digest):
                theirs = view[k][2] if k < len(view) else "missing"
                raise RankFailedError(
                    f"rank {r} planned another heat map than rank 0: its {field} is {theirs} where rank 0's is "
                    f"{text}. Every rank must call heatmap_from_store with the same arguments, on the same "
                    "commit of the store (open it on every rank after the writer's last flush)", rank=r)


def _result(scores: dict[str, torch.Tensor], layers: list[Any], heads: list[int], ids_a: Sequence[Any],
            ids_b: Sequence[Any], top_k: int = 100) -> dict[str, Any]:
    """A heat map's result: per block the scores [n_a, n_b, L, H] and their [L, H] mean over pairs, the top
    conflicts with sample ids, and the axes."""
    out: dict[str, Any] = {"layers": layers, "heads": heads, "scores": scores, "sample_ids": (ids_a, ids_b),
                           "top_conflicts": {b: top_conflicts(s, layers, heads, ids_a, ids_b, top_k)
                                             for b, s in scores.items()}}
    for b, s in scores.items():
        out[b] = s.mean(dim=(0, 1)).numpy()
    return out
