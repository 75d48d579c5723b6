"""FisherCollector on real HF models: backends agree, group view = stored head blocks."""

import pytest
import torch

from fisherstore import FisherCollector, UnknownParamError, UnknownTaskError
from tests.models import tiny_model, token_batch

TASKS = {"a": 0, "b": 32}


def _collect(arch, backend, path=None, calls=3, **kw):
    model = tiny_model(arch)
    fc = FisherCollector(backend=backend, path=path, micro_batch_size=2, **kw)
    for i in range(calls):
        for task, lo in TASKS.items():
            if task == "b" and i == 1:
                continue  # task b skips a call: its steps differ from a's
            fc.collect_fisher(model, token_batch(n=5, seq=7, seed=10 * i + lo, lo=lo), task=task)
    return fc


@pytest.mark.parametrize("arch", ["llama", "gpt2", "pythia", "qwen2"])
def test_disk_backends_equal_ram(tmp_path, arch):
    ram = _collect(arch, "ram", params="all" if arch == "qwen2" else None)
    for backend in ("zarr", "tensorstore"):
        disk = _collect(arch, backend, tmp_path / backend, params="all" if arch == "qwen2" else None)
        for task in TASKS:
            assert disk.store.step(task) == ram.store.step(task)
            names = ram.store.params(task)
            assert disk.store.params(task) == names and names
            for n in names:
                want = ram.full_fisher(task, n).load()
                assert torch.allclose(disk.full_fisher(task, n).load(), want, rtol=1e-5, atol=1e-12), (backend, n)
        disk.close()
        # reopened from disk: same values, and the group view is rebuilt from the store
        again = FisherCollector(backend=backend, path=tmp_path / backend)
        for n in ram.store.params("a"):
            assert torch.allclose(again.full_fisher("a", n).load(), ram.full_fisher("a", n).load(), rtol=1e-5)
        g_ram = ram.get_group_fisher("a")
        g_disk = again.get_group_fisher("a")
        assert g_ram.keys() == g_disk.keys()
        for k in g_ram:
            assert torch.allclose(g_disk[k], g_ram[k], rtol=1e-4), k
        again.close()


def test_group_view_equals_sum_of_stored_head_blocks():  # case 15, incl. GQA K and O
    fc = _collect("llama", "ram")
    lay = fc.store.layout
    for block, name in (("Q", "q_proj"), ("K", "k_proj"), ("O", "o_proj")):
        full = f"model.layers.1.self_attn.{name}.weight"
        g = fc.get_group_fisher("a", full, "head")
        L = lay("a", full)
        reps = range(0, 4, L.group_size) if block == "K" else range(4)
        assert g.shape == (len(reps),)
        F = fc.full_fisher("a", full)
        for i, h in enumerate(reps):
            assert torch.allclose(g[i], F.head(h, block).sum(), rtol=1e-5)
    gpt2 = _collect("gpt2", "ram")
    name = "transformer.h.0.attn.c_attn.weight"
    groups = gpt2.get_group_fisher("a", name)
    assert sorted(k.split("|")[2] for k in groups) == ["head_k", "head_q", "head_v"]
    F = gpt2.full_fisher("a", name)
    assert torch.allclose(groups[f"a|{name}|head_v"][2], F.head(2, "V").sum(), rtol=1e-5)
    assert gpt2.get_group_fisher("a", name, "head") == {}  # 'head' does not match 'head_q' (case 23)


def test_collector_semantics():
    fc = _collect("llama", "ram", calls=1)
    meta = fc.store.metadata("a")
    assert meta["estimator"] == "micro_batch" and meta["model"]["num_kv_heads"] == 2
    # 5 sequences of 7 tokens; the last has 3 real tokens, so 2 predictions: 4*6 + 2
    assert fc.get_token_count("a") == 4 * 6 + 2
    full = fc.full_fisher("a")
    with pytest.raises(TypeError):
        full["x"] = 1  # read-only mapping
    assert all(v.ndim == 2 for v in full.values()) and len(full) == 8
    F = full["model.layers.0.self_attn.q_proj.weight"]
    v = F.detach().to(dtype=torch.float32, device="cpu")
    assert torch.equal(v[0:8][:, 0:4], F.load()[0:8, 0:4])
    keys = list(fc.fisher_ema)
    assert keys and all(k.count("|") == 2 for k in keys)
    with pytest.raises(UnknownTaskError):
        fc.get_group_fisher("zzz")
    with pytest.raises(UnknownParamError, match="Did you mean"):
        fc.get_group_fisher("a", "model.layers.0.self_attn.q_proj.weigh")
    with pytest.raises(UnknownParamError, match="selects no parameter"):
        FisherCollector(params=["nothing_matches"]).collect_fisher(tiny_model("llama"), token_batch())


def test_micro_batch_estimator_is_sum_of_micro_batch_squares_and_batch_estimator_differs():
    model = tiny_model("llama")
    batch = token_batch(n=4, seq=6, pad_last=False)
    name = "model.layers.0.self_attn.v_proj.weight"
    grads = []
    for i in range(4):
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"][i:i + 1]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), batch["input_ids"][i:i + 1, 1:].reshape(-1),
                                                 reduction="sum")
        loss.backward()
        grads.append(dict(model.named_parameters())[name].grad.clone())
    T = 4 * 5
    want_micro = sum(g**2 for g in grads) / T
    want_batch = sum(grads) ** 2 / T
    for est, want in (("micro_batch", want_micro), ("batch", want_batch)):
        fc = FisherCollector(micro_batch_size=1, estimator=est)
        fc.collect_fisher(model, batch)
        got = fc.full_fisher("default", name).load()  # bias-corrected after 1 step = x
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-12), est
        assert fc.store.metadata("default")["estimator"] == est
    # the caller's own .grad (left over from the loop above) is neither used nor lost
    assert torch.equal(dict(model.named_parameters())[name].grad, grads[-1])
    assert all(p.requires_grad for p in model.parameters())


# -- the fusions of issue 20 through a store and back ---------------------------------------------

ROUND_TRIP = {  # arch: the parameters checked value by value (each fusion, and MLA's shared latent)
    "falcon": ["transformer.h.1.self_attention.query_key_value.weight", "transformer.h.0.self_attention.dense.weight"],
    "codegen": ["transformer.h.1.attn.qkv_proj.weight", "transformer.h.0.attn.out_proj.weight"],
    "deepseek_v3": ["model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.self_attn.kv_b_proj.weight",
                    "model.layers.1.self_attn.o_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
    "whisper": ["model.encoder.layers.1.self_attn.k_proj.weight", "model.decoder.layers.1.encoder_attn.v_proj.weight",
                "model.decoder.layers.0.self_attn.out_proj.weight"],
}


@pytest.mark.parametrize("arch", sorted(ROUND_TRIP))
def test_new_fusions_round_trip_and_equal_a_hand_computed_ema(tmp_path, arch):
    import fisherstore
    from fisherstore.losses import causal_lm, seq2seq_lm
    from tests.models import speech_batch
    from tests.test_collector_semantics import _close, _hand_fisher, _shift_right

    model = tiny_model(arch)
    cfg = model.config
    names = ROUND_TRIP[arch]
    beta = 0.9
    if arch == "whisper":
        loss_fn = seq2seq_lm
        batches = [speech_batch(n=4, tgt=5, model=model, seed=s) for s in range(2)]

        def logits_of(part):  # decoder inputs shifted here, by hand
            dec = _shift_right(part["labels"], cfg.decoder_start_token_id, cfg.pad_token_id)
            return model(input_features=part["input_features"], decoder_input_ids=dec).logits
    else:
        loss_fn = causal_lm
        batches = [token_batch(n=4, seq=7, seed=s) for s in range(2)]

        def logits_of(part):  # next-token prediction, by hand: position i predicts i + 1
            return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits[:, :-1]

    # by hand: x_t = Σ_micro-batch g² / T_t, F_t = β F_{t-1} + (1 - β) x_t, read back as F_t / (1 - β^t)
    F = {n: 0 for n in names}
    for b in batches:
        hand = dict(b)
        if arch != "whisper":
            hand["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)[:, 1:]
        x, _, _ = _hand_fisher(model, hand, names, 2, logits_of)
        F = {n: beta * F[n] + (1 - beta) * x[n] for n in names}
    want = {n: F[n] / (1 - beta ** len(batches)) for n in names}

    layouts = fisherstore.layouts_from_model(model)
    path = tmp_path / "s"
    with FisherCollector(backend="zarr", path=path, micro_batch_size=2, ema_decay=beta, loss_fn=loss_fn,
                         params=names) as fc:
        for b in batches:
            fc.collect_fisher(model, b, task="t")
        for n in names:  # the group view sums each head block, whatever the fusion
            lay = layouts[n]
            if not lay.has_heads:
                continue
            groups = fc.get_group_fisher("t", n)
            groups = {"head": groups} if isinstance(groups, torch.Tensor) else {k.split("|")[2]: v for k, v in groups.items()}
            for b in lay.blocks:
                key = "head" if len(lay.blocks) == 1 else f"head_{b.lower()}"
                sums = torch.stack([want[n][lay.head_index(h, b, 2)].sum() for h, _ in lay.head_blocks(b)])
                assert _close(groups[key], sums), (n, b)
    with fisherstore.open(path, mode="r") as s:
        for n in names:
            lay = s.layout("t", n)
            assert lay == layouts[n] and lay.to_dict() == layouts[n].to_dict(), n  # the layout reads back as written
            got = s.fisher("t", n)
            assert want[n].abs().max() > 0 and _close(got.load(), want[n]), (arch, n)
            if lay.has_heads:
                chunks = s.param("t", n).chunks
                assert chunks[lay.head_axis] == lay.head_chunk()  # no chunk straddles two head blocks
                for h, b in lay.head_blocks():
                    assert _close(got.head(h, b), want[n][lay.head_index(h, b, 2)]), (n, h, b)
    if arch == "deepseek_v3":  # MLA: K and V heads of kv_b_proj differ in size (4 and 6), so chunks are their gcd
        kv = layouts["model.layers.1.self_attn.kv_b_proj.weight"]
        assert [kv.head_range(1, b) for b in "KV"] == [(10, 14), (14, 20)] and kv.head_chunk() == 2
        assert layouts["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == fisherstore.ParamLayout("latent")
