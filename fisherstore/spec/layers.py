"""Layer keys: which layer, and which attention stack, a parameter name belongs to. Pure, no torch.

Views, summaries and the QK-OV indexer label parameters by layer. A decoder-only model
has one stack and its layers are ints; an encoder-decoder has several (encoder
self-attention, decoder self-attention, decoder cross-attention), told apart as
``"encoder.3"``, ``"decoder.3"`` and ``"decoder.3.cross"``.

Usage::

    >>> layer_keys(["model.layers.3.self_attn.q_proj.weight"])
    {'model.layers.3.self_attn.q_proj.weight': 3}
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["layer_index", "layer_keys"]

_LAYER_RE = re.compile(r"\.(\d+)\.")
# Cross-attention modules (queries from the decoder, keys/values from the encoder):
# BART/mBART/Marian/Whisper ``encoder_attn``, T5 ``EncDecAttention``, GPT-2/BERT
# ``crossattention``, and the ``cross_attn`` spelling of several others.
_CROSS_RE = re.compile(r"(^|\.)(encoder_attn|EncDecAttention|crossattention|cross_attn|cross_attention)(\.|$)")


def layer_index(name: str) -> int | None:
    """The first layer number in a parameter name (``model.layers.3.self_attn...`` → 3).

    It does not tell stacks apart (an encoder-decoder's ``encoder.layers.3`` and
    ``decoder.layers.3`` are both 3); :func:`layer_keys` does.
    """
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_keys(names: Iterable[str]) -> dict[str, int | str | None]:
    """The layer key of each attention parameter name: an int, or a string when there are several stacks.

    A *stream* is a stack of layers (the name before the layer number) and whether the
    module is cross-attention. With one stream the key is the layer number, as
    :func:`layer_index` gives it (LLaMA, GPT-2, OPT's ``model.decoder.layers``). With
    several, it is ``"<stack>.<N>"`` plus ``".cross"`` for cross-attention, where
    ``<stack>`` is ``encoder`` or ``decoder`` when the stacks' paths say so, else the
    stack's path: ``"encoder.3"``, ``"decoder.3"``, ``"decoder.3.cross"``. Names without
    a layer number map to None.

    Usage: ``layer_keys(attention_param_names(layouts_from_model(bart)))``.
    """
    parsed: dict[str, tuple[str, int, bool] | None] = {}
    for n in names:
        m = _LAYER_RE.search(n)
        parsed[n] = None if m is None else (n[: m.start()], int(m.group(1)), bool(_CROSS_RE.search(n[m.end():])))
    streams = list(dict.fromkeys((p[0], p[2]) for p in parsed.values() if p is not None))
    if len(streams) <= 1:
        return {n: None if p is None else p[1] for n, p in parsed.items()}
    stacks = list(dict.fromkeys(s for s, _ in streams))
    roles = {s: next((c for c in reversed(s.split(".")) if c in ("encoder", "decoder")), None) for s in stacks}
    if None in roles.values() or len(set(roles.values())) != len(stacks):
        roles = {s: s for s in stacks}  # "encoder"/"decoder" would not tell these stacks apart
    return {n: None if p is None else f"{roles[p[0]]}.{p[1]}" + (".cross" if p[2] else "") for n, p in parsed.items()}
