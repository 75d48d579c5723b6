"""``fisherstore verify``: check every committed chunk, and name what a crash left behind.

A store is *clean* when every task manifest parses, every generation it names exists, and
every chunk of those generations is present and decodes (its crc32c checksum holds).
What an interrupted writer leaves (uncommitted generations, unlisted nodes, temp files)
is not damage: readers ignore it and the next writer removes it. The report names each
such item as *rolled back*, so a user can see exactly which flush or step was lost.

Usage::

    report = verify_store("fisher.zarr")
    report.ok             # False if any committed data is damaged
    report.problems       # [Finding(kind="corrupt_chunk", task=..., param=..., chunk=(3, 0), ...)]
    report.rolled_back    # [Finding(kind="uncommitted_generation", ...)]
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .backends import ArrayBackend, make_backend
from .catalog import Catalog, ParamState, TaskState, load_task
from .commit import find_leftovers
from .errors import CorruptChunkError, FisherStoreError
from .format import DOC, StoreDoc, TaskManifest, chunk_key, doc_key, gen_name
from .lock import LOCK_NAME, holder_alive, read_holder
from .read import read_generation
from .regions import chunk_region, grid_shape, iter_grid

__all__ = ["Finding", "VerifyReport", "verify_store"]


@dataclass
class Finding:
    """One thing verify found: damage (a problem) or a leftover (rolled back)."""

    kind: str
    message: str
    path: str
    task: str | None = None
    param: str | None = None
    chunk: tuple[int, ...] | None = None


@dataclass
class VerifyReport:
    path: str
    problems: list[Finding] = field(default_factory=list)
    rolled_back: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def __repr__(self) -> str:
        return (f"<VerifyReport {self.path!r} {'clean' if self.ok else f'{len(self.problems)} problem(s)'}, "
                f"{len(self.rolled_back)} rolled back, {self.chunks_checked} chunks checked>")


#: How often verify re-reads a task whose manifest a live writer replaced while it was checked.
RETRIES = 8
#: More chunks than this in one array is no parameter fisherstore wrote (a 7B one has a few thousand).
MAX_CHUNKS = 1 << 22


def verify_store(path: str | os.PathLike[str], backend: str = "zarr") -> VerifyReport:
    """Check the store at ``path``; never writes. See the module docstring.

    Safe while a writer runs: a task whose manifest changed during its check is checked
    again at its new commit, so a flush in progress is never reported as lost data.
    """
    path = os.path.abspath(os.fspath(path))
    rep = VerifyReport(path)
    if not os.path.isdir(path):
        rep.problems.append(Finding("unreadable_store", f"no fisherstore store at {path!r} (the directory does "
                                                        "not exist)", path))
        return rep
    be = make_backend(backend, path, read_only=True)
    try:
        catalog = Catalog()
        for name, key in StoreDoc.from_doc(be.read_json(DOC), path).tasks.items():
            catalog.add(_check_task(be, rep, name, key))
        rep.rolled_back += [Finding(lo.kind, lo.message, be.url(lo.key), lo.task, lo.param)
                            for lo in find_leftovers(be, catalog)]
    except FisherStoreError as e:
        rep.problems.append(Finding("unreadable_store", str(e), path))
    except OSError as e:  # permissions, I/O errors: a finding, never a traceback
        rep.problems.append(Finding("unreadable_store", f"{type(e).__name__}: {e}", getattr(e, "filename", None)
                                    or path))
    finally:
        be.close()
    _lock_note(rep)
    return rep


def _check_task(be: ArrayBackend, rep: VerifyReport, name: str, key: str) -> TaskState:
    """Check every committed generation of a task; retry while a writer commits it."""
    for _ in range(RETRIES):
        t = load_task(be.read_json, name, key)
        found = VerifyReport(rep.path)
        for p in t.params.values():
            if p.gen is not None:  # never flushed: all zeros, nothing on disk to check
                _check_generation(be, found, t, p)
        if not found.problems or TaskManifest.commit_of(be.read_json(doc_key(key))) == t.commit:
            break  # clean, or damaged at a commit that stayed put: the problems are real
    rep.problems += found.problems
    rep.chunks_checked += found.chunks_checked
    rep.bytes_checked += found.bytes_checked
    return t


def _check_generation(be: ArrayBackend, rep: VerifyReport, t: TaskState, p: ParamState) -> None:
    gkey = p.gen_key(p.gen)
    meta = be.array_meta(gkey)
    if meta is None:
        rep.problems.append(Finding(
            "missing_generation",
            f"task {t.name!r}, parameter {p.name!r}: committed generation {gen_name(p.gen)} is missing; "
            "its values are lost (restore the store from a copy, or recreate the parameter)",
            be.url(gkey), t.name, p.name))
        return
    if meta["data_type"] != "float32" or tuple(meta["shape"]) != p.shape or tuple(meta["chunks"]) != p.chunks:
        rep.problems.append(Finding(
            "inconsistent_generation",
            f"task {t.name!r}, parameter {p.name!r}: generation {gen_name(p.gen)} is a {meta['data_type']} array "
            f"of shape {tuple(meta['shape'])} in chunks {tuple(meta['chunks'])}, but the manifest says float32 "
            f"{p.shape} in chunks {p.chunks}; readers refuse it", be.url(gkey), t.name, p.name))
        return
    n_chunks = math.prod(grid_shape(p.shape, p.chunks))
    if n_chunks > MAX_CHUNKS:
        rep.problems.append(Finding(
            "implausible_shape", f"task {t.name!r}, parameter {p.name!r}: shape {p.shape} in chunks {p.chunks} is "
            f"{n_chunks} chunks, more than any parameter fisherstore writes; the store is damaged or crafted",
            be.url(gkey), t.name, p.name))
        return
    present = be.list_chunks(gkey)
    for idx in iter_grid(p.shape, p.chunks):
        where = be.url(f"{gkey}/{chunk_key(idx)}")
        rep.chunks_checked += 1
        if idx not in present:
            # Every chunk is written, zeros included, so a missing file is damage (a reader
            # through a Zarr library would silently see zeros).
            rep.problems.append(Finding(
                "missing_chunk", f"task {t.name!r}, parameter {p.name!r}: chunk {idx} is missing", where,
                t.name, p.name, idx))
            continue
        try:
            arr = read_generation(be, t.name, p, p.gen, chunk_region(idx, p.shape, p.chunks))
            rep.bytes_checked += arr.nbytes
        except CorruptChunkError as e:
            rep.problems.append(Finding("corrupt_chunk", str(e), where, t.name, p.name, idx))


def _lock_note(rep: VerifyReport) -> None:
    holder = read_holder(os.path.join(rep.path, LOCK_NAME))
    if not holder.get("pid"):
        return
    who = f"pid {holder['pid']} on host {holder.get('host', '?')}"
    alive = holder_alive(holder)
    if alive:
        rep.notes.append(f"a writer is running ({who}): this report may already be out of date")
    elif alive is False:
        rep.notes.append(f"the last writer ({who}) is gone without closing the store; its lock is released")
    else:
        rep.notes.append(f"writer lock record from {who}")
