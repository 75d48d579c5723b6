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


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_encoder_decoder_indexer_keeps_every_attention_weight(arch):
    model = tiny_model(arch)
    idx = QKOVIndexer.from_model(model)
    assert idx.layers == ["encoder.0", "encoder.1", "decoder.0", "decoder.1", "decoder.0.cross", "decoder.1.cross"]
    names = {idx.param_name(layer, b) for layer in idx.layers for b in "QKVO"}
    assert len(names) == 24  # 2 encoder self + 2 decoder self + 2 decoder cross, 4 weights each
    cross_k = "model.decoder.layers.1.encoder_attn.k_proj.weight" if arch == "bart" else \
        "decoder.block.1.layer.1.EncDecAttention.k.weight"
    assert idx.param_name("decoder.1.cross", "K") == cross_k
    assert idx.block_slice("decoder.1.cross", 3, "K").rows == slice(3 * idx.layouts[cross_k].head_dim,
                                                                    4 * idx.layouts[cross_k].head_dim)
    with pytest.raises(HeadIndexError, match=r"layer 1 is ambiguous.*'encoder.1'.*'decoder.1.cross'"):
        idx.param_name(1, "Q")
    with pytest.raises(HeadIndexError, match="'decoder.7'"):
        idx.param_name("decoder.7", "Q")


def test_encoder_decoder_indexer_from_store_matches_model(tmp_path):
    from fisherstore.losses import seq2seq_lm
    from tests.models import seq2seq_batch

    model = tiny_model("bart")
    fc = FisherCollector(backend="zarr", path=tmp_path / "s", loss_fn=seq2seq_lm)
    fc.collect_fisher(model, seq2seq_batch(n=2), task="a")
    from_store = QKOVIndexer.from_store(fc.store, "a")
    from_model = QKOVIndexer.from_model(model)
    assert from_store.layers == from_model.layers
    for layer in from_model.layers:
        for b in "QKVO":
            assert from_store.block_slice(layer, 2, b) == from_model.block_slice(layer, 2, b)
    samples = fc.sample_gradients(model, seq2seq_batch(n=2, seed=3))  # per-sample, with the seq2seq loss
    assert samples.tokens.tolist() == [5, 2]
    heat = QKOVInterference(from_store).heatmap(samples.contributions(), samples.signed(), fc.full_fisher("a"))
    assert heat["Q"].shape == (6, 4) and (heat["Q"] > 0).all() and heat["layers"][-1] == "decoder.1.cross"
    fc.close()
