"""Task manifests, as a spec: the typed commit documents of a store, parsed and validated. No I/O.

A task's manifest (``<task>/zarr.json``, attribute ``fisherstore_task``) is the task's
commit point: it names the live generation of every parameter's EMA state
(:class:`ParamEntry`) and the committed per-sample gradient segments
(:class:`SampleSegment`). Everything a reader would misread is refused here with a
:class:`~fisherstore.errors.CorruptStoreError` naming the document and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptStoreError, LayoutError
from .fields import as_dict, as_int, as_ints, damaged, key_field
from .format import TASK_ATTR, doc_key, encoded, group_doc, node_attr
from .layout import ParamLayout

__all__ = ["ParamEntry", "SampleSegment", "TaskManifest", "SAMPLE_DTYPES", "ESTIMATORS", "FISHER_TYPES"]

#: The task manifest's fields besides the parameters and samples; anything else in it is user info.
_INFO_KEYS = ("estimator", "model", "user", "fisher_type", "mc_samples")
#: What a step's ``x`` is (docs/format.md, docs/design.md "What x is"); a manifest may also leave it unset.
#: ``"adam"``: an imported Adam ``exp_avg_sq`` ((∇ mean loss)², β = β2); ``"anchor"``: a task holding
#: weights θ* (an EWC anchor), not a Fisher. Both are format version 4.
ESTIMATORS = ("micro_batch", "batch", "adam", "anchor")
#: Which labels the squared gradients are of: the data's (``"empirical"``), drawn from the model's
#: predictive distribution (``"mc"``), or its exact expectation over every label (``"exact"``).
FISHER_TYPES = ("empirical", "mc", "exact")
#: Element types of per-sample gradient arrays (Zarr v3 data types; bfloat16 is the registered extension).
SAMPLE_DTYPES = ("float32", "float16", "bfloat16")

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
    def from_dict(cls, d: Any, name: str, task_key: str, step: int, where: str,
                  layouts: dict[str, ParamLayout] | None = None) -> ParamEntry:
        """Parse and validate parameter ``name``'s entry of a manifest that is at ``step``.

        ``layouts`` caches parsed layouts (a model has a handful of distinct ones). Raises
        :class:`CorruptStoreError` naming the document and the field for anything a
        reader would misread.
        """
        f = f"params[{name!r}]"
        d = as_dict(d, where, f)
        key = key_field(d.get("key"), f"{task_key}/{encoded(name, where, 'parameter name')}", where, f"{f}.key")
        shape = as_ints(d.get("shape"), where, f"{f}.shape", 0)
        chunks = as_ints(d.get("chunks"), where, f"{f}.chunks", 1)
        if len(chunks) != len(shape):
            raise damaged(where, f"{f}.chunks {chunks} do not fit shape {shape}")
        decay = d.get("decay")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise damaged(where, f"{f}.decay = {decay!r} is not a number in (0, 1)")
        gen = d.get("generation")
        if gen is not None:
            as_int(gen, where, f"{f}.generation", 1)
        t_last = as_int(d.get("t_last", 0), where, f"{f}.t_last", 1 if gen is not None else 0)
        if t_last > step:
            raise damaged(where, f"{f}.t_last = {t_last} is after the task's step {step}")
        lay = as_dict(d.get("layout"), where, f"{f}.layout", optional=True)
        layout = None
        if lay:
            k = repr(sorted(lay.items()))
            layout = layouts.get(k) if layouts is not None else None
            if layout is None:
                try:
                    layout = ParamLayout.from_dict(lay)
                    layout.validate_shape(shape, name)
                except (LayoutError, TypeError) as e:
                    raise damaged(where, f"{f}.layout: {e}") from None
                if layouts is not None:
                    layouts[k] = layout
            else:
                try:
                    layout.validate_shape(shape, name)
                except LayoutError as e:
                    raise damaged(where, f"{f}.layout: {e}") from None
        return cls(
            key=key,
            shape=shape,
            chunks=chunks,
            layout=layout,
            decay=float(decay),
            generation=gen,
            t_last=t_last,
            nonfinite_skipped=as_int(d.get("nonfinite_skipped", 0), where, f"{f}.nonfinite_skipped"),
            updates=as_int(d.get("updates", 0), where, f"{f}.updates"),
        )


@dataclass(frozen=True)
class SampleSegment:
    """One committed batch of per-sample gradients: ``n`` samples of each of ``params``.

    Each parameter's gradients of the segment are one array ``<param key>/s<id:08d>`` of
    shape ``[n, *param_shape]`` in dtype ``dtype``, chunked one sample by one head block.
    ``tokens[i]`` is sample i's token count T_i, ``ids[i]`` its stable id (unique per task).
    """

    id: int
    n: int
    tokens: tuple[int, ...]
    ids: tuple[str, ...]
    dtype: str
    params: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "n": self.n, "tokens": list(self.tokens), "ids": list(self.ids), "dtype": self.dtype,
                "params": list(self.params)}

    @classmethod
    def from_dict(cls, d: Any, index: int, params: dict[str, Any], where: str) -> SampleSegment:
        f = f"samples[{index}]"
        d = as_dict(d, where, f)
        n = as_int(d.get("n"), where, f"{f}.n", 1)
        tokens = as_ints(d.get("tokens"), where, f"{f}.tokens", 0)
        ids = d.get("ids")
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise damaged(where, f"{f}.ids is not a list of strings")
        names = d.get("params")
        if not (isinstance(names, list) and names and all(isinstance(p, str) and p in params for p in names)):
            raise damaged(where, f"{f}.params must list parameters of the task, got {names!r}")
        if len(tokens) != n or len(ids) != n or len(set(ids)) != n:
            raise damaged(where, f"{f} has n = {n} but {len(tokens)} token counts and {len(set(ids))} distinct ids")
        if d.get("dtype") not in SAMPLE_DTYPES:
            raise damaged(where, f"{f}.dtype = {d.get('dtype')!r} is not one of {SAMPLE_DTYPES}")
        return cls(as_int(d.get("id"), where, f"{f}.id", 1), n, tokens, tuple(ids), d["dtype"], tuple(names))


@dataclass(frozen=True)
class TaskManifest:
    """A task's committed state: step, tokens, commit counter, info and every parameter's entry."""

    name: str
    step: int = 0
    tokens_seen: int = 0
    commit: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # estimator, model, user
    params: dict[str, ParamEntry] = field(default_factory=dict)
    samples: tuple[SampleSegment, ...] = ()

    def to_doc(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "commit": self.commit,
            "params": {n: e.to_dict() for n, e in self.params.items()},
        }
        if self.samples:
            body["samples"] = [s.to_dict() for s in self.samples]
        body.update(self.info)
        return group_doc(TASK_ATTR, body)

    @staticmethod
    def commit_of(doc: dict[str, Any] | None) -> int | None:
        """The commit counter of a manifest document, without parsing the rest (None if unreadable)."""
        body = node_attr(doc, TASK_ATTR)
        return body.get("commit", 0) if isinstance(body, dict) else None

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None, name: str, key: str) -> TaskManifest:
        """Parse and validate the manifest of task ``name`` (at node ``key``)."""
        where = f"the manifest of task {name!r} ({doc_key(key)})"
        body = node_attr(doc, TASK_ATTR)
        if not isinstance(body, dict):
            raise CorruptStoreError(
                f"task {name!r} is listed in the store root but its manifest {doc_key(key)} is "
                "missing or damaged. Run `fisherstore verify` on the store."
            )
        step = as_int(body.get("step"), where, "step")
        info = {k: body[k] for k in _INFO_KEYS if body.get(k) is not None}
        if info.get("estimator") not in (*ESTIMATORS, None):
            raise damaged(where, f"estimator = {info['estimator']!r} is not one of {ESTIMATORS}")
        for k in ("model", "user"):
            as_dict(info.get(k), where, k, optional=True)
        if info.get("fisher_type") not in (*FISHER_TYPES, None):
            raise damaged(where, f"fisher_type = {info['fisher_type']!r} is not one of {FISHER_TYPES}")
        if "mc_samples" in info:
            as_int(info["mc_samples"], where, "mc_samples")
        layouts: dict[str, ParamLayout] = {}
        params = as_dict(body.get("params", {}), where, "params")
        raw = body.get("samples", [])
        if not isinstance(raw, list):
            raise damaged(where, f"samples is {type(raw).__name__}, not a list")
        samples = tuple(SampleSegment.from_dict(d, i, params, where) for i, d in enumerate(raw))
        seen: set[str] = set()
        for seg in samples:
            if seen & set(seg.ids):
                raise damaged(where, f"sample id {sorted(seen & set(seg.ids))[0]!r} appears in two segments")
            seen.update(seg.ids)
        if len({seg.id for seg in samples}) != len(samples):
            raise damaged(where, "two sample segments share one number")
        return cls(
            name=name,
            step=step,
            tokens_seen=as_int(body.get("tokens_seen", 0), where, "tokens_seen"),
            commit=as_int(body.get("commit", 0), where, "commit"),
            info=info,
            params={n: ParamEntry.from_dict(e, n, key, step, where, layouts) for n, e in params.items()},
            samples=samples,
        )


