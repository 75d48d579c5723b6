"""Two torch.distributed (gloo) ranks write disjoint parameters of one store.

The store API: the result must equal a single-process run bit for bit (same generations,
same steps, same values, one manifest written by rank 0). The collector: ranks fed
different batches (data parallel) must equal one process fed the union batch, to fp32
tolerance; ranks fed the same batch (data_parallel=False) must equal one process fed it.
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


# -- data-parallel collection: ranks that see different batches ---------------------------------

DP_STEPS = 2
# Each rank's collector options; "same" feeds every rank the same batch (model/tensor parallel).
DP_SCENARIOS = {
    "micro_batch": dict(estimator="micro_batch", params="all"),
    "batch": dict(estimator="batch"),
    "same": dict(estimator="micro_batch", data_parallel=False),
    # the true Fisher is a sum over positions: reduced across ranks like any square (tests/test_fisher_types.py)
    "exact": dict(estimator="micro_batch", fisher_type="exact"),
}


def dp_batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    """Rank 0: 4 sequences (2 micro-batches of 2), the last padded; rank 1: 2 sequences (1 micro-batch)."""
    from tests.models import token_batch

    return token_batch(n=4 if rank == 0 else 2, seq=6, seed=100 * step + rank, pad_last=rank == 0)


def union_batch(step: int) -> dict[str, torch.Tensor]:
    """Both ranks' batches as one; its micro-batches of 2 are exactly the ranks' micro-batches."""
    a, b = dp_batch(0, step), dp_batch(1, step)
    return {k: torch.cat([a[k], b[k]]) for k in a}


def dp_rank_main(rank: int, world: int, init: str, root: str, conn) -> None:
    import torch.distributed as dist

    from tests.models import tiny_model

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        group = fisherstore.RankGroup.from_torch()
        model = tiny_model("llama")
        out = {}
        for name, kw in DP_SCENARIOS.items():
            fc = fisherstore.FisherCollector(backend="zarr", path=os.path.join(root, name), mode="w",
                                             micro_batch_size=2, group=group, **kw)
            for step in range(DP_STEPS):
                fc.collect_fisher(model, dp_batch(0 if name == "same" else rank, step), task="t")
            groups = {k: v.numpy() for k, v in fc.get_group_fisher("t").items()}
            owned = [n for n in fc.store.params("t") if fc.store.owns("t", n)]
            fc.close()
            out[name] = (owned, groups)
        # reopened, the group view is rebuilt from the store: again only what this rank owns
        fc = fisherstore.FisherCollector(backend="zarr", path=os.path.join(root, "micro_batch"), group=group)
        out["reopened"] = ([n for n in fc.store.params("t") if fc.store.owns("t", n)],
                           {k: v.numpy() for k, v in fc.get_group_fisher("t").items()})
        fc.close()
        # data_parallel=False says the ranks see the same batch: different batches are refused on every rank
        fc = fisherstore.FisherCollector(backend="zarr", path=os.path.join(root, "refused"), mode="w",
                                         micro_batch_size=2, group=group, data_parallel=False)
        out["refused"] = _refusal(lambda: fc.collect_fisher(model, dp_batch(rank, 0), task="t"))
        fc.close()
        # per-sample gradients are collected in one process: a group is refused before any collective
        fc = fisherstore.FisherCollector(backend="zarr", path=os.path.join(root, "samples"), mode="w", group=group)
        out["samples_refused"] = _refusal(lambda: fc.collect_samples(model, dp_batch(rank, 0), task="s"))
        fc.close()
        dist.destroy_process_group()
        conn.send(("ok", out))
    except BaseException as e:  # report, so the parent fails with the cause instead of a hang
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _refusal(call):
    """The message of the InvalidArgumentError ``call`` raises ('' if it raises none)."""
    try:
        call()
    except fisherstore.InvalidArgumentError as e:
        return str(e)
    return ""


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """Two gloo ranks run every scenario once; the tests below check what they wrote."""
    root = tmp_path_factory.mktemp("dp")
    ctx = mp.get_context("forkserver")
    init = f"file://{root / 'rendezvous'}"
    procs, conns = [], []
    for rank in range(2):
        r, c = ctx.Pipe(duplex=False)
        p = ctx.Process(target=dp_rank_main, args=(rank, 2, init, str(root), c))
        p.start()
        procs.append(p)
        conns.append(r)
    results = []
    for p, r in zip(procs, conns):
        assert r.poll(300), "a rank hung"
        results.append(r.recv())
        p.join(30)
    assert all(res[0] == "ok" for res in results), results
    return root, [res[1] for res in results]


def _close(got, want, rtol=1e-5):
    """fp32 agreement, with an absolute floor scaled to the tensor (summation order differs across ranks)."""
    return torch.allclose(got, want, rtol=rtol, atol=rtol * 1e-3 * float(want.abs().max()))


def _check_against_one_process(root, per_rank, scenario, batches):
    """The store the ranks wrote, and each rank's group view, equal one process fed ``batches``."""
    from tests.models import tiny_model

    model = tiny_model("llama")
    kw = {k: v for k, v in DP_SCENARIOS[scenario].items() if k != "data_parallel"}
    single = fisherstore.FisherCollector(micro_batch_size=2, **kw)
    for b in batches:
        single.collect_fisher(model, b, task="t")
    names = single.store.params("t")
    with fisherstore.open(os.path.join(root, scenario), mode="r") as d:
        assert d.step("t") == single.store.step("t") == DP_STEPS
        assert d.metadata("t")["tokens_seen"] == single.get_token_count("t")
        assert sorted(d.params("t")) == sorted(names)
        for n in names:
            want = single.full_fisher("t", n).load()
            assert want.abs().max() > 0 and _close(d.fisher("t", n).load(), want), (scenario, n)
    owned = [set(o) for o, _ in per_rank]
    assert owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == set(names)
    want_groups = single.get_group_fisher("t")
    for rank, (mine, groups) in enumerate(per_rank):
        # each rank's group view holds exactly the parameters it owns, from the reduced x
        assert set(groups) == {k for k in want_groups if k.split("|")[1] in mine}, rank
        for k, v in groups.items():
            assert _close(torch.from_numpy(v), want_groups[k]), (scenario, rank, k)
    return single


def test_data_parallel_micro_batch_equals_one_process_on_the_union_batch(dp_run):
    root, results = dp_run
    single = _check_against_one_process(root, [r["micro_batch"] for r in results], "micro_batch",
                                        [union_batch(s) for s in range(DP_STEPS)])
    # T of a step is the union batch's: rank 0 has 3*5 + 2 tokens to predict, rank 1 has 2*5
    assert single.get_token_count("t") == DP_STEPS * (17 + 10)
    assert len(single.store.params("t")) > 8  # params="all": embeddings, norms and MLPs too
    want = single.get_group_fisher("t")
    for rank, (mine, groups) in enumerate(r["reopened"] for r in results):
        assert mine and set(groups) == {k for k in want if k.split("|")[1] in mine}, rank
        for k, v in groups.items():
            assert _close(torch.from_numpy(v), want[k], rtol=1e-4), (rank, k)


def test_data_parallel_batch_estimator_squares_the_summed_gradient_of_all_ranks(dp_run):
    root, results = dp_run
    _check_against_one_process(root, [r["batch"] for r in results], "batch", [union_batch(s) for s in range(DP_STEPS)])


def test_same_batch_on_every_rank_without_reduction(dp_run):
    root, results = dp_run
    _check_against_one_process(root, [r["same"] for r in results], "same", [dp_batch(0, s) for s in range(DP_STEPS)])
    for r in results:
        assert "data_parallel=False means every rank sees the same batch" in r["refused"]
        assert "pass data_parallel=True" in r["refused"]


def test_data_parallel_exact_fisher_equals_one_process_on_the_union_batch(dp_run):
    root, results = dp_run
    _check_against_one_process(root, [r["exact"] for r in results], "exact", [union_batch(s) for s in range(DP_STEPS)])
    with fisherstore.open(os.path.join(root, "exact"), mode="r") as d:
        assert d.metadata("t")["fisher_type"] == "exact"


def test_per_sample_collection_with_a_rank_group_is_refused_on_every_rank(dp_run):
    _, per_rank = dp_run
    for out in per_rank:
        assert "collect_samples runs in one process" in out["samples_refused"]
