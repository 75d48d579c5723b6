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

Usage::

    >>> lay = ParamLayout.attention("k", num_heads=32, num_kv_heads=8, head_dim=128)
    >>> lay.head_index(13, "K")
    (slice(384, 512, None), slice(None, None, None))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import HeadIndexError, LayoutError

__all__ = ["BLOCKS", "KINDS", "FUSED_LAYOUTS", "ParamLayout", "chunk_shape", "dimension_names", "head_labels",
           "attention_param_names"]

BLOCKS = ("Q", "K", "V", "O")
#: Parameter kinds. q/k/v/o/qkv carry heads; the rest are chunked by rows.
KINDS = ("q", "k", "v", "o", "qkv", "mlp", "embedding", "norm", "bias", "other")
#: How a fused QKV tensor orders its blocks.
FUSED_LAYOUTS = ("block", "conv1d", "interleaved")

_HEADED = {"q": ("Q",), "k": ("K",), "v": ("V",), "o": ("O",), "qkv": ("Q", "K", "V")}

#: Target size of a row chunk for tensors without heads ("a few MiB": docs/design.md, "Chunks").
ROW_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter tensor is laid out in heads.

    Build it with :meth:`attention` for attention projections (it derives the head axis
    from the storage convention) or directly for other kinds: ``ParamLayout("mlp")``.

    Attributes:
        kind: one of :data:`KINDS`.
        num_heads: H, the number of query heads.
        num_kv_heads: H_kv, the number of key/value heads (H for MHA, 1 for MQA).
        head_dim: d, the per-head dimension.
        head_axis: the tensor axis the heads run along.
        fused: for ``kind="qkv"``, one of :data:`FUSED_LAYOUTS`.
        transposed: the weight is stored ``[in, out]`` (GPT-2 Conv1D).
    """

    kind: str
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    head_axis: int | None = None
    fused: str | None = None
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LayoutError(f"unknown layout kind {self.kind!r}; expected one of {KINDS}")
        if self.kind not in _HEADED:
            if self.num_heads is not None or self.head_axis is not None:
                raise LayoutError(f"layout kind {self.kind!r} has no heads; drop num_heads/head_axis")
            return
        for field in ("num_heads", "num_kv_heads", "head_dim", "head_axis"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
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
        if self.kind == "qkv":
            if self.fused not in FUSED_LAYOUTS:
                raise LayoutError(f"fused qkv layout needs fused in {FUSED_LAYOUTS}, got {self.fused!r}")
            if self.fused == "interleaved" and self.num_kv_heads != self.num_heads:
                raise LayoutError(
                    "the interleaved (GPT-NeoX) layout has one K and V per query head; "
                    f"got H={self.num_heads}, H_kv={self.num_kv_heads}"
                )
        elif self.fused is not None:
            raise LayoutError(f"only kind 'qkv' is fused; got kind {self.kind!r} with fused={self.fused!r}")

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
    ) -> ParamLayout:
        """Layout of an attention projection weight (``ndim=2``) or bias (``ndim=1``).

        ``transposed=True`` means the weight is stored ``[in, out]`` like GPT-2's Conv1D;
        ``fused="conv1d"`` implies it.
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
        self._require_heads()
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.kind in ("q", "o"):
            return H * d
        if self.kind in ("k", "v"):
            return Hkv * d
        return (H + 2 * Hkv) * d  # qkv; interleaved has Hkv == H

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
            raise LayoutError(
                f"{name}: shape {tuple(shape)} has {shape[self.head_axis]} along head axis "
                f"{self.head_axis}, but {self.kind!r} with H={self.num_heads}, "
                f"H_kv={self.num_kv_heads}, d={self.head_dim} needs {want}. "
                "Check head_dim (read config.head_dim; it is not always hidden // H)."
            )

    def head_range(self, head: int, block: str) -> tuple[int, int]:
        """Half-open range ``[start, stop)`` along :attr:`head_axis` for (head, block).

        ``head`` is always a *query* head index in ``[0, H)``; K and V map it to its
        key/value head ``head // (H / H_kv)``.
        """
        block = self._check_block(block)
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < H:
            raise HeadIndexError(
                f"head {head!r} is out of range for a {self.kind!r} parameter with "
                f"H={H} query heads; use 0 <= head < {H}"
            )
        kh = head // (H // Hkv)
        if self.kind in ("q", "o"):
            start = head * d
        elif self.kind in ("k", "v"):
            start = kh * d
        elif self.fused == "interleaved":
            start = head * 3 * d + "QKV".index(block) * d
        else:  # block-contiguous fused, Linear or Conv1D: V starts after Q and K, not at 2·H·d
            start = {"Q": head * d, "K": H * d + kh * d, "V": (H + Hkv) * d + kh * d}[block]
        return start, start + d

    def head_index(self, head: int, block: str, ndim: int | None = None) -> tuple[slice, ...]:
        """Index tuple selecting (head, block), with full slices on the other axes."""
        start, stop = self.head_range(head, block)
        idx = [slice(None)] * max(ndim or 0, self.head_axis + 1)
        idx[self.head_axis] = slice(start, stop)
        return tuple(idx)

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored in each array's attributes)."""
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
        chunks[layout.head_axis] = layout.head_dim
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

