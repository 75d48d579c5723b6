"""Pictures of a store: [layer x head] panels per block, of Fisher mass, QK-OV interference, or two Fishers compared.

Every picture is a grid of panels drawn by :mod:`.figures`; matplotlib is the ``plot``
extra. :func:`plot_mass` draws Fisher mass (below), :func:`heatmap_png` a QK-OV heat map
(:meth:`~fisherstore.qkov.QKOVInterference.heatmap`'s result), :func:`plot_comparison`
the EMA Fisher against the contribution Fisher (:func:`~fisherstore.qkov.compare.compare_fishers`'
rows).

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

The CLI: ``fisherstore plot PATH --task math [--compare code] --out fig.png``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from ..spec.layout import BLOCKS
from .figures import figure, panel, save

__all__ = ["mass_grid", "plot_mass", "heatmap_png", "plot_comparison"]


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
    """Draw the per-block [layer x head] heat map of ``df`` (and of ``compare`` against it) into ``path``."""
    a_name = df.attrs.get("task", "A")
    blocks = [b for b in BLOCKS if mass_grid(df, b)[0]]
    if not blocks:
        raise InvalidArgumentError(
            f"task {a_name!r} has no parameter with a head layout, so there is no [layer x head] map to draw; "
            "collect attention projections (the default params) to plot one"
        )
    plt, fig, axes = figure(1 if compare is None else 3, len(blocks), (3.4, 3.2 if compare is None else 8.6 / 3))
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    if compare is None:
        for ax, b in zip(axes[0], blocks):
            layers, g = mass_grid(df, b)
            panel(fig, ax, g, layers, f"{b} mass", "magma", _log_norm(LogNorm, g), positive_only=True)
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
        norm = _log_norm(LogNorm, np.concatenate([ga.ravel(), gb.ravel()]))
        panel(fig, axes[0, col], ga, layers, f"{b}: share of {a_name!r}", "magma", norm, positive_only=True)
        panel(fig, axes[1, col], gb, layers, f"{b}: share of {b_name!r}", "magma", norm, positive_only=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.log2(gb / ga)
        ratio[~np.isfinite(ratio)] = np.nan
        lim = max(float(np.nanmax(np.abs(ratio))) if np.isfinite(ratio).any() else 0.0, 1e-3)
        panel(fig, axes[2, col], ratio, layers, f"{b}: log2({b_name!r}/{a_name!r})", "RdBu_r",
              TwoSlopeNorm(0.0, -lim, lim))
    return save(plt, fig, path, title or f"Fisher mass share per head block: {a_name!r} vs {b_name!r}")


def _log_norm(LogNorm: Any, values: np.ndarray) -> Any:
    """A log colour scale over the positive values (zeros and NaN are drawn blank)."""
    pos = values[np.isfinite(values) & (values > 0)]
    if not pos.size:
        return None
    lo, hi = float(pos.min()), float(pos.max())
    return LogNorm(lo, hi if hi > lo else lo * 10)


def heatmap_png(heat: Mapping[str, Any], path: str, title: str = "QK-OV interference") -> str:
    """Draw a QK-OV heat map, one [layers x heads] panel per block, into one PNG; returns ``path``.

    ``heat`` is what :meth:`~fisherstore.qkov.QKOVInterference.heatmap` returns (``{"Q": [L, H], ...,
    "layers": [...]}``); needs matplotlib (``pip install 'fisherstore[plot]'``).
    Usage: ``fisherstore.heatmap_png(qk.heatmap(C, g, F), "qkov.png")``.
    """
    blocks = [b for b in BLOCKS if b in heat]
    plt, fig, axes = figure(1, len(blocks), (3.2, 3.0), what="heatmap_png")
    for ax, b in zip(axes[0], blocks):
        arr = np.asarray(heat[b])
        panel(fig, ax, arr, list(heat.get("layers", range(arr.shape[0]))), b, "magma")
    return save(plt, fig, path, title)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str, title: str = "EMA vs contribution Fisher") -> str:
    """Per block, a [layer × head] picture of the rank correlation and of log₁₀ of the mass ratio (PNG)."""
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
