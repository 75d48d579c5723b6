"""Opening a store on a backend: the writer lock, the root document, and what an open store holds.

The order (docs/architecture.md): a writer takes the lock before it reads or cleans
anything, so recovery never races another writer, and only then looks at what is there
(another writer may have created the store meanwhile); then ``mode="w"`` replaces the store
(only if it is one of ours), a missing store is created (only in an empty directory), or
the root document is validated; then a writer deletes what a crashed writer left
(:func:`~fisherstore.engine.recovery.recover_leftovers`).
"""

from __future__ import annotations

import warnings

from .._version import __version__
from ..backends import ArrayBackend
from ..errors import FisherStoreError, NotAFisherStoreError, StorageError, StoreReplacedError, listing
from ..spec.codecs import CodecSpec
from ..spec.format import DOC, StoreDoc
from .catalog import Catalog
from .iopool import IOPool
from .lock import ObjectLock, StoreLock, make_lock

__all__ = ["take_lock", "release_lock", "open_root", "Resources", "check_identity"]


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
    """Release the writer lock; a store never created keeps no lock file behind."""
    if lock is None:
        return
    try:
        never_created = not backend.exists()
    except OSError:  # an unreachable server (StorageError): the lock must still be released
        never_created = False
    lock.release(remove_file=never_created)


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
