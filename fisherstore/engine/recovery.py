"""What a crashed writer leaves behind, found and removed.

Whatever an interrupted writer left that no commit names is a :class:`Leftover`: the temp
file of a document write, a task or parameter node no manifest lists, an uncommitted
generation or per-sample segment. :func:`find_leftovers` classifies them (``verify``
reports them as *rolled back*), :func:`recover` deletes them (a writer holding the lock),
and :func:`recover_leftovers` is what a writer opening a store runs: it recovers, drops
the pending marks a crash may have left on committed generations, and says so with a
:class:`~fisherstore.errors.RecoveryWarning`.

Readers ignore every leftover, so none of this is needed to read a store.

Usage::

    for lo in find_leftovers(backend, catalog):
        print(lo.kind, lo.key)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..backends import ArrayBackend
from ..errors import FisherStoreError, RecoveryWarning, listing
from ..spec.format import PARAM_ATTR, TASK_ATTR, doc_key, gen_name, is_pending, node_attr, parse_gen, parse_segment
from .catalog import Catalog
from .commit import mark_committed
from .lock import StoreLock
from .pins import PINS_DIR, pinned_keys

__all__ = ["Leftover", "find_leftovers", "recover", "recover_leftovers"]


@dataclass(frozen=True)
class Leftover:
    """Something a crashed writer left that no commit names; readers ignore it."""

    kind: str  # "temp_file", "uncommitted_task", "uncommitted_param", "uncommitted_generation", "uncommitted_samples",
    # "superseded_generation" (older than the live one: nothing lost)
    key: str
    task: str | None = None
    param: str | None = None
    message: str = ""


def _ours(backend: ArrayBackend, node: str, attr: str) -> bool:
    """Whether fisherstore can prove it made ``node``: its document says so, or it holds nothing but
    the temp file of its interrupted first document. A user's directory is never ours."""
    try:
        doc = backend.read_json(doc_key(node))
    except FisherStoreError:
        return False  # documents are replaced atomically: a damaged one is not a crash of ours
    if doc is not None:
        return node_attr(doc, attr) is not None
    return all(backend.is_temp(e) for e in backend.entries(node))


def find_leftovers(backend: ArrayBackend, catalog: Catalog) -> list[Leftover]:
    """Classify what no commit names: temp files, uncommitted tasks, parameters and generations."""
    found = [Leftover("temp_file", k, message=f"temporary file of an interrupted write: {k}")
             for k in backend.temp_files()]
    tasks = {t.key: t for t in catalog}
    # A superseded generation a reader's live pin names is still being read (.pins): not a leftover.
    pinned = pinned_keys(getattr(backend, "medium", None))
    for tkey in backend.list(""):
        t = tasks.get(tkey)
        if tkey == PINS_DIR:
            continue  # readers' pins (.pins): live leases, never a crash's leftover
        if t is None:
            if _ours(backend, tkey, TASK_ATTR):
                found.append(Leftover("uncommitted_task", tkey,
                                      message=f"task directory {tkey!r} that no commit lists (an interrupted create)"))
            continue
        params = {p.key.rsplit("/", 1)[-1]: p for p in t.params.values()}
        for pseg in backend.list(tkey):
            p = params.get(pseg)
            if p is None:
                if _ours(backend, f"{tkey}/{pseg}", PARAM_ATTR):
                    found.append(Leftover("uncommitted_param", f"{tkey}/{pseg}", t.name,
                                          message=f"task {t.name!r}: parameter directory {pseg!r} that no commit "
                                                  "lists"))
                continue
            segments = {seg.id for seg in t.samples if p.name in seg.params}
            for child in backend.list(p.key):
                sid = parse_segment(child)
                if sid is not None and sid not in segments:
                    found.append(Leftover(
                        "uncommitted_samples", f"{p.key}/{child}", t.name, p.name,
                        f"task {t.name!r}, parameter {p.name!r}: per-sample segment {child} was written after the "
                        "last commit and never committed; readers ignore it and the next writer removes it"))
                g = parse_gen(child)
                if g is not None and p.gen is not None and g < p.gen and f"{p.key}/{child}" not in pinned:
                    # Older than the live one: a commit replaced it, and it outlived its deletion (a
                    # reader's pin held it, or the writer stopped between commit and delete). No step is lost.
                    found.append(Leftover(
                        "superseded_generation", f"{p.key}/{child}", t.name, p.name,
                        f"task {t.name!r}, parameter {p.name!r}: generation {child} was superseded by "
                        f"{gen_name(p.gen)} and not yet deleted; readers ignore it and the next writer removes it"))
                elif g is not None and g != p.gen and f"{p.key}/{child}" not in pinned:
                    found.append(Leftover(
                        "uncommitted_generation", f"{p.key}/{child}", t.name, p.name,
                        f"task {t.name!r}, parameter {p.name!r}: generation {child} was written after the last "
                        f"commit (step {t.committed_step}, generation {gen_name(p.gen) if p.gen else 'none'}) and "
                        "never committed; readers ignore it and the next writer removes it"))
    return found


def recover(backend: ArrayBackend, catalog: Catalog) -> list[Leftover]:
    """Delete every leftover of a crashed writer (the writer lock must be held); return them."""
    found = find_leftovers(backend, catalog)
    for lo in found:
        backend.delete(lo.key)
    return found


def recover_leftovers(backend: ArrayBackend, catalog: Catalog, lock: StoreLock | None, quiet: bool = False) -> None:
    """Delete what a crashed writer left, and say so with a :class:`RecoveryWarning` (unless ``quiet``)."""
    nodes = [lo.key for lo in recover(backend, catalog) if lo.kind not in ("temp_file", "superseded_generation")]
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
