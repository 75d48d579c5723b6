"""Head geometry: research/tensorscope.md §6 cases 1-13 and 25, tiling, chunking."""

import itertools

import pytest
import torch

from fisherstore import HeadIndexError, LayoutError, ParamLayout
from fisherstore.spec.layout import chunk_shape
from fisherstore.spec.regions import iter_slabs

A = ParamLayout.attention


def rows(lay, h, b):
    s = lay.head_index(h, b, 2)
    assert lay.head_axis == 0 and s[1] == slice(None)
    return s[0].start, s[0].stop


def cols(lay, h, b):
    s = lay.head_index(h, b, 2)
    assert lay.head_axis == 1 and s[0] == slice(None)
    return s[1].start, s[1].stop


def test_case01_llama2_q_head5():
    assert rows(A("q", 32, 128), 5, "Q") == (640, 768)
    t = torch.zeros(4096, 4096)
    assert t[A("q", 32, 128).head_index(5, "Q", 2)].shape == (128, 4096)


def test_case02_llama2_o_head5_is_columns():
    lay = A("o", 32, 128)
    assert cols(lay, 5, "O") == (640, 768)
    assert torch.zeros(4096, 4096)[lay.head_index(5, "O", 2)].shape == (4096, 128)


def test_case03_04_mistral_gqa():
    k = A("k", 32, 128, num_kv_heads=8)
    v = A("v", 32, 128, num_kv_heads=8)
    assert rows(k, 13, "K") == (384, 512)
    assert rows(v, 31, "V") == (896, 1024)
    assert {rows(k, h, "K") for h in (12, 13, 14, 15)} == {(384, 512)}
    assert rows(k, 16, "K") == (512, 640)


def test_case05_qwen25_gqa():
    assert rows(A("k", 28, 128, num_kv_heads=4), 13, "K") == (128, 256)


def test_case06_llama2_70b():
    assert rows(A("k", 64, 128, num_kv_heads=8), 63, "K") == (896, 1024)


def test_case07_mqa():
    k = A("k", 16, 64, num_kv_heads=1)
    assert {rows(k, h, "K") for h in range(16)} == {(0, 64)}


def test_case08_gpt2_conv1d_c_attn():
    lay = A("qkv", 12, 64, fused="conv1d")
    assert lay.transposed and lay.head_axis == 1
    assert cols(lay, 3, "Q") == (192, 256)
    assert cols(lay, 3, "K") == (960, 1024)
    assert cols(lay, 3, "V") == (1728, 1792)
    assert torch.zeros(768, 2304)[lay.head_index(3, "V", 2)].shape == (768, 64)


def test_case09_gpt2_c_proj_is_rows():
    lay = A("o", 12, 64, transposed=True)
    assert rows(lay, 3, "O") == (192, 256)  # upstream takes columns


def test_case10_linear_fused():
    lay = A("qkv", 32, 128, fused="block")
    assert rows(lay, 2, "K") == (4352, 4480)
    assert rows(lay, 2, "V") == (8448, 8576)


def test_case11_fused_gqa_v_offset():
    lay = A("qkv", 40, 128, num_kv_heads=10, fused="block")
    lay.validate_shape((7680, 5120))
    assert rows(lay, 13, "V") == (6784, 6912)  # upstream: 10624:10752, an empty slice


def test_case12_pythia_interleaved():
    lay = A("qkv", 12, 64, fused="interleaved")
    assert rows(lay, 2, "Q") == (384, 448)
    assert rows(lay, 2, "K") == (448, 512)
    assert rows(lay, 2, "V") == (512, 576)


def test_case13_gemma_head_dim():
    q, o = A("q", 16, 256), A("o", 16, 256)
    q.validate_shape((4096, 3072))
    assert rows(q, 15, "Q") == (3840, 4096)
    assert cols(o, 15, "O") == (3840, 4096)
    with pytest.raises(LayoutError, match="head_dim"):
        A("q", 16, 192).validate_shape((4096, 3072))


def test_case25_biases():
    qb = A("q", 28, 128, num_kv_heads=4, ndim=1)
    assert qb.head_index(5, "Q", 1) == (slice(640, 768),)
    gpt2_bias = A("qkv", 12, 64, fused="conv1d", ndim=1)
    assert gpt2_bias.head_axis == 0 and gpt2_bias.head_range(3, "K") == (960, 1024)
    with pytest.raises(HeadIndexError):
        ParamLayout("bias").head_range(0, "O")  # o_proj.bias has no heads


LAYOUTS = [
    (A("q", 8, 4), (32, 10)),
    (A("k", 8, 4, num_kv_heads=2), (8, 10)),
    (A("v", 8, 4, num_kv_heads=1), (4, 10)),
    (A("o", 8, 4), (10, 32)),
    (A("o", 8, 4, transposed=True), (32, 10)),
    (A("qkv", 8, 4, num_kv_heads=2, fused="block"), (48, 10)),
    (A("qkv", 4, 4, fused="conv1d"), (10, 48)),
    (A("qkv", 4, 4, fused="interleaved"), (48, 10)),
    (A("q", 8, 4, ndim=1), (32,)),
    # the fusions of issue 20
    (A("qkv", 8, 4, num_kv_heads=2, fused="grouped"), (48, 10)),  # Falcon new decoder
    (A("qkv", 8, 4, num_kv_heads=1, fused="block"), (40, 10)),  # Falcon / GPTBigCode multi-query
    (A("qkv", 8, 4, fused="sharded", shards=4, order="QVK"), (96, 10)),  # CodeGen
    (A("qkv", 8, 4, num_kv_heads=4, fused="sharded", shards=2), (64, 10)),  # sharded GQA
    (A("kv", 4, 4, fused="interleaved", v_head_dim=6), (40, 10)),  # MLA kv_b_proj
    (A("kv", 4, 3, num_kv_heads=2, fused="block"), (12, 10)),
    (A("kv", 4, 4, fused="interleaved", v_head_dim=6, ndim=1), (40,)),
]


@pytest.mark.parametrize("lay,shape", LAYOUTS, ids=lambda x: repr(x) if isinstance(x, ParamLayout) else None)
def test_head_blocks_tile_the_tensor_exactly_once(lay, shape):
    lay.validate_shape(shape)
    cover = torch.zeros(shape, dtype=torch.int64)
    group = lay.group_size
    for b in lay.blocks:
        # K/V blocks are shared by a group of query heads: count each kv head once.
        heads = range(0, lay.num_heads, group) if b in "KV" else range(lay.num_heads)
        for h in heads:
            idx = lay.head_index(h, b, len(shape))
            assert cover[idx].numel() == cover.numel() // cover.shape[lay.head_axis] * lay.block_dim(b)
            cover[idx] += 1
    assert bool((cover == 1).all())


@pytest.mark.parametrize("lay,shape", LAYOUTS, ids=lambda x: repr(x) if isinstance(x, ParamLayout) else None)
def test_one_chunk_per_head_block(lay, shape):
    ch = chunk_shape(shape, lay)
    uniform = len({lay.block_dim(b) for b in lay.blocks}) == 1
    for b in lay.blocks:
        for h in range(lay.num_heads):
            s = lay.head_index(h, b, len(shape))[lay.head_axis]
            # aligned, whole chunks: one per block, or (K and V of differing sizes) a few, never one shared
            assert s.start % ch[lay.head_axis] == 0 and (s.stop - s.start) % ch[lay.head_axis] == 0
            assert not uniform or s.stop - s.start == ch[lay.head_axis]


def test_chunk_shapes_llama7b():
    assert chunk_shape((4096, 4096), A("q", 32, 128)) == (128, 4096)  # 2 MiB
    assert chunk_shape((4096, 4096), A("o", 32, 128)) == (4096, 128)
    mlp = chunk_shape((11008, 4096), ParamLayout("mlp"))
    assert 2 << 20 <= mlp[0] * 4096 * 4 <= 4 << 20 and mlp[1] == 4096
    assert chunk_shape((4096,), ParamLayout("norm")) == (4096,)
    assert chunk_shape((3, 5), None) == (3, 5)


@pytest.mark.parametrize("shape,chunks", [((100, 7), (8, 7)), ((7, 100), (7, 8)), ((5,), (2,)), ((), ())])
def test_slabs_cover_shape_once_and_align_to_chunks(shape, chunks):
    cover = torch.zeros(shape, dtype=torch.int64)
    for region in iter_slabs(shape, chunks, target_bytes=3 * 4 * max(1, torch.Size(chunks).numel())):
        cover[region] += 1
        for s, c, n in zip(region, chunks, shape):
            assert s.start % c == 0 and (s.stop % c == 0 or s.stop == n)
    assert bool((cover == 1).all())


def test_bad_heads_and_blocks_raise_index_errors():
    lay = A("q", 32, 128)
    for bad in (32, -1, 100):
        with pytest.raises(HeadIndexError, match=rf"head {bad}") as ei:
            lay.head_range(bad, "Q")
        assert isinstance(ei.value, IndexError)
    with pytest.raises(HeadIndexError, match="'X' is not one of Q, K, V, O"):
        lay.head_range(0, "X")
    with pytest.raises(HeadIndexError, match="holds Q"):
        lay.head_range(0, "K")
    assert lay.head_range(0, "q") == (0, 128)  # block names are case-insensitive


def test_layout_validation_and_roundtrip():
    with pytest.raises(LayoutError, match="multiple"):
        A("k", 32, 128, num_kv_heads=5)
    with pytest.raises(LayoutError, match="interleaved"):
        A("qkv", 8, 4, num_kv_heads=2, fused="interleaved")
    with pytest.raises(LayoutError, match="unknown layout kind"):
        ParamLayout("attention")
    for lay, _ in LAYOUTS + [(ParamLayout("mlp"), None)]:
        assert ParamLayout.from_dict(lay.to_dict()) == lay
    assert "H_kv=2" in repr(A("k", 8, 4, num_kv_heads=2))
    for h, b in itertools.product(range(8), "Q"):
        assert A("q", 8, 4).head_range(h, b) == (4 * h, 4 * h + 4)


def test_moe_expert_tensors_get_chunks_of_a_few_mib():
    # Mixtral-8x7B experts, transformers 5.x layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    for shape in ((8, 28672, 4096), (8, 4096, 14336)):
        ch = chunk_shape(shape, ParamLayout("mlp"))
        nbytes = 4 * ch[0] * ch[1] * ch[2]
        assert ch[0] == 1 and ch[2] == shape[2] and 2 << 20 <= nbytes <= 4 << 20, (shape, ch)
    # a whole expert that fits keeps several experts per chunk; 2-D matrices keep their row chunks
    assert chunk_shape((64, 32, 16), ParamLayout("mlp")) == (64, 32, 16)
    assert chunk_shape((11008, 4096), ParamLayout("mlp")) == (256, 4096)
    assert chunk_shape((2, 2_000_000), None) == (1, 1 << 20)  # a row over 4 MiB is split too


@pytest.mark.parametrize("shape,chunks,target", [((8, 28672, 4096), (1, 256, 4096), 64 << 20),
                                                 ((4, 10, 6), (1, 3, 6), 4 * 3 * 6 * 2),
                                                 ((6, 9), (2, 3), 4 * 2 * 9)])
def test_slabs_stay_near_target_when_several_axes_are_split(shape, chunks, target):
    # A slab of whole chunk rows along the first split axis would be one or more whole
    # experts (448 MiB each for Mixtral); slabs must stay near the target and cover once.
    total = 0
    slabs = list(iter_slabs(shape, chunks, target_bytes=target))
    for region in slabs:
        n = 4 * torch.Size([s.stop - s.start for s in region]).numel()
        assert n <= max(target, 4 * torch.Size(chunks).numel()), region
        for s, c, dim in zip(region, chunks, shape):
            assert s.start % c == 0 and (s.stop % c == 0 or s.stop == dim)
        total += n
    assert total == 4 * torch.Size(shape).numel()
    if len(shape) == 2 or shape[0] < 8:
        cover = torch.zeros(shape, dtype=torch.int64)
        for region in slabs:
            cover[region] += 1
        assert bool((cover == 1).all())


def test_dimension_names_name_the_head_axis():
    from fisherstore.spec.layout import dimension_names, head_labels

    assert dimension_names(2, A("q", 32, 128)) == ("out_heads", "in")
    assert dimension_names(2, A("o", 32, 128)) == ("out", "in_heads")
    assert dimension_names(2, A("qkv", 12, 64, fused="conv1d")) == ("in", "out_heads")  # GPT-2 c_attn [in, out]
    assert dimension_names(2, A("o", 12, 64, transposed=True)) == ("in_heads", "out")  # GPT-2 c_proj rows
    assert dimension_names(1, A("q", 4, 2, ndim=1)) == ("out_heads",)
    assert dimension_names(3, ParamLayout("mlp")) == ("dim_0", "dim_1", "dim_2")
    assert dimension_names(2, None, leading=("sample",)) == ("sample", "dim_0", "dim_1")
    heads, blocks = head_labels(A("qkv", 4, 2, num_kv_heads=2, fused="block"), 16)
    assert blocks == ["Q"] * 8 + ["K"] * 4 + ["V"] * 4
    assert heads == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 0, 0, 1, 1]  # K/V: the key/value head
    heads, blocks = head_labels(A("qkv", 2, 2, fused="interleaved"), 12)
    assert blocks == list("QQKKVVQQKKVV") and heads == [0] * 6 + [1] * 6


# -- the fusions of issue 20: hand-written ranges at real scale ----------------------------------


def test_falcon_new_decoder_grouped():
    # Falcon-40B: H=128, H_kv=8, d=64; query_key_value is [H_kv, g+2, d] with g=16: 18·64 = 1152 rows per group
    lay = A("qkv", 128, 64, num_kv_heads=8, fused="grouped")
    lay.validate_shape((9216, 8192))
    assert rows(lay, 0, "Q") == (0, 64)
    assert rows(lay, 15, "Q") == (960, 1024)
    assert rows(lay, 0, "K") == (1024, 1088) and rows(lay, 0, "V") == (1088, 1152)
    assert rows(lay, 17, "Q") == (1216, 1280)  # group 1, its second query head
    assert rows(lay, 17, "K") == (2176, 2240) and rows(lay, 31, "V") == (2240, 2304)
    assert rows(lay, 127, "V") == (9152, 9216)
    assert lay.pattern() == (8, (("Q", 16, 64), ("K", 1, 64), ("V", 1, 64)))


def test_falcon_7b_multi_query_is_block_with_one_kv_head():
    lay = A("qkv", 71, 64, num_kv_heads=1, fused="block")  # [H + 2, d]
    lay.validate_shape((4672, 4544))
    assert rows(lay, 70, "Q") == (4480, 4544)
    assert {rows(lay, h, "K") for h in range(71)} == {(4544, 4608)}
    assert rows(lay, 3, "V") == (4608, 4672)


def test_codegen_sharded_qvk():
    # CodeGen-350M: H=16, d=64, mp_num=4: 4 shards of 768 rows, each (Q, V, K) of 4 heads
    lay = A("qkv", 16, 64, fused="sharded", shards=4, order="QVK")
    lay.validate_shape((3072, 1024))
    assert rows(lay, 0, "Q") == (0, 64) and rows(lay, 0, "V") == (256, 320) and rows(lay, 0, "K") == (512, 576)
    assert rows(lay, 5, "Q") == (832, 896)
    assert rows(lay, 5, "V") == (1088, 1152)
    assert rows(lay, 5, "K") == (1344, 1408)
    assert rows(lay, 15, "K") == (3008, 3072)


def test_sharded_gqa():
    lay = A("qkv", 8, 2, num_kv_heads=4, fused="sharded", shards=2)  # per shard: Q 4 heads, K 2, V 2: 16 rows
    assert rows(lay, 5, "Q") == (18, 20)
    assert rows(lay, 5, "K") == (24, 26)  # kv head 2: shard 1, its first
    assert rows(lay, 7, "V") == (30, 32)


def test_deepseek_v3_mla():
    H, dn, dr, dv = 128, 128, 64, 128
    q = A("q", H, dn + dr)  # q_b_proj [H·192, q_lora_rank]
    kv = A("kv", H, dn, fused="interleaved", v_head_dim=dv)  # kv_b_proj [H·(dn + dv), kv_lora_rank]
    o = A("o", H, dv)  # o_proj [hidden, H·dv]
    q.validate_shape((24576, 1536))
    kv.validate_shape((32768, 512))
    o.validate_shape((7168, 16384))
    assert rows(q, 3, "Q") == (576, 768)
    assert rows(kv, 3, "K") == (768, 896) and rows(kv, 3, "V") == (896, 1024)
    assert cols(o, 3, "O") == (384, 512)
    assert chunk_shape((32768, 512), kv) == (128, 512)  # one head block per chunk at real scale
    # distinct sizes (nope 4, v 6): K and V blocks differ, chunks are their gcd
    tiny = A("kv", 4, 4, fused="interleaved", v_head_dim=6)
    assert [rows(tiny, h, b) for h in (0, 1, 3) for b in "KV"] == [(0, 4), (4, 10), (10, 14), (14, 20), (30, 34),
                                                                  (34, 40)]
    assert tiny.head_extent() == 40 and tiny.head_chunk() == 2 and chunk_shape((40, 8), tiny) == (2, 8)
    assert tiny.block_dim("K") == 4 and tiny.block_dim("V") == 6


def test_kv_block_and_its_group_view_names():
    lay = A("kv", 4, 3, num_kv_heads=2, fused="block")
    assert rows(lay, 2, "K") == (3, 6) and rows(lay, 2, "V") == (9, 12)
    assert lay.head_blocks() == [(0, "K"), (2, "K"), (0, "V"), (2, "V")]


def _mirror(name, H, Hkv, d, **kw):
    """The row indices of each (block, head), by the model's own split code applied to an arange."""
    if name == "falcon_grouped":  # FalconAttention.forward, new_decoder_architecture
        g = torch.arange((H + 2 * Hkv) * d).view(Hkv, -1, d)
        return {"Q": g[:, :-2, :].flatten(0, 1), "K": g[:, -2, :], "V": g[:, -1, :]}
    if name == "codegen":  # CodeGenAttention.forward: view(-1, 3 * local_dim), split (query, value, key)
        mp = kw["mp"]
        local = H * d // mp
        q, v, k = torch.arange(3 * H * d).view(mp, 3 * local).split(local, dim=-1)
        return {"Q": q.reshape(-1, d), "K": k.reshape(-1, d), "V": v.reshape(-1, d)}
    if name == "mla_kv_b":  # DeepseekV3Attention.expand_kv: view(-1, dn + dv), split [dn, dv]
        k, v = torch.arange(H * (d + kw["dv"])).view(H, -1).split([d, kw["dv"]], dim=-1)
        return {"K": k, "V": v}
    raise AssertionError(name)


@pytest.mark.parametrize("name,lay,kw", [
    ("falcon_grouped", A("qkv", 8, 4, num_kv_heads=2, fused="grouped"), {}),
    ("falcon_grouped", A("qkv", 6, 2, num_kv_heads=3, fused="grouped"), {}),
    ("codegen", A("qkv", 8, 4, fused="sharded", shards=4, order="QVK"), {"mp": 4}),
    ("codegen", A("qkv", 16, 2, fused="sharded", shards=4, order="QVK"), {"mp": 4}),
    ("mla_kv_b", A("kv", 4, 4, fused="interleaved", v_head_dim=6), {"dv": 6}),
])
def test_every_range_equals_the_models_own_split(name, lay, kw):
    want = _mirror(name, lay.num_heads, lay.num_kv_heads, lay.head_dim, **kw)
    for b, per_head in want.items():
        for h in range(lay.num_heads):
            own = lay.block_head(h, b)
            start, stop = lay.head_range(h, b)
            assert torch.equal(torch.arange(start, stop), per_head[own]), (name, h, b)


def test_new_fields_are_validated_with_the_fix():
    with pytest.raises(LayoutError, match="fused='grouped'"):
        A("qkv", 8, 4, num_kv_heads=2, fused="interleaved")  # points to grouped
    with pytest.raises(LayoutError, match=r"needs shards"):
        A("qkv", 8, 4, fused="sharded")
    with pytest.raises(LayoutError, match=r"shards=3 must divide"):
        A("qkv", 8, 4, fused="sharded", shards=3)
    with pytest.raises(LayoutError, match=r"only for fused='sharded'"):
        A("qkv", 8, 4, fused="block", shards=2)
    with pytest.raises(LayoutError, match=r"permutation of 'QKV'"):
        A("qkv", 8, 4, fused="grouped", order="QKK")
    with pytest.raises(LayoutError, match=r"older reader would ignore it"):
        A("qkv", 8, 4, fused="interleaved", order="QVK")
    with pytest.raises(LayoutError, match=r"v_head_dim is only for kind 'kv'"):
        A("qkv", 8, 4, fused="block", v_head_dim=6)
    with pytest.raises(LayoutError, match=r"v_head_dim must be an int >= 1"):
        A("kv", 8, 4, fused="interleaved", v_head_dim=0)
    with pytest.raises(LayoutError, match=r"fused in \('block', 'conv1d', 'interleaved', 'sharded'\)"):
        A("kv", 8, 4, fused="grouped")
    with pytest.raises(LayoutError, match=r"needs fused in"):
        A("kv", 8, 4)
    with pytest.raises(LayoutError, match=r"only kinds 'qkv' and 'kv' are fused"):
        A("q", 8, 4, fused="block")
    with pytest.raises(LayoutError, match=r"has no heads; drop shards"):
        ParamLayout("latent", shards=2)
    with pytest.raises(LayoutError, match=r"permutation of 'KV'"):
        A("kv", 4, 4, fused="interleaved", order="KQV")
    assert A("kv", 4, 4, fused="interleaved", order="VK").head_range(1, "V") == (8, 12)


def test_old_layouts_serialise_byte_identically_and_new_ones_round_trip():
    import json


    # what a store written before issue 20 holds: the new optional fields never appear
    assert json.dumps(A("qkv", 12, 64, fused="conv1d").to_dict()) == (
        '{"kind": "qkv", "num_heads": 12, "num_kv_heads": 12, "head_dim": 64, "head_axis": 1, "fused": "conv1d", '
        '"transposed": true}')
    assert json.dumps(A("k", 32, 128, num_kv_heads=8).to_dict()) == (
        '{"kind": "k", "num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "head_axis": 0}')
    assert ParamLayout("mlp").to_dict() == {"kind": "mlp"}
    old = {"kind": "qkv", "num_heads": 4, "num_kv_heads": 4, "head_dim": 2, "head_axis": 0, "fused": "interleaved"}
    assert ParamLayout.from_dict(old) == A("qkv", 4, 2, fused="interleaved")
    for lay, _ in LAYOUTS:
        assert ParamLayout.from_dict(json.loads(json.dumps(lay.to_dict()))) == lay
    mla = A("kv", 4, 4, fused="interleaved", v_head_dim=6)
    assert mla.to_dict()["v_head_dim"] == 6 and "shards" not in mla.to_dict()
    assert A("qkv", 8, 4, fused="sharded", shards=4, order="QVK").to_dict()["order"] == "QVK"
    assert ParamLayout.from_dict({"kind": "latent"}) == ParamLayout("latent")
    assert "d_v=6" in repr(mla) and "shards=4" in repr(A("qkv", 8, 4, fused="sharded", shards=4))


def test_labels_and_names_of_the_new_fusions():
    from fisherstore.spec.layout import dimension_names, head_labels

    heads, blocks = head_labels(A("kv", 2, 2, fused="interleaved", v_head_dim=3), 10)
    assert blocks == list("KKVVVKKVVV") and heads == [0] * 5 + [1] * 5
    heads, blocks = head_labels(A("qkv", 4, 1, num_kv_heads=2, fused="grouped"), 8)
    assert blocks == list("QQKVQQKV") and heads == [0, 1, 0, 0, 2, 3, 1, 1]
    heads, blocks = head_labels(A("qkv", 4, 1, fused="sharded", shards=2, order="QVK"), 12)
    assert blocks == list("QQVVKKQQVVKK") and heads == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]
    assert dimension_names(2, A("kv", 2, 2, fused="interleaved", v_head_dim=3)) == ("out_heads", "in")
    assert chunk_shape((64, 32), ParamLayout("latent")) == (64, 32)  # row chunks, like an MLP weight


@pytest.mark.parametrize("arch, version", [("llama", 1), ("falcon_mha", 1), ("falcon", 3), ("codegen", 3),
                                           ("deepseek_v3", 3)])
def test_a_store_is_raised_to_version_3_only_by_the_layouts_older_readers_would_misplace(tmp_path, arch, version):
    """Falcon's grouped, CodeGen's sharded and MLA's kv/latent layouts need format version 3; an older
    fisherstore must refuse the store (FormatVersionError) rather than read head blocks from other rows."""
    import json

    import fisherstore
    from fisherstore import FisherCollector, FormatVersionError
    from fisherstore.spec.format import FORMAT_VERSION
    from tests.models import tiny_model, token_batch

    path = tmp_path / "s"
    with FisherCollector(backend="zarr", path=path, mode="w") as fc:  # the attention projections
        fc.collect_fisher(tiny_model(arch), token_batch(n=2, seq=6, pad_last=False), task="a")
    doc = json.load(open(path / "zarr.json"))
    assert doc["attributes"]["fisherstore"]["format_version"] == version
    doc["attributes"]["fisherstore"]["format_version"] = FORMAT_VERSION + 1  # as a newer writer would leave it
    json.dump(doc, open(path / "zarr.json", "w"))
    with pytest.raises(FormatVersionError, match="Upgrade fisherstore"):
        fisherstore.open(path, mode="r")
