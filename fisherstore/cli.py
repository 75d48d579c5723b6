"""The ``fisherstore`` command line.

    fisherstore demo [--out DIR]        collect two tasks on a tiny LLaMA-style model, score QK-OV
    fisherstore info PATH [--json]      tasks, parameters, steps, bytes on disk
    fisherstore verify PATH [--json]    check every committed chunk; name what a crash rolled back
    fisherstore unlock PATH --force     remove a stale writer lock whose process is gone

Exit codes: 0 success (verify: clean), 1 an error about the store or its data (verify:
problems found), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

from ._version import __version__
from .errors import FisherStoreError, human_bytes


# -- info ------------------------------------------------------------------------------
def store_info(path: str, backend: str = "zarr") -> dict[str, Any]:
    """A JSON-ready summary of a store: tasks, parameters, steps, bytes and compression."""
    from .api import open as open_store

    with open_store(path, mode="r", backend=backend) as s:
        meta = s.metadata()
        info: dict[str, Any] = {
            "path": os.path.abspath(path),
            "format_version": meta["format_version"],
            "written_by": meta["written_by"],
            "codecs": meta["codecs"],
            "tasks": {},
        }
        total_logical = total_disk = 0
        for task in s.tasks():
            tm = s.metadata(task)
            params = {}
            for name, p in tm["params"].items():
                logical = 4 * math.prod(p["shape"])
                disk = s.nbytes_on_disk(task, name, chunks_only=True, committed=True)
                params[name] = {
                    "shape": list(p["shape"]),
                    "chunks": list(p["chunks"]),
                    "layout": p["layout"].to_dict() if p["layout"] else None,
                    "t_last": p["t_last"],
                    "updates": p["updates"],
                    "nonfinite_skipped": p["nonfinite_skipped"],
                    "bytes": logical,
                    "chunk_bytes_on_disk": disk,
                }
                total_logical += logical
                total_disk += disk
            info["tasks"][task] = {
                "step": tm["step"],
                "tokens_seen": tm["tokens_seen"],
                "estimator": tm["estimator"],
                "model": tm["model"],
                "params": params,
            }
        info["bytes"] = total_logical
        # What a reader sees: the committed generations. A writer's uncommitted work (and what a
        # crash left) is counted apart, so `info` during a flush never reports half a flush.
        info["bytes_on_disk"] = s.nbytes_on_disk(committed=True)
        info["other_bytes_on_disk"] = max(0, s.nbytes_on_disk() - info["bytes_on_disk"])
        info["compression_ratio"] = total_logical / total_disk if total_disk else None
    return info


def _print_info(info: dict[str, Any]) -> None:
    ratio = info["compression_ratio"]
    print(f"{info['path']}  (format {info['format_version']}, {info['written_by']})")
    print(f"  codecs: {info['codecs']}")
    print(f"  {human_bytes(info['bytes'])} of fp32 state, {human_bytes(info['bytes_on_disk'])} committed on disk"
          + (f" (+{human_bytes(info['other_bytes_on_disk'])} metadata and uncommitted)" if info["other_bytes_on_disk"] else "")
          + (f", chunk compression {ratio:.3f}x" if ratio else ""))
    for task, t in info["tasks"].items():
        print(f"  task {task!r}: step {t['step']}, {t['tokens_seen']} tokens, estimator {t['estimator']}, "
              f"{len(t['params'])} params")
        for name, p in t["params"].items():
            kind = (p["layout"] or {}).get("kind", "-")
            print(f"    {name:50s} {kind:5s} {str(tuple(p['shape'])):16s} chunks {str(tuple(p['chunks'])):14s} "
                  f"{human_bytes(p['chunk_bytes_on_disk']):>10s}")


# -- demo ------------------------------------------------------------------------------
def _demo_model(seed: int = 0) -> Any:
    import torch
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    model = T.LlamaForCausalLM(cfg)
    return model.eval()


def _demo_batch(task_lo: int, seed: int, n: int = 8, seq: int = 16) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(task_lo, task_lo + 64, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run_demo(out: str | None = None, backend: str = "zarr", steps: int = 3, quiet: bool = False) -> dict[str, Any]:
    """The README demo: a tiny GQA model, two tasks, lazy head reads and a QK-OV heat map."""
    from .collector import FisherCollector
    from .qkov import QKOVIndexer, QKOVInterference, heatmap_png

    say = (lambda *a: None) if quiet else print
    t0 = time.process_time()
    out = out or tempfile.mkdtemp(prefix="fisherstore-demo-")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "fisher.zarr")
    model = _demo_model()
    tasks = {"task_a": 0, "task_b": 64}
    say(f"fisherstore {__version__} demo: tiny LLaMA (2 layers, H=4, H_kv=2, d=16) -> {path}")
    with FisherCollector(ema_decay=0.99, backend=backend, path=path, mode="w") as fc:
        for task, lo in tasks.items():
            for i in range(steps):
                fc.collect_fisher(model, _demo_batch(lo, seed=100 * lo + i), task=task)
            say(f"  collected {task}: {fc.store.step(task)} EMA steps, {fc.get_token_count(task)} tokens")
        fc.flush()
        q_name = "model.layers.1.self_attn.q_proj.weight"
        F = fc.full_fisher("task_a", q_name)
        block = F.head(3, "Q")
        say(f"  lazy read: {F!r}")
        say(f"    head 3 Q block {tuple(block.shape)} = one chunk {F.chunks}; "
            f"group view equals its sum: {float(block.sum()):.4e} vs "
            f"{float(fc.get_group_fisher('task_a', q_name, 'head')[3]):.4e}")
        idx = QKOVIndexer.from_model(model)
        qk = QKOVInterference(idx)
        a = fc.sample_gradients(model, _demo_batch(0, seed=7, n=4))
        b = fc.sample_gradients(model, _demo_batch(64, seed=8, n=4))
        heat = qk.heatmap(a.contributions(), b.signed(), fc.full_fisher("task_a"))
    say("  QK-OV interference, task_a samples x task_b samples, Fisher of task_a (mean over pairs):")
    say("    layer head " + " ".join(f"{blk:>10s}" for blk in "QKVO"))
    for li, layer in enumerate(heat["layers"]):
        for hi, h in enumerate(heat["heads"]):
            say(f"    {layer:5d} {h:4d} " + " ".join(f"{heat[blk][li, hi]:10.3e}" for blk in "QKVO"))
    png = None
    try:
        png = heatmap_png(heat, os.path.join(out, "qkov_heatmap.png"), "QK-OV interference (task_a vs task_b)")
        say(f"  heat map: {png}")
    except ImportError:
        say("  (matplotlib is not installed: pip install 'fisherstore[plot]' for the PNG heat map)")
    say(f"  store: {path}  (inspect it with: fisherstore info {path})")
    say(f"  done in {time.process_time() - t0:.1f} s of CPU time")
    return {"out": out, "store": path, "png": png, "heat": heat}


# -- verify / unlock -------------------------------------------------------------------
def _print_verify(rep: Any) -> None:
    print(f"{rep.path}: {'clean' if rep.ok else f'{len(rep.problems)} problem(s)'} "
          f"({rep.chunks_checked} chunks, {human_bytes(rep.bytes_checked)} checked)")
    for f in rep.problems:
        print(f"  PROBLEM {f.kind}: {f.message}")
    for f in rep.rolled_back:
        print(f"  rolled back ({f.kind}): {f.message}")
    for n in rep.notes:
        print(f"  note: {n}")


def _unlock(path: str, force: bool) -> int:
    from .lock import LOCK_NAME, StoreLock, holder_alive, read_holder

    lock_path = os.path.join(path, LOCK_NAME)
    holder = read_holder(lock_path)
    if not os.path.exists(lock_path) or not holder:
        print(f"{path}: no writer lock is held")
        return 0
    if not force:
        print(f"fisherstore: error: {path} has a writer lock record from pid {holder.get('pid')} on host "
              f"{holder.get('host')}; pass --force to remove it once you are sure that writer is gone",
              file=sys.stderr)
        return 2
    if holder_alive(holder):
        print(f"fisherstore: error: pid {holder['pid']} on this host still runs; it holds the store. "
              "Stop it first.", file=sys.stderr)
        return 1
    lock = StoreLock(path, force=True)
    lock.acquire()  # raises StoreLockedError if a live writer really holds it
    lock.release()
    print(f"{path}: removed the stale lock of pid {holder.get('pid')} on host {holder.get('host')}")
    return 0


# -- entry point -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fisherstore", description="Full elementwise Fisher information, on disk.",
                                 epilog="Exit codes: 0 ok, 1 store/data error, 2 usage error.")
    ap.add_argument("--version", action="version", version=f"fisherstore {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="collect two tasks on a tiny model and print a QK-OV table",
                       description="Build a tiny LLaMA-style GQA model, collect two tasks into a Zarr store, "
                                   "read head blocks lazily and print per-(layer, head, block) interference.")
    d.add_argument("--out", help="output directory (default: a new temporary directory)")
    d.add_argument("--backend", choices=("zarr", "tensorstore"), default="zarr")
    d.add_argument("--steps", type=int, default=3, help="collect_fisher calls per task (default 3)")
    for name, help_, desc in (
        ("info", "describe a store", "Print tasks, parameters, shapes, steps, bytes on disk and compression ratio."),
        ("verify", "check every committed chunk of a store",
         "Read every chunk of every committed generation and check its crc32c checksum; list what an "
         "interrupted writer left behind (rolled back). Exit 0 clean, 1 problems found, 2 usage."),
    ):
        p = sub.add_parser(name, help=help_, description=desc)
        p.add_argument("path")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--backend", choices=("zarr", "tensorstore"), default="zarr")
    u = sub.add_parser("unlock", help="remove a stale writer lock",
                       description="Remove the writer lock of a process that is gone (pidfile locks; an "
                                   "flock lock is released by the kernel when its writer dies).")
    u.add_argument("path")
    u.add_argument("--force", action="store_true", help="required: confirm the writer is gone")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "demo":
            run_demo(args.out, backend=args.backend, steps=args.steps)
        elif args.cmd == "info":
            info = store_info(args.path, backend=args.backend)
            if args.json:
                json.dump(info, sys.stdout, indent=1)
                print()
            else:
                _print_info(info)
        elif args.cmd == "verify":
            from .verify import verify_store

            rep = verify_store(args.path, backend=args.backend)
            if args.json:
                json.dump(rep.to_dict(), sys.stdout, indent=1)
                print()
            else:
                _print_verify(rep)
            return 0 if rep.ok else 1
        elif args.cmd == "unlock":
            return _unlock(args.path, args.force)
    except (FisherStoreError, OSError) as e:
        print(f"fisherstore: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
