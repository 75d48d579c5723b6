"""Batches as the collector takes them: a mapping of name -> tensor whose first dimension is the sequences.

Usage::

    rows = batch_rows(batch)                       # how many sequences, or a named error
    micro = take_rows(batch, slice(0, 4))          # the first micro-batch
    check_same_batch(group, batch)                 # every rank holds the same batch (data_parallel=False)
    fingerprint(batch)                             # [(key, digest)]: what "the same batch" means
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping, Set
from typing import Any

import numpy as np
import torch

from ..engine.dist import RankGroup
from ..errors import InvalidArgumentError

__all__ = ["batch_rows", "take_rows", "on_device", "fingerprint", "changed_keys", "check_same_batch"]


def batch_rows(batch: Mapping[str, Any]) -> int:
    """The number of sequences in ``batch``: the first dimension every tensor in it shares."""
    if not isinstance(batch, Mapping):
        raise InvalidArgumentError(
            f"the batch must be a mapping of name -> tensor (input_ids, attention_mask, labels, ...), got "
            f"{type(batch).__name__}"
        )
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim >= 1}
    if not sizes:
        raise InvalidArgumentError(f"the batch holds no tensors; it has {sorted(batch)}")
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{k}: {n}" for k, n in sizes.items())
        raise InvalidArgumentError(
            f"the batch's tensors disagree on the number of sequences ({shown}); every tensor's first "
            "dimension must be the batch size"
        )
    return next(iter(sizes.values()))


def take_rows(batch: Mapping[str, Any], rows: slice) -> dict[str, Any]:
    """Rows ``rows`` of every tensor in ``batch`` (other values as they are)."""
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.ndim >= 1 else v for k, v in batch.items()}


def on_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    batch_rows(batch)  # a batch that is not a mapping of tensors fails here, with its reason
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fingerprint(batch: Any) -> list[tuple[str, str]]:
    """A digest of every value of ``batch``, per key: equal batches, equal prints; any changed byte, another.

    Usage: ``fingerprint(batch) == fingerprint(again)``; :func:`changed_keys` names what differs.

    Each top-level key gets a BLAKE2b digest of its value: a tensor's (or numpy array's) dtype,
    shape and contiguous bytes, so float tensors count as much as token ids (per-token
    weights, ``inputs_embeds``, ``pixel_values``); nested mappings, lists, tuples and sets,
    strings, bytes, numbers and None by value; any other object by its pickle (by its type
    alone if it cannot be pickled). A tensor on a GPU is copied to the host to be hashed, a
    copy the size of the batch's inputs. A batch that is not a mapping gets one digest, under
    the key ``""``.
    """
    if not isinstance(batch, Mapping):
        return [("", _digest(batch))]
    return [(_key(k), _digest(batch[k])) for k in sorted(batch, key=_key)]


def changed_keys(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> list[str]:
    """The keys whose values differ between two fingerprints (keys added or removed too), sorted."""
    da, db = dict(a), dict(b)
    return sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))


def _key(k: Any) -> str:
    return k if isinstance(k, str) else repr(k)


def _digest(value: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, v: Any) -> None:
    """Feed ``v`` to ``h``, each part tagged with its kind and length so different values never feed the same bytes."""
    if isinstance(v, torch.Tensor):
        t = v.detach()
        if t.layout != torch.strided:  # sparse: the values it stands for
            t = t.to_dense()
        # a GPU tensor is copied to the host here; resolve_* make lazily conjugated/negated views concrete
        t = t.cpu().resolve_conj().resolve_neg().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # bfloat16 and bool too: the raw bytes
    elif isinstance(v, np.ndarray) and not v.dtype.hasobject:
        h.update(f"ndarray:{v.dtype.str}:{v.shape}:".encode())
        h.update(np.ascontiguousarray(v).reshape(-1).view(np.uint8))
    elif isinstance(v, np.ndarray):  # object arrays hold pointers: hash what they point to
        h.update(f"objects:{v.shape}:".encode())
        _feed(h, v.tolist())
    elif isinstance(v, np.generic):
        _feed(h, np.asarray(v))
    elif v is None or isinstance(v, (bool, int, float, complex)):
        r = f"{type(v).__name__}:{v!r}"  # repr of a float round-trips: equal reprs, equal floats
        h.update(f"{len(r)}:{r}".encode())
    elif isinstance(v, (str, bytes, bytearray)):
        data = v.encode() if isinstance(v, str) else bytes(v)
        h.update(f"{type(v).__name__}:{len(data)}:".encode())
        h.update(data)
    elif isinstance(v, Mapping):
        h.update(f"mapping:{len(v)}:".encode())
        for k in sorted(v, key=_key):
            _feed(h, _key(k))
            _feed(h, v[k])
    elif isinstance(v, (list, tuple)):
        h.update(f"{'list' if isinstance(v, list) else 'tuple'}:{len(v)}:".encode())
        for x in v:
            _feed(h, x)
    elif isinstance(v, Set):  # iteration order is not the value: hash the sorted element digests
        h.update(f"set:{len(v)}:".encode())
        for d in sorted(_digest(x) for x in v):
            h.update(d.encode())
    else:
        try:
            data = pickle.dumps(v, protocol=4)
        except Exception:  # an object that cannot be pickled: its type is all that can be compared
            data = b""
        name = f"{type(v).__module__}.{type(v).__qualname__}"
        h.update(f"object:{name}:{len(data)}:".encode())
        h.update(data)


def check_same_batch(group: RankGroup, batch: Mapping[str, Any]) -> None:
    """With ``data_parallel=False`` every rank must see the same batch; refuse one that does not.

    The ranks compare a :func:`fingerprint` of every value of the batch (token ids,
    masks, labels, float weights, ...), so a DDP job that set ``data_parallel=False``
    fails instead of writing each parameter from its owner's batch alone.
    """
    views = group.all_gather(fingerprint(batch))
    bad = [r for r, v in enumerate(views) if v != views[0]]
    if bad:
        keys = ", ".join(repr(k) for k in changed_keys(views[0], views[bad[0]]))
        raise InvalidArgumentError(
            f"data_parallel=False means every rank sees the same batch, but rank {bad[0]}'s batch differs from "
            f"rank 0's (in {keys}). For ranks that see different batches (DDP) pass data_parallel=True (the default with a "
            "group), so every rank's gradients count"
        )
