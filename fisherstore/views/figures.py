"""Figures: a grid of [layer × head] panels, drawn and saved the same way by every plot.

The mass plots (:mod:`fisherstore.views.plots`), the QK-OV heat map (:func:`fisherstore.qkov.heatmap_png`)
and the EMA-vs-contribution comparison (:func:`fisherstore.views.plots.plot_comparison`) all
draw one panel per block (Q, K, V, O) of a [layer × head] grid. matplotlib is the
``plot`` extra; without it the call says how to install it. No display is needed (Agg).

**Heads of a GQA model, one rule for every figure** (:data:`KV_RULE`): every panel's
columns are *query* heads ``h = 0..H-1``, so the four panels of a figure line up column by
column. A K or V panel draws, at query head ``h``, the value of the key/value head
``h // g`` that serves it (``g = H / H_kv`` query heads share one, as Hugging Face's
``repeat_kv`` maps them), repeated across its group; its tick reads ``h`` over
``kv h//g`` and its axis label names the rule. A QK-OV score is per query head already
(a K/V block scores each query head of its group alike); mass and EMA-vs-contribution
values, which are per key/value head, are spread with :func:`per_query_head`. A figure
that cannot know ``H`` (a summary with no Q or O block) draws K/V per key/value head and
says so on the axis.

Usage::

    plt, fig, axes = figure(rows=1, cols=4, panel_size=(3.2, 3.0))
    panel(fig, axes[0][0], grid, layers, "Q", "magma", block="Q")
    panel(fig, axes[0][1], per_query_head(k_grid, 2), layers, "K", "magma", block="K", group=2)
    save(plt, fig, "out.png", "a title")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import require

__all__ = ["KV_RULE", "figure", "panel", "per_query_head", "head_labels", "save"]

#: The rule every figure follows for K/V heads of a GQA model (the module docstring).
KV_RULE = ("columns are query heads h; a K/V panel shows at h its kv head h//g (g = H/H_kv query heads "
           "share one), repeated across the group")


def figure(rows: int, cols: int, panel_size: tuple[float, float], what: str = "plotting") -> tuple[Any, Any, Any]:
    """``(pyplot, fig, axes[rows][cols])`` on the Agg backend."""
    matplotlib = require("matplotlib", what, extra="plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), dpi=100, squeeze=False)
    return plt, fig, axes


def per_query_head(grid: np.ndarray, group: int) -> np.ndarray:
    """``grid`` [layers, H_kv] of key/value heads as [layers, H]: column ``h`` is kv head ``h // group``."""
    return np.repeat(np.asarray(grid, dtype=float), group, axis=1)


def head_labels(heads: Sequence[int], block: str | None, group: int | None) -> tuple[list[str], str]:
    """``(tick labels, axis label)`` of a panel's query-head columns, by :data:`KV_RULE`.

    ``group``: query heads per key/value head (``H / H_kv``); ``None`` where unknown, and then a
    K/V panel's columns are key/value heads (said on the axis). Q and O columns are query heads.
    """
    if block not in ("K", "V"):
        return [str(h) for h in heads], "query head"
    if group is None:
        return [str(h) for h in heads], "kv head (number of query heads unknown)"
    if group == 1:
        return [str(h) for h in heads], "query head (= its kv head)"
    # Two lines: the query head the column is, and the shared kv head whose value it repeats.
    return [f"{h}\nkv{h // group}" for h in heads], f"query head h → kv head h//{group} (shared by {group})"


def panel(fig: Any, ax: Any, grid: np.ndarray, layers: Sequence[Any], title: str, cmap: str, norm: Any = None, *,
          positive_only: bool = False, heads: Sequence[int] | None = None, block: str | None = None,
          group: int | None = None, cbar_label: str | None = None, xlabel: str | None = None) -> None:
    """Draw ``grid`` [layers, heads] on ``ax`` with a colour bar; NaN (and, if asked, values ≤ 0) left blank.

    Columns are the query heads ``heads`` (default ``0..n-1``): for a K or V ``block`` the
    caller has already spread each key/value head over its ``group`` query heads
    (:func:`per_query_head`), and the ticks name both (:func:`head_labels`). ``xlabel``
    overrides the axis label :func:`head_labels` gives.
    """
    grid = np.asarray(grid, dtype=float)
    heads = list(range(grid.shape[1])) if heads is None else list(heads)
    shown = np.ma.masked_invalid(np.where(grid > 0, grid, np.nan) if positive_only else grid)
    im = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ticks, rule = head_labels(heads, block, group)
    ax.set_xlabel(xlabel or rule, fontsize=8)
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]), ticks, fontsize=7)
    ax.set_yticks(range(len(layers)), [str(v) for v in layers])
    if block in ("K", "V") and group and group > 1:  # thin lines between kv groups: where one shared head ends
        for x in range(group, grid.shape[1], group):
            ax.axvline(x - 0.5, color="white", linewidth=0.8)
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    if cbar_label:
        bar.set_label(cbar_label, fontsize=7)


def save(plt: Any, fig: Any, path: str, title: str, caption: str | None = None) -> str:
    """Title, lay out, write ``path`` and free the figure; returns ``path``. ``caption``: a note under the panels."""
    fig.suptitle(title)
    if caption:
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, wrap=True)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
