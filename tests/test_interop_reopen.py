"""Interop between zarr and TensorStore, reopen in a new process, crash-safe commits."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorstore as ts
import torch
import zarr

import fisherstore
from fisherstore import ParamLayout
from fisherstore.backends.zarr_backend import ZarrBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fill(store, seed=0, steps=3):
    torch.manual_seed(seed)
    store.create("task/α", "layers.0.q.weight", (16, 6), ParamLayout.attention("q", 4, 4))
    store.create("task/α", "layers.0.o.weight", (6, 16), ParamLayout.attention("o", 4, 4))
    for _ in range(steps):
        store.update("task/α", {"layers.0.q.weight": torch.rand(16, 6), "layers.0.o.weight": torch.rand(6, 16)})
    store.flush()


@pytest.mark.parametrize("writer,reader", [("zarr", "tensorstore"), ("tensorstore", "zarr")])
@pytest.mark.parametrize("compression", [None, "blosc-lz4"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct-reads", "library-reads"])
def test_each_backend_reads_what_the_other_wrote_bit_for_bit(tmp_path, writer, reader, compression, direct):
    with fisherstore.open(tmp_path / "s", mode="w", backend=writer, compression=compression) as w:
        _fill(w)
        want = {n: w.fisher("task/α", n, bias_corrected=False).load() for n in w.params("task/α")}
    with fisherstore.open(tmp_path / "s", mode="r+", backend=reader, direct_reads=direct) as r:
        for n, v in want.items():
            assert torch.equal(r.fisher("task/α", n, bias_corrected=False).load(), v)
        r.update("task/α", {"layers.0.q.weight": torch.ones(16, 6)})  # the reader writes too
        r.flush()
        after = r.fisher("task/α", "layers.0.q.weight").load()
    with fisherstore.open(tmp_path / "s", mode="r", backend=writer) as w2:
        assert torch.equal(w2.fisher("task/α", "layers.0.q.weight").load(), after)


@pytest.mark.parametrize("writer", ["zarr", "tensorstore"])
def test_plain_zarr_and_tensorstore_open_the_arrays(tmp_path, writer):
    with fisherstore.open(tmp_path / "s", mode="w", backend=writer) as w:
        _fill(w)
        raw = w.fisher("task/α", "layers.0.q.weight", bias_corrected=False).load().numpy()
    root = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert root.attrs["fisherstore"]["format_version"] == 1
    manifest = root.attrs.asdict()["fisherstore"]["tasks"]
    tkey = manifest["task/α"]
    entry = zarr.open_group(str(tmp_path / "s"), path=tkey, mode="r").attrs["fisherstore_task"]["params"]["layers.0.q.weight"]
    path = f"{entry['key']}/g{entry['generation']:08d}"
    arr = zarr.open_array(str(tmp_path / "s"), path=path, mode="r")
    assert arr.chunks == (4, 6) and arr.attrs["fisherstore_param"]["layout"]["kind"] == "q"
    np.testing.assert_array_equal(arr[...], raw)
    t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "s" / path)}}).result()
    np.testing.assert_array_equal(t.read().result(), raw)
    codecs = json.load(open(tmp_path / "s" / path / "zarr.json"))["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "crc32c"]


CONTINUE = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    import fisherstore
    path, backend, start, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with fisherstore.open(path, mode="a", backend=backend, decay=0.9) as s:
        if start == 0:
            s.create("t", "w", (5, 3))
            s.create("t", "v", (4,))
        for i in range(start, stop):
            g = torch.Generator().manual_seed(i)
            upd = {{"w": torch.rand(5, 3, generator=g)}}
            if i % 2:
                upd["v"] = torch.rand(4, generator=g)
            s.update("t", upd, tokens=i + 1)
            if i % 3 == 2:
                s.flush()
""")


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_reopen_in_new_process_and_continue_equals_uninterrupted(tmp_path, backend):
    script = tmp_path / "cont.py"
    script.write_text(CONTINUE.format(root=ROOT))

    def run(path, a, b):
        subprocess.run([sys.executable, str(script), str(path), backend, str(a), str(b)], check=True)

    run(tmp_path / "split", 0, 4)
    run(tmp_path / "split", 4, 9)
    run(tmp_path / "whole", 0, 9)
    with fisherstore.open(tmp_path / "split", mode="r", backend=backend) as a, \
         fisherstore.open(tmp_path / "whole", mode="r", backend=backend) as b:
        assert a.step("t") == b.step("t") == 9
        assert a.metadata("t")["tokens_seen"] == b.metadata("t")["tokens_seen"] == 45
        for n in ("w", "v"):
            assert torch.allclose(a.fisher("t", n).load(), b.fisher("t", n).load(), rtol=1e-6, atol=0)


def test_step_that_raises_is_discarded_whole(open_store, backend):
    s = open_store(backend, memory_budget=0 if backend != "ram" else None)
    s.create("t", "a", (3, 3))
    s.create("t", "b", (3, 3))
    s.update("t", {"a": torch.ones(3, 3), "b": torch.ones(3, 3)})
    before = {n: s.fisher("t", n).load() for n in "ab"}
    with pytest.raises(RuntimeError, match="boom"):
        with s.begin_step("t", tokens=10) as st:
            st.add("a", torch.full((3, 3), 50.0))
            raise RuntimeError("boom")
    with pytest.raises(fisherstore.NonFiniteGradientError):
        s.update("t", {"a": torch.full((3, 3), 9.0), "b": torch.full((3, 3), float("nan"))})
    assert s.step("t") == 1 and s.metadata("t")["tokens_seen"] == 0
    for n in "ab":
        assert torch.equal(s.fisher("t", n).load(), before[n])
    s.flush()
    if s.path:
        gens = sorted(os.listdir(os.path.join(s.path, "t", "a")))
        assert gens == ["g00000001", "zarr.json"]  # the discarded step left no generation


class FailingZarr(ZarrBackend):
    """A real zarr backend that hits an I/O error after `budget` chunk writes."""

    def __init__(self, *a, budget=1, **kw):
        super().__init__(*a, **kw)
        self.budget = budget

    def write(self, key, region, data):
        if self.budget <= 0:
            raise OSError(28, "No space left on device (injected)")
        self.budget -= 1
        super().write(key, region, data)


def test_failed_flush_keeps_last_commit_and_accumulators(tmp_path):
    from fisherstore.store import FisherStore

    be = FailingZarr(str(tmp_path / "s"), read_only=False, budget=100)
    s = FisherStore(be, mode="w", decay=0.5)
    for n in "ab":
        s.create("t", n, (4, 2))
    s.update("t", {"a": torch.ones(4, 2), "b": torch.ones(4, 2)})
    s.flush()
    s.update("t", {"a": torch.full((4, 2), 3.0), "b": torch.full((4, 2), 5.0)})
    want = {n: s.fisher("t", n).load() for n in "ab"}
    be.budget = 1  # the next flush writes a's new generation, then dies on b's
    with pytest.raises(OSError, match="No space"):
        s.flush()
    with fisherstore.open(tmp_path / "s", mode="r") as r:  # disk still at the first commit
        assert r.step("t") == 1
        for n in "ab":
            assert torch.allclose(r.fisher("t", n).load(), torch.ones(4, 2))
    for n in "ab":  # nothing lost in RAM
        assert torch.equal(s.fisher("t", n).load(), want[n])
    be.budget = 100
    s.flush()
    s.close()
    with fisherstore.open(tmp_path / "s", mode="r") as r:
        assert r.step("t") == 2
        for n in "ab":
            assert torch.allclose(r.fisher("t", n).load(), want[n])
            assert sorted(os.listdir(tmp_path / "s" / "t" / n)) == ["g00000002", "zarr.json"]


def test_orphan_generations_are_ignored_by_readers_and_removed_by_writers(tmp_path):
    with fisherstore.open(tmp_path / "s", mode="w") as s:
        s.create("t", "a", (4, 2))
        s.update("t", {"a": torch.ones(4, 2)})
    # what a writer killed mid-flush leaves behind: a new generation no manifest names
    orphan = zarr.create_array(str(tmp_path / "s" / "t" / "a" / "g00000002"), shape=(4, 2), dtype="f4")
    orphan[...] = 99
    with fisherstore.open(tmp_path / "s", mode="r") as r:
        assert torch.allclose(r.fisher("t", "a").load(), torch.ones(4, 2))
    assert os.path.isdir(tmp_path / "s" / "t" / "a" / "g00000002")
    with pytest.warns(fisherstore.RecoveryWarning, match=r"rolled back.*t/a/g00000002"):
        w = fisherstore.open(tmp_path / "s", mode="r+")
    with w:
        assert torch.allclose(w.fisher("t", "a").load(), torch.ones(4, 2))
    assert not os.path.exists(tmp_path / "s" / "t" / "a" / "g00000002")
