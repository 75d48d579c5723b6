"""Phase 6 out of core (issue 10): per-sample gradients on disk, the contribution Fisher, the heat map.

Real tiny Hugging Face models, real Zarr / TensorStore stores; the in-RAM path
(`FisherCollector.sample_gradients` + `QKOVInterference.heatmap`) is the reference.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fisherstore
from fisherstore import FisherCollector, ParamLayout
from fisherstore.compat import TensorScopeAdapter
from fisherstore.phase6 import compare_fishers, contribution_mean, plot_comparison, weighted_gram
from fisherstore.qkov import QKOVIndexer, QKOVInterference
from fisherstore.verify import verify_store
from tests.models import tiny_model, token_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collect(tmp_path, arch, backend="zarr", dtype=None):
    model = tiny_model(arch)
    if dtype is not None:
        model = model.to(dtype)
    fc = FisherCollector(backend=backend, path=tmp_path / f"{arch}-{backend}", mode="w", micro_batch_size=2)
    ba, bb = token_batch(n=3, seq=7, seed=1), token_batch(n=4, seq=7, seed=2, lo=10)
    fc.collect_fisher(model, ba, task="a")
    fc.collect_samples(model, ba, task="a")
    fc.collect_samples(model, bb, task="b")
    return fc, model, ba, bb


@pytest.mark.parametrize("arch,backend", [("llama", "zarr"), ("gpt2", "zarr"), ("pythia", "zarr"),
                                          ("llama", "tensorstore")])
def test_out_of_core_heatmap_equals_the_in_ram_one(tmp_path, arch, backend):
    fc, model, ba, bb = _collect(tmp_path, arch, backend)
    qk = QKOVInterference(QKOVIndexer.from_model(model))
    ram_a, ram_b = fc.sample_gradients(model, ba), fc.sample_gradients(model, bb)
    names = list(ram_a.grads)
    for fisher in ("ema", "contribution"):
        F = fc.full_fisher("a") if fisher == "ema" else {n: ram_a.contributions()[n].mean(0) for n in names}
        want = qk.heatmap(ram_a.contributions(), ram_b.signed(), F)
        got = qk.heatmap_from_store(fc.store, "a", "b", fisher=fisher)
        assert got["layers"] == want["layers"] and got["heads"] == want["heads"]
        for b in "QKVO":
            assert got["scores"][b].shape == (3, 4, len(want["layers"]), len(want["heads"]))
            torch.testing.assert_close(got["scores"][b], want["scores"][b], rtol=1e-5, atol=1e-12)
            assert abs(got[b] - want[b]).max() <= 1e-5 * abs(want[b]).max()
        top = got["top_conflicts"]["Q"][0]
        assert top["sample_i"] in fc.store.sample_ids("a") and top["sample_j"] in fc.store.sample_ids("b")
        assert top["score"] == pytest.approx(float(got["scores"]["Q"].max()))
    # a subset of layers and heads reads only their chunks and scores the same
    sub = qk.heatmap_from_store(fc.store, "a", "b", fisher="contribution", layers=[qk.indexer.layers[-1]], heads=[1],
                                blocks="K")
    torch.testing.assert_close(sub["scores"]["K"][:, :, 0, 0], got["scores"]["K"][:, :, -1, 1])
    fc.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", [7, 64, 10_000])  # ragged last tile, exact tiles, one tile
def test_the_fused_tiled_score_equals_the_plain_formula(dtype, tile):
    g = torch.Generator().manual_seed(1)
    g_a = torch.randn(3, 8, 16, generator=g).to(dtype)
    g_b = torch.randn(5, 8, 16, generator=g).to(dtype)
    w = torch.rand(8, 16, generator=g) + 0.1
    a, b = g_a.double().reshape(3, -1), g_b.double().reshape(5, -1)
    want = (a.square() * w.double().reshape(1, -1)) @ b.abs().T
    got = weighted_gram(g_a, g_b, w, torch.device("cpu"), tile=tile)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert g_a.dtype == dtype and torch.equal(g_a.double().reshape(3, -1), a)  # the inputs are left alone
    tokens = torch.tensor([3, 0, 5])  # T = 0 counts as 1, as everywhere
    f32 = torch.randn(3, 8, 16, generator=g)
    before = f32.clone()
    want_mean = (f32.double().square() / tokens.clamp_min(1).double().view(-1, 1, 1)).mean(0)
    torch.testing.assert_close(contribution_mean(f32, tokens).double(), want_mean, rtol=1e-6, atol=0)
    assert torch.equal(f32, before)  # an fp32 block is the caller's: not squared in place


def test_contribution_fisher_is_the_mean_of_g_squared_over_t(tmp_path):
    fc, model, ba, _ = _collect(tmp_path, "llama")
    ram = fc.sample_gradients(model, ba)
    for name, g in ram.grads.items():
        T = ram.tokens.float().view(-1, *[1] * (g.ndim - 1))
        want = (g.double() ** 2 / T).mean(0).float()
        F = fc.store.contribution_fisher("a", name)
        torch.testing.assert_close(F.load(), want, rtol=1e-6, atol=1e-12)
        lay = fc.store.layout("a", name)
        torch.testing.assert_close(F.head(1, lay.blocks[0]), want[lay.head_index(1, lay.blocks[0], 2)])
    assert fc.store.sample_tokens("a").tolist() == ram.tokens.tolist()
    fc.close()


def test_samples_are_stored_in_the_gradients_own_dtype_losslessly(tmp_path):
    fc, model, ba, _ = _collect(tmp_path, "llama", dtype=torch.bfloat16)
    name = "model.layers.1.self_attn.q_proj.weight"
    S = fc.store.samples("a", name)
    assert S.dtype == torch.bfloat16 and S.shape == (3, 32, 32)
    model.zero_grad(set_to_none=True)
    loss, _ = fisherstore.losses.causal_lm(model, {k: v[1:2] for k, v in ba.items()})
    loss.backward()
    want = dict(model.named_parameters())[name].grad
    assert want.dtype == torch.bfloat16 and torch.equal(S[1], want)  # bit for bit
    fc.close()
    header = json.load(open(os.path.join(tmp_path, "llama-zarr", "a", name, "s00000001", "zarr.json")))
    assert header["data_type"] == "bfloat16" and header["chunk_grid"]["configuration"]["chunk_shape"] == [1, 8, 32]


def test_fp32_gradients_are_never_downcast_unless_asked_with_a_bound(open_store, disk_backend):
    s = open_store(disk_backend)
    s.create("t", "w", (8, 4))
    s.create("t", "v", (8, 4))
    g = torch.randn(8, 4) * 1e-7
    with s.begin_samples("t", ["w", "v"], 1) as sb:
        sb.add(0, "w", g)
        sb.add(0, "v", g)
        sb.set_tokens(0, 3)
    with pytest.raises(fisherstore.InvalidGradientError, match="one dtype"):  # never a silent downcast
        with s.begin_samples("t", ["w", "v"], 1) as sb:
            sb.add(0, "w", g.to(torch.bfloat16))
            sb.add(0, "v", g)
    with s.begin_samples("t", ["w", "v"], 1, dtype="bfloat16") as sb:  # asked for: rounded, within 2^-8
        sb.add(0, "w", g)
        sb.add(0, "v", g)
        sb.set_tokens(0, 3)
    s.flush()
    S = s.samples("t", "w")
    assert torch.equal(S[0], g) and S.dtype == torch.float32  # two dtypes: read as fp32
    assert ((S[1].float() - g).abs() <= g.abs() * 2.0**-8).all() and not torch.equal(S[1].float(), g)


def test_samples_append_across_runs_and_survive_a_reopen(tmp_path):
    path = tmp_path / "s"
    model = tiny_model("llama")
    b1, b2 = token_batch(n=2, seq=6, seed=3), token_batch(n=3, seq=6, seed=4)
    with FisherCollector(backend="zarr", path=path, mode="w") as fc:
        fc.collect_samples(model, b1, task="a")
    with FisherCollector(backend="zarr", path=path) as fc:  # reopen, collect more
        fc.collect_samples(model, b2, task="a", ids=["x", "y", "z"])
        ram = fc.sample_gradients(model, {k: torch.cat([b1[k], b2[k]]) for k in b1})
    with fisherstore.open(path, mode="r") as r:
        assert r.sample_ids("a") == ["0", "1", "x", "y", "z"]
        for name, g in ram.grads.items():
            torch.testing.assert_close(r.samples("a", name).read().float(), g, rtol=1e-6, atol=1e-9)
        assert r.sample_tokens("a").tolist() == ram.tokens.tolist()
    assert verify_store(path).ok


def test_a_segment_must_cover_every_sample_and_parameter(open_store, disk_backend):
    s = open_store(disk_backend)
    for n in "ab":
        s.create("t", n, (4,))
    with pytest.raises(fisherstore.StepError, match="sample 1 of parameter 'b' was never added"):
        with s.begin_samples("t", ["a", "b"], 2) as sb:
            sb.add(0, "a", torch.ones(4))
            sb.add(1, "a", torch.ones(4))
            sb.add(0, "b", torch.ones(4))
            sb.set_tokens(0, 1)
            sb.set_tokens(1, 1)
    with pytest.raises(fisherstore.NonFiniteGradientError):
        with s.begin_samples("t", ["a"], 1) as sb:
            sb.add(0, "a", torch.full((4,), float("nan")))
            sb.set_tokens(0, 1)
    s.flush()
    assert s.sample_ids("t") == [] and verify_store(s.path, backend=disk_backend).ok
    assert not [d for d in os.listdir(os.path.join(s.path, "t", "a")) if d.startswith("s")]  # nothing left


def test_verify_checks_sample_chunks_and_recovery_removes_uncommitted_segments(tmp_path, disk_backend):
    path, crashed = str(tmp_path / "s"), str(tmp_path / "crashed")
    s = fisherstore.open(path, mode="w", backend=disk_backend)
    s.create("t", "w", (8, 4), ParamLayout.attention("q", 2, 4))
    s.flush()
    version = lambda p: json.load(open(os.path.join(p, "zarr.json")))["attributes"]["fisherstore"]["format_version"]  # noqa: E731
    assert version(path) == 1  # a store without samples stays readable by older fisherstores
    with s.begin_samples("t", ["w"], 2) as sb:
        for i in range(2):
            sb.add(i, "w", torch.full((8, 4), float(i + 1)))
            sb.set_tokens(i, 1)
    s.flush()
    assert version(path) == 2
    with s.begin_samples("t", ["w"], 1) as sb:  # written, not committed ...
        sb.add(0, "w", torch.ones(8, 4))
        sb.set_tokens(0, 1)
    shutil.copytree(path, crashed, ignore=shutil.ignore_patterns(".fisherstore.lock"))  # ... when a crash hits
    s.close()
    rep = verify_store(crashed, backend=disk_backend)
    assert rep.ok and [f.kind for f in rep.rolled_back] == ["uncommitted_samples"]
    with pytest.warns(fisherstore.RecoveryWarning, match="s00000002"):
        fisherstore.open(crashed, mode="a", backend=disk_backend).close()
    with fisherstore.open(crashed, mode="r", backend=disk_backend) as r:
        assert r.sample_ids("t") == ["0", "1"] and torch.equal(r.samples("t", "w")[1], torch.full((8, 4), 2.0))
    chunk = os.path.join(path, "t", "w", "s00000001", "c", "1", "1", "0")
    data = bytearray(open(chunk, "rb").read())
    data[3] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    rep = verify_store(path, backend=disk_backend)
    assert [(p.kind, p.chunk) for p in rep.problems] == [("corrupt_chunk", (1, 1, 0))]
    with fisherstore.open(path, mode="r", backend=disk_backend) as r:
        with pytest.raises(fisherstore.CorruptChunkError, match="segment 1"):
            r.samples("t", "w").head(1, "Q")


def test_tensorscope_adapter_runs_upstreams_heatmap_loop_and_agrees(tmp_path):
    fc, model, _, _ = _collect(tmp_path, "gpt2")
    store = fc.store
    ts = TensorScopeAdapter(store)
    qk = QKOVInterference(QKOVIndexer.from_model(model))
    # What TensorScope's compute_heatmap does (research/tensorscope.md §4), written here:
    # the contribution Fisher from contribution_cache, then a per-pair block_head_score.
    cache = ts.contribution_cache
    names = {qk.indexer.param_name(layer, b) for layer in qk.indexer.layers for b in "QKVO"}
    fisher = {n: torch.stack([cache["a"][k][n] for k in cache["a"]]).mean(0) for n in names}
    samples_a = [k for k in cache["a"]]
    samples_b = ts.gradient_manager.get_task_samples("b")
    want = qk.heatmap_from_store(store, "a", "b", fisher="contribution")
    for b in "QKVO":
        scores = torch.zeros(len(samples_a), len(samples_b), len(qk.indexer.layers), qk.indexer.num_heads,
                             dtype=torch.float64)
        for i, key in enumerate(samples_a):
            C = cache["a"][key]
            for j in samples_b:
                g = ts.gradient_manager.get_sample_gradients("b", j)
                for li, layer in enumerate(qk.indexer.layers):
                    name = qk.indexer.param_name(layer, b)
                    for h in range(qk.indexer.num_heads):
                        scores[i, j, li, h] = qk.block_head_score(C[name], g[name], fisher[name], layer, h, b)[0]
        torch.testing.assert_close(scores, want["scores"][b], rtol=1e-5, atol=1e-12)
        top = sorted(((float(v), idx) for idx, v in enumerate(scores.reshape(-1))), reverse=True)[0]
        assert top[0] == pytest.approx(want["top_conflicts"][b][0]["score"])
    fc.close()


def test_ema_and_contribution_fishers_compare_per_head_as_data_and_a_picture(tmp_path):
    fc, model, _, _ = _collect(tmp_path, "llama")
    rows = compare_fishers(fc.store, "a")
    assert {r["block"] for r in rows} == set("QKVO") and all(-1 <= r["spearman"] <= 1 for r in rows)
    q = next(r for r in rows if r["block"] == "Q" and r["layer"] == 1 and r["head"] == 2)
    name = q["param"]
    lay = fc.store.layout("a", name)
    assert q["mass_ema"] == pytest.approx(float(fc.store.fisher("a", name).head(2, "Q").sum()), rel=1e-5)
    assert q["mass_contribution"] == pytest.approx(
        float(fc.store.contribution_fisher("a", name).load()[lay.head_index(2, "Q", 2)].sum()), rel=1e-5)
    png = plot_comparison(rows, str(tmp_path / "cmp.png"))
    assert os.path.getsize(png) > 10_000
    fc.close()


# -- a kill -9 while samples are written ----------------------------------------------------------
SEG = 3
SHAPE = (16, 8)


def sample_grad(i: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))


def sample_writer(path: str, backend: str, conn) -> None:
    with fisherstore.open(path, mode="a", backend=backend, memory_budget=1 << 20) as s:
        for n in ("p", "q"):
            s.create("t", n, SHAPE, ParamLayout.attention("q", 4, 4))
        s.flush()
        conn.send("ready")
        while True:
            start = len(s.sample_ids("t"))
            with s.begin_samples("t", ["p", "q"], SEG) as sb:
                for i in range(SEG):
                    for k, n in enumerate(("p", "q")):
                        sb.add(i, n, sample_grad(2 * (start + i) + k))
                    sb.set_tokens(i, start + i + 1)
            conn.send("flushing")
            s.flush()
            conn.send("flushed")


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_kill_9_while_samples_are_written_keeps_every_committed_sample_whole(tmp_path, backend):
    ctx = mp.get_context("forkserver")
    path = str(tmp_path / "s")
    rng = random.Random(7)
    seen = set()
    for k in range(8):
        a, c = ctx.Pipe(duplex=False)
        p = ctx.Process(target=sample_writer, args=(path, backend, c), daemon=True)
        p.start()
        assert a.poll(60) and a.recv() == "ready"
        if k % 2:
            while a.poll(30) and a.recv() != "flushing":
                pass
            time.sleep(rng.uniform(0, 0.02))
        else:
            time.sleep(rng.uniform(0.05, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert verify_store(path, backend=backend).ok
        with fisherstore.open(path, mode="r", backend=backend) as r:
            n = len(r.sample_ids("t"))
            assert n % SEG == 0  # whole segments only
            assert r.sample_tokens("t").tolist() == list(range(1, n + 1))
            for i in range(n):  # every committed sample is exactly what was written
                for k, name in enumerate(("p", "q")):
                    assert torch.equal(r.samples("t", name)[i], sample_grad(2 * i + k)), (i, name)
            seen.add(n)
    assert max(seen) >= 2 * SEG, seen


# -- memory: bounded by the budget, not by n × model ----------------------------------------------------
PEAK = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import transformers as T
    from fisherstore import FisherCollector
    T.logging.set_verbosity_error()

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=1024, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=8)
    cfg._attn_implementation = "eager"
    model = T.LlamaForCausalLM(cfg).eval()
    batch = {{"input_ids": torch.randint(0, 64, (8, 6))}}
    budget = 64 << 20
    with FisherCollector(backend=sys.argv[2], path=sys.argv[1], memory_budget=budget) as fc:
        fc.collect_samples(model, {{k: v[:1] for k, v in batch.items()}}, task="warm")  # imports, pools, caches
        start = hwm()
        fc.collect_samples(model, batch, task="t")
        peak = hwm()
        total = sum(fc.store.samples("t", n).shape.numel() * 4 for n in fc.store.sample_params("t"))
    print(start, peak, total, budget)
""")


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_peak_memory_of_a_per_sample_pass_is_bounded_by_the_budget(tmp_path, backend):
    script = tmp_path / "peak.py"
    script.write_text(PEAK.format(root=ROOT))
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "s"), backend], check=True,
                         capture_output=True, text=True).stdout.split()
    start, peak, total, budget = map(int, out)
    assert total >= 8 * budget  # the pass writes 8x the budget
    one_param = 4 * 1024 * 1024
    grown = peak - start
    assert grown <= budget + one_param + (48 << 20), f"{backend}: grew {grown / 2**20:.0f} MiB for {total / 2**20:.0f} MiB"
