"""Held step inputs (engine/step/fills.py) and residency decided at first feed (engine/memory.py).

Review tests for the change that holds a resident parameter's step input until the step is
judged, then folds it in place: exactness against a float64 EMA, atomicity, the residency's
byte counts, the streamed -> resident transition, rank groups and readers during a step.
"""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
import torch

import fisherstore
from fisherstore.backends.zarr_backend import ZarrBackend
from fisherstore.store import FisherStore

BETA = 0.8
SHAPES = {"a": (16, 8), "b": (32, 8), "c": (8,)}
CHUNKS = {"a": (4, 8), "b": (8, 8), "c": None}


def _rand(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) ** 2 + 0.01).to(dtype)


class Ref:
    """float64 EMA, eager decay: F_t = β F_{t-1} + (1-β)/T · Σ x (0 for parameters not fed)."""

    def __init__(self, shapes=SHAPES, beta=BETA):
        self.beta = beta
        self.F = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}

    def step(self, sums: dict[str, torch.Tensor], tokens=None):
        for n in self.F:
            x = sums.get(n)
            self.F[n] = self.beta * self.F[n] + ((1 - self.beta) / (tokens or 1)) * (0.0 if x is None else x)


def _new(tmp_path, sub="s", backend="ram", budget=1 << 30, **kw):
    s = fisherstore.open(tmp_path / sub, mode="w", backend=backend, decay=BETA, memory_budget=budget, **kw)
    for n, shape in SHAPES.items():
        s.create("t", n, shape, chunks=CHUNKS[n])
    return s


def _read(s, names=SHAPES):
    return {n: s.fisher("t", n, bias_corrected=False).load().clone() for n in names}


def _check(s, ref, rtol=1e-5):
    got = _read(s, ref.F)
    for n, want in ref.F.items():
        assert torch.allclose(got[n].double(), want, rtol=rtol, atol=1e-12), n


def _check_budget(s):
    assert s.memory_reserved() <= s.plan.resident_bytes + s.plan.queue_bytes, (
        s.memory_reserved(), s.plan.resident_bytes, s.plan.queue_bytes)


# "mixed" (1400 B: resident 1225, queue 175): a (512 B) and c (32 B) are admitted; b (1 KiB, fed by regions,
# so two buffers) streams.
BUDGETS = {"all": 1 << 30, "none": 0, "mixed": 1400}


# -- 1. exactness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("backend", ["ram", "zarr"])
def test_every_way_of_feeding_equals_a_float64_ema(tmp_path, backend, budget):
    s = _new(tmp_path, backend=backend, budget=BUDGETS[budget])
    ref = Ref()
    T = 3
    for t in range(6):
        sums: dict[str, torch.Tensor] = {}

        def fed(n, x, sums=sums):
            sums[n] = sums.get(n, 0) + x.double()

        with s.begin_step("t", tokens=T) as st:
            if t % 3 != 2:  # a skips every third step (lazy decay)
                # micro-batches: a donated first input, then a kept one the caller overwrites
                x1 = _rand(SHAPES["a"], 100 + t)
                fed("a", x1)
                st.add("a", x1, donate=True)
                x2 = _rand(SHAPES["a"], 200 + t)
                fed("a", x2)
                st.add("a", x2)
                x2.fill_(1e6)  # must not reach the store
                # fed twice: a transposed (non-contiguous) view
                x3 = _rand((8, 16), 300 + t).t()
                fed("a", x3)
                st.add("a", x3)
            if t % 2 == 0:  # b: by regions, in bf16 and fp16, one region fed twice
                xb = _rand(SHAPES["b"], 400 + t, torch.bfloat16)
                fed("b", xb.float())
                st.add("b", xb[0:16], region=slice(0, 16))
                st.add("b", xb[16:32], region=slice(16, 32), donate=True)
                xh = _rand((8, 8), 500 + t, torch.float16)
                sums["b"][8:16] += xh.double()
                st.add("b", xh, region=slice(8, 16))
            else:
                xb = _rand(SHAPES["b"], 600 + t)
                fed("b", xb)
                st.add("b", xb, donate=True)  # donated and not touched
            xc = _rand(SHAPES["c"], 700 + t, torch.float16)
            fed("c", xc.float())
            st.add("c", xc, donate=(t % 2 == 1))
        ref.step(sums, tokens=T)
        _check_budget(s)
        if t == 3:
            s.flush()
            _check_budget(s)
    _check(s, ref)
    s.close()


def test_micro_batch_size_one_resident_equals_streamed(tmp_path):
    from tests.models import tiny_model, token_batch

    model = tiny_model("llama")
    out = {}
    for name, budget in (("resident", 1 << 30), ("streamed", 0)):
        fc = fisherstore.FisherCollector(backend="zarr", path=tmp_path / name, mode="w", params="all",
                                         micro_batch_size=1, ema_decay=0.9, memory_budget=budget)
        for seed in range(3):
            fc.collect_fisher(model, token_batch(n=3, seq=6, seed=seed), task="a")
        resident = [n for n in fc.store.params("a") if fc.store.param("a", n).resident]
        assert bool(resident) == (budget > 0)
        out[name] = {n: fc.full_fisher("a", n, bias_corrected=False).load() for n in fc.store.params("a")}
        fc.close()
    for n, want in out["streamed"].items():
        assert torch.allclose(out["resident"][n], want, rtol=1e-5, atol=0), n


@pytest.mark.parametrize("budget", ["all", "mixed"])
def test_nonfinite_skip_drops_only_the_bad_parameter(tmp_path, budget):
    s = _new(tmp_path, budget=BUDGETS[budget], nonfinite="skip")
    ref = Ref()
    for t in range(4):
        xs = {n: _rand(sh, 10 * t + i) for i, (n, sh) in enumerate(SHAPES.items())}
        feed = dict(xs)
        if t == 2:
            feed["a"] = xs["a"].clone()
            feed["a"][3, 3] = float("nan")
        with s.begin_step("t") as st:
            for n, x in feed.items():
                st.add(n, x, donate=(n == "a"), trusted=(n == "a"))
        ref.step({n: x.double() for n, x in xs.items() if not (t == 2 and n == "a")})
    _check(s, ref)


# -- 2. atomicity ------------------------------------------------------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("budget", ["all", "mixed"])
@pytest.mark.parametrize("how", ["nan_last", "raise_in_block", "nan_trusted_donated"])
def test_a_failed_step_leaves_resident_accumulators_bit_for_bit(tmp_path, budget, how):
    s = _new(tmp_path, budget=BUDGETS[budget])
    ref = Ref()
    for t in range(2):
        xs = {n: _rand(sh, 10 * t + i) for i, (n, sh) in enumerate(SHAPES.items())}
        s.update("t", xs)
        ref.step({n: x.double() for n, x in xs.items()})
    assert s.param("t", "a").resident
    before, step0 = _read(s), s.step("t")
    bad = {n: _rand(sh, 99 + i) for i, (n, sh) in enumerate(SHAPES.items())}
    with pytest.raises((Boom, fisherstore.FisherStoreError)):
        with s.begin_step("t") as st:
            st.add("a", bad["a"], donate=True, trusted=how == "nan_trusted_donated")
            st.add("a", bad["a"].clone())  # a second micro-batch summed into the held input
            st.add("b", bad["b"])
            if how == "raise_in_block":
                raise Boom()
            x = bad["c"].clone()
            x[0] = float("nan")
            st.add("c", x, trusted=how == "nan_trusted_donated", donate=how == "nan_trusted_donated")
    assert s.step("t") == step0
    after = _read(s)
    for n in SHAPES:
        assert torch.equal(after[n], before[n]), n
    _check_budget(s)
    xs = {n: _rand(sh, 50 + i) for i, (n, sh) in enumerate(SHAPES.items())}
    s.update("t", xs)
    ref.step({n: x.double() for n, x in xs.items()})
    _check(s, ref)
    s.flush()
    _check(s, ref)


class FlakyZarr(ZarrBackend):
    def __init__(self, *a, fail_after=None, **kw):
        super().__init__(*a, **kw)
        self.fail_after = fail_after

    def write(self, key, region, data):
        if self.fail_after is not None:
            if self.fail_after <= 0:
                raise OSError(5, "Input/output error (injected)")
            self.fail_after -= 1
        super().write(key, region, data)


def test_a_failed_streamed_write_leaves_resident_accumulators_bit_for_bit(tmp_path):
    be = FlakyZarr(str(tmp_path / "s"), read_only=False)
    s = FisherStore(be, mode="w", decay=BETA, memory_budget=BUDGETS["mixed"])
    for n, shape in SHAPES.items():
        s.create("t", n, shape, chunks=CHUNKS[n])
    ref = Ref()
    xs = {n: _rand(sh, i) for i, (n, sh) in enumerate(SHAPES.items())}
    s.update("t", xs)
    ref.step({n: x.double() for n, x in xs.items()})
    res = {n: s.param("t", n).resident for n in SHAPES}
    assert res["a"] and not res["b"], res
    before = _read(s)
    be.fail_after = 1
    with pytest.raises(fisherstore.FisherStoreError, match="Input/output error"):
        with s.begin_step("t") as st:
            st.add("a", _rand(SHAPES["a"], 77), donate=True)
            st.add("c", _rand(SHAPES["c"], 78))
            st.add("b", _rand(SHAPES["b"], 79))
    be.fail_after = None
    after = _read(s)
    for n in SHAPES:
        assert torch.equal(after[n], before[n]), n
    xs = {n: _rand(sh, 20 + i) for i, (n, sh) in enumerate(SHAPES.items())}
    s.update("t", xs)
    ref.step({n: x.double() for n, x in xs.items()})
    _check(s, ref)
    s.close()


# -- 3. residency ------------------------------------------------------------------------------------------


def test_streamed_parameter_stays_streamed_until_commit_then_is_admitted_exactly(tmp_path):
    """a costs 4 KiB: a kept input (2 buffers) does not fit 6000 B, a donated one (1 buffer) does."""
    s = fisherstore.open(tmp_path / "s", mode="w", backend="zarr", decay=BETA, memory_budget=6000)
    s.create("t", "a", (64, 16), chunks=(8, 16))
    ref = Ref({"a": (64, 16)})
    for t in range(6):
        x = _rand((64, 16), t)
        if t == 0:
            s.update("t", {"a": x})  # kept: two buffers, not admitted
            assert not s.param("t", "a").resident
        else:
            with s.begin_step("t", tokens=2) as st:
                st.add("a", x, donate=True)
        ref.step({"a": x.double()}, tokens=None if t == 0 else 2)
        _check_budget(s)
        if t == 1:  # a working generation is uncommitted: it must not become resident yet
            assert not s.param("t", "a").resident
            s.flush()
        if t >= 2:
            assert s.param("t", "a").resident
        _check(s, ref)
    s.close()
    with fisherstore.open(tmp_path / "s", mode="r") as r:
        got = r.fisher("t", "a", bias_corrected=False).load().double()
        assert torch.allclose(got, ref.F["a"], rtol=1e-5)


def test_kept_inputs_after_donated_ones_stay_within_the_budget(tmp_path):
    """Parameters admitted at one buffer (donated) that are later fed kept inputs need a copy each."""
    budget = 6000
    s = fisherstore.open(tmp_path / "s", mode="w", backend="ram", decay=BETA, memory_budget=budget)
    names = [f"p{i}" for i in range(4)]
    for n in names:
        s.create("t", n, (16, 16))  # 1 KiB each
    with s.begin_step("t") as st:
        for n in names:
            st.add(n, _rand((16, 16), 1), donate=True)
    assert all(s.param("t", n).resident for n in names)
    _check_budget(s)
    s.update("t", {n: _rand((16, 16), 2) for n in names})  # kept inputs: each step copies
    _check_budget(s)


def test_a_donated_bf16_square_is_charged_what_it_holds(tmp_path):
    """A donated whole square in bf16 is converted, so its step holds a copy: admit must charge it."""
    s = fisherstore.open(tmp_path / "s", mode="w", backend="ram", decay=BETA, memory_budget=6000)
    names = [f"p{i}" for i in range(4)]
    for n in names:
        s.create("t", n, (16, 16))
    with s.begin_step("t") as st:
        for n in names:
            st.add(n, _rand((16, 16), 1, torch.bfloat16), donate=True)
    _check_budget(s)


def test_memory_reserved_after_flush_multipass_abort_and_reopen(tmp_path):
    from tests.models import tiny_model, token_batch

    model = tiny_model("llama")
    batches = [token_batch(n=3, seq=7, seed=s) for s in range(3)]
    budget = 78464 // 3 + 2 * 8192 + 64
    fc = fisherstore.FisherCollector(backend="zarr", path=tmp_path / "s", mode="w", params="all",
                                     micro_batch_size=2, ema_decay=0.9, memory_budget=budget)
    s = fc.store
    fc.collect_fisher(model, token_batch(n=2, seq=7, seed=99), task="a")
    _check_budget(s)
    fc.flush()
    r0 = s.memory_reserved()
    _check_budget(s)
    run = fc.collect_fisher_dataset(model, batches, task="a", progress=False)
    assert run.passes > 1
    _check_budget(s)
    r1 = s.memory_reserved()
    assert r1 <= r0  # the run's parameters are decided again at their next step

    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        for i, b in enumerate(batches):
            if calls["n"] == 2 and i == 1:
                raise Boom("pass 2")
            yield b

    with pytest.raises(Boom):
        fc.collect_fisher_dataset(model, failing, task="a", progress=False)
    assert s.memory_reserved() == r1
    fc.collect_fisher(model, batches[0], task="a")
    _check_budget(s)
    fc.flush()
    _check_budget(s)
    fc.close()
    with fisherstore.open(tmp_path / "s", mode="a", memory_budget=budget) as s2:
        assert s2.memory_reserved() == 0  # nothing decided before a step feeds
        assert not any(s2.param("a", n).resident for n in s2.params("a"))


# -- 5. readers while a step holds inputs --------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["all", "mixed"])
def test_a_reader_during_a_step_sees_the_last_applied_step(tmp_path, budget):
    s = _new(tmp_path, budget=BUDGETS[budget])
    xs = {n: _rand(sh, i) for i, (n, sh) in enumerate(SHAPES.items())}
    s.update("t", xs)
    before = _read(s)
    seen: dict = {}

    def reader():
        try:
            seen.update(_read(s))
        except BaseException as e:  # noqa: BLE001
            seen["error"] = e

    with s.begin_step("t") as st:
        for n, sh in SHAPES.items():
            x = _rand(sh, 40)
            st.add(n, x, donate=True)
            st.add(n, x.clone())
        th = threading.Thread(target=reader)
        th.start()
        th.join(30)
        assert not th.is_alive(), "a reader blocked for the whole step"
    assert "error" not in seen, seen.get("error")
    for n in SHAPES:
        assert torch.equal(seen[n], before[n]), n
    after = _read(s)
    assert not torch.equal(after["a"], before["a"])


# -- 4. a rank group with a small budget ---------------------------------------------------------------------

NAMES = [f"w{i}" for i in range(6)]
DSHAPE = (16, 16)  # 1 KiB each


def _dgrads(t):
    g = torch.Generator().manual_seed(t)
    return {n: torch.rand(DSHAPE, generator=g) * (i + 1) for i, n in enumerate(NAMES)}


def _dcollect(s):
    for n in NAMES:
        s.create("t", n, DSHAPE, chunks=(4, 16))
    for t in range(1, 6):
        g = _dgrads(t)
        with s.begin_step("t", tokens=3) as st:
            for i, n in enumerate(NAMES):
                if s.owns("t", n) and (t + i) % 4:
                    st.add(n, g[n], donate=bool(i % 2))
        if t == 3:
            s.flush()


def _rank(rank, world, init, path, conn):
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        group = fisherstore.RankGroup.from_torch()
        with fisherstore.open(path, mode="w", backend="zarr", decay=BETA, memory_budget=2400, group=group) as s:
            _dcollect(s)
            res = [n for n in NAMES if s.owns("t", n) and s.param("t", n).resident]
            streamed = [n for n in NAMES if s.owns("t", n) and not s.param("t", n).resident]
        dist.destroy_process_group()
        conn.send(("ok", res, streamed))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}", None))


def test_rank_group_with_a_small_budget_equals_one_process(tmp_path):
    ctx = mp.get_context("forkserver")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs, conns = [], []
    for rank in range(2):
        r, c = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank, args=(rank, 2, init, str(tmp_path / "dp"), c))
        p.start()
        procs.append(p)
        conns.append(r)
    out = []
    for p, r in zip(procs, conns):
        assert r.poll(120), "a rank hung"
        out.append(r.recv())
        p.join(30)
    assert all(o[0] == "ok" for o in out), out
    assert any(o[1] for o in out) and any(o[2] for o in out), out  # some resident, some streamed
    with fisherstore.open(tmp_path / "one", mode="w", backend="zarr", decay=BETA, memory_budget=1 << 30) as one:
        _dcollect(one)
        want = {n: one.fisher("t", n).load() for n in NAMES}
    with fisherstore.open(tmp_path / "dp", mode="r") as d:
        for n in NAMES:
            assert torch.allclose(d.fisher("t", n).load(), want[n], rtol=1e-6, atol=0), n


def test_a_parameter_streamed_earlier_in_a_step_and_admitted_later_in_it_stays_exact(tmp_path):
    """A region (two buffers: not admitted, streamed) then a whole donated square (one buffer: admitted)."""
    s = fisherstore.open(tmp_path / "s", mode="w", backend="zarr", decay=BETA, memory_budget=6000)
    s.create("t", "a", (64, 16), chunks=(8, 16))
    ref = Ref({"a": (64, 16)})
    x = _rand((64, 16), 0)
    s.update("t", {"a": x})
    ref.step({"a": x.double()})
    s.flush()
    for t in range(1, 5):
        y = _rand((64, 16), t)
        if t == 2:  # skipped: lazy decay
            s.update("t", {})
            ref.step({})
            continue
        with s.begin_step("t") as st:
            st.add("a", y[0:8].clone(), region=slice(0, 8))
            st.add("a", y.clone(), donate=True)
        extra = torch.zeros(64, 16, dtype=torch.float64)
        extra[0:8] = y[0:8].double()
        ref.step({"a": y.double() + extra})
        _check(s, ref)
    s.flush()
    _check(s, ref)
    s.close()
    with fisherstore.open(tmp_path / "s", mode="r") as r:
        assert torch.allclose(r.fisher("t", "a", bias_corrected=False).load().double(), ref.F["a"], rtol=1e-5)


def test_a_parameter_is_not_admitted_by_a_later_feed_of_a_step_that_streamed_it(tmp_path):
    """Residency is decided at a step's first feed; a later donated feed of the same step must not admit
    the parameter at one buffer (it has a working generation of this step, and the next step that feeds
    it the same way needs a copy the plan has no room for)."""
    s = fisherstore.open(tmp_path / "s", mode="w", backend="zarr", decay=BETA, memory_budget=6000)
    s.create("t", "a", (64, 16), chunks=(8, 16))
    for t in range(3):
        y = _rand((64, 16), t)
        with s.begin_step("t") as st:
            st.add("a", y[0:8].clone(), region=slice(0, 8))
            st.add("a", y.clone(), donate=True)
            assert not s.param("t", "a").resident, "admitted mid-step, after its step streamed it"
        _check_budget(s)
    s.close()
