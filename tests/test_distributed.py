"""Two torch.distributed (gloo) ranks write disjoint parameters of one store.

The result must equal a single-process run bit for bit: same generations, same steps,
same values, one manifest written by rank 0.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

import fisherstore
from fisherstore.verify import verify_store

NAMES = [f"layers.{i}.q.weight" for i in range(5)]
SHAPE = (16, 12)
LAYOUT = fisherstore.ParamLayout.attention("q", 4, 4)
STEPS = 7
FLUSH_EVERY = 3


def grads(t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    return {n: torch.rand(SHAPE, generator=g) * (i + 1) for i, n in enumerate(NAMES)}


def collect(store: fisherstore.FisherStore) -> None:
    """What every rank runs: collective creation, each rank feeds what it owns."""
    for n in NAMES:
        store.create("t", n, SHAPE, LAYOUT)
    store.set_metadata("t", estimator="micro_batch", model={"arch": "toy"})
    for t in range(1, STEPS + 1):
        g = grads(t)
        with store.begin_step("t", tokens=5) as st:
            for n in NAMES:
                if store.owns("t", n):
                    st.add(n, g[n])
        if t % FLUSH_EVERY == 0:
            store.flush()


def rank_main(rank: int, world: int, init: str, paths: dict[str, str], backend: str, conn) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        group = fisherstore.RankGroup.from_torch()
        for budget, path in paths.items():
            with fisherstore.open(path, mode="w", backend=backend, memory_budget=int(budget), group=group) as s:
                collect(s)
                owned = [n for n in NAMES if s.owns("t", n)]
                other = next(n for n in NAMES if not s.owns("t", n))
                try:  # feeding another rank's parameter is refused, and the step is discarded
                    with s.begin_step("t") as st:
                        st.add(other, torch.ones(SHAPE))
                    refused = ""
                except fisherstore.StepError as e:
                    refused = str(e)
        dist.destroy_process_group()
        conn.send(("ok", owned, refused))
    except BaseException as e:  # report, so the parent fails with the cause instead of a hang
        conn.send(("error", f"{type(e).__name__}: {e}", ""))


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_two_gloo_ranks_equal_one_process_bit_for_bit(tmp_path, backend):
    ctx = mp.get_context("forkserver")
    # budget 0: every parameter streams; 1 MiB: every parameter is resident and folds
    paths = {str(b): str(tmp_path / f"dist-{b}") for b in (0, 1 << 20)}
    init = f"file://{tmp_path / 'rendezvous'}"
    procs, conns = [], []
    for rank in range(2):
        r, c = ctx.Pipe(duplex=False)
        p = ctx.Process(target=rank_main, args=(rank, 2, init, paths, backend, c))
        p.start()
        procs.append(p)
        conns.append(r)
    results = []
    for p, r in zip(procs, conns):
        assert r.poll(120), "a rank hung"
        results.append(r.recv())
        p.join(30)
    assert all(res[0] == "ok" for res in results), results
    owned = [set(res[1]) for res in results]
    assert all("another rank" in res[2] for res in results), results
    assert owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == set(NAMES)

    for budget, path in paths.items():
        single = str(tmp_path / f"single-{budget}")
        with fisherstore.open(single, mode="w", backend=backend, memory_budget=int(budget)) as s:
            collect(s)
        with fisherstore.open(path, mode="r", backend=backend) as d, \
                fisherstore.open(single, mode="r", backend=backend) as s:
            assert d.step("t") == s.step("t") == STEPS
            md, ms = d.metadata("t"), s.metadata("t")
            assert md["tokens_seen"] == ms["tokens_seen"] == 5 * STEPS
            assert md["estimator"] == "micro_batch" and md["model"] == {"arch": "toy"}
            for n in NAMES:
                assert md["params"][n]["updates"] == ms["params"][n]["updates"] == STEPS
                assert torch.equal(d.fisher("t", n).load(), s.fisher("t", n).load()), (budget, n)
        assert verify_store(path, backend=backend).ok
        assert not os.path.exists(os.path.join(path, ".fisherstore.lock")) or \
            os.path.getsize(os.path.join(path, ".fisherstore.lock")) == 0  # rank 0 released it
