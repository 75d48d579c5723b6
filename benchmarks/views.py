"""Is a Dask per-head reduction over a whole task within 1.5x of ``store.iter_heads``? Measure it.

One store holding a LLaMA-2-7B-shaped attention Fisher (``--layers`` decoder layers of
q/k/v/o, head-chunked: 2 MiB per head block), one task, committed to disk. Every
competitor computes the Fisher mass of every distinct head block (float64 sums), page
cache warm (each is run once before it is timed), ``--repeat`` times; the median counts.

* ``iter_heads``: ``for name, h, b, blk in store.iter_heads(task)`` (4 read-ahead workers).
* ``dask block_sums``: ``dask.compute(*[views.block_sums(store, task, n) for n in names])``,
  a chunk-sum over ``store.to_dask`` (threaded scheduler, 4 workers).
* ``xarray sum, then groupby in RAM``: ``to_xarray(task)[n]["fisher"].sum(<other axis>)`` computed,
  then ``.groupby("head").sum()`` on the small result; ``xarray lazy groupby``: the same, all lazy.
* ``dask from_zarr x scale``: what the issue measured: Dask over the raw generation arrays
  (``da.from_zarr``), with the readout scale applied by hand.

    python -m benchmarks.views --layers 2 --out benchmarks/results/views
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import dask
import dask.array as da
import numpy as np
import torch

import fisherstore
from fisherstore.views import block_sums

from .workloads import workload

WORKERS = 4


def build(path: str, layers: int, backend: str) -> tuple[list[str], int]:
    params = workload("llama2-7b-attn", layers)
    g = torch.Generator().manual_seed(0)
    with fisherstore.open(path, mode="w", backend=backend) as s:
        for p in params:
            s.create("t", p.name, p.shape, p.layout)
        for _ in range(2):
            s.update("t", {p.name: torch.rand(p.shape, generator=g) for p in params})
    return [p.name for p in params], sum(p.nbytes for p in params)


def iter_heads(s: fisherstore.FisherStore) -> dict:
    return {(n, h, b): float(blk.sum(dtype=torch.float64)) for n, h, b, blk in s.iter_heads("t", workers=WORKERS)}


def dask_block_sums(s: fisherstore.FisherStore, names: list[str]) -> list[np.ndarray]:
    with dask.config.set(scheduler="threads", num_workers=WORKERS):
        return list(dask.compute(*[block_sums(s, "t", n) for n in names]))


def _xr_sums(s: fisherstore.FisherStore, names: list[str]) -> list:
    tree = s.to_xarray("t", names)
    out = []
    for n in names:
        x = tree[n]["fisher"]
        out.append(x.sum(next(d for d in x.dims if not d.endswith("_heads")), dtype=np.float64))
    return out


def xarray_sum_then_groupby(s: fisherstore.FisherStore, names: list[str]) -> list[np.ndarray]:
    """The idiom docs/views.md recommends: reduce lazily to the head axis, group the small result in RAM."""
    with dask.config.set(scheduler="threads", num_workers=WORKERS):
        sums = dask.compute(*_xr_sums(s, names))
    return [np.asarray(x.groupby("head").sum()) for x in sums]


def xarray_lazy_groupby(s: fisherstore.FisherStore, names: list[str]) -> list[np.ndarray]:
    with dask.config.set(scheduler="threads", num_workers=WORKERS):
        return [np.asarray(v) for v in dask.compute(*[x.groupby("head").sum() for x in _xr_sums(s, names)])]


def dask_from_zarr(s: fisherstore.FisherStore, names: list[str]) -> list[np.ndarray]:
    import zarr

    doc = zarr.open_group(s.path, path="t", mode="r").attrs["fisherstore_task"]  # as a plain reader finds it
    step = doc["step"]
    arrays = []
    for n in names:
        e = doc["params"][n]
        scale = e["decay"] ** (step - e["t_last"]) / (1 - e["decay"] ** step)
        x = da.from_zarr(s.path, component=f"{e['key']}/g{e['generation']:08d}") * np.float32(scale)
        ones = tuple((1,) * len(c) for c in x.chunks)
        arrays.append(x.map_blocks(lambda b: np.full((1,) * b.ndim, b.sum(dtype=np.float64)), chunks=ones,
                                   dtype=np.float64))
    with dask.config.set(scheduler="threads", num_workers=WORKERS):
        return list(dask.compute(*arrays))


def timed(fn, repeat: int) -> tuple[float, list[float], object]:
    result = fn()  # warm: page cache, handles, imports
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backend", default="zarr", choices=("zarr", "tensorstore"))
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="fisherstore-views-")
    path = os.path.join(root, "s")
    names, nbytes = build(path, args.layers, args.backend)
    rows = {}
    with fisherstore.open(path, mode="r", backend=args.backend) as s:
        base_t, base_all, ref = timed(lambda: iter_heads(s), args.repeat)
        rows["iter_heads"] = (base_t, base_all)
        for label, fn in (("dask block_sums", lambda: dask_block_sums(s, names)),
                          ("xarray sum, then groupby in RAM", lambda: xarray_sum_then_groupby(s, names)),
                          ("xarray lazy groupby", lambda: xarray_lazy_groupby(s, names)),
                          ("dask from_zarr x scale", lambda: dask_from_zarr(s, names))):
            t, all_t, res = timed(fn, args.repeat)
            got = np.concatenate([np.ravel(r) for r in res])
            want = np.asarray(sorted(ref.values()))
            err = float(np.max(np.abs(np.sort(got) - want) / want))
            assert err < 1e-5, (label, err)  # every competitor computed the same masses
            rows[label] = (t, all_t)
    result = {"layers": args.layers, "backend": args.backend, "bytes": nbytes, "head_blocks": len(ref),
              "workers": WORKERS, "repeat": args.repeat,
              "rows": {k: {"median_s": t, "all_s": a, "GB_per_s": nbytes / t / 1e9, "x_iter_heads": t / base_t}
                       for k, (t, a) in rows.items()}}
    lines = ["# Per-head Fisher mass over a whole task: Dask/xarray vs iter_heads\n",
             f"`python -m benchmarks.views --layers {args.layers} --backend {args.backend}`: LLaMA-2-7B attention, "
             f"{args.layers} layers, {nbytes / 2**30:.2f} GiB, {len(ref)} head blocks of 2 MiB, page cache warm, "
             f"{WORKERS} workers, median of {args.repeat}.\n",
             "| competitor | s | GB/s | x iter_heads |", "|---|---|---|---|"]
    for k, r in result["rows"].items():
        lines.append(f"| {k} | {r['median_s']:.3f} | {r['GB_per_s']:.2f} | {r['x_iter_heads']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
