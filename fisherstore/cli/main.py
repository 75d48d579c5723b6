"""The ``fisherstore`` command line: the parser of every subcommand, and the entry point.

    fisherstore demo [--out DIR]                       collect two tasks on a tiny LLaMA-style model, score QK-OV
    fisherstore info PATH [--json]                     tasks, parameters, steps, bytes on disk
    fisherstore verify PATH [--json]                   check every committed chunk; name what a crash rolled back
    fisherstore plot PATH --task T [--compare T2] --out fig.png|DIR   per-block [layer x head] Fisher mass heat map
    fisherstore qkov PATH --task-a A --task-b B [--json]   QK-OV interference straight from the store

Edges answer as the table says: an ``--out``/``--png`` naming an existing directory writes
into it (``DIR/T.png``, ``DIR/qkov-A-vs-B.png``), as ``cp FILE DIR`` does; a selection of
nothing (``--blocks ""``), a task with no EMA step where the EMA is needed, or a task B of
another geometry is usage (2); an ``s3://`` URL with no store or no bucket is no store (3).
    fisherstore unlock PATH --force                    remove a stale writer lock whose process is gone
    fisherstore import-adam CKPT --store PATH --task T   Adam's exp_avg_sq of a checkpoint, as a task

Exit codes follow one table, :data:`~fisherstore.cli.exits.EXIT_CODES` (printed by
``--help``, and in docs/cli.md). The subcommands are :mod:`.commands`'.
"""

from __future__ import annotations

import argparse
import sys

from .._version import __version__
from ..errors import FisherStoreError
from .commands import COMMANDS
from .exits import EXIT_CODES, OK, cli_message, exit_code

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every registered subcommand; the epilog is the exit-code table."""
    table = "\n".join(f"  {code}  {name:12s} {meaning}" for code, name, meaning in EXIT_CODES)
    ap = argparse.ArgumentParser(prog="fisherstore", description="Full elementwise Fisher information, on disk.",
                                 epilog=f"exit codes (every command):\n{table}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"fisherstore {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for setup in COMMANDS:
        setup(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (:data:`EXIT_CODES`). Errors are one line, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except BrokenPipeError:
        return OK
    except (FisherStoreError, OSError, ImportError) as e:
        print(f"fisherstore: error: {cli_message(e)}", file=sys.stderr)
        return exit_code(e)

