"""Collection that never stalls a device: no host sync in the hooks, batched group sums, deferred checks,
overlapped device-to-host staging (with a CUDA-free stand-in for the copies), and a RAM backend worth its name."""

import threading
import time

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fisherstore
from fisherstore import FisherCollector, InvalidGradientError, NonFiniteGradientError, ParamLayout
from fisherstore.collect.group_view import group_reduce
from fisherstore.engine.generations import WritePath
from fisherstore.engine.memory import MemoryPlan, Residency, trim_heap
from fisherstore.engine.options import StoreOptions
from fisherstore.engine.staging import DeviceStager
from fisherstore.engine.step.checks import StepChecks
from tests.models import tiny_model, token_batch

# -- batched group reduction ------------------------------------------------------------------


def _per_head(x, layout):
    """The group view as it was computed before: one sum per head block, K/V once per kv head."""
    if layout is not None and layout.has_heads:
        out = {}
        for b in layout.blocks:
            reps = range(0, layout.num_heads, layout.group_size) if b in "KV" else range(layout.num_heads)
            vals = torch.stack([x[layout.head_index(h, b, x.ndim)].sum() for h in reps])
            out["head" if len(layout.blocks) == 1 else f"head_{b.lower()}"] = vals
        return out
    kind = layout.kind if layout is not None else "other"
    if x.ndim == 2:
        return {"token" if kind == "embedding" else "channel": x.sum(dim=1)}
    return {("bias" if kind == "bias" else "row") if x.ndim == 1 else "param": x.clone()}


CASES = [
    ((48, 32), ParamLayout.attention("q", 6, 8)),
    ((16, 32), ParamLayout.attention("k", 6, 8, num_kv_heads=2)),  # GQA
    ((16, 32), ParamLayout.attention("v", 6, 8, num_kv_heads=2)),
    ((32, 48), ParamLayout.attention("o", 6, 8)),
    ((80, 32), ParamLayout.attention("qkv", 6, 8, num_kv_heads=2, fused="block")),  # Phi-3
    ((32, 144), ParamLayout.attention("qkv", 6, 8, fused="conv1d")),  # GPT-2 c_attn
    ((144, 32), ParamLayout.attention("qkv", 6, 8, fused="interleaved")),  # GPT-NeoX
    ((48,), ParamLayout.attention("q", 6, 8, ndim=1)),
    ((144,), ParamLayout.attention("qkv", 6, 8, fused="interleaved", ndim=1)),
    ((80, 32), ParamLayout.attention("qkv", 6, 8, num_kv_heads=2, fused="grouped")),  # Falcon new decoder
    ((64, 32), ParamLayout.attention("qkv", 6, 8, num_kv_heads=1, fused="block")),  # multi-query
    ((144, 32), ParamLayout.attention("qkv", 6, 8, fused="sharded", shards=3, order="QVK")),  # CodeGen
    ((40, 32), ParamLayout.attention("kv", 4, 4, fused="interleaved", v_head_dim=6)),  # MLA: K 4, V 6
    ((40,), ParamLayout.attention("kv", 4, 4, fused="interleaved", v_head_dim=6, ndim=1)),
    ((32, 40), ParamLayout.attention("kv", 4, 4, fused="conv1d", v_head_dim=6)),  # heads on axis 1
    ((64, 32), ParamLayout("latent")),
    ((64, 32), ParamLayout("embedding")),
    ((64, 32), ParamLayout("mlp")),
    ((32,), ParamLayout("norm")),
    ((32,), ParamLayout("bias")),
    ((2, 3, 4), None),
]


@pytest.mark.parametrize("shape,layout", CASES)
def test_batched_group_reduction_equals_the_per_head_loop(shape, layout):
    x = torch.rand(shape, dtype=torch.float64) ** 3
    got, want = group_reduce(x, layout), _per_head(x, layout)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape and torch.allclose(got[k], want[k], rtol=1e-12), k


# -- no host sync inside backward hooks ----------------------------------------------------------

SYNCS = {"item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "nonzero"}


class _Counter(TorchFunctionMode):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def sync_counter(monkeypatch):
    """Counts host syncs inside post-accumulate-grad hooks (and, separately, at settle)."""
    in_hooks, total = [], []
    register = torch.Tensor.register_post_accumulate_grad_hook

    def counted(self, fn):
        def hook(p):
            with _Counter(in_hooks):
                fn(p)
        return register(self, hook)

    monkeypatch.setattr(torch.Tensor, "register_post_accumulate_grad_hook", counted)
    # The CPU has no device to wait for, so its values are judged at once; make them take the
    # device's path (read at settle) so the hooks run exactly the code they run on a GPU.
    monkeypatch.setattr(StepChecks, "judge_now", staticmethod(lambda x: False))
    for mod, name in ((torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"),
                      (torch.cuda.Stream, "synchronize")):
        monkeypatch.setattr(mod, name, lambda *a, **k: in_hooks.append("synchronize"))
    verdicts = StepChecks.verdicts

    def counted_verdicts(self):
        with _Counter(total):
            return verdicts(self)

    monkeypatch.setattr(StepChecks, "verdicts", counted_verdicts)
    return in_hooks, total


@pytest.mark.parametrize("backend,kw", [("ram", {}), ("zarr", {}), ("zarr", {"memory_budget": 0}),
                                        ("ram", {"estimator": "batch"})])
def test_backward_hooks_make_no_host_sync(tmp_path, sync_counter, backend, kw):
    in_hooks, at_settle = sync_counter
    fc = FisherCollector(backend=backend, path=tmp_path / "s", params="all", micro_batch_size=2, **kw)
    model = tiny_model("llama")
    for seed in range(2):
        fc.collect_fisher(model, token_batch(n=4, seq=8, seed=seed), task="a")
    assert fc.store.step("a") == 2
    assert in_hooks == []  # not one .item()/.cpu()/float()/synchronize inside backward
    assert at_settle  # the checks were read, once per step, after backward: the counter sees syncs
    fc.close()


def test_the_sync_counter_can_fail(sync_counter):
    in_hooks, _ = sync_counter
    w = torch.nn.Parameter(torch.ones(3))
    w.register_post_accumulate_grad_hook(lambda p: p.grad.sum().item())
    (w * 2).sum().backward()
    assert in_hooks == ["item"]


# -- deferred value checks keep the documented behaviour ---------------------------------------


def test_checks_read_at_settle_refuse_or_skip_a_step_as_before(open_store, backend, monkeypatch):
    monkeypatch.setattr(StepChecks, "judge_now", staticmethod(lambda x: False))  # the device's path
    s = open_store(backend, decay=0.5)
    s.create("t", "a", (4, 4))
    s.create("t", "b", (4, 4))
    s.update("t", {"a": torch.ones(4, 4), "b": torch.ones(4, 4)})
    bad = torch.ones(4, 4)
    bad[1, 2] = float("nan")
    with s.begin_step("t") as st:
        with pytest.raises(NonFiniteGradientError, match="'a' has non-finite"):
            st.add("a", bad)  # the add itself does not fail: the step does, at settle
            st.add("b", torch.ones(4, 4))
            st.settle()
    assert s.step("t") == 1 and torch.equal(s.fisher("t", "a").load(), torch.ones(4, 4))
    with pytest.raises(InvalidGradientError, match="negative"):
        s.update("t", {"a": -torch.ones(4, 4)})
    with pytest.raises(NonFiniteGradientError):  # a square fed as trusted is checked on the accumulated step
        with s.begin_step("t") as st:
            st.add("a", torch.full((4, 4), float("inf")), trusted=True)
    assert s.step("t") == 1
    skip = open_store(backend, sub="skip", decay=0.5, nonfinite="skip")
    for n in "ab":
        skip.create("t", n, (4, 4))
    skip.update("t", {"a": torch.ones(4, 4), "b": torch.ones(4, 4)})
    with skip.begin_step("t") as st:
        st.add("a", torch.ones(4, 4))
        st.add("a", bad)  # one bad contribution skips the parameter's whole step, counted once
        st.add("b", torch.full((4, 4), 3.0))
    meta = skip.metadata("t")["params"]
    assert (meta["a"]["nonfinite_skipped"], meta["b"]["nonfinite_skipped"]) == (1, 0) and skip.step("t") == 2
    assert float(skip.fisher("t", "a", bias_corrected=False)[0, 0]) == pytest.approx(0.25)  # decayed, x = 0
    assert float(skip.fisher("t", "b", bias_corrected=False)[0, 0]) == pytest.approx(0.25 + 1.5)


def test_a_collector_step_with_nan_gradients_is_refused_or_skipped(tmp_path):
    model = tiny_model("llama")
    q = "model.layers.0.self_attn.q_proj.weight"
    fc = FisherCollector(micro_batch_size=2)
    fc.collect_fisher(model, token_batch(seed=1))
    with torch.no_grad():
        dict(model.named_parameters())["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError):
        fc.collect_fisher(model, token_batch(seed=2))
    assert fc.store.step("default") == 1 and torch.isfinite(fc.full_fisher("default", q).load()).all()
    skip = FisherCollector(micro_batch_size=2, nonfinite="skip")
    skip.collect_fisher(model, token_batch(seed=2))
    assert skip.store.step("default") == 1 and skip.store.metadata("default")["params"][q]["nonfinite_skipped"] == 1


# -- device-to-host staging, with a CUDA-free stand-in for the copies ----------------------------


class ThreadCopies:
    """Stands in for CUDA: each copy lands later, on another thread; waiting means waiting for that copy."""

    def __init__(self, delay=0.002):
        self.delay, self.copies, self.in_flight, self.peak = delay, 0, 0, 0
        self.lock = threading.Lock()

    def pinned(self, n):
        return torch.empty(n)

    def mark(self):
        return None

    def copy(self, host, src, after):
        done = threading.Event()
        snapshot = src.clone()  # what the device holds when the copy is queued

        def land():
            time.sleep(self.delay)
            host.copy_(snapshot)
            with self.lock:
                self.in_flight -= 1
            done.set()

        with self.lock:
            self.copies += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        threading.Thread(target=land, daemon=True).start()
        return done

    def wait(self, done):
        done.wait()


def test_stager_double_buffers_pieces_and_adds_each_once():
    ops = ThreadCopies()
    stager = DeviceStager(torch.device("cpu"), stage_bytes=4 * 48, ops=ops)  # 48 floats: 4 rows of 12 per piece
    total = torch.zeros(10, 12)
    xs = [torch.rand(10, 12) for _ in range(5)]
    for x in xs:
        stager.push(x, lambda rows, host: total[rows].add_(host))
    stager.drain()
    assert torch.allclose(total, sum(xs)) and ops.copies == 5 * 3 and ops.peak <= 2
    stager.push(torch.ones(())[()], lambda rows, host: None)  # a 0-d tensor is one piece
    stager.push(torch.ones(3, 20), lambda rows, host: total.add_(1))  # a row larger than a buffer
    stager.drain()

    def fail(rows, host):
        raise RuntimeError("host add failed")

    stager.push(torch.ones(2, 12), fail)
    with pytest.raises(RuntimeError, match="host add failed"):
        stager.drain()
    stager.close()


@pytest.mark.parametrize("summed", [False, True])
def test_a_step_fed_from_a_device_into_host_accumulators_equals_a_plain_step(open_store, summed):
    staged = open_store("zarr", sub="staged", decay=0.9, memory_budget=1 << 20)
    # Route CPU tensors through the staging path as if they came from a GPU for host accumulators.
    staged._write.stages = lambda x, target: True
    staged._write.may_sum = lambda task, p, device: summed
    staged._write.stager_factory = lambda device: DeviceStager(device, stage_bytes=4 * 64, ops=ThreadCopies(0.001))
    plain = open_store("ram", sub="plain", decay=0.9)
    shapes = {"q": ((32, 16), ParamLayout.attention("q", 4, 8)), "o": ((16, 32), ParamLayout.attention("o", 4, 8)),
              "n": ((16,), None)}
    for s in (staged, plain):
        for n, (shape, lay) in shapes.items():
            s.create("t", n, shape, lay)
    g = torch.Generator().manual_seed(0)
    for _step in range(3):
        parts = {n: [torch.rand(shape, generator=g) for _ in range(3)] for n, (shape, _) in shapes.items()}
        with staged.begin_step("t", tokens=7) as st:
            for i in range(3):
                for n in shapes:
                    st.add(n, parts[n][i].clone(), trusted=True, donate=True, final=i == 2)
        plain.update("t", {n: sum(p) for n, p in parts.items()}, tokens=7)
    for n in shapes:
        assert staged.param("t", n).resident
        assert torch.allclose(staged.fisher("t", n).load(), plain.fisher("t", n).load(), rtol=1e-5), n


# -- residency and budgets ---------------------------------------------------------------------


def test_a_ram_store_keeps_everything_resident_with_no_read_modify_write_and_no_io_threads(monkeypatch):
    monkeypatch.setattr(WritePath, "rmw", lambda *a: pytest.fail("a RAM store read-modify-wrote an array"))
    s = fisherstore.open(backend="ram", decay=0.5)
    assert s.memory_budget > 1 << 30 and s._pool.workers == 0
    s.create("t", "big", (1024, 1024))
    s.update("t", {"big": torch.ones(1024, 1024)})
    s.update("t", {"big": torch.ones(1024, 1024)})
    s.flush()
    assert s.param("t", "big").resident and s.step("t") == 2
    assert torch.allclose(s.fisher("t", "big")[:2, :2], torch.ones(2, 2))
    assert not any(t.name.startswith("fisherstore-io") for t in threading.enumerate())
    s.close()


def test_device_budget_defaults_to_free_memory_less_a_margin():
    dev = torch.device("cuda", 0)
    plan = MemoryPlan.from_budget(1 << 30)
    auto = Residency(plan, None, room=lambda d: 100)
    assert auto.admit_device(30, dev) and auto.admit_device(20, dev) and not auto.admit_device(1, dev)  # 2 x 50
    assert not auto.admit_staging(1, dev)  # the room is full of accumulators
    auto.release_device(20, dev)
    assert auto.admit_staging(40, dev) and not auto.admit_device(1, dev)
    explicit = Residency(plan, 80, room=lambda d: 10)
    assert explicit.admit_device(40, dev) and not explicit.admit_device(1, dev)  # the caller's word, not the room
    off = Residency(plan, 0, room=lambda d: 1 << 40)
    assert not off.admit_device(1, dev) and off.admit_staging(1, dev)  # 0: host accumulators, device sums still
    assert not Residency(plan, None, room=lambda d: 1 << 40).admit_device(1, torch.device("cpu"))
    assert StoreOptions().device_budget is None
    with pytest.raises(fisherstore.InvalidArgumentError, match="device_budget"):
        StoreOptions(device_budget=-1)


def test_the_process_wide_mallopt_is_gone_and_io_trims_the_heap_instead(tmp_path):
    assert trim_heap() in (True, False)  # glibc: True when it gave memory back


def test_an_accumulated_step_whose_sum_overflows_is_confirmed_finite_value_by_value():
    checks = StepChecks()
    checks.watch_total("big", torch.full((8,), 3e38))  # finite values whose fp32 sum is inf
    bad = torch.full((8,), 3e38)
    bad[3] = float("inf")
    checks.watch_total("bad", bad)
    found = checks.verdicts()
    assert set(found) == {"bad"} and found["bad"].nonfinite
