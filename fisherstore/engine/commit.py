"""The commit protocol: a flush as a transaction.

A flush runs in this order, the collectives in between (docs/architecture.md)::

    fold      write every resident accumulator into a new generation   (WritePath.fold)
    sync      make every new generation durable (one syncfs)
    agree     every rank learns whether any rank failed; if one did, all delete their
              new generations and raise: nothing is committed
    gather    the leader learns the entries of the parameters other ranks own
    plan      per task, a pure TaskCommit: the new manifest, what it adopts, what it supersedes
    manifest  the leader replaces the task manifest atomically: this is the commit
    agree     every rank learns whether the manifest landed (a rank that died here leaves the
              others unsure: they raise RankFailedError and delete nothing)
    apply     RAM state takes the plan (the one place a commit changes it)
    delete    the generations the commit superseded, except what a reader's pin holds (.pins)

A crash anywhere leaves the previous manifest and the generations it names intact; what
else it leaves is :mod:`.recovery`'s. Atomicity is per task: each task's manifest is its
own commit point.

Which ranks make each call (torch.distributed.checkpoint style): every rank calls
:meth:`Committer.flush` with the same catalogue of tasks, in the same order; every rank
folds and syncs what it owns; only the leader (rank 0) writes manifests and the root
document; every rank applies the plan and deletes what it superseded.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..backends import ArrayBackend
from ..errors import FisherStoreError, RankFailedError, StorageError, human_bytes, listing
from ..progress import progress_bar
from ..spec.format import (
    DOC,
    StoreDoc,
    array_attributes,
    doc_key,
    param_doc,
    required_version,
    sample_attributes,
    sample_key,
)
from ..spec.manifest import ParamEntry, TaskManifest
from .catalog import Catalog, TaskState
from .dist import RankGroup
from .generations import WritePath
from .pins import pinned_keys

__all__ = ["TaskCommit", "plan_commit", "apply_commit", "Committer", "mark_committed", "storage_error"]


@dataclass(frozen=True)
class TaskCommit:
    """What committing one task changes, computed before any I/O.

    Attributes:
        manifest: the manifest the commit writes.
        adopted: parameters whose uncommitted generation (streamed or folded) it commits.
        spent: parameters whose accumulator a fold consumed.
        new_keys: generations written for this commit, deleted if it fails.
        superseded: generations no manifest names once it lands, deleted then.
    """

    manifest: TaskManifest
    adopted: frozenset[str]
    spent: frozenset[str]
    new_keys: tuple[str, ...]
    superseded: tuple[str, ...]


def plan_commit(t: TaskState, folded: Mapping[str, int], others: Mapping[str, ParamEntry]) -> TaskCommit:
    """Plan the commit of ``t``: its folds, its streamed generations, and other ranks' entries. Pure."""
    entries: dict[str, ParamEntry] = {}
    adopted, new_keys, superseded = set(), [], []
    for name, p in t.params.items():
        e = p.entry()
        if name in folded:
            e = dataclasses.replace(e, generation=folded[name], t_last=p.a_last)
            new_keys.append(p.gen_key(folded[name]))
            superseded += [p.gen_key(g) for g in (p.gen, p.work_gen) if g is not None]
        elif p.work_gen is not None:
            e = dataclasses.replace(e, generation=p.work_gen, t_last=p.work_t)
            superseded += [p.gen_key(p.gen)] if p.gen is not None else []
        elif not p.owned and name in others:
            o = others[name]
            e = dataclasses.replace(e, generation=o.generation, t_last=o.t_last, updates=o.updates,
                                    nonfinite_skipped=o.nonfinite_skipped)
        if e.generation != p.gen or e.t_last != p.t_last:
            adopted.add(name)
        entries[name] = e
    manifest = TaskManifest(name=t.name, step=t.step, tokens_seen=t.tokens_seen, commit=t.commit + 1,
                            info=dict(t.info), params=entries, samples=(*t.samples, *t.new_samples))
    return TaskCommit(manifest, frozenset(adopted), frozenset(folded), tuple(new_keys), tuple(superseded))


def apply_commit(t: TaskState, plan: TaskCommit) -> None:
    """Make ``t``'s RAM state what ``plan`` committed: the one place a commit changes it."""
    m = plan.manifest
    for name, e in m.params.items():
        p = t.params[name]
        p.gen, p.t_last, p.updates, p.nonfinite_skipped = e.generation, e.t_last, e.updates, e.nonfinite_skipped
        p.on_disk = True
        if name in plan.adopted:
            p.work_gen = None
    for name in plan.spent:
        t.params[name].a_last = None  # the accumulator is spent; the next step overwrites it
    t.committed_step, t.committed_tokens, t.commit = m.step, m.tokens_seen, m.commit
    t.samples, t.new_samples = list(m.samples), []
    t.changed = False


class Committer:
    """Runs the flush transaction of one store (see the module docstring for its order)."""

    def __init__(self, backend: ArrayBackend, write: WritePath, group: RankGroup, progress: bool | None) -> None:
        self.backend = backend
        self.write = write
        self.group = group
        self.progress = progress
        self.deferred: list[str] = []  # superseded generations not yet deleted (a reader's pin may hold them)

    def flush(self, catalog: Catalog, doc: StoreDoc) -> None:
        """Fold, sync and commit every task with news (on any rank of the group); list new tasks in ``doc``."""
        names = set().union(*self.group.all_gather([t.name for t in catalog if t.dirty]))
        dirty = [t for t in catalog if t.name in names]
        if not dirty:
            return
        needed = sum(p.nbytes for t in dirty for p in t.params.values() if p.a_last is not None)
        folded: dict[str, dict[str, int]] = {}
        err: BaseException | None = None
        try:
            with progress_bar(needed, self.progress, f"flush {self.backend.location or ''}") as bar:
                for t in dirty:
                    folded[t.name] = self.write.fold(t, bar)
            self._write_new_nodes(dirty)
            self.backend.sync()  # one durable sync for every task's new generations and nodes
        except BaseException as e:
            err = e
        err = self.group.agree(err, "write its part of the flush")
        if err is not None:
            for t in dirty:
                self.write.discard(t, folded.get(t.name, {}))
            raise storage_error(err, "flush", self.backend, needed, dirty) from err
        needed = required_version([p.layout for t in dirty for p in t.params.values()],
                                   samples=any(t.new_samples for t in dirty), infos=[t.info for t in dirty])
        if doc.format_version < needed:
            self._upgrade(catalog, doc, needed)
        for t in dirty:
            self._commit(t, folded[t.name])
        self._list_new_tasks(catalog, doc)
        self.delete_unpinned()

    def _upgrade(self, catalog: Catalog, doc: StoreDoc, version: int) -> None:
        """Raise the store's format version before the first manifest that needs it lands.

        A store without per-sample segments stays at version 1, which older fisherstores open;
        one with them must be refused by older writers, which would rewrite its manifests
        without them (version 2); one with a version-3 layout by older readers, which would
        read its head blocks from the wrong rows (spec/format.required_version).
        """
        err: BaseException | None = None
        try:
            if self.group.is_leader:
                listed = {t.name: t.key for t in catalog if t.listed}
                self.backend.write_json(DOC, dataclasses.replace(doc, format_version=version,
                                                                 tasks=listed).to_doc())
        except BaseException as e:
            err = e
        err = self.group.agree(err, "raise the store's format version")
        if err is not None:
            raise storage_error(err, "raising the format version", self.backend, None, []) from err
        doc.format_version = version

    def _write_new_nodes(self, tasks: list[TaskState]) -> None:
        """The leader writes the node documents of parameters created since the last commit.

        Creation is not a commit: ``create()`` touches only RAM, and its documents ride
        on the flush's one sync, so creating 10,000 parameters costs no fsync each.
        """
        if not self.group.is_leader:
            return
        for t in tasks:
            for p in t.params.values():
                if not p.on_disk:
                    self.backend.write_json(doc_key(p.key), param_doc(p.name, p.shape, p.layout), durable=False)

    def _commit(self, t: TaskState, folded: dict[str, int]) -> None:
        plan = plan_commit(t, folded, {})
        if self.group.world_size > 1:  # every rank learns the new entries of the parameters others own
            mine = {n: e for n, e in plan.manifest.params.items() if t.params[n].owned}
            others: dict[str, ParamEntry] = {}
            for entries in self.group.all_gather(mine):
                others.update({n: e for n, e in entries.items() if not t.params[n].owned})
            plan = plan_commit(t, folded, others)
        err: BaseException | None = None
        try:
            if self.group.is_leader:
                self.backend.write_json(doc_key(t.key), plan.manifest.to_doc())
        except BaseException as e:
            err = e
        err = self.group.agree(err, f"commit task {t.name!r}")
        if isinstance(err, RankFailedError) and err.rank != self.group.rank:
            # Another rank failed or died after the leader's manifest write was attempted: on
            # the leader it landed, elsewhere nobody can tell. The new generations may be what
            # a landed manifest names, so they stay (recovery removes them if none does).
            if self.group.is_leader:
                raise RankFailedError(f"{err} The manifest of task {t.name!r} at step {t.step} had landed: a "
                                      "reader sees that commit", rank=err.rank) from err
            raise err
        if err is not None:
            for key in plan.new_keys:
                with contextlib.suppress(OSError):
                    self.backend.delete(key)
            raise storage_error(err, f"commit of task {t.name!r}", self.backend, None, [t]) from err
        new_segments = list(t.new_samples)
        with self.write.lock:
            apply_commit(t, plan)
        self.deferred += plan.superseded  # deleted once every task is committed: one look at the pins per flush
        mark_committed(self.backend, t, [n for n in plan.adopted if t.params[n].owned])
        for seg in new_segments:
            for name in seg.params:
                p = t.params[name]
                if p.owned:
                    with contextlib.suppress(OSError, FisherStoreError):
                        self.backend.set_attributes(sample_key(p.key, seg.id), sample_attributes(p.name, p.layout))

    def delete_unpinned(self, superseded: Sequence[str] = ()) -> None:
        """Delete superseded generations that no reader's live pin names; keep the rest for the next flush.

        A reader in another process may be reading the commit these belonged to (a Dask
        graph, a head sweep: :mod:`.pins`). What a pin holds is retried at every later
        commit; what is left at close is a leftover the next writer's recovery removes.
        """
        todo = [*self.deferred, *superseded]
        if not todo:
            return
        pinned = pinned_keys(getattr(self.backend, "medium", None), clean=True)
        self.deferred = [k for k in todo if k in pinned]
        for key in todo:
            if key not in pinned:
                with contextlib.suppress(OSError):  # a leftover generation is harmless: the next writer removes it
                    self.backend.delete(key)

    def _list_new_tasks(self, catalog: Catalog, doc: StoreDoc) -> None:
        """List tasks created since the last commit in the root document: the commit point of a new task.

        Their manifests landed first, so a crash before this leaves unlisted task nodes, which
        the next writer removes: a new task is rolled back whole, never half there.
        """
        new = [t for t in catalog if not t.listed]
        if not new:
            return
        err: BaseException | None = None
        try:
            if self.group.is_leader:
                self.backend.write_json(DOC, dataclasses.replace(doc, tasks=catalog.keys()).to_doc())
        except BaseException as e:
            err = e
        err = self.group.agree(err, "list the new tasks in the root document")
        if err is not None:
            raise storage_error(err, f"listing the new task(s) {listing(t.name for t in new)} in the root document",
                                self.backend, None, new) from err
        for t in new:
            t.listed = True


def mark_committed(backend: ArrayBackend, t: TaskState, names: Sequence[str]) -> None:
    """Drop the pending mark of the committed generations of ``names`` (a hint for plain Zarr readers).

    Best effort and not synced: the manifest is the truth, and a mark left by a crash
    errs on the safe side (live data looks pending, never the other way round).
    """
    for name in names:
        p = t.params[name]
        if p.gen is not None:
            with contextlib.suppress(OSError, FisherStoreError):
                backend.set_attributes(p.gen_key(p.gen), array_attributes(p.name, p.layout))

def storage_error(err: BaseException, what: str, backend: ArrayBackend, needed: int | None,
                  tasks: Sequence[TaskState]) -> BaseException:
    """Turn an OS error from the disk into one that says what was needed and what is kept."""
    if not isinstance(err, OSError) or isinstance(err, FisherStoreError):
        return err
    where = f" writing {err.filename!r}" if err.filename else ""
    free_bytes = backend.free_bytes()
    free = f"{human_bytes(free_bytes)} is free there. " if free_bytes is not None else ""
    need = f"It needed {human_bytes(needed)} ({needed} bytes) for new generations; " if needed else ""
    at = ", ".join(f"task {t.name!r} at step {t.committed_step}" if t.listed else f"new task {t.name!r} (not yet "
                   "committed)" for t in tasks)
    return StorageError(
        err.errno,
        f"{what} of {backend.location!r} failed{where}: {err.strerror or err}. {need}{free}The store stays at its "
        f"last commit ({at}) and the steps since are kept in RAM: free space (or fix the device) and call "
        "flush() again.",
    )
