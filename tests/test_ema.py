"""EMA exactness: DESIGN §2 and research/tensorscope.md §6 cases 17-21, on every backend."""

import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fisherstore
from fisherstore import PrecisionError
from fisherstore.spec.ema import accumulate_, bias_correction, fold, readout_scale, step_weight

SHAPES = {"a": (6, 5), "b": (4,)}


@st.composite
def runs(draw):
    beta = draw(st.sampled_from([0.5, 0.9, 0.99]))
    n_steps = draw(st.integers(1, 7))
    steps = []
    for _ in range(n_steps):
        present = draw(st.sets(st.sampled_from(sorted(SHAPES))))
        seed = draw(st.integers(0, 2**16))
        tokens = draw(st.sampled_from([None, 1, 7, 512]))
        flush = draw(st.booleans())
        steps.append((sorted(present), seed, tokens, flush))
    budget = draw(st.sampled_from(["all", "none", "mixed"]))
    return beta, steps, budget


def reference(beta, steps):
    """float64 EMA, eager decay, F_0 = 0: the definition, not our implementation."""
    F = {n: np.zeros(s) for n, s in SHAPES.items()}
    for present, seed, tokens, _ in steps:
        xs = inputs(present, seed)
        for n in SHAPES:
            x = xs[n].double().numpy() / (tokens or 1) if n in xs else 0.0
            F[n] = beta * F[n] + (1 - beta) * x
    return F


def inputs(present, seed):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed, positive: grad² spans decades
    return {n: (torch.randn(SHAPES[n], generator=g) * torch.exp(2 * torch.randn(SHAPES[n], generator=g))) ** 2
            for n in present}


def run_store(backend, beta, steps, budget, path):
    a_bytes = 4 * int(np.prod(SHAPES["a"]))
    # "mixed": a plan for a tiny budget gives 3/4 of it to the resident set, which then
    # holds exactly parameter a (accumulator + staging), and b streams.
    mb = {"all": 1 << 30, "none": 0, "mixed": (2 * a_bytes * 4 + 2) // 3}[budget]
    store = fisherstore.open(path, mode="w", backend=backend, decay=beta, memory_budget=mb)
    for n, s in SHAPES.items():
        store.create("t", n, s)
    for present, seed, tokens, flush in steps:
        store.update("t", {n: x.numpy() if n == "b" else x for n, x in inputs(present, seed).items()}, tokens=tokens)
        if flush:
            store.flush()
    return store


@pytest.mark.parametrize("backend", ["ram", "zarr", "tensorstore"])
def test_ema_matches_float64_reference(backend):
    @settings(max_examples=30 if backend == "ram" else 15, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(runs())
    def check(run):
        beta, steps, budget = run
        with tempfile.TemporaryDirectory() as d:
            store = run_store(backend, beta, steps, budget, os.path.join(d, "s"))
            ref = reference(beta, steps)
            t = len(steps)
            for n in SHAPES:
                raw = store.fisher("t", n, bias_corrected=False).load().numpy()
                np.testing.assert_allclose(raw, ref[n], rtol=2e-6, atol=1e-30)
                hat = store.fisher("t", n).load().numpy()
                np.testing.assert_allclose(hat, ref[n] / (1 - beta**t), rtol=2e-6, atol=1e-30)
            if backend != "ram":  # what was flushed and reopened is the same again
                store.close()
                with fisherstore.open(os.path.join(d, "s"), mode="r", backend=backend) as r:
                    assert r.step("t") == t
                    for n in SHAPES:
                        np.testing.assert_allclose(r.fisher("t", n, bias_corrected=False).load().numpy(),
                                                   ref[n], rtol=2e-6, atol=1e-30)
            else:
                store.close()

    check()


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_case17_constant_input_reads_back_as_itself(open_store, backend, steps):
    s = open_store(backend, decay=0.99)
    s.create("t", "w", (3, 4))
    for i in range(steps):
        s.update("t", {"w": torch.ones(3, 4)})
        if i % 3 == 1:
            s.flush()
    assert torch.allclose(s.fisher("t", "w").load(), torch.ones(3, 4), rtol=1e-6)
    s.close()


def test_case18_bias_correction_values(open_store, backend):
    s = open_store(backend, decay=0.5)
    s.create("t", "w", (2,))
    s.update("t", {"w": torch.full((2,), 4.0)})
    assert torch.allclose(s.fisher("t", "w")[0], torch.tensor(4.0))
    s.update("t", {"w": torch.zeros(2)})
    assert torch.allclose(s.fisher("t", "w")[0], torch.tensor(4 / 3))


def test_case19_lazy_decay_and_untouched_chunks_not_rewritten(open_store, disk_backend):
    s = open_store(disk_backend, decay=0.9, memory_budget=0)
    s.create("t", "a", (8, 4), chunks=(2, 4))
    s.create("t", "b", (8, 4), chunks=(2, 4))
    s.update("t", {"a": torch.ones(8, 4), "b": torch.ones(8, 4)})
    s.flush()
    chunk_dir = os.path.join(s.path, "t", "a", "g00000001", "c")
    before = {f: os.stat(os.path.join(chunk_dir, f, "0")) for f in os.listdir(chunk_dir)}
    for _ in range(3):  # steps 2-4: only b
        s.update("t", {"b": torch.ones(8, 4)})
        s.flush()
    after = {f: os.stat(os.path.join(chunk_dir, f, "0")) for f in os.listdir(chunk_dir)}
    assert {f: (st_.st_ino, st_.st_mtime_ns) for f, st_ in before.items()} == \
           {f: (st_.st_ino, st_.st_mtime_ns) for f, st_ in after.items()}
    s.update("t", {"a": torch.ones(8, 4)})  # step 5
    raw = s.fisher("t", "a", bias_corrected=False)[0, 0]
    assert abs(float(raw) - (0.1 * 0.9**4 + 0.1)) < 1e-7  # 0.16561


def test_case20_token_normalisation(open_store, backend):
    s = open_store(backend)
    s.create("t", "w", (4, 4))
    s.update("t", {"w": torch.ones(4, 4)}, tokens=512)
    assert float(s.fisher("t", "w")[1, 1]) == pytest.approx(0.001953125, rel=1e-6)
    assert s.metadata("t")["tokens_seen"] == 512
    s.close()
    if backend != "ram":
        with fisherstore.open(s.path, mode="r", backend=backend) as r:
            assert r.metadata("t")["tokens_seen"] == 512


def test_case21_small_values_keep_precision_and_fp16_is_refused(open_store, backend, tmp_path):
    s = open_store(backend)
    s.create("t", "w", (3,))
    s.update("t", {"w": torch.full((3,), 1e-8)})
    s.flush()
    assert float(s.fisher("t", "w")[0]) == pytest.approx(1e-8, rel=1e-2)
    for dt in ("float16", torch.float16, torch.bfloat16):
        with pytest.raises(PrecisionError, match="refused"):
            fisherstore.open(tmp_path / "h", mode="w", backend=backend, dtype=dt)


def test_fold_equals_per_step_updates():
    torch.manual_seed(0)
    beta, F0 = 0.97, torch.rand(50)
    xs = [torch.rand(50) for _ in range(6)]
    eager = F0.clone()
    for x in xs:
        eager = beta * eager + (1 - beta) * x
    A = torch.zeros(50)
    for i, x in enumerate(xs):
        accumulate_(A, step_weight(beta) * x, beta, steps_since=0 if i == 0 else 1)
    assert torch.allclose(fold(F0.clone(), A, beta, len(xs)), eager, rtol=1e-6)
    assert readout_scale(beta, 0, 0, True) == 0.0  # nothing observed: 0, not 0/0
    assert bias_correction(beta, 1) == pytest.approx(1 - beta)
