"""``python -m benchmarks.phase6 --ranks 1,2 --quick``: the heat map on 1 and 2 gloo ranks, one row per rank count.

A small store (hidden 512, 2 layers, 4 samples per task) is built once, then 1 and 2
processes started with torchrun's variables each run the heat map; every rank count must
give a row whose ranks split the bytes and return 1 rank's result (about 30 s here).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ranks_quick_gives_a_row_per_rank_count(tmp_path):
    out = tmp_path / "ranks"
    p = subprocess.run([sys.executable, "-m", "benchmarks.phase6", "--ranks", "1,2", "--quick", "--dir",
                        str(tmp_path), "--out", str(out), "--timeout", "300"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "ranks.json").read_text())
    rows = res["rows"]
    assert [r.get("world") for r in rows] == [1, 2], [r.get("error") for r in rows]
    one, two = rows
    assert one["bytes_per_rank"] == [one["bytes_all"]] and sum(two["bytes_per_rank"]) == one["bytes_all"]
    assert max(two["bytes_per_rank"]) <= 0.75 * one["bytes_all"]  # each rank reads about half
    assert sum(two["chunk_files_per_rank"]) == one["chunk_files_per_rank"][0]
    assert one["ranks_agree"] and two["ranks_agree"] and two["top"][:4] == one["top"][:4]
    assert abs(two["checksum"] - one["checksum"]) <= 1e-5 * abs(one["checksum"])
    for r in rows:
        assert r["cold_s"] > 0 and r["warm_s"] > 0 and len(r["cold_s_all"]) == 2
    md = (tmp_path / "ranks.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(table) == 2 and "error" not in md and "| NO |" not in md, md
    assert "Where scaling stops" in md and "2 ranks:" in md
    assert not list(tmp_path.glob("fisherstore-*"))  # the scratch store is gone
