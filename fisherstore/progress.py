"""Progress bars for long work (tqdm), off when not on a terminal or when asked to be quiet."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["progress_bar", "NoBar"]


class NoBar:
    """The bar of work too small (or a run too quiet) to show one."""

    def update(self, n: int = 1) -> None:
        return None


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool | None, desc: str, *, unit: str = "B") -> Iterator[Any]:
    """A tqdm bar that appears only for work longer than a second.

    ``enabled``: None shows it on a TTY, False never, True always. ``unit="B"`` counts bytes.
    """
    if enabled is False or total <= 0:
        yield NoBar()
        return
    from tqdm.auto import tqdm

    scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    with tqdm(total=total, unit=unit, desc=desc.strip(), delay=1.0, leave=False,
              disable=None if enabled is None else not enabled, **scale) as bar:
        yield bar
