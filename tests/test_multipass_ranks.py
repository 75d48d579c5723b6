"""Multi-pass collection on a torch.distributed rank group: two gloo ranks, each with its own batches.

Each pass is data-parallel (every step reduced onto the owners), so the run must equal one
process running ``collect_fisher_dataset`` on the union batches (to fp32 tolerance: the
reduction sums in another order), group views included. Ranks with different numbers of
batches are refused on every rank, and a batch that changes between passes on one rank
rolls every rank back to the last commit without a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

import fisherstore
from tests.models import tiny_model, token_batch
from tests.test_distributed import _close

STATE = 78464  # bytes of fp32 state of the tiny llama with params="all" (tests/test_multipass.py)
FOLD = 2 * 8192  # the end-of-pass folds' slabs
BUDGET = STATE // 4 + FOLD + 64  # each rank owns about half the state: at least 2 passes on each
STEPS = 3
MB = 2  # micro_batch_size: divides both ranks' batches, so the union's micro-batches are the ranks'


def rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Rank 0: batches of 4 sequences (2 micro-batches); rank 1: of 2 (1 micro-batch)."""
    return [token_batch(n=4 if rank == 0 else 2, seq=7, seed=10 * s + rank) for s in range(STEPS)]


def warm_batch(rank: int) -> dict[str, torch.Tensor]:
    return token_batch(n=2, seq=7, seed=90 + rank)  # a committed step before the run


def union(rank_lists: list[list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """Step j of the union: rank 0's batch j, then rank 1's (its micro-batches of 2 are the ranks')."""
    return [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(*rank_lists)]


def _collector(path, group=None, budget=BUDGET, **kw):
    extra = {} if group is None else {"group": group}
    return fisherstore.FisherCollector(backend="zarr", path=str(path), mode="w", params="all", micro_batch_size=MB,
                                       ema_decay=0.9, memory_budget=budget, **extra, **kw)


def _run_fields(run):
    return (run.passes, run.groups, run.streamed, run.steps, run.tokens, run.state_bytes, run.capacity_bytes,
            run.bound)


def _groups(fc, task="a"):
    return {k: v.clone().numpy() for k, v in fc.get_group_fisher(task).items()}


def _outcome(call):
    """(error type name, message) of what ``call`` raises; ('', '') when it returns."""
    try:
        call()
    except fisherstore.FisherStoreError as e:
        return type(e).__name__, str(e)
    return "", ""


def _gens(path, names):
    """The generation folders of each parameter (committed or not) on disk."""
    return {n: sorted(d for d in os.listdir(os.path.join(path, "a", n)) if d.startswith("g")) for n in names}


def rank_main(rank: int, world: int, init: str, root: str, conn) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        group = fisherstore.RankGroup.from_torch(timeout=60)  # a hang would surface as RankFailedError
        model = tiny_model("llama")
        mine = rank_batches(rank)
        out = {}

        # (1) each rank its own batches: a data-parallel multi-pass run
        fc = _collector(os.path.join(root, "union"), group)
        fc.collect_fisher(model, warm_batch(rank), task="a")
        fc.flush()
        run = fc.collect_fisher_dataset(model, mine, task="a", progress=False)
        out["union"] = (_run_fields(run), [n for n in fc.store.params("a") if fc.store.owns("a", n)], _groups(fc))
        fc.close()

        # (2) different numbers of batches: refused on every rank, known up front (lists) or in pass 1 (callables)
        path = os.path.join(root, "count")
        fc = _collector(path, group)
        fc.collect_fisher(model, warm_batch(rank), task="a")
        fc.flush()
        before = _groups(fc)
        short = mine if rank == 0 else mine[:2]
        listed = _outcome(lambda: fc.collect_fisher_dataset(model, short, task="a", progress=False))
        called = _outcome(lambda: fc.collect_fisher_dataset(model, lambda: iter(short), task="a", progress=False))
        owned = [n for n in fc.store.params("a") if fc.store.owns("a", n)]
        after = _groups(fc)
        out["count"] = (listed, called, fc.store.step("a"), _gens(path, owned),
                        before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before))
        fc.close()

        # (3) rank 1's batch 1 changes in pass 2: every rank rolls back, the group goes on
        path = os.path.join(root, "changed")
        fc = _collector(path, group)
        fc.collect_fisher(model, warm_batch(rank), task="a")
        fc.flush()
        before = _groups(fc)
        calls = {"n": 0}

        def changing():
            calls["n"] += 1
            if rank == 1 and calls["n"] > 1:
                return iter([mine[0], token_batch(n=2, seq=7, seed=999), mine[2]])
            return iter(mine)

        changed = _outcome(lambda: fc.collect_fisher_dataset(model, changing, task="a", progress=False))
        owned = [n for n in fc.store.params("a") if fc.store.owns("a", n)]
        after = _groups(fc)
        state = (fc.store.step("a"), fc.get_token_count("a"), _gens(path, owned),
                 before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before))
        rerun = fc.collect_fisher_dataset(model, mine, task="a", progress=False)  # from the last commit
        out["changed"] = (changed, calls["n"], state, _run_fields(rerun), _groups(fc))
        fc.close()

        # (4) fisher_type="mc": every pass draws the same labels, so the run equals its data-parallel steps
        runs = {}
        for way, budget in (("mc_multi", BUDGET), ("mc_steps", 1 << 30)):
            fc = _collector(os.path.join(root, way), group, budget, fisher_type="mc", seed=7)
            if way == "mc_multi":
                runs[way] = _run_fields(fc.collect_fisher_dataset(model, mine, task="a", progress=False))
            else:
                for b in mine:
                    fc.collect_fisher(model, b, task="a")
            fc.close()
        out["mc"] = runs

        # (5) data_parallel=False: every rank the same batches, each writing what it owns from its own gradients
        fc = _collector(os.path.join(root, "same"), group, data_parallel=False)
        run = fc.collect_fisher_dataset(model, rank_batches(0), task="a", progress=False)
        out["same"] = (_run_fields(run), [n for n in fc.store.params("a") if fc.store.owns("a", n)], _groups(fc))
        fc.close()
        dist.destroy_process_group()
        conn.send(("ok", out))
    except BaseException as e:  # report, so the parent fails with the cause instead of a hang
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Two gloo ranks run every scenario once, on one store per scenario; the tests check what they did."""
    root = tmp_path_factory.mktemp("mpranks")
    ctx = mp.get_context("forkserver")
    init = f"file://{root / 'rendezvous'}"
    procs, conns = [], []
    for rank in range(2):
        r, c = ctx.Pipe(duplex=False)
        p = ctx.Process(target=rank_main, args=(rank, 2, init, str(root), c))
        p.start()
        procs.append(p)
        conns.append(r)
    results = []
    for p, r in zip(procs, conns):
        assert r.poll(240), "a rank hung"
        results.append(r.recv())
        p.join(30)
    assert all(res[0] == "ok" for res in results), results
    return root, [res[1] for res in results]


def _single(path, batches, budget=BUDGET, warm=True):
    """One process on the union batches (after the union of the warm batches)."""
    model = tiny_model("llama")
    fc = _collector(path, budget=budget)
    if warm:
        fc.collect_fisher(model, union([[warm_batch(0)], [warm_batch(1)]])[0], task="a")
        fc.flush()
    run = fc.collect_fisher_dataset(model, batches, task="a", progress=False)
    return fc, run


def _check_store(path, single):
    """The store the ranks wrote holds, for every parameter, what one process wrote (fp32 tolerance)."""
    names = single.store.params("a")
    with fisherstore.open(str(path), mode="r") as d:
        assert d.step("a") == single.store.step("a")
        assert d.metadata("a")["tokens_seen"] == single.get_token_count("a")
        assert sorted(d.params("a")) == sorted(names)
        for n in names:
            want = single.full_fisher("a", n).load()
            assert want.abs().max() > 0 and _close(d.fisher("a", n).load(), want), n


def _check_groups(per_rank, single):
    """Each rank's group view holds exactly what it owns, as one process's."""
    want = single.get_group_fisher("a")
    owned = [set(o) for o, _ in per_rank]
    assert owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == set(single.store.params("a"))
    for rank, (mine, groups) in enumerate(per_rank):
        assert set(groups) == {k for k in want if k.split("|")[1] in mine}, rank
        for k, v in groups.items():
            assert _close(torch.from_numpy(v), want[k], rtol=1e-4), (rank, k)


def test_two_ranks_equal_one_process_on_the_union_batches(ranks, tmp_path):
    root, per_rank = ranks
    fields = [r["union"][0] for r in per_rank]
    assert fields[0] == fields[1]  # the same run on every rank: passes, groups, steps, tokens, bytes
    passes, groups, streamed, steps, tokens, state, capacity, bound = fields[0]
    assert passes > 1 and steps == STEPS and not streamed
    assert state == STATE and passes >= bound
    assert sorted(n for g in groups for n in g) == sorted(set(n for g in groups for n in g))  # each in one pass
    single, run = _single(tmp_path / "single", union([rank_batches(0), rank_batches(1)]))
    assert run.tokens == tokens and run.steps == STEPS
    assert single.store.step("a") == 1 + STEPS
    assert sorted(n for g in groups for n in g) == sorted(single.store.params("a"))
    _check_store(root / "union", single)
    _check_groups([(r["union"][1], r["union"][2]) for r in per_rank], single)
    single.close()


def test_ranks_with_different_numbers_of_batches_are_refused_on_every_rank(ranks):
    root, per_rank = ranks
    for rank, r in enumerate(per_rank):
        listed, called, step, gens, groups_kept = r["count"]
        # known up front: refused before anything is created, the same words on every rank
        assert listed[0] == "InvalidArgumentError", (rank, listed)
        assert "rank 0: 3, rank 1: 2" in listed[1] and "same number of batches" in listed[1]
        # a callable: found in pass 1, where rank 1 ran out at batch 2
        assert called[0] == "InvalidArgumentError", (rank, called)
        assert "found in pass 1 at batch 2 (rank 0: more than 2, rank 1: 2)" in called[1]
        assert "nothing was committed" in called[1]
        assert step == 1 and groups_kept, rank  # at the warm step's commit
        assert all(g == ["g00000001"] for g in gens.values()), (rank, gens)  # nothing the runs wrote is left
    with fisherstore.open(str(root / "count"), mode="r") as d:
        assert d.step("a") == 1


def test_a_batch_changed_on_one_rank_rolls_back_every_rank(ranks, tmp_path):
    root, per_rank = ranks
    errors = [r["changed"][0] for r in per_rank]
    assert errors[1][0] == "BatchesChangedError" and "pass 2" in errors[1][1] and "position 1" in errors[1][1]
    assert errors[0][0] == "RankFailedError", errors[0]
    assert "rank 1 failed to read batch 1 of pass 2" in errors[0][1] and "BatchesChangedError" in errors[0][1]
    for rank, r in enumerate(per_rank):
        _, calls, (step, tokens, gens, groups_kept), _, _ = r["changed"]
        assert calls >= 2
        assert step == 1 and groups_kept, rank
        assert all(g == ["g00000001"] for g in gens.values()), (rank, gens)
    # the rerun from the last commit, on the same group, equals an uninterrupted run
    fields = [r["changed"][3] for r in per_rank]
    assert fields[0] == fields[1] == tuple(r["union"][0] for r in per_rank[:1])[0]
    single, _ = _single(tmp_path / "single", union([rank_batches(0), rank_batches(1)]))
    _check_store(root / "changed", single)
    _check_groups([(r["union"][1], r["changed"][4]) for r in per_rank], single)
    single.close()


def test_mc_draws_the_same_labels_in_every_pass_on_every_rank(ranks):
    root, per_rank = ranks
    assert per_rank[0]["mc"]["mc_multi"][0] > 1
    with fisherstore.open(str(root / "mc_multi"), mode="r") as m, fisherstore.open(str(root / "mc_steps"),
                                                                                    mode="r") as s:
        assert m.step("a") == s.step("a") == STEPS
        assert m.metadata("a")["tokens_seen"] == s.metadata("a")["tokens_seen"]
        assert m.metadata("a")["fisher_type"] == "mc"
        for n in s.params("a"):
            want = s.fisher("a", n).load()
            assert want.abs().max() > 0 and _close(m.fisher("a", n).load(), want), n


def test_same_batches_on_every_rank_without_reduction(ranks, tmp_path):
    root, per_rank = ranks
    assert per_rank[0]["same"][0] == per_rank[1]["same"][0] and per_rank[0]["same"][0][0] > 1
    single, _ = _single(tmp_path / "single", rank_batches(0), warm=False)
    _check_store(root / "same", single)
    _check_groups([(r["same"][1], r["same"][2]) for r in per_rank], single)
    single.close()
