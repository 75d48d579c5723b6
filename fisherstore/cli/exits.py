"""How a command ends: one exit-code table for every subcommand, and the library's errors in command-line words.

Usage::

    code = exit_code(err)                      # the EXIT_CODES entry of an error
    print(cli_message(err), file=sys.stderr)   # its message, with Python advice turned into CLI advice
"""

from __future__ import annotations

from ..errors import (
    FisherStoreError,
    FormatVersionError,
    HeadIndexError,
    InvalidArgumentError,
    LayoutError,
    NotAFisherStoreError,
    SliceError,
    StorageError,
    StoreLockedError,
    UnknownParamError,
    UnknownTaskError,
)

__all__ = ["EXIT_CODES", "OK", "DAMAGED", "USAGE", "NO_STORE", "BUSY", "ENVIRONMENT", "exit_code", "cli_message"]

#: The one exit-code table of every subcommand: (code, name, meaning).
EXIT_CODES: tuple[tuple[int, str, str], ...] = (
    (0, "ok", "success (verify: the store is clean; unlock: the stale lock was removed, or none was held)"),
    (1, "damaged", "the store or its data is damaged: verify found problems, or a read hit a bad chunk or document"),
    (2, "usage", "the command line is wrong: a bad argument or value, an unknown task or parameter, unlock without "
                 "--force"),
    (3, "no store", "there is no fisherstore store at PATH: it does not exist, is a file, or is not a store"),
    (4, "busy", "a live writer holds the store (unlock refuses to remove its lock)"),
    (5, "environment", "this machine cannot do it: permission denied, disk full or an I/O error, a store written by "
                       "a newer fisherstore, a missing optional package"),
)
OK, DAMAGED, USAGE, NO_STORE, BUSY, ENVIRONMENT = (c for c, _, _ in EXIT_CODES)


def exit_code(e: BaseException) -> int:
    """The :data:`EXIT_CODES` entry of an error a subcommand raised."""
    if isinstance(e, NotAFisherStoreError):
        return NO_STORE
    if isinstance(e, StoreLockedError):
        return BUSY
    if isinstance(e, (InvalidArgumentError, UnknownTaskError, UnknownParamError, HeadIndexError, SliceError,
                      LayoutError)):
        return USAGE
    if isinstance(e, (FormatVersionError, StorageError, ImportError)):
        return ENVIRONMENT
    if isinstance(e, FisherStoreError):
        return DAMAGED
    return ENVIRONMENT  # a plain OSError: permissions, I/O


# Messages raised deeper down speak Python (they serve the library too); the CLI says the same in its own words.
_CLI_WORDS = (
    (" Point fisherstore.open at the store's root directory.", " Give the store's root directory."),
    ("Reopen it with fisherstore.open(path, mode='r') to read the new store.", "Run the command again."),
    (", or open this store with mode='r' to read it.", "; `fisherstore info` and `verify` read it meanwhile."),
    ("reopen with force=True (CLI: fisherstore unlock --force PATH)", "run `fisherstore unlock --force PATH`"),
    (". Check the path, or use mode='a' to create one.", ". Check the path."),
    (". Check the path, or open it with mode='a' or 'w' to create a store there.", ". Check the path."),
)


def cli_message(e: BaseException) -> str:
    """``str(e)`` with the library's Python advice turned into command-line words."""
    msg = str(e)
    for python, cli in _CLI_WORDS:
        msg = msg.replace(python, cli)
    return msg
