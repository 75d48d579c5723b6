"""What the collector computes, checked by hand: losses of every model family, the stored β, the feeding paths."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from fisherstore import FisherCollector, InvalidArgumentError
from fisherstore.errors import StoredDecayWarning
from fisherstore.losses import causal_lm, masked_lm, seq2seq_lm
from tests.models import bert_layouts, masked_batch, seq2seq_batch, speech_batch, tiny_model, token_batch


def _close(got, want, rtol=1e-4):
    """Elementwise within rtol, with an absolute floor scaled to the tensor (Fisher values here are ~1e-14)."""
    return torch.allclose(got, want, rtol=rtol, atol=rtol * 1e-3 * float(want.abs().max()))


def _grads(model, loss, names):
    model.zero_grad(set_to_none=True)
    loss.backward()
    params = dict(model.named_parameters())
    return {n: params[n].grad.detach().clone() for n in names}


def _shift_right(labels, start, pad):
    """The decoder inputs a seq2seq model trains on: the start token, then the labels but the last (-100 -> pad)."""
    dec = torch.full_like(labels, start)
    dec[:, 1:] = labels[:, :-1]
    return dec.masked_fill(dec == -100, pad)


def _hand_fisher(model, batch, names, mb, logits_of):
    """x = Σ_mb g²/T and (Σ_mb g)²/T, with g the gradient of each micro-batch's token-summed loss."""
    n = batch["labels"].shape[0]
    sq = {k: 0 for k in names}
    total = {k: 0 for k in names}
    T = 0
    for s in range(0, n, mb):
        part = {k: v[s:s + mb] for k, v in batch.items()}
        logits = logits_of(part)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), part["labels"].reshape(-1), ignore_index=-100,
                               reduction="sum")
        T += int((part["labels"] != -100).sum())
        g = _grads(model, loss, names)
        for k in names:
            sq[k] = sq[k] + g[k] ** 2
            total[k] = total[k] + g[k]
    return {k: sq[k] / T for k in names}, {k: total[k] ** 2 / T for k in names}, T


SEQ2SEQ_NAMES = {
    "bart": ["model.encoder.layers.1.self_attn.q_proj.weight", "model.decoder.layers.0.self_attn.out_proj.weight",
             "model.decoder.layers.1.encoder_attn.k_proj.weight", "model.decoder.layers.1.encoder_attn.v_proj.weight"],
    "t5": ["encoder.block.1.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.0.SelfAttention.o.weight",
           "decoder.block.1.layer.1.EncDecAttention.k.weight", "decoder.block.1.layer.1.EncDecAttention.v.weight"],
}


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_seq2seq_collection_equals_hand_computation(arch):
    model = tiny_model(arch)
    cfg = model.config
    batch = seq2seq_batch(n=4, seed=5)
    names = SEQ2SEQ_NAMES[arch]

    def logits_of(part):  # decoder inputs built here, by hand, not by the loss under test
        dec = _shift_right(part["labels"], cfg.decoder_start_token_id, cfg.pad_token_id)
        return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], decoder_input_ids=dec).logits

    want_micro, want_batch, T = _hand_fisher(model, batch, names, 2, logits_of)
    assert T == 3 * 5 + 2  # the last target has 2 tokens, the rest -100
    for est, want in (("micro_batch", want_micro), ("batch", want_batch)):
        fc = FisherCollector(micro_batch_size=2, estimator=est, loss_fn=seq2seq_lm)
        fc.collect_fisher(model, batch, task="t")
        assert fc.get_token_count("t") == T
        assert len(fc.store.params("t")) == 24  # every attention weight of both stacks
        for n in names:
            got = fc.full_fisher("t", n).load()  # bias-corrected after one step: x itself
            assert want[n].abs().max() > 0 and _close(got, want[n]), (arch, est, n)
        meta = fc.store.metadata("t")
        assert meta["user"]["loss"] == "seq2seq_lm" and meta["model"]["encoder_decoder"] is True
    # the two estimators really differ here, so the comparison above can tell them apart
    assert not torch.allclose(want_micro[names[0]], want_batch[names[0]], rtol=1e-2, atol=0)


def test_masked_lm_collection_through_layouts_equals_hand_computation():
    model = tiny_model("bert")
    batch = masked_batch(n=4, seed=2)
    layouts = bert_layouts(model)
    names = ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.attention.output.dense.weight"]
    want, _, T = _hand_fisher(model, batch, names, 2,
                              lambda part: model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits)
    assert T == int((batch["labels"] != -100).sum()) > 0
    fc = FisherCollector(micro_batch_size=2, loss_fn=masked_lm, layouts=layouts)
    fc.collect_fisher(model, batch, task="m")
    assert sorted(fc.store.params("m")) == sorted(layouts)  # the attention weights the layouts name
    assert fc.get_token_count("m") == T
    for n in names:
        assert want[n].abs().max() > 0 and _close(fc.full_fisher("m", n).load(), want[n]), n
    o = names[1]
    g = fc.get_group_fisher("m", o, "head")
    F_o = fc.full_fisher("m", o)
    assert torch.allclose(g, torch.stack([F_o.head(h, "O").sum() for h in range(4)]), rtol=1e-5)
    # without layouts= BERT's attention (self.query/key/value, output.dense) maps by itself, to the same
    # layouts the hand-written ones say and the same values
    auto = FisherCollector(micro_batch_size=2, loss_fn=masked_lm)
    auto.collect_fisher(model, batch, task="m")
    assert sorted(auto.store.params("m")) == sorted(layouts)
    for n in layouts:
        assert auto.store.layout("m", n) == layouts[n], n
    for n in names:
        assert _close(auto.full_fisher("m", n).load(), want[n]), n


def test_whisper_seq2seq_lm_reads_input_features_and_counts_label_tokens():
    model = tiny_model("whisper")
    cfg = model.config
    batch = speech_batch(n=4, tgt=5, model=model, seed=3)
    names = ["model.encoder.layers.1.self_attn.q_proj.weight", "model.decoder.layers.0.self_attn.out_proj.weight",
             "model.decoder.layers.1.encoder_attn.k_proj.weight"]

    def logits_of(part):  # decoder inputs built here, by hand, not by the loss under test
        dec = _shift_right(part["labels"], cfg.decoder_start_token_id, cfg.pad_token_id)
        return model(input_features=part["input_features"], decoder_input_ids=dec).logits

    want, _, T = _hand_fisher(model, batch, names, 2, logits_of)
    assert T == 3 * 5 + 2  # labels only: the 8 x 16 audio frames of each row are inputs, not targets
    assert seq2seq_lm.count_tokens(batch) == T
    fc = FisherCollector(micro_batch_size=2, loss_fn=seq2seq_lm)
    fc.collect_fisher(model, batch, task="w")
    assert fc.get_token_count("w") == T
    assert len(fc.store.params("w")) == 24  # encoder self, decoder self, decoder cross: 4 weights x 2 layers each
    for n in names:
        assert want[n].abs().max() > 0 and _close(fc.full_fisher("w", n).load(), want[n]), n
    # neither encoder input: the error says both names; a token-shaped input_features: its shape
    with pytest.raises(InvalidArgumentError, match=r"neither 'input_ids'.*nor 'input_features'.*has \['labels'\]"):
        fc.collect_fisher(model, {"labels": batch["labels"]}, task="w")
    with pytest.raises(InvalidArgumentError, match=r"input_features'\] must be a \[batch, features, frames\]"):
        fc.collect_fisher(model, {"input_features": batch["input_features"][:, 0], "labels": batch["labels"]},
                          task="w")
    assert fc.store.step("w") == 1  # the refused calls left no step


def test_a_loss_that_does_not_fit_the_model_is_refused_with_the_fix():
    bart = tiny_model("bart")
    with pytest.raises(InvalidArgumentError, match=r"encoder-decoder.*loss_fn=fisherstore.losses.seq2seq_lm"):
        FisherCollector().collect_fisher(bart, seq2seq_batch())
    with pytest.raises(InvalidArgumentError, match=r"encoder-decoder.*seq2seq_lm"):
        FisherCollector().sample_gradients(bart, seq2seq_batch())
    with pytest.raises(InvalidArgumentError, match=r"masked language model.*loss_fn=fisherstore.losses.masked_lm"):
        FisherCollector(layouts=bert_layouts(tiny_model("bert"))).collect_fisher(tiny_model("bert"), masked_batch())
    with pytest.raises(InvalidArgumentError, match=r"not an encoder-decoder.*causal_lm"):
        FisherCollector(loss_fn=seq2seq_lm).collect_fisher(tiny_model("llama"), token_batch())
    fc = FisherCollector(loss_fn=seq2seq_lm)
    no_labels = {k: v for k, v in seq2seq_batch().items() if k != "labels"}
    with pytest.raises(InvalidArgumentError, match=r"no 'labels', which the seq2seq_lm loss needs"):
        fc.collect_fisher(bart, no_labels, task="t")
    with pytest.raises(InvalidArgumentError, match=r"no 'labels', which the masked_lm loss needs"):
        FisherCollector(loss_fn=masked_lm, layouts=bert_layouts(tiny_model("bert"))).collect_fisher(
            tiny_model("bert"), {"input_ids": masked_batch()["input_ids"]})
    nothing = seq2seq_batch()
    nothing["labels"][:] = -100
    with pytest.raises(InvalidArgumentError, match="no tokens to predict"):
        fc.collect_fisher(bart, nothing, task="t")
    ragged = seq2seq_batch(n=4)
    ragged["labels"] = ragged["labels"][:3]
    with pytest.raises(InvalidArgumentError, match=r"disagree on the number of sequences.*labels: 3"):
        fc.collect_fisher(bart, ragged, task="t")
    # the failed calls left no step, and the first good one records the task's metadata
    fc.collect_fisher(bart, seq2seq_batch(), task="t")
    assert fc.store.step("t") == 1 and fc.store.metadata("t")["estimator"] == "micro_batch"


def _llama_steps(n_steps, seed=0):
    return [token_batch(n=4, seq=6, seed=seed + s) for s in range(n_steps)]


def test_reopen_with_another_decay_reads_and_updates_with_the_stored_one(tmp_path):
    model = tiny_model("llama")
    steps = _llama_steps(6)
    q = "model.layers.1.self_attn.q_proj.weight"
    path = tmp_path / "s"
    fc = FisherCollector(ema_decay=0.9, backend="zarr", path=path, micro_batch_size=2)
    for b in steps[:3]:
        fc.collect_fisher(model, b, task="a")
    fc.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = FisherCollector(backend="zarr", path=path, micro_batch_size=2)  # default ema_decay=0.99
        g = again.get_group_fisher("a", q, "head")
        F_q = again.full_fisher("a", q)
        assert torch.allclose(g, torch.stack([F_q.head(h, "Q").sum() for h in range(4)]), rtol=1e-5)
        for b in steps[3:5]:
            again.collect_fisher(model, b, task="a")
    decay_warnings = [w for w in caught if issubclass(w.category, StoredDecayWarning)]
    assert len(decay_warnings) == 1 and "ema_decay=0.9," in str(decay_warnings[0].message)

    ref = FisherCollector(ema_decay=0.9, micro_batch_size=2)  # the same steps, never interrupted
    for b in steps[:5]:
        ref.collect_fisher(model, b, task="a")
    for n in ref.store.params("a"):
        assert torch.allclose(again.full_fisher("a", n).load(), ref.full_fisher("a", n).load(), rtol=1e-5), n
    g_ref, g_again = ref.get_group_fisher("a"), again.get_group_fisher("a")
    assert g_ref.keys() == g_again.keys() and len(g_ref) == 8
    for k in g_ref:
        assert torch.allclose(g_again[k], g_ref[k], rtol=1e-5), k
    raw_ref, raw_again = ref.fisher_ema, again.fisher_ema
    for k in raw_ref:
        assert torch.allclose(raw_again[k], raw_ref[k], rtol=1e-5), k
    again.close()

    # a parameter added to the task after the reopen takes the task's β, not the collector's
    up = "model.layers.0.mlp.up_proj.weight"
    more = [q, up]
    with pytest.warns(StoredDecayWarning):
        third = FisherCollector(backend="zarr", path=path, micro_batch_size=2, params=more)
        third.collect_fisher(model, steps[5], task="a")
    assert third.store.param("a", up).decay == 0.9
    ref.close()
    ref_more = FisherCollector(ema_decay=0.9, micro_batch_size=2, params=[q])
    for b in steps[:5]:
        ref_more.collect_fisher(model, b, task="a")
    ref_more.params = more  # up_proj joins at step 6, as above
    ref_more.collect_fisher(model, steps[5], task="a")
    assert ref_more.store.param("a", up).decay == 0.9
    for n in more:
        assert torch.allclose(third.full_fisher("a", n).load(), ref_more.full_fisher("a", n).load(), rtol=1e-5), n
    assert torch.allclose(third.get_group_fisher("a", up, "channel"), ref_more.get_group_fisher("a", up, "channel"),
                          rtol=1e-5)
    third.close()


def _plain_causal(model, batch):
    """A loss_fn as users write them: a plain function, without count_tokens."""
    return causal_lm(model, batch)


@pytest.mark.parametrize("estimator", ["micro_batch", "batch"])
def test_streamed_summed_and_data_parallel_paths_agree(estimator):
    model = tiny_model("llama")
    ways = {
        "streamed": FisherCollector(micro_batch_size=2, estimator=estimator, params="all"),
        "summed": FisherCollector(micro_batch_size=2, estimator=estimator, params="all", loss_fn=_plain_causal),
        "data_parallel": FisherCollector(micro_batch_size=2, estimator=estimator, params="all", data_parallel=True),
    }
    for b in _llama_steps(3, seed=20) + [token_batch(n=3, seq=6, seed=30)]:  # 3 rows: a short last micro-batch
        for fc in ways.values():
            fc.collect_fisher(model, b, task="a")
    ref = ways.pop("streamed")
    for way, fc in ways.items():
        assert fc.get_token_count("a") == ref.get_token_count("a")
        for n in ref.store.params("a"):
            assert _close(fc.full_fisher("a", n).load(), ref.full_fisher("a", n).load(), rtol=1e-6), (way, n)
        g, g_ref = fc.get_group_fisher("a"), ref.get_group_fisher("a")
        assert g.keys() == g_ref.keys()
        for k in g_ref:
            assert _close(g[k], g_ref[k], rtol=1e-6), (way, k)


def test_param_reduction_group_view_follows_every_step():
    # reduction="param" keeps no group increments; a view read between steps must not go stale
    model = tiny_model("llama")
    q = "model.layers.0.self_attn.q_proj.weight"
    fc = FisherCollector("param", micro_batch_size=2)
    for seed in range(3):
        fc.collect_fisher(model, token_batch(seed=seed))
        g = fc.get_group_fisher("default", q, "head")
        F_q = fc.full_fisher("default", q)
        assert torch.allclose(g, torch.stack([F_q.head(h, "Q").sum() for h in range(4)]), rtol=1e-5), seed
