"""Every exception and warning fisherstore raises, and the helpers that word their messages.

Every error names the thing that is wrong (task, parameter, head, path) and says what to
do about it. Each class also derives from the matching builtin (``KeyError``,
``IndexError``, ``ValueError``, ...) so generic handlers keep working. All of them
subclass :class:`FisherStoreError`, except the warnings and :class:`ChunkError`, the read
path's internal signal for one bad chunk (it never reaches a caller: the store turns it
into a :class:`CorruptChunkError` naming the task and parameter).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "FisherStoreError",
    "NotAFisherStoreError",
    "FormatVersionError",
    "ReadOnlyError",
    "UnknownTaskError",
    "UnknownParamError",
    "ShapeMismatchError",
    "InvalidGradientError",
    "NonFiniteGradientError",
    "HeadIndexError",
    "PrecisionError",
    "LayoutError",
    "LayoutMismatchError",
    "StepError",
    "CorruptChunkError",
    "StorageError",
    "StoreLockedError",
    "CorruptStoreError",
    "StoreReplacedError",
    "FlushError",
    "InvalidArgumentError",
    "SliceError",
    "RecoveryWarning",
    "StepDiscardedWarning",
    "MissingDependencyError",
    "BatchesChangedError",
    "StoredDecayWarning",
    "FisherCallbackWarning",
    "SnapshotLostError",
    "RankFailedError",
    "TaskMismatchError",
    "NoEmaStepError",
    "AmpOverflowWarning",
]


class FisherStoreError(Exception):
    """Base class of every error fisherstore raises on purpose."""


class NotAFisherStoreError(FisherStoreError, FileNotFoundError):
    """The path does not exist, or holds something that is not a fisherstore store."""


class FormatVersionError(FisherStoreError, RuntimeError):
    """The store was written by a newer fisherstore than this one."""


class ReadOnlyError(FisherStoreError, PermissionError):
    """A write was attempted on a store opened with ``mode="r"``."""


class _NamedKeyError(FisherStoreError, KeyError):
    # KeyError.__str__ repr()s its argument, which turns a helpful sentence into a quoted
    # one-liner with escaped newlines; show the sentence as written.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownTaskError(_NamedKeyError):
    """The task is not in the store."""


class UnknownParamError(_NamedKeyError):
    """The parameter is not tracked for this task."""


class ShapeMismatchError(FisherStoreError, ValueError):
    """A squared gradient's shape differs from the stored parameter's shape."""


class InvalidGradientError(FisherStoreError, ValueError):
    """A squared gradient is not a real, non-negative floating-point tensor."""


class NonFiniteGradientError(InvalidGradientError):
    """A squared gradient holds NaN or Inf values."""


class HeadIndexError(FisherStoreError, IndexError):
    """A head is out of range, or a block is not one of Q, K, V, O for this parameter."""


class PrecisionError(FisherStoreError, ValueError):
    """A storage precision that would silently destroy the EMA was requested."""


class LayoutError(FisherStoreError, ValueError):
    """A parameter layout is inconsistent with the tensor's shape or the model."""


class LayoutMismatchError(LayoutError):
    """A layout fits its tensor's shape but not the model: a head's attention output moves other weights than its block.

    Raised when a ``layouts=`` override is checked against the model before anything is
    stored (:mod:`fisherstore.collect.layout_check`); the message names the parameter,
    the block and the head, and where the gradient actually landed.
    """


class StepError(FisherStoreError, RuntimeError):
    """An EMA step was used wrongly (nested, reused after it ended, ...)."""


class CorruptChunkError(FisherStoreError, OSError):
    """A chunk on disk failed its checksum or could not be decoded."""


class InvalidArgumentError(FisherStoreError, ValueError, TypeError):
    """An argument to the public API is of the wrong type or out of its range."""


class SliceError(FisherStoreError, IndexError):
    """A slice or index of a LazyFisher is out of range or malformed."""


class StorageError(FisherStoreError, OSError):
    """The disk refused a write (full, I/O error, read-only); the store kept its last commit."""


class FlushError(StorageError):
    """A step was applied and is kept in RAM, but the automatic flush after it failed.

    Do not repeat the step (it would count twice): fix the cause and call ``flush()``.
    Any other error from ``update()`` means the step was discarded whole.
    """


class CorruptStoreError(FisherStoreError, ValueError):
    """A metadata document or array header is damaged, inconsistent, or not what fisherstore wrote."""


class StoreReplacedError(FisherStoreError, RuntimeError):
    """The store was replaced (``mode="w"``) since this reader opened it; reopen it."""


class StepDiscardedWarning(UserWarning):
    """A step still open when its store closed was discarded (the steps before it were flushed)."""


class RecoveryWarning(UserWarning):
    """A writer opened a store that a crashed writer left, and rolled it back to its last commit."""


class StoreLockedError(FisherStoreError, BlockingIOError):
    """Another writer holds the store's lock."""


class BatchesChangedError(FisherStoreError, ValueError):
    """A pass of a multi-pass run (``collect_fisher_dataset``) saw other batches than the first pass."""


class StoredDecayWarning(UserWarning):
    """A task's stored EMA β differs from the collector's ``ema_decay``; the stored one is used."""


class FisherCallbackWarning(UserWarning):
    """The Trainer's loss weights micro-batches unequally, so ``x`` is not exactly the token-summed square."""


class SnapshotLostError(FisherStoreError, RuntimeError):
    """A read pinned to one commit found that commit's data deleted (its pin lease expired).

    Multi-read operations (views, sweeps, heat maps, ``verify``) read one commit: they pin
    it, and writers keep what a live pin names. This error means the pin lapsed (a reader
    paused longer than the lease, or a writer ignored pins); rebuild the view to read the
    newest commit.
    """


class RankFailedError(FisherStoreError, RuntimeError):
    """Another rank of a :class:`~fisherstore.RankGroup` failed or died; ``rank`` names it (None: unknown)."""

    def __init__(self, msg: str, rank: int | None = None) -> None:
        super().__init__(msg)
        self.rank = rank


class TaskMismatchError(LayoutError):
    """Two tasks compared or scored together do not share one geometry (shapes, heads, head_dim, blocks)."""


class NoEmaStepError(InvalidArgumentError):
    """A request needs a task's EMA Fisher, but the task holds no EMA step (only per-sample data)."""


class AmpOverflowWarning(UserWarning):
    """A mixed-precision step overflowed (inf/NaN scaled gradients); it was skipped, as the optimizer skips it."""


class ChunkError(OSError):
    """One chunk is missing, truncated or fails its checksum; ``chunk`` is its grid index.

    Raised by a backend's direct reads. Deliberately not a :class:`FisherStoreError`: the
    read path catches backend errors that are not its own and names the task, parameter
    and every bad chunk in a :class:`CorruptChunkError`.
    """

    def __init__(self, err: int, msg: str, path: str, chunk: tuple[int, ...]) -> None:
        super().__init__(err, msg, path)
        self.chunk = tuple(chunk)


class MissingDependencyError(FisherStoreError, ImportError):
    """An optional dependency (xarray, Dask, pandas, matplotlib, obstore) is not installed."""


def require(module: str, what: str, extra: str = "views") -> Any:
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingDependencyError(
            f"{what} needs {top}, which is not installed: pip install 'fisherstore[{extra}]' (or pip install {top})"
        ) from e


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return a "did you mean" fragment for error messages ('' when nothing is close)."""
    cands = list(candidates)
    hits = difflib.get_close_matches(name, cands, n=n, cutoff=0.5)
    if not hits:
        # Substring hits catch the common case of a missing "model." prefix.
        hits = [c for c in cands if name in c or c in name][:n]
    return f" Did you mean: {', '.join(repr(h) for h in hits)}?" if hits else ""


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: byte counts in messages and reports.

    Not ``tqdm.format_sizeof(n, "B", 1024)``: it divides by 1024 but labels the result
    with SI prefixes (``'1.50kB'``, ``'25.0GB'`` for 25 GiB), which misstates sizes in the
    very messages (disk full, store size) where the unit matters.
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def listing(names: Iterable[str], limit: int = 8) -> str:
    """Render a short, bounded list of names for an error message."""
    names = sorted(names)
    if not names:
        return "(none)"
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return shown + (f", ... ({more} more)" if more > 0 else "")
