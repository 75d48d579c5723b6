"""The empirical Fisher beside the true one, per head: ``compare_tasks``, its summary and its picture.

One real Zarr store of a tiny GQA LLaMA (2 layers, H = 4, H_kv = 2, head_dim 8, vocab 64),
every parameter tracked: task "emp" collected with ``fisher_type="empirical"`` and task
"exact" with ``fisher_type="exact"`` on the same batch (2 sequences of 6 tokens: 7 targets,
so 7 × 64 backward passes for the exact one). The rows are checked against an independent
computation written here: both tasks' Fishers read whole, sliced per head from the
LLaMA geometry (q / k / v rows ``j*d:(j+1)*d``, o columns), ranked with numpy. Then the
refusals, the summary and the figure (read back from the matplotlib Figure, as
tests/test_figures.py does).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import fisherstore  # noqa: E402
from fisherstore import FisherCollector  # noqa: E402
from fisherstore.errors import (  # noqa: E402
    InvalidArgumentError,
    NoEmaStepError,
    TaskMismatchError,
    UnknownParamError,
)
from fisherstore.phase6 import compare_tasks, plot_fisher_types, summarize_comparison  # noqa: E402
from tests.models import tiny_model, token_batch  # noqa: E402

H, H_KV, D, LAYERS = 4, 2, 8, 2
G = H // H_KV
ATTN = {"q_proj": "Q", "k_proj": "K", "v_proj": "V", "o_proj": "O"}
Q0 = "model.layers.0.self_attn.q_proj.weight"
MLP0 = "model.layers.0.mlp.up_proj.weight"


def _llama(seed, **cfg):
    """tests.models' tiny LLaMA config with ``cfg`` changed (other heads, other shapes)."""
    import transformers as T

    torch.manual_seed(seed)
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    c = T.LlamaConfig(**{**kw, **cfg})
    c._attn_implementation = "eager"
    c.use_cache = False
    return T.AutoModelForCausalLM.from_config(c).eval()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """ "emp" / "exact": one batch, two fisher_types, every parameter. Then tasks made to be refused."""
    path = str(tmp_path_factory.mktemp("types") / "fisher.zarr")
    # 7 x 64 backward passes of a 32-wide model: each is a few tiny kernels, where waking intra-op
    # threads costs more than the work (10x slower on a busy 2-core machine). One thread, then restored.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _collect(path)
    finally:
        torch.set_num_threads(threads)
    return path


def _collect(path):
    model, batch = tiny_model("llama"), token_batch(n=2, seq=6, seed=5)
    with FisherCollector(backend="zarr", path=path, mode="w", params="all") as fc:
        fc.collect_fisher(model, batch, task="emp")
        fc.collect_samples(model, batch, task="samples_only", names=[Q0])  # no EMA step
    with FisherCollector(backend="zarr", path=path, params="all", fisher_type="exact") as fc:
        fc.collect_fisher(model, batch, task="exact")
    with FisherCollector(backend="zarr", path=path) as fc:  # the default params: attention projections only
        fc.collect_fisher(model, batch, task="attn_only")
        # Twice the heads at half the head_dim: every shape the same, the head blocks other rows.
        fc.collect_fisher(_llama(1, num_attention_heads=8, num_key_value_heads=4), batch, task="wide")
        fc.collect_fisher(_llama(2, hidden_size=48), batch, task="big")  # other shapes under the same names


@pytest.fixture(scope="module")
def rows(store_path):
    with fisherstore.open(store_path, mode="r") as s:
        return compare_tasks(s, "emp", "exact")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (scipy.stats.rankdata's default; scipy is not a dependency): ties share their mean rank."""
    srt = np.sort(x)
    return (np.searchsorted(srt, x, "left") + np.searchsorted(srt, x, "right") - 1) / 2.0


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a.ravel()), _ranks(b.ravel())
    return float(np.corrcoef(ra, rb)[0, 1])


def _head_block(full: torch.Tensor, proj: str, head: int) -> np.ndarray:
    """The LLaMA geometry by hand: q/k/v heads are rows of d, o heads columns; K/V by kv head ``head // g``."""
    j = head // G if proj in ("k_proj", "v_proj") else head
    x = full[:, j * D:(j + 1) * D] if proj == "o_proj" else full[j * D:(j + 1) * D]
    return x.double().numpy()


def test_rows_match_an_independent_computation(store_path, rows):
    with fisherstore.open(store_path, mode="r") as s:
        names = s.params("emp")
        whole = {(t, n): s.read(t, n) for t in ("emp", "exact") for n in names}
        meta = {t: s.metadata(t) for t in ("emp", "exact")}
    assert meta["emp"]["fisher_type"] == "empirical" and meta["exact"]["fisher_type"] == "exact"
    headed = [n for n in names if n.split(".")[-2] in ATTN]
    plain = [n for n in names if n not in headed]
    assert len(headed) == 4 * LAYERS and plain  # embeddings, MLPs, norms, lm_head: no heads
    # Per layer: 4 Q + 2 K + 2 V + 4 O head blocks; one row per parameter without heads.
    assert len(rows) == LAYERS * (H + H_KV + H_KV + H) + len(plain)
    by_key = {(r["param"], r["head"], r["block"]): r for r in rows}
    assert len(by_key) == len(rows)
    for r in rows:  # every row names both tasks and how each was collected
        assert (r["a"], r["b"], r["fisher_type_a"], r["fisher_type_b"]) == ("emp", "exact", "empirical", "exact")
        assert r["mc_samples_a"] is None and r["mc_samples_b"] is None
    checked = 0
    for name in headed:
        proj, layer = name.split(".")[-2], int(name.split(".")[2])
        block = ATTN[proj]
        for head in (range(0, H, G) if block in "KV" else range(H)):  # K/V: named by the group's first query head
            r = by_key[(name, head, block)]
            a, b = _head_block(whole["emp", name], proj, head), _head_block(whole["exact", name], proj, head)
            assert np.unique(a).size == a.size and np.unique(b).size == b.size  # no ties: every rank rule agrees
            assert r["layer"] == layer and r["n"] == a.size == 32 * D
            assert r["spearman"] == pytest.approx(_spearman(a, b), abs=1e-9)
            assert r["mass_a"] == pytest.approx(a.sum(), rel=1e-6) and r["mass_b"] == pytest.approx(b.sum(), rel=1e-6)
            assert r["mass_ratio"] == pytest.approx(b.sum() / a.sum(), rel=1e-6)
            checked += 1
    assert checked == LAYERS * (H + 2 * H_KV + H)
    for name in plain:  # the whole tensor is the one block
        r = by_key[(name, None, None)]
        a, b = whole["emp", name].double().numpy(), whole["exact", name].double().numpy()
        assert r["n"] == a.size and r["mass_ratio"] == pytest.approx(b.sum() / a.sum(), rel=1e-6)
        if np.unique(a).size == a.size and np.unique(b).size == b.size:
            assert r["spearman"] == pytest.approx(_spearman(a, b), abs=1e-9)
    mlp = by_key[(MLP0, None, None)]
    assert mlp["layer"] == 0 and mlp["head"] is None and mlp["block"] is None
    assert by_key[("model.embed_tokens.weight", None, None)]["layer"] is None
    # The two estimators differ (else the comparison would show nothing), yet agree in sign.
    rho = [r["spearman"] for r in rows if r["block"]]
    assert all(0 < v < 1 for v in rho)


def test_a_task_against_itself_is_rank_1_and_ratio_1(store_path):
    with fisherstore.open(store_path, mode="r") as s:
        rows = compare_tasks(s, "exact", "exact")
        n_params = len(s.params("exact"))
    assert len(rows) == n_params - 4 * LAYERS + LAYERS * (H + 2 * H_KV + H)
    for r in rows:
        assert r["spearman"] == pytest.approx(1.0, abs=1e-12), r["param"]
        assert r["mass_ratio"] == pytest.approx(1.0, abs=1e-12), r["param"]
        assert r["fisher_type_a"] == r["fisher_type_b"] == "exact"


def test_names_limit_the_rows_and_pandas_takes_them(store_path, rows):
    pd = pytest.importorskip("pandas")
    with fisherstore.open(store_path, mode="r") as s:
        some = compare_tasks(s, "emp", "exact", names=[Q0, MLP0])
    assert [(r["param"], r["head"]) for r in some] == [(Q0, h) for h in range(H)] + [(MLP0, None)]
    df = pd.DataFrame(rows)
    assert {"a", "b", "fisher_type_a", "fisher_type_b", "param", "layer", "head", "block", "spearman", "mass_a",
            "mass_b", "mass_ratio"} <= set(df.columns)
    assert len(df) == len(rows)


def test_both_tasks_are_read_at_one_snapshot_one_head_block_at_a_time(store_path, monkeypatch):
    """One snapshot of both tasks; each read of a parameter with heads is one head block (d rows or columns)."""
    with fisherstore.open(store_path, mode="r") as s:
        taken, reads = [], []
        real = s.snapshot

        def snapshot(tasks=None):
            taken.append(list(tasks))
            view = real(tasks)
            read = view.read

            def spy(task, name, region=None, **kw):
                reads.append((task, name, region))
                return read(task, name, region, **kw)

            monkeypatch.setattr(view, "read", spy)
            return view

        monkeypatch.setattr(s, "snapshot", snapshot)
        compare_tasks(s, "emp", "exact", names=[Q0, "model.layers.1.self_attn.o_proj.weight", MLP0])
    assert taken == [["emp", "exact"]]
    headed = [(t, n, reg) for t, n, reg in reads if n != MLP0]
    assert len(headed) == 2 * (H + H)  # both tasks, Q0's 4 heads and o_proj's 4
    for _, name, reg in headed:
        axis = 1 if "o_proj" in name else 0
        assert reg[axis].stop - reg[axis].start == D  # never the whole parameter
    assert sorted(t for t, n, _ in reads if n == MLP0) == ["emp", "exact"]


def test_summary_gives_the_median_rank_correlation_per_block(rows):
    lines = {line["block"]: line for line in summarize_comparison(rows)}
    assert list(lines) == ["Q", "K", "V", "O", None]
    for block, line in lines.items():
        mine = [r for r in rows if r["block"] == block]
        assert line["rows"] == len(mine)
        assert line["median_spearman"] == pytest.approx(float(np.median([r["spearman"] for r in mine])))
        assert line["min_spearman"] == pytest.approx(min(r["spearman"] for r in mine))
        assert line["median_mass_ratio"] == pytest.approx(float(np.median([r["mass_ratio"] for r in mine])))
        assert (line["fisher_type_a"], line["fisher_type_b"]) == ("empirical", "exact")


# -- refusals -----------------------------------------------------------------------------------
def test_a_task_with_no_ema_step_is_refused(store_path):
    with fisherstore.open(store_path, mode="r") as s:
        for a, b in (("samples_only", "emp"), ("emp", "samples_only")):
            with pytest.raises(NoEmaStepError) as ei:
                compare_tasks(s, a, b, names=[Q0])
            msg = str(ei.value)
            assert "task 'samples_only' holds no EMA step" in msg and "collect_fisher" in msg


def test_a_parameter_one_task_lacks_is_refused_by_name(store_path):
    with fisherstore.open(store_path, mode="r") as s:
        with pytest.raises(UnknownParamError) as ei:  # emp tracks the MLPs, attn_only does not
            compare_tasks(s, "emp", "attn_only")
        assert "task 'attn_only' does not track parameter 'model.embed_tokens.weight'" in str(ei.value)
        assert "names=" in str(ei.value)
        with pytest.raises(UnknownParamError, match="task 'attn_only' does not track parameter"):
            compare_tasks(s, "attn_only", "emp")  # the other way round: emp has more
        with pytest.raises(UnknownParamError, match=f"task 'attn_only' does not track parameter '{MLP0}'"):
            compare_tasks(s, "emp", "attn_only", names=[Q0, MLP0])
        with pytest.raises(UnknownParamError, match="'no.such.weight'"):
            compare_tasks(s, "emp", "exact", names=["no.such.weight"])
        with pytest.raises(fisherstore.UnknownTaskError, match="unknown task 'nope'"):
            compare_tasks(s, "emp", "nope")
        with pytest.raises(InvalidArgumentError, match="names is empty"):
            compare_tasks(s, "emp", "exact", names=[])
        # The parameters both track compare fine.
        assert len(compare_tasks(s, "emp", "attn_only", names=[Q0])) == H


@pytest.mark.parametrize("other, field", [("wide", "num_heads"), ("big", "shape")])
def test_another_layout_or_shape_under_the_same_name_is_refused(store_path, other, field):
    with fisherstore.open(store_path, mode="r") as s:
        if other == "wide":  # same shapes, other heads: pairing its rows would look plausible
            assert s.param(other, Q0).shape == s.param("attn_only", Q0).shape
        with pytest.raises(TaskMismatchError) as ei:
            compare_tasks(s, "attn_only", other)
    msg = str(ei.value)
    assert f"at parameter {Q0!r}" in msg and f"its {field} is" in msg and "collected from one model" in msg


# -- the figure ---------------------------------------------------------------------------------
@pytest.fixture
def drawn(monkeypatch):
    """The figures drawn in the test, each kept as it is closed (saving closes it), to be read back."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs, close = [], plt.close

    def keep(fig=None):
        if fig is not None and fig not in figs:
            figs.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    return figs


def test_the_figure_is_written_and_labelled(rows, drawn, tmp_path):
    from fisherstore.views.plots import RATIO_LABEL, SPEARMAN_LABEL

    out = str(tmp_path / "emp_vs_exact.png")
    assert plot_fisher_types(rows, out) == out
    assert os.path.getsize(out) > 1000
    (fig,) = drawn
    texts = [t.get_text() for t in fig.texts]  # the suptitle is one of the figure's texts
    assert any("'emp' (empirical)" in t and "'exact' (exact)" in t for t in texts), texts
    panels = {ax.get_title(): ax for ax in fig.axes if ax.images}
    assert set(panels) == {f"{b}: {what}" for b in "QKVO" for what in ("rank correlation", "mass ratio")}
    for t, ax in panels.items():
        assert ax.get_ylabel() == "layer" and "head" in ax.get_xlabel(), t
        grid = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
        assert grid.shape == (LAYERS, H), t  # columns are query heads; K/V spread over their group
        if t[0] in "KV":
            np.testing.assert_array_equal(grid[:, 0::2], grid[:, 1::2])
    bars = [ax.get_ylabel() for ax in fig.axes if not ax.images and ax.get_ylabel()]
    assert bars.count(SPEARMAN_LABEL) == 4 and SPEARMAN_LABEL == "Spearman ρ (rank correlation)"
    ratio_bars = [b for b in bars if b.startswith(RATIO_LABEL)]
    assert len(ratio_bars) == 4 and all("mass(b)/mass(a)" in b and "'exact'" in b for b in ratio_bars)
    # The values drawn are the rows': ρ of layer 1, kv head 1 (named by query head 2) at query heads 2 and 3.
    v1 = next(r for r in rows if r["block"] == "V" and r["layer"] == 1 and r["head"] == 2)
    rho = panels["V: rank correlation"].images[0].get_array()
    assert float(rho[1, 2]) == float(rho[1, 3]) == pytest.approx(v1["spearman"])
    q = next(r for r in rows if r["block"] == "Q" and r["layer"] == 0 and r["head"] == 3)
    img = panels["Q: mass ratio"].images[0]
    assert float(img.get_array()[0, 3]) == pytest.approx(q["mass_ratio"])
    from matplotlib.colors import LogNorm

    assert isinstance(img.norm, LogNorm) and math.isclose(img.norm.vmin * img.norm.vmax, 1.0)  # centred on 1


def test_the_figure_refuses_rows_it_cannot_draw(rows, drawn, tmp_path):
    out = str(tmp_path / "x.png")
    with pytest.raises(InvalidArgumentError, match="no row has a head block"):
        plot_fisher_types([r for r in rows if r["head"] is None], out)
    other = [{**r, "b": "mc"} for r in rows[:2]]
    with pytest.raises(InvalidArgumentError, match="pairs of tasks"):
        plot_fisher_types(rows + other, out)
    twin = [{**r, "param": r["param"].replace("weight", "bias")} for r in rows if r["param"] == Q0]
    with pytest.raises(InvalidArgumentError, match="both hold block Q of head 0"):
        plot_fisher_types(rows + twin, out)
    assert not drawn and not os.path.exists(out)
