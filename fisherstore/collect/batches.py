"""Batches as the collector takes them: a mapping of name -> tensor whose first dimension is the sequences.

Usage::

    rows = batch_rows(batch)                       # how many sequences, or a named error
    micro = take_rows(batch, slice(0, 4))          # the first micro-batch
    check_same_batch(group, batch)                 # every rank holds the same batch (data_parallel=False)
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch

from ..engine.dist import RankGroup
from ..errors import InvalidArgumentError

__all__ = ["batch_rows", "take_rows", "on_device", "fingerprint", "check_same_batch"]


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


def fingerprint(batch: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...], int]]:
    """A checksum of the batch's integer tensors (token ids, masks, labels): equal batches, equal prints."""
    fp = []
    for k in sorted(batch):
        v = batch[k]
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex():
            data = v.detach().cpu().contiguous()
            fp.append((k, tuple(v.shape), zlib.crc32(data.numpy().tobytes())))
    return fp


def check_same_batch(group: RankGroup, batch: Mapping[str, Any]) -> None:
    """With ``data_parallel=False`` every rank must see the same batch; refuse one that does not.

    The ranks compare a checksum of the batch's integer tensors (token ids, masks, labels),
    so a DDP job that set ``data_parallel=False`` fails instead of writing each parameter
    from its owner's batch alone.
    """
    views = group.all_gather(fingerprint(batch))
    bad = [r for r, v in enumerate(views) if v != views[0]]
    if bad:
        raise InvalidArgumentError(
            f"data_parallel=False means every rank sees the same batch, but rank {bad[0]}'s batch differs from "
            "rank 0's. For ranks that see different batches (DDP) pass data_parallel=True (the default with a "
            "group), so every rank's gradients count"
        )
