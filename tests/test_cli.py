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


def _store(path):
    with fisherstore.open(path, mode="w") as s:
        s.create("t", "w", (8, 4), fisherstore.ParamLayout.attention("q", 2, 4))
        s.update("t", {"w": torch.rand(8, 4)})
    return str(path)


PYTHON_WORDS = ("mode=", "force=True", "fisherstore.open", "Traceback")


def test_exit_code_table_every_row(tmp_path, capsys):
    """Each row of the one table, reached for real (a store, a damaged chunk, a live writer, a newer format)."""
    good = _store(tmp_path / "good")
    assert main(["info", good]) == 0 and main(["verify", good]) == 0 and main(["unlock", good]) == 0
    bad = _store(tmp_path / "bad")
    chunk = next(p for p in (tmp_path / "bad").rglob("c/*/*") if p.is_file())
    chunk.write_bytes(b"\xff" + chunk.read_bytes()[1:])
    assert main(["verify", bad]) == 1
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = {
        2: [["plot", good, "--task", "nope", "--out", str(tmp_path / "x.png")]],
        3: [["info", str(tmp_path / "missing")], ["verify", str(tmp_path / "missing")],
            ["unlock", str(tmp_path / "missing"), "--force"], ["info", str(tmp_path / "file")],
            ["info", str(tmp_path / "good" / "zarr.json")], ["verify", str(tmp_path / "empty")],
            ["plot", str(tmp_path / "file"), "--task", "t", "--out", str(tmp_path / "x.png")]],
    }
    for code, runs in cases.items():
        for argv in runs:
            capsys.readouterr()
            assert main(argv) == code, argv
            err = capsys.readouterr().err
            assert err.startswith("fisherstore: error: ") and not any(w in err for w in PYTHON_WORDS), (argv, err)
    assert "is a file, not a store" in _err(capsys, ["info", str(tmp_path / "file")])
    assert "the store is its directory" in _err(capsys, ["info", str(tmp_path / "good" / "zarr.json")])
    assert "no such directory" in _err(capsys, ["unlock", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as ei:
        main(["demo", "--steps", "0"])
    assert ei.value.code == 2 and "at least 1" in capsys.readouterr().err
    with fisherstore.open(good, mode="a"):  # a live writer (this process) holds the store
        assert main(["unlock", good]) == 2  # a lock record, and no --force
        assert main(["unlock", good, "--force"]) == 4  # its holder still runs
        assert "still runs" in capsys.readouterr().err
    newer = _store(tmp_path / "newer")
    doc = json.loads((tmp_path / "newer" / "zarr.json").read_text())
    doc["attributes"]["fisherstore"]["format_version"] = 99
    (tmp_path / "newer" / "zarr.json").write_text(json.dumps(doc))
    assert main(["info", newer]) == 5 and "Upgrade" in capsys.readouterr().err


def _err(capsys, argv):
    capsys.readouterr()
    main(argv)
    return capsys.readouterr().err


def test_exit_code_table_is_documented_once():
    from fisherstore.cli import EXIT_CODES, build_parser

    help_text = build_parser().format_help()
    doc = open(os.path.join(ROOT, "docs", "cli.md")).read()
    assert [c for c, _, _ in EXIT_CODES] == [0, 1, 2, 3, 4, 5]
    for code, name, meaning in EXIT_CODES:
        assert f"  {code}  {name}" in help_text and meaning[:40] in help_text.replace("\n", " ")
        assert f"| {code} | {name} |" in doc, f"docs/cli.md lacks the row of exit code {code}"


def test_exit_codes_of_the_installed_command(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "fisherstore.cli", *args], capture_output=True, text=True,
                              cwd=ROOT)

    r = run("info", str(tmp_path / "missing"))
    assert r.returncode == 3 and "fisherstore: error:" in r.stderr and "missing" in r.stderr
    assert "Traceback" not in r.stderr and "mode=" not in r.stderr
    r = run("info")
    assert r.returncode == 2 and "usage" in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "plot" in r.stdout and "exit codes" in r.stdout
