"""store.summary: Fisher mass per (param, layer, head, block), checked against the stored blocks; the plots."""

import numpy as np
import pandas as pd
import pytest
import torch

import fisherstore
from fisherstore import FisherCollector
from fisherstore.cli import main
from fisherstore.views.plots import mass_grid
from fisherstore.views.summary import COLUMNS
from tests.models import seq2seq_batch, tiny_model, token_batch


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("summary") / "s")
    model = tiny_model("llama")
    with FisherCollector(backend="zarr", path=path, mode="w", params="all") as fc:
        for step in range(2):
            fc.collect_fisher(model, token_batch(seed=step), task="a")
            fc.collect_fisher(model, token_batch(seed=50 + step, lo=32), task="b")
        fc.flush()
        fc.collect_fisher(model, token_batch(seed=9), task="a")  # left in RAM: the writer's summary sees it
        with fisherstore.open(path + "-plain", mode="w") as s:
            s.update("plain", {"w": torch.rand(3, 4)}, layouts={"w": None})
        yield path, {t: fc.store.summary(t) for t in ("a", "b")}, fc.store


def test_every_row_is_the_sum_of_its_block(store_path):
    _, dfs, s = store_path
    df = dfs["a"]
    assert list(df.columns) == list(COLUMNS)
    assert str(df["head"].dtype) == "Int64" and str(df["layer"].dtype) == "Int64"
    assert df.attrs["step"] == 3
    for name in s.params("a"):
        F = s.fisher("a", name)
        rows = df[df.param == name]
        lay = s.layout("a", name)
        if lay.has_heads:
            want = {(b, h // (lay.group_size if b in "KV" else 1)): float(F.head(h, b).double().sum())
                    for b in lay.blocks for h in range(0, lay.num_heads, lay.group_size if b in "KV" else 1)}
            got = {(r.block, int(r.head)): r.mass for r in rows.itertuples()}
            assert got == pytest.approx(want, rel=1e-6)
            assert set(rows.layer) == {int(name.split(".")[2])}
        else:
            assert len(rows) == 1 and rows["head"].isna().all() and rows.block.isna().all()
            r = rows.iloc[0]
            assert r.mass == pytest.approx(float(F.load().double().sum()), rel=1e-6)
            assert r.numel == F.numel() and r["max"] == pytest.approx(float(F.load().max()))
    assert df["share"].sum() == pytest.approx(1.0)


def test_a_reader_sums_the_committed_state_the_writer_its_own(store_path):
    path, dfs, _ = store_path
    with fisherstore.open(path, mode="r") as s:
        committed = s.summary("a")
        assert s.step("a") == committed.attrs["step"] < 3  # the writer's third step is still in its RAM
        np.testing.assert_allclose(committed["mass"], [float(s.fisher("a", r.param).load().double().sum()) if pd.isna(
            r.block) else float(s.fisher("a", r.param).head(_query_head(s, r), r.block).double().sum())
            for r in committed.itertuples()], rtol=1e-6)
    assert not np.allclose(dfs["a"]["mass"], committed["mass"])  # the third step moved the EMA


def _query_head(s, r):
    lay = s.layout("a", r.param)
    return int(r.head) * (lay.group_size if r.block in "KV" else 1)


def test_encoder_decoder_layers_are_keyed_by_stack(tmp_path):
    model = tiny_model("bart")
    with FisherCollector(backend="ram", loss_fn=fisherstore.losses.seq2seq_lm) as fc:
        fc.collect_fisher(model, seq2seq_batch(), task="t")
        df = fc.store.summary("t")
    layers = set(df.dropna(subset=["block"]).layer)
    assert {"encoder.0", "decoder.1", "decoder.1.cross"} <= layers
    q = df[(df.layer == "decoder.1.cross") & (df.block == "Q")]
    assert sorted(q["head"]) == [0, 1, 2, 3]


def test_mass_grid_is_layer_by_head(store_path):
    _, dfs, _ = store_path
    df = dfs["a"]
    layers, g = mass_grid(df, "K")
    assert layers == [0, 1] and g.shape == (2, 2)  # H_kv = 2
    assert g[1, 0] == pytest.approx(df[(df.block == "K") & (df.layer == 1) & (df["head"] == 0)].mass.item())


def test_plot_command_writes_pngs(store_path, tmp_path, capsys):
    from matplotlib.image import imread

    path, _, _ = store_path
    one, two = str(tmp_path / "one.png"), str(tmp_path / "two.png")
    assert main(["plot", path, "--task", "a", "--out", one]) == 0
    assert main(["plot", path, "--task", "a", "--compare", "b", "--out", two]) == 0
    assert capsys.readouterr().out.split() == [one, two]
    a, b = imread(one), imread(two)
    assert a.shape[:2] == (320, 1360)  # one row of Q, K, V, O panels at 3.4 x 3.2 in, 100 dpi
    assert b.shape[:2] == (860, 1360)  # three rows: share of a, share of b, log2 ratio
    assert a[..., :3].std() > 0.05 and b[..., :3].std() > 0.05  # drawn, not blank


def test_plot_of_a_task_without_heads_is_a_usage_error(store_path, tmp_path, capsys):
    path, _, _ = store_path
    assert main(["plot", path + "-plain", "--task", "plain", "--out", str(tmp_path / "x.png")]) == 2
    assert "no parameter with a head layout" in capsys.readouterr().err


def test_summary_is_a_plain_dataframe(store_path):
    _, dfs, _ = store_path
    pivot = dfs["b"][dfs["b"].block == "Q"].pivot_table("mass", "layer", "head")
    assert isinstance(pivot, pd.DataFrame) and pivot.shape == (2, 4)
