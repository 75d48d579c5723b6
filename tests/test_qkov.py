"""QK-OV scoring on lazy Fisher: tiling (case 14), batched = loop, diagnostics, cache."""

import pytest
import torch

from fisherstore import FisherCollector, HeadIndexError
from fisherstore.qkov import BlockHeadSlice, QKOVIndexer, QKOVInterference
from tests.models import tiny_model, token_batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model("llama")
    fc = FisherCollector(backend="zarr", path=tmp_path_factory.mktemp("q") / "s", micro_batch_size=2)
    for i in range(3):
        fc.collect_fisher(model, token_batch(n=4, seed=i), task="a")
    fc.flush()
    a = fc.sample_gradients(model, token_batch(n=3, seed=11))
    b = fc.sample_gradients(model, token_batch(n=2, seed=12, lo=32))
    yield model, fc, a.contributions(), b.signed()
    fc.close()


def test_indexer_names_and_slices(setup):
    model = setup[0]
    idx = QKOVIndexer.from_model(model)
    assert idx.layers == [0, 1] and idx.num_heads == 4
    assert idx.param_name(1, "K") == "model.layers.1.self_attn.k_proj.weight"
    sl = idx.block_slice(1, 3, "K")  # GQA: q-head 3 reads kv head 1
    assert sl == BlockHeadSlice("model.layers.1.self_attn.k_proj.weight", slice(8, 16), slice(None), 1, 3, "K")
    assert idx.block_slice(0, 2, "o").cols == slice(16, 24)
    with pytest.raises(HeadIndexError, match="head 4"):
        idx.block_slice(0, 4, "Q")
    with pytest.raises(HeadIndexError, match="layer 7"):
        idx.param_name(7, "Q")
    gpt2 = QKOVIndexer.from_model(tiny_model("gpt2"))
    assert gpt2.block_slice(0, 1, "O").rows == slice(8, 16)  # Conv1D c_proj: rows, not columns
    assert gpt2.block_slice(0, 1, "V").cols == slice(72, 80)
    pythia = QKOVIndexer.from_model(tiny_model("pythia"))
    assert pythia.block_slice(1, 2, "K").rows == slice(56, 64)  # interleaved: 2*3*8 + 8


def _unsliced(C, G, Fi, eps=1e-10, ridge=1e-8):
    return float((C / (Fi.clamp_min(eps) + ridge) * G.abs()).sum(dtype=torch.float64))


def test_sum_over_heads_equals_unsliced_score(setup):  # case 14
    model, fc, C, G = setup
    idx = QKOVIndexer.from_model(model)
    qk = QKOVInterference(idx)
    fisher = fc.full_fisher("a")
    for block, r in (("Q", 1), ("O", 1), ("V", 2), ("K", 2)):  # GQA K/V slices counted r=H/H_kv times
        name = idx.param_name(1, block)
        total = sum(qk.block_head_score(C[name][0], G[name][1], fisher[name], 1, h, block)[0] for h in range(4))
        want = r * _unsliced(C[name][0], G[name][1], fisher[name].load())
        assert total == pytest.approx(want, rel=1e-5)


def test_batched_equals_loop_and_diagnostics(setup):
    model, fc, C, G = setup
    qk = QKOVInterference(QKOVIndexer.from_model(model), ridge_rel=0.1)
    fisher = fc.full_fisher("a")
    for block in "QKVO":
        name = qk.indexer.param_name(0, block)
        M = qk.block_head_scores(C[name], G[name], fisher[name], 0, 2, block)
        assert M.shape == (3, 2)
        for i in range(3):
            for j in range(2):
                s, diag = qk.block_head_score(C[name][i], G[name][j], fisher[name], 0, 2, block)
                assert M[i, j].item() == pytest.approx(s, rel=1e-6)
    fb = fisher[name].head(2, "O")
    assert diag["fisher_min"] == pytest.approx(float(fb.min()))
    assert diag["fisher_median"] == pytest.approx(float(fb.median()))
    assert diag["ridge_applied"] == pytest.approx(max(1e-8, 0.1 * float(fb.median())))
    assert 0.0 <= diag["frac_below_eps"] <= 1.0
    assert qk.cache.hits > 0  # the loop re-used the decoded block


def test_heatmap_shapes_and_cache_bound(setup):
    model, fc, C, G = setup
    qk = QKOVInterference(QKOVIndexer.from_model(model), cache_bytes=3 * 8 * 32 * 4)
    heat = qk.heatmap(C, G, fc.full_fisher("a"))
    for b in "QKVO":
        assert heat[b].shape == (2, 4) and (heat[b] > 0).all()
        assert heat["scores"][b].shape == (3, 2, 2, 4)
    assert qk.cache.bytes <= qk.cache.max_bytes
    # an in-RAM tensor gives the same numbers as the lazy store
    ram = {n: f.load() for n, f in fc.full_fisher("a").items()}
    heat2 = QKOVInterference(QKOVIndexer.from_model(model)).heatmap(C, G, ram)
    for b in "QKVO":
        assert heat2[b] == pytest.approx(heat[b], rel=1e-6)
