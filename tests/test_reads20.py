"""The faster read path (issue 20, item 3): one buffer per head block, manifests parsed once, the scoring's threads."""

import glob
import os

import numpy as np
import pytest
import torch

import fisherstore
from fisherstore import CorruptChunkError, ParamLayout
from fisherstore.backends.hierarchy import ParsedDocs
from fisherstore.qkov.outofcore import scoring_threads

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def store_path(tmp_path, disk_backend):
    path = str(tmp_path / "s")
    with fisherstore.open(path, mode="w", backend=disk_backend) as s:
        s.create("t", Q, (64, 32), ParamLayout.attention("q", 4, 16, 4))
        torch.manual_seed(0)
        s.update("t", {Q: torch.rand(64, 32)})
        s.update("t", {Q: torch.rand(64, 32)})
    return path


def test_a_head_block_is_the_value_bit_for_bit_and_owns_its_memory(store_path, disk_backend):
    with fisherstore.open(store_path, mode="r", backend=disk_backend) as r:
        whole = r.fisher("t", Q).load()
        F = r.fisher("t", Q)
        for h in range(4):
            blk = F.head(h, "Q")
            assert torch.equal(blk, whole[h * 16:(h + 1) * 16])  # bit for bit: the same scale, the same rounding
            blk.add_(1)  # writeable, and nobody else's
        part = F[3:5, 2:7]  # a slice inside one chunk: a copy of the part, not a view of the whole chunk
        assert torch.equal(part, whole[3:5, 2:7]) and part.numpy().base is None or part.numpy().base.nbytes <= 40
        assert torch.equal(r.fisher("t", Q, bias_corrected=False).load(),
                           r.read("t", Q, bias_corrected=False))


@pytest.mark.parametrize("damage", ["flip", "pad", "truncate"])
def test_a_damaged_head_block_is_named_on_the_one_buffer_path(store_path, disk_backend, damage):
    chunk = sorted(glob.glob(os.path.join(store_path, "t", "*", "g*", "c", "1", "0")))[-1]
    data = bytearray(open(chunk, "rb").read())
    if damage == "flip":
        data[100] ^= 1
    elif damage == "pad":
        data += b"\0"
    else:
        data = data[:-1]
    with open(chunk, "wb") as f:
        f.write(bytes(data))
    with fisherstore.open(store_path, mode="r", backend=disk_backend) as r, \
            pytest.raises(CorruptChunkError, match=r"chunk \(1, 0\)"):
        r.fisher("t", Q).head(1, "Q")


def test_a_reopened_store_sees_a_new_commit_although_manifests_are_remembered(store_path, disk_backend):
    with fisherstore.open(store_path, mode="r", backend=disk_backend) as r:
        before, step = r.fisher("t", Q).load(), r.step("t")
    with fisherstore.open(store_path, mode="r+", backend=disk_backend) as w:
        w.update("t", {Q: torch.ones(64, 32)})
    with fisherstore.open(store_path, mode="r", backend=disk_backend) as r:
        assert r.step("t") == step + 1 and not torch.equal(r.fisher("t", Q).load(), before)
    with fisherstore.open(store_path, mode="r+", backend=disk_backend) as w:
        w.set_metadata("t", k=1)
    with fisherstore.open(store_path, mode="a", backend=disk_backend) as w:
        w.set_metadata("t", j=2)  # not committed yet: it changes the writer's own copy of the info only
        with fisherstore.open(store_path, mode="r", backend=disk_backend) as r:  # the same bytes, parsed before
            assert r.metadata("t")["user"] == {"k": 1}
    with fisherstore.open(store_path, mode="r", backend=disk_backend) as r:
        assert r.metadata("t")["user"] == {"k": 1, "j": 2}


def test_parsed_docs_are_keyed_by_bytes_and_bounded():
    cache = ParsedDocs(entries=2, max_bytes=1 << 20)
    calls = []

    def make(v):
        calls.append(v)
        return v

    assert cache.get("k", b"a", lambda: make(1)) == 1
    assert cache.get("k", b"a", lambda: make(2)) == 1  # the same bytes: the parse made before
    assert cache.get("k", b"b", lambda: make(3)) == 3  # other bytes: parsed again
    assert cache.get("other", b"a", lambda: make(4)) == 4  # another kind of document
    assert cache.get("k", b"a", lambda: make(5)) == 5  # evicted (two entries at most)
    assert calls == [1, 3, 4, 5]
    with pytest.raises(ValueError):
        cache.get("k", b"bad", lambda: (_ for _ in ()).throw(ValueError("damaged")))
    assert cache.get("k", b"bad", lambda: make(6)) == 6  # an error is never remembered


def test_scoring_threads_leave_a_core_to_the_readers_and_restore_the_count():
    before = torch.get_num_threads()
    with scoring_threads(torch.device("cpu")):
        assert torch.get_num_threads() == max(1, before - 1)
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), scoring_threads(torch.device("cpu")):
        raise RuntimeError("a failing block")
    assert torch.get_num_threads() == before
    with scoring_threads(torch.device("meta")):  # another device: the CPU threads are not touched
        assert torch.get_num_threads() == before


def test_scale_in_place_is_torch_mul_bit_for_bit():
    from fisherstore.engine.read import scale_in_place

    rng = np.random.default_rng(0)
    x = ((rng.standard_normal(1 << 16) * np.exp(3 * rng.standard_normal(1 << 16))) ** 2).astype(np.float32)
    for scale in (0.99 ** 7 / (1 - 0.99 ** 13), 1 / (1 - 0.999), 1.0, 1e-30, 0.1234567890123):
        a = x.copy()
        scale_in_place(a, scale)
        assert np.array_equal(a.view(np.uint32), torch.from_numpy(x.copy()).mul_(scale).numpy().view(np.uint32))
