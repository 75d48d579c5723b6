"""What collection costs against a plain forward/backward, and multi-pass against streaming.

    python -m benchmarks.collector                 # the committed run (about 4 minutes on 2 CPU cores)
    python -m benchmarks.collector --quick         # CI-sized (well under a minute)
    python -m benchmarks.collector --baseline REV  # also run git revision REV's code ("today") for comparison

Part A, resident: a LLaMA (GQA) with ``params="all"``; every backend with its default
budget (everything resident). Each round times, interleaved so that noise hits all of
them alike, a plain forward/backward of the same micro-batches with the same parameters
requiring grad, then one ``collect_fisher`` step per backend; the ratio is the median over
rounds of collector time / plain time of the same round. Flushes are timed apart.

Part B, state larger than the budget: a wider LLaMA whose tracked state S is 4× the
``memory_budget`` B. ``collect_fisher_dataset`` (multi-pass) against ``collect_fisher`` per
batch at the same budget (the streamed path: what does not fit is read and rewritten every
batch), both ending with their commit, and a plain forward/backward per batch. The target
is multi-pass time per batch ≤ 1.1 × ⌈S/B⌉ × plain + the one write of the state per batch.
The multi-pass result is checked bit for bit against a single pass with a large budget.

On a GPU machine pass ``--device cuda`` (the same parts; ram, zarr and tensorstore with the
default device budget, and ``--device-budget 0`` for the pinned-host path). Results go to
``benchmarks/results/collector[_quick].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SIZES = {  # LLaMA configs: (hidden, layers, heads, kv heads, intermediate, vocab)
    "a": (512, 8, 8, 4, 1408, 16000),  # 40M parameters, 160 MB of fp32 state
    "b": (1024, 6, 16, 4, 2816, 8000),  # 84M parameters, 336 MB of fp32 state
    "a_quick": (256, 4, 4, 2, 704, 4000),
    "b_quick": (384, 4, 6, 2, 1024, 1000),
}


def build(size: str, device: str) -> Any:
    import torch
    import transformers as T

    T.logging.set_verbosity_error()
    h, n, H, Hkv, inter, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=H,
                        num_key_value_heads=Hkv, intermediate_size=inter, max_position_embeddings=1024,
                        tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return T.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()


def batch(rows: int, seq: int, vocab: int, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def plain_step(model: Any, b: dict[str, Any], mbs: int, device: str) -> float:
    """Forward/backward of ``b``'s micro-batches as the collector runs them, every parameter requiring grad."""
    from fisherstore.losses import causal_lm

    b = {k: v.to(device) for k, v in b.items()}
    sync(device)
    t = time.perf_counter()
    for s in range(0, b["input_ids"].shape[0], mbs):
        loss, _ = causal_lm(model, {k: v[s:s + mbs] for k, v in b.items()})
        loss.backward()
    sync(device)
    dt = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return dt


def timed(fn: Any, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def part_a(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    from fisherstore import FisherCollector

    size = "a_quick" if args.quick else "a"
    model = build(size, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    rows, seq, mbs = (4, 64, 2) if args.quick else (8, 128, 4)
    vocab = SIZES[size][5]
    extra = {} if args.device_budget is None else {"device_budget": args.device_budget}
    backends = {"ram": {}, "zarr": extra, "tensorstore": extra}
    fcs = {name: FisherCollector(backend=name, path=os.path.join(scratch, f"a_{name}"), mode="w", params="all",
                                 micro_batch_size=mbs, **kw) for name, kw in backends.items()}
    b0 = batch(rows, seq, vocab, 0)
    plain_step(model, b0, mbs, args.device)  # warm-up: allocator, kernels, threads
    for fc in fcs.values():
        fc.collect_fisher(model, b0, task="a")
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        b = batch(rows, seq, vocab, r + 1)
        row = {"plain": plain_step(model, b, mbs, args.device)}
        for name, fc in fcs.items():
            row[name] = timed(lambda fc=fc, b=b: fc.collect_fisher(model, b, task="a"), args.device)
        rounds.append(row)
    flush = {name: timed(fc.flush, args.device) for name, fc in fcs.items()}
    resident = {name: all(fc.store.param("a", n).resident for n in fc.store.params("a")) for name, fc in fcs.items()}
    for fc in fcs.values():
        fc.close()
    out = {"params": n_params, "state_bytes": 4 * n_params, "tokens_per_step": rows * seq, "micro_batch_size": mbs,
           "rounds": rounds, "flush_s": flush, "resident": resident,
           "plain_s": statistics.median(r["plain"] for r in rounds)}
    out["ratio"] = {name: statistics.median(r[name] / r["plain"] for r in rounds) for name in backends}
    out["s_per_step"] = {name: statistics.median(r[name] for r in rounds) for name in backends}
    return out


def part_b(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    import torch

    from fisherstore import FisherCollector

    size = "b_quick" if args.quick else "b"
    model = build(size, args.device)
    S = 4 * sum(p.numel() for p in model.parameters())
    B = S // 4
    rows, seq, mbs = (4, 64, 4) if args.quick else (4, 128, 4)
    vocab = SIZES[size][5]
    batches = [batch(rows, seq, vocab, 100 + i) for i in range(args.batches)]
    plain_step(model, batches[0], mbs, args.device)  # warm-up
    plain = statistics.median(plain_step(model, b, mbs, args.device) for b in batches)
    out: dict[str, Any] = {"state_bytes": S, "budget_bytes": B, "batches": len(batches), "plain_s": plain,
                           "bound_passes": math.ceil(S / B)}

    fc = FisherCollector(backend="zarr", path=os.path.join(scratch, "b_multi"), mode="w", params="all",
                         micro_batch_size=mbs, memory_budget=B)
    t = time.perf_counter()
    run = fc.collect_fisher_dataset(model, batches, task="a", progress=False)
    total = time.perf_counter() - t
    multi = {n: fc.full_fisher("a", n, bias_corrected=False).load() for n in fc.store.params("a")}
    fc.close()
    out["multipass"] = {"total_s": total, "per_batch_s": total / len(batches), "passes": run.passes,
                        "bound": run.bound, "capacity_bytes": run.capacity_bytes, "write_s": run.write_seconds,
                        "pass_s": run.pass_seconds, "streamed": run.streamed}
    write_per_batch = run.write_seconds / len(batches)
    out["multipass"]["target_s"] = 1.1 * out["bound_passes"] * plain + write_per_batch

    fc = FisherCollector(backend="zarr", path=os.path.join(scratch, "b_stream"), mode="w", params="all",
                         micro_batch_size=mbs, memory_budget=B)
    t = time.perf_counter()
    for b in batches:
        fc.collect_fisher(model, b, task="a")
    fc.flush()
    total = time.perf_counter() - t
    resident = sum(fc.store.param("a", n).resident for n in fc.store.params("a"))
    out["streamed"] = {"total_s": total, "per_batch_s": total / len(batches), "resident_params": resident,
                       "params": len(fc.store.params("a"))}
    fc.close()

    ref = FisherCollector(backend="ram", params="all", micro_batch_size=mbs)
    ref.collect_fisher_dataset(model, batches, task="a", progress=False)
    equal = all(torch.equal(multi[n], ref.full_fisher("a", n, bias_corrected=False).load()) for n in multi)
    out["equal_to_single_pass"] = equal
    return out


#: Budgets of part C, as multiples of the tracked state S.
SHARE_FACTORS = (1.05, 1.25, 2.1)


def part_c(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    """What share of the state a budget keeps resident: part A's model, one micro-batch per step, 2 steps."""
    from fisherstore import FisherCollector

    size = "a_quick" if args.quick else "a"
    model = build(size, args.device)
    S = 4 * sum(p.numel() for p in model.parameters())
    rows, seq = (4, 64) if args.quick else (4, 128)
    out: dict[str, Any] = {"state_bytes": S, "share": {}, "s_per_step": {}}
    for f in SHARE_FACTORS:
        fc = FisherCollector(backend="zarr", path=os.path.join(scratch, f"c{f}"), mode="w", params="all",
                             micro_batch_size=rows, memory_budget=int(f * S))
        times = []
        for i in range(2):
            t = time.perf_counter()
            fc.collect_fisher(model, batch(rows, seq, SIZES[size][5], 200 + i), task="a")
            times.append(time.perf_counter() - t)
        infos = [fc.store.param("a", n) for n in fc.store.params("a")]
        out["share"][str(f)] = sum(4 * math.prod(p.shape) for p in infos if p.resident) / S
        out["s_per_step"][str(f)] = times[-1]
        fc.close()
    return out


def baseline(args: argparse.Namespace, scratch: str, rev: str | None = None) -> dict[str, Any] | None:
    """Run the same parts with git revision ``rev``'s (default ``args.baseline``'s) fisherstore, in a subprocess."""
    rev = rev or args.baseline
    if not rev:
        return None
    src = os.path.join(scratch, f"baseline_src_{rev}")
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "fisherstore"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    cmd = [sys.executable, "-m", "benchmarks.collector", "--worker", "--rounds", str(args.rounds), "--batches",
           str(args.batches), "--device", args.device] + (["--quick"] if args.quick else [])
    env = dict(os.environ, FISHERSTORE_SRC=src)
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def worker(args: argparse.Namespace) -> None:
    """Baseline mode: parts A, B (streamed and multi-pass) and C with another revision's fisherstore."""
    scratch = tempfile.mkdtemp(prefix="fs-collector-base-", dir=args.scratch)
    try:
        a = part_a(args, scratch)
        from fisherstore import FisherCollector

        size = "b_quick" if args.quick else "b"
        model = build(size, args.device)
        S = 4 * sum(p.numel() for p in model.parameters())
        rows, seq, mbs = (4, 64, 4) if args.quick else (4, 128, 4)
        batches = [batch(rows, seq, SIZES[size][5], 100 + i) for i in range(args.batches)]
        fc = FisherCollector(backend="zarr", path=os.path.join(scratch, "b_stream"), mode="w", params="all",
                             micro_batch_size=mbs, memory_budget=S // 4)
        t = time.perf_counter()
        for b in batches:
            fc.collect_fisher(model, b, task="a")
        fc.flush()
        streamed = (time.perf_counter() - t) / len(batches)
        fc.close()
        out = {"a": a, "b_streamed_per_batch_s": streamed}
        if hasattr(FisherCollector, "collect_fisher_dataset"):  # older revisions had no multi-pass
            fc = FisherCollector(backend="zarr", path=os.path.join(scratch, "b_multi"), mode="w", params="all",
                                 micro_batch_size=mbs, memory_budget=S // 4)
            t = time.perf_counter()
            run = fc.collect_fisher_dataset(model, batches, task="a", progress=False)
            out["b_multipass"] = {"per_batch_s": (time.perf_counter() - t) / len(batches), "passes": run.passes}
            fc.close()
        out["c"] = part_c(args, scratch)
        print(json.dumps(out))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report(res: dict[str, Any], cmd: str) -> str:
    a, b, base = res["a"], res["b"], res.get("baseline")
    quick = ["(--quick: a smoke run of the machinery on tiny models; the targets are for the full sizes.)", ""]
    lines = [f"`{cmd}`", "", f"Machine: {res['machine']}; torch {res['torch']}, device {res['device']}.", ""]
    lines += (quick if "--quick" in res["argv"] else []) + [
             "## A. Collector cost against a plain forward/backward (everything resident)", "",
             f"LLaMA (GQA), {a['params'] / 1e6:.0f}M parameters, `params=\"all\"` ({a['state_bytes'] / MiB:.0f} MiB of "
             f"fp32 state), {a['tokens_per_step']} tokens per step in micro-batches of {a['micro_batch_size']} "
             f"sequences; median over {len(a['rounds'])} interleaved rounds. Plain forward/backward: "
             f"{a['plain_s']:.3f} s.", "",
             "| backend (default budget) | s/step | × plain | target | flush s | all resident |" + (
                 " today × plain |" if base else ""),
             "|---|---|---|---|---|---|" + ("---|" if base else "")]
    target = 1.3 if res["device"] == "cpu" else 1.15
    for name, ratio in a["ratio"].items():
        today = f" {base['a']['ratio'][name]:.2f}× |" if base else ""
        lines.append(f"| {name} | {a['s_per_step'][name]:.3f} | {ratio:.2f}× | ≤ {target}× "
                     f"{'met' if ratio <= target else 'MISSED'} | {a['flush_s'][name]:.2f} | {a['resident'][name]} |"
                     + today)
    mp, st = b["multipass"], b["streamed"]
    lines += ["", "## B. State 4× the budget: multi-pass against streaming", "",
              f"LLaMA (GQA), S = {b['state_bytes'] / MiB:.0f} MiB of fp32 state, memory_budget B = "
              f"{b['budget_bytes'] / MiB:.0f} MiB (⌈S/B⌉ = {b['bound_passes']}), {b['batches']} batches; plain "
              f"forward/backward {b['plain_s']:.2f} s per batch.", "",
              "| path | s per batch | × plain | passes | note |", "|---|---|---|---|---|",
              f"| multi-pass (`collect_fisher_dataset`) | {mp['per_batch_s']:.2f} | {mp['per_batch_s'] / b['plain_s']:.2f}× "
              f"| {mp['passes']} | capacity {mp['capacity_bytes'] / MiB:.0f} MiB, each pass leaving its fold's headroom; write of the "
              f"state {mp['write_s']:.2f} s in all |",
              f"| streamed (`collect_fisher` per batch + flush) | {st['per_batch_s']:.2f} | "
              f"{st['per_batch_s'] / b['plain_s']:.2f}× | 1 | {st['resident_params']}/{st['params']} parameters "
              "resident, the rest read and rewritten every batch |"]
    if base:
        if "b_multipass" in base:
            bm = base["b_multipass"]
            lines.append(f"| before: multi-pass (`{res['baseline_rev']}`) | {bm['per_batch_s']:.2f} | "
                         f"{bm['per_batch_s'] / b['plain_s']:.2f}× | {bm['passes']} | the code before this change |")
        lines.append(f"| before: streamed (`{res['baseline_rev']}`) | {base['b_streamed_per_batch_s']:.2f} | "
                     f"{base['b_streamed_per_batch_s'] / b['plain_s']:.2f}× | 1 | the code before this change |")
    early = res.get("earlier")
    if early:
        lines.append(f"| earlier: streamed (`{res['earlier_rev']}`) | {early['b_streamed_per_batch_s']:.2f} | "
                     f"{early['b_streamed_per_batch_s'] / b['plain_s']:.2f}× | 1 | the streamed path before steps were "
                     "atomic (its twins) |")
    verdict = "met" if mp["per_batch_s"] <= mp["target_s"] else "MISSED"
    lines += ["", f"Target: multi-pass ≤ 1.1 × ⌈S/B⌉ × plain + the one write per batch = {mp['target_s']:.2f} s: "
              f"**{verdict}** ({mp['per_batch_s']:.2f} s). Passes: {mp['passes']} (⌈S/B⌉ = {b['bound_passes']}, "
              f"⌈S/capacity⌉ = {mp['bound']}). Equal to a single pass with a large budget, bit for bit: "
              f"**{b['equal_to_single_pass']}**.", ""]
    c = res.get("c")
    if c:
        bc = (base or {}).get("c")
        lines += ["## C. What a budget keeps resident", "",
                  f"Part A's model (S = {c['state_bytes'] / MiB:.0f} MiB), zarr, one micro-batch per step, share of the "
                  "state resident after 2 steps. Target: ≥ 90 % at B = 1.25 × S.", "",
                  "| memory_budget | resident share | s/step |" + (" before: share | before: s/step |" if bc else ""),
                  "|---|---|---|" + ("---|---|" if bc else "")]
        for f in SHARE_FACTORS:
            k = str(f)
            row = f"| {f} × S | {c['share'][k]:.0%} | {c['s_per_step'][k]:.2f} |"
            if bc:
                row += f" {bc['share'][k]:.0%} | {bc['s_per_step'][k]:.2f} |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models, few rounds (CI-sized)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds of part A (default 5; quick 2)")
    ap.add_argument("--batches", type=int, default=None, help="batches of part B (default 3; quick 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--device-budget", type=int, default=None, help="bytes; 0 for the pinned-host path")
    ap.add_argument("--baseline", default=None, help="a git revision whose fisherstore also runs (today's code)")
    ap.add_argument("--earlier", default=None, help="a second, older revision to run the same parts with")
    ap.add_argument("--scratch", default=None, help="scratch directory for the stores (default: system temp)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/collector[_quick])")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.batches = args.batches or (2 if args.quick else 3)
    if os.environ.get("FISHERSTORE_SRC"):
        sys.path.insert(0, os.environ["FISHERSTORE_SRC"])
    if args.worker:
        return worker(args)
    import torch

    scratch = tempfile.mkdtemp(prefix="fs-collector-", dir=args.scratch)
    try:
        res: dict[str, Any] = {"device": args.device, "torch": torch.__version__,
                               "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                               "argv": sys.argv[1:], "baseline_rev": args.baseline}
        res["a"] = part_a(args, scratch)
        res["b"] = part_b(args, scratch)
        res["c"] = part_c(args, scratch)
        res["baseline"] = baseline(args, scratch)
        if args.earlier:
            res["earlier"], res["earlier_rev"] = baseline(args, scratch, args.earlier), args.earlier
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stem = args.out or os.path.join(HERE, "results", "collector_quick" if args.quick else "collector")
    cmd = "python -m benchmarks.collector " + " ".join(sys.argv[1:])
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    md = report(res, cmd.strip())
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
