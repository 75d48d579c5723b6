"""Snapshot reads: every multi-read operation of a reader reads one commit, under a live writer.

A writer process commits every step, with ``x_t = t`` in every element of every
parameter, so the bias-corrected EMA after step t is the same number everywhere and a
different number for every step. A result that holds two different values read from two
commits is *mixed*; the tests count mixed results (the issue's acceptance: 0) and check each
value against the step it claims, from a hand formula written here.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch

import fisherstore
from fisherstore import ParamLayout
from fisherstore.engine.verify import verify_store
from fisherstore.errors import RecoveryWarning, SnapshotLostError

BETA = 0.9
H, D, IN = 8, 4, 16  # 8 head blocks per parameter
NAMES = ("q", "o", "plain")

WRITER = textwrap.dedent("""
    import sys, time, torch, fisherstore
    url, backend, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with fisherstore.open(url, mode="a", backend=backend) as s:
        t = s.step("A")
        print("ready", flush=True)
        end = time.time() + seconds
        while time.time() < end:
            t += 1
            s.update("A", {n: torch.full(s.param("A", n).shape, float(t)) for n in s.params("A")})
            s.flush()
    print("done", t, flush=True)
""")


def expected(step: int) -> float:
    """The bias-corrected EMA after ``step`` steps of x_i = i (the hand formula, not the store's code)."""
    if step == 0:
        return 0.0
    num = sum((1 - BETA) * BETA ** (step - i) * i for i in range(1, step + 1))
    return num / (1 - BETA ** step)


def make_store(url: str, backend: str) -> None:
    with fisherstore.open(url, mode="w", backend=backend, decay=BETA) as s:
        s.create("A", "q", (H * D, IN), ParamLayout.attention("q", H, D))
        s.create("A", "o", (IN, H * D), ParamLayout.attention("o", H, D))
        s.create("A", "plain", (32, 8), chunks=(4, 8))
        s.update("A", {n: torch.full(s.param("A", n).shape, 1.0) for n in NAMES})


class Writer:
    """A writer process that commits every step until stopped."""

    def __init__(self, url: str, backend: str, seconds: float = 120, env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, url, backend, str(seconds)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line + self.proc.stderr.read()

    def stop(self) -> int:
        """Stop the writer; the number of steps it committed in all."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return len(out)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def one_commit(values: list[np.ndarray], step: int) -> bool:
    """Whether every value is the EMA at ``step`` (to fp32 tolerance): not mixed, and the step it claims."""
    want = expected(step)
    return all(np.allclose(v, want, rtol=2e-6, atol=0) for v in values)


def count_mixed(store: fisherstore.FisherStore, rounds: int) -> dict[str, int]:
    """Run each multi-read operation ``rounds`` times against the live writer; count mixed results."""
    mixed = {"to_dask": 0, "to_xarray": 0, "iter_heads": 0, "summary": 0}
    steps = set()
    for _ in range(rounds):
        x = store.to_dask("A", "q")
        time.sleep(0.01)  # let the writer commit between building the graph and computing it
        vals = [np.asarray(b) for b in x.blocks]  # one compute per chunk: the widest window for a mix
        mixed["to_dask"] += len({float(v.flat[0]) for v in vals}) != 1 or not np.allclose(
            np.concatenate([v.ravel() for v in vals]), vals[0].flat[0])
        tree = store.to_xarray("A")
        step = tree.attrs["step"]
        steps.add(step)
        vals = [tree[n]["fisher"].values for n in NAMES]
        mixed["to_xarray"] += not one_commit(vals, step)
        blocks = [blk.numpy() for _, _, _, blk in store.iter_heads("A")]
        mixed["iter_heads"] += len({float(b.flat[0]) for b in blocks}) != 1 or not all(
            np.all(b == b.flat[0]) for b in blocks)
        df = store.summary("A")
        per_element = (df["mass"] / df["numel"]).to_numpy()
        mixed["summary"] += not np.allclose(per_element, per_element[0], rtol=1e-6)
    assert len(steps) > 1, "the writer committed nothing while the views were read: the race was not run"
    return mixed


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_views_sweeps_and_summaries_read_one_commit_while_a_writer_commits_every_step(tmp_path, backend):
    pytest.importorskip("xarray")
    url = str(tmp_path / "store")
    make_store(url, backend)
    with Writer(url, backend), fisherstore.open(url, mode="r", backend=backend) as r:
        mixed = count_mixed(r, 15)
    assert mixed == {"to_dask": 0, "to_xarray": 0, "iter_heads": 0, "summary": 0}
    # Every view is gone and its pin with it: the next writer deletes every superseded generation.
    gc.collect()
    with warnings.catch_warnings():  # the killed writer's uncommitted step is rolled back: expected
        warnings.simplefilter("ignore", RecoveryWarning)
        w = fisherstore.open(url, mode="a", backend=backend)
    with w:
        w.update("A", {"q": torch.ones(H * D, IN)})
    assert len([n for n in os.listdir(os.path.join(url, "A", "q")) if n.startswith("g")]) == 1


def test_views_read_one_commit_on_s3_while_a_writer_commits_every_step(s3):
    pytest.importorskip("xarray")
    url = s3()
    make_store(url, "zarr")
    with Writer(url, "zarr"), fisherstore.open(url, mode="r") as r:
        mixed = count_mixed(r, 4)
    assert mixed == {"to_dask": 0, "to_xarray": 0, "iter_heads": 0, "summary": 0}


def test_a_graph_built_at_one_commit_computes_there_after_many_later_commits(tmp_path):
    url = str(tmp_path / "store")
    make_store(url, "zarr")
    with fisherstore.open(url, mode="r") as r:
        x = r.to_dask("A", "q")
        tree = r.to_xarray("A")
        assert (tree.attrs["step"], tree.attrs["commit"]) == (1, r.metadata("A")["commit"])
        with fisherstore.open(url, mode="a") as w:
            for t in range(2, 6):
                w.update("A", {n: torch.full(w.param("A", n).shape, float(t)) for n in NAMES})
                w.flush()
            # the generation of step 1 is superseded four times over, yet kept: a pin holds it
            assert "g00000001" in os.listdir(os.path.join(url, "A", "q"))
        assert np.all(x.compute() == expected(1))
        assert one_commit([tree[n]["fisher"].values for n in NAMES], 1)
        assert one_commit([r.to_dask("A", "q").compute()], 5)  # a new view: the new commit
        del x, tree
    gc.collect()
    with fisherstore.open(url, mode="a") as w:  # the views are gone, their pins with them
        w.update("A", {"q": torch.ones(H * D, IN)})
    assert "g00000001" not in os.listdir(os.path.join(url, "A", "q"))


def test_a_snapshot_whose_pin_lapsed_raises_snapshot_lost_not_a_mixed_or_corrupt_read(tmp_path):
    url = str(tmp_path / "store")
    make_store(url, "zarr")
    with fisherstore.open(url, mode="r") as r:
        snap = r.snapshot()
        assert "pinned" in repr(snap)
        snap.fisher("A", "q")[:D]  # read once: a reader's chunk cache must not hide the loss below
        snap.close()  # as if the lease lapsed
        with fisherstore.open(url, mode="a") as w:
            w.update("A", {n: torch.full(w.param("A", n).shape, 2.0) for n in NAMES})
        with pytest.raises(SnapshotLostError, match="Build the view again"):
            snap.read("A", "q")
        assert one_commit([r.snapshot().read("A", "q").numpy()], 2)


def test_a_dead_readers_pin_expires_and_its_generations_are_then_deleted(tmp_path):
    url = str(tmp_path / "store")
    make_store(url, "zarr")
    env = {**os.environ, "FISHERSTORE_PIN_TTL": "1.5"}
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, fisherstore
        r = fisherstore.open({url!r}, mode="r")
        s = r.snapshot()
        print("pinned", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "pinned"
        with fisherstore.open(url, mode="a") as w:
            w.update("A", {"q": torch.full((H * D, IN), 2.0)})
            w.flush()
            assert "g00000001" in os.listdir(os.path.join(url, "A", "q"))  # a live reader holds it
            time.sleep(2.5)  # the heartbeat (every 0.5 s) keeps it alive past the TTL
            w.update("A", {"q": torch.full((H * D, IN), 3.0)})
            w.flush()
            assert "g00000001" in os.listdir(os.path.join(url, "A", "q"))
            holder.kill()  # kill -9: nobody unpins
            holder.wait(10)
            time.sleep(2.0)
            w.update("A", {"q": torch.full((H * D, IN), 4.0)})
            w.flush()
        assert sorted(n for n in os.listdir(os.path.join(url, "A", "q")) if n.startswith("g")) == ["g00000004"]
        assert not os.listdir(os.path.join(url, ".fisherstore.pins"))  # the writer removed the expired pin
    finally:
        holder.kill()


def test_verify_under_a_writer_that_commits_many_times_a_second_reports_nothing_missing(tmp_path):
    url = str(tmp_path / "store")
    make_store(url, "zarr")
    with Writer(url, "zarr") as w:
        reports = [verify_store(url) for _ in range(10)]
        assert w.proc.poll() is None
    missing = [f for rep in reports for f in rep.problems]
    assert missing == []
    assert all(rep.chunks_checked > 0 for rep in reports)


def test_a_lazy_samples_view_reads_its_commit_while_a_writer_appends_samples(tmp_path):
    url = str(tmp_path / "store")
    with fisherstore.open(url, mode="w") as s:
        s.create("A", "w", (4, 8))
        with s.begin_samples("A", ["w"], 2) as b:
            for i in range(2):
                b.add(i, "w", torch.arange(32, dtype=torch.float32).reshape(4, 8) + 32 * i)
                b.set_tokens(i, 1)
    with fisherstore.open(url, mode="r") as r:
        lazy = r.samples("A", "w")
        before = lazy[:]
        with fisherstore.open(url, mode="a") as w:
            for _ in range(3):
                with w.begin_samples("A", ["w"], 1) as b:
                    b.add(0, "w", torch.full((4, 8), -1.0))
                    b.set_tokens(0, 1)
        assert len(lazy) == 2 and torch.equal(lazy[:], before)
        assert torch.equal(before, torch.arange(64, dtype=torch.float32).reshape(2, 4, 8))
