"""Array views: every library reads every array of a collected store and gets what fisherstore returns.

Stores are collected from real tiny HF models (random weights) on both disk backends. The
raw arrays hold the raw EMA; a plain reader applies the readout scale β^(t−t_last)/(1−β^t)
from the manifest (docs/format.md), the views apply it themselves.
"""

import json
import os

import dask.array as da
import numpy as np
import pytest
import tensorstore as ts
import torch
import xarray as xr
import zarr

import fisherstore
from fisherstore import FisherCollector, LazyArray, ParamLayout
from fisherstore.spec.format import encode_name
from fisherstore.spec.layout import dimension_names
from tests.models import tiny_model, token_batch

ARCHS = {"a": "llama", "g": "gpt2"}  # GQA split q/k/v/o; fused Conv1D c_attn with head-laid biases


@pytest.fixture(scope="module", params=["zarr", "tensorstore"])
def collected(request, tmp_path_factory):
    """A store with tasks "a" (LLaMA, GQA), "g" (GPT-2, params='all') and "hand" (zeros, 1-D, 3-D)."""
    path = str(tmp_path_factory.mktemp("views") / "s")
    for i, (task, arch) in enumerate(ARCHS.items()):
        model = tiny_model(arch)
        with FisherCollector(backend=request.param, path=path, mode="w" if i == 0 else "a", ema_decay=0.9,
                             params="all") as fc:
            for step in range(3):
                fc.collect_fisher(model, token_batch(seed=step + 10 * i, lo=4 * i), task=task)
    with fisherstore.open(path, mode="a", backend=request.param, decay=0.8) as s:
        x = torch.rand(6, 5)
        x[2:4] = 0  # exact zeros: a plain reader must not take the fill value 0 for "missing"
        s.update("hand", {"zeros": x, "vec": torch.rand(7), "experts": torch.rand(3, 4, 5)},
                 layouts={"zeros": ParamLayout.attention("q", 3, 2), "vec": None, "experts": ParamLayout("mlp")})
        s.update("hand", {"vec": torch.rand(7)})  # "zeros" and "experts" lag a step: t_last < step
    return request.param, path


def _entries(path):
    """(task, name, entry, step) of every committed parameter, read with plain zarr-python."""
    root = zarr.open_group(path, mode="r")
    for task, key in root.attrs["fisherstore"]["tasks"].items():
        doc = zarr.open_group(path, path=key, mode="r").attrs["fisherstore_task"]
        for name, e in doc["params"].items():
            yield task, name, e, doc["step"]


def _scale(e, step):
    b = e["decay"]
    return b ** (step - e["t_last"]) / (1 - b**step)


def test_every_library_reads_every_array_as_fisherstore_does(collected):
    backend, path = collected
    tree = xr.open_datatree(path, engine="zarr", consolidated=False)
    seen = 0
    with fisherstore.open(path, mode="r", backend=backend) as s:
        views = {t: s.to_xarray(t) for t in s.tasks()}
        for task, name, e, step in _entries(path):
            want = s.fisher(task, name).load().numpy()
            scale = _scale(e, step)
            gen = f"{e['key']}/g{e['generation']:08d}"
            lay = s.layout(task, name)
            raw_zarr = zarr.open_array(path, path=gen, mode="r")[...]
            raw_ts = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, gen)}},
                             open=True, read=True).result().read().result()
            raw_dask = da.from_zarr(path, component=gen).compute()
            node = tree["/" + gen.rsplit("/", 1)[0]]
            var = node[f"g{e['generation']:08d}"]
            ds = xr.open_zarr(os.path.join(path, e["key"]), consolidated=False)
            assert var.dims == dimension_names(len(want.shape), lay) == ds[var.name].dims
            for raw in (raw_zarr, raw_ts, raw_dask, var.values, ds[var.name].values, xr.open_dataset(
                    os.path.join(path, e["key"]), engine="zarr", consolidated=False)[var.name].values):
                assert not np.isnan(raw).any()  # fill value 0 is a value, not a mask
                np.testing.assert_allclose(raw * scale, want, rtol=2e-6, atol=0)
            # the views apply the scale themselves, through the same read path: exactly equal
            np.testing.assert_array_equal(s.to_dask(task, name).compute(), want)
            np.testing.assert_array_equal(views[task][encode_name(name)]["fisher"].values, want)
            np.testing.assert_array_equal(da.from_array(s.fisher(task, name)).compute(), want)
            seen += 1
    assert seen == len(list(_entries(path))) > 40  # every parameter of the three tasks


def test_raw_views_are_the_unscaled_ema(collected):
    backend, path = collected
    with fisherstore.open(path, mode="r", backend=backend) as s:
        for task, name, e, step in _entries(path):
            if task != "hand":
                continue
            raw = zarr.open_array(path, path=f"{e['key']}/g{e['generation']:08d}", mode="r")[...]
            got = s.to_dask(task, name, bias_corrected=False).compute()
            np.testing.assert_allclose(got, raw * e["decay"] ** (step - e["t_last"]), rtol=2e-6)


def test_xarray_coordinates_name_layer_head_and_block(collected):
    backend, path = collected
    with fisherstore.open(path, mode="r", backend=backend) as s:
        tree = s.to_xarray("a")
        assert tree.attrs["step"] == 3 and tree.attrs["task"] == "a"
        k = "model.layers.1.self_attn.k_proj.weight"
        x = tree[k]["fisher"]
        lay = s.layout("a", k)  # H=4, H_kv=2, d=8
        assert x.dims == ("out_heads", "in") and int(x.layer) == 1
        # x.head is DataArray.head(); the coordinate is x["head"]
        assert list(x["head"].values) == [i // lay.head_dim for i in range(x.shape[0])]
        assert set(x["block"].values) == {"K"}
        per_head = x.sum("in").groupby("head").sum().values
        F = s.fisher("a", k)
        for kh in range(lay.num_kv_heads):
            assert per_head[kh] == pytest.approx(float(F.head(kh * lay.group_size, "K").sum()), rel=1e-5)
        o = tree["model.layers.0.self_attn.o_proj.weight"]["fisher"]
        assert o.dims == ("out", "in_heads") and list(o["block"].values) == ["O"] * o.shape[1]
        g = s.to_xarray("g")
        c = g["transformer.h.0.attn.c_attn.weight"]["fisher"]  # Conv1D [in, 3*H*d]: heads along columns
        assert c.dims == ("in", "out_heads")
        F = s.fisher("g", "transformer.h.0.attn.c_attn.weight")
        for b in "QKV":
            sel = c.isel(out_heads=((c["block"] == b) & (c["head"] == 2)).values)
            np.testing.assert_array_equal(sel.values, F.head(2, b).numpy())
        bias = g["transformer.h.0.attn.c_attn.bias"]["fisher"]
        assert bias.dims == ("out_heads",) and list(bias["block"].values[:2]) == ["Q", "Q"]
        emb = g["transformer.wte.weight"]["fisher"]
        assert emb.dims == ("dim_0", "dim_1") and "layer" not in emb.coords and "head" not in emb.coords


def test_dimension_names_are_in_every_header(collected):
    backend, path = collected
    for task, name, e, _ in _entries(path):
        doc = json.load(open(os.path.join(path, e["key"], f"g{e['generation']:08d}", "zarr.json")))
        lay = ParamLayout.from_dict(e["layout"]) if e["layout"] else None
        assert tuple(doc["dimension_names"]) == dimension_names(len(e["shape"]), lay), (backend, task, name)


def test_lazy_fisher_is_array_like_and_reads_lazily(collected):
    backend, path = collected
    with fisherstore.open(path, mode="r", backend=backend) as s:
        name = "model.layers.0.self_attn.q_proj.weight"
        F = s.fisher("a", name)
        full = F.load()
        reads = lambda: s.io_counters()["chunk_files_read"]  # noqa: E731
        n0 = reads()
        x = da.from_array(F, chunks=F.chunks)  # builds a graph; reads nothing
        assert reads() == n0 and x.dtype == np.float32 and x.chunks[0][0] == F.chunks[0]
        assert float(x[: F.chunks[0]].sum().compute()) == pytest.approx(float(full[: F.chunks[0]].sum()), rel=1e-6)
        assert reads() - n0 == 1  # one head block, one chunk file
        assert isinstance(F.copy(), LazyArray) and isinstance(F.copy()[0:2], np.ndarray)
        np.testing.assert_array_equal(np.asarray(F), full.numpy())
        np.testing.assert_allclose(np.mean(F, axis=0), full.numpy().mean(axis=0), rtol=1e-6)
        assert torch.equal(torch.as_tensor(F), full) and torch.as_tensor(F, dtype=torch.float64).dtype == torch.float64
        assert torch.sum(F) == full.sum() and torch.equal(F * 2, full * 2) and torch.equal(2 * F, 2 * full)
        assert torch.equal(F + full, 2 * full) and torch.equal(torch.ones_like(full) - F, 1 - full)
        assert torch.equal(F @ torch.ones(F.shape[1]), full @ torch.ones(F.shape[1]))
        n1 = reads()
        assert torch.zeros_like(F).shape == full.shape and reads() == n1  # *_like needs the shape only
        assert F.dtype == torch.float32 and F.ndim == 2 and hash(F) == hash(F)


def test_views_without_the_extra_say_how_to_install_it(collected, monkeypatch):
    import sys

    backend, path = collected
    monkeypatch.setitem(sys.modules, "xarray", None)  # what an environment without xarray looks like to import
    with fisherstore.open(path, mode="r", backend=backend) as s:
        with pytest.raises(fisherstore.MissingDependencyError, match=r"pip install 'fisherstore\[views\]'"):
            s.to_xarray("a")


def test_every_plot_without_matplotlib_says_how_to_install_it(monkeypatch, tmp_path):
    import sys

    from fisherstore.phase6 import plot_comparison

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    heat = {"Q": np.ones((2, 4)), "layers": [0, 1]}
    rows = [{"block": "Q", "layer": 0, "head": 0, "spearman": 0.5, "mass_ratio": 2.0}]
    for draw in (lambda: fisherstore.heatmap_png(heat, str(tmp_path / "h.png")),
                 lambda: plot_comparison(rows, str(tmp_path / "c.png"))):
        with pytest.raises(fisherstore.MissingDependencyError, match=r"pip install 'fisherstore\[plot\]'"):
            draw()
