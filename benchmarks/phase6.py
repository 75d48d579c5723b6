"""Phase 6 at 7B scale: per-sample gradients on disk and the out-of-core QK-OV heat map.

    python -m benchmarks.phase6                        # 2 LLaMA-2-7B-shaped layers, 32 samples per task, fp32 and bf16
    python -m benchmarks.phase6 --layers 1 --samples 8 # a quick run

A real ``LlamaForCausalLM`` built from a config with LLaMA-2-7B's attention (hidden 4096,
32 heads of 128, MLP 11008) and a small vocabulary, random weights. For each dtype, in
separate processes so each peak RSS is its own:

* **collect**: ``FisherCollector.collect_samples`` for two tasks (one backward per sample,
  each attention weight's gradient streamed to the store as its hook fires), plus one EMA
  step for task A; peak RSS growth over the loaded model, at a 1 GiB budget.
* **heatmap**: ``QKOVInterference.heatmap_from_store`` from a cold page cache: every
  (layer, head, block) of both tasks' samples and the Fisher; GB/s against the cold-read
  ceiling measured in the same run.
* **score**: the fused scoring matmul alone (``phase6.weighted_gram``) on one 128×4096 head
  block already in RAM, at n = --samples and n = 100 per task: the compute half of the
  heat map, and what the full-7B extrapolation in README uses.
* **chunking**: the sample-axis choice. One chunk per (sample, head block), which is
  what streaming one sample at a time can write, against one chunk per head block for
  all samples (what a compaction pass would give): cold reads of every block of one
  weight, both ways.

Results go to OUT.json and OUT.md (default benchmarks/results/phase6).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.disk_vs_ram import GiB, MiB, ceilings, check_scratch_dir, drop_caches, du, vm_hwm, vm_rss

HERE = os.path.dirname(os.path.abspath(__file__))


def model_config(layers: int) -> Any:
    import transformers as T

    T.logging.set_verbosity_error()
    cfg = T.LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    return cfg


def batch(n: int, seed: int, seq: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 1024, (n, seq), generator=g)}


def worker_collect(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers as T

    from fisherstore import FisherCollector

    torch.manual_seed(0)
    dtype = getattr(torch, spec["dtype"])
    model = T.LlamaForCausalLM(model_config(spec["layers"])).to(dtype).eval()
    base = vm_rss()
    res: dict[str, Any] = {"model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    with FisherCollector(backend=spec["backend"], path=spec["path"], mode="w", memory_budget=spec["budget"],
                         micro_batch_size=4) as fc:
        t0 = time.perf_counter()
        fc.collect_fisher(model, batch(8, 1, spec["seq"]), task="a")
        fc.flush()
        res["ema_step_s"] = time.perf_counter() - t0
        for task, seed in (("a", 2), ("b", 3)):
            t0 = time.perf_counter()
            fc.collect_samples(model, batch(spec["samples"], seed, spec["seq"]), task=task, progress=False)
            res[f"collect_{task}_s"] = time.perf_counter() - t0
        res["sample_bytes"] = sum(fc.store.samples(t, n).shape.numel() * fc.store.samples(t, n).dtype.itemsize
                                  for t in "ab" for n in fc.store.sample_params(t))
    res["peak_rss_growth"] = vm_hwm() - base
    res["disk_bytes"] = du(spec["path"])
    return res


def cold_read(path: str) -> float:
    """GB/s of one cold sequential read of ``path`` (the disk's read ceiling, right now)."""
    drop_caches()
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MiB):
            pass
    return os.path.getsize(path) / (time.perf_counter() - t0) / 1e9


def worker_heatmap(spec: dict[str, Any]) -> dict[str, Any]:
    """The heat map from a cold cache, ``reps`` times, each beside a cold read of a 2 GiB file.

    The disk is shared and its speed drifts by 2x within minutes here, so each heat map is
    set against a ceiling measured just before and just after it, and the medians are kept.
    """
    import statistics

    import fisherstore
    from fisherstore.qkov import QKOVIndexer, QKOVInterference

    probe = os.path.join(os.path.dirname(spec["path"]), "probe.bin")
    buf = os.urandom(64 * MiB)
    with open(probe, "wb") as f:
        for _ in range(32):
            f.write(buf)
        os.fsync(f.fileno())
    base = vm_rss()
    times, ratios, ceilings_ = [], [], []
    try:
        with fisherstore.open(spec["path"], mode="r", backend=spec["backend"]) as store:
            qk = QKOVInterference(QKOVIndexer.from_store(store, "a"))
            names = store.sample_params("a")
            nbytes = sum(store.samples(t, n).shape.numel() * store.samples(t, n).dtype.itemsize
                         for t in "ab" for n in names) + sum(4 * math.prod(store.param("a", n).shape) for n in names)
            before = cold_read(probe)
            for _ in range(spec.get("reps", 3)):
                cold = drop_caches()
                t0 = time.perf_counter()
                heat = qk.heatmap_from_store(store, "a", "b", fisher="ema", memory_budget=spec["budget"],
                                             progress=False)
                dt = time.perf_counter() - t0
                after = cold_read(probe)
                times.append(dt)
                ceilings_.append((before + after) / 2)
                ratios.append(nbytes / dt / 1e9 / ceilings_[-1])
                before = after
    finally:
        os.unlink(probe)
    dt = statistics.median(times)
    return {"heatmap_s": dt, "heatmap_s_all": times, "bytes_read": nbytes, "GBps": nbytes / dt / 1e9, "cold": cold,
            "ceiling_GBps": statistics.median(ceilings_), "x_ceiling": statistics.median(ratios),
            "x_ceiling_all": ratios, "peak_rss_growth": vm_hwm() - base,
            "blocks": len(heat["layers"]) * len(heat["heads"]) * 4, "top": heat["top_conflicts"]["Q"][0]}


def worker_chunking(spec: dict[str, Any]) -> dict[str, Any]:
    """Cold reads of every head block of one weight's samples: per-sample chunks vs one chunk per block."""
    import statistics

    import numpy as np
    import zarr

    import fisherstore

    with fisherstore.open(spec["path"], mode="r", backend=spec["backend"]) as store:
        name = store.sample_params("a")[0]
        S = store.samples("a", name)
        lay = store.layout("a", name)
        n, shape = len(S), tuple(S.shape[1:])
        compact = os.path.join(os.path.dirname(spec["path"]), "compact.zarr")
        z = zarr.create_array(compact, shape=(n, *shape), chunks=(n, lay.head_dim, shape[1]), dtype="float32",
                              overwrite=True, compressors=None, fill_value=0.0)
        for h in range(lay.num_heads):
            z[:, h * lay.head_dim:(h + 1) * lay.head_dim, :] = S.head(h, "Q").float().numpy()
        per_sample, compact_ = [], []
        for _ in range(3):  # alternated, so the disk's drift falls on both alike
            drop_caches()
            t0 = time.perf_counter()
            for h in range(lay.num_heads):
                S.head(h, "Q")
            per_sample.append(time.perf_counter() - t0)
            drop_caches()
            t0 = time.perf_counter()
            for h in range(lay.num_heads):
                np.asarray(z[:, h * lay.head_dim:(h + 1) * lay.head_dim, :])
            compact_.append(time.perf_counter() - t0)
        out = {"per_sample_chunks_s": statistics.median(per_sample), "one_chunk_per_block_s": statistics.median(compact_),
               "per_sample_chunks_s_all": per_sample, "one_chunk_per_block_s_all": compact_}
        out["bytes"] = n * int(np.prod(shape)) * S.dtype.itemsize
        out["compact_bytes"] = n * int(np.prod(shape)) * 4
        shutil.rmtree(compact)
    return out


def worker_score(spec: dict[str, Any]) -> dict[str, Any]:
    """Median seconds of one fused score of a [n, 128·4096] block pair, warm, per dtype and n."""
    import statistics

    import torch

    from fisherstore.phase6 import weighted_gram

    torch.manual_seed(0)
    E, out = 128 * 4096, {}
    w = torch.rand(E) + 0.5
    for n in sorted({spec["samples"], 100}):
        a, b = torch.randn(n, E), torch.randn(n, E)
        for dt in spec["dtypes"]:
            ga, gb = a.to(getattr(torch, dt)), b.to(getattr(torch, dt))
            weighted_gram(ga, gb, w, torch.device("cpu"))  # warm-up
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                weighted_gram(ga, gb, w, torch.device("cpu"))
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            out[f"{dt}/{n}"] = {"s": med, "GFLOPs": 2 * n * n * E / med / 1e9,
                                "GBps": 2 * n * E * ga.element_size() / med / 1e9}
    out["threads"] = torch.get_num_threads()
    return out


def run_worker(kind: str, spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.phase6", "--worker", kind, json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(HERE))
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    c = res["ceilings"]
    lines = [f"`python -m benchmarks.phase6 --layers {args.layers} --samples {args.samples} "
             f"--budget {args.budget // MiB} --backend {args.backend}`", "",
             f"LLaMA-2-7B-shaped attention (hidden 4096, 32 heads of 128), {args.layers} full layer(s), "
             f"{args.samples} samples per task of {args.seq} tokens, memory budget {args.budget / GiB:.1f} GiB, "
             f"backend {args.backend}. Ceilings at the start of the run: disk write+fsync {c['disk_write_GBps']:.2f} GB/s, "
             f"cold read {c['disk_read_GBps']:.2f} GB/s. The heat map ran 3 times from a cold cache, each between two "
             "cold reads of a 2 GiB file; its columns are medians, and × ceiling sets each run against the mean of "
             "the two reads beside it (the disk is shared, and drifts).", "",
             "| dtype | collect s (A / B) | per-sample data | peak RSS growth (collect) | heat map s | read GB/s | "
             "cold-read ceiling beside it, GB/s | × ceiling (min–max) | peak RSS growth (heat map) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dt, r in res["runs"].items():
        col, hm = r["collect"], r["heatmap"]
        if "error" in col or "error" in hm:
            lines.append(f"| {dt} | error: {col.get('error') or hm.get('error')} | | | | | | | |")
            continue
        lines.append(f"| {dt} | {col['collect_a_s']:.0f} / {col['collect_b_s']:.0f} | "
                     f"{col['sample_bytes'] / GiB:.1f} GiB | {col['peak_rss_growth'] / GiB:.2f} GiB | "
                     f"{hm['heatmap_s']:.1f} | {hm['GBps']:.2f} | {hm['ceiling_GBps']:.2f} | "
                     f"{hm['x_ceiling']:.2f} ({min(hm['x_ceiling_all']):.2f}–{max(hm['x_ceiling_all']):.2f}) | "
                     f"{hm['peak_rss_growth'] / GiB:.2f} GiB |")
    sc = res.get("score", {})
    if sc and "error" not in sc:
        lines += ["", f"Fused scoring matmul alone (one 128×4096 head block in RAM, {sc['threads']} threads, median of 5):"]
        lines += [f"{k.replace('/', ', n = ')}: {v['s'] * 1e3:.0f} ms per block, {v['GFLOPs']:.0f} GFLOP/s, "
                  f"{v['GBps']:.2f} GB/s of gradients" for k, v in sc.items() if k != "threads"]
    ch = next((r["chunking"] for r in res["runs"].values() if "error" not in r.get("chunking", {"error": 1})), None)
    if ch:
        lines += ["", f"Sample-axis chunking, cold reads of all 32 head blocks of one weight ({ch['bytes'] / GiB:.2f} "
                  f"GiB, medians of 3 alternated): one chunk per (sample, head block) {ch['bytes'] / ch['per_sample_chunks_s'] / 1e9:.2f} GB/s, "
                  f"one chunk per head block for all samples {ch['compact_bytes'] / ch['one_chunk_per_block_s'] / 1e9:.2f}"
                  " GB/s (what a compaction pass after collection would give)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.phase6", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16, help="tokens per sample")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--budget", type=int, default=GiB, help="memory budget in bytes (default 1 GiB)")
    ap.add_argument("--backend", default="zarr", choices=("zarr", "tensorstore"))
    ap.add_argument("--dir", help="scratch directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "phase6"))
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, spec = args.worker
        fn = {"collect": worker_collect, "heatmap": worker_heatmap, "chunking": worker_chunking,
              "score": worker_score}[kind]
        print(json.dumps(fn(json.loads(spec))))
        return
    check_scratch_dir(ap, args.dir)
    scratch = tempfile.mkdtemp(prefix="fisherstore-phase6-", dir=args.dir)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"args": vars(args), "ceilings": ceilings(scratch), "runs": {}}
    try:
        res["score"] = run_worker("score", {"samples": args.samples, "dtypes": args.dtype}, args.timeout)
        print("score", res["score"], flush=True)
        for dt in args.dtype:
            spec = {"path": os.path.join(scratch, f"store-{dt}"), "layers": args.layers, "samples": args.samples,
                    "seq": args.seq, "dtype": dt, "budget": args.budget, "backend": args.backend}
            run = {"collect": run_worker("collect", spec, args.timeout)}
            print(dt, "collect", run["collect"], flush=True)
            run["heatmap"] = run_worker("heatmap", spec, args.timeout)
            print(dt, "heatmap", run["heatmap"], flush=True)
            if dt == args.dtype[0]:
                run["chunking"] = run_worker("chunking", spec, args.timeout)
                print(dt, "chunking", run["chunking"], flush=True)
            res["runs"][dt] = run
            shutil.rmtree(spec["path"], ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res["wall_seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(report(res, args))
    print(report(res, args))


if __name__ == "__main__":
    main()
