"""Every documented error: its type, and a message that names the thing and the fix."""

import json

import numpy as np
import pytest
import torch

import fisherstore
from fisherstore import (
    FormatVersionError,
    HeadIndexError,
    InvalidGradientError,
    NonFiniteGradientError,
    NotAFisherStoreError,
    ParamLayout,
    ReadOnlyError,
    ShapeMismatchError,
    UnknownParamError,
    UnknownTaskError,
)

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def store(open_store, backend):
    s = open_store(backend)
    s.create("sst2", Q, (32, 8), ParamLayout.attention("q", 4, 8))
    s.update("sst2", {Q: torch.ones(32, 8)})
    return s


def test_shape_mismatch_names_param_and_shapes(store):
    with pytest.raises(ShapeMismatchError, match=r"q_proj.weight.*\(4,\).*\(32, 8\)") as ei:
        store.update("sst2", {Q: torch.ones(4)})  # a per-head vector is not a Fisher
    assert isinstance(ei.value, ValueError)


def test_nonfinite_rejected_by_default_with_count(store):
    g = torch.ones(32, 8)
    g[0, :3] = float("nan")
    g[5, 5] = float("inf")
    with pytest.raises(NonFiniteGradientError, match=r"'model.layers.0.self_attn.q_proj.weight' has 4 non-finite"):
        store.update("sst2", {Q: g})
    assert store.step("sst2") == 1
    assert torch.isfinite(store.fisher("sst2", Q).load()).all()


def test_nonfinite_skip_drops_update_and_counts_it(open_store, backend):
    s = open_store(backend, nonfinite="skip")
    s.create("t", "a", (2, 2))
    s.create("t", "b", (2, 2))
    s.update("t", {"a": torch.ones(2, 2), "b": torch.ones(2, 2)})
    s.update("t", {"a": torch.full((2, 2), float("inf")), "b": torch.ones(2, 2)})
    meta = s.metadata("t")["params"]
    assert meta["a"]["nonfinite_skipped"] == 1 and meta["b"]["nonfinite_skipped"] == 0
    assert s.step("t") == 2
    raw = s.fisher("t", "a", bias_corrected=False)[0, 0]
    assert float(raw) == pytest.approx(0.01 * 0.99)  # skipped = x of 0, never inf
    s.close()
    if backend != "ram":
        with fisherstore.open(s.path, mode="r", backend=backend) as r:
            assert r.metadata("t")["params"]["a"]["nonfinite_skipped"] == 1


@pytest.mark.parametrize("bad", [torch.full((2, 2), -1.0), torch.ones(2, 2, dtype=torch.int64),
                                 torch.ones(2, 2, dtype=torch.complex64), "ones"])
def test_invalid_gradients_are_rejected(open_store, bad):
    s = open_store("ram")
    s.create("t", "a", (2, 2))
    with pytest.raises(InvalidGradientError, match="'a'"):
        s.update("t", {"a": bad})
    assert s.step("t") == 0


def test_head_out_of_range_and_bad_block_raise_index_error_never_empty(store):
    F = store.fisher("sst2", Q)
    with pytest.raises(HeadIndexError, match=r"head 4 is out of range.*H=4") as ei:
        F.head(4, "Q")
    assert isinstance(ei.value, IndexError)
    with pytest.raises(HeadIndexError, match="'Z' is not one of Q, K, V, O"):
        F.head(0, "Z")
    with pytest.raises(HeadIndexError, match="holds Q"):
        F.head(0, "V")
    assert F.head(3, "Q").shape == (8, 8)


def test_unknown_task_and_param_list_close_matches(store):
    with pytest.raises(UnknownTaskError, match=r"unknown task 'sst'.*Did you mean: 'sst2'") as ei:
        store.fisher("sst", Q)
    assert isinstance(ei.value, KeyError)
    with pytest.raises(UnknownParamError, match=r"unknown parameter 'layers.0.self_attn.q_proj.weight'.*Did you mean: "
                                                r"'model.layers.0.self_attn.q_proj.weight'"):
        store.fisher("sst2", "layers.0.self_attn.q_proj.weight")
    with pytest.raises(UnknownParamError, match="store.create"):
        store.update("sst2", {"model.layers.0.self_attn.k_proj.weight": torch.ones(2)})
    with pytest.raises(UnknownTaskError):
        store.update("nope", {Q: torch.ones(32, 8)})


def test_update_with_layouts_creates_task_and_param(open_store, backend):
    s = open_store(backend)
    lay = ParamLayout.attention("k", 4, 2, num_kv_heads=2)
    s.update("new", {"k": torch.ones(4, 3)}, layouts={"k": lay})
    assert s.tasks() == ["new"] and s.params("new") == ["k"] and s.layout("new", "k") == lay
    assert s.fisher("new", "k").head(3, "K").shape == (2, 3)


def test_not_a_store_paths(tmp_path):
    with pytest.raises(NotAFisherStoreError, match="does not exist"):
        fisherstore.open(tmp_path / "missing", mode="r")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(NotAFisherStoreError, match="not a fisherstore store"):
        fisherstore.open(tmp_path / "plain", mode="r")
    with pytest.raises(fisherstore.FisherStoreError, match="non-empty directory"):
        fisherstore.open(tmp_path / "plain", mode="a")
    with pytest.raises(NotAFisherStoreError):
        fisherstore.open(tmp_path / "plain", mode="w")  # never wipes a directory that isn't ours
    assert (tmp_path / "plain" / "notes.txt").exists()
    import zarr

    zarr.open_group(str(tmp_path / "z"), mode="w")
    with pytest.raises(NotAFisherStoreError, match="not a fisherstore store"):
        fisherstore.open(tmp_path / "z", mode="r")


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_newer_format_version_is_refused(tmp_path, backend):
    with fisherstore.open(tmp_path / "s", mode="w", backend=backend) as s:
        s.create("t", "a", (2,))
    doc = json.loads((tmp_path / "s" / "zarr.json").read_text())
    doc["attributes"]["fisherstore"]["format_version"] = 99
    doc["attributes"]["fisherstore"]["written_by"] = "fisherstore 9.0"
    (tmp_path / "s" / "zarr.json").write_text(json.dumps(doc))
    for mode in ("r", "a"):
        with pytest.raises(FormatVersionError, match=r"format version 99.*up to 4.*Upgrade"):
            fisherstore.open(tmp_path / "s", mode=mode, backend=backend)


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_read_only_mode_refuses_writes(tmp_path, backend):
    with fisherstore.open(tmp_path / "s", mode="w", backend=backend) as s:
        s.create("t", "a", (2,))
    with fisherstore.open(tmp_path / "s", mode="r", backend=backend) as r:
        for call in (lambda: r.update("t", {"a": torch.ones(2)}), lambda: r.create("t", "b", (2,)),
                     lambda: r.begin_step("t"), lambda: r.set_metadata("t", estimator="batch")):
            with pytest.raises(ReadOnlyError, match="mode='r'.*mode='r\\+'") as ei:
                call()
            assert isinstance(ei.value, PermissionError)


def test_bad_arguments(tmp_path):
    for bad in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="0 < decay < 1"):
            fisherstore.open(backend="ram", decay=bad)
    with pytest.raises(ValueError, match="mode must be"):
        fisherstore.open(tmp_path / "x", mode="x")
    with pytest.raises(ValueError, match="unknown backend"):
        fisherstore.open(tmp_path / "x", backend="hdf5")
    with pytest.raises(ValueError, match="needs a path"):
        fisherstore.open(None, backend="zarr")
    s = fisherstore.open(backend="ram")
    s.create("t", "a", (2,))
    with pytest.raises(ValueError, match="tokens must be a positive int"):
        s.update("t", {"a": torch.ones(2)}, tokens=0)
    with s.begin_step("t") as st:
        with pytest.raises(fisherstore.StepError, match="still open"):
            s.begin_step("t")
        st.add("a", np.ones(2, dtype=np.float32))
    with pytest.raises(fisherstore.StepError, match="committed"):
        st.add("a", torch.ones(2))
    s.close()
    with pytest.raises(fisherstore.FisherStoreError, match="closed"):
        s.tasks()


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
@pytest.mark.parametrize("keepbits", [7, 10])
def test_lossy_bitround_error_bound(tmp_path, backend, keepbits):
    torch.manual_seed(0)
    beta, n_flush = 0.9, 5
    g = [torch.exp(8 * torch.randn(64, 32)) for _ in range(n_flush)]  # ~7 decades
    with fisherstore.open(tmp_path / "s", mode="w", backend=backend, decay=beta, lossy_keepbits=keepbits) as s:
        s.create("t", "w", (64, 32))
        ref = torch.zeros(64, 32, dtype=torch.float64)
        for x in g:
            s.update("t", {"w": x})
            s.flush()
            ref = beta * ref + (1 - beta) * x.double()
        got = s.fisher("t", "w", bias_corrected=False).load().double()
        eps = s.codecs.max_relative_error
        assert eps == 2.0 ** -(keepbits + 1)
        # one rounding per flush, each contracted by the EMA: |err| <= eps * sum_j beta^j
        bound = eps * sum(beta**j for j in range(n_flush)) * 1.0001
        rel = ((got - ref).abs() / ref).max().item()
        assert 0 < rel <= bound
    assert sum(p.stat().st_size for p in (tmp_path / "s").rglob("c/*/*")) < 64 * 32 * 4  # it compresses
