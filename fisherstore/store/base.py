"""What every part of the :class:`~fisherstore.store.FisherStore` facade shares: its state and its checks.

The facade is one class built from a few mixins, one module per group of public verbs
(:mod:`.write_verbs`, :mod:`.read_verbs`, :mod:`.sample_verbs`); :mod:`.facade` opens and
closes the store and answers catalogue questions. Each mixin method is a few lines over
the engine modules that do the work (catalog, step, commit, read, segments); this base names the state they
are handed, so a reader of any one module sees what it may touch.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..engine.catalog import Catalog
from ..errors import FisherStoreError, ReadOnlyError

if TYPE_CHECKING:
    from ..backends import ArrayBackend
    from ..engine.commit import Committer
    from ..engine.generations import WritePath
    from ..engine.iopool import IOPool
    from ..engine.memory import MemoryPlan
    from ..engine.options import StoreOptions
    from ..engine.read import ReadPath
    from ..engine.segments import SampleBatch
    from ..engine.step.writer import StepWriter
    from ..spec.codecs import CodecSpec
    from ..spec.format import StoreDoc


class StoreBase:
    """The state shared by the facade's parts (set by :class:`~fisherstore.store.FisherStore` when it opens)."""

    options: StoreOptions
    plan: MemoryPlan
    codecs: CodecSpec
    _backend: ArrayBackend
    _catalog: Catalog
    _state_lock: threading.RLock
    _pool: IOPool
    _write: WritePath
    _commit: Committer
    _read: ReadPath
    _doc: StoreDoc
    _number_base: int
    #: the one step or sample segment open now (a store writes from one thread)
    _active: StepWriter | SampleBatch | None
    _steps_since_flush: int
    # properties of the facade that the parts read
    writable: bool
    closed: bool
    path: str | None
    decay: float
    flush_every: int | None

    def _cat(self) -> Catalog:
        self._check_open()
        return self._catalog

    def _check_open(self) -> None:
        if self.closed:
            raise FisherStoreError("the store is closed; reopen it with fisherstore.open(path)")

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if not self.writable:
            raise ReadOnlyError(
                f"cannot {what}: the store at {self.path!r} was opened with mode='r'. Reopen it "
                "with mode='r+' (or 'a') to write."
            )
