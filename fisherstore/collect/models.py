"""Layouts from models: walk a PyTorch / Hugging Face model and say how each parameter is laid out.

``layouts_from_model(model)`` maps every parameter name to a :class:`ParamLayout`.
Attention projections get head layouts read from the modules and the config
(``num_attention_heads``/``n_head``, ``num_key_value_heads``, ``head_dim`` when present,
never ``hidden // H`` when the model says otherwise). An attention module whose
projections it does not recognise raises :class:`LayoutError` naming the module: it never
guesses.

Recognised attention modules (docs/architectures.md lists every architecture tested):

===============================  =====================================  ===============================
projections                      models                                 layout
===============================  =====================================  ===============================
q_proj k_proj v_proj o_proj      LLaMA, Mistral, Qwen2, Gemma, ...      split Linear
q_proj k_proj v_proj             OPT, BART, mBART, Marian, Whisper      split Linear
out_proj / dense                 (``out_proj``; BART's decoder cross-
                                 attention is ``encoder_attn``), Phi
q k v o (``T5Attention``)        T5, mT5, UMT5 (``SelfAttention``,       split Linear, d = ``d_kv``
                                 ``EncDecAttention``)                   (H·d need not be d_model)
self.query/key/value             BERT, RoBERTa (``BertAttention``:      split Linear, d =
output.dense                     its ``self`` and ``output`` children)  ``attention_head_size``
qkv_proj o_proj                  Phi-3                                  fused, block-contiguous
c_attn c_proj (Conv1D)           GPT-2                                  fused Conv1D, transposed
query_key_value dense            GPT-NeoX / Pythia, Bloom (by class)    interleaved [H, 3, d]
query_key_value dense            Falcon (by class): new decoder         grouped [H_kv, g+2, d];
                                 architecture / multi-query / neither   block, H_kv = 1; interleaved
c_attn (Linear) c_proj           GPTBigCode (by class): multi-query     block, H_kv = 1; interleaved
                                 / not                                  [H, 3, d]
qkv_proj out_proj                CodeGen (by class)                     sharded: ``mp_num`` shards of
                                                                        (Q, V, K), ``order="QVK"``
q_proj or q_a_proj/q_b_proj,     DeepSeek-V2/V3 multi-head latent       Q d = nope + rope; kv_b_proj
kv_a_proj_with_mqa, kv_b_proj,   attention (MLA)                        kind ``"kv"``, per head K
o_proj                                                                  (nope) then V (``v_head_dim``);
                                                                        O d = ``v_head_dim``; the
                                                                        shared ``q_a_proj`` and
                                                                        ``kv_a_proj_with_mqa`` are
                                                                        ``"latent"`` (no heads)
===============================  =====================================  ===============================

Any other model can be collected by saying how its projections are laid out:
``layouts_from_model(model, overrides={name: ParamLayout.attention(...)})`` (the
collector's ``layouts=``) takes the given layouts over its own and does not raise for an
attention module whose projection weights they cover.

Models with several attention stacks (an encoder-decoder's encoder self-attention,
decoder self-attention and decoder cross-attention) are told apart by
:func:`fisherstore.spec.layers.layer_keys`: ``"encoder.3"``, ``"decoder.3"``, ``"decoder.3.cross"``.

Usage::

    layouts = fisherstore.layouts_from_model(model)
    layouts["model.layers.0.self_attn.k_proj.weight"]
    # ParamLayout('k', H=32, H_kv=8, d=128, axis=0)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import InvalidArgumentError, LayoutError, UnknownParamError, close_matches
from ..spec.layout import ParamLayout

__all__ = ["layouts_from_model", "model_description"]

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


def _hf_class(module: str, name: str) -> type | None:
    """The transformers class ``transformers.<module>.<name>``, if that module is loaded.

    A model built from a transformers class has loaded its module, so an ``isinstance``
    check needs no import of transformers (which is optional and slow to import).
    """
    mod = sys.modules.get(f"transformers.{module}")
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _is_conv1d(mod: nn.Module) -> bool:
    """GPT-2's Conv1D: a Linear stored ``[in, out]`` (``weight`` is ``[nx, nf]``).

    transformers' own class by ``isinstance``; a copy of it (remote code, vendored GPT-2s)
    by what makes it a Conv1D, its ``nx``/``nf`` and a weight of that shape, never by name.
    """
    cls = _hf_class("pytorch_utils", "Conv1D")
    if cls is not None and isinstance(mod, cls):
        return True
    w = getattr(mod, "weight", None)
    nx, nf = getattr(mod, "nx", None), getattr(mod, "nf", None)
    return isinstance(nx, int) and isinstance(nf, int) and isinstance(w, nn.Parameter) and tuple(w.shape) == (nx, nf)


#: Attention classes whose fused ``query_key_value`` is interleaved per head ``[H, 3, d]``.
_INTERLEAVED = (("models.gpt_neox.modeling_gpt_neox", "GPTNeoXAttention"),
                ("models.gpt_neox_japanese.modeling_gpt_neox_japanese", "GPTNeoXJapaneseAttention"),
                ("models.bloom.modeling_bloom", "BloomAttention"))
#: Classes whose fused projection's split depends on flags read off the module (see _by_class).
_FALCON = ("models.falcon.modeling_falcon", "FalconAttention")
_BIGCODE = ("models.gpt_bigcode.modeling_gpt_bigcode", "GPTBigCodeAttention")
_CODEGEN = ("models.codegen.modeling_codegen", "CodeGenAttention")


def _is_interleaved_qkv(attn: nn.Module) -> bool:
    """GPT-NeoX-style attention: the ``query_key_value`` split cannot be told from shapes, so by class."""
    classes = tuple(c for c in (_hf_class(m, n) for m, n in _INTERLEAVED) if c is not None)
    return bool(classes) and isinstance(attn, classes)


def _is_a(attn: nn.Module, where: tuple[str, str]) -> bool:
    """``attn`` is an instance of transformers' class ``where`` (module, name), when that module is loaded."""
    cls = _hf_class(*where)
    return cls is not None and isinstance(attn, cls)


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
    d = _first(attn, "head_dim", "head_size", "attention_head_size") or _first(cfg, "head_dim")
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

    def add(child: str, kind: str, H: int, d: int, H_kv: int | None = None, **kw: Any) -> None:
        mod = attn.get_submodule(child)  # a dotted path reaches a grandchild (BERT's self.query)
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{prefix}{child}.{pname}"
            if pname == "bias" and kind == "o":
                out[full] = ParamLayout("bias")  # the o bias is added after the heads merge
                continue
            lay = ParamLayout.attention(kind, H, d, H_kv, ndim=p.ndim, **kw)
            lay.validate_shape(tuple(p.shape), full)
            out[full] = lay

    if {"q", "k", "v", "o"} <= kids.keys() and hasattr(attn, "key_value_proj_dim") and hasattr(attn, "n_heads"):
        # T5Attention: its own n_heads and key_value_proj_dim (config d_kv) are the geometry;
        # inner_dim = n_heads·d_kv need not equal d_model, so hidden // H would be wrong.
        H = int(attn.n_heads)
        d = int(attn.key_value_proj_dim)
        if not all(isinstance(kids[c], nn.Linear) for c in "qkvo"):
            return None
        for child, kind in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o")):
            add(child, kind, H, d)
        return out
    if {"kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} <= kids.keys() and all(
            hasattr(attn, a) for a in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")):
        return _mla_layouts(attn, kids, prefix, add, out)
    if _is_bert_like(kids):
        H, H_kv, d = _heads(kids["self"], cfg, name)
        for child, kind in (("self.query", "q"), ("self.key", "k"), ("self.value", "v"), ("output.dense", "o")):
            add(child, kind, H, d, H_kv)
        return out
    if {"q_proj", "k_proj", "v_proj"} <= kids.keys() and any(o in kids for o in _SPLIT_O):
        H, H_kv, d = _heads(attn, cfg, name)
        for child, kind in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
            add(child, kind, H, d, H_kv, transposed=_is_conv1d(kids[child]))
        o = next(o for o in _SPLIT_O if o in kids)
        add(o, "o", H, d, H_kv, transposed=_is_conv1d(kids[o]))
        return out
    by_class = _by_class(name, attn, kids, add, out)
    if by_class is not None:
        return by_class
    if {"qkv_proj", "o_proj"} <= kids.keys() and isinstance(kids["qkv_proj"], nn.Linear):
        H, H_kv, d = _heads(attn, cfg, name)
        add("qkv_proj", "qkv", H, d, H_kv, fused="block")
        add("o_proj", "o", H, d, H_kv)
        return out
    if {"c_attn", "c_proj"} <= kids.keys() and _is_conv1d(kids["c_attn"]) and "q_attn" not in kids:
        H, H_kv, d = _heads(attn, cfg, name)
        add("c_attn", "qkv", H, d, H_kv, fused="conv1d")
        add("c_proj", "o", H, d, H_kv, transposed=True)
        return out
    if {"query_key_value", "dense"} <= kids.keys() and _is_interleaved_qkv(attn):
        H, H_kv, d = _heads(attn, cfg, name)
        add("query_key_value", "qkv", H, d, H_kv, fused="interleaved")
        add("dense", "o", H, d, H_kv)
        return out
    return None


def _is_bert_like(kids: Mapping[str, nn.Module]) -> bool:
    """BertAttention / RobertaAttention: a ``self`` child with query/key/value and an ``output`` child with dense."""
    inner, post = kids.get("self"), kids.get("output")
    if inner is None or post is None:
        return False
    qkv = [getattr(inner, c, None) for c in ("query", "key", "value")]
    return all(isinstance(m, nn.Linear) for m in qkv) and isinstance(getattr(post, "dense", None), nn.Linear)


def _mla_layouts(attn: nn.Module, kids: Mapping[str, nn.Module], prefix: str, add: Any,
                 out: dict[str, ParamLayout]) -> dict[str, ParamLayout]:
    """DeepSeek-V2/V3 multi-head latent attention, read from the module's own head sizes.

    A query head is ``qk_nope_head_dim + qk_rope_head_dim`` rows of ``q_proj`` (or
    ``q_b_proj``); ``kv_b_proj`` is viewed per head as ``[k_nope, v]`` (HF ``expand_kv``),
    so its K block is ``qk_nope_head_dim`` rows and its V block the next ``v_head_dim``; O
    takes ``v_head_dim`` columns per head. Every head has its own K and V (H_kv = H).
    The shared rope key lives in ``kv_a_proj_with_mqa``, which with ``q_a_proj`` is a
    low-rank projection every head reads: kind ``"latent"``, no head owns a row of it.
    """
    H = _first(attn, "num_heads", "num_attention_heads") or _first(getattr(attn, "config", None), "num_attention_heads")
    dn, dr, dv = int(attn.qk_nope_head_dim), int(attn.qk_rope_head_dim), int(attn.v_head_dim)
    q = "q_b_proj" if "q_b_proj" in kids else "q_proj"
    if q not in kids or not H:
        raise LayoutError(f"MLA attention {prefix.rstrip('.')!r}: no q_proj or q_b_proj, or no number of heads")
    H = int(H)
    add(q, "q", H, dn + dr)
    add("kv_b_proj", "kv", H, dn, fused="interleaved", v_head_dim=dv)
    add("o_proj", "o", H, dv)
    for shared in ("q_a_proj", "kv_a_proj_with_mqa"):
        w = getattr(kids.get(shared), "weight", None)
        if w is not None:
            out[f"{prefix}{shared}.weight"] = ParamLayout("latent")  # its bias stays a plain "bias"
    return out


def _by_class(name: str, attn: nn.Module, kids: Mapping[str, nn.Module], add: Any,
              out: dict[str, ParamLayout]) -> dict[str, ParamLayout] | None:
    """Falcon, GPTBigCode and CodeGen: one fused projection whose split a flag or constant of the module decides.

    The split cannot be told from shapes (Falcon's multi-query ``[H+2, d]`` and a
    grouped ``[H_kv, g+2, d]`` with H_kv = 1 are one shape), so each is recognised by its
    transformers class and read off the attributes its forward uses.
    """
    if _is_a(attn, _FALCON) and {"query_key_value", "dense"} <= kids.keys():
        H, d = int(attn.num_heads), int(attn.head_dim)
        if attn.new_decoder_architecture:  # [H_kv, g + 2, d]: each group's g queries, its key, its value
            H_kv, fused = int(attn.num_kv_heads), "grouped"
        elif attn.multi_query:  # [H + 2, d]: every query head, then the one key and the one value
            H_kv, fused = 1, "block"
        else:  # [H, 3, d]: the forward unflattens by num_heads whatever num_kv_heads says
            H_kv, fused = H, "interleaved"
        add("query_key_value", "qkv", H, d, H_kv, fused=fused)
        add("dense", "o", H, d, H_kv)
        return out
    if _is_a(attn, _BIGCODE) and {"c_attn", "c_proj"} <= kids.keys():
        if "q_attn" in kids:
            raise LayoutError(
                f"GPTBigCode cross-attention {name!r} (q_attn, and c_attn on the encoder states) is not mapped"
            )
        H, d = int(attn.num_heads), int(attn.head_dim)
        # multi-query: split (H·d, d, d), the queries then the one key and value; else viewed
        # [H, 3·d] and split in three per head
        H_kv, fused = (1, "block") if attn.multi_query else (H, "interleaved")
        add("c_attn", "qkv", H, d, H_kv, fused=fused)
        add("c_proj", "o", H, d, H_kv)
        return out
    if _is_a(attn, _CODEGEN) and {"qkv_proj", "out_proj"} <= kids.keys():
        # qkv viewed [mp_num, 3·E/mp_num] and each shard split (query, value, key): the heads
        # of shard s are s·H/mp ... (s+1)·H/mp - 1 in each block.
        H, d, mp = int(attn.num_attention_heads), int(attn.head_dim), int(attn.mp_num)
        if H % mp:
            raise LayoutError(
                f"CodeGen attention {name!r}: H={H} heads do not split evenly into mp_num={mp} shards, so a "
                "head straddles two shards and has no contiguous block"
            )
        add("qkv_proj", "qkv", H, d, H, fused="sharded", shards=mp, order="QVK")
        add("out_proj", "o", H, d)
        return out
    return None


def layouts_from_model(model: nn.Module, overrides: Mapping[str, ParamLayout] | None = None) -> dict[str, ParamLayout]:
    """Map every parameter of ``model`` to its :class:`ParamLayout`.

    Attention projections get head layouts; the rest get ``embedding``, ``norm``,
    ``bias``, ``mlp`` or ``other``. ``overrides`` (parameter name -> layout) are merged
    over the result and win; an attention module this function does not recognise is
    accepted when ``overrides`` cover every projection weight in it.
    Usage: ``layouts_from_model(bert, overrides={"bert.encoder.layer.0.attention.self.query.weight": ...})``.

    Raises:
        LayoutError: an attention module has projections this function cannot map and
            ``overrides`` do not cover (the message names the module, its class and the
            parameters to give layouts for), or an override does not fit its parameter.
        UnknownParamError: an override names no parameter of the model.
    """
    cfg = _cfg(model)
    named = dict(model.named_parameters())
    given = _check_overrides(overrides or {}, named)
    layouts: dict[str, ParamLayout] = {}
    mapped: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(m + ".") for m in mapped):
            continue
        try:
            got = _attention_layouts(name, mod, cfg)
        except LayoutError as e:  # recognised, but its geometry does not fit: overrides may say it
            missing = _uncovered(name, mod, named, given)
            if not missing:
                mapped.append(name)
                continue
            raise LayoutError(
                f"{str(e).rstrip('.')}. If the model is right, say how {name!r} is laid out: pass layouts={{name: "
                f"ParamLayout.attention(...)}} to FisherCollector (or overrides= to layouts_from_model) for "
                f"{', '.join(repr(m) for m in missing)}"
            ) from e
        if got is not None:
            layouts.update(got)
            mapped.append(name)
            continue
        # By name on purpose: transformers' attention modules share no base class, and this
        # check is the net that turns an attention module nobody mapped into an error.
        if "Attention" in type(mod).__name__ and any(_proj(c) for c in mod.children()):
            missing = _uncovered(name, mod, named, given)
            if not missing:
                continue  # the caller said how this module is laid out
            kids = ", ".join(n for n, c in mod.named_children() if _proj(c))
            raise LayoutError(
                f"cannot map attention module {name!r} ({type(mod).__name__}, projections: {kids}) to "
                "head layouts; fisherstore knows split q/k/v/o (LLaMA, OPT, BART, Whisper), T5's q/k/v/o, "
                "BERT's self/output, Phi-3 qkv_proj, GPT-2 c_attn, GPT-NeoX/Bloom/Falcon query_key_value, "
                "GPTBigCode c_attn, CodeGen qkv_proj and DeepSeek MLA (docs/architectures.md). Say how it is "
                "laid out: pass "
                "layouts={name: ParamLayout.attention(kind, num_heads, head_dim, num_kv_heads)} to "
                f"FisherCollector (or overrides= to layouts_from_model) for {', '.join(repr(m) for m in missing)}"
            )
    kinds = {id(p): _plain_kind(n, m) for n, m in model.named_modules() for p in m.parameters(recurse=False)}
    for pname, p in named.items():
        if pname not in layouts:
            kind = "bias" if pname.endswith("bias") and p.ndim == 1 and kinds.get(id(p)) != "norm" else kinds.get(id(p), "other")
            layouts[pname] = ParamLayout(kind)
    layouts.update(given)
    return layouts


def _uncovered(name: str, mod: nn.Module, named: Mapping[str, Any], given: Mapping[str, ParamLayout]) -> list[str]:
    """The projection weights of attention module ``name`` that ``given`` has no layout for."""
    prefix = f"{name}." if name else ""
    weights = [f"{prefix}{c}.weight" for c, m in mod.named_children() if _proj(m)]
    return [w for w in weights if w in named and w not in given]


def _check_overrides(overrides: Mapping[str, ParamLayout], named: Mapping[str, Any]) -> dict[str, ParamLayout]:
    """``overrides`` as a dict, each naming a parameter of the model and fitting its shape."""
    if not isinstance(overrides, Mapping):
        raise InvalidArgumentError(
            f"layouts/overrides must be a mapping of parameter name -> ParamLayout, got {type(overrides).__name__}"
        )
    out = {}
    for name, lay in overrides.items():
        if name not in named:
            raise UnknownParamError(
                f"the layout override {name!r} names no parameter of the model." + close_matches(str(name), named)
            )
        if not isinstance(lay, ParamLayout):
            raise InvalidArgumentError(
                f"the layout override for {name!r} must be a ParamLayout (e.g. ParamLayout.attention('q', H, d)), "
                f"got {type(lay).__name__}"
            )
        lay.validate_shape(tuple(named[name].shape), name)
        out[name] = lay
    return out


def _plain_kind(name: str, mod: nn.Module) -> str:
    cls = type(mod).__name__  # norms (LlamaRMSNorm, T5LayerNorm, ...) share no base class: by name
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if "Norm" in cls or isinstance(mod, nn.LayerNorm):
        return "norm"
    if re.search(r"(^|\.)(mlp|feed_forward|ffn|fc\d?|dense_h_to_4h|dense_4h_to_h)(\.|$)", name):
        return "mlp"
    return "other"


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
            encoder_decoder=True if getattr(cfg, "is_encoder_decoder", False) else None,
        )
    return {k: v for k, v in desc.items() if v is not None}
