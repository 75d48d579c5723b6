"""Phase 6 out of core: the parts of a heat map read straight from a store, within a budget.

The QK-OV heat map (:meth:`~fisherstore.qkov.QKOVInterference.heatmap_from_store`) needs,
per (layer, head, block), task A's contributions ``C_i = g_i²/T_i`` over the block, task
B's ``|g_j|/T_j`` over it, and a Fisher block (the EMA one, or the contribution one
``mean_i C_i``). Its parts, each a function here:

* :func:`plan_blocks`: the distinct blocks to read; a GQA key / value block is read once
  for all the query heads that share it;
* :func:`require_ema_step` and :func:`check_same_geometry` (both in :func:`check_block_inputs`):
  the refusals before any read;
  an EMA with no step is all zeros (scores ~1/λ too large, yet finite), and a task B
  with other shapes or heads under the same names would be read through task A's blocks;
* :func:`block_inputs`: the blocks' inputs, read ahead on a few threads with as many
  blocks in flight as the memory budget allows, so the disk never waits for the matmul
  and the matmul never waits for the disk;
* :func:`block_bytes` and :func:`deal_blocks`: on a rank group, what each block reads and
  which rank reads it (balanced by bytes, the same deal on every rank);
* :func:`weighted_gram`: one block's scores in one cache-sized pass per tile;
* :func:`top_conflicts`: the largest scores, with the samples' ids.

Usage::

    jobs = plan_blocks(qk.indexer, layers, heads, "QKVO")
    for job, g_a, g_b, F in block_inputs(store, jobs, "math", "code", "ema", None, 1 << 30):
        s = weighted_gram(g_a, g_b, 1 / qk.denominator(F)[0], torch.device("cpu"))
"""

from __future__ import annotations

import contextlib
import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.iopool import read_ahead
from ..errors import InvalidArgumentError, NoEmaStepError, TaskMismatchError
from ..spec.regions import Region, bounded, region_shape
from ..spec.samples import contribution_mean

__all__ = ["FISHERS", "BlockJob", "plan_blocks", "block_inputs", "weighted_gram", "top_conflicts", "TILE", "scoring_threads",
           "require_ema_step", "check_same_geometry", "GEOMETRY_FIELDS", "USE_CONTRIBUTION", "block_bytes",
           "deal_blocks", "check_block_inputs"]

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


#: What of a parameter the scoring reads through task A's block regions, in the order a mismatch is named:
#: its shape, then its layout's fields (``blocks`` follows from ``kind`` and ``fused``). ``shards``, ``order``
#: and ``v_head_dim`` place the blocks of the grouped, sharded and MLA fusions: two tasks that differ only there
#: have the same shapes, yet their block regions are other rows.
GEOMETRY_FIELDS = ("shape", "layout", "kind", "num_heads", "num_kv_heads", "head_dim", "head_axis", "fused",
                   "transposed", "shards", "order", "v_head_dim", "blocks")


#: What to do instead of reading an EMA with no step, in the library's words.
USE_CONTRIBUTION = ('use fisher="contribution" (the mean of its per-sample contributions), or collect its EMA '
                    "first with FisherCollector.collect_fisher")


def require_ema_step(store: Any, task: str, use: str = "normalise scores", instead: str = USE_CONTRIBUTION) -> None:
    """Refuse to read the EMA Fisher of a task that holds no EMA step (:class:`NoEmaStepError`).

    A task filled only by ``collect_samples`` has an EMA of zeros: a denominator of
    ``ε + λ`` makes every score ~1/λ too large, yet finite, so nothing downstream notices.
    ``use`` says what the caller would have done with it, ``instead`` what to do.
    Usage: ``require_ema_step(store, "math")``.
    """
    if store.metadata(task).get("estimator") == "anchor":  # weights θ* kept for EWC (store.save_anchor)
        raise InvalidArgumentError(
            f"task {task!r} holds anchor weights θ* (store.save_anchor), not a Fisher, so it cannot {use}; use the "
            f"Fisher task it anchors ({store.metadata(task).get('user', {}).get('anchor_of')!r})")
    if store.step(task) == 0:
        raise NoEmaStepError(
            f"task {task!r} holds no EMA step (step 0: only per-sample gradients from collect_samples), so its EMA "
            f"Fisher is all zeros and cannot {use}; {instead}"
        )


def _geometry(store: Any, task: str, name: str) -> dict[str, Any]:
    info = store.param(task, name)
    lay = info.layout
    out: dict[str, Any] = {"shape": tuple(info.shape), "layout": "none" if lay is None else "recorded"}
    if lay is not None:
        out.update({f: getattr(lay, f) for f in GEOMETRY_FIELDS[2:-1]})
        out["blocks"] = tuple(lay.blocks) if lay.has_heads else ()
    return out


def check_same_geometry(store: Any, task_a: str, task_b: str, names: Sequence[str], role: str = "task B",
                        role_a: str = "task A") -> None:
    """Refuse a ``task_b`` whose parameters ``names`` differ from ``task_a``'s (:class:`TaskMismatchError`).

    Task B (or the task whose Fisher normalises) is read through task A's block regions:
    a model with other shapes, or other head counts under the same parameter names,
    would be read with no error and scored as garbage. The error names the first
    difference: the parameter, the field (:data:`GEOMETRY_FIELDS`), and both values.
    Usage: ``check_same_geometry(store, "math", "code", ["model.layers.0.self_attn.q_proj.weight"])``.
    """
    if task_b == task_a:
        return
    have = set(store.params(task_b))
    for name in names:
        if name not in have:
            raise TaskMismatchError(
                f"{role} {task_b!r} has no parameter {name!r}, which {role_a} {task_a!r} has; use tasks collected "
                "from one model (the same parameter names, shapes and heads)"
            )
        ga, gb = _geometry(store, task_a, name), _geometry(store, task_b, name)
        for field in GEOMETRY_FIELDS:
            if ga.get(field) != gb.get(field):
                raise TaskMismatchError(
                    f"{role} {task_b!r} does not match {role_a} {task_a!r} at parameter {name!r}: its {field} is "
                    f"{gb.get(field)!r} in {task_b!r} and {ga.get(field)!r} in {task_a!r}. {role[0].upper()}"
                    f"{role[1:]} is read through {role_a}'s head blocks, so use tasks collected from one model "
                    "(the same parameter names, shapes and heads)"
                )


def block_inputs(store: Any, jobs: Sequence[BlockJob], task_a: str, task_b: str, fisher: str,
                 fisher_task: str | None, memory_budget: int, workers: int = 4, *,
                 read: Sequence[BlockJob] | None = None
                 ) -> Iterator[tuple[BlockJob, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(job, g_a [n_a, *block], g_b [n_b, *block], Fisher [*block])`` for each job, reading ahead.

    The gradients come as stored (their own dtype, not yet divided by ``T``): the scorer
    fuses the conversion, the squares and the divisions into its matmul, tile by tile, so
    each byte crosses memory once (:func:`weighted_gram`). The Fisher block is fp32: the
    EMA of ``fisher_task`` (default task A) or its contribution Fisher. Blocks in flight
    are bounded by ``memory_budget``.

    Refused before any read (this call raises; the iterator it returns only reads):
    a task without per-sample gradients, ``fisher="ema"`` on a task with no EMA step
    (:class:`NoEmaStepError`), and a task B or Fisher task whose parameters differ from
    task A's (:class:`TaskMismatchError`).

    ``read``: the jobs to read, a part of ``jobs`` (default: all of them). The refusals
    check every job of ``jobs`` all the same, so the ranks of a group that each read their
    own part (:func:`deal_blocks`) refuse alike.
    """
    if fisher not in FISHERS:
        raise InvalidArgumentError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    fisher_task = fisher_task or task_a
    # Every block at one commit of each task, however long the sweep: a pinned snapshot
    # (FisherStore.snapshot), released when the reading generator is done with it.
    store = store.snapshot(list(dict.fromkeys([task_a, task_b, fisher_task])))
    check_block_inputs(store, jobs, task_a, task_b, fisher, fisher_task)
    return _read_blocks(store, jobs if read is None else read, task_a, task_b, fisher, fisher_task, memory_budget,
                        workers)


def check_block_inputs(store: Any, jobs: Sequence[BlockJob], task_a: str, task_b: str, fisher: str,
                       fisher_task: str | None = None) -> None:
    """The refusals of :func:`block_inputs`, on their own: they read metadata only, never a chunk.

    A task without per-sample gradients (:class:`~fisherstore.errors.InvalidArgumentError`),
    ``fisher="ema"`` on a task with no EMA step (:class:`NoEmaStepError`), a task B or
    Fisher task whose parameters differ from task A's (:class:`TaskMismatchError`).
    Usage: ``check_block_inputs(snapshot, jobs, "math", "code", "ema")``.
    """
    if fisher not in FISHERS:
        raise InvalidArgumentError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    fisher_task = fisher_task or task_a
    samples_needed = [task_a, task_b] + ([fisher_task] if fisher == "contribution" else [])
    for task in samples_needed:
        if not store.sample_ids(task):
            raise InvalidArgumentError(f"task {task!r} has no per-sample gradients; collect them first "
                                       "(FisherCollector.collect_samples)")
    if fisher == "ema":
        require_ema_step(store, fisher_task, "normalise the scores (the denominator would be ε + λ)")
    names = list(dict.fromkeys(job.name for job in jobs))
    check_same_geometry(store, task_a, task_b, names)
    check_same_geometry(store, task_a, fisher_task, names, role="Fisher task")


def block_bytes(store: Any, jobs: Sequence[BlockJob], task_a: str, task_b: str, fisher: str,
                fisher_task: str | None = None) -> list[int]:
    """What reading each job costs, in bytes as stored: its per-sample chunks of both tasks, and its Fisher block.

    Per job: the block's elements times ``n_a`` samples of task A and ``n_b`` of task B in
    their stored dtypes, plus the Fisher block: fp32 for ``fisher="ema"``, nothing for the
    contribution Fisher of task A (it is computed from task A's gradients already read),
    ``fisher_task``'s samples for the contribution Fisher of another task. It weighs the
    jobs for :func:`deal_blocks`; compressed chunks read fewer bytes, in proportion.
    Usage: ``sizes = block_bytes(store, jobs, "math", "code", "ema")``.
    """
    fisher_task = fisher_task or task_a
    counts = {t: len(store.sample_ids(t)) for t in dict.fromkeys([task_a, task_b, fisher_task])}

    def stored(task: str, name: str) -> int:  # bytes of every sample of ``task`` per element
        return counts[task] * store.samples(task, name).dtype.itemsize

    per_element: dict[str, int] = {}  # parameter -> bytes read per element of one of its blocks
    out = []
    for job in jobs:
        if job.name not in per_element:
            per = stored(task_a, job.name) + stored(task_b, job.name)
            if fisher == "ema":
                per += 4  # the EMA is fp32 on disk
            elif fisher_task != task_a:
                per += stored(fisher_task, job.name)
            per_element[job.name] = per
        out.append(math.prod(region_shape(bounded(job.region, store.param(task_a, job.name).shape)))
                   * per_element[job.name])
    return out


def deal_blocks(sizes: Sequence[int], world_size: int) -> list[int]:
    """The rank that reads each job, balanced by bytes: the same deal on every rank, from ``sizes`` alone.

    Greedy longest-processing-time: the jobs from the largest to the smallest (ties: in
    plan order), each to the rank with the fewest bytes so far (ties: the lowest rank).
    No rank then reads more than 4/3 of the largest share of the best deal, and with equal
    sizes the deal is round-robin.
    Usage: ``owners = deal_blocks(block_bytes(store, jobs, "a", "b", "ema"), group.world_size)``.
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise InvalidArgumentError(f"world_size must be a positive number of ranks, got {world_size!r}")
    loads = [(0, r) for r in range(world_size)]  # a heap of (bytes so far, rank)
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + int(sizes[i]), r))
    return owners


def _read_blocks(store: Any, jobs: Sequence[BlockJob], task_a: str, task_b: str, fisher: str, fisher_task: str,
                 memory_budget: int, workers: int) -> Iterator[tuple[BlockJob, torch.Tensor, torch.Tensor, torch.Tensor]]:
    n_a, n_b = len(store.sample_ids(task_a)), len(store.sample_ids(task_b))

    def read(job: BlockJob) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        region = bounded(job.region, store.param(task_a, job.name).shape)
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
    first = region_shape(bounded(jobs[0].region, store.param(task_a, jobs[0].name).shape))
    per_job = max(4 * (n_a + n_b + 1) * math.prod(first), 1)
    window = min(2 * workers, memory_budget // per_job)
    for job, (g_a, g_b, F) in read_ahead(jobs, read, window, workers, "fisherstore-phase6"):
        yield job, g_a, g_b, F


@contextlib.contextmanager
def scoring_threads(device: torch.device) -> Iterator[None]:
    """Score on all cores but one while the block reads run (CPU only; torch's thread count is restored after).

    The reads of an out-of-core heat map are CPU work too: the kernel copies every chunk
    out of the page cache, the crc32c of every chunk is checked, and the reading threads
    run Python. With torch's intra-op threads on every core, each of the ~160 parallel
    regions per head block waits at its barrier for a thread the readers have taken the
    core from: on a 2-core machine the scoring then ran 3-5x slower than on one thread
    (benchmarks/results/reads20.md). One core left to the readers keeps both busy.
    Usage: ``with scoring_threads(torch.device("cpu")): ... weighted_gram(...) ...``.
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or before <= 1:
        yield
        return
    torch.set_num_threads(before - 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
