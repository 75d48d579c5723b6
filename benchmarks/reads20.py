"""Read speed before and after (issue 20, item 3): head-block reads against numpy.memmap, heat maps against the disk.

    python -m benchmarks.reads20 --baseline HEAD            # the committed run (about 10 minutes here)
    python -m benchmarks.reads20 --baseline HEAD --quick    # smaller: 8 samples, fewer rounds

Two versions of fisherstore run side by side, each in its own subprocess, alternated round
by round so that the drift of a shared machine falls on both alike: this checkout's
("after") and git revision ``--baseline``'s ("before", from ``git archive``, as
``benchmarks/collector.py`` does). The stores are written once by the baseline's code
(the older writer, so both readers read them).

* **Head-block read** (LLaMA-2-7B-shaped layer, warm page cache): Q (a row block, 128×4096)
  and O (a column block, 4096×128), zarr and tensorstore. "New handle": open the store
  and read one head block; "warm handle": one read on an open store. Each fisherstore
  read is timed beside a numpy.memmap read of the same block in the same process, the
  two interleaved read by read; the ratio is of their medians. crc32c is checked on every
  fisherstore read.
* **Heat map** (``QKOVInterference.heatmap_from_store`` on one 4096×4096 q_proj of 32 heads,
  ``--samples`` samples per task, bf16 and fp32, from a cold page cache): GB/s against the
  cold read of a 2 GiB file just before and just after it (the mean of the two), as
  ``benchmarks/phase6.py`` measures. Medians over ``--reps`` rounds.

Results go to OUT.md and OUT.json (default ``benchmarks/results/reads20``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.disk_vs_ram import GiB, MiB, drop_caches
from benchmarks.phase6 import cold_read

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
Q = "model.layers.0.self_attn.q_proj.weight"
O = "model.layers.0.self_attn.o_proj.weight"  # noqa: E741


# -- workers (each runs in a subprocess, with FISHERSTORE_SRC first on sys.path when set) -------------
def build_latency(path: str) -> dict[str, Any]:
    """One LLaMA-2-7B-shaped attention layer, one EMA step, in zarr and tensorstore; and the memmap files."""
    import numpy as np
    import torch

    import fisherstore
    from fisherstore import ParamLayout

    A = ParamLayout.attention
    params = {f"model.layers.0.self_attn.{k}_proj.weight": A(k, 32, 128, 32) for k in "qkvo"}
    g = torch.Generator().manual_seed(0)
    values = {n: torch.rand(4096, 4096, generator=g) for n in params}
    for kind in ("zarr", "tensorstore"):
        with fisherstore.open(os.path.join(path, kind), mode="w", backend=kind, memory_budget=GiB, progress=False) as s:
            for n, lay in params.items():
                s.create("bench", n, (4096, 4096), lay)
            with s.begin_step("bench") as st:
                for n in params:
                    st.add(n, values[n])
    os.makedirs(os.path.join(path, "memmap"), exist_ok=True)
    for n in (Q, O):
        m = np.memmap(os.path.join(path, "memmap", n), dtype=np.float32, mode="w+", shape=(4096, 4096))
        m[:] = values[n].numpy()
        m.flush()
    return {}


def build_heatmap(path: str, dtype: str, n: int) -> dict[str, Any]:
    """One 4096×4096 q_proj (32 heads of 128): tasks a and b with ``n`` samples each, one EMA step for a."""
    import torch

    import fisherstore
    from fisherstore import ParamLayout

    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    with fisherstore.open(path, mode="w", backend="zarr", memory_budget=GiB, progress=False) as s:
        for t in "ab":
            s.create(t, Q, (4096, 4096), ParamLayout.attention("q", 32, 128, 32))
        with s.begin_step("a") as st:
            st.add(Q, torch.rand(4096, 4096, generator=g) + 0.1)
        s.flush()
        for t in "ab":
            with s.begin_samples(t, [Q], n=n) as sb:
                for i in range(n):
                    sb.add(i, Q, torch.randn(4096, 4096, generator=g).to(dt))
                    sb.set_tokens(i, 16)
            s.flush()
    return {}


def worker_memmap(path: str, reads: int) -> dict[str, Any]:
    """Medians (ms) of numpy.memmap head-block reads alone, in a process that reads nothing else."""
    import numpy as np

    out: dict[str, Any] = {}
    for blk, name in (("q", Q), ("o", O)):
        index = (lambda h: (slice(h * 128, (h + 1) * 128), slice(None))) if blk == "q" else \
            (lambda h: (slice(None), slice(h * 128, (h + 1) * 128)))
        m = np.memmap(os.path.join(path, "memmap", name), dtype=np.float32, mode="r", shape=(4096, 4096))
        for mode in ("new_handle", "warm_handle"):
            ts = []
            for i in range(reads + 10):
                t0 = time.perf_counter()
                if mode == "new_handle":
                    m2 = np.memmap(os.path.join(path, "memmap", name), dtype=np.float32, mode="r", shape=(4096, 4096))
                    np.array(m2[index(i % 8)])
                else:
                    np.array(m[index(i % 8)])
                if i >= 10:
                    ts.append(time.perf_counter() - t0)
            out[f"{blk}/{mode}"] = 1e3 * statistics.median(ts)
    return out


def worker_latency(path: str, reads: int) -> dict[str, Any]:
    """Medians (ms) of head-block reads, each interleaved with a memmap read of the same block."""
    import numpy as np

    import fisherstore

    head = {"q": (lambda h: (slice(h * 128, (h + 1) * 128), slice(None)), Q, "Q"),
            "o": (lambda h: (slice(None), slice(h * 128, (h + 1) * 128)), O, "O")}
    maps = {n: np.memmap(os.path.join(path, "memmap", n), dtype=np.float32, mode="r", shape=(4096, 4096))
            for n in (Q, O)}
    stores = {k: fisherstore.open(os.path.join(path, k), mode="r", backend=k) for k in ("zarr", "tensorstore")}
    views = {(k, n): s.fisher("bench", n) for k, s in stores.items() for n in (Q, O)}
    out: dict[str, Any] = {}
    for blk, (index, name, letter) in head.items():
        def mm_new(h: int, name: str = name, index: Any = index) -> Any:
            m = np.memmap(os.path.join(path, "memmap", name), dtype=np.float32, mode="r", shape=(4096, 4096))
            return np.array(m[index(h)])

        def mm_warm(h: int, name: str = name, index: Any = index) -> Any:
            return np.array(maps[name][index(h)])

        for kind in ("zarr", "tensorstore"):
            def fs_new(h: int, kind: str = kind, name: str = name, letter: str = letter) -> Any:
                with fisherstore.open(os.path.join(path, kind), mode="r", backend=kind) as s:
                    return s.fisher("bench", name).head(h, letter)

            def fs_warm(h: int, kind: str = kind, name: str = name, letter: str = letter) -> Any:
                return views[(kind, name)].head(h, letter)

            for mode, fs, mm in (("new_handle", fs_new, mm_new), ("warm_handle", fs_warm, mm_warm)):
                t_fs, t_mm = [], []
                for i in range(reads + 10):
                    h = i % 8
                    t0 = time.perf_counter()
                    fs(h)
                    t1 = time.perf_counter()
                    mm(h)
                    t2 = time.perf_counter()
                    if i >= 10:  # the first reads warm the caches and the code paths
                        t_fs.append(t1 - t0)
                        t_mm.append(t2 - t1)
                f, m = statistics.median(t_fs), statistics.median(t_mm)
                out[f"{blk}/{kind}/{mode}"] = {"ms": 1e3 * f, "memmap_ms": 1e3 * m, "x_memmap": f / m}
    for s in stores.values():
        s.close()
    return out


def worker_heatmap(path: str) -> dict[str, Any]:
    """One heat map of every Q head block from a cold page cache: seconds and bytes read."""
    import math

    import fisherstore
    from fisherstore.qkov import QKOVIndexer, QKOVInterference

    with fisherstore.open(path, mode="r", backend="zarr") as store:
        qk = QKOVInterference(QKOVIndexer.from_store(store, "a"))
        nbytes = sum(store.samples(t, Q).shape.numel() * store.samples(t, Q).dtype.itemsize for t in "ab")
        nbytes += 4 * math.prod(store.param("a", Q).shape)
        cold = drop_caches()
        t0 = time.perf_counter()
        qk.heatmap_from_store(store, "a", "b", fisher="ema", blocks="Q", memory_budget=GiB, progress=False)
        dt = time.perf_counter() - t0
    return {"seconds": dt, "bytes": nbytes, "GBps": nbytes / dt / 1e9, "cold": cold}


# -- the driver ---------------------------------------------------------------------------------
def run(kind: str, src: str | None, *args: Any, timeout: float = 1800) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("FISHERSTORE_SRC", None)
    if src:
        env["FISHERSTORE_SRC"] = src
    cmd = [sys.executable, "-m", "benchmarks.reads20", "--worker", kind, json.dumps(list(args))]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"worker {kind} ({'baseline' if src else 'this checkout'}) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def versions(src: str | None) -> list[tuple[str, str | None]]:
    return ([("before", src)] if src else []) + [("after", None)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reads20", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=None, help="git revision whose fisherstore is 'before' (e.g. HEAD)")
    ap.add_argument("--samples", type=int, default=32, help="per-sample gradients per task in the heat map stores")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=3, help="rounds of each measurement, alternating the versions")
    ap.add_argument("--reads", type=int, default=100, help="timed reads per head-block measurement and round")
    ap.add_argument("--quick", action="store_true", help="8 samples, 2 rounds, 40 reads")
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "reads20"))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if os.environ.get("FISHERSTORE_SRC"):
            sys.path.insert(0, os.environ["FISHERSTORE_SRC"])
        fn = {"build_latency": build_latency, "build_heatmap": build_heatmap, "latency": worker_latency,
              "memmap": worker_memmap,
              "heatmap": worker_heatmap}[args.worker[0]]
        print(json.dumps(fn(*json.loads(args.worker[1]))))
        return 0
    from benchmarks.disk_vs_ram import check_scratch_dir

    check_scratch_dir(ap, args.dir)
    if args.quick:
        args.samples, args.reps, args.reads = 8, 2, 40
    scratch = tempfile.mkdtemp(prefix="fisherstore-reads20-", dir=args.dir)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"argv": sys.argv[1:], "baseline": args.baseline, "latency": {}, "heatmap": {}}
    try:
        src = None
        if args.baseline:
            src = os.path.join(scratch, "baseline_src")
            os.makedirs(src)
            archive = subprocess.run(["git", "-C", ROOT, "archive", args.baseline, "fisherstore"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
            res["baseline_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", args.baseline], check=True,
                                                    capture_output=True, text=True).stdout.strip()
        writer = src  # the older code writes the stores: both versions read them
        # Head-block reads.
        lat_path = os.path.join(scratch, "latency")
        run("build_latency", writer, lat_path)
        rounds: dict[str, list[dict[str, Any]]] = {v: [] for v, _ in versions(src)}
        alone: list[dict[str, Any]] = []
        for r in range(args.reps):
            order = versions(src) if r % 2 == 0 else versions(src)[::-1]
            for v, s in order:
                rounds[v].append(run("latency", s, lat_path, args.reads))
                print(v, "latency round", r, json.dumps({k: round(x["x_memmap"], 2) for k, x in rounds[v][-1].items()}),
                      flush=True)
                alone.append(run("memmap", None, lat_path, args.reads))  # memmap alone, between the versions
        res["memmap_alone_ms"] = {k: statistics.median(a[k] for a in alone) for k in alone[0]}
        for v, rs in rounds.items():
            res["latency"][v] = {k: {f: statistics.median(x[k][f] for x in rs) for f in rs[0][k]} | {
                "x_memmap_all": [x[k]["x_memmap"] for x in rs]} for k in rs[0]}
            for k, e in res["latency"][v].items():
                blk, _, mode = k.split("/")
                e["x_memmap_alone"] = e["ms"] / res["memmap_alone_ms"][f"{blk}/{mode}"]
        shutil.rmtree(lat_path)
        # Heat maps, one dtype at a time (the disk of this machine is small).
        probe = os.path.join(scratch, "probe.bin")
        buf = os.urandom(64 * MiB)
        with open(probe, "wb") as f:
            for _ in range(32):
                f.write(buf)
            os.fsync(f.fileno())
        for dt in args.dtype:
            path = os.path.join(scratch, f"heat-{dt}")
            run("build_heatmap", writer, path, dt, args.samples)
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v, _ in versions(src)}
            before = cold_read(probe)
            for r in range(args.reps):
                order = versions(src) if r % 2 == 0 else versions(src)[::-1]
                for v, s in order:
                    hm = run("heatmap", s, path)
                    after = cold_read(probe)
                    hm["ceiling_GBps"] = (before + after) / 2
                    hm["x_ceiling"] = hm["GBps"] / hm["ceiling_GBps"]
                    before = after
                    runs[v].append(hm)
                    print(dt, v, "heat map round", r, json.dumps(hm), flush=True)
            res["heatmap"][dt] = {v: {"seconds": statistics.median(x["seconds"] for x in rs),
                                      "GBps": statistics.median(x["GBps"] for x in rs),
                                      "ceiling_GBps": statistics.median(x["ceiling_GBps"] for x in rs),
                                      "x_ceiling": statistics.median(x["x_ceiling"] for x in rs),
                                      "x_ceiling_all": [x["x_ceiling"] for x in rs], "bytes": rs[0]["bytes"],
                                      "cold": all(x["cold"] for x in rs)} for v, rs in runs.items()}
            shutil.rmtree(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res["wall_seconds"] = time.perf_counter() - t_start
    cmd = "python -m benchmarks.reads20 " + " ".join(sys.argv[1:] if argv is None else argv)
    md = report(res, args, cmd.strip())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


def report(res: dict[str, Any], args: argparse.Namespace, cmd: str) -> str:
    vs = list(res["latency"])
    base = f"`{args.baseline}` ({res.get('baseline_commit', '')[:10]})" if args.baseline else "none"
    lines = [f"`{cmd}`", "",
             f"Before: revision {base}; after: this checkout. Each version in its own subprocess, alternated round "
             f"by round ({args.reps} rounds), medians over rounds. Machine: {os.cpu_count()} CPU cores, shared.", "",
             "Head-block read, warm page cache (one LLaMA-2-7B-shaped layer; crc32c checked on every read). "
             f"{args.reads} reads per round and version. × memmap: the median against the median of numpy.memmap "
             "reads of the same blocks (a new memmap, or an open one) in a process of their own that reads nothing "
             "else, run between the versions' rounds (target: ≤ 1.5 new handle, ≤ 2.5 warm handle). × memmap "
             "in-process: against memmap reads interleaved read by read in the version's own process (a version "
             "that churns the heap slows its memmap reads too: before's in-process memmap reads took "
             "~2-5x the memmap-alone time).", "",
             "| block | backend | handle | " + " | ".join(f"{v} ms | {v} × memmap | {v} × memmap in-process"
                                                      for v in vs) + " | memmap alone ms |",
             "|---|---|---|" + "---|---|---|" * len(vs) + "---|"]
    for key in res["latency"][vs[-1]]:
        blk, kind, mode = key.split("/")
        cells = " | ".join(f"{res['latency'][v][key]['ms']:.3f} | {res['latency'][v][key]['x_memmap_alone']:.2f} | "
                           f"{res['latency'][v][key]['x_memmap']:.2f}" for v in vs)
        lines.append(f"| {blk.upper()} ({'rows' if blk == 'q' else 'cols'}) | {kind} | {mode.replace('_', ' ')} | "
                     f"{cells} | {res['memmap_alone_ms'][f'{blk}/{mode}']:.3f} |")
    lines += ["", f"Heat map from a cold page cache (one 4096×4096 q_proj, 32 heads of 128, {args.samples} samples per "
              "task, task A's EMA as the Fisher); × ceiling sets each run against the mean of cold reads of a 2 GiB "
              "file just before and after it (target: bf16 ≥ 0.8).", "",
              "| dtype | version | bytes read | heat map s | GB/s | ceiling GB/s | × ceiling (all rounds) |",
              "|---|---|---|---|---|---|---|"]
    for dt, by in res["heatmap"].items():
        for v, h in by.items():
            lines.append(f"| {dt} | {v} | {h['bytes'] / GiB:.2f} GiB | {h['seconds']:.2f} | {h['GBps']:.2f} | "
                         f"{h['ceiling_GBps']:.2f} | {h['x_ceiling']:.2f} ({', '.join(f'{x:.2f}' for x in h['x_ceiling_all'])}) |")
    lines += ["", f"Wall time {res['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
