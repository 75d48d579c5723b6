"""benchmarks.fisher_types --quick runs end to end: a row per configuration and model, every ratio positive."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["plain fwd/bwd", "forward only", "empirical", "empirical (zarr)", "mc k=1", "mc k=4", "mc k=16", "exact",
           "mc k=16 (autograd only)", "exact (autograd only)"]
MODELS = ["LM: LLaMA", "MLP classifier, C = 10:", "MLP classifier, C = 100:"]


def test_quick_run_writes_a_row_per_configuration(tmp_path):
    stem = tmp_path / "ft"
    p = subprocess.run([sys.executable, "-m", "benchmarks.fisher_types", "--quick", "--out", str(stem)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    md = (tmp_path / "ft.md").read_text()
    assert md.startswith("`python -m benchmarks.fisher_types --quick --out ")
    sections = re.split(r"^## ", md, flags=re.M)[1:]
    for title in MODELS:
        (sec,) = [s for s in sections if s.startswith(title)]
        rows = {}
        for line in sec.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if line.startswith("| ") and cells[0] in CONFIGS:
                rows[cells[0]] = cells
        assert sorted(rows) == sorted(CONFIGS), title
        for name, cells in rows.items():
            s_per_batch, ratio, paper, paper_here = float(cells[2]), *(float(c.rstrip("×")) for c in cells[3:6])
            assert s_per_batch > 0 and ratio > 0 and paper > 0 and paper_here > 0, (title, name, cells)
        assert float(rows["plain fwd/bwd"][3].rstrip("×")) == 1.0
    res = json.loads((tmp_path / "ft.json").read_text())
    assert [m["label"] for m in res["models"]] == ["lm", "mlp10", "mlp100"]
    assert all(r > 0 for m in res["models"] for r in m["ratio"].values())
