"""Disk vs RAM: stream a 7B-shaped Fisher EMA through every backend, side by side.

    python -m benchmarks.disk_vs_ram --layers 2            # quick run (< 5 min here)
    python -m benchmarks.disk_vs_ram --suite full           # the 7B runs (~40 min, ~55 GB of disk)

Each competitor runs in its own subprocess so its peak RSS (VmHWM) is its own:

* ``ram``: a dict of torch tensors, ``F.mul_(β).add_(x, alpha=1-β)`` per slab;
* ``memmap``: one numpy.memmap file per parameter, updated in place, msync per flush;
* ``zarr`` / ``tensorstore``: fisherstore at a given ``memory_budget``.

Ceilings are measured in the same run on the same filesystem: sequential write+fsync and
cold read of a scratch file (>= 2 GiB), and the RAM EMA bandwidth. Each run reports the
amortised seconds per step (including its share of the final durable flush), effective
GB/s, the ratio of the disk floor (bytes/read_bw + bytes/write_bw per step) to that time,
peak RSS and bytes on disk. Head-block read latency and the Phase-6 sweep (every
(layer, head, block) of the attention Fisher) are measured on the stores the attention
runs leave behind. Results go to OUT.json, OUT.md and OUT.png.
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

GiB = 1 << 30
MiB = 1 << 20


# -- measurement helpers --------------------------------------------------------------
def proc_kib(path: str, field: str) -> int:
    """A ``kB`` field of a /proc file (``VmHWM`` of /proc/self/status, ...), in bytes; 0 if absent."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def vm_hwm() -> int:
    return proc_kib("/proc/self/status", "VmHWM")


def vm_rss() -> int:
    return proc_kib("/proc/self/status", "VmRSS")


def drop_caches() -> bool:
    """Drop the page cache (root only); True if it was dropped."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def mem_available() -> int:
    return proc_kib("/proc/meminfo", "MemAvailable")


def du(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def check_scratch_dir(ap: argparse.ArgumentParser, path: str | None) -> None:
    """Refuse a ``--dir`` that is not an existing directory: argparse's usage error and exit status 2, no traceback."""
    if path is not None and not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        ap.error(f"--dir {path!r} {what}; create it first (on the disk to measure), or leave --dir out for a "
                 "temporary directory")


# -- ceilings -------------------------------------------------------------------------
def ceilings(scratch: str, size: int = 2 * GiB) -> dict[str, float]:
    """Sequential write+fsync and cold read of a scratch file, and the RAM EMA bandwidth."""
    import numpy as np
    import torch

    path = os.path.join(scratch, "ceiling.bin")
    buf = np.random.default_rng(0).integers(0, 255, 64 * MiB, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(buf)):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    write_bw = size / (time.perf_counter() - t0)
    cold = drop_caches()
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MiB):
            pass
    read_bw = size / (time.perf_counter() - t0)
    os.unlink(path)
    F = torch.zeros(GiB // 4)
    x = torch.rand(GiB // 4)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        F.mul_(0.99).add_(x, alpha=0.01)
        ts.append(time.perf_counter() - t0)
    ram_bw = GiB / statistics.median(ts[1:])
    return {"disk_write_GBps": write_bw / 1e9, "disk_read_GBps": read_bw / 1e9, "read_was_cold": cold,
            "ram_ema_GBps": ram_bw / 1e9, "scratch_bytes": size}


# -- one competitor (runs in a subprocess) ---------------------------------------------
def run_competitor(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    import fisherstore
    from benchmarks.workloads import GradSource, state_bytes, workload

    params = workload(spec["workload"], spec.get("layers"))
    total = state_bytes(params)
    kind, steps, beta = spec["competitor"], spec["steps"], 0.99
    flush_every = spec.get("flush_every") or steps
    path = spec.get("path")
    src = GradSource(seed=0)
    base_rss = vm_rss()
    res: dict[str, Any] = {**spec, "state_bytes": total, "rss_after_import": base_rss}
    torch.set_num_threads(2)

    if kind == "ram":
        F = {p.name: torch.zeros(p.shape) for p in params}

        def step(i: int) -> None:
            for p in params:
                for region, x in src.slabs(p, i):
                    F[p.name][region].mul_(beta).add_(x, alpha=1 - beta)

        def flush() -> None:
            pass

        def close() -> None:
            pass
    elif kind == "memmap":
        os.makedirs(path, exist_ok=True)
        M = {}
        for p in params:
            M[p.name] = np.memmap(os.path.join(path, p.name + ".f32"), dtype=np.float32, mode="w+", shape=p.shape)

        def step(i: int) -> None:
            for p in params:
                T = torch.from_numpy(M[p.name])
                for region, x in src.slabs(p, i):
                    T[region].mul_(beta).add_(x, alpha=1 - beta)

        def flush() -> None:
            for m in M.values():
                m.flush()  # msync: durable

        def close() -> None:
            flush()
    else:
        store = fisherstore.open(path, mode="w", backend=kind, decay=beta, memory_budget=spec["budget"],
                                 progress=False)
        for p in params:
            store.create("bench", p.name, p.shape, p.layout)
        res["plan"] = store.plan.describe()
        res["resident_params"] = sum(store.param("bench", p.name).resident for p in params)

        def step(i: int) -> None:
            with store.begin_step("bench") as st:
                for p in params:
                    for region, x in src.slabs(p, i):
                        st.add(p.name, x, region=region)

        def flush() -> None:
            store.flush()

        def close() -> None:
            store.close()

    # warm-up: the first step writes the initial state (creation cost is not update cost)
    step(0)
    flush()
    timed = []
    flush_s = 0.0
    for i in range(1, steps + 1):
        if spec.get("cold") and kind != "ram":
            drop_caches()
        t0 = time.perf_counter()
        step(i)
        if i % flush_every == 0 or i == steps:
            t1 = time.perf_counter()
            flush()
            flush_s += time.perf_counter() - t1
        timed.append(time.perf_counter() - t0)
    total_s = sum(timed)
    res.update(
        steps=steps,
        flush_every=flush_every,
        step_seconds=timed,
        amortised_s_per_step=total_s / steps,
        flush_seconds=flush_s,
        effective_GBps=total * steps / total_s / 1e9,
    )
    if (spec.get("latency") or spec.get("sweep")) and kind != "ram":
        res.update(read_benchmarks(spec, params, kind, path, flush if kind == "memmap" else None,
                                   store if kind in ("zarr", "tensorstore") else None))
    close()
    res["peak_rss"] = vm_hwm()
    res["bytes_on_disk"] = du(path) if path and os.path.exists(path) else 0
    return res


def read_benchmarks(spec, params, kind, path, _flush, store) -> dict[str, Any]:
    """Head-block latency (cold / new handle / warm handle) and the Phase-6 sweep."""
    import numpy as np

    import fisherstore

    q = next(p for p in params if p.layout.kind == "q")
    o = next(p for p in params if p.layout.kind == "o")
    if store is not None:
        store.close()

    def open_block(p, h):
        if kind == "memmap":
            m = np.memmap(os.path.join(path, p.name + ".f32"), dtype=np.float32, mode="r", shape=p.shape)
            return np.array(m[p.layout.head_index(h, p.layout.blocks[0], 2)])
        with fisherstore.open(path, mode="r", backend=kind) as r:
            return r.fisher("bench", p.name).head(h, p.layout.blocks[0])

    out: dict[str, Any] = {}
    if spec.get("latency"):
        lat: dict[str, Any] = {}
        for p in (q, o):
            cold, new, warm = [], [], []
            for h in range(5):
                drop_caches()
                t0 = time.perf_counter()
                open_block(p, h)
                cold.append(time.perf_counter() - t0)
            for h in range(20):
                t0 = time.perf_counter()
                open_block(p, h % 8)
                new.append(time.perf_counter() - t0)
            if kind == "memmap":
                m = np.memmap(os.path.join(path, p.name + ".f32"), dtype=np.float32, mode="r", shape=p.shape)
                get = lambda h, p=p, m=m: np.array(m[p.layout.head_index(h, p.layout.blocks[0], 2)])  # noqa: E731
                r = None
            else:
                r = fisherstore.open(path, mode="r", backend=kind)
                F = r.fisher("bench", p.name)
                get = lambda h, p=p, F=F: F.head(h, p.layout.blocks[0])  # noqa: E731
            for h in range(50):
                t0 = time.perf_counter()
                get(h % 8)
                warm.append(time.perf_counter() - t0)
            if r is not None:
                r.close()
            lat[p.layout.kind] = {k: {"median_ms": 1e3 * statistics.median(v),
                                      "p95_ms": 1e3 * float(np.percentile(v, 95))}
                                  for k, v in (("cold", cold), ("new_handle", new), ("warm_handle", warm))}
        out["block_latency"] = lat
    if spec.get("sweep") and kind in ("zarr", "tensorstore"):
        drop_caches()
        n_bytes = 0
        t0 = time.perf_counter()
        with fisherstore.open(path, mode="r", backend=kind) as r:
            for _name, _h, _b, blk in r.iter_heads("bench"):  # one read-ahead window over every parameter
                n_bytes += blk.numel() * 4
        dt = time.perf_counter() - t0
        out["phase6_sweep"] = {"bytes": n_bytes, "seconds": dt, "GBps": n_bytes / dt / 1e9}
    return out


def spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.disk_vs_ram", "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-3:]
        return {**spec, "error": f"exit {p.returncode}: {' | '.join(tail)}", "wall_s": time.perf_counter() - t0}
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- the plan -------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    L = args.layers
    base = {"steps": args.steps, "cold": not args.warm}
    runs: list[dict[str, Any]] = []

    def add(workload: str, competitors: list[tuple[str, int | None]], **kw: Any) -> None:
        for comp, budget in competitors:
            runs.append({**base, "workload": workload, "layers": L, "competitor": comp, "budget": budget, **kw})

    stream = [("ram", None), ("memmap", None), ("zarr", GiB), ("tensorstore", GiB)]
    if args.suite == "quick":
        add("llama2-7b-full", stream + [("zarr", 4 * GiB), ("tensorstore", 4 * GiB)])
        add("llama2-7b-attn", stream, latency=True, sweep=True)
        add("mistral-7b-attn", [("zarr", GiB), ("tensorstore", GiB)])
        fits = 3 * GiB
    else:
        add("llama2-7b-full", stream + [("zarr", 4 * GiB), ("tensorstore", 4 * GiB)])
        add("llama2-7b-attn", stream, latency=True, sweep=True)
        add("mistral-7b-attn", stream)
        fits = 6 * GiB
    # a budget that holds every tracked parameter, folding every flush_every steps
    fit_layers = 2 if args.suite == "quick" else 8
    for k in (10, 50):
        for comp, budget in (("ram", None), ("zarr", fits), ("tensorstore", fits)):
            if comp == "ram" and k != 10:
                continue
            runs.append({"workload": "llama2-7b-attn", "layers": fit_layers, "competitor": comp, "budget": budget,
                         "steps": k, "flush_every": k, "cold": False, "label": "resident"})
    return runs


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / MiB:.0f} MiB"


def report(results: list[dict[str, Any]], ceil: dict[str, float], overhead: dict[str, Any] | None) -> str:
    rb, wb = ceil["disk_read_GBps"] * 1e9, ceil["disk_write_GBps"] * 1e9
    lines = [
        f"Ceilings (same run, same filesystem): disk write+fsync {ceil['disk_write_GBps']:.2f} GB/s, "
        f"cold read {ceil['disk_read_GBps']:.2f} GB/s, RAM EMA {ceil['ram_ema_GBps']:.2f} GB/s.",
        "",
        "| workload | layers | competitor | budget | steps | s/step (amortised) | GB/s | disk floor / time | "
        "peak RSS | on disk |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        wl = r["workload"] + (" (resident)" if r.get("label") == "resident" else "")
        layers = r.get("layers") or "all"
        budget = fmt_bytes(r["budget"]) if r.get("budget") is not None else "-"
        if "does_not_fit" in r:
            lines.append(f"| {wl} | {layers} | {r['competitor']} | {budget} | - | does not fit (needs "
                         f"{r['does_not_fit'] / GiB:.1f} GiB) | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {wl} | {layers} | {r['competitor']} | {budget} | - | error: {r['error'][:80]} | | | | |")
            continue
        per_step_bytes = r["state_bytes"] / (r["flush_every"] if r.get("label") == "resident" else 1)
        floor = per_step_bytes / rb + per_step_bytes / wb
        ratio = floor / r["amortised_s_per_step"] if r["competitor"] != "ram" else float("nan")
        r["floor_ratio"] = ratio
        lines.append(
            f"| {wl} | {layers} | {r['competitor']} | {budget} | {r['steps']} | {r['amortised_s_per_step']:.2f} | "
            f"{r['effective_GBps']:.2f} | {'-' if ratio != ratio else f'{ratio:.2f}'} | {fmt_bytes(r['peak_rss'])} | "
            f"{fmt_bytes(r['bytes_on_disk']) if r['bytes_on_disk'] else '-'} |"
        )
    res_rows = [r for r in results if r.get("label") == "resident" and "amortised_s_per_step" in r]
    ram = next((r for r in res_rows if r["competitor"] == "ram"), None)
    if ram:
        lines += ["", "Resident set (budget holds every parameter), amortised time per step vs RAM: " + ", ".join(
            f"{r['competitor']} flush_every={r['flush_every']} {r['amortised_s_per_step'] / ram['amortised_s_per_step']:.2f}x"
            for r in res_rows if r is not ram)]
    lat = [r for r in results if "block_latency" in r]
    if lat:
        lines += ["", "| head-block read | competitor | cold median / p95 ms | new handle median / p95 ms | "
                      "warm handle median / p95 ms |", "|---|---|---|---|---|"]
        for r in lat:
            for k, v in r["block_latency"].items():
                cells = " | ".join(f"{v[m]['median_ms']:.2f} / {v[m]['p95_ms']:.2f}" for m in
                                   ("cold", "new_handle", "warm_handle"))
                lines.append(f"| {k} ({'rows' if k == 'q' else 'cols'}) | {r['competitor']} | {cells} |")
        mm = next((r for r in lat if r["competitor"] == "memmap"), None)
        if mm:
            lines.append("")
            for r in lat:
                if r is mm:
                    continue
                ratios = ", ".join(f"{k} {r['block_latency'][k]['new_handle']['median_ms'] / mm['block_latency'][k]['new_handle']['median_ms']:.2f}x"
                                   for k in r["block_latency"])
                lines.append(f"New-handle warm-cache head-block read vs memmap, {r['competitor']}: {ratios}")
    for r in results:
        if "phase6_sweep" in r:
            s = r["phase6_sweep"]
            lines.append(f"Phase-6 sweep ({r['competitor']}): {fmt_bytes(s['bytes'])} in {s['seconds']:.1f} s = "
                         f"{s['GBps']:.2f} GB/s, {s['GBps'] / ceil['disk_read_GBps']:.2f}x the cold read ceiling")
    if overhead:
        lines += ["", "FisherCollector overhead on a tiny LLaMA (same steps): " + ", ".join(
            f"{k} {v['s_per_step'] * 1e3:.0f} ms/step ({v['vs_ram']:.2f}x ram)" for k, v in overhead.items())]
    return "\n".join(lines)


def chart(results: list[dict[str, Any]], ceil: dict[str, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "amortised_s_per_step" in r]
    if not rows:
        return
    labels = [f"{r['workload'].replace('-7b', '')}{'/res' if r.get('label') else ''}\n{r['competitor']}"
              + (f" {r['budget'] // GiB}G" if r.get("budget") else "") for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows)), 4.5), dpi=100)
    ax.bar(range(len(rows)), [r["amortised_s_per_step"] for r in rows], color="tab:blue", label="s/step")
    floors = [r["state_bytes"] / (r["flush_every"] if r.get("label") else 1) *
              (1 / (ceil["disk_read_GBps"] * 1e9) + 1 / (ceil["disk_write_GBps"] * 1e9)) for r in rows]
    ax.scatter(range(len(rows)), floors, color="tab:red", marker="_", s=300, label="disk floor", zorder=3)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("seconds per step (amortised)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("fisherstore: seconds per EMA step vs the disk floor")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def collector_overhead(steps: int = 6) -> dict[str, Any]:
    """Tiny real model: FisherCollector time per step with each backend, same steps."""
    import torch

    from fisherstore import FisherCollector
    from fisherstore.cli.demo import demo_batch, demo_model

    model = demo_model()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for backend in ("ram", "zarr", "tensorstore"):
            torch.manual_seed(0)
            fc = FisherCollector(backend=backend, path=None if backend == "ram" else os.path.join(d, backend),
                                 flush_every=3)
            fc.collect_fisher(model, demo_batch(0, seed=0))  # warm-up
            t0 = time.perf_counter()
            for i in range(steps):
                fc.collect_fisher(model, demo_batch(0, seed=i + 1))
            fc.flush()
            out[backend] = {"s_per_step": (time.perf_counter() - t0) / steps}
            fc.close()
    for v in out.values():
        v["vs_ram"] = v["s_per_step"] / out["ram"]["s_per_step"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.disk_vs_ram", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("quick", "full"), default="quick",
                    help="quick: every workload at --layers (default 2); full: the whole 7B models")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (quick: 2)")
    ap.add_argument("--steps", type=int, default=2, help="timed EMA steps per run (after one warm-up step)")
    ap.add_argument("--warm", action="store_true", help="don't drop the page cache before each timed step")
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results/disk_vs_ram", help="write OUT.json, OUT.md, OUT.png")
    ap.add_argument("--only", default=None,
                    help="run only the runs whose 'workload/competitor/label' contains this (e.g. 'resident')")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per competitor before giving up")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_competitor(json.loads(args.worker))))
        return 0
    check_scratch_dir(ap, args.dir)
    if args.suite == "quick" and args.layers is None:
        args.layers = 2
    from benchmarks.workloads import state_bytes, workload

    scratch = tempfile.mkdtemp(prefix="fisherstore-bench-", dir=args.dir)
    t_start = time.perf_counter()
    try:
        print("measuring ceilings ...", flush=True)
        ceil = ceilings(scratch)
        print(json.dumps(ceil), flush=True)
        results = []
        for spec in plan(args):
            if args.only and args.only not in f"{spec['workload']}/{spec['competitor']}/{spec.get('label', '')}":
                continue
            need = state_bytes(workload(spec["workload"], spec.get("layers")))
            if spec["competitor"] == "ram" and need + 1 * GiB > mem_available():
                res = {**spec, "does_not_fit": need + 1 * GiB}
            else:
                spec["path"] = os.path.join(scratch, f"{spec['workload']}-{spec['competitor']}")
                res = spawn(spec, args.timeout)
                if spec.get("path"):
                    shutil.rmtree(spec["path"], ignore_errors=True)
            results.append(res)
            brief = {k: res.get(k) for k in ("workload", "layers", "competitor", "budget", "amortised_s_per_step",
                                             "peak_rss", "error", "does_not_fit")}
            print(json.dumps(brief), flush=True)
        print("collector overhead on a tiny model ...", flush=True)
        overhead = collector_overhead()
        md = report(results, ceil, overhead)
        print(md)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"args": vars(args), "ceilings": ceil, "results": results, "collector_overhead": overhead,
                       "wall_seconds": time.perf_counter() - t_start}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(f"`python -m benchmarks.disk_vs_ram --suite {args.suite}"
                    + (f" --layers {args.layers}" if args.layers else "") + f" --steps {args.steps}"
                    + (f" --only {args.only}" if args.only else "") + "`\n\n" + md + "\n")
        try:
            chart(results, ceil, args.out + ".png")
        except ImportError:
            print("(matplotlib missing: no chart)")
        print(f"wrote {args.out}.json/.md/.png in {time.perf_counter() - t_start:.0f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
