"""Pictures of a store: [layer x head] panels per block, of Fisher mass, QK-OV interference, or two Fishers compared.

Every picture is a grid of panels drawn by :mod:`.figures`; matplotlib is the ``plot``
extra. :func:`plot_mass` draws Fisher mass (below), :func:`heatmap_png` a QK-OV heat map
(:meth:`~fisherstore.qkov.QKOVInterference.heatmap`'s result), :func:`plot_comparison`
the EMA Fisher against the contribution Fisher (:func:`~fisherstore.qkov.compare.compare_fishers`'
rows), :func:`plot_fisher_types` two tasks' Fishers, the empirical against the true one, say
(:func:`~fisherstore.qkov.compare.compare_tasks`' rows).

*Fisher mass* is drawn from :func:`fisherstore.views.summary.summary` tables. One task: a panel per block (Q, K, V, O) of the mass of each head block, on a log
colour scale (Fisher mass spans decades). Two tasks: each task's *share* of its own total
mass (so tasks collected with different losses or token counts compare), on one colour
scale per block, and a third row with ``log2(share B / share A)``: red where task B puts
relatively more Fisher mass on a head, blue where task A does.

Usage::

    plot_mass(store.summary("math"), "fig.png")
    plot_mass(store.summary("math"), "cmp.png", compare=store.summary("code"))
    heatmap_png(qk.heatmap_from_store(store, "math", "code"), "qkov.png")
    plot_comparison(compare_fishers(store, "math"), "ema_vs_contribution.png")
    plot_fisher_types(compare_tasks(store, "emp", "exact"), "empirical_vs_exact.png")

The CLI: ``fisherstore plot PATH --task math [--compare code] --out fig.png``.

Heads of a GQA model are drawn by one rule in every figure here (:data:`.figures.KV_RULE`):
columns are query heads, and a K/V panel repeats each key/value head over the query
heads that share it, its ticks reading ``h`` over ``kv h//g``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from ..spec.layout import BLOCKS
from .figures import figure, panel, per_query_head, save

__all__ = ["mass_grid", "plot_mass", "heatmap_png", "plot_comparison", "plot_fisher_types", "QKOV_CAPTION",
           "SPEARMAN_LABEL", "RATIO_LABEL"]

#: What a QK-OV heat map plots (scores.py's M, averaged over pairs), written under every one.
QKOV_CAPTION = (
    "Each cell: the QK-OV interference score of (layer, query head, block), averaged over every sample pair "
    "(i of task A, j of task B):  M = Σ_{k in the head block} C_ik / (max(F_k, ε) + λ) · |g_jk| / T_j,  "
    "C_i = g_i²/T_i,  F = the normalising Fisher.\n"
    "C/F is dimensionless, so M has the units of |g_j|/T_j (the gradient of B's token-mean loss) summed over the "
    "block's weights. Higher means more interference."
)


#: The colour bar of a rank-correlation panel of :func:`plot_fisher_types`.
SPEARMAN_LABEL = "Spearman ρ (rank correlation)"
#: The colour bar of its mass-ratio panel: a block's Fisher mass (Σ of its entries) in task b over task a.
RATIO_LABEL = "mass(b)/mass(a), log scale"


def mass_grid(df: Any, block: str, column: str = "mass") -> tuple[list[Any], np.ndarray]:
    """``(layers, grid)``: ``grid[i, h]`` is ``column`` of head ``h`` of ``block`` in ``layers[i]`` (NaN: none)."""
    rows = df[(df["block"] == block) & df["head"].notna()]
    layers = list(dict.fromkeys(rows["layer"].tolist()))
    if not layers:
        return [], np.zeros((0, 0))
    grid = np.full((len(layers), int(rows["head"].max()) + 1), np.nan)
    where = {k: i for i, k in enumerate(layers)}
    for layer, head, value in zip(rows["layer"], rows["head"], rows[column]):
        grid[where[layer], int(head)] = np.nansum([grid[where[layer], int(head)], value])
    return layers, grid


def plot_mass(df: Any, path: str, *, compare: Any = None, title: str | None = None) -> str:
    """Draw the per-block [layer x head] heat map of ``df`` (and of ``compare`` against it) into ``path``.

    Columns are query heads; a K/V panel repeats each key/value head's value over the query
    heads sharing it (:data:`.figures.KV_RULE`), sized by the Q and O blocks of ``df``.
    """
    a_name = df.attrs.get("task", "A")
    blocks = [b for b in BLOCKS if mass_grid(df, b)[0]]
    if not blocks:
        raise InvalidArgumentError(
            f"task {a_name!r} has no parameter with a head layout, so there is no [layer x head] map to draw; "
            "collect attention projections (the default params) to plot one"
        )
    H = _query_heads(df, blocks)
    plt, fig, axes = figure(1 if compare is None else 3, len(blocks), (3.4, 3.2 if compare is None else 8.6 / 3))
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    if compare is None:
        for ax, b in zip(axes[0], blocks):
            layers, g = mass_grid(df, b)
            g, group = _spread(g, b, H)
            panel(fig, ax, g, layers, f"{b} mass", "magma", _log_norm(LogNorm, g), positive_only=True, block=b,
                  group=group, cbar_label="Fisher mass: Σ of the head block's entries")
        return save(plt, fig, path,
                    title or f"Fisher mass per head block: task {a_name!r} (step {df.attrs.get('step', '?')})")
    b_name = compare.attrs.get("task", "B")
    for col, b in enumerate(blocks):
        layers, ga = mass_grid(df, b, "share")
        layers_b, gb = mass_grid(compare, b, "share")
        if layers_b != layers or gb.shape != ga.shape:
            raise InvalidArgumentError(
                f"tasks {a_name!r} and {b_name!r} hold different {b} head blocks (layers {layers} vs "
                f"{layers_b}); compare tasks collected on the same model and parameters"
            )
        (ga, group), (gb, _) = _spread(ga, b, H), _spread(gb, b, H)
        norm = _log_norm(LogNorm, np.concatenate([ga.ravel(), gb.ravel()]))
        kw = {"block": b, "group": group}
        panel(fig, axes[0, col], ga, layers, f"{b}: share of {a_name!r}", "magma", norm, positive_only=True,
              cbar_label="share of the task's total Fisher mass", **kw)
        panel(fig, axes[1, col], gb, layers, f"{b}: share of {b_name!r}", "magma", norm, positive_only=True,
              cbar_label="share of the task's total Fisher mass", **kw)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.log2(gb / ga)
        ratio[~np.isfinite(ratio)] = np.nan
        lim = max(float(np.nanmax(np.abs(ratio))) if np.isfinite(ratio).any() else 0.0, 1e-3)
        panel(fig, axes[2, col], ratio, layers, f"{b}: log2({b_name!r}/{a_name!r})", "RdBu_r",
              TwoSlopeNorm(0.0, -lim, lim), cbar_label=f"log2 share ratio (> 0: {b_name!r} more)", **kw)
    return save(plt, fig, path, title or f"Fisher mass share per head block: {a_name!r} vs {b_name!r}")


def _query_heads(df: Any, blocks: Sequence[str]) -> int | None:
    """H, the query heads per layer, from the Q and O blocks' head indices (None without either)."""
    widths = [mass_grid(df, b)[1].shape[1] for b in blocks if b in ("Q", "O")]
    return max(widths) if widths else None


def _spread(grid: np.ndarray, block: str, H: int | None) -> tuple[np.ndarray, int | None]:
    """A K/V grid [layers, H_kv] spread over the H query heads (KV_RULE), and g; Q/O grids as they are."""
    if block not in ("K", "V"):
        return grid, None
    n_kv = grid.shape[1]
    if H is None or not n_kv or H % n_kv:
        return grid, None  # H unknown (no Q/O drawn): columns stay kv heads, and the axis says so
    return per_query_head(grid, H // n_kv), H // n_kv


def _log_norm(LogNorm: Any, values: np.ndarray) -> Any:
    """A log colour scale over the positive values (zeros and NaN are drawn blank)."""
    pos = values[np.isfinite(values) & (values > 0)]
    if not pos.size:
        return None
    lo, hi = float(pos.min()), float(pos.max())
    return LogNorm(lo, hi if hi > lo else lo * 10)


def heatmap_png(heat: Mapping[str, Any], path: str, title: str = "QK-OV interference",
                group_size: int | Mapping[Any, int] | None = None) -> str:
    """Draw a QK-OV heat map, one [layers x heads] panel per block, into one PNG; returns ``path``.

    ``heat`` is what :meth:`~fisherstore.qkov.QKOVInterference.heatmap` returns (``{"Q": [L, H], ...,
    "layers": [...], "heads": [...], "group_size": {layer: H / H_kv}}``); its columns are query heads,
    a K/V one scoring the kv head ``h // g`` that serves query head ``h`` (:data:`.figures.KV_RULE`).
    ``group_size`` overrides ``heat["group_size"]`` (for a heat map built without it).
    The figure's caption is :data:`QKOV_CAPTION`: what a cell is, its units, and that
    higher means more interference. Needs matplotlib (``pip install 'fisherstore[plot]'``).
    Usage: ``fisherstore.heatmap_png(qk.heatmap(C, g, F), "qkov.png")``.
    """
    blocks = [b for b in BLOCKS if b in heat]
    plt, fig, axes = figure(1, len(blocks), (3.2, 3.0), what="heatmap_png")
    group = _one_group(heat.get("group_size") if group_size is None else group_size)
    for ax, b in zip(axes[0], blocks):
        arr = np.asarray(heat[b])
        heads = list(heat.get("heads", range(arr.shape[1])))
        kw: dict[str, Any] = {"block": b, "group": group}
        if b in ("K", "V") and group is None:  # the columns are query heads even when g is unknown
            kw = {"block": None, "xlabel": "query head (K/V: the kv head serving it)"}
        panel(fig, ax, arr, list(heat.get("layers", range(arr.shape[0]))), f"{b}: mean score", "magma",
              heads=heads, cbar_label="score (higher = more)", **kw)
    return save(plt, fig, path, title, caption=QKOV_CAPTION)


def _one_group(groups: int | Mapping[Any, int] | None) -> int | None:
    """One g for the figure; None when unknown or when the layers differ (no one tick rule fits them all)."""
    if groups is None or isinstance(groups, int):
        return groups
    found = set(groups.values())
    return found.pop() if len(found) == 1 else None


def plot_comparison(rows: Sequence[dict[str, Any]], path: str, title: str = "EMA vs contribution Fisher") -> str:
    """Per block, a [layer × head] picture of the rank correlation and of log₁₀ of the mass ratio (PNG).

    Columns are query heads. :func:`~fisherstore.qkov.compare.compare_fishers` names a K/V row by
    the first query head of its group; its value fills every query head of that group
    (:data:`.figures.KV_RULE`), ``g`` being H over the number of K (or V) rows per layer.
    """
    blocks = [b for b in "QKVO" if any(r["block"] == b for r in rows)]
    layers = sorted({r["layer"] for r in rows}, key=lambda k: (isinstance(k, str), k))
    q_heads = sorted({r["head"] for r in rows if r["block"] in ("Q", "O")})
    plt, fig, axes = figure(2, len(blocks), (3.2, 3.0), what="plot_comparison")
    from matplotlib.colors import Normalize

    for col, b in enumerate(blocks):
        mine = [r for r in rows if r["block"] == b]
        group: int | None = None
        if b in ("K", "V") and q_heads:
            per_layer = {len({r["head"] for r in mine if r["layer"] == k}) for k in layers}
            n_kv = max(per_layer)
            group = len(q_heads) // n_kv if n_kv and len(q_heads) % n_kv == 0 else None
        if b in ("K", "V") and group is None:  # H unknown: one column per kv head (the axis says so)
            heads, span = sorted({r["head"] for r in mine}), 1
            ticks = list(range(len(heads)))  # rows name a kv head by its group's first query head
        else:
            heads, span = (q_heads or sorted({r["head"] for r in mine})), group or 1
            ticks = heads
        for row, (field, label, cmap, bar) in enumerate((
                ("spearman", "rank corr.", "viridis", "Spearman ρ of the block's entries"),
                ("mass_ratio", "log10 mass ratio", "coolwarm", "log10(contribution mass / EMA mass)"))):
            grid = np.full((len(layers), len(heads)), np.nan)
            for r in mine:
                v = r[field]
                if v is None:
                    continue  # no value is drawn blank, never as a plausible 0
                if field == "mass_ratio":
                    v = math.log10(v) if v > 0 else math.nan
                first = heads.index(r["head"])
                grid[layers.index(r["layer"]), first:first + span] = v  # a kv head fills its group's columns
            if field == "mass_ratio":
                lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
                norm = Normalize(-(lim or 1), lim or 1)
            else:
                norm = Normalize(-1, 1)
            panel(fig, axes[row][col], grid, layers, f"{b}: {label}", cmap, norm, heads=ticks, block=b,
                  group=group, cbar_label=bar)
    return save(plt, fig, path, title)


def plot_fisher_types(rows: Sequence[dict[str, Any]], path: str, title: str | None = None) -> str:
    """Two tasks' Fishers per block (Q, K, V, O): a [layer × head] map of the rank correlation, and of the mass ratio.

    ``rows``: :func:`~fisherstore.qkov.compare.compare_tasks`' rows, of one pair of tasks. The
    top row of panels is the Spearman ρ of each head block's entries (colour bar
    :data:`SPEARMAN_LABEL`, from -1 to 1: 1 where both Fishers rank the block's weights alike);
    the bottom row is ``mass(b)/mass(a)`` (:data:`RATIO_LABEL`: the block's Fisher mass in task
    b over task a, on a log scale centred on 1; red where b holds more). The title names both
    tasks and their ``fisher_type``. Columns are query heads; a K/V value fills every query
    head of its group (:data:`.figures.KV_RULE`). Rows of parameters without heads (``head``
    None) have no cell and are not drawn:
    :func:`~fisherstore.qkov.compare.summarize_comparison` reports them. Writes a PNG;
    returns ``path``. Needs matplotlib (``pip install 'fisherstore[plot]'``).
    Usage: ``plot_fisher_types(compare_tasks(store, "emp", "exact"), "emp_vs_exact.png")``.
    """
    drawn = [r for r in rows if r.get("head") is not None and r.get("block") in BLOCKS]
    if not drawn:
        raise InvalidArgumentError(
            "no row has a head block (compare_tasks rows with head None are parameters without heads), so there "
            "is no [layer × head] map to draw; compare attention projections (compare_tasks(store, a, b, names=...))")
    pairs = {(r.get("a"), r.get("b")) for r in drawn}
    if len(pairs) > 1 or None in next(iter(pairs)):
        raise InvalidArgumentError(
            f"the rows compare {len(pairs)} pairs of tasks {sorted(pairs, key=str)}, or do not name them (keys 'a' "
            "and 'b'); pass the rows of one compare_tasks(store, task_a, task_b) call")
    seen: dict[tuple[Any, Any, Any], str] = {}
    for r in drawn:  # two parameters in one cell (a weight and its bias) would be drawn over each other
        cell = (r["layer"], r["head"], r["block"])
        if cell in seen and seen[cell] != r["param"]:
            raise InvalidArgumentError(
                f"parameters {seen[cell]!r} and {r['param']!r} both hold block {r['block']} of head {r['head']} in "
                f"layer {r['layer']!r}, and one cell can show one of them; draw the rows of one of them (e.g. "
                "[r for r in rows if not r['param'].endswith('bias')])")
        seen[cell] = r["param"]
    a, b = next(iter(pairs))
    first = drawn[0]
    who_a, who_b = _typed(a, first, "a"), _typed(b, first, "b")
    blocks = [k for k in BLOCKS if any(r["block"] == k for r in drawn)]
    layers = sorted({r["layer"] for r in drawn}, key=lambda k: (isinstance(k, str), k))
    q_heads = sorted({r["head"] for r in drawn if r["block"] in ("Q", "O")})
    plt, fig, axes = figure(2, len(blocks), (3.4, 3.2), what="plot_fisher_types")
    from matplotlib.colors import LogNorm, Normalize

    ratios = np.array([r["mass_ratio"] for r in drawn], dtype=float)
    ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
    # One colour scale for every ratio panel, symmetric about 1 in log space, so blocks compare.
    lim = float(np.abs(np.log10(ratios)).max()) if ratios.size else 0.0
    lim = max(lim, 0.01)  # all ratios 1 (a task against itself): still a readable scale
    for col, k in enumerate(blocks):
        mine = [r for r in drawn if r["block"] == k]
        heads, span, ticks, group = _head_columns(mine, k, layers, q_heads)
        for row, (field, label, cmap, norm, bar) in enumerate((
                ("spearman", "rank correlation", "viridis", Normalize(-1, 1), SPEARMAN_LABEL),
                ("mass_ratio", "mass ratio", "RdBu_r", LogNorm(10 ** -lim, 10 ** lim),
                 f"{RATIO_LABEL}\n(b = {b!r}, a = {a!r})"))):
            grid = np.full((len(layers), len(heads)), np.nan)
            for r in mine:
                v = r[field]
                if v is None or (field == "mass_ratio" and not v > 0):
                    continue  # no value is drawn blank, never as a plausible one
                start = heads.index(r["head"])
                grid[layers.index(r["layer"]), start:start + span] = v  # a kv head fills its group's columns
            panel(fig, axes[row][col], grid, layers, f"{k}: {label}", cmap, norm, heads=ticks, block=k,
                  group=group, cbar_label=bar)
    return save(plt, fig, path, title or f"Fisher per head block: a = {who_a} vs b = {who_b}")


def _typed(task: str, row: dict[str, Any], side: str) -> str:
    """``'emp' (empirical)``, or ``'mc' (mc, k=4)``: a task and how its Fisher was collected."""
    kind = row.get(f"fisher_type_{side}") or "fisher_type unknown"
    k = row.get(f"mc_samples_{side}")
    return f"{task!r} ({kind}{f', k={k}' if k else ''})"


def _head_columns(mine: Sequence[dict[str, Any]], block: str, layers: Sequence[Any], q_heads: Sequence[int]
                  ) -> tuple[list[int], int, list[int], int | None]:
    """``(column heads, columns per row, tick heads, g)`` of one block's panel, by :data:`.figures.KV_RULE`.

    Rows name a kv head by its group's first query head; with ``H`` known (Q or O rows) a K/V
    value spans its ``g`` query heads, else the columns are kv heads (the axis says so).
    """
    group: int | None = None
    if block in ("K", "V") and q_heads:
        n_kv = max(len({r["head"] for r in mine if r["layer"] == k}) for k in layers)
        group = len(q_heads) // n_kv if n_kv and len(q_heads) % n_kv == 0 else None
    if block in ("K", "V") and group is None:
        heads = sorted({r["head"] for r in mine})
        return heads, 1, list(range(len(heads))), None
    heads = list(q_heads) or sorted({r["head"] for r in mine})
    return heads, group or 1, heads, group
