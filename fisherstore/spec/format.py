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

The root document (:class:`StoreDoc`) and the parameter node's document are built and
parsed here; task manifests in :mod:`.manifest`; their fields are validated by :mod:`.fields`.
"""

from __future__ import annotations

import math
import re
import uuid as uuid_mod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np

from ..errors import FormatVersionError, InvalidArgumentError, NotAFisherStoreError
from .fields import as_dict, damaged, key_field
from .layout import ParamLayout

__all__ = [
    "FORMAT_VERSION",
    "required_version",
    "ROOT_ATTR",
    "TASK_ATTR",
    "PARAM_ATTR",
    "DOC",
    "encode_name",
    "encoded",
    "doc_key",
    "gen_name",
    "parse_gen",
    "generation_key",
    "chunk_key",
    "StoreDoc",
    "sample_key",
    "parse_segment",
    "number_base",
    "param_doc",
    "array_attributes",
    "node_attr",
    "json_value",
    "group_doc",
    "is_pending",
    "sample_attributes",
]

#: Bumped on any change an older reader would misread (docs/format.md, "Version rules").
FORMAT_VERSION = 4
#: Version 3 added layout kinds and fusions (below); version 4 the estimators "adam" and "anchor" and
#: the true Fisher (``fisher_type`` "mc"/"exact"), which an older reader would take for an empirical Fisher.
LAYOUT_FORMAT_VERSION = 3
#: Task fields that need version 4: (field, values an older reader understands).
V4_INFO = (("estimator", (None, "micro_batch", "batch")), ("fisher_type", (None, "empirical")))
#: What a store holding per-sample segments is written as (version 2 added them).
SAMPLES_FORMAT_VERSION = 2
#: Layout kinds and fusions added in version 3: an older reader would misplace their head blocks.
V3_KINDS = ("kv", "latent")
V3_FUSED = ("grouped", "sharded")
#: What a store without per-sample arrays is written as, so older fisherstores still open it.
BASE_FORMAT_VERSION = 1
ROOT_ATTR = "fisherstore"
TASK_ATTR = "fisherstore_task"
PARAM_ATTR = "fisherstore_param"
#: The metadata document of every node (Zarr v3).
DOC = "zarr.json"

_GEN_RE = re.compile(r"^g(\d{8})$")
_SEG_RE = re.compile(r"^s(\d{8})$")
#: Names a node may not take: Zarr's, the documents' and the writer lock's (escaped by encode_name).
_RESERVED = (".", "..", DOC, ".fisherstore.lock")


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
    try:
        seg = quote(name, safe="._-~+=,@")
    except UnicodeEncodeError:
        raise InvalidArgumentError(
            f"{what} {name!r} is not valid Unicode (it holds a lone surrogate); decode it properly first"
        ) from None
    if seg in _RESERVED or seg.startswith("__") or seg.startswith("g") and _GEN_RE.match(seg):
        seg = "%" + format(ord(seg[0]), "02X") + seg[1:]
    if len(seg.encode()) > 240:
        raise InvalidArgumentError(f"{what} {name[:40]!r}... is too long to store ({len(seg)} bytes encoded; max 240)")
    return seg


def encoded(name: str, where: str, what: str) -> str:
    """``encode_name(name)`` for a name read from document ``where``: one that cannot be stored is damage."""
    try:
        return encode_name(name, what)
    except InvalidArgumentError as e:
        raise damaged(where, str(e)) from None


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


def number_base(uuid: str | None) -> int:
    """Where a store on object storage numbers its generations and sample segments from (its uuid's).

    A store replaced by ``mode="w"`` gets a new uuid, so its arrays get other numbers than
    the old store's: a reader that outlived the replacement misses on every key it knew,
    and learns of the replacement on that miss, with no extra request per read. Below
    10⁷, so eight digits last 9·10⁷ more generations. (A local store numbers from 0: its
    readers check the root document's identity after every read, a ``stat``.)
    """
    return int(uuid[:8], 16) % 10**7 if uuid else 0


def sample_key(param_key: str, segment: int) -> str:
    """The per-sample gradient array of one parameter in sample segment ``segment``."""
    return f"{param_key}/s{segment:08d}"


def parse_segment(seg: str) -> int | None:
    m = _SEG_RE.match(seg)
    return int(m.group(1)) if m else None


def chunk_key(coords: Sequence[int]) -> str:
    """The key of a chunk inside its array (Zarr v3 default encoding, separator ``/``)."""
    return "/".join(["c", *map(str, coords)])


def group_doc(attr: str, body: dict[str, Any]) -> dict[str, Any]:
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
    """The root document: format version, writer, identity, codec chain and the task directory.

    ``uuid`` names this store: a store replaced by ``mode="w"`` gets a new one, so a reader
    that outlives the replacement can tell (:class:`~fisherstore.errors.StoreReplacedError`).
    """

    format_version: int
    written_by: str | None
    codecs: dict[str, Any]
    tasks: dict[str, str] = field(default_factory=dict)  # task name -> its node key
    uuid: str | None = None

    @classmethod
    def new(cls, library_version: str, codecs: dict[str, Any]) -> StoreDoc:
        return cls(BASE_FORMAT_VERSION, f"fisherstore {library_version}", codecs, {}, uuid_mod.uuid4().hex)

    def to_doc(self) -> dict[str, Any]:
        body = {"format_version": self.format_version, "written_by": self.written_by, "codecs": self.codecs,
                "tasks": dict(self.tasks)}
        if self.uuid is not None:
            body["uuid"] = self.uuid
        return group_doc(ROOT_ATTR, body)

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
        if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{where!r} was written by {body.get('written_by', 'a newer fisherstore')} with format "
                f"version {version}; this fisherstore reads format versions up to {FORMAT_VERSION}. "
                "Upgrade fisherstore (pip install -U fisherstore) to read it."
            )
        doc_where = f"the root document of {where!r}"
        tasks = as_dict(body.get("tasks") or {}, doc_where, "tasks")
        for name, key in tasks.items():
            key_field(key, encoded(name, doc_where, "task name"), doc_where, f"tasks[{name!r}]")
        codecs = as_dict(body.get("codecs") or {}, doc_where, "codecs")
        uuid = body.get("uuid")
        if uuid is not None and not isinstance(uuid, str):
            raise damaged(doc_where, f"uuid = {uuid!r} is not a string")
        written_by = body.get("written_by")
        return cls(version, written_by if isinstance(written_by, str) else None, codecs, dict(tasks), uuid)


def json_value(value: Any, where: str) -> Any:
    """``value`` as plain JSON (numpy scalars and tuples become numbers and lists), or an error naming it.

    A manifest must always serialise: a value refused here is never kept, so one bad
    ``set_metadata`` cannot make every later flush fail.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"{where} is {value!r}; JSON metadata must be finite (store None instead)")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidArgumentError(f"{where} has a key {k!r} that is not a string; JSON keys are strings")
            out[k] = json_value(v, f"{where}[{k!r}]")
        return out
    raise InvalidArgumentError(
        f"{where} is a {type(value).__module__}.{type(value).__name__}, which JSON metadata cannot hold; pass a "
        "number, string, bool, None, list or dict (e.g. str(dtype) for a dtype)"
    )


# -- parameter nodes and arrays --------------------------------------------------------------
def param_doc(name: str, shape: Sequence[int], layout: ParamLayout | None) -> dict[str, Any]:
    """The document of a parameter's node (the group holding its generations)."""
    return group_doc(PARAM_ATTR, {"name": name, "shape": list(shape), "layout": layout.to_dict() if layout else None})


def required_version(layouts: Sequence[ParamLayout | None], samples: bool = False,
                     infos: Sequence[dict[str, Any]] = ()) -> int:
    """The lowest format version that holds these layouts (and per-sample segments): what a commit raises a store to.

    A store stays at the lowest version its contents need, so older fisherstores keep
    opening what they can read; one holding a version-3 layout (MLA's ``kv``/``latent``,
    Falcon's ``grouped``, CodeGen's ``sharded``) is refused by them with
    :class:`~fisherstore.FormatVersionError` instead of read through the wrong rows.
    A task whose ``infos`` (its manifest's estimator and fisher_type) an older reader would
    take for an empirical Fisher (an Adam import, an anchor, the true Fisher) needs version 4.
    Usage: ``required_version([layout], samples=True, infos=[{"estimator": "adam"}])``.
    """
    for info in infos:
        if any(info.get(k) not in old for k, old in V4_INFO):
            return FORMAT_VERSION
    v = SAMPLES_FORMAT_VERSION if samples else BASE_FORMAT_VERSION
    for lay in layouts:
        if lay is not None and (lay.kind in V3_KINDS or lay.fused in V3_FUSED):
            return LAYOUT_FORMAT_VERSION
    return v


def array_attributes(name: str, layout: ParamLayout | None, pending: bool = False) -> dict[str, Any]:
    """The attributes every generation array carries, so a plain Zarr reader sees the layout.

    ``pending``: written before any commit names the generation; the writer drops the mark
    once one does, so a plain listing never takes uncommitted work for live data.
    """
    body: dict[str, Any] = {"name": name, "layout": layout.to_dict() if layout else None}
    if pending:
        body["pending"] = True
    return {PARAM_ATTR: body}


def sample_attributes(name: str, layout: ParamLayout | None, pending: bool = False) -> dict[str, Any]:
    """The attributes of a per-sample gradient array: the parameter's, and what axis 0 holds."""
    attrs = array_attributes(name, layout, pending)
    attrs[PARAM_ATTR]["axis0"] = "sample"
    return attrs


def is_pending(doc: dict[str, Any] | None) -> bool:
    """Whether an array's header carries the pending mark of an uncommitted generation."""
    body = node_attr(doc, PARAM_ATTR)
    return isinstance(body, dict) and bool(body.get("pending"))
