"""When one rank of a gloo group fails, dies or hangs inside ``with FisherCollector(group=...)``.

Rank 1's own error must come out of its ``with`` block unchanged; rank 0 must get a
:class:`fisherstore.RankFailedError` naming rank 1 (never a raw gloo error, never a hang),
within a bounded time; and the store must reopen at its last commit with the values a
brute-force reference computes by hand (autograd of a hand-written loss, the EMA formula).
Each case runs two real gloo processes; the parent's timeouts turn a regression into a
failure instead of a hang.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time

import pytest
import torch

import fisherstore
from fisherstore.engine.dist import DEFAULT_TIMEOUT_S, collective_timeout
from fisherstore.verify import verify_store

BETA = 0.99
COMMITTED = 2  # steps flushed before anything goes wrong
MB = 2  # sequences per batch and per micro-batch: one micro-batch per rank and step


def rank_batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    from tests.models import token_batch

    return token_batch(n=MB, seq=6, seed=100 * step + rank, pad_last=False)


def hand_loss(model, batch):
    """The token-summed next-token cross entropy, written here apart from fisherstore.losses."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pred, target = logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(pred.float(), target, reduction="sum"), int(target.numel())


def failing_loss(rank: int, how: str, at_step: int, counts: bool = False):
    """Rank 1's loss: the hand loss, except at call ``at_step`` (1-based) it raises, or the process dies.

    ``counts``: it can count a batch's tokens up front, so each micro-batch streams to the store.
    """
    calls = [0]

    def loss(model, batch):
        calls[0] += 1
        if rank == 1 and calls[0] == at_step:
            if how == "kill":
                os._exit(17)  # no cleanup, no message: as a SIGKILL or an OOM kill would leave it
            raise RuntimeError(f"rank 1's loss failed at step {at_step}")
        return hand_loss(model, batch)

    if counts:
        loss.count_tokens = lambda batch: batch["input_ids"][:, 1:].numel()
    return loss


def worker(rank: int, case: dict, init: str, path: str, conn) -> None:
    """One rank: two committed steps, a third left in RAM, then rank 1 fails as ``case`` says."""
    import torch.distributed as dist

    from tests.models import tiny_model

    outcome = None
    waited = 0.0
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        group = fisherstore.RankGroup.from_torch(timeout=case.get("timeout"))
        model = tiny_model("llama")
        loss = failing_loss(rank, case["rank1"], at_step=COMMITTED + 2, counts=case.get("path") == "streamed")
        same = case.get("path") in ("summed", "streamed")  # model parallel: every rank sees rank 0's batch
        src = 0 if same else rank
        try:
            with fisherstore.FisherCollector(backend=case["backend"], path=path, mode="w", micro_batch_size=MB,
                                             ema_decay=BETA, loss_fn=loss, group=group, data_parallel=not same,
                                             memory_budget=case.get("budget")) as fc:
                for step in range(COMMITTED):
                    fc.collect_fisher(model, rank_batch(src, step), task="t")
                fc.flush()
                fc.collect_fisher(model, rank_batch(src, COMMITTED), task="t")  # applied, never committed
                if rank == 1 and case["rank1"] == "raise":
                    raise ValueError("rank 1's own bug, after step 3")
                if rank == 1 and case["rank1"] == "hang":
                    time.sleep(600)  # stuck in its own code; the parent kills it
                start = time.monotonic()
                try:
                    if rank == 1 or case["rank0"] == "step":
                        fc.collect_fisher(model, rank_batch(src, COMMITTED + 1), task="t")
                finally:
                    waited = time.monotonic() - start
                # rank 0 with rank0 == "close": leaving the block normally flushes, collectively
        except BaseException as e:  # what came out of the `with` block, as the user sees it
            outcome = (type(e).__name__, str(e), getattr(e, "rank", "-"), isinstance(e, fisherstore.RankFailedError))
        conn.send(("done", outcome, waited))
    except BaseException as e:  # report, so the parent fails with the cause instead of a hang
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 0.0))


def going_on_worker(rank: int, case: dict, init: str, path: str, conn) -> None:
    """No `with`: each rank catches what step 4 raised and goes on with step 5, then closes (a commit)."""
    import torch.distributed as dist

    from tests.models import tiny_model

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        group = fisherstore.RankGroup.from_torch()
        model = tiny_model("llama")
        same = case["path"] != "data_parallel"
        fc = fisherstore.FisherCollector(backend="zarr", path=path, mode="w", micro_batch_size=MB, ema_decay=BETA,
                                         loss_fn=failing_loss(rank, "raise", 4, counts=case["path"] == "streamed"),
                                         group=group, data_parallel=not same)
        outcome = None
        for step in range(5):
            try:
                fc.collect_fisher(model, rank_batch(0 if same else rank, step), task="t")
            except Exception as e:
                outcome = (type(e).__name__, str(e), getattr(e, "rank", "-"), isinstance(e, fisherstore.RankFailedError))
        fc.close()
        conn.send(("done", outcome, 0.0))
    except BaseException as e:
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 0.0))


def out_of_step_worker(rank: int, case: dict, init: str, path: str, conn) -> None:
    """After two committed steps, rank 0 flushes while rank 1 runs a step: different collectives."""
    import torch.distributed as dist

    from tests.models import tiny_model

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        group = fisherstore.RankGroup.from_torch()
        model = tiny_model("llama")
        fc = fisherstore.FisherCollector(backend="zarr", path=path, mode="w", micro_batch_size=MB, ema_decay=BETA,
                                         loss_fn=hand_loss, group=group)
        for step in range(COMMITTED):
            fc.collect_fisher(model, rank_batch(rank, step), task="t")
        fc.flush()
        outcome = None
        try:
            if rank == 0:
                fc.flush()  # nothing new here, but a flush is collective all the same
            else:
                fc.collect_fisher(model, rank_batch(rank, COMMITTED), task="t")
        except Exception as e:
            outcome = (type(e).__name__, str(e), getattr(e, "rank", "-"), isinstance(e, fisherstore.RankFailedError))
        fc.close()  # the group saw the failure: no collective, no commit, the store's resources released
        conn.send(("done", outcome, 0.0))
    except BaseException as e:
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 0.0))


def run_ranks(tmp_path, case: dict, limit: float = 120.0, target=worker):
    """Spawn both ranks; every rank that lives reports within ``limit`` seconds or the test fails."""
    ctx = mp.get_context("forkserver")
    path = str(tmp_path / "store")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs, conns = [], []
    for rank in range(2):
        r, c = ctx.Pipe(duplex=False)
        p = ctx.Process(target=target, args=(rank, case, init, path, c))
        p.start()
        procs.append(p)
        conns.append(r)
    results: list = [None, None]
    try:
        deadline = time.monotonic() + limit
        for rank, r in enumerate(conns):
            if case["rank1"] in ("kill", "hang") and rank == 1:
                continue
            assert r.poll(max(1.0, deadline - time.monotonic())), f"rank {rank} hung (case {case})"
            results[rank] = r.recv()
            assert results[rank][0] == "done", results[rank][1]
        if case["rank1"] == "kill":
            procs[1].join(30)
            assert procs[1].exitcode == 17, procs[1].exitcode
        procs[0].join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    return path, results


def reference(names: list[str], same: bool = False, steps: tuple[int, ...] = tuple(range(COMMITTED))
              ) -> tuple[dict[str, torch.Tensor], int]:
    """The bias-corrected EMA of the batches of ``steps``, by hand: x_t = Σ g²/T_t, A_t = βA_{t-1} + (1-β)x_t.

    The sum runs over both ranks' batches (data parallel: the union batch), or, with ``same``,
    over the one batch every rank saw (each parameter written by its owner from it).
    """
    from tests.models import tiny_model

    model = tiny_model("llama")
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    tokens = 0
    for step in steps:
        sq = {n: torch.zeros_like(acc[n]) for n in names}
        T = 0
        for rank in (0,) if same else (0, 1):
            loss, n_tok = hand_loss(model, rank_batch(rank, step))
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            for n, g in zip(names, grads):
                sq[n] += g.double() ** 2
            T += n_tok
        for n in names:
            acc[n] = BETA * acc[n] + (1 - BETA) * sq[n] / T
        tokens += T
    return {n: a / (1 - BETA ** len(steps)) for n, a in acc.items()}, tokens


def check_store_at_last_commit(path: str, backend: str, leftovers: bool = False, same: bool = False) -> None:
    """A reader sees step 2 and its exact values; a new writer opens (the lock was released) and cleans up.

    ``leftovers``: the steps after the commit streamed generations (memory_budget=0), which
    the new writer's recovery removes, saying so.
    """
    with fisherstore.open(path, mode="r", backend=backend) as r:
        names = r.params("t")
        assert r.step("t") == COMMITTED
        want, tokens = reference(names, same)
        assert r.metadata("t")["tokens_seen"] == tokens == COMMITTED * (1 if same else 2) * MB * 5
        for n in names:
            got = r.fisher("t", n).load().double()
            assert want[n].abs().max() > 0
            assert torch.allclose(got, want[n], rtol=1e-5, atol=1e-6 * float(want[n].abs().max())), n
    with pytest.warns(fisherstore.RecoveryWarning, match="rolled back") if leftovers else contextlib.nullcontext():
        with fisherstore.open(path, mode="a", backend=backend) as w:  # rank 0 released the writer lock
            assert w.step("t") == COMMITTED
    report = verify_store(path, backend=backend)
    assert report.ok, report


def assert_names_rank_1(outcome, *words: str) -> None:
    name, msg, rank, is_rank_failed = outcome
    assert is_rank_failed and name == "RankFailedError", outcome
    assert rank == 1 and "rank 1" in msg, outcome
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("backend,rank0", [("zarr", "step"), ("tensorstore", "close")])
def test_rank_1s_own_error_stays_its_own_and_rank_0_gets_rank_failed(tmp_path, backend, rank0):
    """Rank 1 raises in its own code inside the block; rank 0 is in its next step, or closing."""
    case = dict(backend=backend, rank1="raise", rank0=rank0)
    path, (r0, r1) = run_ranks(tmp_path, case)
    assert r1[1] == ("ValueError", "rank 1's own bug, after step 3", "-", False)
    assert_names_rank_1(r0[1], "ValueError: rank 1's own bug, after step 3", "last commit")
    check_store_at_last_commit(path, backend)


@pytest.mark.parametrize("path", ["data_parallel", "summed", "streamed"])
def test_an_error_in_rank_1s_loss_inside_a_step_stays_its_own(tmp_path, path):
    """The error comes out of collect_fisher on rank 1 (a RuntimeError, like gloo's, and still its own).

    Each way a step runs: data parallel (reduced onto owners); the same batch on every rank,
    summed then fed (a loss without count_tokens) or streamed per micro-batch (with it).
    """
    store, (r0, r1) = run_ranks(tmp_path, dict(backend="zarr", rank1="loss", rank0="step", path=path))
    assert r1[1] == ("RuntimeError", "rank 1's loss failed at step 4", "-", False)
    assert_names_rank_1(r0[1], "RuntimeError: rank 1's loss failed at step 4")
    check_store_at_last_commit(store, "zarr", same=path != "data_parallel")


@pytest.mark.parametrize("path", ["data_parallel", "summed", "streamed"])
def test_after_an_error_every_rank_saw_the_ranks_go_on_in_step(tmp_path, path):
    """Step 4 fails on rank 1 only; every rank discards it (not rank 0 alone), and step 5 lands on all of them."""
    store, (r0, r1) = run_ranks(tmp_path, dict(rank1="raise", path=path), target=going_on_worker)
    assert r1[1] == ("RuntimeError", "rank 1's loss failed at step 4", "-", False)
    assert_names_rank_1(r0[1], "RuntimeError: rank 1's loss failed at step 4", "step 4")
    same = path != "data_parallel"
    with fisherstore.open(store, mode="r") as r:
        names = r.params("t")
        want, tokens = reference(names, same, steps=(0, 1, 2, 4))
        assert r.step("t") == 4 and r.metadata("t")["tokens_seen"] == tokens
        for n in names:
            assert r.metadata("t")["params"][n]["updates"] == 4, n  # no rank applied step 4 alone
            want_n, got = want[n], r.fisher("t", n).load().double()
            assert torch.allclose(got, want_n, rtol=1e-5, atol=1e-6 * float(want_n.abs().max())), n


def test_ranks_that_reach_different_collectives_both_fail_instead_of_pairing_them(tmp_path):
    """Rank 0 flushes while rank 1 steps (before: rank 0's gather got rank 1's agreement, a TypeError)."""
    store, (r0, r1) = run_ranks(tmp_path, dict(rank1="out of step"), target=out_of_step_worker)
    for mine, other, outcome in ((0, 1, r0[1]), (1, 0, r1[1])):
        name, msg, rank, is_rank_failed = outcome
        assert is_rank_failed and rank == other, outcome
        assert f"the ranks are out of step: rank {other} reached a collective" in msg, msg
        assert f"while rank {mine} was to" in msg, msg
        assert "every rank must make the same calls in the same order" in msg
    check_store_at_last_commit(store, "zarr")


def test_a_rank_killed_mid_step_leaves_the_survivor_a_rank_failed_error(tmp_path):
    """Rank 1 dies inside its loss (os._exit) during step 4; steps 3 and 4 streamed uncommitted generations."""
    path, (r0, _) = run_ranks(tmp_path, dict(backend="zarr", rank1="kill", rank0="step", budget=0))
    assert_names_rank_1(r0[1], "stopped answering")
    assert r0[2] < 60  # the peer's closed connection, seen at once: not the 600 s default timeout
    check_store_at_last_commit(path, "zarr", leftovers=True)


def test_a_rank_that_hangs_is_reported_after_the_collective_timeout(tmp_path):
    """Rank 1 never reaches the next collective; rank 0 gives up after timeout=3 s."""
    path, (r0, _) = run_ranks(tmp_path, dict(backend="zarr", rank1="hang", rank0="step", timeout=3))
    assert_names_rank_1(r0[1], "stopped answering", "3 s collective timeout")
    assert 2.5 <= r0[2] < 45, r0[2]  # waited for the timeout, and not much longer
    check_store_at_last_commit(path, "zarr")


def test_the_collective_timeout_option(monkeypatch):
    monkeypatch.delenv("FISHERSTORE_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == DEFAULT_TIMEOUT_S == 600.0
    assert collective_timeout(5) == 5.0
    monkeypatch.setenv("FISHERSTORE_COLLECTIVE_TIMEOUT", "42.5")
    assert collective_timeout() == 42.5 and collective_timeout(7) == 7.0  # the argument wins
    for bad in (0, -1, float("inf"), "soon"):
        with pytest.raises(fisherstore.InvalidArgumentError, match="timeout must be a positive number of seconds"):
            collective_timeout(bad)
    monkeypatch.setenv("FISHERSTORE_COLLECTIVE_TIMEOUT", "never")
    with pytest.raises(fisherstore.InvalidArgumentError, match=r"\$FISHERSTORE_COLLECTIVE_TIMEOUT must be"):
        collective_timeout()


def test_a_group_of_one_has_nothing_to_leave():
    g = fisherstore.RankGroup.solo()
    g.leave(ValueError("mine"))  # no peer to tell: a no-op, and the group stays usable
    assert g.failed is None and g.all_gather(3) == [3] and g.agree(None, "x") is None


def store_worker(rank: int, case: dict, init: str, path: str, conn) -> None:
    """The plain store API: `with fisherstore.open(..., group=g)`; rank 1 raises inside after one flush."""
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        group = fisherstore.RankGroup.from_torch()
        outcome = None
        try:
            with fisherstore.open(path, mode="w", group=group, decay=BETA) as s:
                for name in ("a", "b"):  # rank 0 owns "a", rank 1 owns "b" (round robin)
                    s.create("t", name, (4, 3))
                s.update("t", {n: torch.full((4, 3), 1.0) for n in ("a", "b") if s.owns("t", n)})
                s.flush()
                s.update("t", {n: torch.full((4, 3), 2.0) for n in ("a", "b") if s.owns("t", n)})  # never committed
                if rank == 1:
                    raise ValueError("rank 1's own bug, inside the store's with block")
                s.flush()
        except BaseException as e:
            outcome = (type(e).__name__, str(e), getattr(e, "rank", "-"), isinstance(e, fisherstore.RankFailedError))
        conn.send(("done", outcome, 0.0))
    except BaseException as e:
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 0.0))


def test_the_plain_store_api_leaves_the_group_on_an_error_too(tmp_path):
    _, out = run_ranks(tmp_path, {"rank1": "raise"}, target=store_worker)
    assert out[1][1][:2] == ("ValueError", "rank 1's own bug, inside the store's with block")
    name, msg, rank, is_failed = out[0][1]
    assert is_failed and rank == 1 and "rank 1" in msg, out[0]
    with fisherstore.open(str(tmp_path / "store"), mode="r") as r:  # at the one commit, step 1: x = 1 everywhere
        assert r.step("t") == 1
        for n in ("a", "b"):
            assert torch.allclose(r.read("t", n), torch.ones(4, 3))
