"""Anchors, the EWC penalty and Fisher-weighted merging, against the formulas written out in float64 here."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fisherstore
from fisherstore import (
    FisherCollector,
    InvalidArgumentError,
    NoEmaStepError,
    ShapeMismatchError,
    StepError,
    UnknownParamError,
    UnknownTaskError,
)
from fisherstore.store.anchor_verbs import anchor_task
from tests.models import tiny_model, token_batch


def _perturb(model, scale=0.02, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def collected(tmp_path):
    """A gpt2 Fisher of two steps in a zarr store, its anchor saved; the model and a copy of θ*."""
    model = tiny_model("gpt2")
    fc = FisherCollector(backend="zarr", path=tmp_path / "s", params="all", micro_batch_size=2)
    for i in range(2):
        fc.collect_fisher(model, token_batch(seed=i), task="t")
    star = copy.deepcopy(model)
    assert fc.store.save_anchor("t", model) == "t@anchor"
    yield fc.store, model, star, tmp_path / "s"
    fc.close()


def _ewc64(store, task, model, star):
    """Σ F̂ (θ − θ*)² in float64 with autograd, from the store's Fisher readout and θ* of a model copy."""
    weights = dict(model.named_parameters())
    anchors = dict(star.named_parameters())
    leaves, total = {}, torch.zeros((), dtype=torch.float64)
    for n in store.params(task):
        theta = weights[n].detach().double().requires_grad_(True)
        leaves[n] = theta
        total = total + (store.read(task, n).double() * (theta - anchors[n].detach().double()) ** 2).sum()
    total.backward()
    return total.detach(), {n: t.grad for n, t in leaves.items()}


# -- anchors ------------------------------------------------------------------------------------------------------
def test_anchor_is_the_weights_bit_for_bit_also_after_reopening(collected):
    store, model, _, path = collected
    assert store.has_anchor("t") and not store.has_anchor("nope")
    names = store.params("t")
    assert store.params("t@anchor") == names and anchor_task("t") == "t@anchor"
    weights = dict(model.named_parameters())
    for n in names:
        assert torch.equal(store.anchor("t", n), weights[n].detach())
    meta = store.metadata("t@anchor")
    assert meta["estimator"] == "anchor" and meta["user"]["anchor_of"] == "t" and meta["step"] == 1
    assert meta["model"]["class"] == "GPT2LMHeadModel"
    with fisherstore.open(path, mode="r") as ro:
        assert ro.has_anchor("t")
        assert ro.metadata("t@anchor")["estimator"] == "anchor"
        for n in names:
            assert torch.equal(ro.anchor("t", n), weights[n].detach())
    with pytest.raises(UnknownParamError, match="lm_head"):
        store.anchor("t", "lm_head.weight")  # tied to wte: the Fisher task stores it once, as wte


def test_bf16_and_mapping_anchors_with_names_and_refusals(open_store):
    store = open_store()
    w = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7)}
    with pytest.raises(UnknownTaskError, match="names="):
        store.save_anchor("x", w)  # no Fisher task to say what to anchor
    store.save_anchor("x", w, names=["a", "b"], description={"class": "toy"})
    assert torch.equal(store.anchor("x", "a"), w["a"].float()) and store.anchor("x", "a").dtype == torch.float32
    assert torch.equal(store.anchor("x", "b"), w["b"])
    assert store.metadata("x@anchor")["model"] == {"class": "toy"}
    with pytest.raises(StepError, match="new task name"):
        store.save_anchor("x", w, names=["a"])
    with pytest.raises(UnknownParamError, match="'c'"):
        store.save_anchor("y", w, names=["c"])
    assert "y@anchor" not in store.tasks()  # refused before anything was created
    store.create("z", "a", (5, 3))
    store.update("z", {"a": torch.rand(5, 3)})
    with pytest.raises(ShapeMismatchError, match="'a'"):
        store.save_anchor("z", w)
    with pytest.raises(fisherstore.NonFiniteGradientError):
        store.save_anchor("n", {"a": torch.tensor([1.0, float("nan")])}, names=["a"])


def test_anchor_on_a_lossy_store_is_refused(open_store):
    store = open_store(lossy_keepbits=8)
    store.create("t", "w", (4,))
    store.update("t", {"w": torch.rand(4)})
    with pytest.raises(InvalidArgumentError, match="lossy_keepbits"):
        store.save_anchor("t", {"w": torch.randn(4)})
    assert not store.has_anchor("t")


# -- the EWC penalty --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["writer", "reader"])
def test_ewc_value_and_gradient_equal_the_float64_formula(collected, mode):
    store, model, star, path = collected
    _perturb(model)
    reader = fisherstore.open(path, mode="r") if mode == "reader" else None
    src = reader or store
    try:
        want, want_grads = _ewc64(src, "t", model, star)
        pen = fisherstore.ewc_penalty(model, src, "t")
        assert pen.dtype == torch.float32 and pen.shape == () and pen.requires_grad
        assert float(pen.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
        model.zero_grad()
        pen.backward()
        weights = dict(model.named_parameters())
        for n, g in want_grads.items():
            torch.testing.assert_close(weights[n].grad.double(), g, rtol=1e-5, atol=1e-12)
        assert model.lm_head.weight.grad is not None  # tied to wte, which the task stores
    finally:
        if reader is not None:
            reader.close()


def test_ewc_with_a_model_copy_or_a_mapping_as_anchor(collected):
    store, model, star, _ = collected
    _perturb(model)
    want = fisherstore.ewc_penalty(model, store, "t")
    by_model = fisherstore.ewc_penalty(model, store, "t", anchor=star)
    by_dict = fisherstore.ewc_penalty(model, store, "t", anchor={n: p.detach().clone() for n, p in
                                                                 star.named_parameters()})
    assert float(by_model.detach()) == float(want.detach()) == float(by_dict.detach())
    g1 = torch.autograd.grad(by_model, list(model.parameters()), allow_unused=True)
    g2 = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.equal(a, b)
    with torch.no_grad():  # no graph: the value alone
        assert float(fisherstore.ewc_penalty(model, store, "t")) == float(want.detach())  # no grad_fn here
    assert float(fisherstore.ewc_penalty(star, store, "t").detach()) == 0.0  # at θ*


def test_ewc_on_bf16_and_frozen_parameters(open_store):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    store = open_store()
    fisher = {n: torch.rand(p.shape) for n, p in lin.named_parameters()}
    for n, p in lin.named_parameters():
        store.create("t", n, p.shape)
    store.update("t", fisher)
    store.save_anchor("t", lin)
    moved = copy.deepcopy(lin).to(torch.bfloat16)
    with torch.no_grad():
        moved.weight.add_(0.25)
    moved.bias.requires_grad_(False)
    pen = fisherstore.ewc_penalty(moved, store, "t")
    F = {n: store.read("t", n).double() for n in fisher}
    d = {n: p.detach().double() - dict(lin.named_parameters())[n].detach().double() for n, p in moved.named_parameters()}
    assert pen.dtype == torch.float32
    assert float(pen.detach()) == pytest.approx(float(sum((F[n] * d[n] ** 2).sum() for n in F)), rel=1e-6)
    pen.backward()
    assert moved.bias.grad is None and moved.weight.grad.dtype == torch.bfloat16  # frozen: counted, no gradient
    torch.testing.assert_close(moved.weight.grad.double(), 2 * F["weight"] * d["weight"], rtol=1e-2, atol=1e-6)


def test_ewc_refusals_name_what_is_wrong(collected):
    store, model, star, _ = collected
    fc2 = FisherCollector(store=store, params="all", micro_batch_size=2)
    fc2.collect_fisher(model, token_batch(seed=3), task="u")
    with pytest.raises(UnknownTaskError, match=r"save_anchor\('u', model\)"):
        fisherstore.ewc_penalty(model, store, "u")
    bad = {n: p.detach() for n, p in star.named_parameters()}
    bad["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(ShapeMismatchError, match="transformer.h.0.mlp.c_fc.weight"):
        fisherstore.ewc_penalty(model, store, "t", anchor=bad)
    del bad["transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(UnknownParamError, match="transformer.h.0.mlp.c_fc.weight"):
        fisherstore.ewc_penalty(model, store, "t", anchor=bad)
    other = tiny_model("llama")
    with pytest.raises(UnknownParamError, match="transformer.wte.weight"):
        fisherstore.ewc_penalty(other, store, "t")
    with pytest.raises(UnknownTaskError, match="nope"):
        fisherstore.ewc_penalty(model, store, "nope")
    with pytest.raises(InvalidArgumentError, match="anchor weights"):
        fisherstore.ewc_penalty(model, store, "t@anchor", anchor=star)
    store.create("empty", "transformer.wpe.weight", (64, 32))
    with pytest.raises(NoEmaStepError, match="empty"):
        fisherstore.ewc_penalty(model, store, "empty", anchor=star)
    # a step written to the task between forward and backward would mix two Fishers
    _perturb(model)
    pen = fisherstore.ewc_penalty(model, store, "t")
    fc2.collect_fisher(model, token_batch(seed=4), task="t")
    with pytest.raises(StepError, match="between"):
        pen.backward()


def test_ewc_graph_saves_only_references_to_the_parameters(collected):
    """Bounded memory: autograd saves the parameters (no copies), never an F̂ or a θ − θ* per parameter."""
    store, model, star, _ = collected
    _perturb(model)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pen = fisherstore.ewc_penalty(model, store, "t")
    params = dict(model.named_parameters())
    stored = [params[n] for n in store.params("t")]
    assert len(saved) == len(stored)
    assert all(a is b for a, b in zip(saved, stored))
    # the plain formula, for contrast, saves F̂ and θ − θ* of every parameter
    naive = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: naive.append(t) or t, lambda t: t):
        sum((store.read("t", n) * (params[n] - store.anchor("t", n)) ** 2).sum() for n in store.params("t"))
    assert sum(t.numel() for t in naive) >= 2 * sum(p.numel() for p in stored)
    pen.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ewc_on_a_gpu_model_matches_the_cpu(collected):
    store, model, star, _ = collected
    _perturb(model)
    want = fisherstore.ewc_penalty(model, store, "t")
    want.backward()
    gpu = copy.deepcopy(model).cuda()
    gpu.zero_grad()
    pen = fisherstore.ewc_penalty(gpu, store, "t")
    assert pen.device.type == "cuda"
    assert float(pen.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    pen.backward()
    for a, b in zip(gpu.parameters(), model.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-10)


_RSS = textwrap.dedent("""
    import resource, sys, torch, fisherstore
    path = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(4)])  # 4 x 64 MiB
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    store = fisherstore.open(path, mode="r", memory_budget=32 << 20)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pen = fisherstore.ewc_penalty(model, store, "t")
    pen.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) * 1024)
""")


@pytest.mark.slow
def test_ewc_peak_memory_is_one_parameter_not_the_model(tmp_path):
    """A 256 MiB model: the penalty and its backward add the gradients (256 MiB) and one parameter's reads."""
    path = tmp_path / "s"
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(4)])
    with fisherstore.open(path, mode="w", memory_budget=32 << 20) as store:
        for n, p in model.named_parameters():
            store.create("t", n, p.shape)
        with store.begin_step("t") as st:
            for n, p in model.named_parameters():
                st.add(n, torch.rand(p.shape))
        store.save_anchor("t", model)
    out = subprocess.run([sys.executable, "-c", _RSS, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    grew = int(out.stdout.split()[-1])
    mib = 1 << 20
    # the gradients (256 MiB) and a parameter's reads (64 MiB each); the plain formula measured ~570 MiB here
    assert grew < 256 * mib + 2 * 64 * mib, grew / mib


# -- merging -----------------------------------------------------------------------------------------------------
@pytest.fixture
def three(tmp_path):
    """Three gpt2 models (seeds 0..2), each with a Fisher task m0..m2 and its anchor, in one store."""
    models = [tiny_model("gpt2", seed=i) for i in range(3)]
    fc = FisherCollector(backend="zarr", path=tmp_path / "s", params="all", micro_batch_size=2)
    for i, m in enumerate(models):
        fc.collect_fisher(m, token_batch(seed=10 + i), task=f"m{i}")
        fc.store.save_anchor(f"m{i}", m)
    yield fc.store, models
    fc.close()


def _merge64(fishers, thetas, lam, eps, relative=True):
    """θ = Σ λ (F + ε) θ / Σ λ (F + ε) in float64, ε relative to the λ-weighted mean Fisher."""
    F = [f.double() for f in fishers]
    T = [t.double() for t in thetas]
    L = sum(lam)
    e = eps * float(sum(w * f.mean() for w, f in zip(lam, F))) / L if relative else eps
    num = sum(w * (f + e) * t for w, f, t in zip(lam, F, T))
    den = sum(w * (f + e) for w, f in zip(lam, F))
    plain = sum(w * t for w, t in zip(lam, T)) / L
    return torch.where(den == 0, plain, num / torch.where(den == 0, 1, den))


@pytest.mark.parametrize("lam", [None, [1.0, 2.0, 0.5]])
def test_merge_equals_the_float64_formula(three, lam):
    store, models = three
    members = [(m, store, f"m{i}") for i, m in enumerate(models)]
    merged = fisherstore.merge(members, weights=lam)
    w = lam or [1.0, 1.0, 1.0]
    names = store.params("m0")
    assert list(merged) == names
    for n in names:
        want = _merge64([store.read(f"m{i}", n) for i in range(3)],
                        [dict(m.named_parameters())[n].detach() for m in models], w, 1e-6)
        assert merged[n].dtype == torch.float32
        torch.testing.assert_close(merged[n].double(), want, rtol=1e-5, atol=1e-7)
    # an absolute ε far above the Fishers: the λ-weighted average
    flat = fisherstore.merge(members, weights=lam, eps=1e6, relative=False)
    for n in names:
        want = sum(wi * dict(m.named_parameters())[n].detach().double() for wi, m in zip(w, models)) / sum(w)
        torch.testing.assert_close(flat[n].double(), want, rtol=1e-5, atol=1e-7)


def test_merge_from_anchors_alone_equals_merge_from_models_and_into_writes_a_model(three):
    store, models = three
    from_models = fisherstore.merge([(m, store, f"m{i}") for i, m in enumerate(models)], weights=[3, 1, 1])
    from_anchors = fisherstore.merge([(store, f"m{i}") for i in range(3)], weights=[3, 1, 1])
    assert all(torch.equal(from_models[n], from_anchors[n]) for n in from_models)
    target = tiny_model("gpt2", seed=7)
    assert fisherstore.merge([(store, f"m{i}") for i in range(3)], weights=[3, 1, 1], into=target) is target
    params = dict(target.named_parameters())
    assert all(torch.equal(params[n].detach(), from_models[n]) for n in from_models)
    # into one of the members: each parameter is read from every member before it is overwritten
    first = models[0]
    fisherstore.merge([(m, store, f"m{i}") for i, m in enumerate(models)], weights=[3, 1, 1], into=first)
    params = dict(first.named_parameters())
    assert all(torch.equal(params[n].detach(), from_models[n]) for n in from_models)
    got = {}
    assert fisherstore.merge([(store, "m1"), (store, "m2")], out=got.__setitem__) == store.params("m1")
    assert set(got) == set(store.params("m1"))


def test_merge_falls_back_to_the_weighted_average_where_every_fisher_is_zero(open_store):
    store = open_store()
    thetas = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fishers = [torch.rand(4, 6, generator=torch.Generator().manual_seed(10 + i)) + 0.1 for i in range(2)]
    for f in fishers:
        f[1] = 0  # row 1: no member's Fisher
    zero = torch.zeros(3)
    for i, (f, t) in enumerate(zip(fishers, thetas)):
        store.create(f"f{i}", "w", (4, 6))
        store.create(f"f{i}", "z", (3,))
        store.update(f"f{i}", {"w": f, "z": zero})
        store.save_anchor(f"f{i}", {"w": t, "z": torch.arange(3.0) * (i + 1)})
    members = [(store, "f0"), (store, "f1")]
    for eps, relative in ((1e-6, True), (0.0, False), (1e-3, False)):
        merged = fisherstore.merge(members, weights=[1, 3], eps=eps, relative=relative)
        read = [store.read(f"f{i}", "w") for i in range(2)]
        want = _merge64(read, thetas, [1, 3], eps, relative)
        torch.testing.assert_close(merged["w"].double(), want, rtol=1e-5, atol=1e-7)
        avg = (thetas[0][1] + 3 * thetas[1][1]) / 4
        torch.testing.assert_close(merged["w"][1], avg, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(merged["z"], (torch.arange(3.0) + 3 * 2 * torch.arange(3.0)) / 4)
    # relative ε: scaling every Fisher by one factor leaves the merge as it was
    for i, f in enumerate(fishers):
        store.create(f"g{i}", "w", (4, 6))
        store.update(f"g{i}", {"w": f * 1e-9})
    scaled = fisherstore.merge([({"w": thetas[0]}, store, "g0"), ({"w": thetas[1]}, store, "g1")], weights=[1, 3])
    base = fisherstore.merge(members, weights=[1, 3], names=["w"])
    torch.testing.assert_close(scaled["w"], base["w"], rtol=1e-5, atol=1e-7)


def test_merge_refusals(open_store, three):
    store, models = three
    members = [(m, store, f"m{i}") for i, m in enumerate(models)]
    with pytest.raises(ShapeMismatchError, match="transformer.wte.weight"):
        bad = {n: p.detach() for n, p in models[1].named_parameters()}
        bad["transformer.wte.weight"] = torch.zeros(2, 2)
        fisherstore.merge([members[0], (bad, store, "m1")])
    other = open_store(sub="other")
    other.create("x", "transformer.wte.weight", (32, 64))  # transposed
    other.update("x", {"transformer.wte.weight": torch.rand(32, 64)})
    other.save_anchor("x", {"transformer.wte.weight": torch.randn(32, 64)})
    with pytest.raises(ShapeMismatchError, match="transformer.wte.weight"):
        fisherstore.merge([members[0], (other, "x")], names=["transformer.wte.weight"])
    with pytest.raises(UnknownParamError, match="names="):
        fisherstore.merge([members[0], (other, "x")])  # x stores only wte
    with pytest.raises(UnknownTaskError, match=r"save_anchor\('x'"):
        store.create("x", "transformer.wte.weight", (64, 32))
        store.update("x", {"transformer.wte.weight": torch.rand(64, 32)})
        fisherstore.merge([members[0], (store, "x")])
    with pytest.raises(InvalidArgumentError, match="one λ per member"):
        fisherstore.merge(members, weights=[1, 2])
    with pytest.raises(InvalidArgumentError, match="all 0"):
        fisherstore.merge(members, weights=[0, 0, 0])
    with pytest.raises(InvalidArgumentError, match="into= .* or out="):
        fisherstore.merge(members, into=models[0], out=print)
    narrow = torch.nn.Module()
    narrow.transformer = torch.nn.Module()
    narrow.transformer.wte = torch.nn.Embedding(64, 16)
    with pytest.raises(ShapeMismatchError, match="into="):
        fisherstore.merge(members, into=narrow, names=["transformer.wte.weight"])
    with pytest.raises(UnknownParamError, match="into="):
        fisherstore.merge(members, into=torch.nn.Linear(2, 2), names=["transformer.wte.weight"])
    before = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    with pytest.raises(ShapeMismatchError):
        fisherstore.merge([members[0], (other, "x")], names=["transformer.wte.weight"], into=models[0])
    assert all(torch.equal(p.detach(), before[n]) for n, p in models[0].named_parameters())  # nothing written
