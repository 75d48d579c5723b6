"""Reliability: kill -9 at random moments, one writer and many readers, corruption, disk full.

Every test here uses real zarr-python / TensorStore stores on a real filesystem. The
crash tests fork writers from a forkserver (tests/crashwriter.py) and SIGKILL them.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import fisherstore
from fisherstore import CorruptChunkError, StorageError, StoreLockedError
from fisherstore.cli import main as cli_main
from fisherstore.verify import verify_store
from tests import crashwriter as cw

DISK_BACKENDS = ["zarr", "tensorstore"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLLED_BACK_KINDS = {"uncommitted_generation", "superseded_generation", "uncommitted_param", "uncommitted_task",
                     "temp_file"}


@pytest.fixture(scope="module")
def ctx():
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(
        ["tests.crashwriter", "fisherstore.backends.zarr_backend", "fisherstore.backends.tensorstore_backend"]
    )
    return c


class Writer:
    """A crashwriter process and the messages it sent."""

    def __init__(self, ctx, path: str, backend: str, scenario: str = "steps") -> None:
        self.conn, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=cw.run_writer, args=(path, backend, child, scenario), daemon=True)
        self.proc.start()
        child.close()
        self.msgs: list[tuple[str, int]] = []

    def wait_for(self, kind: str, timeout: float = 60.0) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.conn.poll(left):
                raise AssertionError(f"the writer sent no {kind!r} within {timeout} s (got {self.msgs[-3:]})")
            m = self.conn.recv()
            self.msgs.append(m)
            if m[0] == kind:
                return m

    def kill(self) -> str:
        """SIGKILL; return the last thing the writer said it was doing."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)
        with contextlib.suppress(EOFError, OSError):
            while self.conn.poll(0):
                self.msgs.append(self.conn.recv())
        self.conn.close()
        return self.msgs[-1][0] if self.msgs else "starting"


def check_store(path: str, backend: str, ref: cw.Reference) -> tuple[int, list]:
    """(a)-(e): opens, every tensor is some flush's state bit for bit, step matches, verify is clean."""
    rep = verify_store(path, backend=backend)
    assert rep.ok, [f.message for f in rep.problems]
    assert {f.kind for f in rep.rolled_back} <= ROLLED_BACK_KINDS, rep.rolled_back
    with fisherstore.open(path, mode="r", backend=backend) as r:
        if cw.TASK not in r.tasks():  # killed before the first flush committed the new task
            assert step_zero_ok(r), r.tasks()
            return 0, rep.rolled_back
        step = r.step(cw.TASK)
        want = ref.at(step)
        assert want is not None, f"the store says step {step}, which no flush committed"
        assert r.metadata(cw.TASK)["tokens_seen"] == cw.TOKENS * step
        for n in cw.NAMES:
            got = r.fisher(cw.TASK, n, bias_corrected=False).load()
            if not torch.equal(got, want[n]):
                near = [s for s, st in ref.states.items() if torch.equal(got, st[n])]
                raise AssertionError(f"{n} at step {step} is not that flush's state (it matches steps {near})")
    return step, rep.rolled_back


def step_zero_ok(r) -> bool:
    """A store killed before its first commit holds no task at all (creation is not a commit)."""
    return r.tasks() == []


def aim(w: Writer, scenario: str, i: int, rng: random.Random) -> None:
    """Wait for the phase kill ``i`` of ``scenario`` aims at, then a short random delay."""
    if scenario == "recover" and i % 2:  # open and recovery of what the previous kill left
        time.sleep(rng.uniform(0, 0.03))
        return
    w.wait_for("ready")
    phase = {
        "close": ("closing", "closed", None),  # inside close(), inside the reopen after it, anywhere
        "replace": ("closed", "flushing", None),  # inside open(mode="w"), inside a flush, anywhere
    }.get(scenario, ("flushing", "flushed", None))[i % 3]
    if phase is None:
        time.sleep(rng.uniform(0, 0.3))
        return
    w.wait_for(phase)
    time.sleep(rng.uniform(0, 0.02 if phase in ("flushing", "closing", "closed") else 0.1))


def run_kills(ctx, path: str, backend: str, kills: int, seed: int, scenario: str = "steps") -> dict[str, int]:
    rng = random.Random(seed)
    ref = cw.Reference(scenario)
    stats = {"mid_flush": 0, "rolled_back": 0, "max_step": 0, "phases": {}}
    for i in range(kills):
        w = Writer(ctx, path, backend, scenario)
        aim(w, scenario, i, rng)
        last = w.kill()
        stats["phases"][last] = stats["phases"].get(last, 0) + 1
        stats["mid_flush"] += last in ("flushing", "closing")
        step, rolled = check_store(path, backend, ref)
        stats["rolled_back"] += bool(rolled)
        stats["max_step"] = max(stats["max_step"], step)
    # (d) the next writer removes what the killed ones left, and says what it rolled back
    # a superseded generation (a kill between a commit and its clean-up) loses no step: recovery
    # removes it without a RecoveryWarning, so it is not counted as rolled back here
    left = [f.path for f in verify_store(path, backend=backend).rolled_back
            if f.kind not in ("temp_file", "superseded_generation")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cw.open_writer(path, backend, scenario).close()
    recovered = [str(w.message) for w in caught if issubclass(w.category, fisherstore.RecoveryWarning)]
    assert len(recovered) == bool(left), (left, recovered)
    if left:
        assert f"{len(left)} uncommitted node(s)" in recovered[0]
    rep = verify_store(path, backend=backend)
    assert rep.ok and rep.rolled_back == [], rep.rolled_back
    assert not [f for _, _, fs in os.walk(path) for f in fs if f.endswith(".partial")]
    return stats


@pytest.mark.parametrize("backend", DISK_BACKENDS)
def test_kill_9_at_random_moments_leaves_some_completed_flush(ctx, tmp_path, backend):
    kills = 30
    stats = run_kills(ctx, str(tmp_path / "s"), backend, kills, seed=1)
    # the harness really hit flushes, and the store really moved on between kills
    assert stats["mid_flush"] >= 5, stats
    assert stats["rolled_back"] >= 5, stats
    assert stats["max_step"] >= 3 * cw.FLUSH_EVERY, stats


@pytest.mark.parametrize("backend", DISK_BACKENDS)
@pytest.mark.parametrize("scenario", ["stream", "close", "replace", "recover"])
def test_kill_9_during_streamed_steps_close_replace_and_recovery(ctx, tmp_path, backend, scenario):
    """Kills aimed at a streamed step, at close(), at open(mode="w"), and at open + recovery."""
    stats = run_kills(ctx, str(tmp_path / "s"), backend, 12, seed=3, scenario=scenario)
    aimed = {"stream": ("flushing",), "close": ("closing",), "replace": ("closed", "opening"),
             "recover": ("opening", "starting")}[scenario]
    assert sum(stats["phases"].get(a, 0) for a in aimed) >= 2, stats  # the harness hit the phase it aims at
    assert stats["max_step"] >= cw.FLUSH_EVERY, stats


@pytest.mark.slow
@pytest.mark.parametrize("backend", DISK_BACKENDS)
def test_kill_9_soak_300(ctx, tmp_path, backend):
    stats = run_kills(ctx, str(tmp_path / "s"), backend, 300, seed=2)
    assert stats["mid_flush"] >= 50, stats


@pytest.mark.parametrize("backend", DISK_BACKENDS)
def test_reader_during_flushes_sees_each_tensor_whole_at_one_step(ctx, tmp_path, backend):
    path = str(tmp_path / "s")
    ref = cw.Reference()
    w = Writer(ctx, path, backend)
    try:
        w.wait_for("ready")
        steps_seen = set()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            while w.conn.poll(0):
                w.msgs.append(w.conn.recv())
            with fisherstore.open(path, mode="r", backend=backend) as r:
                if cw.TASK not in r.tasks():
                    continue  # the writer has not committed its new task yet
                step = r.step(cw.TASK)
                ref.at(step + 20 * cw.FLUSH_EVERY)
                for n in cw.NAMES:
                    got = r.fisher(cw.TASK, n, bias_corrected=False).load()
                    whole = [s for s, st in ref.states.items() if s >= step and torch.equal(got, st[n])]
                    assert whole, f"{n} read after opening at step {step} is no flush's state"
                    steps_seen.add(whole[0])
        flushed = [m for m in w.msgs if m[0] == "flushed"]
        assert len(flushed) >= 2 and len(steps_seen) >= 2, (flushed, steps_seen)
    finally:
        w.kill()


@pytest.mark.parametrize("backend", DISK_BACKENDS)
def test_iter_heads_and_verify_during_flushes(ctx, tmp_path, backend):
    """A threaded head sweep and `verify`, racing a writer that commits continuously, never fail."""
    path = str(tmp_path / "s")
    ref = cw.Reference()
    w = Writer(ctx, path, backend)
    try:
        w.wait_for("ready")
        sweeps = verifies = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with fisherstore.open(path, mode="r", backend=backend) as r:
                step = r.step(cw.TASK)
                ref.at(step + 20 * cw.FLUSH_EVERY)
                blocks = list(r.iter_heads(cw.TASK, workers=4, bias_corrected=False))
                assert len(blocks) == len(cw.NAMES) * cw.LAYOUT.num_heads
                sweeps += 1
            rep = verify_store(path, backend=backend)
            assert rep.ok, [f.message for f in rep.problems]  # never "lost" data that a commit just moved
            verifies += 1
        assert sweeps >= 3 and verifies >= 3, (sweeps, verifies)
    finally:
        w.kill()
    assert [m for m in w.msgs if m[0] == "flushed"], "the writer never committed while we read"


# -- one writer -------------------------------------------------------------------------
def _try_open_writer(path, conn):
    try:
        fisherstore.open(path, mode="a").close()
        conn.send(("opened", ""))
    except BaseException as e:
        conn.send((type(e).__name__, str(e)))


@pytest.mark.parametrize("backend", DISK_BACKENDS)
def test_second_writer_gets_an_error_naming_the_holder(ctx, tmp_path, backend):
    path = str(tmp_path / "s")
    with fisherstore.open(path, mode="w", backend=backend) as s:
        s.create("t", "w", (4, 4))
        s.flush()  # creation is committed by a flush
        r, c = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_try_open_writer, args=(path, c))
        p.start()
        kind, msg = r.recv()
        p.join()
        assert kind == "StoreLockedError"
        assert f"pid {os.getpid()}" in msg and os.uname().nodename in msg and "mode='r'" in msg
        with fisherstore.open(path, mode="r", backend=backend) as reader:  # readers never lock
            assert reader.params("t") == ["w"]
        with pytest.raises(StoreLockedError):
            fisherstore.open(path, mode="w", backend=backend)  # not even to replace it
    with fisherstore.open(path, mode="r+", backend=backend) as s2:  # released on close
        assert s2.params("t") == ["w"]


def test_a_killed_writer_releases_its_flock(ctx, tmp_path):
    path = str(tmp_path / "s")
    w = Writer(ctx, path, "zarr")
    w.wait_for("ready")
    with pytest.raises(StoreLockedError, match=f"pid {w.proc.pid}"):
        fisherstore.open(path, mode="a")
    w.kill()
    fisherstore.open(path, mode="a").close()


def test_stale_pidfile_lock_needs_force(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHERSTORE_LOCK", "pidfile")
    path = str(tmp_path / "s")
    fisherstore.open(path, mode="w").close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": os.uname().nodename, "since": time.time()}
    with open(os.path.join(path, ".fisherstore.lock"), "w") as f:
        json.dump(record, f)
    with pytest.raises(StoreLockedError, match=rf"stale writer lock from pid {record['pid']}.*force=True"):
        fisherstore.open(path, mode="a")
    assert cli_main(["unlock", path]) == 2  # refuses without --force
    assert cli_main(["unlock", path, "--force"]) == 0
    with fisherstore.open(path, mode="a") as s:  # and force=True works from Python as well
        s.create("t", "w", (2, 2))
    with open(os.path.join(path, ".fisherstore.lock"), "w") as f:
        json.dump(record, f)
    fisherstore.open(path, mode="a", force=True).close()


# -- corruption -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", DISK_BACKENDS)
@pytest.mark.parametrize("compression", [None, "blosc-lz4"])
def test_flipped_and_truncated_chunks_are_named_and_others_still_read(tmp_path, backend, compression):
    path = str(tmp_path / "s")
    layout = fisherstore.ParamLayout.attention("q", 4, 8)
    with fisherstore.open(path, mode="w", backend=backend, compression=compression) as s:
        s.create("task", "layers.0.q.weight", (32, 16), layout)
        s.update("task", {"layers.0.q.weight": torch.rand(32, 16) + 1})
        want = s.fisher("task", "layers.0.q.weight").load()
    gdir = os.path.join(path, "task", "layers.0.q.weight", "g00000001", "c")
    flip = os.path.join(gdir, "1", "0")
    data = bytearray(open(flip, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(flip, "wb").write(bytes(data))
    trunc = os.path.join(gdir, "3", "0")
    os.truncate(trunc, os.path.getsize(trunc) // 2)

    with fisherstore.open(path, mode="r", backend=backend) as r:
        F = r.fisher("task", "layers.0.q.weight")
        for h in (1, 3):
            with pytest.raises(CorruptChunkError, match=rf"task 'task', parameter 'layers.0.q.weight', chunk \({h}, 0\)"):
                F.head(h, "Q")
        with pytest.raises(CorruptChunkError, match=r"chunk \(1, 0\), \(3, 0\)"):
            F.load()
        for h in (0, 2):
            assert torch.equal(F.head(h, "Q"), want[h * 8:(h + 1) * 8])
    rep = verify_store(path, backend=backend)
    assert not rep.ok
    assert sorted((f.kind, f.chunk) for f in rep.problems) == [("corrupt_chunk", (1, 0)), ("corrupt_chunk", (3, 0))]
    out = subprocess.run([sys.executable, "-m", "fisherstore.cli", "verify", path, "--json"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ok"] is False and {tuple(p["chunk"]) for p in doc["problems"]} == {(1, 0), (3, 0)}


def test_verify_exit_codes_and_missing_chunk(tmp_path, capsys):
    path = str(tmp_path / "s")
    with fisherstore.open(path, mode="w") as s:
        s.create("t", "w", (8, 4), fisherstore.ParamLayout.attention("q", 2, 4))
        s.update("t", {"w": torch.ones(8, 4)})
    assert cli_main(["verify", path]) == 0
    assert "clean" in capsys.readouterr().out
    os.unlink(os.path.join(path, "t", "w", "g00000001", "c", "1", "0"))
    assert cli_main(["verify", path]) == 1
    assert "missing_chunk" in capsys.readouterr().out
    assert cli_main(["verify", str(tmp_path / "nothing")]) == 3  # docs/cli.md: no store at PATH
    with pytest.raises(SystemExit) as e:
        cli_main(["verify"])
    assert e.value.code == 2


# -- disk full --------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB tmpfs (root can mount one here, as CI does)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}); test_interop_reopen.py covers "
                    "ENOSPC with an error injected at the store layer")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("backend", DISK_BACKENDS)
def test_disk_full_keeps_the_last_commit_and_the_accumulators(small_fs, backend):
    path = os.path.join(small_fs, "s")
    filler = os.path.join(small_fs, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * (1 << 20))
    s = fisherstore.open(path, mode="w", backend=backend)
    for n in "ab":
        s.create("t", n, (320, 256))  # 320 KiB each: a flush needs 640 KiB more until it commits
    s.update("t", {n: torch.ones(320, 256) for n in "ab"})
    s.flush()
    s.update("t", {n: torch.full((320, 256), 3.0) for n in "ab"})
    want = {n: s.fisher("t", n).load() for n in "ab"}
    with pytest.raises(StorageError, match=r"No space left on device.*655360 bytes.*task 't' at step 1.*flush\(\) again") as ei:
        s.flush()
    assert ei.value.errno == 28
    with fisherstore.open(path, mode="r", backend=backend) as r:  # disk: still the first commit
        assert r.step("t") == 1
        assert all(torch.allclose(r.fisher("t", n).load(), torch.ones(320, 256), rtol=1e-6) for n in "ab")
    assert all(torch.equal(s.fisher("t", n).load(), want[n]) for n in "ab")  # RAM: nothing lost
    os.unlink(filler)
    s.flush()  # the retry after freeing space
    s.close()
    with fisherstore.open(path, mode="r", backend=backend) as r:
        assert r.step("t") == 2
        assert all(torch.allclose(r.fisher("t", n).load(), want[n], rtol=1e-6) for n in "ab")
    assert verify_store(path, backend=backend).ok
