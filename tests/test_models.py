"""layouts_from_model against the model itself: gradient ground truth on real HF architectures."""

import contextlib
import inspect
import sys

import pytest
import torch
from torch import nn

from fisherstore import LayoutError, ParamLayout, UnknownParamError
from fisherstore.collect.models import layouts_from_model
from fisherstore.spec.layers import layer_index, layer_keys
from fisherstore.spec.layout import attention_param_names
from tests.models import MASKED, SPEECH, TINY, speech_batch, tiny_model, token_batch

#: Every architecture with a tiny config: each must map with no layouts= and pass the ground truth.
ALL_ARCHS = sorted(TINY) + sorted(MASKED) + sorted(SPEECH)


def _o_module(model, layouts, keys, layer):
    """The output projection module of `layer` (a layer key) and its weight's name."""
    for name, lay in layouts.items():
        if lay.kind == "o" and name.endswith("weight") and keys.get(name) == layer:
            return model.get_submodule(name.rsplit(".", 1)[0]), name
    raise AssertionError("no o projection")


def _batch(model, n, seq):
    if "input_features" in inspect.signature(model.forward).parameters:  # Whisper: audio features, not tokens
        batch = speech_batch(n=n, tgt=seq - 1, model=model, pad_last=False)
        return {"input_features": batch["input_features"], "decoder_input_ids": batch["labels"]}
    batch = token_batch(n=n, seq=seq, pad_last=False)
    if model.config.is_encoder_decoder:  # the decoder needs inputs of its own
        batch["decoder_input_ids"] = token_batch(n=n, seq=seq - 1, seed=1, pad_last=False)["input_ids"]
    return batch


def _layers_to_check(keys):
    """Layer 1 of every attention stream: 1, or encoder.1 / decoder.1 / decoder.1.cross."""
    found = sorted({k for k in keys.values() if k is not None}, key=str)
    return [k for k in found if k == 1 or (isinstance(k, str) and k.split(".")[1] == "1")]


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@contextlib.contextmanager
def _captured_qkv(model):
    """Record the query, key and value states each attention module computes: ``{module: (q, k, v)}``.

    They are the model's own split of its projections (``[batch, heads, seq, head size]``,
    K and V before ``repeat_kv``), taken where it hands them to attention: through
    transformers' attention interface (eager, the modeling file's own function), or, for
    the two classes that attend by hand, at their own split methods. A loss on one head
    of one of them is the ground truth of which rows that head's block occupies.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = {}

    def eager(module, query, key, value, *args, **kwargs):
        seen[module] = (query, key, value)
        return sys.modules[type(module).__module__].eager_attention_forward(module, query, key, value, *args, **kwargs)

    patched = []
    for m in model.modules():
        cls = type(m).__name__
        if cls == "BloomAttention":  # _reshape(fused) -> q, k, v
            def reshape(fused, _m=m, _orig=m._reshape):
                out = _orig(fused)
                seen[_m] = out
                return out
            m._reshape = reshape
            patched.append((m, "_reshape"))
        elif cls == "GPTNeoXJapaneseAttention":  # _attn(q, k, v, mask)
            def attn(q, k, v, *args, _m=m, _orig=m._attn, **kwargs):
                seen[_m] = (q, k, v)
                return _orig(q, k, v, *args, **kwargs)
            m._attn = attn
            patched.append((m, "_attn"))
    ALL_ATTENTION_FUNCTIONS["eager"] = eager
    try:
        yield seen
    finally:
        del ALL_ATTENTION_FUNCTIONS["eager"]
        for m, attr in patched:
            delattr(m, attr)


def _rows_with_grad(g, axis):
    """Per index of the head axis: does the gradient touch it anywhere?"""
    return g.ne(0).any(dim=1 - axis) if g.ndim == 2 else g.ne(0)


def _claimed(lay, length, h, block):
    want = torch.zeros(length, dtype=torch.bool)
    if block in lay.blocks:
        start, stop = lay.head_range(h, block)
        want[start:stop] = True
    return want


def _assert_exact(arch, layer, layouts, shapes, grads, names, h, block, what):
    """Each parameter's gradient touches exactly the indices its layout claims for (h, block), none elsewhere."""
    for name in names:
        lay = layouts[name]
        g = grads.get(name)
        length = shapes[name][lay.head_axis]
        got = torch.zeros(length, dtype=torch.bool) if g is None else _rows_with_grad(g, lay.head_axis)
        want = _claimed(lay, length, h, block)
        assert torch.equal(got, want), (
            f"{arch} {layer} {name} ({lay}): a loss on {what} reaches indices "
            f"{got.nonzero().flatten().tolist()}, the layout claims {want.nonzero().flatten().tolist()}")


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_layouts_match_gradient_ground_truth(arch):
    model = tiny_model(arch)
    layouts = layouts_from_model(model)  # no layouts=: every architecture maps by itself
    batch = _batch(model, n=2, seq=6)
    keys = layer_keys([n for n, lay in layouts.items() if lay.has_heads])
    layers = _layers_to_check(keys)
    assert len(layers) == (3 if model.config.is_encoder_decoder else 1)
    for layer in layers:
        _check_layer(model, layouts, keys, layer, batch, arch)


def _check_layer(model, layouts, keys, layer, batch, arch):
    o_mod, o_name = _o_module(model, layouts, keys, layer)
    headed = [n for n, lay in layouts.items() if keys.get(n) == layer and lay.has_heads and lay.kind != "o"]
    assert headed
    q_name = next(n for n in headed if "Q" in layouts[n].blocks and n.endswith("weight"))
    modules = dict(model.named_modules())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    keep = {}

    def pre_hook(mod, args):
        if "head" in keep:  # zero every head's input to O except one
            x = args[0]
            lo, hi = keep["head"]
            m = torch.zeros_like(x)
            m[..., lo:hi] = 1
            return (x * m,) + tuple(args[1:])
        return None

    handle = o_mod.register_forward_pre_hook(pre_hook)
    try:
        with _captured_qkv(model) as seen:
            model(**batch)
            # the attention module of this layer: the one that holds its Q projection
            attn = [m for m in seen if any(q_name.startswith(n + ".") for n, mm in modules.items() if mm is m)]
            assert len(attn) == 1, f"{arch} {layer}: no captured attention for {q_name}"
            q, k, v = seen[attn[0]]
            H, H_kv = q.shape[1], k.shape[1]
            assert v.shape[1] == H_kv and H % H_kv == 0
            heads = sorted({0, H - 1, 1 if H_kv < H else 2})  # includes the last head and a GQA-shared kv head
            for h in heads:
                kh = h // (H // H_kv)  # HF repeat_kv: query head h reads key/value head h // (H / H_kv)
                for block, idx, states in (("Q", h, 0), ("K", kh, 1), ("V", kh, 2)):
                    torch.manual_seed(h)
                    model(**batch)
                    x = seen[attn[0]][states][:, idx]
                    grads = _grads(model, (x * torch.randn_like(x)).sum())
                    _assert_exact(arch, layer, layouts, shapes, grads, headed + [o_name], h, block,
                                  f"{block} states of head {idx}")
        # O: keep only head h at O's input (HF merges heads as [..., H * d_v], head h at h * d_v);
        # the O weight's gradient then lives on h's slice.
        d_o = v.shape[-1]
        for h in heads:
            keep["head"] = (h * d_o, (h + 1) * d_o)
            out = model(**batch)
            grads = _grads(model, (out.logits * torch.randn_like(out.logits)).sum())
            _assert_exact(arch, layer, layouts, shapes, grads, [o_name], h, "O", f"O's input of head {h} only")
    finally:
        handle.remove()


def test_config_values_are_read_not_guessed():
    lay = layouts_from_model(tiny_model("gemma"))
    q = lay["model.layers.0.self_attn.q_proj.weight"]
    assert (q.num_heads, q.num_kv_heads, q.head_dim) == (4, 1, 12)  # head_dim 12 != 32 // 4
    gpt2 = layouts_from_model(tiny_model("gpt2"))
    assert gpt2["transformer.h.0.attn.c_attn.weight"] == ParamLayout.attention("qkv", 4, 8, fused="conv1d")
    assert gpt2["transformer.h.0.attn.c_proj.weight"].head_axis == 0  # Conv1D: heads are rows
    assert gpt2["transformer.h.0.attn.c_proj.bias"] == ParamLayout("bias")
    assert gpt2["transformer.h.0.attn.c_attn.bias"].kind == "qkv"
    qwen = layouts_from_model(tiny_model("qwen2"))
    assert qwen["model.layers.0.self_attn.k_proj.bias"].head_range(3, "K") == (8, 16)
    pythia = layouts_from_model(tiny_model("pythia"))
    assert pythia["gpt_neox.layers.0.attention.query_key_value.weight"].fused == "interleaved"
    assert pythia["gpt_neox.embed_in.weight"] == ParamLayout("embedding")
    llama = layouts_from_model(tiny_model("llama"))
    assert llama["model.layers.0.mlp.up_proj.weight"] == ParamLayout("mlp")
    assert llama["model.norm.weight"] == ParamLayout("norm")
    assert len(attention_param_names(llama)) == 8


def test_unknown_attention_module_is_an_error_naming_it():
    with pytest.raises(LayoutError, match=r"'attn' \(_WeirdAttention, projections: wq, wo\).*layouts="):
        layouts_from_model(_Block())


def test_encoder_decoder_geometry_is_read_from_the_modules():
    t5 = layouts_from_model(tiny_model("t5"))
    q = t5["decoder.block.1.layer.1.EncDecAttention.q.weight"]
    assert (q.num_heads, q.num_kv_heads, q.head_dim, q.head_axis) == (4, 4, 6, 0)  # d_kv=6: H*d=24 != d_model=32
    o = t5["encoder.block.0.layer.0.SelfAttention.o.weight"]
    assert (o.kind, o.head_dim, o.head_axis) == ("o", 6, 1)
    assert t5["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == ParamLayout("embedding")
    bart = layouts_from_model(tiny_model("bart"))
    k = bart["model.decoder.layers.0.encoder_attn.k_proj.weight"]
    assert (k.kind, k.num_heads, k.head_dim) == ("k", 4, 8)
    assert bart["model.decoder.layers.0.encoder_attn.k_proj.bias"].head_range(2, "K") == (16, 24)
    assert bart["model.decoder.layers.0.encoder_attn.out_proj.bias"] == ParamLayout("bias")
    assert len(attention_param_names(bart)) == len(attention_param_names(t5)) == 24


def test_layer_keys_tell_stacks_apart_and_stay_ints_for_one_stack():
    bart = attention_param_names(layouts_from_model(tiny_model("bart")))
    keys = layer_keys(bart)
    assert keys["model.encoder.layers.1.self_attn.q_proj.weight"] == "encoder.1"
    assert keys["model.decoder.layers.1.self_attn.q_proj.weight"] == "decoder.1"
    assert keys["model.decoder.layers.1.encoder_attn.q_proj.weight"] == "decoder.1.cross"
    assert len(set(keys.values())) == 6  # 2 encoder, 2 decoder self, 2 decoder cross
    t5 = layer_keys(attention_param_names(layouts_from_model(tiny_model("t5"))))
    assert t5["decoder.block.1.layer.1.EncDecAttention.k.weight"] == "decoder.1.cross"  # block 1, not sub-layer 1
    assert t5["decoder.block.0.layer.0.SelfAttention.k.weight"] == "decoder.0"
    for arch, name in (("llama", "model.layers.1.self_attn.q_proj.weight"), ("gpt2", "transformer.h.1.attn.c_attn.weight"),
                       ("opt", "model.decoder.layers.1.self_attn.q_proj.weight")):
        keys = layer_keys(attention_param_names(layouts_from_model(tiny_model(arch))))
        assert keys[name] == 1 and set(keys.values()) == {0, 1}, arch  # one stack: ints, as layer_index gives
        assert layer_index(name) == 1
    # two stacks neither path calls encoder/decoder: keyed by their paths
    assert layer_keys(["vision.layers.0.attn.q.weight", "text.layers.0.attn.q.weight"]) == {
        "vision.layers.0.attn.q.weight": "vision.layers.0", "text.layers.0.attn.q.weight": "text.layers.0"}


class _WeirdAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(8, 8)
        self.wo = nn.Linear(8, 8)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _WeirdAttention()


def test_overrides_cover_an_unknown_attention_module():
    q, o = ParamLayout.attention("q", 2, 4), ParamLayout.attention("o", 2, 4)
    lay = layouts_from_model(_Block(), overrides={"attn.wq.weight": q, "attn.wo.weight": o})
    assert lay["attn.wq.weight"] == q and lay["attn.wo.weight"] == o
    assert lay["attn.wq.bias"] == ParamLayout("bias")  # not covered: a plain vector, no heads
    # overrides win over recognised layouts too
    llama = tiny_model("llama")
    plain = {"model.layers.0.self_attn.q_proj.weight": ParamLayout("other")}
    assert layouts_from_model(llama, overrides=plain)["model.layers.0.self_attn.q_proj.weight"] == ParamLayout("other")
    # a module only partly covered still fails, naming what is missing and the fix
    with pytest.raises(LayoutError) as e:
        layouts_from_model(_Block(), overrides={"attn.wq.weight": q})
    assert "'attn.wo.weight'" in str(e.value) and "layouts=" in str(e.value) and "'attn.wq.weight'" not in str(e.value)
    with pytest.raises(UnknownParamError, match="names no parameter"):
        layouts_from_model(_Block(), overrides={"attn.wk.weight": q})
    with pytest.raises(LayoutError, match="attn.wq.weight"):  # 2 heads of 8 do not fit 8 rows
        layouts_from_model(_Block(), overrides={"attn.wq.weight": ParamLayout.attention("q", 2, 8),
                                                "attn.wo.weight": o})


def test_overrides_rescue_a_recognised_module_whose_geometry_does_not_fit():
    llama = tiny_model("llama")
    attn = llama.model.layers[0].self_attn
    attn.head_dim = 5  # the module now says something its projections contradict
    with pytest.raises(LayoutError, match=r"model.layers.0.self_attn.*layouts=.*'model.layers.0.self_attn.o_proj.weight'"):
        layouts_from_model(llama)
    pre = "model.layers.0.self_attn"
    fix = {f"{pre}.{p}.weight": ParamLayout.attention(k, 4, 8, 2 if k in "kv" else None)
           for p, k in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"))}
    lay = layouts_from_model(llama, overrides=fix)
    assert lay[f"{pre}.k_proj.weight"].head_range(3, "K") == (8, 16)
    assert lay["model.layers.1.self_attn.q_proj.weight"].head_dim == 8  # other layers: automatic as before


def _tiny_mixtral(seed=0):
    """A real Mixtral (transformers' own classes, random weights) whose experts are 8 MiB each."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.MixtralConfig(vocab_size=64, hidden_size=256, intermediate_size=4096, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=2)
    cfg._attn_implementation = "eager"
    cfg.use_cache = False
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def test_moe_experts_are_chunked_like_large_matrices_and_store_grad_squared(tmp_path):
    import fisherstore
    from fisherstore.losses import causal_lm

    model = _tiny_mixtral()
    experts = {n: p for n, p in model.named_parameters() if p.ndim == 3}
    assert set(experts) == {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
    assert tuple(experts["model.layers.0.mlp.experts.gate_up_proj"].shape) == (2, 8192, 256)  # [E, 2I, H]
    batch = token_batch(n=4, seq=8, seed=3)
    with fisherstore.FisherCollector(backend="zarr", path=tmp_path / "s", mode="w", params="all") as fc:
        fc.collect_fisher(model, batch, task="t")
        for name, p in experts.items():
            info = fc.store.param("t", name)
            nbytes = 4 * torch.Size(info.chunks).numel()
            # one expert's rows per chunk, a few MiB: not a whole 8 MiB expert (448 MiB at Mixtral-8x7B)
            assert info.chunks[0] == 1 and info.chunks[2] == p.shape[2] and nbytes <= 4 << 20, (name, info.chunks)
        fc.flush()
    loss, n_tokens = causal_lm(model, batch)
    grads = _grads(model, loss)
    with fisherstore.open(tmp_path / "s", mode="r") as s:
        for name in experts:
            want = grads[name] ** 2 / n_tokens  # one step, one micro-batch: the bias-corrected EMA is x itself
            got = s.fisher("t", name)
            assert torch.allclose(got.load(), want, rtol=1e-4, atol=1e-6 * float(want.max()))
            e1 = got[1, :128]  # expert 1's first rows: one chunk
            assert torch.allclose(e1, want[1, :128], rtol=1e-4, atol=1e-6 * float(want.max()))


def test_conv1d_and_gpt_neox_are_recognised_by_class_not_name():
    from fisherstore.collect.models import _is_conv1d, _is_interleaved_qkv

    gpt2, pythia = tiny_model("gpt2"), tiny_model("pythia")
    assert _is_conv1d(gpt2.transformer.h[0].attn.c_attn) and not _is_conv1d(nn.Linear(4, 3))
    assert _is_interleaved_qkv(pythia.gpt_neox.layers[0].attention)
    assert not _is_interleaved_qkv(gpt2.transformer.h[0].attn)

    class Conv1D(nn.Module):  # the name alone, a Linear's [out, in] weight: not a Conv1D
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 4))

    class VendoredConv(nn.Module):  # a GPT-2 Conv1D copy under another name: [nx, nf] = [in, out]
        def __init__(self, nx=4, nf=3):
            super().__init__()
            self.nx, self.nf = nx, nf
            self.weight = nn.Parameter(torch.zeros(nx, nf))

    assert not _is_conv1d(Conv1D()) and _is_conv1d(VendoredConv())

    class GPTNeoXLikeAttention(nn.Module):  # a GPT-NeoX-named module: its layout is not known, so it is refused
        def __init__(self):
            super().__init__()
            self.query_key_value, self.dense = nn.Linear(8, 24), nn.Linear(8, 8)

    with pytest.raises(LayoutError, match="GPTNeoXLikeAttention"):
        layouts_from_model(nn.ModuleDict({"attn": GPTNeoXLikeAttention()}))


def test_issue_20_architectures_map_by_default_with_their_fusions():
    from tests.models import bert_layouts

    A = ParamLayout.attention
    expect = {
        "falcon": ("transformer.h.0.self_attention.query_key_value.weight", A("qkv", 4, 8, 2, fused="grouped")),
        "falcon_mqa": ("transformer.h.0.self_attention.query_key_value.weight", A("qkv", 4, 8, 1, fused="block")),
        "falcon_mha": ("transformer.h.0.self_attention.query_key_value.bias",
                       A("qkv", 4, 8, fused="interleaved", ndim=1)),
        "bloom": ("transformer.h.0.self_attention.query_key_value.weight", A("qkv", 4, 8, fused="interleaved")),
        "gpt_bigcode": ("transformer.h.0.attn.c_attn.weight", A("qkv", 4, 8, 1, fused="block")),
        "gpt_bigcode_mha": ("transformer.h.0.attn.c_attn.weight", A("qkv", 4, 8, fused="interleaved")),
        "codegen": ("transformer.h.0.attn.qkv_proj.weight", A("qkv", 8, 4, fused="sharded", shards=4, order="QVK")),
        "deepseek_v3": ("model.layers.0.self_attn.kv_b_proj.weight", A("kv", 4, 4, fused="interleaved", v_head_dim=6)),
        "deepseek_v2": ("model.layers.0.self_attn.q_proj.weight", A("q", 4, 6)),
        "roberta": ("roberta.encoder.layer.1.attention.output.dense.weight", A("o", 4, 8)),
        "whisper": ("model.decoder.layers.0.encoder_attn.k_proj.weight", A("k", 4, 8)),
    }
    for arch, (name, lay) in expect.items():
        assert layouts_from_model(tiny_model(arch))[name] == lay, arch
    ds = layouts_from_model(tiny_model("deepseek_v3"))
    pre = "model.layers.0.self_attn"
    assert ds[f"{pre}.q_b_proj.weight"] == A("q", 4, 6) and ds[f"{pre}.o_proj.weight"] == A("o", 4, 6)
    assert ds[f"{pre}.q_a_proj.weight"] == ds[f"{pre}.kv_a_proj_with_mqa.weight"] == ParamLayout("latent")
    assert ds[f"{pre}.kv_a_layernorm.weight"] == ParamLayout("norm")
    bert = tiny_model("bert")
    auto = layouts_from_model(bert)
    assert {n: auto[n] for n in bert_layouts(bert)} == bert_layouts(bert)  # the hand-written ones, found alone
    assert auto["bert.encoder.layer.0.attention.self.query.bias"] == A("q", 4, 8, ndim=1)
    assert auto["bert.encoder.layer.0.attention.output.dense.bias"] == ParamLayout("bias")
    assert auto["bert.encoder.layer.0.attention.output.LayerNorm.weight"] == ParamLayout("norm")


def test_what_issue_20_leaves_unmapped_is_refused_naming_the_module():
    import transformers as T

    cfg = T.GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64, multi_query=False,
                             add_cross_attention=True)
    model = T.GPTBigCodeForCausalLM(cfg)
    with pytest.raises(LayoutError, match=r"GPTBigCode cross-attention 'transformer.h.0.crossattention'.*layouts="):
        layouts_from_model(model)
    codegen = tiny_model("codegen")
    attn = codegen.transformer.h[0].attn
    attn.mp_num = 3  # 8 heads do not split into 3 shards
    with pytest.raises(LayoutError, match=r"H=8 heads do not split evenly into mp_num=3.*layouts="):
        layouts_from_model(codegen)
