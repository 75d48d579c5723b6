"""layouts= overrides are checked against the model's own attention before anything is stored (issue 20, item 5).

Real models built from configs with random weights; no mocks. The evidence is where the
gradient of one head's attention output lands (fisherstore/collect/layout_check.py).
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from models import TINY, bert_layouts, masked_batch, seq2seq_batch, tiny_model, token_batch
from torch import nn

import fisherstore
from fisherstore import FisherCollector, LayoutError, LayoutMismatchError, ParamLayout, layouts_from_model
from fisherstore.collect import check_layouts
from fisherstore.integrations import collect_from_grads
from fisherstore.losses import causal_lm, masked_lm, seq2seq_lm
from fisherstore.spec.layout import attention_param_names

LQ, LK, LV, LO = (ParamLayout.attention(k, 4, 8) for k in "qkvo")


# -- models ------------------------------------------------------------------------------------
def bloom():
    torch.manual_seed(0)
    cfg = T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    cfg._attn_implementation = "eager"
    return T.BloomForCausalLM(cfg).eval()


def bloom_layouts(fused: str) -> dict[str, ParamLayout]:
    out = {}
    for i in range(2):
        pre = f"transformer.h.{i}.self_attention"
        out[f"{pre}.query_key_value.weight"] = ParamLayout.attention("qkv", 4, 8, fused=fused)
        out[f"{pre}.query_key_value.bias"] = ParamLayout.attention("qkv", 4, 8, fused=fused, ndim=1)
        out[f"{pre}.dense.weight"] = LO
    return out


class HeadsAttention(nn.Module):
    """Plain multi-head attention with q/k/v/o Linears; ``reverse``: Q stores its heads last to first."""

    def __init__(self, hidden: int = 32, heads: int = 4, reverse: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.h, self.d, self.reverse = heads, hidden // heads, reverse
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (m(x).view(B, L, self.h, self.d).transpose(1, 2) for m in (self.q, self.k, self.v))
        if self.reverse:
            q = q.flip(1)  # query head h lives in rows (H-1-h)·d of q.weight
        scores = (q @ k.transpose(-1, -2)) / self.d ** 0.5
        causal = torch.ones(L, L, dtype=torch.bool).triu(1)
        a = self.drop(scores.masked_fill(causal, float("-inf")).softmax(-1))
        return self.o((a @ v).transpose(1, 2).reshape(B, L, -1))


class PlainHeads(HeadsAttention):
    """The same module under a name layouts_from_model does not take for attention (no "Attention" in it)."""


class TinyLM(nn.Module):
    def __init__(self, cls: type = HeadsAttention, **kw) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 32)
        self.attn = cls(**kw)
        self.head = nn.Linear(32, 64)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.emb(input_ids)))


def tiny_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    ids = batch["input_ids"]
    logits = model(ids)[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1), reduction="sum"), ids[:, 1:].numel()


TINY_LAYOUTS = {"attn.q.weight": LQ, "attn.k.weight": LK, "attn.v.weight": LV, "attn.o.weight": LO}


def bert_wrong(model, kinds=None, H=4, d=8, transposed_o=False):
    """bert_layouts with another geometry, kinds per child, or O's transposed flag flipped (q/k/v biases alike)."""
    out = {}
    for name in bert_layouts(model):
        child = name.split(".attention.")[1].rsplit(".", 1)[0]
        kind = (kinds or {}).get(child) or {"self.query": "q", "self.key": "k", "self.value": "v",
                                            "output.dense": "o"}[child]
        out[name] = ParamLayout.attention(kind, H, d, transposed=transposed_o and kind == "o")
        if kind != "o":  # one attention's layouts share H; built-in bias layouts would keep the model's
            out[name.replace(".weight", ".bias")] = ParamLayout.attention(kind, H, d, ndim=1)
    return out


# -- (1) Bloom: the interleaved qkv declared block-contiguous ------------------------------------
def test_bloom_block_override_is_refused_naming_parameter_block_and_head():
    fc = FisherCollector(layouts=bloom_layouts("block"))
    with pytest.raises(LayoutMismatchError) as e:
        fc.collect_fisher(bloom(), token_batch())
    msg = str(e.value)
    assert "'transformer.h.0.self_attention.query_key_value.weight' (Q/K/V): head 0's attention output" in msg
    # where the gradient landed, and what the layout calls those rows
    assert "moves rows 0:24; of those, 8:24 are not head 0's in the layout, which gives them to Q of heads 1, 2" in msg
    assert "puts head 0 at Q 0:8, K 32:40, V 64:72" in msg
    assert fc.store.tasks() == []


def test_bloom_interleaved_override_passes_and_collects_the_right_head_rows():
    model = bloom()
    fc = FisherCollector(layouts=bloom_layouts("interleaved"), micro_batch_size=4)
    fc.collect_fisher(model, token_batch())
    report = fc.check_layouts(model, token_batch())
    assert report.layers == ["0"] and report.repeats == ["1"]  # layer 1 repeats layer 0's layouts
    F = fc.full_fisher("default", "transformer.h.0.self_attention.query_key_value.weight")
    whole = F[:, :]
    assert torch.equal(F.head(1, "Q"), whole[24:32])  # interleaved: head 1's Q is rows 3·1·8 : 3·1·8+8


# -- (2) a custom attention module with its Q heads stored in reverse ---------------------------
def test_custom_attention_with_permuted_heads_is_refused():
    fc = FisherCollector(layouts=TINY_LAYOUTS, loss_fn=tiny_loss)
    with pytest.raises(LayoutMismatchError, match=r"'attn\.q\.weight' \(Q\): head 0's attention output .* moves "
                                                  r"rows 24:32; of those, 24:32 .* Q of head 3 .* head 0 at Q 0:8"):
        fc.collect_fisher(TinyLM(reverse=True), token_batch(pad_last=False))
    assert fc.store.tasks() == []


def test_custom_attention_in_train_mode_with_frozen_parameters_is_left_as_it_was():
    model = TinyLM(dropout=0.5).train()
    model.attn.k.weight.requires_grad_(False)
    stale = torch.full_like(model.attn.q.weight, 7.0)
    model.attn.q.weight.grad = stale
    report = check_layouts(model, layouts_from_model(model, overrides=TINY_LAYOUTS), TINY_LAYOUTS,
                           token_batch(pad_last=False), tiny_loss)
    assert report.layers == ["(no layer number)"] and report.passes == 4 * 4  # 3 probes and one O product a head
    assert model.training and model.attn.drop.training
    assert not model.attn.k.weight.requires_grad and model.attn.q.weight.requires_grad
    assert model.attn.q.weight.grad is stale and model.attn.v.weight.grad is None


def test_an_override_without_an_o_layout_is_refused_asking_for_it():
    lay = {n: v for n, v in TINY_LAYOUTS.items() if n != "attn.o.weight"}
    with pytest.raises(LayoutError, match=r"'attn\.q\.weight'.*no output projection.*Give the O layout too"):
        FisherCollector(layouts=lay, loss_fn=tiny_loss).collect_fisher(TinyLM(PlainHeads), token_batch(pad_last=False))


# -- (3) BERT, right and wrong ------------------------------------------------------------------
def test_bert_layouts_pass():
    model = tiny_model("bert")
    fc = FisherCollector(layouts=bert_layouts(model), loss_fn=masked_lm)
    fc.collect_fisher(model, masked_batch())
    assert len(fc.store.params("default")) == 8


def test_bert_with_two_heads_of_16_for_four_of_8_is_refused_naming_the_head():
    model = tiny_model("bert")
    fc = FisherCollector(layouts=bert_wrong(model, H=2, d=16), loss_fn=masked_lm)
    with pytest.raises(LayoutMismatchError) as e:
        fc.collect_fisher(model, masked_batch())
    msg = str(e.value)
    # same shapes; the first feature of the layout's head 0 moves only the model's head 0 (rows 0:8)
    assert "'bert.encoder.layer.0.attention.self.query.weight' (Q): the layout gives head 0's Q rows 0:16" in msg
    assert "moves only 0:8 of them" in msg
    assert "'bert.encoder.layer.0.attention.output.dense.weight' (O): the layout's head 0 (features 0:16 of its " \
           "input) spans several of the model's heads" in msg


def test_bert_value_declared_as_key_is_refused():
    model = tiny_model("bert")
    lay = bert_wrong(model, kinds={"self.key": "v", "self.value": "k"})
    with pytest.raises(LayoutMismatchError, match=r"self\.value\.weight' \(K\): .*moves only 0:1 of them.*"
                                                  r"Is it a value projection\?"):
        FisherCollector(layouts=lay, loss_fn=masked_lm).collect_fisher(model, masked_batch())


# -- (4) O with the wrong transposed flag ------------------------------------------------------
def test_o_with_the_wrong_transposed_flag_is_refused():
    model = tiny_model("bert")
    lay = bert_wrong(model, transposed_o=True)  # square [32, 32]: the shape check cannot tell
    with pytest.raises(LayoutMismatchError, match=r"output\.dense\.weight' \(O\): head 0's input features 0:8 move "
                                                  r"its weight's rows 0:32.*check transposed="):
        FisherCollector(layouts=lay, loss_fn=masked_lm).collect_fisher(model, masked_batch())


# -- (5) once per model, and nothing stored when it fails ---------------------------------------
def test_the_check_runs_once_per_model(tmp_path):
    model = tiny_model("bert")
    forwards = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    fc = FisherCollector(backend="zarr", path=str(tmp_path / "f.zarr"), layouts=bert_layouts(model),
                         loss_fn=masked_lm, micro_batch_size=4)
    fc.collect_fisher(model, masked_batch())
    assert len(forwards) == 2  # the check's forward, then the step's one micro-batch
    report = fc.check_layouts(model, masked_batch())
    fc.collect_fisher(model, masked_batch(seed=1))
    fc.collect_samples(model, masked_batch(n=2), task="s")
    assert len(forwards) == 2 + 1 + 2 and fc.check_layouts(model, masked_batch()) is report
    assert report.layers == ["0"] and report.repeats == ["1"]
    fc.close()


@pytest.mark.parametrize("how", ["collect_fisher", "collect_samples", "collect_fisher_dataset", "collect_from_grads"])
def test_a_layout_that_does_not_fit_stores_nothing(tmp_path, how):
    path = str(tmp_path / "f.zarr")
    model = tiny_model("bert")
    fc = FisherCollector(backend="zarr", path=path, layouts=bert_wrong(model, H=2, d=16), loss_fn=masked_lm)
    batch = masked_batch()
    with pytest.raises(LayoutError) as e:
        if how == "collect_from_grads":
            loss, n = masked_lm(model, batch)
            loss.backward()
            collect_from_grads(fc, model, "default", tokens=n)
        else:
            getattr(fc, how)(model, [batch] if how == "collect_fisher_dataset" else batch)
    if how == "collect_from_grads":  # no batch of ours: refused until check_layouts ran
        assert "not yet checked" in str(e.value) and "fc.check_layouts(model, batch)" in str(e.value)
        with pytest.raises(LayoutMismatchError):
            fc.check_layouts(model, batch)
    else:
        assert isinstance(e.value, LayoutMismatchError)
    assert fc.store.tasks() == []
    fc.close()
    with fisherstore.open(path, mode="r") as store:
        assert store.tasks() == []


def test_gradients_from_training_are_collected_once_the_layouts_are_checked():
    model = tiny_model("bert")
    fc = FisherCollector(layouts=bert_layouts(model), loss_fn=masked_lm)
    fc.check_layouts(model, masked_batch())
    loss, n = masked_lm(model, masked_batch())
    loss.backward()
    assert collect_from_grads(fc, model, "train", tokens=n)
    assert len(fc.store.params("train")) == 8


# -- (6) encoder-decoders, and every built-in layout as an override -----------------------------
def test_bart_cross_attention_overrides_pass_and_wrong_ones_name_the_stack():
    model = tiny_model("bart")
    cross = {n: lay for n, lay in layouts_from_model(model).items() if ".encoder_attn." in n and lay.has_heads}
    fc = FisherCollector(layouts=cross, loss_fn=seq2seq_lm)
    fc.collect_fisher(model, seq2seq_batch())
    assert fc.check_layouts(model, seq2seq_batch()).layers == ["decoder.0.cross"]
    wrong = {n: ParamLayout.attention(lay.kind, 2, 16, ndim=len(model.get_parameter(n).shape))
             for n, lay in cross.items()}
    with pytest.raises(LayoutMismatchError, match=r"(?s)attention layer decoder\.0\.cross .*encoder_attn\.q_proj\.weight"):
        FisherCollector(layouts=wrong, loss_fn=seq2seq_lm).collect_fisher(model, seq2seq_batch())


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2", "pythia", "phi3", "opt", "t5"])
def test_every_built_in_layout_passes_as_an_override(arch):
    """No false alarms: GQA (llama, phi3), head_dim != hidden/H (gemma, t5), Conv1D (gpt2), interleaved (pythia)."""
    model = tiny_model(arch)
    lay = layouts_from_model(model)
    enc_dec = model.config.is_encoder_decoder
    report = check_layouts(model, lay, attention_param_names(lay, include_bias=True),
                           seq2seq_batch() if enc_dec else token_batch(), seq2seq_lm if enc_dec else causal_lm)
    assert report.layers == (["encoder.0", "decoder.0", "decoder.0.cross"] if enc_dec else ["0"])
    assert arch in TINY


def test_heads_that_mix_before_o_fail_even_right_layouts_and_verify_layouts_false_skips_the_check():
    """OLMo-2 normalises all heads' queries together, so every head's output moves every Q row."""
    torch.manual_seed(0)
    cfg = T.Olmo2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "eager"
    model = T.Olmo2ForCausalLM(cfg).eval()
    right = {n: lay for n, lay in layouts_from_model(model).items() if lay.has_heads}
    with pytest.raises(LayoutMismatchError, match=r"q_proj\.weight' \(Q\): head 0's attention output"):
        FisherCollector(layouts=right).collect_fisher(model, token_batch())
    fc = FisherCollector(layouts=right, verify_layouts=False)
    fc.collect_fisher(model, token_batch())
    assert fc.check_layouts(model, token_batch()) is None and fc.store.params("default")


class TwoBlocks(nn.Module):
    """Two attentions under one path without layer numbers: each Q/K/V must go with its own O."""

    def __init__(self, reverse_second: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 32)
        self.attn1, self.attn2 = HeadsAttention(), HeadsAttention(reverse=reverse_second)
        self.head = nn.Linear(32, 64)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        return self.head(self.attn2(x + self.attn1(x)))


def test_two_attentions_in_one_layer_are_checked_each_with_its_own_o():
    lay = {n.replace("attn.", a + "."): v for a in ("attn1", "attn2") for n, v in TINY_LAYOUTS.items()}
    batch = token_batch(pad_last=False)
    report = check_layouts(TwoBlocks(), layouts_from_model(TwoBlocks(), overrides=lay), lay, batch, tiny_loss)
    assert report.layers == ["(no layer number) (attn1)", "(no layer number) (attn2)"]
    model = TwoBlocks(reverse_second=True)
    with pytest.raises(LayoutMismatchError) as e:
        check_layouts(model, layouts_from_model(model, overrides=lay), lay, batch, tiny_loss)
    assert "'attn2.q.weight' (Q): head 0's" in str(e.value) and "attn1" not in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_model_on_a_gpu_is_checked_there():
    model = bloom().cuda()
    with pytest.raises(LayoutMismatchError, match="query_key_value.weight"):
        FisherCollector(layouts=bloom_layouts("block")).collect_fisher(model, token_batch())
    fc = FisherCollector(layouts=bloom_layouts("interleaved"))
    fc.collect_fisher(model, token_batch())  # the batch is on the host; the check moves it
    assert fc.check_layouts(model, token_batch()).layers == ["0"]
