"""README.md runs as printed: its Python blocks execute, its commands parse, CI runs its test command.

Conventions (what a README author needs to know):

* **Fragments.** A ```python block that cannot run on its own (it needs a 7B model, a
  Trainer, a ``torch.distributed`` launch, ...) is marked by an HTML comment on the line
  right before its fence, invisible on GitHub::

      <!-- fragment: needs a torch.distributed launch -->
      ```python

  Every other ```python block must run.
* **Chaining.** The first three ```python blocks (Collect, Slice, Score under "Three ways
  in") run together, in order, in one fresh interpreter, with nothing before them: they
  build their own tiny LLaMA from a config. Every later non-fragment block runs after them
  in a second fresh interpreter, in README order (chained, as a reader of a notebook
  would run them: they use the names and the ``fisher.zarr`` store those three leave).
* Both interpreters run in a temporary directory (their cwd, ``HOME`` and ``TMPDIR``), so
  the store paths the blocks name land there and nothing outside it is touched.
* A block that raises fails the test with README.md's line number: each block is
  compiled with README's line numbers (``filename="README.md"``), so the traceback names
  the line inside the block, and the message names the block's fence line.
* **Commands.** Each ``fisherstore ...`` command of a ```bash block must parse with the
  real parser (its subcommand exists and takes those arguments); CI (``.ci/run``) must
  still find README's test command and install what README's set-up block installs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FRAGMENT = re.compile(r"<!--\s*fragment\b.*-->")

pytest.importorskip("transformers")  # the blocks build a tiny LLaMA from transformers.LlamaConfig


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the opening fence in README.md
    code: str
    fragment: bool

    @property
    def first_code_line(self) -> int:
        return self.line + 1


def blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of README.md, in order, with its fence line and fragment marker."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if j == len(lines):
            raise AssertionError(f"README.md:{i + 1}: a ``` fence is never closed")
        before = lines[i - 1] if i else ""
        out.append(Block(m.group(1), i + 1, "\n".join(lines[i + 1:j]) + "\n", bool(FRAGMENT.search(before))))
        i = j + 1
    return out


def python_blocks() -> list[Block]:
    return [b for b in blocks() if b.lang == "python"]


# The driver execs each block with README's own line numbers and reports, as one JSON line,
# the first block that raised (its fence line and the traceback), or that all ran.
_DRIVER = textwrap.dedent("""
    import json, sys, traceback
    blocks = json.loads(sys.stdin.read())
    ns = {"__name__": "__main__"}
    for line, code in blocks:
        try:
            exec(compile("\\n" * line + code, "README.md", "exec"), ns)
        except BaseException:
            print("RESULT " + json.dumps({"failed": line, "traceback": traceback.format_exc()}))
            sys.exit(0)
    print("RESULT " + json.dumps({"failed": None}))
""")


def run_blocks(chosen: list[Block], cwd: Path, timeout: float = 240) -> None:
    """Run ``chosen`` in order in one fresh interpreter with ``cwd`` as its working directory; fail naming the block."""
    env = {**os.environ, "HOME": str(cwd), "TMPDIR": str(cwd), "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    payload = json.dumps([[b.line, b.code] for b in chosen])
    r = subprocess.run([sys.executable, "-c", _DRIVER], input=payload, cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    results = [ln[len("RESULT "):] for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and results, f"the README blocks' interpreter died (rc {r.returncode}):\n{r.stderr[-4000:]}"
    res = json.loads(results[-1])
    if res["failed"] is not None:
        pytest.fail(f"README.md:{res['failed']}: the ```python block there raised when run as printed "
                    f"(after the blocks at lines {[b.line for b in chosen if b.line < res['failed']]}):\n"
                    f"{res['traceback']}", pytrace=False)


def test_readme_blocks_are_found_and_fragments_marked():
    py = python_blocks()
    assert len(py) >= 3, "README.md should open with the Collect, Slice and Score blocks"
    assert not any(b.fragment for b in py[:3]), "the first three blocks (Collect, Slice, Score) must run, not be fragments"
    # The Collect block builds its own model: no block before it, nothing downloaded.
    assert "LlamaConfig" in py[0].code and "from_pretrained" not in "".join(b.code for b in py[:3])


def test_first_three_blocks_run_as_printed_in_a_fresh_interpreter(tmp_path):
    """Collect, Slice, Score: one after another in one fresh interpreter, nothing else (issue 20, item 6)."""
    run_blocks(python_blocks()[:3], tmp_path)
    # The blocks' relative store path lands in the temporary cwd, so nothing outside it was written.
    assert (tmp_path / "fisher.zarr").is_dir()


def test_every_other_python_block_runs_or_is_a_fragment(tmp_path):
    """Every later non-fragment block runs after the first three (chained, in README order)."""
    py = python_blocks()
    later = [b for b in py[3:] if not b.fragment]
    if not later:
        pytest.skip("README.md has no runnable ```python block after the first three")
    run_blocks(py[:3] + later, tmp_path)


def test_fragment_marker_is_only_used_before_python_fences():
    """A marker must sit right before a fence: one elsewhere marks nothing and hides a mistake."""
    lines = README.read_text(encoding="utf-8").splitlines()
    for i, ln in enumerate(lines):
        if FRAGMENT.search(ln):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            assert nxt.startswith("```python"), f"README.md:{i + 1}: a fragment marker not followed by a ```python fence"


def _bash_commands() -> list[tuple[int, str]]:
    """``(line, command)`` for each command of the ```bash blocks, split on ``&&``, comments dropped."""
    out = []
    for b in blocks():
        if b.lang not in ("bash", "sh", "shell", "console"):
            continue
        for k, ln in enumerate(b.code.splitlines()):
            ln = ln.split("#", 1)[0].strip() if not ln.lstrip().startswith("#") else ""
            for cmd in filter(None, (c.strip() for c in ln.split("&&"))):
                out.append((b.first_code_line + k, cmd))
    return out


def test_fisherstore_commands_in_bash_blocks_parse():
    """Each ``fisherstore SUBCOMMAND ...`` of a ```bash block parses with the real parser (as ``--help`` would)."""
    from fisherstore.cli.main import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "cmd").choices  # argparse keeps subparsers here
    found = [(line, shlex.split(cmd)) for line, cmd in _bash_commands() if cmd.split()[0] == "fisherstore"]
    assert found, "README.md's set-up block runs no fisherstore command (it should run `fisherstore demo`)"
    for line, argv in found:
        assert argv[1] in subs, f"README.md:{line}: `fisherstore {argv[1]}` is not a subcommand ({sorted(subs)})"
        try:
            parser.parse_args(argv[1:])
        except SystemExit as e:  # argparse exits 2 on a bad command line
            pytest.fail(f"README.md:{line}: `{' '.join(argv)}` does not parse (exit {e.code})", pytrace=False)
        assert subs[argv[1]].format_help()  # its --help exists and renders


def test_readme_commands_are_what_ci_runs(tmp_path):
    """.ci/run finds README's test command with its own pipeline, and installs what README's set-up block does."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    grab = next(ln for ln in ci.splitlines() if ln.startswith("test_cmd=$("))
    # Run CI's own extraction (the exact line of .ci/run) in a subprocess against this README.
    r = subprocess.run(["bash", "-c", f"set -euo pipefail; {grab}; printf '%s' \"$test_cmd\""], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    commands = [cmd for _, cmd in _bash_commands()]
    assert r.stdout == "python -m pytest -q" and r.stdout in commands, (
        f".ci/run extracts {r.stdout!r}; README's set-up block runs {commands}")
    # Step 2 of the set-up block installs what CI installs before the test command.
    for pin in re.findall(r"pip install --quiet (\S+(?: \S+)?)\n", ci):
        pin = pin.split()[-1] if pin.startswith("-e ") else pin
        if "pip" in pin:
            continue  # CI's own `--upgrade pip`
        assert any(pin in cmd for cmd in commands), f".ci/run installs {pin!r}, README's set-up block does not"
    assert any(c.endswith("fisherstore demo") or c == "fisherstore demo" for c in commands)
