"""Trust: no silently wrong values, no lost commits, no harm from a crafted store (issue 9).

Every test here runs on real zarr-python / TensorStore stores on a real filesystem.
Where a disk failure is needed at an exact moment, a real backend subclass fails that one
call (the store's handling of it is what is tested, not the backend).
"""

from __future__ import annotations

import errno
import gc
import glob
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import zarr

import fisherstore
from fisherstore import (
    CorruptChunkError,
    CorruptStoreError,
    FlushError,
    InvalidArgumentError,
    InvalidGradientError,
    ParamLayout,
    StepDiscardedWarning,
    StorageError,
    StoreLockedError,
    StoreReplacedError,
)
from fisherstore.backends.tensorstore_backend import TensorStoreBackend
from fisherstore.backends.zarr_backend import ZarrBackend
from fisherstore.store import FisherStore
from fisherstore.verify import verify_store

DISK = ["zarr", "tensorstore"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = ParamLayout.attention("q", 4, 8)  # 32 rows in 4 head blocks of 8
Q8 = ParamLayout.attention("q", 2, 4)  # 8 rows
Q16 = ParamLayout.attention("q", 4, 4)  # 16 rows


def failing(backend: str):
    """A real disk backend whose write_json fails for the keys ``fail(key)`` selects."""
    base = {"zarr": ZarrBackend, "tensorstore": TensorStoreBackend}[backend]

    class Failing(base):
        fail = staticmethod(lambda key: False)

        def write_json(self, key, doc, durable=True):
            if self.fail(key):
                raise OSError(errno.ENOSPC, "No space left on device (injected)", self.url(key))
            super().write_json(key, doc, durable)

    return Failing


def raw(store_path, task="t", name="w"):
    with fisherstore.open(store_path, mode="r") as r:
        return r.fisher(task, name, bias_corrected=False).load()


# -- 4: a reused squared-gradient buffer ---------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 1 << 20], ids=["streamed", "resident"])
def test_a_reused_buffer_is_consumed_before_add_returns(open_store, backend, budget):
    s = open_store(backend, decay=0.5, memory_budget=budget if backend != "ram" or budget else None)
    s.create("t", "w", (16, 8), Q16)
    s.create("t", "v", (16, 8), Q16)
    buf = torch.empty(16, 8)
    ref = {n: torch.zeros(16, 8, dtype=torch.float64) for n in "wv"}
    for i in range(4):
        with s.begin_step("t") as st:
            for j, n in enumerate("wv"):
                buf.fill_(10.0 * i + j + 1)  # one buffer, refilled for every parameter and step
                st.add(n, buf)
                ref[n] = 0.5 * ref[n] + 0.5 * (10.0 * i + j + 1)
            buf.fill_(1e6)  # and scribbled over before the step ends
    for n in "wv":
        assert torch.allclose(s.fisher("t", n, bias_corrected=False).load().double(), ref[n], rtol=1e-6), n


# -- 5: a reader that outlives a replacement -----------------------------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_a_reader_open_across_mode_w_gets_store_replaced_error(tmp_path, backend):
    path = tmp_path / "s"
    with fisherstore.open(path, mode="w", backend=backend, decay=0.5) as w:
        w.create("t", "w", (8, 8), Q8)
        for _ in range(3):
            w.update("t", {"w": torch.full((8, 8), 5.0)})
    r = fisherstore.open(path, mode="r", backend=backend)
    F = r.fisher("t", "w")
    assert torch.allclose(F.load(), torch.full((8, 8), 5.0))
    with fisherstore.open(path, mode="w", backend=backend, decay=0.5) as w:  # same names, generation 1 again
        w.create("t", "w", (8, 8), Q8)
        w.update("t", {"w": torch.full((8, 8), 7.0)})
    with pytest.raises(StoreReplacedError, match="replaced.*Reopen"):
        F.load()
    with pytest.raises(StoreReplacedError):
        F.head(1, "Q")
    r.close()
    with fisherstore.open(path, mode="r", backend=backend) as r2:
        assert torch.allclose(r2.fisher("t", "w").load(), torch.full((8, 8), 7.0))


# -- 6 and 24: documents that would read back wrong -----------------------------------------------
def _flushed_store(path, backend):
    with fisherstore.open(path, mode="w", backend=backend) as w:
        w.create("t", "w", (8, 8), Q8)
        w.update("t", {"w": torch.ones(8, 8)})


def _edit_manifest(path, fn):
    doc_path = os.path.join(path, "t", "zarr.json")
    doc = json.load(open(doc_path))
    fn(doc["attributes"]["fisherstore_task"])
    json.dump(doc, open(doc_path, "w"))


BAD_MANIFESTS = {
    "negative step": lambda b: b.update(step=-1),
    "step as a string": lambda b: b.update(step="1"),
    "missing step": lambda b: b.pop("step"),
    "t_last after the step": lambda b: b["params"]["w"].update(t_last=5),
    "decay above 1": lambda b: b["params"]["w"].update(decay=1.5),
    "decay of 0": lambda b: b["params"]["w"].update(decay=0.0),
    "missing key": lambda b: b["params"]["w"].pop("key"),
    "key outside the task": lambda b: b["params"]["w"].update(key="../elsewhere"),
    "shape as a string": lambda b: b["params"]["w"].update(shape="8,8"),
    "params as a list": lambda b: b.update(params=[]),
    "generation 0": lambda b: b["params"]["w"].update(generation=0),
}


@pytest.mark.parametrize("backend", DISK)
@pytest.mark.parametrize("what", sorted(BAD_MANIFESTS))
def test_a_damaged_manifest_is_a_named_error_in_readers_and_verify(tmp_path, backend, what):
    path = str(tmp_path / "s")
    _flushed_store(path, backend)
    _edit_manifest(path, BAD_MANIFESTS[what])
    with pytest.raises(CorruptStoreError, match=r"manifest of task 't'.*verify"):
        fisherstore.open(path, mode="r", backend=backend)
    rep = verify_store(path, backend=backend)
    assert not rep.ok and rep.problems[0].kind == "unreadable_store" and "manifest of task 't'" in rep.problems[0].message


@pytest.mark.parametrize("backend", DISK)
def test_a_generation_that_differs_from_its_manifest_is_refused(tmp_path, backend):
    path = str(tmp_path / "s")
    _flushed_store(path, backend)
    gen = os.path.join(path, "t", "w", "g00000001")
    _edit_manifest(path, lambda b: b["params"]["w"].update(shape=[8, 4], chunks=[8, 4], layout=None))
    with fisherstore.open(path, mode="r", backend=backend) as r:  # the shape differs from the array's
        with pytest.raises(CorruptStoreError, match=r"shape \(8, 8\).*manifest says float32 \(8, 4\)"):
            r.fisher("t", "w").load()
    assert {p.kind for p in verify_store(path, backend=backend).problems} == {"inconsistent_generation"}
    _flushed_store(path, backend)
    zarr.create_array(gen, shape=(8, 8), chunks=(8, 8), dtype="float64", overwrite=True)[...] = 1.0
    with fisherstore.open(path, mode="r", backend=backend) as r:  # a float64 generation
        with pytest.raises(CorruptStoreError, match="float64 array"):
            r.fisher("t", "w").load()
    assert {p.kind for p in verify_store(path, backend=backend).problems} == {"inconsistent_generation"}


@pytest.mark.parametrize("backend", DISK)
def test_unknown_keys_in_layout_and_codecs_are_ignored(tmp_path, backend):
    path = str(tmp_path / "s")
    _flushed_store(path, backend)
    _edit_manifest(path, lambda b: b["params"]["w"]["layout"].update(rope_theta=10000.0))
    root = os.path.join(path, "zarr.json")
    doc = json.load(open(root))
    doc["attributes"]["fisherstore"]["codecs"]["future_codec"] = "x"
    json.dump(doc, open(root, "w"))
    with fisherstore.open(path, mode="r", backend=backend) as r:
        assert r.layout("t", "w") == Q8 and torch.allclose(r.fisher("t", "w").head(0, "Q"), torch.ones(4, 8))
    assert verify_store(path, backend=backend).ok


# -- 7: plain Zarr readers and info during a write -------------------------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_pending_generations_are_marked_and_info_counts_committed_state(tmp_path, backend):
    path = str(tmp_path / "s")
    s = fisherstore.open(path, mode="w", backend=backend, memory_budget=0)  # every step streams
    s.create("t", "w", (32, 8), Q)
    s.update("t", {"w": torch.ones(32, 8)})
    s.flush()
    from fisherstore.cli import store_info

    committed = store_info(path, backend)
    s.update("t", {"w": torch.ones(32, 8)})  # a streamed step: a new generation, not committed
    gens = {n: dict(a.attrs["fisherstore_param"]) for n, a in zarr.open_group(os.path.join(path, "t", "w"),
                                                                              mode="r").arrays()}
    assert gens["g00000001"].get("pending") is None and gens["g00000002"]["pending"] is True
    live = zarr.open_group(os.path.join(path, "t"), mode="r").attrs["fisherstore_task"]["params"]["w"]["generation"]
    assert live == 1  # the manifest names the live generation, as docs/format.md says
    during = store_info(path, backend)
    assert during["bytes_on_disk"] == committed["bytes_on_disk"]
    assert during["tasks"]["t"]["params"]["w"]["chunk_bytes_on_disk"] == \
        committed["tasks"]["t"]["params"]["w"]["chunk_bytes_on_disk"]
    assert during["other_bytes_on_disk"] > committed["other_bytes_on_disk"]
    s.close()
    attrs = zarr.open_array(os.path.join(path, "t", "w", "g00000002"), mode="r").attrs["fisherstore_param"]
    assert "pending" not in attrs


# -- 8: two writers creating one new path --------------------------------------------------------
def _late_writer(path, winner_opened, conn):
    """A writer that finds no store, then reaches for the lock only after the winner took it."""
    from fisherstore.engine import lock as lock_mod

    real = lock_mod.StoreLock.acquire

    def acquire_after_the_winner(self):
        conn.send("at the lock")
        winner_opened.wait(30)  # the timing of a real race, made certain
        return real(self)

    lock_mod.StoreLock.acquire = acquire_after_the_winner
    try:
        fisherstore.open(path, mode="a")
        conn.send("opened")
    except StoreLockedError:
        conn.send("lost")


def test_the_writer_that_loses_the_lock_deletes_nothing(tmp_path):
    ctx = mp.get_context("forkserver")
    path = str(tmp_path / "s")
    winner_opened = ctx.Event()
    a, c = ctx.Pipe()
    loser = ctx.Process(target=_late_writer, args=(path, winner_opened, c))
    loser.start()
    assert a.recv() == "at the lock"  # the loser found no store, and waits at the lock
    with fisherstore.open(path, mode="a") as s:
        s.create("t", "w", (4, 4))
        s.update("t", {"w": torch.ones(4, 4)})
        s.flush()
        winner_opened.set()
        assert a.recv() == "lost"
        loser.join(30)
        assert os.path.exists(os.path.join(path, "zarr.json")) and os.path.exists(os.path.join(path, "t"))
    assert torch.equal(raw(path), torch.full((4, 4), 0.01))


# -- 9: reader threads on the writer's own store object ---------------------------------------------
@pytest.mark.parametrize("backend", DISK)
@pytest.mark.parametrize("budget", [0, 1 << 20], ids=["streamed", "resident"])
def test_reader_threads_on_a_writable_store_see_whole_steps_and_change_nothing(tmp_path, backend, budget):
    beta, steps = 0.5, 24
    states = [torch.zeros(16, 8)]
    for i in range(1, steps + 1):
        states.append(beta * states[-1] + (1 - beta) * float(i))
    s = fisherstore.open(tmp_path / "s", mode="w", backend=backend, decay=beta, memory_budget=budget, flush_every=5)
    s.create("t", "w", (16, 8), Q16)
    errors: list[BaseException] = []
    seen = set()
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                got = s.fisher("t", "w", bias_corrected=False).load()
                match = [k for k, st in enumerate(states) if torch.allclose(got, st, rtol=1e-6, atol=0)]
                assert match, f"a read is no step's state: {got[0, 0].item()}"
                seen.add(match[0])
                s.metadata("t")
        except BaseException as e:  # report to the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    for i in range(1, steps + 1):
        s.update("t", {"w": torch.full((16, 8), float(i))})
    stop.set()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(seen) > 2
    s.close()
    assert torch.allclose(raw(tmp_path / "s"), states[-1], rtol=1e-6, atol=0)


# -- 10: one bad set_metadata value ------------------------------------------------------------------
def test_set_metadata_validates_at_the_call_and_keeps_nothing_bad(open_store, disk_backend):
    s = open_store(disk_backend)
    s.create("t", "w", (4, 4))
    s.set_metadata("t", lr=np.float32(0.5), steps=np.int64(3), dims=(1, 2))
    for bad in ({"dtype": torch.float32}, {"loss": float("nan")}, {"x": object()}, {"d": {1: 2}}):
        with pytest.raises(InvalidArgumentError, match="metadata|JSON"):
            s.set_metadata("t", **bad)
    with pytest.raises(InvalidArgumentError):
        s.set_metadata("t", model={"layers": np.float64("inf")})
    s.update("t", {"w": torch.ones(4, 4)})
    s.flush()  # every later flush still works
    s.close()
    with fisherstore.open(s.path, mode="r", backend=disk_backend) as r:
        assert r.metadata("t")["user"] == {"lr": 0.5, "steps": 3, "dims": [1, 2]}


# -- 11: a new task during a transient disk-full ---------------------------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_a_new_task_is_committed_whole_or_rolled_back_whole(tmp_path, backend):
    path = str(tmp_path / "s")
    be = failing(backend)(path, read_only=False)
    s = FisherStore(be, mode="w", decay=0.5)
    s.create("a", "w", (4, 4))
    s.update("a", {"w": torch.ones(4, 4)})
    s.flush()
    s.create("b", "w", (4, 4))
    s.update("b", {"w": torch.full((4, 4), 3.0)})
    be.fail = staticmethod(lambda key: key == "zarr.json")  # the root document cannot be written
    with pytest.raises(StorageError, match=r"new task\(s\) 'b'.*new task 'b' \(not yet committed\).*flush\(\) again"):
        s.flush()
    with fisherstore.open(path, mode="r", backend=backend) as r:
        assert r.tasks() == ["a"]  # b's manifest landed, but no commit lists b yet
    crashed = str(tmp_path / "crashed")  # what a crash now would leave: the next writer rolls b back whole
    shutil.copytree(path, crashed, ignore=shutil.ignore_patterns(".fisherstore.lock"))
    with pytest.warns(fisherstore.RecoveryWarning, match="'b'"):
        fisherstore.open(crashed, mode="r+", backend=backend).close()
    assert not os.path.exists(os.path.join(crashed, "b")) and verify_store(crashed, backend=backend).ok
    be.fail = staticmethod(lambda key: False)
    s.update("b", {"w": torch.full((4, 4), 5.0)})  # RAM kept b; the retry commits it whole
    s.close()
    with fisherstore.open(path, mode="r", backend=backend) as r:
        assert r.tasks() == ["a", "b"] and r.step("b") == 2
        assert torch.allclose(r.fisher("b", "w", bias_corrected=False).load(), torch.full((4, 4), 0.5 * 1.5 + 2.5))


# -- 12: close() with a step still open -------------------------------------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_close_with_an_open_step_flushes_the_rest_and_says_so(tmp_path, backend):
    s = fisherstore.open(tmp_path / "s", mode="w", backend=backend, decay=0.5)
    s.create("t", "w", (4, 4))
    s.update("t", {"w": torch.ones(4, 4)})
    s.update("t", {"w": torch.ones(4, 4)})
    st = s.begin_step("t")
    st.add("w", torch.full((4, 4), 9.0))
    with pytest.warns(StepDiscardedWarning, match="step 3 of task 't' was still open"):
        s.close()
    with pytest.raises(fisherstore.StepError, match="aborted"):
        st.add("w", torch.ones(4, 4))
    with fisherstore.open(tmp_path / "s", mode="r", backend=backend) as r:
        assert r.step("t") == 2 and torch.allclose(r.fisher("t", "w").load(), torch.ones(4, 4))


# -- 13: update() after an automatic flush failed --------------------------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_a_failed_auto_flush_keeps_the_step_and_says_so(tmp_path, backend):
    path = str(tmp_path / "s")
    be = failing(backend)(path, read_only=False)
    s = FisherStore(be, mode="w", decay=0.5, flush_every=2)
    s.create("t", "w", (4, 4))
    s.update("t", {"w": torch.ones(4, 4)})
    be.fail = staticmethod(lambda key: key == "t/zarr.json")
    with pytest.raises(FlushError, match=r"step 2 of task 't' was applied and is kept.*Do not repeat") as ei:
        s.update("t", {"w": torch.ones(4, 4)})
    assert isinstance(ei.value, StorageError) and ei.value.errno == errno.ENOSPC
    assert s.step("t") == 2  # kept: a retry of the update would count it twice
    with pytest.raises(fisherstore.NonFiniteGradientError) as rejected:  # a rejected step is not a FlushError
        s.update("t", {"w": torch.full((4, 4), float("nan"))})
    assert not isinstance(rejected.value, FlushError) and s.step("t") == 2
    be.fail = staticmethod(lambda key: False)
    s.flush()
    s.close()
    with fisherstore.open(path, mode="r", backend=backend) as r:
        assert r.step("t") == 2


# -- 15: directories a user keeps inside a store ---------------------------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_recovery_deletes_only_what_fisherstore_provably_wrote(tmp_path, backend):
    path = str(tmp_path / "s")
    _flushed_store(path, backend)
    mine = {os.path.join(path, "notes"): "notes.txt", os.path.join(path, "t", "plots"): "fig.png",
            os.path.join(path, "t", "w", "old"): "x.npy"}
    for d, f in mine.items():
        os.makedirs(d)
        open(os.path.join(d, f), "w").write("keep me")
    half = os.path.join(path, "t", "w2")  # an interrupted first document of ours: only its temp file
    os.makedirs(half)
    open(os.path.join(half, ".zarr.json.0123abcd.partial"), "w").write("{")
    with pytest.warns(fisherstore.RecoveryWarning, match="t/w2"):
        fisherstore.open(path, mode="a", backend=backend).close()
    assert all(os.path.exists(os.path.join(d, f)) for d, f in mine.items())
    assert not os.path.exists(half)
    assert verify_store(path, backend=backend).ok


# -- 16: a flush is atomic per task ----------------------------------------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_a_flush_commits_each_task_whole(tmp_path, backend):
    path = str(tmp_path / "s")
    be = failing(backend)(path, read_only=False)
    s = FisherStore(be, mode="w", decay=0.5)
    for task in "ab":
        s.create(task, "w", (4, 4))
        s.update(task, {"w": torch.ones(4, 4)})
    s.flush()
    for task in "ab":
        s.update(task, {"w": torch.full((4, 4), 3.0)})
    be.fail = staticmethod(lambda key: key == "b/zarr.json")
    with pytest.raises(StorageError, match="commit of task 'b'"):
        s.flush()
    with fisherstore.open(path, mode="r", backend=backend) as r:  # a at its new commit, b at its old one
        assert (r.step("a"), r.step("b")) == (2, 1)
        assert torch.allclose(r.fisher("a", "w", bias_corrected=False).load(), torch.full((4, 4), 1.75))
        assert torch.allclose(r.fisher("b", "w", bias_corrected=False).load(), torch.full((4, 4), 0.5))
    be.fail = staticmethod(lambda key: False)
    s.close()
    with fisherstore.open(path, mode="r", backend=backend) as r:
        assert (r.step("a"), r.step("b")) == (2, 2)


# -- 19, 20, 21: a crafted store must not harm its reader --------------------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, backend):
    path = str(tmp_path / "s")
    _flushed_store(path, backend)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = os.path.join(path, ".fisherstore.lock")
    os.unlink(lock)
    os.symlink(victim, lock)
    with pytest.raises(CorruptStoreError, match="symbolic link"):
        fisherstore.open(path, mode="a", backend=backend)
    assert victim.read_text() == "precious"
    with fisherstore.open(path, mode="r", backend=backend) as r:  # readers never touch the lock
        assert r.tasks() == ["t"]


@pytest.mark.parametrize("backend", DISK)
def test_recovery_never_leaves_the_store_or_follows_links(tmp_path, backend):
    other = str(tmp_path / "other")
    _flushed_store(other, backend)
    before = raw(other)
    path = str(tmp_path / "s")
    _flushed_store(path, backend)
    # a leftover generation that links into the other store, and a linked parameter directory
    os.symlink(os.path.join(other, "t", "w", "g00000001"), os.path.join(path, "t", "w", "g00000009"))
    os.symlink(os.path.join(other, "t", "w"), os.path.join(path, "t", "x"))
    fisherstore.open(path, mode="a", backend=backend).close()
    assert torch.equal(raw(other), before) and verify_store(other, backend=backend).ok
    # a manifest key that climbs out of the store is refused before anything is touched
    _edit_manifest(path, lambda b: b["params"]["w"].update(key="../other/t/w"))
    with pytest.raises(CorruptStoreError, match="key"):
        fisherstore.open(path, mode="a", backend=backend)
    assert torch.equal(raw(other), before)
    # a task directory that is a link: a writer refuses to write or delete through it
    path2 = str(tmp_path / "s2")
    _flushed_store(path2, backend)
    os.rename(os.path.join(path2, "t"), str(tmp_path / "moved"))
    os.symlink(os.path.join(other, "t"), os.path.join(path2, "t"))
    with pytest.raises(CorruptStoreError, match="symbolic link"):
        with fisherstore.open(path2, mode="a", backend=backend) as s:
            s.update("t", {"w": torch.full((8, 8), 9.0)})
    assert torch.equal(raw(other), before)


@pytest.mark.parametrize("backend", DISK)
def test_a_chunk_file_that_is_a_link_or_a_fifo_is_refused_not_followed(tmp_path, backend):
    # A reader must not read outside the store through a crafted link (here to a copy of a
    # valid chunk, which would read back as plausible values) nor hang on a FIFO.
    path = str(tmp_path / "s")
    _flushed_store(path, backend)
    chunk = next(p for p in sorted(glob.glob(os.path.join(path, "t", "w", "g*", "c", "**"), recursive=True))
                 if os.path.isfile(p))
    outside = str(tmp_path / "outside")
    shutil.copyfile(chunk, outside)
    os.unlink(chunk)
    os.symlink(outside, chunk)
    with fisherstore.open(path, mode="r", backend=backend) as r:
        with pytest.raises(CorruptStoreError, match="symbolic link"):
            r.fisher("t", "w").load()
    os.unlink(chunk)
    os.mkfifo(chunk)
    t0 = time.monotonic()
    with fisherstore.open(path, mode="r", backend=backend) as r:
        with pytest.raises(CorruptStoreError, match="not a regular file"):
            r.fisher("t", "w").load()
    assert time.monotonic() - t0 < 5
    # a generation directory that is a link to another store's copy of it
    os.unlink(chunk)
    shutil.copyfile(outside, chunk)
    gen = chunk[:chunk.index(os.sep + "c" + os.sep)]
    shutil.move(gen, str(tmp_path / "gen-elsewhere"))
    os.symlink(str(tmp_path / "gen-elsewhere"), gen)
    with fisherstore.open(path, mode="r", backend=backend) as r:
        with pytest.raises(CorruptStoreError, match="symbolic link"):
            r.fisher("t", "w").load()


@pytest.mark.parametrize("backend", DISK)
def test_documents_that_are_fifos_or_huge_are_errors_not_hangs(tmp_path, backend):
    path = str(tmp_path / "s")
    _flushed_store(path, backend)
    manifest = os.path.join(path, "t", "zarr.json")
    os.unlink(manifest)
    os.mkfifo(manifest)  # opening a FIFO for reading would block forever
    t0 = time.monotonic()
    with pytest.raises(CorruptStoreError, match="not a regular file"):
        fisherstore.open(path, mode="r", backend=backend)
    assert time.monotonic() - t0 < 5
    assert not verify_store(path, backend=backend).ok
    os.unlink(manifest)
    with open(manifest, "wb") as f:  # 300 MB, sparse: costs no disk, and must not be read
        f.truncate(300 << 20)
    with pytest.raises(CorruptStoreError, match="more than the"):
        fisherstore.open(path, mode="r", backend=backend)


@pytest.mark.parametrize("backend", DISK)
def test_a_decompression_bomb_chunk_is_refused_before_it_is_decoded(tmp_path, backend):
    import crc32c
    from numcodecs import Blosc

    path = str(tmp_path / "s")
    with fisherstore.open(path, mode="w", backend=backend, compression="blosc-lz4") as w:
        w.create("t", "w", (32, 8), Q)
        w.update("t", {"w": torch.ones(32, 8)})
    chunk = os.path.join(path, "t", "w", "g00000001", "c", "1", "0")
    blosc = Blosc(cname="lz4", shuffle=Blosc.BITSHUFFLE)
    for payload, why in ((blosc.encode(np.zeros(64 << 20, dtype=np.uint8)), "larger than a chunk of 256 bytes"),
                         (blosc.encode(np.zeros(4096, dtype=np.uint8)), "declares 4096 bytes, not the chunk's 256")):
        with open(chunk, "wb") as f:  # a valid checksum: only the size gives the bomb away
            f.write(payload + crc32c.crc32c(payload).to_bytes(4, "little"))
        with fisherstore.open(path, mode="r", backend=backend) as r:
            F = r.fisher("t", "w")
            with pytest.raises(CorruptChunkError, match=rf"chunk \(1, 0\).*{why}"):
                F.head(1, "Q")
            assert torch.equal(F.head(0, "Q"), torch.ones(8, 8))
        assert [p.chunk for p in verify_store(path, backend=backend).problems] == [(1, 0)]


@pytest.mark.parametrize("backend", DISK)
def test_verify_of_an_absurd_shape_finishes_at_once(tmp_path, backend):
    path = str(tmp_path / "s")
    _flushed_store(path, backend)
    _edit_manifest(path, lambda b: b["params"]["w"].update(shape=[1 << 40, 8], chunks=[8, 8], layout=None))
    t0 = time.monotonic()
    rep = verify_store(path, backend=backend)
    assert time.monotonic() - t0 < 10
    assert [p.kind for p in rep.problems] == ["inconsistent_generation"]


# -- 22: the documented limit of per-chunk checksums ----------------------------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_a_valid_chunk_copied_from_another_parameter_is_a_documented_limit(tmp_path, backend):
    path = str(tmp_path / "s")
    with fisherstore.open(path, mode="w", backend=backend) as w:
        for n in "ab":
            w.create("t", n, (16, 8), ParamLayout.attention("q", 2, 8))
        w.update("t", {"a": torch.ones(16, 8), "b": torch.full((16, 8), 2.0)})
    src = os.path.join(path, "t", "a", "g00000001", "c", "0", "0")
    dst = os.path.join(path, "t", "b", "g00000001", "c", "0", "0")
    open(dst, "wb").write(open(src, "rb").read())
    # The chunk is internally consistent, so crc32c cannot tell (docs/reliability.md says so).
    assert verify_store(path, backend=backend).ok
    assert torch.equal(raw(path, name="b")[:8], torch.full((8, 8), 0.01))


# -- 23: disk errors are StorageErrors, and the lock goes whatever happens ---------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_enospc_while_writing_a_manifest_is_a_storage_error(tmp_path, backend):
    path = str(tmp_path / "s")
    be = failing(backend)(path, read_only=False)
    s = FisherStore(be, mode="w")
    s.create("t", "w", (4, 4))
    s.update("t", {"w": torch.ones(4, 4)})
    s.flush()
    s.update("t", {"w": torch.ones(4, 4)})
    be.fail = staticmethod(lambda key: key == "t/zarr.json")
    with pytest.raises(StorageError, match=r"commit of task 't'.*No space.*task 't' at step 1.*flush\(\) again"):
        s.flush()
    be.fail = staticmethod(lambda key: False)
    s.close()


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here without root ({r.stderr.strip()}); the injected-ENOSPC tests above "
                    "cover the same paths")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("backend", DISK)
def test_a_streamed_step_on_a_full_disk_is_a_storage_error(small_fs, backend):
    path = os.path.join(small_fs, "s")
    s = fisherstore.open(path, mode="w", backend=backend, memory_budget=0)
    for n in "ab":
        s.create("t", n, (512, 512))  # 1 MiB each
    s.update("t", {n: torch.ones(512, 512) for n in "ab"})
    s.flush()
    with open(os.path.join(small_fs, "filler"), "wb") as f:
        f.write(b"\0" * (int(1.5 * (1 << 20))))
    with pytest.raises(StorageError, match=r"step 2 of task 't' failed.*discarded whole"):
        s.update("t", {n: torch.ones(512, 512) for n in "ab"})
    assert s.step("t") == 1
    os.unlink(os.path.join(small_fs, "filler"))
    s.close()
    assert verify_store(path, backend=backend).ok


def _lock_is_free(path) -> bool:
    import fcntl

    fd = os.open(os.path.join(path, ".fisherstore.lock"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", DISK)
def test_closing_on_a_read_only_filesystem_is_a_storage_error_and_frees_the_lock(small_fs, backend):
    path = os.path.join(small_fs, "s")
    s = fisherstore.open(path, mode="w", backend=backend)
    s.create("t", "w", (8, 8))
    s.update("t", {"w": torch.ones(8, 8)})
    s.flush()
    s.update("t", {"w": torch.ones(8, 8)})
    subprocess.run(["mount", "-o", "remount,ro", small_fs], check=True)
    try:
        with pytest.raises(StorageError, match="Read-only file system"):
            s.close()
        assert s.closed and _lock_is_free(path)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", small_fs], check=True)
    with fisherstore.open(path, mode="r", backend=backend) as r:
        assert r.step("t") == 1


# -- 25: API edges -----------------------------------------------------------------------------------
def test_odd_tensors_are_read_right_or_refused_by_name(open_store, disk_backend):
    s = open_store(disk_backend, decay=0.5)
    s.create("t", "w", (3, 2))
    dense = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    s.update("t", {"w": dense.to_sparse()})
    s.update("t", {"w": dense.numpy().astype(">f8")})  # big-endian
    s.update("t", {"w": dense.numpy().astype(np.longdouble)})
    assert torch.allclose(s.fisher("t", "w").load(), dense)
    with pytest.raises(InvalidGradientError, match="meta tensor"):
        s.update("t", {"w": torch.empty(3, 2, device="meta")})
    assert s.step("t") == 3


@pytest.mark.parametrize("shape", [(4.0, 2), ("4", 2), (True, 2), (4.7, 2)])
def test_shapes_must_be_ints(open_store, disk_backend, shape):
    s = open_store(disk_backend)
    with pytest.raises(InvalidArgumentError, match="sequence of ints"):
        s.create("t", "w", shape)
    assert s.tasks() == []  # no half-created task


@pytest.mark.parametrize("name", ["zarr.json", ".fisherstore.lock", ".", "..", "g00000001"])
def test_reserved_names_are_escaped(tmp_path, disk_backend, name):
    path = str(tmp_path / "s")
    with fisherstore.open(path, mode="w", backend=disk_backend) as s:
        s.create(name, name, (2, 2))
        s.update(name, {name: torch.ones(2, 2)})
    with fisherstore.open(path, mode="r", backend=disk_backend) as r:
        assert r.tasks() == [name] and r.params(name) == [name]
        assert torch.equal(r.fisher(name, name).load(), torch.ones(2, 2))
    assert verify_store(path, backend=disk_backend).ok


def test_lone_surrogates_in_names_are_refused(open_store, disk_backend):
    s = open_store(disk_backend)
    for task, name in (("t\udc80", "w"), ("t", "w\ud800")):
        with pytest.raises(InvalidArgumentError, match="lone surrogate"):
            s.create(task, name, (2,))
    assert s.tasks() == []


def test_permission_errors_in_cli_verify_exit_1_without_a_traceback(tmp_path):
    path = str(tmp_path / "s")
    _flushed_store(path, "zarr")
    cmd = [sys.executable, "-m", "fisherstore.cli", "verify", path]
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be enforced")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]
    os.chmod(os.path.join(path, "t"), 0o000)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    finally:
        os.chmod(os.path.join(path, "t"), 0o755)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Permission denied" in (r.stdout + r.stderr)


# -- 26: notebooks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_a_store_dropped_without_close_releases_its_lock(tmp_path, backend):
    path = str(tmp_path / "s")
    s = fisherstore.open(path, mode="w", backend=backend)
    s.create("t", "w", (2, 2))
    with pytest.raises(StoreLockedError, match=f"held by this process \\(pid {os.getpid()}\\).*close"):
        fisherstore.open(path, mode="a", backend=backend)
    with pytest.warns(ResourceWarning, match="never closed.*lock is released"):
        del s
        gc.collect()
    fisherstore.open(path, mode="a", backend=backend).close()  # the cell runs again


# -- 27: scale ----------------------------------------------------------------------------------------
class CountingZarr(ZarrBackend):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.writes = {"durable": 0, "lazy": 0}

    def write_json(self, key, doc, durable=True):
        self.writes["durable" if durable else "lazy"] += 1
        super().write_json(key, doc, durable)


def test_creating_many_parameters_writes_no_document_until_the_flush(tmp_path):
    be = CountingZarr(str(tmp_path / "s"), read_only=False)
    s = FisherStore(be, mode="w")
    start = dict(be.writes)
    t0 = time.monotonic()
    for i in range(10_000):
        s.create("t", f"layers.{i}.w", (4,))
    created = time.monotonic() - t0
    assert be.writes == start  # creation is not a commit: RAM only
    s.flush()
    assert be.writes["lazy"] - start["lazy"] == 10_000  # the nodes, synced once by the flush
    assert be.writes["durable"] - start["durable"] == 2  # one manifest, one root document
    s.close()
    assert created < 30, f"10,000 creations took {created:.1f} s"
    with fisherstore.open(tmp_path / "s", mode="r") as r:
        assert len(r.params("t")) == 10_000


# -- siblings found on the way ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", DISK)
def test_parameters_keep_their_creation_order_across_a_reopen(tmp_path, backend):
    # Round-robin rank ownership and the order of a step's updates follow creation order: a
    # reopened store that listed parameters sorted would hand them to other ranks and, since
    # a step admits parameters to the resident set as it first feeds them, to other budgets.
    names = ["z.w", "a.w", "m.w"]
    grads = {n: torch.ones(128, 384) for n in names}
    with fisherstore.open(tmp_path / "s", mode="w", backend=backend, memory_budget=1 << 20) as s:
        for n in names:
            s.create("t", n, (128, 384))  # 192 KiB each, copied (not donated): two fit 1 MiB, the third streams
        s.update("t", grads)
        resident = [s.param("t", n).resident for n in names]
    with fisherstore.open(tmp_path / "s", mode="a", backend=backend, memory_budget=1 << 20) as s:
        assert s.params("t") == names
        s.update("t", {n: grads[n] for n in s.params("t")})
        assert [s.param("t", n).resident for n in names] == resident == [True, True, False]


def test_a_zero_size_parameter_verifies_clean(tmp_path, disk_backend):
    # It has no chunks at all; verify once expected one and cried "missing".
    path = str(tmp_path / "s")
    with fisherstore.open(path, mode="w", backend=disk_backend) as s:
        s.create("t", "empty", (0, 4))
        s.update("t", {"empty": torch.ones(0, 4)})
    assert verify_store(path, backend=disk_backend).ok
