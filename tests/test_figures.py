"""Every figure draws a GQA model's heads by one rule, and the QK-OV figure says what it plots.

The rule (fisherstore.views.figures.KV_RULE): columns are query heads h = 0..H-1 in every
panel; a K/V panel shows at h the value of kv head h // g (g = H / H_kv), repeated over its
group, with ticks "h\\nkv{h//g}" and an axis label naming the rule. Each figure is drawn
for a tiny GQA LLaMA (H = 4, H_kv = 2, so g = 2) on matplotlib's Agg backend and read back
from the Figure object: saving closes a figure, so the tests keep each one as it closes.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")
pytest.importorskip("pandas")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import fisherstore  # noqa: E402
from fisherstore import FisherCollector  # noqa: E402
from fisherstore.cli import main  # noqa: E402
from fisherstore.cli.demo import demo_batch, demo_model, run_demo  # noqa: E402
from fisherstore.phase6 import compare_fishers, plot_comparison  # noqa: E402
from fisherstore.qkov import QKOVIndexer, QKOVInterference  # noqa: E402
from fisherstore.views.figures import head_labels  # noqa: E402
from fisherstore.views.plots import QKOV_CAPTION  # noqa: E402

H, H_KV, G = 4, 2, 2
QO_TICKS = ["0", "1", "2", "3"]
KV_TICKS = ["0\nkv0", "1\nkv0", "2\nkv1", "3\nkv1"]


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """A store of the demo's GQA LLaMA (2 layers, H=4, H_kv=2): two tasks' EMA and per-sample gradients."""
    path = str(tmp_path_factory.mktemp("figures") / "fisher.zarr")
    model = demo_model()
    with FisherCollector(ema_decay=0.9, backend="zarr", path=path, mode="w") as fc:
        for task, lo in (("a", 0), ("b", 64)):
            fc.collect_fisher(model, demo_batch(lo, seed=lo), task=task)
            fc.collect_samples(model, demo_batch(lo, seed=lo + 1, n=3), task=task)
    return path, model


@pytest.fixture
def drawn(monkeypatch):
    """The figures drawn in the test: each kept as ``save`` closes it, to be read back."""
    figs = []
    close = plt.close

    def keep(fig=None):
        if fig is not None and fig not in figs:
            figs.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    return figs


def panels(fig):
    """``{title: ax}`` of the figure's heat-map panels (not their colour bars)."""
    return {ax.get_title(): ax for ax in fig.axes if ax.images}


def check_rule(fig, *, n_layers=2):
    """Every panel follows KV_RULE: query-head columns, K/V ticks naming kv h//2, K/V values repeated per group."""
    seen = set()
    for title, ax in panels(fig).items():
        block = title[0]
        assert block in "QKVO", title
        seen.add(block)
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        data = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
        assert data.shape == (n_layers, H), (title, data.shape)  # every panel: one column per query head
        if block in "KV":
            assert ticks == KV_TICKS, (title, ticks)
            assert "kv head h//2" in ax.get_xlabel(), ax.get_xlabel()
            np.testing.assert_array_equal(data[:, 0::2], data[:, 1::2])  # a kv head's value, over its group
        else:
            assert ticks == QO_TICKS, (title, ticks)
            assert ax.get_xlabel() == "query head"
    assert seen == set("QKVO"), seen


def test_head_labels_state_the_rule():
    assert head_labels([0, 1, 2, 3], "Q", 2) == (QO_TICKS, "query head")
    ticks, label = head_labels([0, 1, 2, 3], "V", 2)
    assert ticks == KV_TICKS and "query head h → kv head h//2" in label
    assert head_labels([0, 1], "K", 1)[1] == "query head (= its kv head)"  # MHA: nothing shared
    assert head_labels([0, 1], "K", None)[1].startswith("kv head")  # H unknown: said, not guessed


def test_mass_plots_follow_the_rule(gqa, drawn, tmp_path):
    path, _ = gqa
    with fisherstore.open(path, mode="r") as s:
        a, b = s.summary("a"), s.summary("b")
    fisherstore.plot_mass(a, str(tmp_path / "one.png"))
    fisherstore.plot_mass(a, str(tmp_path / "two.png"), compare=b)
    one, two = drawn
    check_rule(one)
    check_rule(two)
    assert len(panels(two)) == 12  # shares of each task and their log2 ratio, per block
    # The K value at query heads 2 and 3 is kv head 1's mass.
    k = panels(one)["K mass"].images[0].get_array()
    kv1 = float(a[(a["block"] == "K") & (a["head"] == 1) & (a["layer"] == 0)]["mass"].iloc[0])
    assert float(k[0, 2]) == float(k[0, 3]) == pytest.approx(kv1)


def test_plot_command_follows_the_rule(gqa, drawn, tmp_path):
    path, _ = gqa
    assert main(["plot", path, "--task", "a", "--out", str(tmp_path / "p.png")]) == 0
    assert main(["plot", path, "--task", "a", "--compare", "b", "--out", str(tmp_path / "c.png")]) == 0
    assert len(drawn) == 2
    for fig in drawn:
        check_rule(fig)


def test_qkov_heatmap_follows_the_rule_and_says_what_it_plots(gqa, drawn, tmp_path):
    path, model = gqa
    with fisherstore.open(path, mode="r") as s:
        qk = QKOVInterference(QKOVIndexer.from_store(s, "a"))
        heat = qk.heatmap_from_store(s, "a", "b")
    assert heat["group_size"] == {0: G, 1: G}
    fisherstore.heatmap_png(heat, str(tmp_path / "h.png"))
    # The CLI's PNG too (its own heat map, the same rule).
    assert main(["qkov", path, "--task-a", "a", "--task-b", "b", "--png", str(tmp_path / "q.png")]) == 0
    for fig in drawn:
        check_rule(fig)
        texts = [t.get_text() for t in fig.texts]
        assert QKOV_CAPTION in texts
        caption = QKOV_CAPTION.lower()
        # The definition (scores.py's M), its units and the direction are all stated.
        assert "c_ik / (max(f_k, ε) + λ) · |g_jk| / t_j" in caption and "averaged over every sample pair" in caption
        assert "units of |g_j|/t_j" in caption and "higher means more interference" in caption
        bars = [ax.get_ylabel() for ax in fig.axes if not ax.images and ax.get_ylabel()]
        assert bars and all("higher = more" in b for b in bars)
        # K's value at a query head is the value of the kv head serving it: equal within a group.
        k = panels(fig)["K: mean score"].images[0].get_array()
        assert np.isfinite(np.asarray(k)).all()


def test_a_subset_of_heads_keeps_the_query_head_ids(gqa, drawn, tmp_path):
    """``--heads 2 3`` draws columns 2 and 3 (not 0 and 1), K/V naming kv head 1."""
    path, _ = gqa
    with fisherstore.open(path, mode="r") as s:
        heat = QKOVInterference(QKOVIndexer.from_store(s, "a")).heatmap_from_store(s, "a", "b", heads=[2, 3])
    fisherstore.heatmap_png(heat, str(tmp_path / "sub.png"))
    p = panels(drawn[0])
    assert [t.get_text() for t in p["Q: mean score"].get_xticklabels()] == ["2", "3"]
    assert [t.get_text() for t in p["V: mean score"].get_xticklabels()] == ["2\nkv1", "3\nkv1"]


def test_ema_vs_contribution_figure_follows_the_rule(gqa, drawn, tmp_path):
    path, _ = gqa
    with fisherstore.open(path, mode="r") as s:
        rows = compare_fishers(s, "a")
    plot_comparison(rows, str(tmp_path / "cmp.png"))
    check_rule(drawn[0])
    # compare_fishers names kv head 1 by query head 2; its value fills query heads 2 and 3.
    k1 = next(r for r in rows if r["block"] == "K" and r["head"] == 2 and r["layer"] == 1)
    rho = panels(drawn[0])["K: rank corr."].images[0].get_array()
    assert float(rho[1, 2]) == float(rho[1, 3]) == pytest.approx(k1["spearman"])


def test_demo_figure_follows_the_rule(drawn, tmp_path):
    res = run_demo(str(tmp_path / "demo"), steps=1, quiet=True)
    assert res["png"] and len(drawn) == 1
    check_rule(drawn[0])
    assert QKOV_CAPTION in [t.get_text() for t in drawn[0].texts]
