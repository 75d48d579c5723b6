"""Opening a store on a backend: the writer lock, the root document, and crash recovery.

The order (docs/architecture.md): a writer takes the lock before it reads or cleans
anything, so recovery never races another writer, and only then looks at what is there
(another writer may have created the store meanwhile); then ``mode="w"`` replaces the store
(only if it is one of ours), a missing store is created (only in an empty directory), or
the root document is validated; then a writer deletes what a crashed writer left.
"""

from __future__ import annotations

import warnings

from ._version import __version__
from .backends import ArrayBackend
from .catalog import Catalog
from .codecs import CodecSpec
from .commit import mark_committed, recover
from .errors import FisherStoreError, NotAFisherStoreError, RecoveryWarning, StorageError, StoreReplacedError, listing
from .format import DOC, StoreDoc, doc_key, is_pending
from .iopool import IOPool
from .lock import ObjectLock, StoreLock, make_lock

__all__ = ["take_lock", "release_lock", "open_root", "recover_leftovers", "Resources", "check_identity"]


def take_lock(backend: ArrayBackend, force: bool) -> StoreLock | ObjectLock:
    """The writer lock of the store at ``backend``'s location (made if missing)."""
    try:
        backend.ensure_root()
        lock = make_lock(backend.medium, force=force)
        lock.acquire()
    except OSError as e:
        if isinstance(e, FisherStoreError):
            raise
        raise StorageError(
            e.errno,
            f"cannot take the writer lock of {backend.location!r}: {e.strerror or e}. A writer needs a writable "
            "directory (a read-only filesystem, or one without permission, can only be read: open it with "
            "mode='r').",
        ) from e
    return lock


def release_lock(lock: StoreLock | ObjectLock | None, backend: ArrayBackend) -> None:
    if lock is not None:  # a store never created keeps no lock file behind
        lock.release(remove_file=not backend.exists())


def open_root(backend: ArrayBackend, mode: str, codecs: CodecSpec | None, leader: bool) -> tuple[StoreDoc, bool]:
    """The store's root document, and whether this open replaced the store.

    ``mode="w"`` replaces a store of ours by writing a new, empty root document (a new
    uuid, no tasks) over the old one: that one atomic write is the replacement, and the
    old tasks become unlisted nodes that recovery deletes. A crash at any moment leaves
    either the old store or an empty one. A missing store is created (``"a"``/``"w"``), but
    only in an empty directory. Only the leader of a rank group replaces or creates.
    """
    where = backend.location or "<ram>"
    doc = backend.read_json(DOC)
    if doc is not None and mode == "w" and leader:
        StoreDoc.from_doc(doc, where)  # never replace a directory that isn't ours
        new = StoreDoc.new(__version__, (codecs or CodecSpec()).to_dict())
        backend.write_json(DOC, new.to_doc())
        return new, True
    if doc is not None or mode not in ("a", "w") or not leader:
        return StoreDoc.from_doc(doc, where), False
    backend.ensure_root()
    if backend.holds_other_files():
        raise NotAFisherStoreError(
            f"{where!r} is a non-empty directory that is not a fisherstore store; refusing to "
            "create a store inside it. Pick an empty or new directory."
        )
    new = StoreDoc.new(__version__, (codecs or CodecSpec()).to_dict())
    backend.write_json(DOC, new.to_doc())
    return new, False


def recover_leftovers(backend: ArrayBackend, catalog: Catalog, lock: StoreLock | None, quiet: bool = False) -> None:
    """Delete what a crashed writer left, and say so with a :class:`RecoveryWarning` (unless ``quiet``)."""
    nodes = [lo.key for lo in recover(backend, catalog) if lo.kind != "temp_file"]
    if nodes or (lock is not None and lock.previous):
        # A writer died: a commit it made may have landed before it dropped the pending marks.
        for t in catalog:
            stale = [n for n, p in t.params.items()
                     if p.gen is not None and is_pending(backend.read_json(doc_key(p.gen_key(p.gen))))]
            mark_committed(backend, t, stale)
    if nodes and not quiet:
        prev = lock.previous if lock is not None else None
        who = f" (pid {prev.get('pid')} on host {prev.get('host')})" if prev else ""
        warnings.warn(
            f"{backend.location}: a previous writer{who} stopped without closing the store; its steps after "
            f"the last flush were rolled back and {len(nodes)} uncommitted node(s) removed: "
            f"{listing(nodes, 4)}. Every task is at its last commit.",
            RecoveryWarning,
            stacklevel=5,
        )


class Resources:
    """What an open store holds outside Python objects: the writer lock, the I/O threads, the backend.

    Kept apart from the store so a store that is garbage-collected without ``close()`` (a
    notebook cell run twice) still releases its lock: the finaliser needs no store.
    """

    def __init__(self, backend: ArrayBackend, pool: IOPool, lock: StoreLock | None, catalog: Catalog) -> None:
        self.backend, self.pool, self.lock, self.catalog = backend, pool, lock, catalog
        self.closed = False

    def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.pool.shutdown()
            self.backend.close()
        finally:
            release_lock(self.lock, self.backend)

    def abandon(self) -> None:
        """The store was garbage-collected (or the interpreter exits) without close()."""
        lost = [t.name for t in self.catalog if t.dirty]
        self.release()
        if lost:
            warnings.warn(f"a FisherStore at {self.backend.location!r} was never closed; the writer lock is released, "
                          f"but what tasks {listing(lost)} did since their last flush is lost. Use `with "
                          "fisherstore.open(...)` or call close().", ResourceWarning, stacklevel=2)


def check_identity(backend: ArrayBackend, doc: StoreDoc, version: object) -> object:
    """A reader's check that the store it opened is still there, not replaced by ``mode="w"``.

    ``version`` is the root document's version token when last checked (one ``stat``);
    returns the current one. Raises :class:`StoreReplacedError` when the store's uuid changed.
    """
    now_version = backend.version(DOC)
    if now_version == version:
        return version
    try:
        now = StoreDoc.from_doc(backend.read_json(DOC), backend.location or "<ram>")
    except FisherStoreError:
        now = None
    if now is None or now.uuid != doc.uuid:
        raise StoreReplacedError(
            f"the store at {backend.location!r} was replaced (or removed) since this reader opened it; its values "
            "are gone. Reopen it with fisherstore.open(path, mode='r') to read the new store."
        )
    return now_version  # the same store: a writer listed a new task
