"""Head geometry: which indices of a parameter belong to (head, block), and how to chunk it.

Pure arithmetic, no I/O and no torch. The formulas (docs/design.md, "Head geometry"):

========================  ===================  ==================  ==================  ==============
layout                    Q of head h          K (kv head kh)      V (kv head kh)      O of head h
========================  ===================  ==================  ==================  ==============
split Linear [out, in]    rows h·d             rows kh·d           rows kh·d           cols h·d
fused Linear (Phi-3)      rows h·d             rows H·d + kh·d     rows (H+Hkv)·d+kh·d cols h·d
fused Conv1D (GPT-2)      cols h·d             cols H·d + kh·d     cols (H+Hkv)·d+kh·d rows h·d (c_proj)
interleaved (GPT-NeoX)    rows 3h·d            rows 3h·d + d       rows 3h·d + 2d      cols h·d
========================  ===================  ==================  ==================  ==============

Each range is ``d`` long, and ``kh = h // (H / H_kv)``, as Hugging Face ``repeat_kv`` maps
query heads to key/value heads. ``d`` is the model's head dimension, which is *not* always
``hidden // H`` (Gemma, Qwen3); callers pass it explicitly.

The general rule behind every fused layout: the head axis is ``R`` *repeats*, each the
concatenation of *parts* ``(block, heads per repeat, head size)`` in the layout's
``order``; ``head_range`` finds the repeat and the slot of a block head in it. A chunk along
the head axis is the gcd of the parts' head sizes, so it never straddles two head blocks.

================  ========  =====================================================  ===========================
``fused``         R         parts of one repeat (default order)                    models
================  ========  =====================================================  ===========================
``block``         1         (Q, H, d) (K, H_kv, d) (V, H_kv, d)                    Phi-3; Falcon and GPTBigCode
                                                                                   multi-query (H_kv = 1)
``conv1d``        1         as ``block``, on the columns of an ``[in, out]`` weight GPT-2 ``c_attn``
``interleaved``   H_kv      (Q, 1, d) (K, 1, d) (V, 1, d); qkv needs H_kv = H        GPT-NeoX, Bloom, Falcon
                                                                                   (old), GPTBigCode (MHA)
``grouped``       H_kv      (Q, H/H_kv, d) (K, 1, d) (V, 1, d)                     Falcon new decoder
                                                                                   (``[H_kv, g+2, d]``)
``sharded``       shards    (Q, H/s, d) (K, H_kv/s, d) (V, H_kv/s, d), any order   CodeGen (s = ``mp_num`` = 4,
                                                                                   ``order="QVK"``)
================  ========  =====================================================  ===========================

Kind ``"kv"`` holds K and V only (no Q part). DeepSeek-V2/V3's multi-head latent attention
(MLA) ``kv_b_proj`` is ``ParamLayout.attention("kv", H, qk_nope_head_dim,
fused="interleaved", v_head_dim=v_head_dim)``: per head, K's ``d_nope`` rows then V's
``d_v`` rows, so its K and V blocks differ in length. Kind ``"latent"`` is a shared
low-rank projection with no per-head structure (MLA's ``q_a_proj``, ``kv_a_proj_with_mqa``):
it is chunked by rows like an MLP weight.

The optional fields ``shards``, ``order`` and ``v_head_dim`` come only with a ``fused``
value or a kind an older fisherstore refuses (``grouped``, ``sharded``, ``"kv"``): an
older reader ignores keys it does not know (docs/format.md), so a new key on an old layout
would be read back as the wrong geometry instead of refused.

Usage::

    >>> lay = ParamLayout.attention("k", num_heads=32, num_kv_heads=8, head_dim=128)
    >>> lay.head_index(13, "K", 2)
    (slice(384, 512, None), slice(None, None, None))
    >>> ParamLayout.attention("qkv", 8, 4, num_kv_heads=2, fused="grouped").head_range(5, "K")
    (40, 44)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import HeadIndexError, LayoutError

__all__ = ["BLOCKS", "KINDS", "FUSED_LAYOUTS", "ParamLayout", "chunk_shape", "dimension_names", "head_labels",
           "attention_param_names"]

BLOCKS = ("Q", "K", "V", "O")
#: Parameter kinds. q/k/v/o/qkv/kv carry heads; the rest are chunked by rows. ``latent`` is a
#: shared low-rank projection (MLA's ``q_a_proj``, ``kv_a_proj_with_mqa``): no head owns a row of it.
KINDS = ("q", "k", "v", "o", "qkv", "kv", "mlp", "embedding", "norm", "bias", "latent", "other")
#: How a fused tensor orders its head blocks (module docstring: repeats of parts).
FUSED_LAYOUTS = ("block", "conv1d", "interleaved", "grouped", "sharded")

_HEADED = {"q": ("Q",), "k": ("K",), "v": ("V",), "o": ("O",), "qkv": ("Q", "K", "V"), "kv": ("K", "V")}
#: The fusions each fused kind may use: "grouped" is "interleaved" with g query heads per
#: repeat, which a tensor without Q does not have.
_FUSIONS = {"qkv": FUSED_LAYOUTS, "kv": ("block", "conv1d", "interleaved", "sharded")}
#: Fusions older fisherstores do not know: only they may carry the newer optional fields.
_NEW_FUSIONS = ("grouped", "sharded")

#: Target size of a row chunk for tensors without heads ("a few MiB": docs/design.md, "Chunks").
ROW_CHUNK_BYTES = 4 << 20


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter tensor is laid out in heads.

    Build it with :meth:`attention` for attention projections (it derives the head axis
    from the storage convention) or directly for other kinds: ``ParamLayout("mlp")``.

    Attributes:
        kind: one of :data:`KINDS`.
        num_heads: H, the number of query heads.
        num_kv_heads: H_kv, the number of key/value heads (H for MHA, 1 for MQA).
        head_dim: d, the per-head dimension (of K for kind ``"kv"`` with ``v_head_dim``).
        head_axis: the tensor axis the heads run along.
        fused: for ``kind="qkv"`` or ``"kv"``, one of :data:`FUSED_LAYOUTS`.
        transposed: the weight is stored ``[in, out]`` (GPT-2 Conv1D).
        shards: for ``fused="sharded"``, the number of shards (CodeGen's ``mp_num``).
        order: the blocks' order inside one repeat, e.g. ``"QVK"`` (CodeGen); default Q, K, V.
            Only with ``fused`` in ``grouped``/``sharded`` or kind ``"kv"``.
        v_head_dim: V's head size where it is not ``head_dim`` (kind ``"kv"`` only: MLA's
            ``kv_b_proj``, K ``qk_nope_head_dim`` rows and V ``v_head_dim`` rows per head).
    """

    kind: str
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    head_axis: int | None = None
    fused: str | None = None
    transposed: bool = False
    shards: int | None = None
    order: str | None = None
    v_head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LayoutError(f"unknown layout kind {self.kind!r}; expected one of {KINDS}")
        if self.kind not in _HEADED:
            extra = [f for f in ("num_heads", "head_axis", "shards", "order", "v_head_dim") if getattr(self, f) is not None]
            if extra:
                raise LayoutError(f"layout kind {self.kind!r} has no heads; drop {'/'.join(extra)}")
            return
        for field in ("num_heads", "num_kv_heads", "head_dim", "head_axis"):
            value = getattr(self, field)
            if not _is_int(value) or value < 0:
                raise LayoutError(f"{self.kind!r} layout needs a non-negative int {field}, got {value!r}")
        if self.num_heads < 1 or self.num_kv_heads < 1 or self.head_dim < 1:
            raise LayoutError(
                f"{self.kind!r} layout needs num_heads, num_kv_heads and head_dim >= 1, got "
                f"H={self.num_heads}, H_kv={self.num_kv_heads}, d={self.head_dim}"
            )
        if self.num_heads % self.num_kv_heads:
            raise LayoutError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention needs H % H_kv == 0"
            )
        self._check_fusion()

    def _check_fusion(self) -> None:
        """Validate ``fused`` and the optional fields that refine it; each error names the fix."""
        fusions = _FUSIONS.get(self.kind)
        if fusions is None:
            if self.fused is not None:
                raise LayoutError(f"only kinds 'qkv' and 'kv' are fused; got kind {self.kind!r} with fused={self.fused!r}")
        elif self.fused not in fusions:
            raise LayoutError(f"a fused {self.kind!r} layout needs fused in {fusions}, got {self.fused!r}")
        if self.kind == "qkv" and self.fused == "interleaved" and self.num_kv_heads != self.num_heads:
            raise LayoutError(
                "the interleaved (GPT-NeoX) layout has one K and V per query head; "
                f"got H={self.num_heads}, H_kv={self.num_kv_heads}. For H/H_kv query heads per K and V "
                "(Falcon's [H_kv, g+2, d]) use fused='grouped'"
            )
        if self.fused == "sharded":
            s = self.shards
            if not _is_int(s) or s < 1:
                raise LayoutError(f"fused='sharded' needs shards, an int >= 1 (CodeGen: mp_num), got {s!r}")
            if self.num_heads % s or self.num_kv_heads % s:
                raise LayoutError(
                    f"shards={s} must divide both H={self.num_heads} and H_kv={self.num_kv_heads}: a head split "
                    "across two shards has no contiguous block; say the layout per head with overrides"
                )
        elif self.shards is not None:
            raise LayoutError(f"shards={self.shards!r} is only for fused='sharded', got fused={self.fused!r}; drop it")
        if self.order is not None:
            if self.fused not in _NEW_FUSIONS and self.kind != "kv":
                raise LayoutError(
                    f"order={self.order!r} is only for fused='grouped'/'sharded' or kind 'kv' (an older reader "
                    f"would ignore it on fused={self.fused!r}); for one repeat per head in another order use "
                    "fused='grouped'"
                )
            if not isinstance(self.order, str) or sorted(self.order) != sorted(self.blocks):
                raise LayoutError(
                    f"order={self.order!r} must name each block of a {self.kind!r} layout once "
                    f"(a permutation of {''.join(self.blocks)!r})"
                )
        if self.v_head_dim is not None:
            if self.kind != "kv":
                raise LayoutError(
                    f"v_head_dim is only for kind 'kv' (MLA's kv_b_proj), got kind {self.kind!r}; a "
                    f"{self.kind!r} layout's blocks share head_dim"
                )
            if not _is_int(self.v_head_dim) or self.v_head_dim < 1:
                raise LayoutError(f"v_head_dim must be an int >= 1 (MLA: config.v_head_dim), got {self.v_head_dim!r}")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def attention(
        cls,
        kind: str,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        *,
        fused: str | None = None,
        transposed: bool = False,
        ndim: int = 2,
        shards: int | None = None,
        order: str | None = None,
        v_head_dim: int | None = None,
    ) -> ParamLayout:
        """Layout of an attention projection weight (``ndim=2``) or bias (``ndim=1``).

        ``transposed=True`` means the weight is stored ``[in, out]`` like GPT-2's Conv1D;
        ``fused="conv1d"`` implies it. ``shards``, ``order`` and ``v_head_dim``: see the class.
        Usage: ``ParamLayout.attention("qkv", 16, 64, fused="sharded", shards=4, order="QVK")``.
        """
        if kind not in _HEADED:
            raise LayoutError(f"attention kind must be one of {tuple(_HEADED)}, got {kind!r}")
        if fused == "conv1d":
            transposed = True
        if ndim == 1:
            axis = 0
        elif ndim == 2:
            # Linear stores [out, in]; heads run along "out" for q/k/v and along "in" for o.
            # Conv1D stores [in, out], which swaps both.
            axis = 1 if (kind == "o") != transposed else 0
        else:
            raise LayoutError(f"attention parameters are 1-D or 2-D, got ndim={ndim}")
        return cls(
            kind=kind,
            num_heads=num_heads,
            num_kv_heads=num_heads if num_kv_heads is None else num_kv_heads,
            head_dim=head_dim,
            head_axis=axis,
            fused=fused,
            transposed=transposed,
            shards=shards,
            order=order,
            v_head_dim=v_head_dim,
        )

    # -- queries ------------------------------------------------------------------------
    @property
    def has_heads(self) -> bool:
        """True for the attention kinds, whose tensors split into head blocks."""
        return self.kind in _HEADED

    @property
    def blocks(self) -> tuple[str, ...]:
        """The blocks (of Q, K, V, O) this parameter holds."""
        return _HEADED.get(self.kind, ())

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (H / H_kv)."""
        self._require_heads()
        return self.num_heads // self.num_kv_heads

    def block_dim(self, block: str) -> int:
        """The length of one head of ``block`` along the head axis: ``head_dim``, or ``v_head_dim`` for V."""
        b = self._check_block(block)
        return self.v_head_dim if b == "V" and self.v_head_dim is not None else self.head_dim

    def block_count(self, block: str) -> int:
        """How many distinct heads ``block`` has: H for Q and O, H_kv for K and V."""
        return self.num_kv_heads if self._check_block(block) in "KV" else self.num_heads

    def pattern(self) -> tuple[int, tuple[tuple[str, int, int], ...]]:
        """``(repeats, parts)``: the head axis is ``repeats`` copies of the parts ``(block, heads, head size)``.

        Usage: ``ParamLayout.attention("qkv", 8, 4, 2, fused="grouped").pattern()`` is
        ``(2, (("Q", 4, 4), ("K", 1, 4), ("V", 1, 4)))``.
        """
        return self._pattern

    @functools.cached_property
    def _pattern(self) -> tuple[int, tuple[tuple[str, int, int], ...]]:
        # Cached: a head-block read asks for it every time, and the layout is frozen.
        self._require_heads()
        if self.fused in ("interleaved", "grouped"):
            repeats = self.num_kv_heads
        elif self.fused == "sharded":
            repeats = self.shards
        else:  # split, block, conv1d
            repeats = 1
        order = self.order or "".join(self.blocks)
        return repeats, tuple((b, self.block_count(b) // repeats, self.block_dim(b)) for b in order)

    def head_chunk(self) -> int:
        """The chunk length along the head axis: the gcd of the blocks' head sizes.

        A chunk so never straddles two head blocks; with one head size (every layout but
        MLA's ``kv_b_proj``) it is ``head_dim``, one head block per chunk.
        """
        return math.gcd(*(dim for _, _, dim in self.pattern()[1]))

    def segments(self) -> list[tuple[str, int, int, int]]:
        """Every head block as ``(block, head within the block, start, stop)``, in the order the tensor stores them."""
        repeats, parts = self.pattern()
        out = []
        at = 0
        for r in range(repeats):
            for b, n, dim in parts:
                for i in range(n):
                    out.append((b, r * n + i, at, at + dim))
                    at += dim
        return out

    def head_blocks(self, block: str | None = None) -> list[tuple[int, str]]:
        """Every distinct ``(head, block)`` of this parameter (of ``block`` only, if given), blocks in order.

        K and V come once per key/value head, named by the first query head of its group
        (``head`` stays a query head, as :meth:`head_range` takes it): with H=4, H_kv=2 the
        K blocks are heads 0 and 2.
        """
        blocks = [self._check_block(block)] if block is not None else list(self.blocks)
        return [(h, b) for b in blocks for h in range(0, self.num_heads, self.group_size if b in "KV" else 1)]

    def block_head(self, head: int, block: str) -> int:
        """The index of query head ``head`` within ``block``: itself for Q and O, its key/value head for K and V."""
        return head // self.group_size if self._check_block(block) in "KV" else head

    def head_extent(self) -> int:
        """The length the head axis must have for this layout."""
        repeats, parts = self.pattern()
        return repeats * sum(n * dim for _, n, dim in parts)

    def validate_shape(self, shape: Sequence[int], name: str = "parameter") -> None:
        """Raise :class:`LayoutError` if ``shape`` cannot hold this layout."""
        if not self.has_heads:
            return
        if self.head_axis >= len(shape):
            raise LayoutError(
                f"{name}: layout puts heads on axis {self.head_axis}, but the tensor has shape "
                f"{tuple(shape)}"
            )
        want = self.head_extent()
        if shape[self.head_axis] != want:
            dims = f"d={self.head_dim}" + (f", d_v={self.v_head_dim}" if self.v_head_dim is not None else "")
            raise LayoutError(
                f"{name}: shape {tuple(shape)} has {shape[self.head_axis]} along head axis "
                f"{self.head_axis}, but {self.kind!r} with H={self.num_heads}, "
                f"H_kv={self.num_kv_heads}, {dims} needs {want}. "
                "Check head_dim (read config.head_dim; it is not always hidden // H)."
            )

    def head_range(self, head: int, block: str) -> tuple[int, int]:
        """Half-open range ``[start, stop)`` along :attr:`head_axis` for (head, block).

        ``head`` is always a *query* head index in ``[0, H)``; K and V map it to its
        key/value head ``head // (H / H_kv)``. The length is :meth:`block_dim` of ``block``,
        which may differ between blocks (MLA's ``kv_b_proj``).
        """
        block = self._check_block(block)
        H = self.num_heads
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < H:
            raise HeadIndexError(
                f"head {head!r} is out of range for a {self.kind!r} parameter with "
                f"H={H} query heads; use 0 <= head < {H}"
            )
        repeats, parts = self.pattern()
        per_repeat = sum(n * dim for _, n, dim in parts)
        before = {}  # block -> where its part starts inside one repeat
        at = 0
        for b, n, dim in parts:
            before[b] = at
            at += n * dim
        n, dim = self.block_count(block) // repeats, self.block_dim(block)
        own = self.block_head(head, block)
        # Block-contiguous layouts are one repeat: V starts after Q and K, not at 2·H·d.
        start = (own // n) * per_repeat + before[block] + (own % n) * dim
        return start, start + dim

    def head_index(self, head: int, block: str, ndim: int | None = None) -> tuple[slice, ...]:
        """Index tuple selecting (head, block), with full slices on the other axes."""
        start, stop = self.head_range(head, block)
        idx = [slice(None)] * max(ndim or 0, self.head_axis + 1)
        idx[self.head_axis] = slice(start, stop)
        return tuple(idx)

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored in each array's attributes); unset optional fields are left out."""
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParamLayout:
        """Inverse of :meth:`to_dict`. Keys a newer fisherstore may add are ignored (docs/format.md)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def __repr__(self) -> str:
        if not self.has_heads:
            return f"ParamLayout({self.kind!r})"
        extra = f", fused={self.fused!r}" if self.fused else ""
        extra += ", transposed=True" if self.transposed else ""
        extra += f", shards={self.shards}" if self.shards is not None else ""
        extra += f", order={self.order!r}" if self.order is not None else ""
        extra += f", d_v={self.v_head_dim}" if self.v_head_dim is not None else ""
        return (
            f"ParamLayout({self.kind!r}, H={self.num_heads}, H_kv={self.num_kv_heads}, "
            f"d={self.head_dim}, axis={self.head_axis}{extra})"
        )

    # -- helpers ------------------------------------------------------------------------
    def _require_heads(self) -> None:
        if not self.has_heads:
            raise HeadIndexError(f"a {self.kind!r} parameter has no attention heads to index")

    def _check_block(self, block: str) -> str:
        self._require_heads()
        b = block.upper() if isinstance(block, str) else block
        if b not in BLOCKS:
            raise HeadIndexError(f"block {block!r} is not one of Q, K, V, O")
        if b not in self.blocks:
            raise HeadIndexError(
                f"block {b!r} is not in a {self.kind!r} parameter, which holds "
                f"{'/'.join(self.blocks)}; pick the parameter that holds {b}"
            )
        return b


def chunk_shape(
    shape: Sequence[int],
    layout: ParamLayout | None = None,
    itemsize: int = 4,
    target_bytes: int = ROW_CHUNK_BYTES,
) -> tuple[int, ...]:
    """Chunk shape for a parameter: one chunk per head block, else row-major tiles of ~4 MiB.

    Without heads, trailing axes stay whole while the tile fits ``target_bytes`` and the
    first axis that does not fit is split; the axes before it get 1. A 2-D matrix so gets
    row chunks, and a 3-D MoE expert tensor ``[experts, rows, cols]`` gets a few MiB of one
    expert's rows (not one whole expert per chunk: 448 MiB for Mixtral-8x7B).

    >>> chunk_shape((4096, 4096), ParamLayout.attention("o", 32, 128))
    (4096, 128)
    >>> chunk_shape((8, 28672, 4096), ParamLayout("mlp"))
    (1, 256, 4096)
    """
    shape = tuple(int(s) for s in shape)
    if not shape:
        return ()
    if layout is not None and layout.has_heads:
        layout.validate_shape(shape)
        chunks = list(shape)
        chunks[layout.head_axis] = layout.head_chunk()
        return tuple(max(1, c) for c in chunks)
    chunks = [1] * len(shape)
    inner = itemsize  # bytes of one step along the axis being sized
    for ax in reversed(range(len(shape))):
        n = max(1, shape[ax])
        if inner * n <= target_bytes:
            chunks[ax] = n
            inner *= n
            continue
        chunks[ax] = max(1, target_bytes // inner)
        break
    return tuple(chunks)


#: Axis names of a weight stored ``[out, in]`` (Linear) or ``[in, out]`` (Conv1D, ``transposed``).
_AXES = {False: ("out", "in"), True: ("in", "out")}


def dimension_names(ndim: int, layout: ParamLayout | None = None, leading: Sequence[str] = ()) -> tuple[str, ...]:
    """The Zarr ``dimension_names`` of a parameter's array: what xarray calls its dims (docs/format.md).

    The head axis of an attention parameter is named ``"<axis>_heads"`` (``out_heads`` for
    Q/K/V rows, ``in_heads`` for O columns of a Linear), the other axis ``"in"`` or
    ``"out"``; a tensor without heads gets ``"dim_0"``, ``"dim_1"``, ... ``leading`` names
    axes in front of the parameter's own (a per-sample array: ``("sample",)``).

    >>> dimension_names(2, ParamLayout.attention("q", 32, 128))
    ('out_heads', 'in')
    >>> dimension_names(2, ParamLayout.attention("o", 32, 128))
    ('out', 'in_heads')
    """
    lead = tuple(leading)
    if layout is None or not layout.has_heads or ndim not in (1, 2) or layout.head_axis >= ndim:
        return lead + tuple(f"dim_{i}" for i in range(ndim))
    if ndim == 1:
        return lead + ("out_heads",)
    names = list(_AXES[layout.transposed])
    names[layout.head_axis] += "_heads"
    return lead + tuple(names)


def head_labels(layout: ParamLayout, length: int) -> tuple[list[int], list[str]]:
    """Per index of the head axis: the head it belongs to and its block (Q/K/V/O).

    The head is the index within its block: a query head for Q and O, a key/value head
    for K and V (``kh``). Used for xarray coordinates and summaries.
    Usage: ``heads, blocks = head_labels(layout, shape[layout.head_axis])``.
    """
    heads = [0] * length
    blocks = [""] * length
    for h, b in layout.head_blocks():
        start, stop = layout.head_range(h, b)
        own = layout.block_head(h, b)
        for i in range(start, min(stop, length)):
            heads[i], blocks[i] = own, b
    return heads, blocks


def attention_param_names(layouts: Mapping[str, ParamLayout], include_bias: bool = False) -> list[str]:
    """The parameters with head layouts (attention projections), weights only by default."""
    return [n for n, lay in layouts.items() if lay.has_heads and (include_bias or not n.endswith("bias"))]

