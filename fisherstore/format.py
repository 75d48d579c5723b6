"""The on-disk format, as a spec: names, keys and the typed metadata documents. No I/O.

A store is a Zarr v3 hierarchy (docs/format.md)::

    <root>/zarr.json                      group; attributes.fisherstore = the store document
    <root>/<task>/zarr.json               group; attributes.fisherstore_task = the task manifest
    <root>/<task>/<param>/zarr.json       group; attributes.fisherstore_param = name, shape, layout
    <root>/<task>/<param>/g<N>/           float32 array: generation N of the EMA state
    <root>/<task>/<param>/g<N>/c/<i>/<j>  its chunks (the default chunk key encoding)

The task manifest is the single commit point: it names the live generation of every
parameter, so rewriting it (atomically, after the data is durable) switches a whole flush
at once, and a crash leaves either the old or the new manifest.

Every document is built and parsed here and nowhere else: :class:`StoreDoc`,
:class:`TaskManifest` (with its :class:`ParamEntry` per parameter) and the parameter
node's document.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .errors import FisherStoreError, FormatVersionError, InvalidArgumentError, NotAFisherStoreError
from .layout import ParamLayout

__all__ = [
    "FORMAT_VERSION",
    "ROOT_ATTR",
    "TASK_ATTR",
    "PARAM_ATTR",
    "ESTIMATORS",
    "DOC",
    "encode_name",
    "doc_key",
    "gen_name",
    "parse_gen",
    "generation_key",
    "chunk_key",
    "StoreDoc",
    "ParamEntry",
    "TaskManifest",
    "param_doc",
    "array_attributes",
    "node_attr",
]

#: Bumped on any change an older reader would misread.
FORMAT_VERSION = 1
ROOT_ATTR = "fisherstore"
TASK_ATTR = "fisherstore_task"
PARAM_ATTR = "fisherstore_param"
ESTIMATORS = ("micro_batch", "batch", None)
#: The metadata document of every node (Zarr v3).
DOC = "zarr.json"
#: The task manifest's fields besides the parameters; anything else in it is user info.
_INFO_KEYS = ("estimator", "model", "user")

_GEN_RE = re.compile(r"^g(\d{8})$")


# -- names and keys ------------------------------------------------------------------------
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


def doc_key(node: str) -> str:
    """The key of a node's metadata document ('' is the store's root)."""
    return f"{node}/{DOC}" if node else DOC


def gen_name(gen: int) -> str:
    return f"g{gen:08d}"


def parse_gen(seg: str) -> int | None:
    m = _GEN_RE.match(seg)
    return int(m.group(1)) if m else None


def generation_key(param_key: str, gen: int) -> str:
    return f"{param_key}/{gen_name(gen)}"


def chunk_key(coords: Sequence[int]) -> str:
    """The key of a chunk inside its array (Zarr v3 default encoding, separator ``/``)."""
    return "/".join(["c", *map(str, coords)])


def _group_doc(attr: str, body: dict[str, Any]) -> dict[str, Any]:
    """A Zarr v3 group metadata document carrying one fisherstore attribute."""
    return {"zarr_format": 3, "node_type": "group", "attributes": {attr: body}}


def node_attr(doc: Any, attr: str) -> Any:
    """The fisherstore attribute ``attr`` of a node's document (None when absent)."""
    if not isinstance(doc, dict):
        return None
    attrs = doc.get("attributes")
    return attrs.get(attr) if isinstance(attrs, dict) else None


# -- the store document ----------------------------------------------------------------------
@dataclass
class StoreDoc:
    """The root document: format version, writer, codec chain and the task directory."""

    format_version: int
    written_by: str | None
    codecs: dict[str, Any]
    tasks: dict[str, str] = field(default_factory=dict)  # task name -> its node key

    @classmethod
    def new(cls, library_version: str, codecs: dict[str, Any]) -> StoreDoc:
        return cls(FORMAT_VERSION, f"fisherstore {library_version}", codecs, {})

    def to_doc(self) -> dict[str, Any]:
        return _group_doc(ROOT_ATTR, {"format_version": self.format_version, "written_by": self.written_by,
                                      "codecs": self.codecs, "tasks": dict(self.tasks)})

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None, where: str) -> StoreDoc:
        """Validate a root document (refusing newer formats); ``where`` names the store in errors."""
        if doc is None:
            raise NotAFisherStoreError(
                f"{where!r} is not a fisherstore store (no zarr.json at its root). Check the path, or "
                "open it with mode='a' or 'w' to create a store there."
            )
        body = node_attr(doc, ROOT_ATTR)
        if doc.get("node_type") != "group" or not isinstance(body, dict) or "format_version" not in body:
            raise NotAFisherStoreError(
                f"{where!r} holds a Zarr node but not a fisherstore store (its zarr.json has no "
                f"'{ROOT_ATTR}' attribute). Point fisherstore.open at the store's root directory."
            )
        version = body["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{where!r} was written by {body.get('written_by', 'a newer fisherstore')} with format "
                f"version {version}; this fisherstore reads format versions up to {FORMAT_VERSION}. "
                "Upgrade fisherstore (pip install -U fisherstore) to read it."
            )
        return cls(version, body.get("written_by"), body.get("codecs") or {}, dict(body.get("tasks") or {}))


# -- the task manifest -----------------------------------------------------------------------
@dataclass(frozen=True)
class ParamEntry:
    """One parameter in a task manifest: where its state lives and at which step."""

    key: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    layout: ParamLayout | None
    decay: float
    generation: int | None = None  # None: never flushed, all zeros
    t_last: int = 0
    nonfinite_skipped: int = 0
    updates: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "shape": list(self.shape),
            "chunks": list(self.chunks),
            "layout": self.layout.to_dict() if self.layout else None,
            "decay": self.decay,
            "generation": self.generation,
            "t_last": self.t_last,
            "nonfinite_skipped": self.nonfinite_skipped,
            "updates": self.updates,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], layouts: dict[str, ParamLayout] | None = None) -> ParamEntry:
        """Parse an entry; ``layouts`` caches parsed layouts (a model has a handful of distinct ones)."""
        lay = d.get("layout")
        layout = None
        if lay:
            k = repr(sorted(lay.items()))
            layout = layouts.get(k) if layouts is not None else None
            if layout is None:
                layout = ParamLayout.from_dict(lay)
                if layouts is not None:
                    layouts[k] = layout
        return cls(
            key=d["key"],
            shape=tuple(d["shape"]),
            chunks=tuple(d["chunks"]),
            layout=layout,
            decay=d["decay"],
            generation=d.get("generation"),
            t_last=d.get("t_last", 0),
            nonfinite_skipped=d.get("nonfinite_skipped", 0),
            updates=d.get("updates", 0),
        )


@dataclass(frozen=True)
class TaskManifest:
    """A task's committed state: step, tokens, commit counter, info and every parameter's entry."""

    name: str
    step: int = 0
    tokens_seen: int = 0
    commit: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # estimator, model, user
    params: dict[str, ParamEntry] = field(default_factory=dict)

    def to_doc(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "commit": self.commit,
            "params": {n: e.to_dict() for n, e in self.params.items()},
        }
        body.update(self.info)
        return _group_doc(TASK_ATTR, body)

    @staticmethod
    def commit_of(doc: dict[str, Any] | None) -> int | None:
        """The commit counter of a manifest document, without parsing the rest (None if unreadable)."""
        body = node_attr(doc, TASK_ATTR)
        return body.get("commit", 0) if isinstance(body, dict) else None

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None, name: str, key: str) -> TaskManifest:
        body = node_attr(doc, TASK_ATTR)
        if not isinstance(body, dict):
            raise FisherStoreError(
                f"task {name!r} is listed in the store root but its manifest {doc_key(key)} is "
                "missing or damaged. Run `fisherstore verify` on the store."
            )
        layouts: dict[str, ParamLayout] = {}
        return cls(
            name=name,
            step=body["step"],
            tokens_seen=body.get("tokens_seen", 0),
            commit=body.get("commit", 0),
            info={k: body[k] for k in _INFO_KEYS if body.get(k) is not None},
            params={n: ParamEntry.from_dict(e, layouts) for n, e in body.get("params", {}).items()},
        )


# -- parameter nodes and arrays --------------------------------------------------------------
def param_doc(name: str, shape: Sequence[int], layout: ParamLayout | None) -> dict[str, Any]:
    """The document of a parameter's node (the group holding its generations)."""
    return _group_doc(PARAM_ATTR, {"name": name, "shape": list(shape), "layout": layout.to_dict() if layout else None})


def array_attributes(name: str, layout: ParamLayout | None) -> dict[str, Any]:
    """The attributes every generation array carries, so a plain Zarr reader sees the layout."""
    return {PARAM_ATTR: {"name": name, "layout": layout.to_dict() if layout else None}}
