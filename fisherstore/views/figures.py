"""Figures: a grid of [layer × head] panels, drawn and saved the same way by every plot.

The mass plots (:mod:`fisherstore.views.plots`), the QK-OV heat map (:func:`fisherstore.qkov.heatmap_png`)
and the EMA-vs-contribution comparison (:func:`fisherstore.views.plots.plot_comparison`) all
draw one panel per block (Q, K, V, O) of a [layer × head] grid. matplotlib is the
``plot`` extra; without it the call says how to install it. No display is needed (Agg).

Usage::

    plt, fig, axes = figure(rows=1, cols=4, panel_size=(3.2, 3.0))
    panel(fig, axes[0][0], grid, layers, "Q", "magma")
    save(plt, fig, "out.png", "a title")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import require

__all__ = ["figure", "panel", "save"]


def figure(rows: int, cols: int, panel_size: tuple[float, float], what: str = "plotting") -> tuple[Any, Any, Any]:
    """``(pyplot, fig, axes[rows][cols])`` on the Agg backend."""
    matplotlib = require("matplotlib", what, extra="plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), dpi=100, squeeze=False)
    return plt, fig, axes


def panel(fig: Any, ax: Any, grid: np.ndarray, layers: Sequence[Any], title: str, cmap: str, norm: Any = None, *,
          positive_only: bool = False) -> None:
    """Draw ``grid`` [layers, heads] on ``ax`` with a colour bar; NaN (and, if asked, values ≤ 0) left blank."""
    grid = np.asarray(grid, dtype=float)
    shown = np.ma.masked_invalid(np.where(grid > 0, grid, np.nan) if positive_only else grid)
    im = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(len(layers)), [str(v) for v in layers])
    fig.colorbar(im, ax=ax, fraction=0.046)


def save(plt: Any, fig: Any, path: str, title: str) -> str:
    """Title, lay out, write ``path`` and free the figure; returns ``path``."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
