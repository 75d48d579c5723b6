"""The benchmark scripts' command lines: a bad ``--dir`` is a usage error, never a raw traceback."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", ["benchmarks.disk_vs_ram", "benchmarks.phase6"])
@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_bad_scratch_dir_is_a_clear_error(tmp_path, module, kind):
    where = tmp_path / "nowhere"
    if kind == "file":
        where.write_text("not a directory")
    p = subprocess.run([sys.executable, "-m", module, "--dir", str(where)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    what = "does not exist" if kind == "missing" else "is not a directory"
    assert f"--dir {str(where)!r} {what}" in p.stderr and "usage:" in p.stderr
    assert not list(tmp_path.glob("fisherstore-*"))  # nothing was created
