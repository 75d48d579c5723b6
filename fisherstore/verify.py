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

import itertools
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CorruptChunkError, FisherStoreError
from .format import PARAM_ATTR, TASK_ATTR, gen_name, parse_gen
from .lock import LOCK_NAME, holder_alive, read_holder

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


def verify_store(path: str | os.PathLike[str], backend: str = "zarr") -> VerifyReport:
    """Check the store at ``path``; never writes. See the module docstring."""
    from . import open as open_store

    path = os.path.abspath(os.fspath(path))
    rep = VerifyReport(path)
    try:
        store = open_store(path, mode="r", backend=backend)
    except FisherStoreError as e:
        rep.problems.append(Finding("unreadable_store", str(e), path))
        return rep
    with store:
        for task in store.tasks():
            t = store._tasks[task]  # noqa: SLF001 - same package
            for p in t.params.values():
                if p.gen is None:
                    continue  # never flushed: all zeros, nothing on disk to check
                _check_generation(store, rep, t.name, p)
        _leftovers(store, rep)
    _lock_note(rep)
    return rep


def _check_generation(store: Any, rep: VerifyReport, task: str, p: Any) -> None:
    gkey = p.gen_key(p.gen)
    gdir = os.path.join(rep.path, *gkey.split("/"))
    if not os.path.isfile(os.path.join(gdir, "zarr.json")):
        rep.problems.append(Finding(
            "missing_generation",
            f"task {task!r}, parameter {p.name!r}: committed generation {gen_name(p.gen)} is missing; "
            "its values are lost (restore the store from a copy, or recreate the parameter)",
            gdir, task, p.name))
        return
    grid = [range(math.ceil(n / c)) if n else range(1) for n, c in zip(p.shape, p.chunks)]
    for idx in itertools.product(*grid):
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, p.chunks, p.shape))
        cfile = os.path.join(gdir, "c", *map(str, idx)) if idx else os.path.join(gdir, "c")
        rep.chunks_checked += 1
        if not os.path.isfile(cfile):
            # Every chunk is written, zeros included, so a missing file is damage (a reader
            # through a Zarr library would silently see zeros).
            rep.problems.append(Finding(
                "missing_chunk", f"task {task!r}, parameter {p.name!r}: chunk {idx} is missing", cfile,
                task, p.name, idx))
            continue
        try:
            arr = store._read_array(store._tasks[task], p, p.gen, region)  # noqa: SLF001
            rep.bytes_checked += arr.nbytes
        except CorruptChunkError as e:
            rep.problems.append(Finding("corrupt_chunk", str(e), cfile, task, p.name, idx))


def _leftovers(store: Any, rep: VerifyReport) -> None:
    """What an interrupted writer left: the commit it never made, named exactly."""
    tasks_by_key = {t.key: t for t in store._tasks.values()}  # noqa: SLF001
    for dirpath, dirnames, files in os.walk(rep.path):
        for f in files:
            if f.endswith(".partial"):
                rep.rolled_back.append(Finding(
                    "temp_file", f"temporary file of an interrupted write: {os.path.relpath(os.path.join(dirpath, f), rep.path)}",
                    os.path.join(dirpath, f)))
        rel = os.path.relpath(dirpath, rep.path)
        parts = [] if rel == "." else rel.split(os.sep)
        if len(parts) == 0:
            for d in dirnames:
                if d not in tasks_by_key and _is_ours(os.path.join(dirpath, d), TASK_ATTR):
                    rep.rolled_back.append(Finding(
                        "uncommitted_task", f"task directory {d!r} that no commit lists (an interrupted create)",
                        os.path.join(dirpath, d)))
        elif len(parts) == 1 and parts[0] in tasks_by_key:
            t = tasks_by_key[parts[0]]
            known = {p.key.rsplit("/", 1)[-1] for p in t.params.values()}
            for d in dirnames:
                if d not in known and _is_ours(os.path.join(dirpath, d), PARAM_ATTR):
                    rep.rolled_back.append(Finding(
                        "uncommitted_param", f"task {t.name!r}: parameter directory {d!r} that no commit lists",
                        os.path.join(dirpath, d), t.name))
        elif len(parts) == 2 and parts[0] in tasks_by_key:
            t = tasks_by_key[parts[0]]
            p = next((q for q in t.params.values() if q.key == f"{parts[0]}/{parts[1]}"), None)
            if p is None:
                continue
            for d in dirnames:
                g = parse_gen(d)
                if g is not None and g != p.gen:
                    rep.rolled_back.append(Finding(
                        "uncommitted_generation",
                        f"task {t.name!r}, parameter {p.name!r}: generation {d} was written after the last "
                        f"commit (step {t.committed_step}, generation {gen_name(p.gen) if p.gen else 'none'}) "
                        "and never committed; readers ignore it and the next writer removes it",
                        os.path.join(dirpath, d), t.name, p.name))
        if len(parts) >= 2:
            dirnames[:] = [d for d in dirnames if parse_gen(d) is None]  # don't walk chunk trees


def _is_ours(d: str, attr: str) -> bool:
    import json

    try:
        with open(os.path.join(d, "zarr.json"), "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        return True  # created, then killed before its document landed
    except (OSError, ValueError):
        return True
    return attr in (doc.get("attributes") or {})


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
