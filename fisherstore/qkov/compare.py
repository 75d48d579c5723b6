"""Two Fishers of one model side by side, per (layer, head, block): do they rank the same?

:func:`compare_fishers` sets a task's EMA Fisher (Option 2: what a collector streams) beside
its contribution Fisher (Option 1: ``mean_i C_i`` over its stored per-sample gradients), two
estimates of one quantity. :func:`compare_tasks` sets two *tasks'* EMA Fishers side by side:
the empirical Fisher of a batch beside its true Fisher (collected with
``FisherCollector(fisher_type="exact")`` or ``"mc"``), or any two tasks over the same
parameters. Either way, block by block: the rank correlation of their elements and the ratio
of their masses. :func:`summarize_comparison` reduces the rows to one line per block kind;
:func:`fisherstore.views.plots.plot_comparison` and
:func:`~fisherstore.views.plots.plot_fisher_types` draw them.

Usage::

    rows = compare_fishers(store, "math")   # [{"param", "layer", "head", "block", "spearman", "mass_ratio", ...}]
    rows = compare_tasks(store, "emp", "exact")   # [{"a", "b", "fisher_type_a", ..., "spearman", "mass_ratio"}]
    summarize_comparison(rows)   # [{"block": "Q", "median_spearman": ..., ...}, ...]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError, UnknownParamError
from ..spec.layers import layer_keys
from .outofcore import check_same_geometry, require_ema_step

__all__ = ["compare_fishers", "compare_tasks", "summarize_comparison", "spearman"]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two flattened tensors (ties broken by position); NaN for constant ones."""
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

    Refused: a task with no EMA step (:class:`~fisherstore.errors.NoEmaStepError`: its EMA
    is zeros, every ratio infinite and every correlation NaN) and a task with no
    per-sample gradients (no contribution Fisher to compare).
    """
    with store.snapshot([task]) as snap:  # every block at one commit
        return _compare(snap, task, names)


def _compare(store: Any, task: str, names: Sequence[str] | None) -> list[dict[str, Any]]:
    require_ema_step(store, task, "be compared with its contribution Fisher",
                     "collect its EMA first with FisherCollector.collect_fisher, or use its contribution Fisher "
                     "alone (store.contribution_fisher(task, name); heat maps: fisher=\"contribution\")")
    if not store.sample_ids(task):
        raise InvalidArgumentError(f"task {task!r} has no per-sample gradients, so it has no contribution Fisher to "
                                   "compare its EMA with; collect them first (FisherCollector.collect_samples)")
    names = list(names) if names is not None else [
        n for n in store.params(task) if (store.layout(task, n) or None) is not None and store.layout(task, n).has_heads
        and not n.endswith("bias")]
    keys = layer_keys(names)
    rows = []
    for name in names:
        ema, contrib = store.fisher(task, name), store.contribution_fisher(task, name)
        for h, b in store.layout(task, name).head_blocks():
            e, c = ema.head(h, b), contrib.head(h, b)
            me, mc = float(e.sum(dtype=torch.float64)), float(c.sum(dtype=torch.float64))
            rows.append({"param": name, "layer": keys.get(name), "head": h, "block": b,
                         "spearman": spearman(e, c), "mass_ema": me, "mass_contribution": mc,
                         "mass_ratio": mc / me if me else float("nan")})
    return rows


def compare_tasks(store: Any, task_a: str, task_b: str, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Two tasks' EMA Fishers side by side, per (param, head, block): the empirical beside the true one, say.

    Each row is a flat dict (``pandas.DataFrame(rows)`` takes them): ``a`` and ``b`` (the task
    names), ``fisher_type_a`` and ``fisher_type_b`` (how each was collected:
    ``"empirical"``, ``"mc"`` or ``"exact"``, from its metadata), ``mc_samples_a`` and
    ``mc_samples_b`` (labels drawn per position for ``"mc"``, else None), ``param``,
    ``layer`` (the parameter name's layer key), ``head``, ``block``, ``n`` (the block's entries),
    ``spearman`` (rank correlation of the two blocks' elements; NaN where either is constant),
    ``mass_a`` and ``mass_b`` (each block's Fisher sum) and ``mass_ratio`` (``mass_b / mass_a``;
    NaN where ``mass_a`` is 0). Both Fishers are bias-corrected EMAs per target token, so a
    ratio near 1 means the two estimators agree on the block's scale.

    ``names``: the parameters to compare (default: every parameter ``task_a`` tracks, except
    the biases of attention projections, as :func:`compare_fishers`: a bias head block holds
    ``head_dim`` entries, too few to rank, and would share its weight's (layer, head, block);
    name them to compare them). A parameter with heads gives one row per distinct head block
    (K and V once per key/value head, named by the first query head of its group). A parameter
    without heads (no layout, or one without heads: embeddings, MLPs, norms) gives **one row**
    with ``head`` and ``block`` None, its whole tensor compared at once.

    Memory: one head block of each task at a time, all read at one commit of both tasks
    (one snapshot); a parameter without heads is read whole (its Fisher and its ranks: about
    six times its fp32 size), so leave a large embedding out of ``names`` if that is too much.

    Refused before any read: a task with no EMA step
    (:class:`~fisherstore.errors.NoEmaStepError`), a parameter one task lacks
    (:class:`~fisherstore.errors.UnknownParamError`, naming it and the task), and a parameter
    whose shape or head layout differs between the tasks
    (:class:`~fisherstore.errors.TaskMismatchError`, naming the parameter and the field).
    Usage: ``rows = compare_tasks(store, "emp", "exact")``.
    """
    with store.snapshot(list(dict.fromkeys([task_a, task_b]))) as snap:  # both tasks at one commit
        return _compare_tasks(snap, task_a, task_b, names)


def _fisher_type(store: Any, task: str) -> tuple[str, int | None]:
    """``(fisher_type, mc_samples)`` of a task; a task from before fisher_type was recorded is empirical."""
    meta = store.metadata(task)
    kind = meta.get("fisher_type") or "empirical"
    return kind, meta.get("mc_samples") if kind == "mc" else None


def _compare_tasks(store: Any, task_a: str, task_b: str, names: Sequence[str] | None) -> list[dict[str, Any]]:
    for task, other in dict.fromkeys([(task_a, task_b), (task_b, task_a)]):
        require_ema_step(store, task, f"be compared with the EMA Fisher of task {other!r}",
                         "collect its EMA first with FisherCollector.collect_fisher (fisher_type=\"empirical\", "
                         "\"mc\" or \"exact\")")
    have_a, have_b = store.params(task_a), set(store.params(task_b))
    if names is None:
        names = [n for n in have_a if not (_has_heads(store.layout(task_a, n)) and n.endswith("bias"))]
        # By default both tasks must track the same parameters: a parameter only task B tracks would
        # otherwise vanish from the comparison without a word.
        extra = [n for n in store.params(task_b) if n not in set(have_a)]
        if extra:
            raise UnknownParamError(
                f"task {task_a!r} does not track parameter {extra[0]!r}, which task {task_b!r} tracks "
                f"({len(extra)} such); pass names= with the parameters both tasks track, or collect both tasks "
                "with the same params=")
    names = list(names)
    if not names:
        raise InvalidArgumentError(f"names is empty: there is nothing of tasks {task_a!r} and {task_b!r} to compare; "
                                   "pass parameter names, or names=None for every one")
    for task, have in ((task_a, set(have_a)), (task_b, have_b)):
        missing = [n for n in names if n not in have]
        if missing:
            raise UnknownParamError(
                f"task {task!r} does not track parameter {missing[0]!r} ({len(missing)} of the {len(names)} compared "
                f"are missing), so tasks {task_a!r} and {task_b!r} cannot be compared there; pass names= with the "
                "parameters both tasks track (store.params(task)), or collect both with the same params=")
    # The two tasks' blocks are paired by task A's head blocks: another shape or head layout under the
    # same name would pair unrelated entries and still give a plausible correlation.
    check_same_geometry(store, task_a, task_b, names, role="task_b", role_a="task_a")
    (type_a, mc_a), (type_b, mc_b) = _fisher_type(store, task_a), _fisher_type(store, task_b)
    head = {"a": task_a, "b": task_b, "fisher_type_a": type_a, "fisher_type_b": type_b,
            "mc_samples_a": mc_a, "mc_samples_b": mc_b}
    headed = [n for n in names if _has_heads(store.layout(task_a, n))]
    keys, plain_keys = layer_keys(headed), layer_keys(names)
    rows = []
    for name in names:
        layer = keys[name] if name in keys else plain_keys.get(name)
        for h, b, xa, xb in _blocks(store, task_a, task_b, name, name in keys):
            ma, mb = float(xa.sum(dtype=torch.float64)), float(xb.sum(dtype=torch.float64))
            rows.append({**head, "param": name, "layer": layer, "head": h, "block": b, "n": xa.numel(),
                         "spearman": spearman(xa, xb), "mass_a": ma, "mass_b": mb,
                         "mass_ratio": mb / ma if ma else float("nan")})
    return rows


def _blocks(store: Any, task_a: str, task_b: str, name: str, headed: bool) -> Iterator[tuple[Any, ...]]:
    """``(head, block, task A's block, task B's block)`` one at a time (a generator: one block in memory)."""
    if not headed:  # no heads: the whole tensor is the one block
        yield None, None, store.read(task_a, name), store.read(task_b, name)
        return
    fa, fb = store.fisher(task_a, name), store.fisher(task_b, name)
    for h, b in store.layout(task_a, name).head_blocks():
        yield h, b, fa.head(h, b), fb.head(h, b)


def _has_heads(layout: Any) -> bool:
    return layout is not None and layout.has_heads


def summarize_comparison(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per block kind (Q, K, V, O, then ``None``: parameters without heads) of comparison rows.

    Each line: ``block``, ``rows`` (head blocks counted), ``median_spearman``, ``min_spearman``
    and ``median_mass_ratio`` (NaN rows left out; NaN if none is left), plus the rows' task
    columns (``a``, ``b``, ``fisher_type_a``, ``fisher_type_b``) where they have them. Takes
    :func:`compare_tasks`' rows or :func:`compare_fishers`'.
    Usage: ``pandas.DataFrame(summarize_comparison(compare_tasks(store, "emp", "exact")))``.
    """
    out = []
    for block in [b for b in ("Q", "K", "V", "O", None) if any(r["block"] == b for r in rows)]:
        mine = [r for r in rows if r["block"] == block]
        rho = [r["spearman"] for r in mine if not math.isnan(r["spearman"])]
        ratio = [r["mass_ratio"] for r in mine if not math.isnan(r["mass_ratio"])]
        line = {k: mine[0][k] for k in ("a", "b", "fisher_type_a", "fisher_type_b") if k in mine[0]}
        line.update({"block": block, "rows": len(mine),
                     "median_spearman": statistics.median(rho) if rho else float("nan"),
                     "min_spearman": min(rho) if rho else float("nan"),
                     "median_mass_ratio": statistics.median(ratio) if ratio else float("nan")})
        out.append(line)
    return out
