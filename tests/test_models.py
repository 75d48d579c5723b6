"""layouts_from_model against the model itself: gradient ground truth on real HF architectures."""

import pytest
import torch
from torch import nn

from fisherstore import LayoutError, ParamLayout
from fisherstore.models import attention_param_names, layer_index, layouts_from_model
from tests.models import TINY, tiny_model, token_batch


def _o_module(model, layouts, layer):
    """The output projection module of `layer` and its weight's name."""
    for name, lay in layouts.items():
        if lay.kind == "o" and name.endswith("weight") and layer_index(name) == layer:
            return model.get_submodule(name.rsplit(".", 1)[0]), name
    raise AssertionError("no o projection")


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _support(lay, shape, h, block):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[lay.head_index(h, block, len(shape))] = True
    return mask


@pytest.mark.parametrize("arch", sorted(TINY))
def test_layouts_match_gradient_ground_truth(arch):
    model = tiny_model(arch)
    layouts = layouts_from_model(model)
    batch = token_batch(n=2, seq=6, pad_last=False)
    layer = 1
    o_mod, o_name = _o_module(model, layouts, layer)
    o_lay = layouts[o_name]
    H, Hkv = o_lay.num_heads, o_lay.num_kv_heads
    heads = sorted({0, H - 1, 1 if Hkv < H else 2})  # includes the last head and a GQA-shared kv head
    captured = {}
    keep = {}

    def pre_hook(mod, args):
        x = args[0]
        captured["x"] = x
        if "head" in keep:  # zero every head's input to O except one
            h = keep["head"]
            m = torch.zeros_like(x)
            m[..., h * o_lay.head_dim:(h + 1) * o_lay.head_dim] = 1
            return (x * m,) + tuple(args[1:])
        return None

    handle = o_mod.register_forward_pre_hook(pre_hook)
    qkv_names = [n for n, lay in layouts.items() if layer_index(n) == layer and lay.kind in ("q", "k", "v", "qkv")]
    assert qkv_names
    try:
        for h in heads:
            # Q/K/V: the loss is head h's attention output (the input of O), so only the
            # q rows of h and the k/v rows of its kv head can carry gradient.
            keep.clear()
            torch.manual_seed(h)
            out = model(**batch)
            x = captured["x"]
            r = torch.randn_like(x[..., : o_lay.head_dim])
            loss = (x[..., h * o_lay.head_dim:(h + 1) * o_lay.head_dim] * r).sum()
            grads = _grads(model, loss)
            for name in qkv_names:
                lay, g = layouts[name], grads[name]
                support = torch.zeros(g.shape, dtype=torch.bool)
                for b in lay.blocks:
                    support |= _support(lay, g.shape, h, b)
                assert not g[~support].any(), f"{arch} {name} head {h}: gradient outside {lay}"
                for b in lay.blocks:
                    blk = g[lay.head_index(h, b, g.ndim)]
                    assert blk.abs().sum() > 0, f"{arch} {name} head {h} block {b}: no gradient inside"
            # O: keep only head h at O's input; the O weight's gradient lives on h's slice.
            keep["head"] = h
            out = model(**batch)
            loss = (out.logits * torch.randn_like(out.logits)).sum()
            g = _grads(model, loss)[o_name]
            support = _support(o_lay, g.shape, h, "O")
            assert not g[~support].any(), f"{arch} {o_name} head {h}: gradient outside O block"
            assert g[support].abs().sum() > 0
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
    class WeirdAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(8, 8)
            self.wo = nn.Linear(8, 8)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = WeirdAttention()

    with pytest.raises(LayoutError, match=r"'attn' \(WeirdAttention, projections: wq, wo\)"):
        layouts_from_model(Block())
