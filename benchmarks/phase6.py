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


def model_config(layers: int, hidden: int = 4096) -> Any:
    """LLaMA-2-7B's attention (heads of 128) at ``hidden`` (4096: 32 heads), ``layers`` layers, a small vocabulary."""
    import transformers as T

    T.logging.set_verbosity_error()
    heads = hidden // 128
    cfg = T.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 11008 // 4096,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                        max_position_embeddings=256)
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
    model = T.LlamaForCausalLM(model_config(spec["layers"], spec.get("hidden", 4096))).to(dtype).eval()
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


# -- --ranks: the heat map on 1, 2, ... gloo ranks of this machine -------------------------------------
def proc_read_bytes() -> int:
    """Bytes this process (all its threads) has had fetched from the storage layer (``/proc/self/io`` read_bytes)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def worker_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of ``--ranks``, started with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Runs ``heatmap_from_store(group=RankGroup.from_torch())`` ``rounds`` times from a cold page
    cache (rank 0 drops it between two barriers), then ``rounds`` times warm. Per round: this
    rank's seconds, the seconds in its own blocks (between the plan's gather and the scores'
    gather) and in the scores' gather, its chunk files read (``store.io_counters()``) and the
    bytes the kernel fetched for it from the disk (``/proc/self/io``).
    """
    import resource

    import torch
    import torch.distributed as dist

    import fisherstore
    from fisherstore.qkov import QKOVIndexer, QKOVInterference
    from fisherstore.qkov.outofcore import block_bytes, deal_blocks, plan_blocks

    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo")  # env://, as under torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    group = fisherstore.RankGroup.from_torch(timeout=spec["collective_timeout"])
    spans: list[tuple[float, float]] = []  # (start, end) of each of fisherstore's gathers in one heat map
    gather = group.gather_agreed

    def timed_gather(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return gather(*a, **k)
        finally:
            spans.append((t0, time.perf_counter()))

    group.gather_agreed = timed_gather  # type: ignore[method-assign]
    rounds = []
    with fisherstore.open(spec["path"], mode="r", backend=spec["backend"]) as store:
        qk = QKOVInterference(QKOVIndexer.from_store(store, "a"))
        jobs = plan_blocks(qk.indexer, *qk.selection(None, None, "QKVO"))
        sizes = block_bytes(store, jobs, "a", "b", "ema")
        owners = deal_blocks(sizes, world)
        # one untimed heat map first: imports, thread pools and first-call costs stay out of the rounds
        qk.heatmap_from_store(store, "a", "b", fisher="ema", memory_budget=spec["budget"], progress=False, group=group)
        for cache in ("cold", "warm"):
            for _ in range(spec["rounds"]):
                dist.barrier()
                dropped = drop_caches() if cache == "cold" and rank == 0 else None
                dist.barrier()
                spans.clear()
                io0, files0 = proc_read_bytes(), store.io_counters().get("chunk_files_read", 0)
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                heat = qk.heatmap_from_store(store, "a", "b", fisher="ema", memory_budget=spec["budget"],
                                             progress=False, group=group)
                t1 = time.perf_counter()
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                own = spans[1][0] - spans[0][1] if len(spans) == 2 else t1 - t0
                rounds.append({"cache": cache, "s": t1 - t0, "own_blocks_s": own,
                               "plan_s": spans[0][1] - t0 if len(spans) == 2 else 0.0,
                               "final_gather_s": spans[1][1] - spans[1][0] if len(spans) == 2 else 0.0,
                               "after_gather_s": t1 - spans[1][1] if len(spans) == 2 else 0.0,
                               "cpu_s": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime,
                               "disk_read_bytes": proc_read_bytes() - io0,
                               "chunk_files_read": store.io_counters().get("chunk_files_read", 0) - files0,
                               "dropped": dropped})
    dist.destroy_process_group()
    top = heat["top_conflicts"]["Q"][0]
    return {"rank": rank, "world": world, "threads": torch.get_num_threads(), "blocks": len(jobs),
            "blocks_mine": owners.count(rank), "bytes_mine": sum(n for n, r in zip(sizes, owners) if r == rank),
            "bytes_all": sum(sizes), "rounds": rounds,
            "checksum": float(sum(float(s.sum()) for s in heat["scores"].values())),
            "top": [top["sample_i"], top["sample_j"], top["layer"], top["head"], top["score"]]}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(world: int, spec: dict[str, Any], timeout: int) -> list[dict[str, Any]]:
    """``world`` processes of ``worker_rank`` on this machine, with the variables torchrun would set; each one's result."""
    spec = {**spec, "threads": max(1, (os.cpu_count() or 1) // world)}
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, "-m", "benchmarks.phase6", "--worker", "rank", json.dumps(spec)]
    logs = [tempfile.TemporaryFile("w+") for _ in range(world)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=logs[r],
                              stderr=subprocess.STDOUT, text=True, cwd=os.path.dirname(HERE)) for r in range(world)]
    deadline = time.monotonic() + timeout
    out = []
    try:
        for r, p in enumerate(procs):
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
            logs[r].seek(0)
            text = logs[r].read().strip().splitlines()
            try:
                out.append(json.loads(text[-1]) if p.returncode == 0 else {})
            except (IndexError, json.JSONDecodeError):
                out.append({})
            if not out[-1]:
                out[-1] = {"rank": r, "error": f"exit {p.returncode}: " + (text[-1] if text else "no output")}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    return out


def summarise_ranks(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One rank count: per round the slowest rank's seconds, medians over rounds, and per rank what it read."""
    import statistics

    if any("error" in r for r in ranks):
        return {"error": "; ".join(f"rank {r['rank']}: {r['error']}" for r in ranks if "error" in r)}
    row: dict[str, Any] = {"world": len(ranks), "threads": ranks[0]["threads"], "blocks": ranks[0]["blocks"],
                           "bytes_all": ranks[0]["bytes_all"], "checksum": ranks[0]["checksum"],
                           "top": ranks[0]["top"],
                           "ranks_agree": all(r["top"][:4] == ranks[0]["top"][:4] and
                                              math.isclose(r["checksum"], ranks[0]["checksum"], rel_tol=1e-6)
                                              for r in ranks)}
    for cache in ("cold", "warm"):
        n = sum(1 for x in ranks[0]["rounds"] if x["cache"] == cache)
        per_round = [[r["rounds"][i] for r in ranks] for i, x in enumerate(ranks[0]["rounds"]) if x["cache"] == cache]
        assert len(per_round) == n
        row[f"{cache}_s_all"] = [max(x["s"] for x in rs) for rs in per_round]
        row[f"{cache}_s"] = statistics.median(row[f"{cache}_s_all"])
        # the scores' gather on the rank that reached it last: its transfer, not a wait for another rank
        row[f"{cache}_gather_s"] = statistics.median(min(x["final_gather_s"] for x in rs) for rs in per_round)
        row[f"{cache}_own_blocks_s"] = [statistics.median(x["own_blocks_s"] for x in r["rounds"] if x["cache"] == cache)
                                        for r in ranks]
        # cores busy: every rank's CPU seconds over the round's (slowest rank's) seconds
        row[f"{cache}_cores_busy"] = statistics.median(sum(x["cpu_s"] for x in rs) / max(x["s"] for x in rs)
                                                       for rs in per_round)
        row[f"{cache}_after_s"] = statistics.median(max(x["after_gather_s"] for x in rs) for rs in per_round)
        row[f"{cache}_plan_s"] = statistics.median(max(x["plan_s"] for x in rs) for rs in per_round)
        row[f"{cache}_disk_read_bytes"] = [statistics.median(x["disk_read_bytes"] for x in r["rounds"]
                                                             if x["cache"] == cache) for r in ranks]
    row["bytes_per_rank"] = [r["bytes_mine"] for r in ranks]
    row["blocks_per_rank"] = [r["blocks_mine"] for r in ranks]
    row["chunk_files_per_rank"] = [r["rounds"][0]["chunk_files_read"] for r in ranks]
    row["cold_dropped"] = bool(ranks[0]["rounds"][0]["dropped"])
    return row


def scaling_verdict(rows: list[dict[str, Any]], cores: int, ceiling: float) -> list[str]:
    """Where adding ranks stops paying on this machine, and why, from the measured rows alone."""
    base = next((r for r in rows if r.get("world") == 1), None)
    if base is None:
        return ["No 1-rank row to compare against."]
    out = []
    for r in rows:
        if "error" in r or r["world"] == 1:
            continue
        n = r["world"]
        up_c, up_w = base["cold_s"] / r["cold_s"], base["warm_s"] / r["warm_s"]
        gbps = r["bytes_all"] / r["cold_s"] / 1e9
        why = []
        if n > cores:
            why.append(f"the cores: {n} ranks share {cores} cores, so each scores and checksums on less than one "
                       f"(warm {up_w:.2f}x)")
        if ceiling and gbps >= 0.8 * ceiling:
            why.append(f"the disk, cold: the {n} ranks together read {gbps:.2f} GB/s against a cold-read ceiling "
                       f"of {ceiling:.2f} GB/s")
        if r["cold_gather_s"] >= 0.2 * r["cold_s"] or r["warm_gather_s"] >= 0.2 * r["warm_s"]:
            why.append(f"the gather: {r['warm_gather_s']:.2f} s of {r['warm_s']:.2f} s warm")
        if up_w < 0.8 * n and n <= cores:
            busy, load = base["warm_cores_busy"], max(r.get("loadavg_1min", [0.0]))
            if load > cores:
                why.append(f"the cores, warm (no disk in the way): {n} ranks give {up_w:.2f}x, and all of them "
                           f"together kept only {r['warm_cores_busy']:.1f} of the {cores} cores busy (one rank "
                           f"{busy:.1f}) while the machine's 1-minute load average was up to {load:.1f}: other "
                           "processes held the rest")
            elif busy >= 0.75 * cores:
                why.append(f"the cores, warm (no disk in the way): {n} ranks give {up_w:.2f}x, since one rank alone "
                           f"already keeps {busy:.1f} of the {cores} cores busy (scoring on one thread, reading, "
                           f"crc32c and copies on the others); {n} ranks keep {r['warm_cores_busy']:.1f} busy")
            elif not why:
                serial = r["warm_plan_s"] + r["warm_gather_s"] + r["warm_after_s"]
                why.append(f"not the disk nor the gather alone: this heat map is too small to split. Warm, one rank "
                           f"keeps {busy:.1f} of {cores} cores busy and {n} ranks {r['warm_cores_busy']:.1f}; the "
                           f"parts that do not shrink with ranks (the plan's agreement, the gather, then placing all "
                           f"the scores and ranking the top conflicts on every rank) take {serial:.2f} s of "
                           f"{r['warm_s']:.2f} s")
        if r["warm_gather_s"] < 0.2 * r["warm_s"]:
            why.append(f"not the gather ({r['warm_gather_s']:.3f} s of {r['warm_s']:.2f} s warm, plus "
                       f"{r['warm_plan_s']:.3f} s to agree on the plan)")
        verdict = "; ".join(why) if why else "nothing yet: it scales"
        out.append(f"{n} ranks: {up_c:.2f}x cold, {up_w:.2f}x warm ({up_w / n:.0%} of linear). Stops at: {verdict}.")
    return out


def report_ranks(res: dict[str, Any], args: argparse.Namespace) -> str:
    rows, sp = res["rows"], res["store"]
    quick = " --quick" if args.quick else ""
    lines = [f"`python -m benchmarks.phase6 --ranks {args.ranks}{quick} --layers {args.layers} --samples "
             f"{args.samples} --dtype {args.dtype[0]} --rounds {args.rounds}`", "",
             f"The heat map of `heatmap_from_store(..., group=RankGroup.from_torch())` on 1, 2, ... gloo ranks of this "
             f"machine ({res['cores']} cores). Store (built once, before): LLaMA-shaped attention, hidden "
             f"{sp['hidden']} ({sp['hidden'] // 128} heads of 128), {args.layers} layer(s), {args.samples} samples per "
             f"task in {args.dtype[0]}, and task A's EMA Fisher; every heat map reads {rows[0].get('blocks', '?')} "
             f"blocks, {res['bytes_all'] / MiB:.0f} MiB (both tasks' sample chunks and the fp32 Fisher blocks). Each "
             "rank count is that many processes started with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, "
             "MASTER_PORT; `init_process_group(\"gloo\")`), each with cores/ranks torch threads. A round starts at a "
             "barrier, with the page cache dropped by rank 0 (cold) or not (warm, after the cold rounds); its time is "
             f"the slowest rank's, and the columns are medians of {args.rounds} rounds, after one untimed heat map. "
             "Plan s: until the ranks agreed on the plan (0 on 1 rank: no agreement); own blocks: reading and scoring "
             "its share; gather: the scores' exchange on the rank that reached it last; cores busy: all ranks' CPU "
             "seconds over the round's seconds. Cold-read ceiling of this disk "
             f"beside the runs: {res['ceiling_GBps']:.2f} GB/s (a {res['probe_bytes'] // MiB} MiB file, mean of before "
             "and after).", "",
             "| ranks | threads per rank | heat map s, cold (all rounds) | speed-up cold | heat map s, warm | "
             "speed-up warm | read GB/s cold, all ranks | bytes read per rank (its blocks) | chunk files per rank "
             "(`io_counters`) | disk bytes per rank, cold (`/proc/self/io`) | plan s, warm | own blocks s per rank, "
             "warm | scores' gather s, warm | cores busy, cold / warm | every rank = 1 rank's result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r for r in rows if r.get("world") == 1 and "error" not in r), None)
    for n, r in zip(res["ranks"], rows):
        if "error" in r:
            lines.append(f"| {n} | error: {r['error']} |" + " |" * 13)
            continue
        up = {k: f"{base[k] / r[k]:.2f}x" if base else "" for k in ("cold_s", "warm_s")}
        same = r["ranks_agree"] and (base is None or (base["top"][:4] == r["top"][:4] and
                                                      math.isclose(base["checksum"], r["checksum"], rel_tol=1e-5)))
        lines.append(
            f"| {n} | {r['threads']} | {r['cold_s']:.2f} ({', '.join(f'{x:.2f}' for x in r['cold_s_all'])}) | "
            f"{up['cold_s']} | {r['warm_s']:.2f} | {up['warm_s']} | {r['bytes_all'] / r['cold_s'] / 1e9:.2f} | "
            f"{' / '.join(f'{b / MiB:.0f} MiB' for b in r['bytes_per_rank'])} | "
            f"{' / '.join(map(str, r['chunk_files_per_rank']))} | "
            f"{' / '.join(f'{b / MiB:.0f} MiB' for b in r['cold_disk_read_bytes'])} | "
            f"{r['warm_plan_s']:.3f} | {' / '.join(f'{x:.2f}' for x in r['warm_own_blocks_s'])} | "
            f"{r['warm_gather_s']:.3f} | {r['cold_cores_busy']:.1f} / {r['warm_cores_busy']:.1f} | "
            f"{'yes' if same else 'NO'} |")
    loads = [x for r in rows for x in r.get("loadavg_1min", [])]
    if loads:
        lines += ["", "1-minute load average of this shared machine before and after each rank count: "
                  + "; ".join(f"{n} rank(s) {r['loadavg_1min'][0]:.1f} / {r['loadavg_1min'][1]:.1f}"
                              for n, r in zip(res["ranks"], rows) if "loadavg_1min" in r)
                  + f" (on {res['cores']} cores; above {res['cores']}, other processes took cores from the ranks)."]
    lines += ["", "Where scaling stops here:", ""]
    lines += [f"* {v}" for v in scaling_verdict(rows, res["cores"], res["ceiling_GBps"])]
    if not any(r.get("cold_dropped") for r in rows):
        lines += ["", "The page cache could not be dropped (not root): the cold rounds ran warm."]
    return "\n".join(lines) + "\n"


def main_ranks(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    """Build the store once (the collect worker), then run the heat map on each rank count; the results."""
    hidden = 512 if args.quick else 4096
    spec = {"path": os.path.join(scratch, "store"), "layers": args.layers, "samples": args.samples, "seq": args.seq,
            "dtype": args.dtype[0], "budget": args.budget, "backend": args.backend, "hidden": hidden}
    res: dict[str, Any] = {"args": vars(args), "cores": os.cpu_count(), "ranks": args.ranks_list,
                           "store": {**spec, "collect": run_worker("collect", spec, args.timeout)}, "rows": []}
    print("store", res["store"]["collect"], flush=True)
    if "error" in res["store"]["collect"]:
        raise SystemExit(f"building the store failed: {res['store']['collect']['error']}")
    probe = os.path.join(scratch, "probe.bin")
    res["probe_bytes"] = (64 if args.quick else 1024) * MiB
    buf = os.urandom(64 * MiB)
    with open(probe, "wb") as f:
        for _ in range(res["probe_bytes"] // len(buf)):
            f.write(buf)
        os.fsync(f.fileno())
    before = cold_read(probe)
    run_spec = {"path": spec["path"], "backend": args.backend, "budget": args.budget, "rounds": args.rounds,
                "collective_timeout": min(args.timeout, 600)}
    for n in args.ranks_list:
        load = os.getloadavg()[0]
        row = summarise_ranks(run_ranks(n, run_spec, args.timeout))
        row["loadavg_1min"] = [load, os.getloadavg()[0]]  # the machine is shared: others' load, before and after
        print(n, "ranks", {k: v for k, v in row.items() if not k.endswith("_all")}, flush=True)
        res["rows"].append(row)
    res["ceiling_GBps"] = (before + cold_read(probe)) / 2
    res["bytes_all"] = next((r["bytes_all"] for r in res["rows"] if "bytes_all" in r), 0)
    res["verdict"] = scaling_verdict(res["rows"], res["cores"], res["ceiling_GBps"])
    return res


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
    ap.add_argument("--layers", type=int, help="LLaMA layers (default 2; --ranks: 1, --quick: 2)")
    ap.add_argument("--samples", type=int, help="samples per task (default 32; --ranks: 16, --quick: 4)")
    ap.add_argument("--seq", type=int, default=16, help="tokens per sample")
    ap.add_argument("--dtype", nargs="+", help="gradient dtypes (default float32 bfloat16; --ranks: the first, "
                    "default bfloat16)")
    ap.add_argument("--budget", type=int, default=GiB, help="memory budget in bytes (default 1 GiB)")
    ap.add_argument("--backend", default="zarr", choices=("zarr", "tensorstore"))
    ap.add_argument("--dir", help="scratch directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", help="results OUT.json and OUT.md (default benchmarks/results/phase6, with --ranks "
                    "benchmarks/results/phase6_ranks)")
    ap.add_argument("--ranks", help="comma list of rank counts, e.g. 1,2: the heat map on that many gloo processes "
                    "of this machine, on one store built first (instead of the runs above)")
    ap.add_argument("--quick", action="store_true", help="with --ranks: a small store (hidden 512, 2 layers, 4 "
                    "samples per task, fp32), 2 rounds; seconds, for tests")
    ap.add_argument("--rounds", type=int, help="with --ranks: heat maps per rank count, cold and warm each "
                    "(default 3, --quick 2)")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, spec = args.worker
        fn = {"collect": worker_collect, "heatmap": worker_heatmap, "chunking": worker_chunking,
              "score": worker_score, "rank": worker_rank}[kind]
        print(json.dumps(fn(json.loads(spec))))
        return
    if args.ranks is not None:
        try:
            args.ranks_list = [int(x) for x in args.ranks.split(",") if x.strip()]
        except ValueError:
            args.ranks_list = []
        if not args.ranks_list or min(args.ranks_list) < 1:
            ap.error(f"--ranks {args.ranks!r}: give a comma list of rank counts >= 1, e.g. 1,2")
    elif args.quick or args.rounds is not None:
        ap.error("--quick and --rounds go with --ranks")
    ranked = args.ranks is not None
    args.layers = args.layers or (2 if args.quick or not ranked else 1)
    args.samples = args.samples or (4 if args.quick else 16 if ranked else 32)
    args.dtype = args.dtype or (["float32"] if args.quick else ["bfloat16"] if ranked else ["float32", "bfloat16"])
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.out = args.out or os.path.join(HERE, "results", "phase6_ranks" if ranked else "phase6")
    check_scratch_dir(ap, args.dir)
    scratch = tempfile.mkdtemp(prefix="fisherstore-phase6-", dir=args.dir)
    t0 = time.perf_counter()
    if ranked:
        try:
            res = main_ranks(args, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        res["wall_seconds"] = time.perf_counter() - t0
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(args.out + ".md", "w") as f:
            f.write(report_ranks(res, args))
        print(report_ranks(res, args))
        return
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
