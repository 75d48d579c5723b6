"""Which codec chain should a store use by default? Measure it.

For each chain (lossless: none, blosc-lz4, blosc-zstd, zstd; lossy: BitRound 10 bits) and
each disk backend, stream EMA updates of one LLaMA-2-7B-sized q_proj (4096x4096 fp32,
head-chunked 128x4096) through a real store with memory_budget=0 (every step is a
read-modify-write), then report the time per update, compression ratio and one
head-block read with a new handle.

    python -m benchmarks.codecs --out benchmarks/results/codecs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

import fisherstore
from fisherstore import ParamLayout

CHAINS = [
    ("none (bytes+crc32c)", dict(compression=None)),
    ("blosc-lz4 bitshuffle", dict(compression="blosc-lz4")),
    ("blosc-zstd1 bitshuffle", dict(compression="blosc-zstd")),
    ("zstd1", dict(compression="zstd")),
    ("lossy BitRound(10) + blosc-lz4", dict(lossy_keepbits=10)),
]


def grads(n: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(2 * torch.randn(n, n, generator=g))  # fixed per element: ~7 decades
    for _ in range(steps):
        yield (torch.randn(n, n, generator=g) * scale) ** 2


def run_one(backend: str, opts: dict, n: int, steps: int, root: str) -> dict:
    path = os.path.join(root, f"{backend}-{len(os.listdir(root))}")
    lay = ParamLayout.attention("q", n // 128, 128)
    times = []
    beta = 0.99
    ref = torch.zeros(n, n)
    with fisherstore.open(path, mode="w", backend=backend, memory_budget=0, **opts) as s:
        s.create("t", "q", (n, n), lay)
        for x in grads(n, steps):
            t0 = time.perf_counter()
            s.update("t", {"q": x})
            times.append(time.perf_counter() - t0)
            ref.mul_(beta).add_(x, alpha=1 - beta)
        t0 = time.perf_counter()
        s.flush()
        flush_s = time.perf_counter() - t0
        full = s.fisher("t", "q", bias_corrected=False).load()
        rel = float(((full - ref).abs() / ref.clamp_min(1e-38)).max())
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if "/c/" in d + "/")
    reads = []
    for _ in range(5):
        t0 = time.perf_counter()
        with fisherstore.open(path, mode="r", backend=backend) as r:
            blk = r.fisher("t", "q", bias_corrected=False).head(3, "Q")
        reads.append(time.perf_counter() - t0)
    assert blk.shape == (128, n)
    return {
        "backend": backend,
        "update_ms": 1e3 * statistics.median(times[1:] or times),
        "update_MBps": 4 * n * n / 1e6 / statistics.median(times[1:] or times),
        "flush_ms": 1e3 * flush_s,
        "ratio": 4 * n * n / disk,
        "block_read_new_handle_ms": 1e3 * statistics.median(reads),
        "max_rel_err": rel,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.codecs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="tensor is SIZE x SIZE fp32 (default 4096 = 64 MiB)")
    ap.add_argument("--steps", type=int, default=4, help="EMA updates per chain (default 4)")
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        for backend in ("zarr", "tensorstore"):
            for label, opts in CHAINS:
                r = run_one(backend, opts, args.size, args.steps, root)
                r["chain"] = label
                rows.append(r)
                print(f"{backend:12s} {label:32s} update {r['update_ms']:7.0f} ms ({r['update_MBps']:5.0f} MB/s)  "
                      f"ratio {r['ratio']:.3f}  block {r['block_read_new_handle_ms']:.1f} ms  "
                      f"err {r['max_rel_err']:.1e}", flush=True)
    md = ["| backend | chain | update ms | MB/s | ratio | head block, new handle ms | max rel err vs RAM fp32 EMA |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['backend']} | {r['chain']} | {r['update_ms']:.0f} | {r['update_MBps']:.0f} | {r['ratio']:.3f} | "
           f"{r['block_read_new_handle_ms']:.1f} | {r['max_rel_err']:.1e} |" for r in rows]
    print("\n".join(md))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"size": args.size, "steps": args.steps, "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
