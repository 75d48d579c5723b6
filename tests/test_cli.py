"""The command line: demo (README's main command), info, exit codes."""

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

import fisherstore
from fisherstore.cli import main, run_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_writes_store_table_and_png(tmp_path, capsys):
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    res = run_demo(str(tmp_path))
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    assert (t1.ru_utime + t1.ru_stime) - (t0.ru_utime + t0.ru_stime) < 120
    out = capsys.readouterr().out
    assert "layer head" in out and res["png"] in out
    from matplotlib.image import imread

    img = imread(res["png"])
    assert os.path.getsize(res["png"]) > 0
    assert img.shape[:2] == (300, 1280)  # figsize (12.8, 3.0) at 100 dpi: one panel per block
    with fisherstore.open(res["store"], mode="r") as s:
        assert s.tasks() == ["task_a", "task_b"] and s.step("task_a") == 3
        assert s.fisher("task_b", "model.layers.0.self_attn.k_proj.weight").head(3, "K").shape == (16, 64)


def test_info_json_and_text(tmp_path, capsys):
    with fisherstore.open(tmp_path / "s", mode="w") as s:
        s.create("t", "w", (8, 4), fisherstore.ParamLayout.attention("q", 2, 4))
        s.update("t", {"w": torch.ones(8, 4)}, tokens=3)
    assert main(["info", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    t = info["tasks"]["t"]
    assert t["step"] == 1 and t["tokens_seen"] == 3
    assert t["params"]["w"]["shape"] == [8, 4] and t["params"]["w"]["layout"]["kind"] == "q"
    assert info["bytes"] == 128 and info["compression_ratio"] == pytest.approx(128 / (128 + 2 * 4), rel=1e-6)
    assert main(["info", str(tmp_path / "s")]) == 0
    assert "step 1" in capsys.readouterr().out


def test_exit_codes(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "fisherstore.cli", *args], capture_output=True, text=True,
                              cwd=ROOT)

    r = run("info", str(tmp_path / "missing"))
    assert r.returncode == 1 and "fisherstore: error:" in r.stderr and "missing" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("info")
    assert r.returncode == 2 and "usage" in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "info" in r.stdout
