"""What ``fisherstore info`` knows of a store, as JSON-ready data (the command prints it, or dumps it with --json).

Usage: ``store_info("fisher.zarr")["tasks"]["math"]["params"][name]["chunk_bytes_on_disk"]``.
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["store_info"]


def store_info(path: str, backend: str = "zarr") -> dict[str, Any]:
    """A JSON-ready summary of a store: tasks, parameters, steps, bytes and compression."""
    from ..store.api import open as open_store  # on use: `fisherstore --help` imports no store

    with open_store(path, mode="r", backend=backend) as s:
        meta = s.metadata()
        info: dict[str, Any] = {"path": path if "://" in path else os.path.abspath(path), "format_version": meta["format_version"],
                                "written_by": meta["written_by"], "codecs": meta["codecs"], "tasks": {}}
        total_logical = total_disk = 0
        for task in s.tasks():
            tm = s.metadata(task)
            params = {}
            for name, p in tm["params"].items():
                logical = 4 * math.prod(p["shape"])
                disk = s.nbytes_on_disk(task, name, chunks_only=True, committed=True, kind="fisher")
                params[name] = {"shape": list(p["shape"]), "chunks": list(p["chunks"]),
                                "layout": p["layout"].to_dict() if p["layout"] else None, "t_last": p["t_last"],
                                "updates": p["updates"], "nonfinite_skipped": p["nonfinite_skipped"],
                                "bytes": logical, "chunk_bytes_on_disk": disk}
                if disk:  # the ratio compares what is on disk with what it holds (never-flushed: nothing)
                    total_logical += logical
                    total_disk += disk
            names = s.sample_params(task)
            samples = {"n": len(s.sample_ids(task)), "params": names,
                       "dtypes": sorted({str(s.samples(task, n).dtype).replace("torch.", "") for n in names}),
                       "bytes": sum(s.samples(task, n).shape.numel() * s.samples(task, n).dtype.itemsize
                                    for n in names)}
            info["tasks"][task] = {"step": tm["step"], "tokens_seen": tm["tokens_seen"],
                                   "estimator": tm["estimator"], "fisher_type": tm["fisher_type"],
                                   "mc_samples": tm["mc_samples"], "model": tm["model"], "params": params,
                                   "samples": samples}
        info["bytes"] = sum(p["bytes"] for t in info["tasks"].values() for p in t["params"].values())
        # What a reader sees: the committed generations. A writer's uncommitted work (and what a
        # crash left) is counted apart, so `info` during a flush never reports half a flush.
        info["bytes_on_disk"] = s.nbytes_on_disk(committed=True)
        info["other_bytes_on_disk"] = max(0, s.nbytes_on_disk() - info["bytes_on_disk"])
        info["compression_ratio"] = total_logical / total_disk if total_disk else None
    return info
