"""The out-of-core heat map on a torch.distributed rank group: gloo ranks deal the blocks, read apart, agree.

A real zarr store is built first, in this process: a tiny LLaMA's EMA Fisher for task "a"
and per-sample gradients of tasks "a" and "b". Then 2 (and 3) gloo processes each open it
read-only and call ``heatmap_from_store(store, "a", "b", group=RankGroup.from_torch())``.
Every rank must return what this process returns alone (scores and means to fp32
tolerance, the same top conflicts), each must read about 1/world of the chunks (the
store's ``io_counters``), and a refusal, a plan that differs, or a failed read on one rank
must make every rank raise a named error, none hang.
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import shutil

import numpy as np
import pytest
import torch

import fisherstore
from fisherstore.qkov import QKOVIndexer, QKOVInterference
from fisherstore.qkov.outofcore import block_bytes, deal_blocks, plan_blocks

N_A, N_B = 4, 3
TIMEOUT = 300  # seconds the parent waits for a rank; the ranks' own collectives give up after 60


# -- what every rank runs ------------------------------------------------------------------------
def _call(rank: int, scenario: str) -> dict:
    """The keyword arguments of ``heatmap_from_store`` for ``scenario`` on ``rank`` (some differ on purpose)."""
    return {
        "ema": {},
        "contribution": dict(fisher="contribution", layers=[1], blocks="KV", top_k=5),
        # the ranks' arguments differ: the plans' fingerprints differ, every rank raises naming "blocks"
        "mismatch": dict(blocks="QKVO" if rank == 0 else "Q"),
        # refused on rank 1 only (task b holds no EMA step): rank 1 raises NoEmaStepError, rank 0 RankFailedError
        "refused_on_one": dict(fisher_task="b" if rank == 1 else None),
        # refused on every rank alike: each raises the refusal itself
        "refused_on_all": dict(fisher_task="b"),
        "empty_selection": dict(blocks=""),
        # an argument torch refuses, on rank 1 only: its own RuntimeError there, RankFailedError on rank 0
        "bad_device": dict(device="no-such-device" if rank == 1 else None),
    }[scenario]


def _summary(heat: dict) -> dict:
    """What a rank sends back: numpy and plain lists (no tensor crosses the pipe)."""
    return {"scores": {b: s.numpy() for b, s in heat["scores"].items()},
            "means": {b: np.asarray(heat[b]) for b in heat["scores"]},
            "top": {b: [(t["sample_i"], t["sample_j"], t["layer"], t["head"], t["score"]) for t in ts]
                    for b, ts in heat["top_conflicts"].items()},
            "layers": heat["layers"], "heads": heat["heads"], "ids": heat["sample_ids"]}


def rank_main(rank: int, world: int, init: str, runs: list[tuple[str, str]], conn) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        group = fisherstore.RankGroup.from_torch(timeout=60)
        out = []
        for scenario, path in runs:
            with fisherstore.open(path, mode="r") as store:
                qk = QKOVInterference(QKOVIndexer.from_store(store, "a"))
                before = store.io_counters()["chunk_files_read"]
                try:
                    heat = qk.heatmap_from_store(store, "a", "b", group=group, progress=False, **_call(rank, scenario))
                    res = ("ok", _summary(heat))
                except Exception as e:  # every error is a result here
                    res = ("raised", type(e).__name__, str(e), getattr(e, "rank", None))
                out.append((scenario, res, store.io_counters()["chunk_files_read"] - before))
        dist.destroy_process_group()
        conn.send(("ok", out))
    except BaseException as e:  # report, so the parent fails with the cause instead of a hang
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_ranks(world: int, root, runs: list[tuple[str, str]]) -> list[list]:
    """Start ``world`` gloo ranks that run ``runs`` in order; each rank's ``[(scenario, result, chunks read)]``."""
    ctx = mp.get_context("forkserver")
    init = f"file://{root / f'rendezvous-{world}'}"
    procs, conns = [], []
    for rank in range(world):
        r, c = ctx.Pipe(duplex=False)
        p = ctx.Process(target=rank_main, args=(rank, world, init, runs, c))
        p.start()
        procs.append(p)
        conns.append(r)
    results = []
    try:
        for r in conns:
            assert r.poll(TIMEOUT), "a rank hung"
            results.append(r.recv())
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(res[0] == "ok" for res in results), [res[1] for res in results if res[0] != "ok"]
    return [res[1] for res in results]


# -- the store, and what one process makes of it ---------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The store, a copy of it with one chunk corrupted that only rank 1 of 2 reads, and the one-process results."""
    from tests.models import tiny_model, token_batch

    root = tmp_path_factory.mktemp("heatranks")
    path = str(root / "store")
    model = tiny_model("llama")
    fc = fisherstore.FisherCollector(backend="zarr", path=path, micro_batch_size=2)
    for i in range(2):
        fc.collect_fisher(model, token_batch(n=4, seed=i), task="a")
    fc.collect_samples(model, token_batch(n=N_A, seed=11), task="a")
    fc.collect_samples(model, token_batch(n=N_B, seed=12, lo=32), task="b")
    fc.close()

    single, reads = {}, {}
    with fisherstore.open(path, mode="r") as store:
        qk = QKOVInterference(QKOVIndexer.from_store(store, "a"))
        for scenario in ("ema", "contribution"):
            before = store.io_counters()["chunk_files_read"]
            single[scenario] = _summary(qk.heatmap_from_store(store, "a", "b", progress=False,
                                                              **_call(0, scenario)))
            reads[scenario] = store.io_counters()["chunk_files_read"] - before
        # the chunk to corrupt: the EMA block of the first block rank 1 of 2 reads, which rank 0 never reads
        jobs = plan_blocks(qk.indexer, *qk.selection(None, None, "QKVO"))
        owners = deal_blocks(block_bytes(store, jobs, "a", "b", "ema"), 2)
        job = jobs[owners.index(1)]
        chunks = store.samples("a", job.name).chunks[1:]
        coords = [(s.start or 0) // c for s, c in zip(job.region, chunks)]
    bad = str(root / "corrupt")
    shutil.copytree(path, bad)
    (chunk,) = glob.glob(os.path.join(bad, "a", job.name, "g*", "c", *map(str, coords)))
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    with fisherstore.open(bad, mode="r") as store, pytest.raises(fisherstore.CorruptChunkError):
        QKOVInterference(QKOVIndexer.from_store(store, "a")).heatmap_from_store(store, "a", "b", progress=False)
    return {"root": root, "path": path, "bad": bad, "single": single, "reads": reads}


def _same_heat(got: dict, want: dict) -> None:
    assert got["layers"] == want["layers"] and got["heads"] == want["heads"]
    assert [list(i) for i in got["ids"]] == [list(i) for i in want["ids"]]
    assert got["scores"].keys() == want["scores"].keys()
    for b in want["scores"]:
        np.testing.assert_allclose(got["scores"][b], want["scores"][b], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(got["means"][b], want["means"][b], rtol=1e-5, atol=1e-12)
        assert [t[:4] for t in got["top"][b]] == [t[:4] for t in want["top"][b]], b
        np.testing.assert_allclose([t[4] for t in got["top"][b]], [t[4] for t in want["top"][b]], rtol=1e-5)


@pytest.fixture(scope="module")
def two_ranks(built):
    """Two ranks run every scenario in order on one group: the group must stay usable after each refusal."""
    runs = [(s, built["path"]) for s in ("ema", "mismatch", "refused_on_one", "refused_on_all", "empty_selection",
                                         "bad_device")]
    runs += [("ema", built["bad"]), ("contribution", built["path"])]
    return run_ranks(2, built["root"], runs)


# -- the tests -------------------------------------------------------------------------------------
def test_two_ranks_return_what_one_process_returns_and_each_reads_half(built, two_ranks):
    total = 0
    for rank, out in enumerate(two_ranks):
        scenario, res, reads = out[0]
        assert scenario == "ema" and res[0] == "ok", (rank, res)
        _same_heat(res[1], built["single"]["ema"])
        # 24 distinct blocks of equal bytes: 12 each; each block reads 4 + 3 sample chunks and 1 EMA chunk
        assert 0 < reads <= 0.75 * built["reads"]["ema"], (rank, reads, built["reads"]["ema"])
        total += reads
    assert total == built["reads"]["ema"]
    # a subset with the contribution Fisher, after every failure below: the group still works
    for rank, out in enumerate(two_ranks):
        scenario, res, _ = out[-1]
        assert scenario == "contribution" and res[0] == "ok", (rank, res)
        _same_heat(res[1], built["single"]["contribution"])


def test_three_ranks_return_what_one_process_returns_and_each_reads_a_third(built):
    results = run_ranks(3, built["root"], [("ema", built["path"])])
    reads = []
    for rank, out in enumerate(results):
        (scenario, res, n), = out
        assert res[0] == "ok", (rank, res)
        _same_heat(res[1], built["single"]["ema"])
        reads.append(n)
    assert sum(reads) == built["reads"]["ema"] and max(reads) <= 0.4 * built["reads"]["ema"], reads


def _raised(two_ranks, k: int, scenario: str) -> list[tuple]:
    outs = [out[k] for out in two_ranks]
    assert all(o[0] == scenario for o in outs)
    assert all(o[1][0] == "raised" for o in outs), [o[1] for o in outs]
    return [o[1][1:] + (o[2],) for o in outs]


def test_plans_that_differ_raise_on_every_rank_naming_the_difference(two_ranks):
    for kind, msg, rank, reads in _raised(two_ranks, 1, "mismatch"):
        assert kind == "RankFailedError" and rank == 1, (kind, msg)
        assert "rank 1 planned another heat map than rank 0" in msg and "blocks" in msg and "['Q']" in msg, msg
        assert reads == 0  # refused before any chunk is read


def test_a_refusal_on_one_rank_raises_on_every_rank(two_ranks):
    (k0, m0, r0, n0), (k1, m1, r1, n1) = _raised(two_ranks, 2, "refused_on_one")
    assert k1 == "NoEmaStepError" and "task 'b' holds no EMA step" in m1, m1
    assert k0 == "RankFailedError" and r0 == 1 and "rank 1 could not plan the heat map" in m0, m0
    assert "NoEmaStepError" in m0 and n0 == n1 == 0


def test_a_refusal_on_every_rank_is_each_ranks_own(two_ranks):
    for kind, msg, _, reads in _raised(two_ranks, 3, "refused_on_all"):
        assert kind == "NoEmaStepError" and "task 'b'" in msg and reads == 0, msg
    for kind, msg, _, reads in _raised(two_ranks, 4, "empty_selection"):
        assert kind == "InvalidArgumentError" and "selection of blocks is empty" in msg and reads == 0, msg


def test_an_argument_only_one_rank_refuses_raises_on_every_rank(two_ranks):
    (k0, m0, r0, n0), (k1, m1, _, n1) = _raised(two_ranks, 5, "bad_device")
    assert k1 == "RuntimeError" and "no-such-device" in m1, (k1, m1)
    assert k0 == "RankFailedError" and r0 == 1 and "rank 1 could not plan the heat map" in m0, m0
    assert n0 == n1 == 0


def test_a_failed_read_on_one_rank_raises_on_every_rank(two_ranks):
    (k0, m0, r0, _), (k1, m1, _, _) = _raised(two_ranks, 6, "ema")
    assert k1 == "CorruptChunkError", (k1, m1)
    assert k0 == "RankFailedError" and r0 == 1, (k0, m0)
    assert "rank 1 could not read and score its blocks of the heat map" in m0 and "CorruptChunkError" in m0, m0


# -- the deal, in one process ----------------------------------------------------------------------
def test_the_deal_balances_bytes_and_is_the_same_everywhere():
    sizes = [5, 4, 3, 3, 3]
    owners = deal_blocks(sizes, 2)
    assert owners == [0, 1, 1, 0, 1]  # LPT: 5 | 4, 3 | 3 to the lighter rank 0 (5 < 7) | 3 to rank 1 (7 < 8)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert loads == [8, 10] and max(loads) <= 4 / 3 * 9  # the best deal's largest share is 9
    assert deal_blocks([7] * 6, 4) == [0, 1, 2, 3, 0, 1]  # equal sizes: round-robin in plan order
    assert deal_blocks([], 3) == [] and deal_blocks([1, 2], 1) == [0, 0]
    with pytest.raises(fisherstore.InvalidArgumentError, match="world_size"):
        deal_blocks([1], 0)


def test_block_bytes_are_the_sample_chunks_of_both_tasks_and_the_fisher_block(built):
    with fisherstore.open(built["path"], mode="r") as store:
        qk = QKOVInterference(QKOVIndexer.from_store(store, "a"))
        jobs = plan_blocks(qk.indexer, *qk.selection(None, None, "QKVO"))
        elems = 8 * 32  # every head block of this LLaMA: d=8 by hidden=32, fp32
        assert block_bytes(store, jobs, "a", "b", "ema") == [elems * 4 * (N_A + N_B + 1)] * len(jobs)
        assert block_bytes(store, jobs, "a", "b", "contribution") == [elems * 4 * (N_A + N_B)] * len(jobs)
        assert block_bytes(store, jobs[:1], "a", "b", "contribution", "b") == [elems * 4 * (N_A + 2 * N_B)]


def test_a_group_of_one_is_the_single_process_path(built):
    with fisherstore.open(built["path"], mode="r") as store:
        qk = QKOVInterference(QKOVIndexer.from_store(store, "a"))
        heat = qk.heatmap_from_store(store, "a", "b", progress=False, group=fisherstore.RankGroup.solo())
    _same_heat(_summary(heat), built["single"]["ema"])
    assert torch.is_tensor(heat["scores"]["Q"])
