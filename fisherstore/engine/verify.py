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

from ..backends import ArrayBackend, location, make_backend
from ..errors import CorruptChunkError, FisherStoreError, StorageError
from ..progress import progress_bar
from ..spec.format import DOC, StoreDoc, chunk_key, doc_key, gen_name, sample_key
from ..spec.manifest import SampleSegment, TaskManifest
from ..spec.regions import chunk_region, grid_shape, iter_grid
from .catalog import Catalog, ParamState, TaskState, load_task
from .lock import LOCK_NAME, holder_alive, read_holder
from .pins import Pin, pin_commit
from .read import read_generation
from .recovery import find_leftovers

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


def verify_store(path: str | os.PathLike[str], backend: str = "zarr", *, progress: bool | None = None) -> VerifyReport:
    """Check the store at ``path``; writes nothing but its reader pins. See the module docstring.

    ``progress``: a bar of checked chunks (None: on a terminal only).

    Safe while a writer runs: each task is checked at one commit that verify pins, so a
    writer keeps its generations until the check is done (engine/pins.py), and a flush in
    progress is never reported as lost data.
    """
    path = location(path)
    local = "://" not in path
    path = os.path.abspath(path) if local else path
    rep = VerifyReport(path)
    if local and not os.path.isdir(path):
        what = "a file, not a store directory" if os.path.exists(path) else "the directory does not exist"
        rep.problems.append(Finding("unreadable_store", f"no fisherstore store at {path!r} ({what})", path))
        return rep
    be = make_backend(backend, path, read_only=True)
    pins: list[Pin] = []
    try:
        tasks = StoreDoc.from_doc(be.read_json(DOC), path).tasks
        with progress_bar(_planned_chunks(be, tasks), progress, "verify", unit="chunk") as bar:
            for name, key in tasks.items():
                _check_task(be, rep, name, key, bar, pins)
        # Leftovers are judged against the commits on disk now, not those checked above: a
        # generation a writer committed meanwhile is live, not rolled back.
        catalog = Catalog()
        for name, key in tasks.items():
            catalog.add(load_task(be.read_json, name, key))
        rep.rolled_back += [Finding(lo.kind, lo.message, be.url(lo.key), lo.task, lo.param)
                            for lo in find_leftovers(be, catalog)]
    except FisherStoreError as e:
        if isinstance(e, StorageError) and not local:
            raise  # the object store failed (unreachable, no credentials): not damage (CLI exit 5)
        rep.problems.append(Finding("unreadable_store", str(e), path))
    except OSError as e:  # permissions, I/O errors: a finding, never a traceback
        rep.problems.append(Finding("unreadable_store", f"{type(e).__name__}: {e}", getattr(e, "filename", None)
                                    or path))
    finally:
        for pin in pins:
            pin.release()
        be.close()
    _lock_note(rep)
    return rep


def _planned_chunks(be: ArrayBackend, tasks: dict[str, str]) -> int:
    """How many chunks verify will check (the progress bar's total; a racing writer may change it)."""
    n = 0
    for name, key in tasks.items():
        t = load_task(be.read_json, name, key)
        n += sum(math.prod(grid_shape(p.shape, p.chunks)) for p in t.params.values() if p.gen is not None)
        n += sum(seg.n * math.prod(grid_shape(t.params[q].shape, t.params[q].chunks))
                 for seg in getattr(t, "samples", ()) for q in seg.params)
    return n


def _check_task(be: ArrayBackend, rep: VerifyReport, name: str, key: str, bar: Any, pins: list[Pin]) -> TaskState:
    """Check every committed generation of a task at one commit, pinned so a live writer keeps it (.pins).

    Where the store cannot hold a pin (read-only storage), a task whose manifest a writer
    replaced during its check is checked again at the new commit.
    """
    def current(_: str) -> int | None:
        return TaskManifest.commit_of(be.read_json(doc_key(key)))

    for attempt in range(RETRIES):
        if attempt == 0:
            states, pin = pin_commit(getattr(be, "medium", None), [name], lambda n: load_task(be.read_json, n, key),
                                     current)
            t = states[name]
            pins += [pin] if pin is not None else []
        else:
            t = load_task(be.read_json, name, key)
        found = VerifyReport(rep.path)
        for p in t.params.values():
            if p.gen is not None:  # never flushed: all zeros, nothing on disk to check
                done = found.chunks_checked
                _check_generation(be, found, t, p)
                bar and bar.update(found.chunks_checked - done)
        for seg in t.samples:
            for pname in seg.params:
                done = found.chunks_checked
                _check_samples(be, found, t, t.params[pname], seg)
                bar and bar.update(found.chunks_checked - done)
        if not found.problems or pins or current(name) == t.commit:
            break  # clean, or damaged at a commit that stayed put: the problems are real
    rep.problems += found.problems
    rep.chunks_checked += found.chunks_checked
    rep.bytes_checked += found.bytes_checked
    return t


def _check_samples(be: ArrayBackend, rep: VerifyReport, t: TaskState, p: ParamState, seg: SampleSegment) -> None:
    """A committed per-sample segment of ``p``: header as the manifest says, every chunk present and sound."""
    key = sample_key(p.key, seg.id)
    what = f"task {t.name!r}, parameter {p.name!r}: per-sample segment {seg.id}"
    meta = be.array_meta(key)
    want = (seg.dtype, (seg.n, *p.shape), (1, *p.chunks))
    if meta is None or (meta["data_type"], tuple(meta["shape"]), tuple(meta["chunks"])) != want:
        kind = "missing_samples" if meta is None else "inconsistent_samples"
        rep.problems.append(Finding(kind, f"{what} is {'missing' if meta is None else 'not what the manifest says'}"
                                          f" (want {want[0]} {want[1]} in chunks {want[2]}); its samples are lost",
                                    be.url(key), t.name, p.name))
        return
    present = be.list_chunks(key)
    for idx in iter_grid(want[1], want[2]):
        rep.chunks_checked += 1
        if idx not in present:
            rep.problems.append(Finding("missing_chunk", f"{what}: chunk {idx} is missing",
                                        be.url(f"{key}/{chunk_key(idx)}"), t.name, p.name, idx))
            continue
        try:
            rep.bytes_checked += be.read_stored(key, chunk_region(idx, want[1], want[2])).nbytes
        except Exception as e:
            if isinstance(e, StorageError) and getattr(be.medium, "kind", "file") == "s3":
                raise  # the object store failed, not the chunk
            rep.problems.append(Finding("corrupt_chunk", f"{what}: chunk {idx}: {type(e).__name__}: {e}",
                                        be.url(f"{key}/{chunk_key(idx)}"), t.name, p.name, idx))


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
    if "://" in rep.path:
        return  # an object store's lock record is not read here
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
