"""Icechunk as a third backend? Measure what it costs and what it gives, on a fisherstore workload.

One LLaMA-2-7B attention layer (q, k, v, o: 4 x 64 MiB fp32, one 2 MiB chunk per head
block, codecs bytes + crc32c as fisherstore writes them), two "flushes" (every array
rewritten, then committed), then head-block reads. Engines:

* ``zarr``: plain zarr-python LocalStore, a new array per flush (fisherstore's generations),
  the older deleted after the commit; the commit itself (a manifest rename) is not timed.
* ``fisherstore``: the real thing (``fisherstore.open(..., backend="zarr")``, ``update`` +
  ``flush``), reads through ``store.fisher(...).head(h, "Q")``.
* ``icechunk``: an Icechunk repository on the local filesystem; each flush writes the same
  arrays in a writable session and commits (one snapshot); reads at the latest snapshot and
  at the first one (time travel).

Run each engine in the environment that has it (Icechunk 2.x needs Python >= 3.12; 1.1.21
is the newest for 3.11)::

    python -m benchmarks.icechunk_eval --engine fisherstore --out benchmarks/results/icechunk_fisherstore.json
    python -m benchmarks.icechunk_eval --engine zarr --out benchmarks/results/icechunk_zarr.json
    /tmp/icevenv/bin/python benchmarks/icechunk_eval.py --engine icechunk --out benchmarks/results/icechunk_icechunk.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

H, D, HIDDEN = 32, 128, 4096
ARRAYS = {"q": ((H * D, HIDDEN), (D, HIDDEN), 0), "k": ((H * D, HIDDEN), (D, HIDDEN), 0),
          "v": ((H * D, HIDDEN), (D, HIDDEN), 0), "o": ((HIDDEN, H * D), (HIDDEN, D), 1)}
READS = 64


def values(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {n: rng.random(shape, dtype=np.float32) for n, (shape, _, _) in ARRAYS.items()}


def head(name: str, h: int) -> tuple[slice, slice]:
    _, _, axis = ARRAYS[name]
    s = slice(h * D, (h + 1) * D)
    return (s, slice(None)) if axis == 0 else (slice(None), s)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def create(group: zarr.Group, name: str, kind: str | None = None) -> zarr.Array:
    shape, chunks, _ = ARRAYS[kind or name]
    return group.create_array(name, shape=shape, chunks=chunks, dtype="float32", fill_value=0.0,
                              serializer=BytesCodec(endian="little"), compressors=[Crc32cCodec()], filters=None,
                              overwrite=True, config={"write_empty_chunks": True})


def read_latencies(open_block) -> dict[str, float]:
    rng = np.random.default_rng(7)
    picks = [(str(rng.choice(list(ARRAYS))), int(rng.integers(H))) for _ in range(READS)]
    open_block(*picks[0])  # warm
    times = []
    for name, h in picks:
        t0 = time.perf_counter()
        blk = open_block(name, h)
        times.append(time.perf_counter() - t0)
        assert blk.size == D * HIDDEN
    return {"head_read_ms_median": 1e3 * statistics.median(times), "head_read_ms_p90": 1e3 * sorted(times)[int(.9 * READS)]}


def sweep(read_block) -> float:
    t0 = time.perf_counter()
    n = 0
    for name in ARRAYS:
        for h in range(H):
            n += read_block(name, h).nbytes
    return n / (time.perf_counter() - t0) / 1e9


def run_zarr(root: str) -> dict:
    out = {}
    for step in (1, 2):
        vals = values(step)
        t0 = time.perf_counter()
        g = zarr.open_group(os.path.join(root, "s"), mode="a")
        for n, v in vals.items():
            create(g, f"{n}_g{step}", n)[...] = v
        os.sync()  # fisherstore's one syncfs per flush
        for n in vals:
            if step > 1:
                shutil.rmtree(os.path.join(root, "s", f"{n}_g{step - 1}"))
        out[f"flush{step}_s"] = time.perf_counter() - t0
    path = os.path.join(root, "s")
    out.update(read_latencies(lambda n, h: zarr.open_array(path, path=f"{n}_g2", mode="r")[head(n, h)]))
    arrs = {n: zarr.open_array(path, path=f"{n}_g2", mode="r") for n in ARRAYS}
    out["sweep_GB_per_s"] = sweep(lambda n, h: arrs[n][head(n, h)])
    out["bytes_on_disk"] = du(path)
    return out


def run_fisherstore(root: str) -> dict:
    import torch

    import fisherstore
    from fisherstore import ParamLayout

    path = os.path.join(root, "s")
    out = {}
    with fisherstore.open(path, mode="w", memory_budget=0) as s:
        for n, (shape, _, _) in ARRAYS.items():
            s.create("t", n, shape, ParamLayout.attention(n, H, D))
        for step in (1, 2):
            vals = values(step)
            t0 = time.perf_counter()
            s.update("t", {n: torch.from_numpy(v) for n, v in vals.items()})
            s.flush()
            out[f"flush{step}_s"] = time.perf_counter() - t0
    with fisherstore.open(path, mode="r") as s:
        blocks = {"q": "Q", "k": "K", "v": "V", "o": "O"}
        out.update(read_latencies(lambda n, h: s.fisher("t", n).head(h, blocks[n]).numpy()))
        out["sweep_GB_per_s"] = sweep(lambda n, h: s.fisher("t", n).head(h, blocks[n]).numpy())
    out["bytes_on_disk"] = du(path)
    return out


def run_icechunk(root: str) -> dict:
    import icechunk as ic

    path = os.path.join(root, "repo")
    repo = ic.Repository.create(ic.local_filesystem_storage(path))
    out = {"icechunk": ic.__version__}
    snaps = []
    for step in (1, 2):
        vals = values(step)
        t0 = time.perf_counter()
        session = repo.writable_session("main")
        g = zarr.open_group(session.store, mode="a")
        for n, v in vals.items():
            (create(g, n) if step == 1 else g[n])[...] = v
        t1 = time.perf_counter()
        snaps.append(session.commit(f"flush {step}"))
        out[f"commit{step}_s"] = time.perf_counter() - t1
        out[f"flush{step}_s"] = time.perf_counter() - t0
        os.sync()  # its local storage does not fsync; with the sync fisherstore pays, for equal durability
        out[f"flush{step}_synced_s"] = time.perf_counter() - t0
    def at(snapshot):
        return repo.readonly_session(snapshot_id=snapshot).store if snapshot else repo.readonly_session("main").store
    out.update(read_latencies(lambda n, h: zarr.open_array(at(None), path=n, mode="r")[head(n, h)]))
    arrs = {n: zarr.open_array(at(None), path=n, mode="r") for n in ARRAYS}
    out["sweep_GB_per_s"] = sweep(lambda n, h: arrs[n][head(n, h)])
    old = read_latencies(lambda n, h: zarr.open_array(at(snaps[0]), path=n, mode="r")[head(n, h)])
    out["time_travel_head_read_ms_median"] = old["head_read_ms_median"]
    first = zarr.open_array(at(snaps[0]), path="q", mode="r")[head("q", 3)]
    out["time_travel_values_ok"] = bool(np.array_equal(first, values(1)["q"][head("q", 3)]))
    out["bytes_on_disk"] = du(path)
    out["top_level_entries"] = sorted(os.listdir(path))
    try:
        zarr.open_group(path, mode="r")
        out["plain_zarr_open"] = "opened"
    except Exception as e:  # what a plain Zarr reader sees: not a Zarr hierarchy
        out["plain_zarr_open"] = f"{type(e).__name__}: {e}"[:200]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=("zarr", "fisherstore", "icechunk"), required=True)
    ap.add_argument("--out")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix=f"icechunk-eval-{args.engine}-")
    try:
        res = {"engine": args.engine, "bytes_state": sum(4 * a * b for (a, b), _, _ in ARRAYS.values()),
               **{"zarr": run_zarr, "fisherstore": run_fisherstore, "icechunk": run_icechunk}[args.engine](root)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
