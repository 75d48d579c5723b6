"""Reader pins: a lease that keeps the generations of one commit on disk while a reader uses them.

A multi-read operation (a Dask graph, an xarray tree, a head sweep, a summary, a heat map,
``verify``) must read **one** commit. A reader takes a :class:`Pin`, a small document
``.fisherstore.pins/<id>.json`` inside the store that names the generation keys of the
commit it reads and the time its lease expires. A writer deletes a superseded generation
only when no live pin names it (:func:`pinned_keys`); what a pin holds is deleted at a
later commit, once the pin is gone, or by the next writer's recovery.

Why a lease: a reader that dies (``kill -9``, a lost notebook kernel) cannot unpin, so
every pin expires ``ttl`` seconds after its last heartbeat. A daemon thread renews the
live pins of this process every ``ttl / 3`` seconds; a pin ends when its owner releases
it or is garbage collected. The expiry is compared with the writer's clock: hosts that
share a store must agree on the time to well within ``ttl`` (NTP does).

The race between a reader taking a pin and a writer committing is closed by order: the
reader writes its pin, then re-reads the manifest; if the commit moved on it pins the new
commit too and checks again. A writer lists pins *after* its commit landed, so a pin
written before the reader's re-read is always seen by the deletion that could hurt it.

The pins directory is a dot name, outside the Zarr hierarchy, like the writer lock. Pins
are not durable (no fsync): a crash loses nothing a pin protects, the reader is gone too.

Usage (the store does this; see :meth:`fisherstore.store.FisherStore.snapshot`)::

    pin = Pin.take(medium, keys)          # raises OSError/FisherStoreError if the store is not writable
    ...                                   # read the pinned generations
    pin.release()

Tune with ``FISHERSTORE_PIN_TTL`` (seconds, default :data:`DEFAULT_TTL`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import FisherStoreError, SnapshotLostError
from .catalog import TaskState, committed_keys

__all__ = ["PINS_DIR", "DEFAULT_TTL", "Pin", "pin_ttl", "pin_commit", "pinned_keys", "writable_twin"]

#: Where pins live, relative to the store's root (a dot name: not part of the Zarr hierarchy).
PINS_DIR = ".fisherstore.pins"
#: Seconds a pin lives past its last heartbeat.
DEFAULT_TTL = 60.0
#: A pin document larger than this is not one of ours (a crafted store); it is ignored.
_MAX_PIN_BYTES = 16 << 20


def pin_ttl() -> float:
    """The pin lease in seconds: ``FISHERSTORE_PIN_TTL`` or :data:`DEFAULT_TTL`."""
    try:
        ttl = float(os.environ.get("FISHERSTORE_PIN_TTL", DEFAULT_TTL))
    except ValueError:
        return DEFAULT_TTL
    return ttl if ttl > 0 else DEFAULT_TTL


def writable_twin(medium: Any) -> Any:
    """A copy of a read-only medium that may write: a reader writes nothing but its own pins.

    The copy shares the medium's client and root; only its ``read_only`` flag differs,
    and only this module writes through it.
    """
    if not getattr(medium, "read_only", False):
        return medium
    twin = copy.copy(medium)
    twin.read_only = False
    return twin


class Pin:
    """One reader's lease on a set of generation keys (see the module docstring)."""

    def __init__(self, medium: Any, ttl: float | None = None) -> None:
        self.medium = writable_twin(medium)
        self.ttl = pin_ttl() if ttl is None else ttl
        self.key = f"{PINS_DIR}/{uuid.uuid4().hex}.json"
        self.keys: set[str] = set()
        self._lock = threading.Lock()
        # Released when its owner is collected, so a forgotten view holds nothing for long.
        self._finalizer = weakref.finalize(self, _delete_quietly, self.medium, self.key)

    @classmethod
    def take(cls, medium: Any, keys: Iterable[str], ttl: float | None = None) -> Pin:
        """Write a pin naming ``keys``; OSError or FisherStoreError if the store cannot be written."""
        pin = cls(medium, ttl)
        pin.add(keys)
        _heartbeat.watch(pin)
        return pin

    def add(self, keys: Iterable[str]) -> None:
        """Also hold ``keys`` (written before this returns)."""
        with self._lock:
            self.keys |= set(keys)
            self._write()

    def renew(self) -> None:
        """Push the expiry ``ttl`` seconds ahead (the heartbeat calls this)."""
        with self._lock:
            if self._finalizer.alive:
                self._write()

    def _write(self) -> None:
        doc = {"pid": os.getpid(), "host": socket.gethostname(), "expires": time.time() + self.ttl,
               "keys": sorted(self.keys)}
        self.medium.put(self.key, json.dumps(doc).encode(), durable=False)

    def release(self) -> None:
        """Drop the lease (idempotent); the writer may then delete what it held."""
        with self._lock:
            self._finalizer()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def __repr__(self) -> str:
        return f"<Pin {self.key} {len(self.keys)} generation(s){'' if self.alive else ' released'}>"


def _delete_quietly(medium: Any, key: str) -> None:
    # Best effort: an undeleted pin expires on its own.
    with contextlib.suppress(Exception):
        medium.delete(key)


class _Heartbeat:
    """One daemon thread per process that renews every live pin every ``ttl / 3`` seconds."""

    def __init__(self) -> None:
        self._pins: weakref.WeakSet[Pin] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, pin: Pin) -> None:
        with self._lock:
            self._pins.add(pin)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fisherstore-pins", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                ttls = [p.ttl for p in self._pins if p.alive]
                if not ttls:
                    self._thread = None
                    return
            # Sleep holding no pin: a view dropped meanwhile must be collectable (it unpins then).
            time.sleep(min(ttls) / 3)
            with self._lock:
                pins = [p for p in self._pins if p.alive]
            for p in pins:
                with contextlib.suppress(Exception):  # a failed renewal is retried; the lease covers 3 misses
                    p.renew()
            del pins


_heartbeat = _Heartbeat()


def pinned_keys(medium: Any, *, clean: bool = False) -> set[str]:
    """Every generation key a live pin names. ``clean``: delete expired pins (a writer holding the lock).

    A pin document that does not parse is ignored (a crafted one must not keep data alive
    forever, nor stop a writer); an unreadable pins directory pins nothing.
    """
    if medium is None:
        return set()
    keys: set[str] = set()
    now = time.time()
    try:
        names = medium.list_files(PINS_DIR)
    except (OSError, FisherStoreError):
        return keys
    for name in names:
        key = f"{PINS_DIR}/{name}"
        try:
            raw = medium.get(key, limit=_MAX_PIN_BYTES)
            doc = json.loads(raw) if raw else None
            expires = float(doc["expires"])
            held = [k for k in doc["keys"] if isinstance(k, str)]
        except Exception:
            continue
        if expires >= now:
            keys.update(held)
        elif clean:
            _delete_quietly(medium, key)
    return keys


#: How often a reader pins again while a writer keeps committing, before it gives up.
PIN_RETRIES = 50


def pin_commit(medium: Any, names: Iterable[str], load: Callable[[str], TaskState],
               current: Callable[[str], int | None]) -> tuple[dict[str, TaskState], Pin | None]:
    """The newest commit of each task in ``names``, with a pin on its generations.

    ``load(name)`` reads a task's committed state; ``current(name)`` its commit number on
    disk now. Returns the states and the pin (None where the store cannot be written, e.g.
    read-only storage: the states are still one commit each, and a read whose generation
    a writer deleted fails with :class:`SnapshotLostError` instead of mixing commits).
    Per-sample segments are never replaced, so only generations are pinned.
    """
    names = list(names)
    pin: Pin | None = None
    for _ in range(PIN_RETRIES):
        states = {n: load(n) for n in names}
        if medium is None:
            return states, None
        keys = {k for t in states.values() for k in committed_keys(t, kind="fisher")}
        try:
            if pin is None:
                pin = Pin.take(medium, keys)
            else:
                pin.add(keys)
        except (OSError, FisherStoreError):
            if pin is not None:
                pin.release()
            return states, None
        # The pin is written; a commit that lands from now on sees it before it deletes. One
        # that landed meanwhile may have deleted what we loaded: load its commit instead.
        if all(current(n) == t.commit for n, t in states.items()):
            return states, pin
    if pin is not None:
        pin.release()
    raise SnapshotLostError(
        f"could not pin one commit of task(s) {', '.join(map(repr, names))}: a writer committed {PIN_RETRIES} times "
        "while the pin was being taken. Read again, or flush less often (flush_every=) while reading.")
