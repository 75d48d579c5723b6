"""Phase 6 out of core: every (layer, head, block) read straight from a store, within a budget.

The QK-OV heat map needs, per (layer, head, block), task A's contributions ``C_i =
g_i²/T_i`` over the block, task B's ``|g_j|/T_j`` over it, and a Fisher block (the EMA
one, or the contribution one ``mean_i C_i``). :func:`block_inputs` reads them block by
block on a few threads, keeping as many blocks in flight as the memory budget allows, so
the disk never waits for the matmul and the matmul never waits for the disk;
:func:`weighted_gram` scores a block in one cache-sized pass per tile. A GQA key /
value block is read once for all the query heads that share it.

:func:`compare_fishers` and :func:`plot_comparison` set the EMA Fisher (Option 2) beside
the contribution Fisher (Option 1) per (layer, head, block): rank correlation and mass
ratio, as data and as a picture.

Usage::

    from fisherstore.qkov import QKOVIndexer, QKOVInterference
    qk = QKOVInterference(QKOVIndexer.from_store(store, "math"))
    heat = qk.heatmap_from_store(store, "math", "code", fisher="contribution")
    rows = compare_fishers(store, "math")            # [{"layer", "head", "block", "spearman", "mass_ratio"}, ...]
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidArgumentError
from .figures import figure, panel, save
from .regions import Region, region_shape

__all__ = ["BlockJob", "plan_blocks", "block_inputs", "weighted_gram", "contribution_mean", "heatmap_from_store", "top_conflicts", "compare_fishers",
           "plot_comparison", "FISHERS"]

FISHERS = ("ema", "contribution")


@dataclass(frozen=True)
class BlockJob:
    """One block to read: the parameter, its region, and the query heads (positions in ``heads``) it scores."""

    layer: Any
    layer_pos: int
    block: str
    name: str
    region: Region
    head_pos: tuple[int, ...]


def plan_blocks(indexer: Any, layers: Sequence[Any], heads: Sequence[int], blocks: Sequence[str]) -> list[BlockJob]:
    """The distinct blocks of (layers × heads × blocks): query heads sharing a K/V block share one job."""
    jobs = []
    for b in blocks:
        for li, layer in enumerate(layers):
            by_region: dict[tuple, list[int]] = {}
            for hi, h in enumerate(heads):
                sl = indexer.block_slice(layer, h, b)
                by_region.setdefault((sl.param_name, sl.rows.start, sl.rows.stop, sl.cols.start, sl.cols.stop),
                                     []).append(hi)
            for (name, *_), pos in by_region.items():
                sl = indexer.block_slice(layer, heads[pos[0]], b)
                jobs.append(BlockJob(layer, li, b, name, (sl.rows, sl.cols), tuple(pos)))
    return jobs


def block_inputs(store: Any, jobs: Sequence[BlockJob], task_a: str, task_b: str, fisher: str,
                 fisher_task: str | None, memory_budget: int, workers: int = 4
                 ) -> Iterator[tuple[BlockJob, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(job, g_a [n_a, *block], g_b [n_b, *block], Fisher [*block])`` for each job, reading ahead.

    The gradients come as stored (their own dtype, not yet divided by ``T``): the scorer
    fuses the conversion, the squares and the divisions into its matmul, tile by tile, so
    each byte crosses memory once (:func:`weighted_gram`). The Fisher block is fp32: the
    EMA of ``fisher_task`` (default task A) or its contribution Fisher. Blocks in flight
    are bounded by ``memory_budget``.
    """
    if fisher not in FISHERS:
        raise InvalidArgumentError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    fisher_task = fisher_task or task_a
    n_a, n_b = len(store.sample_ids(task_a)), len(store.sample_ids(task_b))
    if not n_a or not n_b:
        empty = task_a if not n_a else task_b
        raise InvalidArgumentError(f"task {empty!r} has no per-sample gradients; collect them first "
                                   "(FisherCollector.collect_samples)")

    def read(job: BlockJob) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        region = _bounded(job.region, store.param(task_a, job.name).shape)
        g_a = store.samples(task_a, job.name).read(None, region)
        g_b = store.samples(task_b, job.name).read(None, region)
        if fisher == "ema":
            F = store.fisher(fisher_task, job.name)[region]
        elif fisher_task == task_a:  # the contribution Fisher of A over this block: no second read
            F = contribution_mean(g_a, store.sample_tokens(task_a))
        else:
            F = store.samples(fisher_task, job.name).contributions(region=region).mean(0)
        return g_a, g_b, F

    if not jobs:
        return
    per_job = max(4 * (n_a + n_b + 1) * _numel(jobs[0].region, store.param(task_a, jobs[0].name).shape), 1)
    window = max(1, min(2 * workers, memory_budget // per_job))
    with ThreadPoolExecutor(max(1, min(workers, window)), thread_name_prefix="fisherstore-phase6") as ex:
        pending: deque = deque()
        it = iter(jobs)
        for job in itertools.islice(it, window):
            pending.append((job, ex.submit(read, job)))
        while pending:
            job, fut = pending.popleft()
            g_a, g_b, F = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(read, nxt)))
            yield job, g_a, g_b, F


#: Elements per row of one tile of :func:`weighted_gram`: two [n, TILE] fp32 operands of a
#: few dozen samples stay in the CPU's cache while they are squared, weighted and multiplied.
TILE = 16384


def weighted_gram(g_a: torch.Tensor, g_b: torch.Tensor, w: torch.Tensor, device: torch.device,
                  tile: int = TILE) -> torch.Tensor:
    """``S[i, j] = Σ_e g_a[i, e]² · w[e] · |g_b[j, e]|`` in fp32, for [n, E] gradients of any float dtype.

    On the CPU it runs tile by tile along ``E``, so the conversion to fp32, the square, the
    weighting and the matmul touch each tile while it is in cache (about 4× faster than
    whole-tensor ops on a 2-core machine, whose memory bandwidth is the limit); on a GPU
    it is one fused pass.
    """
    n_a, n_b = g_a.shape[0], g_b.shape[0]
    g_a, g_b, w = g_a.reshape(n_a, -1), g_b.reshape(n_b, -1), w.reshape(-1)
    if device.type != "cpu":
        a = g_a.to(device).float().square_().mul_(w.to(device))
        return a @ g_b.to(device).float().abs_().T
    E = g_a.shape[1]
    out = torch.zeros(n_a, n_b, dtype=torch.float32)
    a_buf, b_buf = torch.empty(n_a, min(tile, E)), torch.empty(n_b, min(tile, E))
    for lo in range(0, E, tile):
        hi = min(E, lo + tile)
        a, b = a_buf[:, :hi - lo], b_buf[:, :hi - lo]
        a.copy_(g_a[:, lo:hi]).square_().mul_(w[lo:hi])
        b.copy_(g_b[:, lo:hi]).abs_()
        out.addmm_(a, b.T)
    return out


def contribution_mean(g: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``mean_i g_i² / max(T_i, 1)`` over the sample axis, fp32 (the contribution Fisher of a block)."""
    scale = 1.0 / (tokens.clamp_min(1).to(torch.float64) * g.shape[0])
    # square() and not square_(): an fp32 ``g`` is the caller's tensor, which .float() does not copy
    return (scale.to(torch.float32) @ g.reshape(g.shape[0], -1).float().square()).reshape(g.shape[1:])


def heatmap_from_store(qk: Any, store: Any, task_a: str, task_b: str, fisher: str = "ema",
                       fisher_task: str | None = None, layers: Sequence[Any] | None = None,
                       heads: Sequence[int] | None = None, blocks: Sequence[str] = "QKVO",
                       memory_budget: int | None = None, device: Any = None, top_k: int = 100,
                       progress: bool | None = None) -> dict[str, Any]:
    """The QK-OV heat map of ``qk`` (a :class:`~fisherstore.qkov.QKOVInterference`) straight from ``store``.

    Same content and shape as ``qk.heatmap``: per block ``scores[b]`` [n_a, n_b, L, H],
    ``out[b]`` the [L, H] mean over pairs, ``top_conflicts[b]`` with sample ids; plus
    ``layers``, ``heads``, ``sample_ids``. One fused matmul per distinct block, on ``device``:
    ``score[i, j] = Σ (g_i²/T_i) / den · |g_j|/T_j`` with ``den = max(Î, ε) + λ``.
    """
    from .progress import progress_bar

    layers = list(qk.indexer.layers if layers is None else layers)
    heads = list(range(qk.indexer.num_heads) if heads is None else heads)
    blocks = [b.upper() for b in blocks]
    budget = memory_budget if memory_budget is not None else store.memory_budget or (1 << 30)
    device = torch.device(device) if device is not None else torch.device("cpu")
    ids_a, ids_b = store.sample_ids(task_a), store.sample_ids(task_b)
    # The divisions by T_i and T_j move out of the sum: one [n_a, n_b] scale per block.
    t_a, t_b = (store.sample_tokens(t).clamp_min(1).to(torch.float64) for t in (task_a, task_b))
    per_pair = 1.0 / (t_a[:, None] * t_b[None, :])
    scores = {b: torch.zeros(len(ids_a), len(ids_b), len(layers), len(heads), dtype=torch.float64) for b in blocks}
    jobs = plan_blocks(qk.indexer, layers, heads, blocks)
    with progress_bar(len(jobs), progress, "QK-OV blocks", unit="block") as bar:
        for job, g_a, g_b, F in block_inputs(store, jobs, task_a, task_b, fisher, fisher_task, budget):
            den, _ = qk.denominator(F)
            s = weighted_gram(g_a, g_b, den.reciprocal_(), device).to("cpu", torch.float64) * per_pair
            for hi in job.head_pos:  # a K/V block scores every query head of its group alike
                scores[job.block][:, :, job.layer_pos, hi] = s
            bar.update(1)
    out: dict[str, Any] = {"layers": layers, "heads": heads, "scores": scores, "sample_ids": (ids_a, ids_b),
                           "top_conflicts": {b: top_conflicts(scores[b], layers, heads, ids_a, ids_b, top_k) for b in blocks}}
    for b in blocks:
        out[b] = scores[b].mean(dim=(0, 1)).numpy()
    return out


def top_conflicts(scores: torch.Tensor, layers: Sequence[Any], heads: Sequence[int], ids_a: Sequence[Any],
                  ids_b: Sequence[Any], k: int = 100) -> list[dict[str, Any]]:
    """The ``k`` largest scores of one block's [n_a, n_b, L, H] tensor, as records with sample ids."""
    flat = scores.reshape(-1)
    top = torch.topk(flat, min(k, flat.numel()))
    out = []
    for v, idx in zip(top.values.tolist(), top.indices.tolist()):
        i, j, li, hi = (int(x) for x in torch.unravel_index(torch.tensor(idx), scores.shape))
        out.append({"sample_i": ids_a[i], "sample_j": ids_b[j], "layer": layers[li], "head": heads[hi], "score": v})
    return out


def _bounded(region: Region, shape: Sequence[int]) -> Region:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, shape))


def _numel(region: Region, shape: Sequence[int]) -> int:
    return int(torch.Size(region_shape(_bounded(region, shape))).numel())


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two flattened tensors (ties broken by position)."""
    ra = torch.empty(a.numel(), dtype=torch.float64)
    rb = torch.empty(b.numel(), dtype=torch.float64)
    ra[a.reshape(-1).argsort()] = torch.arange(a.numel(), dtype=torch.float64)
    rb[b.reshape(-1).argsort()] = torch.arange(b.numel(), dtype=torch.float64)
    ra -= ra.mean()
    rb -= rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den else float("nan")


def compare_fishers(store: Any, task: str, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The EMA Fisher beside the contribution Fisher of ``task``, per (param, head, block).

    Each row: ``param``, ``layer`` (as the parameter name's layer key), ``head``, ``block``,
    ``spearman`` (rank correlation of the two blocks' elements), ``mass_ema``,
    ``mass_contribution`` and ``mass_ratio`` (contribution / EMA). Reads block by block.
    """
    from .models import layer_keys

    names = list(names) if names is not None else [
        n for n in store.params(task) if (store.layout(task, n) or None) is not None and store.layout(task, n).has_heads
        and not n.endswith("bias")]
    keys = layer_keys(names)
    rows = []
    for name in names:
        layout = store.layout(task, name)
        ema, contrib = store.fisher(task, name), store.contribution_fisher(task, name)
        for b in layout.blocks:
            step = layout.group_size if b in "KV" else 1
            for h in range(0, layout.num_heads, step):
                e, c = ema.head(h, b), contrib.head(h, b)
                me, mc = float(e.sum(dtype=torch.float64)), float(c.sum(dtype=torch.float64))
                rows.append({"param": name, "layer": keys.get(name), "head": h, "block": b,
                             "spearman": _spearman(e, c), "mass_ema": me, "mass_contribution": mc,
                             "mass_ratio": mc / me if me else float("nan")})
    return rows


def plot_comparison(rows: Sequence[dict[str, Any]], path: str, title: str = "EMA vs contribution Fisher") -> str:
    """Per block, a [layer × head] picture of the rank correlation and of log₁₀ of the mass ratio (PNG)."""
    import math

    import numpy as np

    blocks = [b for b in "QKVO" if any(r["block"] == b for r in rows)]
    layers = sorted({r["layer"] for r in rows}, key=lambda k: (isinstance(k, str), k))
    heads = sorted({r["head"] for r in rows})
    plt, fig, axes = figure(2, len(blocks), (3.2, 2.8), what="plot_comparison")
    from matplotlib.colors import Normalize

    for col, b in enumerate(blocks):
        for row, (field, label, cmap) in enumerate((("spearman", "rank corr.", "viridis"),
                                                    ("mass_ratio", "log10 mass ratio", "coolwarm"))):
            grid = np.full((len(layers), len(heads)), np.nan)
            for r in rows:
                v = r[field]
                if r["block"] != b or v is None:
                    continue  # no value is drawn blank, never as a plausible 0
                if field == "mass_ratio":
                    v = math.log10(v) if v > 0 else math.nan
                grid[layers.index(r["layer"]), heads.index(r["head"])] = v
            if field == "mass_ratio":
                lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
                norm = Normalize(-(lim or 1), lim or 1)
            else:
                norm = Normalize(-1, 1)
            panel(fig, axes[row][col], grid, layers, f"{b}: {label}", cmap, norm)
    return save(plt, fig, path, title)
