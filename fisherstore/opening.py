"""Opening a store on a backend: the writer lock, the root document, and crash recovery.

The order (docs/architecture.md): a writer takes the lock before it reads or cleans
anything, so recovery never races another writer; then ``mode="w"`` replaces the store
(only if it is one of ours), a missing store is created (only in an empty directory), or
the root document is validated; then a writer deletes what a crashed writer left.
"""

from __future__ import annotations

import warnings

from ._version import __version__
from .backends import ArrayBackend
from .catalog import Catalog
from .codecs import CodecSpec
from .commit import recover
from .errors import NotAFisherStoreError, RecoveryWarning, listing
from .format import DOC, StoreDoc
from .lock import LOCK_NAME, StoreLock

__all__ = ["take_lock", "release_lock", "open_root", "recover_leftovers"]


def take_lock(backend: ArrayBackend, force: bool) -> StoreLock:
    """The writer lock of the store at ``backend``'s location (made if missing)."""
    backend.ensure_root()
    lock = StoreLock(backend.location, force=force)
    lock.acquire()
    return lock


def release_lock(lock: StoreLock | None, backend: ArrayBackend) -> None:
    if lock is not None:  # a store never created keeps no lock file behind
        lock.release(remove_file=not backend.exists())


def open_root(backend: ArrayBackend, mode: str, codecs: CodecSpec | None, leader: bool) -> StoreDoc:
    """The store's root document: replaced (``"w"``), created (``"a"``/``"w"``) or validated.

    Only the leader of a rank group replaces or creates; the others open what it made.
    """
    where = backend.location or "<ram>"
    if mode == "w" and leader and backend.exists():
        StoreDoc.from_doc(backend.read_json(DOC), where)  # never wipe a directory that isn't ours
        backend.clear(keep=(LOCK_NAME,))
    doc = backend.read_json(DOC)
    if doc is not None or mode not in ("a", "w"):
        return StoreDoc.from_doc(doc, where)
    backend.ensure_root()
    if backend.holds_other_files():
        raise NotAFisherStoreError(
            f"{where!r} is a non-empty directory that is not a fisherstore store; refusing to "
            "create a store inside it. Pick an empty or new directory."
        )
    new = StoreDoc.new(__version__, (codecs or CodecSpec()).to_dict())
    backend.write_json(DOC, new.to_doc())
    return new


def recover_leftovers(backend: ArrayBackend, catalog: Catalog, lock: StoreLock | None) -> None:
    """Delete what a crashed writer left, and say so with a :class:`RecoveryWarning`."""
    nodes = [lo.key for lo in recover(backend, catalog) if lo.kind != "temp_file"]
    if nodes:
        prev = lock.previous if lock is not None else None
        who = f" (pid {prev.get('pid')} on host {prev.get('host')})" if prev else ""
        warnings.warn(
            f"{backend.location}: a previous writer{who} stopped without closing the store; its steps after "
            f"the last flush were rolled back and {len(nodes)} uncommitted node(s) removed: "
            f"{listing(nodes, 4)}. Every task is at its last commit.",
            RecoveryWarning,
            stacklevel=5,
        )
