"""Garbage in: every input either works correctly or raises a documented FisherStoreError,
and a rejected step leaves nothing written, on a real Zarr store."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fisherstore
from fisherstore import FisherStoreError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SHAPES = {"a": (4, 6), "b": (5,)}
BETA = 0.9


def _garbage(shape: tuple[int, ...], kind: str, seed: int):
    """A squared gradient for ``shape``: valid (of several types) or broken in one way."""
    g = torch.Generator().manual_seed(seed)
    ok = torch.rand(shape, generator=g) * 10 ** (seed % 7 - 3)
    if kind == "ok":
        return ok
    if kind == "float64":
        return ok.double()
    if kind == "float16":
        return ok.clamp(max=60000).half()
    if kind == "numpy":
        return ok.numpy().astype(np.float64)
    if kind == "noncontig":
        return ok.t().contiguous().t() if ok.ndim == 2 else ok[::1]
    if kind == "strided":
        return torch.rand(tuple(2 * n for n in shape), generator=g)[tuple(slice(None, None, 2) for _ in shape)]
    if kind == "int":
        return (ok * 100).to(torch.int64)
    if kind == "complex":
        return ok.to(torch.complex64)
    if kind == "bool":
        return ok > 0.5
    if kind == "nan":
        x = ok.clone()
        x.view(-1)[seed % x.numel()] = math.nan
        return x
    if kind == "inf":
        x = ok.clone()
        x.view(-1)[seed % x.numel()] = math.inf
        return x
    if kind == "huge64":  # finite in float64, inf once stored as float32
        return ok.double() * 1e300
    if kind == "negative":
        x = ok.clone()
        x.view(-1)[seed % x.numel()] = -1e-3
        return x
    if kind == "shape":
        return torch.rand((*shape, 1), generator=g)
    if kind == "scalar":
        return torch.tensor(1.0)
    if kind == "list":
        return ok.tolist()
    if kind == "none":
        return None
    raise AssertionError(kind)


VALID = {"ok", "float64", "float16", "numpy", "noncontig", "strided"}
KINDS = sorted(VALID | {"int", "complex", "bool", "nan", "inf", "huge64", "negative", "shape", "scalar", "list",
                        "none"})


@pytest.fixture(scope="module", params=["zarr", "tensorstore"])
def fuzz_store(request, tmp_path_factory):
    # budget 0: every parameter streams, so a bad step would show up on disk if it leaked
    s = fisherstore.open(tmp_path_factory.mktemp("fuzz") / "s", mode="w", backend=request.param, decay=BETA,
                         memory_budget=0)
    for n, shape in SHAPES.items():
        s.create("t", n, shape)
    ref = {n: torch.zeros(shape, dtype=torch.float64) for n, shape in SHAPES.items()}
    yield s, ref
    s.close()


@FUZZ
@given(steps=st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(KINDS), st.integers(0, 10**6),
                                st.booleans()), min_size=1, max_size=4))
def test_update_with_garbage_works_or_raises_and_writes_nothing(fuzz_store, steps):
    s, ref = fuzz_store
    for ka, kb, seed, only_a in steps:
        xs = {"a": _garbage(SHAPES["a"], ka, seed)}
        if not only_a:
            xs["b"] = _garbage(SHAPES["b"], kb, seed + 1)
        step0 = s.step("t")
        before = {n: s.fisher("t", n).load() for n in SHAPES}
        if all(k in VALID for k in [ka] + ([] if only_a else [kb])):
            s.update("t", xs)
            for n in SHAPES:  # omitted parameters decay lazily (x = 0)
                x = torch.as_tensor(np.asarray(xs[n]), dtype=torch.float32).double() if n in xs else 0.0
                ref[n].mul_(BETA).add_((1 - BETA) * x)
        else:
            with pytest.raises(FisherStoreError) as ei:
                s.update("t", xs)
            assert isinstance(ei.value, (fisherstore.InvalidGradientError, fisherstore.ShapeMismatchError))
            bad = "a" if ka not in VALID else "b"
            assert repr(bad) in str(ei.value)  # the message names the parameter
            assert s.step("t") == step0
            for n in SHAPES:
                assert torch.equal(s.fisher("t", n).load(), before[n])
        t = s.step("t")
        for n in SHAPES:
            want = (ref[n] / (1 - BETA**t)).float() if t else ref[n].float()
            torch.testing.assert_close(s.fisher("t", n).load(), want, rtol=2e-5, atol=1e-30)


@FUZZ
@given(name=st.text(min_size=0, max_size=24), task=st.text(min_size=0, max_size=12))
def test_any_task_and_param_name_round_trips_or_is_refused(tmp_path, name, task):
    path = str(tmp_path / f"n{abs(hash((name, task)))}")
    try:
        with fisherstore.open(path, mode="w") as s:
            s.create(task, name, (2, 3))
            s.update(task, {name: torch.full((2, 3), 2.0)})
    except fisherstore.InvalidArgumentError as e:
        assert name == "" or task == "" or "\x00" in name + task, e
        return
    with fisherstore.open(path, mode="r") as r:
        assert r.tasks() == [task] and r.params(task) == [name]
        torch.testing.assert_close(r.fisher(task, name).load(), torch.full((2, 3), 2.0))
    # "/", ".." and friends never escape the store's directory
    assert all(e.startswith("n") for e in os.listdir(tmp_path)), os.listdir(tmp_path)


@FUZZ
@given(decay=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.text(max_size=3),
                       st.none()))
def test_decay_is_in_the_open_interval_or_refused(decay):
    with fisherstore.open(backend="ram") as s:
        ok = isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0 < decay < 1
        if ok:
            s.create("t", "w", (2,), decay=decay)
            s.update("t", {"w": torch.ones(2)})
            torch.testing.assert_close(s.fisher("t", "w").load(), torch.ones(2))
        elif decay is None:
            s.create("t", "w", (2,), decay=decay)  # None means the store's default
        else:
            with pytest.raises(fisherstore.InvalidArgumentError, match="decay"):
                s.create("t", "w", (2,), decay=decay)
            with pytest.raises(fisherstore.InvalidArgumentError, match="decay"):
                fisherstore.open(backend="ram", decay=decay)


@FUZZ
@given(shape=st.lists(st.integers(-2, 5), min_size=0, max_size=3))
def test_any_shape_including_empty_works_or_is_refused(tmp_path, shape):
    path = str(tmp_path / f"s{abs(hash(tuple(shape)))}")
    with fisherstore.open(path, mode="w") as s:
        if any(n < 0 for n in shape):
            with pytest.raises(fisherstore.ShapeMismatchError, match="negative"):
                s.create("t", "w", shape)
            return
        s.create("t", "w", shape)
        s.update("t", {"w": torch.full(shape, 3.0)})
    with fisherstore.open(path, mode="r") as r:
        got = r.fisher("t", "w").load()
        assert tuple(got.shape) == tuple(shape)
        torch.testing.assert_close(got, torch.full(shape, 3.0))


@FUZZ
@given(idx=st.tuples(st.one_of(st.integers(-20, 20), st.slices(20), st.just(Ellipsis), st.floats(), st.text(max_size=1)),
                     st.one_of(st.integers(-20, 20), st.slices(20), st.none())))
def test_garbage_indices_slice_like_numpy_or_raise_ours(idx):
    with fisherstore.open(backend="ram") as s:
        s.create("t", "w", (6, 4))
        s.update("t", {"w": torch.arange(24.0).reshape(6, 4)})
        F = s.fisher("t", "w")
        full = F.load().numpy()
        try:
            want = full[idx]
        except (IndexError, TypeError, ValueError):
            with pytest.raises(FisherStoreError):
                F[idx]
            return
        assume(idx[1] is not None)  # numpy's newaxis: LazyFisher asks for .load() first
        got = F[idx]
        np.testing.assert_array_equal(got.numpy(), want)


@FUZZ
@given(h=st.integers(-3, 10), block=st.sampled_from(["Q", "K", "V", "O", "q", "Z", "", "QK"]))
def test_head_and_block_are_in_range_or_index_error(h, block):
    layout = fisherstore.ParamLayout.attention("k", 8, 2, num_kv_heads=2)
    with fisherstore.open(backend="ram") as s:
        s.create("t", "k", (4, 6), layout)
        s.update("t", {"k": torch.rand(4, 6) + 1})
        F = s.fisher("t", "k")
        if 0 <= h < 8 and block.upper() == "K":
            out = F.head(h, block)
            kv = h // 4
            torch.testing.assert_close(out, F.load()[2 * kv:2 * kv + 2])
        else:
            with pytest.raises(fisherstore.HeadIndexError) as ei:
                F.head(h, block)
            assert out_of_place(ei.value, h, block)


def out_of_place(e: Exception, h: int, block: str) -> bool:
    msg = str(e)
    return (f"head {h}" in msg) or repr(block) in msg or "holds K" in msg
