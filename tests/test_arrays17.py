"""Issue 17, arrays: per-sample gradients as an array (numpy, torch, Dask, iteration), and a multi-pass
run that compares every value of a batch between passes, floats included.

References are written apart from the code: per-sample gradients by one backward per
sequence, the EMA of a weighted loss by autograd and the formula of docs/design.md ("The EMA").
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fisherstore
from fisherstore import FisherCollector
from fisherstore.collect.batches import changed_keys, fingerprint
from fisherstore.errors import BatchesChangedError, SliceError
from fisherstore.losses import CausalLM, causal_lm
from tests.models import tiny_model, token_batch

Q = "model.layers.1.self_attn.q_proj.weight"
O = "model.layers.0.self_attn.o_proj.weight"  # noqa: E741 - the o projection, as everywhere in the project


# -- per-sample gradients as an array ---------------------------------------------------------------
def _per_sample_grads(model, batch, names):
    """Brute force: one backward of each sequence's token-summed loss alone."""
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        loss, _ = causal_lm(model, {k: v[i:i + 1] for k, v in batch.items()})
        loss.backward()
        for n in names:
            out[n].append(params[n].grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(g) for n, g in out.items()}


def _two_segments(path, backend, dtype=None):
    """Per-sample gradients of two batches (two stored segments) of a tiny llama; the brute-force reference."""
    model = tiny_model("llama")
    if dtype is not None:
        model = model.to(dtype)
    b1, b2 = token_batch(n=3, seq=7, seed=1), token_batch(n=2, seq=7, seed=2, lo=10)
    with FisherCollector(backend=backend, path=path, mode="w", micro_batch_size=2) as fc:
        fc.collect_samples(model, b1, task="a")
        fc.collect_samples(model, b2, task="a")
    both = {k: torch.cat([b1[k], b2[k]]) for k in b1}
    return _per_sample_grads(model, both, [Q, O])


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_lazy_samples_are_an_array_to_numpy_torch_and_iteration(tmp_path, backend):
    ref = _two_segments(str(tmp_path / "s"), backend)
    with fisherstore.open(tmp_path / "s", mode="r", backend=backend) as r:
        S = r.samples("a", Q)
        assert len(S) == 5 and S.shape == (5, 32, 32) and S.dtype == torch.float32
        eager = S.read()  # the eager read every other path must equal, bit for bit
        torch.testing.assert_close(eager, ref[Q], rtol=1e-5, atol=1e-9)
        a = np.asarray(S)
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (5, 32, 32)
        assert np.array_equal(a, eager.numpy())
        t = torch.as_tensor(S)
        assert t.dtype == torch.float32 and torch.equal(t, eager)
        assert torch.equal(torch.tensor(S), eager) and np.array_equal(np.array(S, dtype=np.float64),
                                                                         eager.double().numpy())
        rows = list(S)  # the iteration protocol: stops at len(S), across the two segments
        assert len(rows) == 5 and all(torch.equal(g, eager[i]) for i, g in enumerate(rows))
        # out of range is an IndexError, however it is asked; negatives count from the end
        for bad in (lambda: S[5], lambda: S[-6], lambda: S[[0, 5]], lambda: S[np.array([7])], lambda: S.read([5])):
            with pytest.raises(IndexError, match="out of range"):
                bad()
        with pytest.raises(SliceError, match="5 samples"):
            S[[5]]
        assert torch.equal(S[-1], eager[4]) and torch.equal(S[[-1, 0]], eager[[4, 0]])
        assert torch.equal(S[np.array([4, 1])], eager[[4, 1]]) and torch.equal(S[torch.tensor([2, 3]), 1:3],
                                                                                eager[[2, 3], 1:3])
        with pytest.raises(fisherstore.InvalidArgumentError, match="flatnonzero"):
            S[[True, False]]  # a mask is not read as the indices 1 and 0


def test_bfloat16_samples_keep_their_bits_in_numpy_and_torch(tmp_path):
    ref = _two_segments(str(tmp_path / "s"), "zarr", dtype=torch.bfloat16)
    with fisherstore.open(tmp_path / "s", mode="r") as r:
        S = r.samples("a", O)
        assert S.dtype == torch.bfloat16 and torch.equal(S.read(), ref[O])  # bit for bit (one backward each)
        t = torch.as_tensor(S)
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[O])
        a = np.asarray(S)
        assert a.dtype == np.dtype(ml_dtypes.bfloat16)  # numpy has no bfloat16 of its own
        assert np.array_equal(a.view(np.uint16), ref[O].view(torch.int16).numpy().view(np.uint16))
        assert np.array_equal(np.asarray(S, dtype=np.float32), ref[O].float().numpy())


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_to_dask_reads_one_stored_chunk_per_dask_chunk_and_equals_the_eager_read(tmp_path, backend):
    pytest.importorskip("dask.array")
    ref = _two_segments(str(tmp_path / "s"), backend)
    with fisherstore.open(tmp_path / "s", mode="r", backend=backend) as r:
        S = r.samples("a", Q)
        x = S.to_dask()
        lay = r.layout("a", Q)
        d = lay.head_dim  # q_proj rows are head blocks: a stored chunk is one sample by one head
        assert x.shape == (5, 32, 32) and x.dtype == np.float32 and x.chunksize == (1, d, 32)
        assert x.chunks[0] == (1,) * 5 and x.numblocks == (5, 32 // d, 1)
        before = r.io_counters()["chunk_files_read"]
        block = x.blocks[3, 2].compute()
        assert r.io_counters()["chunk_files_read"] - before == 1  # one Dask chunk: one chunk read
        assert np.array_equal(block, S.read([3])[:, 2 * d:3 * d].numpy())
        assert np.array_equal(x.compute(), S.read().numpy())
        # each sample's per-head mass of g², against the brute-force gradients
        mass = (x.astype(np.float64) ** 2).reshape(5, 32 // d, d, 32).sum(axis=(2, 3)).compute()
        want = (ref[Q].double() ** 2).reshape(5, 32 // d, d, 32).sum(dim=(2, 3))
        np.testing.assert_allclose(mass, want.numpy(), rtol=1e-5)
        # coarser chunks and another dtype, on request; the same graph twice has one name
        y = S.to_dask(chunks=(2, 32, 32), dtype="float64")
        assert y.dtype == np.float64 and y.chunks[0] == (2, 2, 1)
        assert np.array_equal(y.compute(), S.read().double().numpy())
        assert S.to_dask().name == x.name and y.name != x.name


def test_bfloat16_to_dask_is_in_the_stored_dtype(tmp_path):
    pytest.importorskip("dask.array")
    ref = _two_segments(str(tmp_path / "s"), "zarr", dtype=torch.bfloat16)
    with fisherstore.open(tmp_path / "s", mode="r") as r:
        x = r.samples("a", O).to_dask()
        assert x.dtype == np.dtype(ml_dtypes.bfloat16)
        assert np.array_equal(x.compute().astype(np.float32), ref[O].float().numpy())
        assert np.array_equal(r.samples("a", O).to_dask(dtype=np.float32).compute(), ref[O].float().numpy())


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_lazy_samples_on_s3_are_an_array(s3, backend):
    pytest.importorskip("dask.array")
    url = s3()
    ref = _two_segments(url, backend)
    with fisherstore.open(url, mode="r", backend=backend) as r:
        S = r.samples("a", Q)
        torch.testing.assert_close(torch.as_tensor(S), ref[Q], rtol=1e-5, atol=1e-9)
        eager = S.read()
        assert np.array_equal(np.asarray(S), eager.numpy()) and len(list(S)) == 5
        assert np.array_equal(S.to_dask().compute(), eager.numpy())
        with pytest.raises(IndexError):
            S[5]


# -- the multi-pass batch check: every value of a batch --------------------------------------------------
BETA = 0.9
STATE = 78464  # bytes of fp32 state of the tiny llama with params="all" (as in tests/test_multipass.py)
FOLD = 2 * 8192  # what the end-of-pass folds hold: a read chunk and a codec copy of the largest array


class WeightedCausalLM(CausalLM):
    """The causal-LM loss with a float weight per token: ``sum_t w_t * ce_t`` (T: the predicted tokens)."""

    name = "weighted_causal_lm"

    def __call__(self, model, batch):
        tgt = self.targets(batch)
        logits = self.logits(model, batch)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100,
                             reduction="none")
        return (ce * batch["weight"][:, 1:].reshape(-1)).sum(), int((tgt != -100).sum())


def _weighted_batches(seed=0):
    out = []
    for s in range(3):
        b = token_batch(n=3, seq=7, seed=s)
        b["weight"] = torch.rand(3, 7, generator=torch.Generator().manual_seed(100 + s + seed)) * 2
        out.append(b)
    return out


def _collector(path, passes):
    budget = STATE // passes + FOLD + 64 if passes > 1 else 1 << 30
    return FisherCollector(backend="zarr", path=path, mode="w", params="all", micro_batch_size=2, ema_decay=BETA,
                           memory_budget=budget, loss_fn=WeightedCausalLM())


def _ema_by_hand(model, batches, names):
    """docs/design.md's EMA of x = sum over micro-batches of (grad of the weighted loss sum)^2 / T, bias-corrected."""
    params = dict(model.named_parameters())
    state = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    for b in batches:
        T = int((b["attention_mask"][:, 1:] != 0).sum())
        x = {n: torch.zeros_like(state[n]) for n in names}
        for rows in (slice(0, 2), slice(2, 3)):
            mb = {k: v[rows] for k, v in b.items()}
            loss, _ = WeightedCausalLM()(model, mb)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    x[n] += g.double() ** 2
        for n in names:
            state[n] = BETA * state[n] + (1 - BETA) * x[n] / T
    return {n: s / (1 - BETA ** len(batches)) for n, s in state.items()}


def test_multi_pass_with_float_weights_is_exact_and_the_weights_count(tmp_path):
    model = tiny_model("llama")
    batches = _weighted_batches()
    got = {}
    for way, passes in (("multi", 3), ("steps", 1)):
        fc = _collector(tmp_path / way, passes)
        if way == "multi":
            run = fc.collect_fisher_dataset(model, lambda: iter(_weighted_batches()), task="a", progress=False)
            assert run.passes > 1 and run.steps == 3  # fresh, equal batches each pass: accepted
        else:
            for b in batches:
                fc.collect_fisher(model, b, task="a")
            fc.flush()
        got[way] = {n: fc.full_fisher("a", n).load() for n in fc.store.params("a")}
        fc.close()
    assert got["multi"].keys() == got["steps"].keys() and len(got["multi"]) > 10
    for n in got["steps"]:
        assert torch.equal(got["multi"][n], got["steps"][n]), n  # one pass per group is the one-pass run, exactly
    names = [Q, O, "model.embed_tokens.weight"]
    want = _ema_by_hand(model, batches, names)
    for n in names:
        torch.testing.assert_close(got["multi"][n].double(), want[n], rtol=1e-5, atol=1e-12)
    other = _ema_by_hand(model, _weighted_batches(seed=7), [Q])  # the weights change the Fisher
    assert not torch.allclose(other[Q], want[Q], rtol=1e-3)


@pytest.mark.parametrize("change", ["one ulp of a weight", "a weight's dtype", "a nested float"])
def test_multi_pass_refuses_a_float_value_that_changes_between_passes(tmp_path, change):
    model = tiny_model("llama")
    fc = _collector(tmp_path / "s", 3)
    fc.collect_fisher(model, token_batch(n=2, seq=7, seed=99) | {"weight": torch.ones(2, 7)}, task="a")
    fc.flush()
    before = {n: fc.full_fisher("a", n, bias_corrected=False).load() for n in fc.store.params("a")}
    calls = {"n": 0}

    def batches():
        calls["n"] += 1
        bs = _weighted_batches()
        for b in bs:
            b["extra"] = {"scale": [1.0, 2.0]}
        if calls["n"] == 2:  # pass 2 sees batch 1 changed in a float the loss (or a hook) could read
            w = bs[1]["weight"]
            if change == "one ulp of a weight":
                w[0, 3] = torch.nextafter(w[0, 3], torch.tensor(10.0))
            elif change == "a weight's dtype":
                bs[1]["weight"] = w.double()
            else:
                bs[1]["extra"]["scale"][1] = 2.0000000001
        return iter(bs)

    key = "extra" if change == "a nested float" else "weight"
    with pytest.raises(BatchesChangedError, match=rf"pass 2 .* position 1 than pass 1: the values of '{key}' changed"):
        fc.collect_fisher_dataset(model, batches, task="a", progress=False)
    assert fc.store.step("a") == 1  # rolled back to the last commit
    for n, F0 in before.items():
        assert torch.equal(fc.full_fisher("a", n, bias_corrected=False).load(), F0), n
    fc.close()


def test_fingerprint_sees_every_value_and_only_values():
    base = {"input_ids": torch.arange(6).view(2, 3), "weight": torch.rand(2, 3), "bf": torch.rand(2, 3).bfloat16(),
            "np": np.linspace(0, 1, 6).reshape(2, 3), "nested": {"a": [1, "x", None, 2.5], "b": (True, b"\x00")},
            "label": "math", "n": 3}
    fp = fingerprint(base)
    assert [k for k, _ in fp] == sorted(base)
    # the same values: a copy, another key order, a non-contiguous tensor of the same values
    same = {k: base[k] for k in reversed(list(base))}
    same["weight"] = base["weight"].t().contiguous().t()
    assert not same["weight"].is_contiguous() and fingerprint(same) == fp
    bump = lambda t: torch.nextafter(t, t + 1)  # noqa: E731 - one ulp up
    changes = {
        "weight": bump(base["weight"]),
        "bf": (base["bf"].float() * 1.01).bfloat16(),
        "input_ids": base["input_ids"].int(),  # same numbers, another dtype
        "np": base["np"].reshape(3, 2),  # same bytes, another shape
        "nested": {"a": [1, "x", None, 2.5000001], "b": (True, b"\x00")},
        "label": "code",
        "n": 3.0,  # an int and a float are not the same value to a loss
    }
    for key, value in changes.items():
        assert changed_keys(fp, fingerprint(base | {key: value})) == [key], key
    assert changed_keys(fp, fingerprint(base | {"new": 1})) == ["new"]


def _same_batch_rank(rank: int, world: int, init: str, root: str, conn) -> None:
    """A gloo rank of a data_parallel=False run whose batch differs from rank 0's in one ulp of a float weight."""
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        group = fisherstore.RankGroup.from_torch()
        model = tiny_model("llama")
        batch = _weighted_batches()[0]
        fc = FisherCollector(backend="zarr", path=root, mode="w", micro_batch_size=2, group=group,
                             data_parallel=False, loss_fn=WeightedCausalLM())
        fc.collect_fisher(model, batch, task="t")  # the same batch: accepted
        if rank == 1:
            batch["weight"][2, 5] = torch.nextafter(batch["weight"][2, 5], torch.tensor(10.0))
        try:
            fc.collect_fisher(model, batch, task="t")
            refused = ""
        except fisherstore.InvalidArgumentError as e:
            refused = str(e)
        step = fc.store.step("t")
        fc.close()
        dist.destroy_process_group()
        conn.send(("ok", refused, step))
    except BaseException as e:  # report, so the parent fails with the cause instead of a hang
        conn.send(("error", f"{type(e).__name__}: {e}", -1))


def test_ranks_told_they_see_the_same_batch_compare_its_floats_too(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs, conns = [], []
    for rank in range(2):
        r, c = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_same_batch_rank, args=(rank, 2, init, str(tmp_path / "s"), c))
        p.start()
        procs.append(p)
        conns.append(r)
    results = []
    for p, r in zip(procs, conns):
        assert r.poll(300), "a rank hung"
        results.append(r.recv())
        p.join(30)
    for status, refused, step in results:
        assert status == "ok", refused
        assert "rank 1's batch differs from rank 0's (in 'weight')" in refused and step == 1
