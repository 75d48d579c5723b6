"""The on-disk format: names, keys and metadata documents (see docs/format.md). No I/O.

A store is a Zarr v3 hierarchy::

    <root>/zarr.json                      group; attributes.fisherstore = root document
    <root>/<task>/zarr.json               group; attributes.fisherstore_task = the task manifest
    <root>/<task>/<param>/zarr.json       group; attributes.fisherstore_param = name, shape, layout
    <root>/<task>/<param>/g<N>/           float32 array: generation N of the EMA state

The task manifest is the single commit point: it names the live generation of every
parameter, so rewriting it (atomically, after the data is durable) switches a whole flush
at once, and a crash leaves either the old or the new manifest.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from .errors import FormatVersionError, InvalidArgumentError, NotAFisherStoreError

#: Bumped on any change an older reader would misread.
FORMAT_VERSION = 1
ROOT_ATTR = "fisherstore"
TASK_ATTR = "fisherstore_task"
PARAM_ATTR = "fisherstore_param"
ESTIMATORS = ("micro_batch", "batch", None)

_GEN_RE = re.compile(r"^g(\d{8})$")


def encode_name(name: str, what: str = "name") -> str:
    """Turn a task or parameter name into one safe path segment (reversible, stable).

    Dotted parameter names stay readable; ``/``, ``%`` and non-ASCII characters are
    percent-encoded, and the names Zarr reserves (``.``, ``..``, a leading ``__``) are
    escaped.
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"{what} must be a non-empty string, got {name!r}")
    if "\x00" in name:
        raise InvalidArgumentError(f"{what} {name!r} contains a NUL character")
    seg = quote(name, safe="._-~+=,@")
    if seg in (".", "..") or seg.startswith("__") or seg.startswith("g") and _GEN_RE.match(seg):
        seg = "%" + format(ord(seg[0]), "02X") + seg[1:]
    if len(seg.encode()) > 240:
        raise InvalidArgumentError(f"{what} {name[:40]!r}... is too long to store ({len(seg)} bytes encoded; max 240)")
    return seg


def gen_name(gen: int) -> str:
    return f"g{gen:08d}"


def parse_gen(seg: str) -> int | None:
    m = _GEN_RE.match(seg)
    return int(m.group(1)) if m else None


def group_doc(attr: str, body: dict[str, Any]) -> dict[str, Any]:
    """A Zarr v3 group metadata document carrying one fisherstore attribute."""
    return {"zarr_format": 3, "node_type": "group", "attributes": {attr: body}}


def root_body(library_version: str, codecs: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "written_by": f"fisherstore {library_version}",
        "codecs": codecs,
        "tasks": {},
    }


def check_root(doc: dict[str, Any] | None, path: str) -> dict[str, Any]:
    """Validate a root document; return its fisherstore body."""
    if doc is None:
        raise NotAFisherStoreError(
            f"{path!r} is not a fisherstore store (no zarr.json at its root). Check the path, or "
            "open it with mode='a' or 'w' to create a store there."
        )
    body = (doc.get("attributes") or {}).get(ROOT_ATTR) if isinstance(doc, dict) else None
    if doc.get("node_type") != "group" or not isinstance(body, dict) or "format_version" not in body:
        raise NotAFisherStoreError(
            f"{path!r} holds a Zarr node but not a fisherstore store (its zarr.json has no "
            f"'{ROOT_ATTR}' attribute). Point fisherstore.open at the store's root directory."
        )
    version = body["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path!r} was written by {body.get('written_by', 'a newer fisherstore')} with format "
            f"version {version}; this fisherstore reads format versions up to {FORMAT_VERSION}. "
            "Upgrade fisherstore (pip install -U fisherstore) to read it."
        )
    return body
