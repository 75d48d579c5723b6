"""Layouts from models: walk a PyTorch / Hugging Face model and say how each parameter is laid out.

``layouts_from_model(model)`` maps every parameter name to a :class:`ParamLayout`.
Attention projections get head layouts read from the modules and the config
(``num_attention_heads``/``n_head``, ``num_key_value_heads``, ``head_dim`` when present,
never ``hidden // H`` when the model says otherwise). An attention module whose
projections it does not recognise raises :class:`LayoutError` naming the module: it never
guesses.

Recognised attention modules:

==========================  =====================================  ========================
projections                 models                                 layout
==========================  =====================================  ========================
q_proj k_proj v_proj o_proj LLaMA, Mistral, Qwen2, Gemma, ...      split Linear
q_proj k_proj v_proj        OPT (``out_proj``)                     split Linear
out_proj
qkv_proj o_proj             Phi-3                                  fused, block-contiguous
c_attn c_proj (Conv1D)      GPT-2                                  fused Conv1D, transposed
query_key_value dense       GPT-NeoX / Pythia                      interleaved [H, 3, d]
==========================  =====================================  ========================

Usage::

    layouts = fisherstore.layouts_from_model(model)
    layouts["model.layers.0.self_attn.k_proj.weight"]
    # ParamLayout('k', H=32, H_kv=8, d=128, axis=0)
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .errors import LayoutError
from .layout import ParamLayout

__all__ = ["layouts_from_model", "layer_index", "attention_param_names", "model_description"]

_SPLIT_O = ("o_proj", "out_proj", "dense")


def _cfg(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def _first(obj: Any, *names: str) -> Any:
    for n in names:
        v = getattr(obj, n, None) if obj is not None else None
        if v is not None:
            return v
    return None


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D"


def _proj(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def _heads(attn: nn.Module, cfg: Any, name: str) -> tuple[int, int, int]:
    H = _first(attn, "num_heads", "num_attention_heads", "n_head")
    H = H or _first(cfg, "num_attention_heads", "n_head", "num_heads")
    if not H:
        raise LayoutError(f"attention module {name!r}: cannot find the number of heads in the module or config")
    groups = _first(attn, "num_key_value_groups")
    H_kv = _first(attn, "num_key_value_heads") or _first(cfg, "num_key_value_heads", "num_kv_heads")
    if H_kv is None and groups:
        H_kv = H // groups
    H_kv = H_kv or H
    d = _first(attn, "head_dim", "head_size") or _first(cfg, "head_dim")
    if d is None:
        hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
        if not hidden or hidden % H:
            raise LayoutError(f"attention module {name!r}: cannot determine head_dim (no head_dim, hidden={hidden}, H={H})")
        d = hidden // H
    return int(H), int(H_kv), int(d)


def _attention_layouts(name: str, attn: nn.Module, cfg: Any) -> dict[str, ParamLayout] | None:
    """Layouts of one attention module's parameters, or None if it is not one we map."""
    kids = dict(attn.named_children())
    prefix = f"{name}." if name else ""
    out: dict[str, ParamLayout] = {}

    def add(child: str, kind: str, **kw: Any) -> None:
        mod = kids[child]
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{prefix}{child}.{pname}"
            if pname == "bias" and kind == "o":
                out[full] = ParamLayout("bias")  # the o bias is added after the heads merge
                continue
            lay = ParamLayout.attention(kind, H, d, H_kv, ndim=p.ndim, **kw)
            lay.validate_shape(tuple(p.shape), full)
            out[full] = lay

    cls = type(attn).__name__
    if {"q_proj", "k_proj", "v_proj"} <= kids.keys() and any(o in kids for o in _SPLIT_O):
        H, H_kv, d = _heads(attn, cfg, name)
        for child, kind in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
            add(child, kind, transposed=_is_conv1d(kids[child]))
        o = next(o for o in _SPLIT_O if o in kids)
        add(o, "o", transposed=_is_conv1d(kids[o]))
        return out
    if {"qkv_proj", "o_proj"} <= kids.keys() and isinstance(kids["qkv_proj"], nn.Linear):
        H, H_kv, d = _heads(attn, cfg, name)
        add("qkv_proj", "qkv", fused="block")
        add("o_proj", "o")
        return out
    if {"c_attn", "c_proj"} <= kids.keys() and _is_conv1d(kids["c_attn"]) and "q_attn" not in kids:
        H, H_kv, d = _heads(attn, cfg, name)
        add("c_attn", "qkv", fused="conv1d")
        add("c_proj", "o", transposed=True)
        return out
    if {"query_key_value", "dense"} <= kids.keys() and cls.startswith("GPTNeoX"):
        H, H_kv, d = _heads(attn, cfg, name)
        add("query_key_value", "qkv", fused="interleaved")
        add("dense", "o")
        return out
    return None


def layouts_from_model(model: nn.Module) -> dict[str, ParamLayout]:
    """Map every parameter of ``model`` to its :class:`ParamLayout`.

    Attention projections get head layouts; the rest get ``embedding``, ``norm``,
    ``bias``, ``mlp`` or ``other``.

    Raises:
        LayoutError: an attention module has projections this function cannot map
            (the message names the module and its class).
    """
    cfg = _cfg(model)
    layouts: dict[str, ParamLayout] = {}
    mapped: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(m + ".") for m in mapped):
            continue
        got = _attention_layouts(name, mod, cfg)
        if got is not None:
            layouts.update(got)
            mapped.append(name)
            continue
        if "Attention" in type(mod).__name__ and any(_proj(c) for c in mod.children()):
            kids = ", ".join(n for n, c in mod.named_children() if _proj(c))
            raise LayoutError(
                f"cannot map attention module {name!r} ({type(mod).__name__}, projections: {kids}) to "
                "head layouts; fisherstore knows split q/k/v/o, Phi-3 qkv_proj, GPT-2 c_attn and "
                "GPT-NeoX query_key_value. Pass explicit ParamLayouts for this model."
            )
    kinds = {id(p): _plain_kind(n, m) for n, m in model.named_modules() for p in m.parameters(recurse=False)}
    for pname, p in model.named_parameters():
        if pname not in layouts:
            kind = "bias" if pname.endswith("bias") and p.ndim == 1 and kinds.get(id(p)) != "norm" else kinds.get(id(p), "other")
            layouts[pname] = ParamLayout(kind)
    return layouts


def _plain_kind(name: str, mod: nn.Module) -> str:
    cls = type(mod).__name__
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if "Norm" in cls or isinstance(mod, nn.LayerNorm):
        return "norm"
    if re.search(r"(^|\.)(mlp|feed_forward|ffn|fc\d?|dense_h_to_4h|dense_4h_to_h)(\.|$)", name):
        return "mlp"
    return "other"


def attention_param_names(layouts: dict[str, ParamLayout], include_bias: bool = False) -> list[str]:
    """The parameters with head layouts (attention projections), weights only by default."""
    return [n for n, lay in layouts.items() if lay.has_heads and (include_bias or not n.endswith("bias"))]


_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer number in a parameter name (``model.layers.3.self_attn...`` → 3)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def model_description(model: nn.Module) -> dict[str, Any]:
    """A JSON-ready description of a model for the store's task metadata."""
    cfg = _cfg(model)
    desc: dict[str, Any] = {"class": type(model).__name__}
    if cfg is not None:
        desc.update(
            architecture=(getattr(cfg, "architectures", None) or [None])[0] or getattr(cfg, "model_type", None),
            num_heads=_first(cfg, "num_attention_heads", "n_head"),
            num_kv_heads=_first(cfg, "num_key_value_heads"),
            head_dim=_first(cfg, "head_dim"),
            num_layers=_first(cfg, "num_hidden_layers", "n_layer"),
            hidden=_first(cfg, "hidden_size", "n_embd"),
        )
    return {k: v for k, v in desc.items() if v is not None}
