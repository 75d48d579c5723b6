"""How the fields of a stored document are validated, and the error a bad one raises. Pure, no I/O.

The root document (:mod:`.format`) and task manifests (:mod:`.manifest`) parse every
field through these, so a damaged or crafted store is refused with one kind of message:
a :class:`~fisherstore.errors.CorruptStoreError` naming the document, the field and what
is wrong with it, and saying what to do.

Usage::

    step = as_int(body.get("step"), where, "step")       # an int >= 0, or CorruptStoreError
"""

from __future__ import annotations

from typing import Any

from ..errors import CorruptStoreError

__all__ = ["damaged", "as_int", "as_dict", "as_ints", "key_field"]


def damaged(where: str, what: str) -> CorruptStoreError:
    """The error for document ``where`` whose ``what`` is wrong (raise it)."""
    return CorruptStoreError(
        f"{where} is damaged or was not written by fisherstore: {what}. Run `fisherstore verify` on the store; "
        "if committed data is lost, restore the store from a copy."
    )


def as_int(v: Any, where: str, field: str, lo: int = 0) -> int:
    """``v`` if it is an int (not a bool) >= ``lo``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise damaged(where, f"{field} = {v!r} is not an integer >= {lo}")
    return v


def as_dict(v: Any, where: str, field: str, optional: bool = False) -> dict[str, Any] | None:
    """``v`` if it is a JSON object (or None, when ``optional``)."""
    if v is None and optional:
        return None
    if not isinstance(v, dict):
        raise damaged(where, f"{field} is {type(v).__name__}, not an object")
    return v


def as_ints(v: Any, where: str, field: str, lo: int) -> tuple[int, ...]:
    """``v`` if it is a list of ints >= ``lo``, as a tuple."""
    if not isinstance(v, list):
        raise damaged(where, f"{field} = {v!r} is not a list of integers")
    return tuple(as_int(x, where, f"{field}[{i}]", lo) for i, x in enumerate(v))


def key_field(v: Any, want: str, where: str, field: str) -> str:
    """``v`` if it is the key fisherstore derives from the name (``want``)."""
    # A key in a document must be the one fisherstore derives from the name: a crafted key
    # ("..", another store's path) would make readers read, and writers delete, elsewhere.
    if v != want:
        raise damaged(where, f"{field} = {v!r}; fisherstore stores it at {want!r}")
    return want
