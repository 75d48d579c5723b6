"""Issue 17, "Trust at scale": refusals where a plausible wrong answer used to come back.

* a heat map (or a comparison, or a plot) against the EMA of a task that holds no EMA step:
  its EMA is zeros, so every score came out ~1/λ too large, finite, exit 0;
* a task B of another geometry (other head counts under the same parameter names, other
  shapes) read through task A's head blocks;
* command-line edges: ``--out DIR``, ``--blocks ""``, a missing bucket;
* a FIFO in place of a chunk, read through the array library (``direct_reads=False``).

Real tiny Hugging Face models, real Zarr / TensorStore stores, a real moto S3 server; the
numbers are checked against a brute-force loop written here.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T

import fisherstore
from fisherstore import FisherCollector
from fisherstore.cli import main
from fisherstore.errors import InvalidArgumentError, LayoutError, NoEmaStepError, TaskMismatchError
from fisherstore.phase6 import compare_fishers
from fisherstore.qkov import QKOVIndexer, QKOVInterference
from tests.models import tiny_model, token_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_WORDS = ("mode=", "force=True", "fisherstore.open", "Traceback")
Q0 = "model.layers.0.self_attn.q_proj.weight"


def _wide_llama():
    """tests.models' tiny LLaMA with twice the heads at half the head_dim: every weight has the same shape."""
    torch.manual_seed(1)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4)
    cfg._attn_implementation = "eager"
    cfg.use_cache = False
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def _big_llama():
    """A tiny LLaMA with other shapes (hidden 48) under the same parameter names."""
    torch.manual_seed(2)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "eager"
    cfg.use_cache = False
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module", params=["zarr", "tensorstore"])
def tasks(request, tmp_path_factory):
    """One store per backend: "a", "b" per-sample only; "c" EMA and samples; "wide" and "big" from other models."""
    path = str(tmp_path_factory.mktemp(f"tasks-{request.param}") / "store")
    model, wide, big = tiny_model("llama"), _wide_llama(), _big_llama()
    with FisherCollector(backend=request.param, path=path, mode="w", micro_batch_size=2) as fc:
        fc.collect_samples(model, token_batch(n=3, seq=7, seed=1), task="a")
        fc.collect_samples(model, token_batch(n=4, seq=7, seed=2, lo=10), task="b")
        fc.collect_fisher(model, token_batch(n=3, seq=7, seed=3), task="c")
        fc.collect_samples(model, token_batch(n=3, seq=7, seed=3), task="c")
        for name, m in (("wide", wide), ("big", big)):
            fc.collect_fisher(m, token_batch(n=3, seq=7, seed=4), task=name)
            fc.collect_samples(m, token_batch(n=3, seq=7, seed=4), task=name)
    return request.param, path, model


def _open(tasks):
    backend, path, _ = tasks
    return fisherstore.open(path, mode="r", backend=backend)


def _cli(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    if code:
        assert out.err.startswith("fisherstore: error: "), out.err
        assert not any(w in out.err for w in PYTHON_WORDS), out.err
    return code, out.out, out.err


# -- an EMA with no step ----------------------------------------------------------------------
def test_heatmap_refuses_the_ema_of_a_task_with_no_ema_step(tasks):
    with _open(tasks) as s:
        assert s.step("a") == 0 and s.sample_ids("a")  # collect_samples only: the EMA is zeros
        qk = QKOVInterference(QKOVIndexer.from_store(s, "a"))
        for kw in ({}, {"fisher": "ema"}, {"fisher": "ema", "fisher_task": "b"}):
            with pytest.raises(NoEmaStepError) as ei:
                qk.heatmap_from_store(s, "a", "b", **kw)
            msg = str(ei.value)
            assert 'fisher="contribution"' in msg and "collect_fisher" in msg
            assert f"task {kw.get('fisher_task', 'a')!r} holds no EMA step" in msg
            assert isinstance(ei.value, InvalidArgumentError)  # the CLI's usage exit
        # the EMA of a task that has one still normalises a and b (the refusal is about the step, not the pair)
        got = qk.heatmap_from_store(s, "a", "b", fisher="ema", fisher_task="c", blocks="Q")
        assert torch.isfinite(got["scores"]["Q"]).all() and got["scores"]["Q"].shape == (3, 4, 2, 4)


def test_the_contribution_fisher_still_scores_and_equals_a_brute_force_loop(tasks):
    with _open(tasks) as s:
        qk = QKOVInterference(QKOVIndexer.from_store(s, "a"))
        got = qk.heatmap_from_store(s, "a", "b", fisher="contribution", layers=[0], heads=[1], blocks="Q")
        # M_ij = Σ_k C_ik / (max(F_k, ε) + λ) · |g_jk| / T_j, C_i = g_i² / T_i, F = mean_i C_i: loops over pairs
        ga, gb = s.samples("a", Q0)[:].double(), s.samples("b", Q0)[:].double()
        ta, tb = s.sample_tokens("a").double(), s.sample_tokens("b").double()
    rows = slice(8, 16)  # head 1 of q_proj: head_dim 8 along axis 0
    C = [ga[i, rows] ** 2 / ta[i] for i in range(3)]
    F = sum(C) / 3
    den = F.clamp_min(1e-10) + 1e-8
    for i in range(3):
        for j in range(4):
            want = float((C[i] / den * gb[j, rows].abs() / tb[j]).sum())
            assert got["scores"]["Q"][i, j, 0, 0].item() == pytest.approx(want, rel=1e-5)


def test_compare_fishers_refuses_a_task_with_no_ema_step(tasks):
    with _open(tasks) as s:
        with pytest.raises(NoEmaStepError, match="collect_fisher"):
            compare_fishers(s, "a")
        rows = compare_fishers(s, "c", [Q0])  # a task with both compares as before
        assert len(rows) == 4 and all(r["mass_ema"] > 0 and r["mass_contribution"] > 0 for r in rows)


def test_the_cli_refuses_an_ema_with_no_step(tasks, capsys, tmp_path):
    backend, path, _ = tasks
    base = ["--backend", backend]
    code, _, err = _cli(capsys, ["qkov", path, "--task-a", "a", "--task-b", "b", *base])
    assert code == 2 and "no EMA step" in err and "--fisher contribution" in err and "collect_fisher" in err
    code, out, _ = _cli(capsys, ["qkov", path, "--task-a", "a", "--task-b", "b", "--fisher", "contribution",
                                 "--blocks", "Q", *base])
    assert code == 0 and "contribution Fisher" in out
    code, _, err = _cli(capsys, ["plot", path, "--task", "a", "--out", str(tmp_path / "a.png"), *base])
    assert code == 2 and "no EMA step" in err and not (tmp_path / "a.png").exists()


# -- task B of another geometry ---------------------------------------------------------------
def test_task_b_with_other_heads_under_the_same_names_is_refused(tasks):
    with _open(tasks) as s:
        assert s.param("a", Q0).shape == s.param("wide", Q0).shape  # same names and shapes: only the heads differ
        qk = QKOVInterference(QKOVIndexer.from_store(s, "a"))
        with pytest.raises(TaskMismatchError) as ei:
            qk.heatmap_from_store(s, "a", "wide", fisher="contribution")
        msg = str(ei.value)
        assert Q0 in msg and "num_heads" in msg and "8" in msg and "4" in msg and "'wide'" in msg
        assert isinstance(ei.value, LayoutError)
        with pytest.raises(TaskMismatchError, match="shape"):
            qk.heatmap_from_store(s, "a", "big", fisher="contribution")
        with pytest.raises(TaskMismatchError, match="Fisher task 'wide'"):  # the Fisher is read through A's blocks too
            qk.heatmap_from_store(s, "c", "a", fisher="ema", fisher_task="wide")
        with pytest.raises(TaskMismatchError, match="Fisher task 'wide'"):
            qk.heatmap_from_store(s, "a", "b", fisher="contribution", fisher_task="wide")
        # an indexer from another model than task A's is refused too (its blocks are not A's)
        other = QKOVInterference(QKOVIndexer.from_store(s, "wide"))
        with pytest.raises(LayoutError, match="another model"):
            other.heatmap_from_store(s, "a", "b", fisher="contribution")


def test_the_cli_refuses_a_task_b_of_another_geometry(tasks, capsys, tmp_path):
    backend, path, _ = tasks
    code, _, err = _cli(capsys, ["qkov", path, "--task-a", "c", "--task-b", "wide", "--backend", backend])
    assert code == 2 and Q0 in err and "num_heads" in err
    code, _, err = _cli(capsys, ["plot", path, "--task", "c", "--compare", "big", "--out", str(tmp_path / "x.png"),
                                 "--backend", backend])
    assert code == 2 and "shape" in err and "--compare task 'big'" in err


# -- command-line edges -----------------------------------------------------------------------
def test_out_naming_a_directory_writes_into_it(tasks, capsys, tmp_path):
    backend, path, _ = tasks
    pytest.importorskip("matplotlib")
    d = tmp_path / "figs"
    d.mkdir()
    code, out, _ = _cli(capsys, ["plot", path, "--task", "c", "--out", str(d), "--backend", backend])
    assert code == 0 and (d / "c.png").stat().st_size > 0 and not (tmp_path / "figs.png").exists()
    assert str(d / "c.png") in out  # the file printed is the file written
    code, out, _ = _cli(capsys, ["plot", path, "--task", "c", "--out", str(tmp_path / "noext"), "--backend", backend])
    assert code == 0 and (tmp_path / "noext.png").is_file() and str(tmp_path / "noext.png") in out
    code, _, err = _cli(capsys, ["plot", path, "--task", "c", "--out", str(tmp_path / "nodir" / "x.png"),
                                 "--backend", backend])
    assert code == 2 and "does not exist" in err and str(tmp_path / "nodir") in err
    code, out, _ = _cli(capsys, ["qkov", path, "--task-a", "a", "--task-b", "b", "--fisher", "contribution",
                                 "--blocks", "K", "--png", str(d), "--backend", backend])
    assert code == 0 and (d / "qkov-a-vs-b.png").stat().st_size > 0


def test_a_selection_of_nothing_is_a_usage_error(tasks, capsys):
    backend, path, _ = tasks
    for blocks in ("", "X", " , "):
        code, _, err = _cli(capsys, ["qkov", path, "--task-a", "a", "--task-b", "b", "--fisher", "contribution",
                                     "--blocks", blocks, "--backend", backend])
        assert code == 2 and "Q, K, V, O" in err, (blocks, err)
    code, _, _ = _cli(capsys, ["qkov", path, "--task-a", "a", "--task-b", "b", "--fisher", "contribution",
                               "--blocks", "q,k", "--backend", backend])
    assert code == 0
    with _open(tasks) as s:
        qk = QKOVInterference(QKOVIndexer.from_store(s, "a"))
        for kw, valid in (({"blocks": ""}, "Q, K, V, O"), ({"heads": []}, "0 to 3"), ({"layers": []}, "0, 1")):
            with pytest.raises(InvalidArgumentError, match="is empty") as ei:
                qk.heatmap_from_store(s, "a", "b", fisher="contribution", **kw)
            assert valid in str(ei.value)
    g = {Q0: torch.ones(2, 32, 32)}
    with pytest.raises(InvalidArgumentError, match="blocks is empty"):
        qk.heatmap(g, g, {Q0: torch.ones(32, 32)}, blocks="")


def test_demo_out_naming_a_file_is_a_usage_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = _cli(capsys, ["demo", "--out", str(f)])
    assert code == 2 and "is a file" in err and f.read_text() == "x"


def test_verify_and_info_of_a_missing_bucket_say_no_store(s3, capsys):
    url = s3()  # a real bucket on the moto server, with a store in it
    with fisherstore.open(url, mode="w") as s:
        s.create("t", "w", (8, 4), fisherstore.ParamLayout.attention("q", 2, 4))
        s.update("t", {"w": torch.rand(8, 4)})
    assert _cli(capsys, ["verify", url])[0] == 0 and _cli(capsys, ["info", url])[0] == 0
    bucket = url.split("/")[2]
    for missing in ("s3://nosuchbucket-fs17/x", f"s3://{bucket}/no/store/here"):
        for cmd in ("verify", "info"):
            code, _, err = _cli(capsys, [cmd, missing])
            assert code == 3, (cmd, missing, err)
            assert missing in err


# -- a FIFO in place of a chunk ---------------------------------------------------------------
_READ = textwrap.dedent("""
    import sys
    import fisherstore
    with fisherstore.open(sys.argv[1], mode="r", backend=sys.argv[2], direct_reads=False) as s:
        try:
            s.fisher("t", "w")[:, :]
        except fisherstore.CorruptStoreError as e:
            print("REFUSED", e)
        else:
            print("READ", s.io_counters().get("chunk_files_read"))
""")


@pytest.mark.parametrize("backend", ["zarr", "tensorstore"])
def test_a_fifo_or_link_chunk_is_refused_by_the_library_read_path(tmp_path, backend):
    path = str(tmp_path / "s")
    want = torch.rand(8, 4)
    with fisherstore.open(path, mode="w", backend=backend) as s:
        s.create("t", "w", (8, 4), fisherstore.ParamLayout.attention("q", 2, 4))
        s.update("t", {"w": want})
    with fisherstore.open(path, mode="r", backend=backend, direct_reads=False) as s:
        # the control: the library path (no chunk file read by fisherstore's own reader) reads the values written
        torch.testing.assert_close(s.fisher("t", "w")[:, :], want, rtol=1e-6, atol=0)  # (1-β)x / (1-β)
        assert s.io_counters()["chunk_files_read"] == 0
    chunk = sorted(glob.glob(os.path.join(path, "t", "w", "g*", "c", "1", "0")))[-1]
    os.unlink(chunk)
    os.mkfifo(chunk)

    def read() -> str:  # in a child with a bound: a regression fails here instead of hanging the suite
        r = subprocess.run([sys.executable, "-c", _READ, path, backend], capture_output=True, text=True, cwd=ROOT,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = read()
    assert out.startswith("REFUSED") and "is not a regular file" in out and chunk in out
    os.unlink(chunk)
    os.symlink(os.path.join(path, "zarr.json"), chunk)  # a link would read outside the chunk
    out = read()
    assert out.startswith("REFUSED") and "symbolic link" in out and chunk in out
