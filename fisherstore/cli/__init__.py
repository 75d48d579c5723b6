"""The ``fisherstore`` command line (the console script ``fisherstore = fisherstore.cli:main``).

==========================  ==============================================================
module                      job
==========================  ==============================================================
:mod:`.main`                the parser and the entry point: errors are one line, never a traceback
:mod:`.commands`            the subcommands (demo, info, verify, plot, qkov, unlock, import-adam)
:mod:`.exits`               the exit-code table, and library messages in command-line words
:mod:`.info`                what ``info`` knows of a store, as JSON-ready data
:mod:`.demo`                the README demo: a tiny model, two tasks, a QK-OV heat map
==========================  ==============================================================
"""

from .commands import command
from .demo import run_demo
from .exits import EXIT_CODES, exit_code
from .info import store_info
from .main import build_parser, main

__all__ = ["main", "build_parser", "command", "exit_code", "store_info", "run_demo", "EXIT_CODES"]
