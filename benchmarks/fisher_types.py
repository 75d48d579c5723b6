"""What the true Fisher costs: ``fisher_type="mc"`` (k draws) and ``"exact"`` against a plain forward/backward.

    python -m benchmarks.fisher_types            # the committed run (about 90 s on 2 CPU cores)
    python -m benchmarks.fisher_types --quick    # CI-sized (about 10 s)

Two models, on the CPU, one after the other:

* **LM**: a LLaMA (GQA) built from a ``LlamaConfig`` with random weights, vocabulary 256.
  The vocabulary is that small so that ``"exact"`` (one backward per target position and
  class, refused above ``EXACT_MAX_CLASSES`` = 1024 classes) stays affordable; every
  configuration of the LM uses it. Loss: :data:`fisherstore.losses.causal_lm`.
* **MLP**: a softmax classifier (two hidden layers) on random inputs, with C = 10 and with
  C = 100 classes, where ``"exact"`` is the natural choice. Loss:
  :data:`fisherstore.losses.classification`.

For each model every round times, one after the other on the same batch, each
configuration below; the order is reversed every other round so that the drift of a
shared machine falls on all of them alike. A configuration's ratio is the median over
rounds of its time / the plain forward/backward time of the same round; its seconds per
batch are the median over rounds.

* ``plain fwd/bwd`` (the reference): the token-summed cross entropy of each micro-batch
  (the same micro-batches the collector runs), ``loss.backward()``, every parameter
  requiring grad, no store.
* ``forward only``: the same forwards, no backward (to split plain into F + B).
* ``empirical``, ``mc k=1``, ``mc k=4``, ``mc k=16``, ``exact``: one
  ``FisherCollector(backend="ram", params="all", fisher_type=..., mc_samples=k, seed=0)``
  step per batch (``collect_fisher``).
* ``empirical (zarr)``: the same as ``empirical`` into a zarr store in a temp dir (default
  budget: the state stays resident, and the write is the flush, timed once at the end), so
  the table says what the store adds.
* ``mc k=16 (autograd only)`` and ``exact (autograd only)``: the same backward passes
  (:func:`fisherstore.collect.fisher_types.backward_passes`, ``retain_graph`` between them)
  with no collector: no hooks, no squares, no store. What is left between these and the
  collector rows is the collector's per-pass work.

On paper, with F a micro-batch's forward and B its backward (B ≈ 2F): ``mc`` with k draws
costs F + kB per micro-batch, (1 + 2k)/3 of a forward/backward; ``exact`` costs F + P·C·B
(P target positions, C classes), (n + 2·P·C)/(3n) over a batch of n micro-batches. The
tables give that and the same with this machine's own F and B (forward only, and plain
less it). torch runs on ``--threads`` threads (default 1: the models are tiny and the
machine is shared, where more threads than free cores makes every op wait for the slowest).
Results go to ``benchmarks/results/fisher_types[_quick].{md,json}`` (``--out STEM``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

#: The LLaMA of the LM part: (hidden, layers, heads, kv heads, intermediate). Vocabulary 256 always.
LM_SIZES = {"full": (128, 2, 4, 2, 344), "quick": (32, 1, 4, 2, 88)}
VOCAB = 256
#: Rows, sequence length, micro-batch size of one LM batch (target positions = rows × (seq - 1)).
LM_BATCH = {"full": (4, 5, 2), "quick": (2, 3, 2)}
#: The MLP classifier: (inputs, hidden); rows and micro-batch size of a batch.
MLP_SIZES = {"full": (256, 512), "quick": (32, 64)}
MLP_BATCH = {"full": (32, 8), "quick": (8, 4)}
MLP_CLASSES = (10, 100)
MC_KS = (1, 4, 16)


# -- models and batches ---------------------------------------------------------------------------
def build_lm(size: str) -> Any:
    import torch
    import transformers as T

    T.logging.set_verbosity_error()
    h, n, H, Hkv, inter = LM_SIZES[size]
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=h, num_hidden_layers=n, num_attention_heads=H,
                        num_key_value_heads=Hkv, intermediate_size=inter, max_position_embeddings=64,
                        tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def build_mlp(size: str, classes: int) -> Any:
    import torch
    from torch import nn

    d, h = MLP_SIZES[size]
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, classes)).eval()


def lm_batch(rows: int, seq: int, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def mlp_batch(rows: int, d: int, classes: int, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randn(rows, d, generator=g), "labels": torch.randint(0, classes, (rows,), generator=g)}


def micro_batches(b: dict[str, Any], mbs: int) -> list[dict[str, Any]]:
    rows = next(iter(b.values())).shape[0]
    return [{k: v[s:s + mbs] for k, v in b.items()} for s in range(0, rows, mbs)]


# -- what one round times -------------------------------------------------------------------------
def plain(model: Any, loss_fn: Any, b: dict[str, Any], mbs: int) -> float:
    """The reference: each micro-batch's token-summed cross entropy, ``loss.backward()``."""
    t = time.perf_counter()
    for mb in micro_batches(b, mbs):
        loss, _ = loss_fn(model, mb)
        loss.backward()
    dt = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return dt


def forward_only(model: Any, loss_fn: Any, b: dict[str, Any], mbs: int) -> float:
    """The same forwards (building the graph), no backward."""
    t = time.perf_counter()
    for mb in micro_batches(b, mbs):
        loss, _ = loss_fn(model, mb)
        del loss
    return time.perf_counter() - t


def autograd_only(model: Any, loss_fn: Any, b: dict[str, Any], mbs: int, fisher_type: str, k: int) -> float:
    """The backward passes of ``fisher_type`` with no collector: no hooks, no squares, no store."""

    from fisherstore.collect.fisher_types import backward_passes

    t = time.perf_counter()
    for i, mb in enumerate(micro_batches(b, mbs)):
        passes = backward_passes(fisher_type, loss_fn, model, mb, mc_samples=k, seed=i if fisher_type == "mc" else None)
        for loss, _w, more in passes.items:
            loss.backward(retain_graph=more)
    dt = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return dt


def collector_step(fc: Any, model: Any, b: dict[str, Any]) -> float:
    t = time.perf_counter()
    fc.collect_fisher(model, b, task="bench")
    return time.perf_counter() - t


# -- one model ------------------------------------------------------------------------------------
def run_model(label: str, model: Any, loss_fn: Any, batches: list[dict[str, Any]], warm: dict[str, Any], mbs: int,
              positions: int, classes: int, scratch: str) -> dict[str, Any]:
    """Time every configuration on ``batches`` (one per round), alternating their order round by round."""
    from fisherstore import FisherCollector

    n_mb = len(micro_batches(batches[0], mbs))
    configs: dict[str, Callable[[dict[str, Any]], float]] = {
        "plain fwd/bwd": lambda b: plain(model, loss_fn, b, mbs),
        "forward only": lambda b: forward_only(model, loss_fn, b, mbs),
    }
    passes = {"plain fwd/bwd": n_mb, "forward only": 0}
    fcs: dict[str, Any] = {}

    def add_fc(name: str, fisher_type: str, k: int = 1, backend: str = "ram") -> None:
        path = os.path.join(scratch, f"{label}_{len(fcs)}") if backend != "ram" else None
        fcs[name] = fc = FisherCollector(backend=backend, path=path, mode="w", params="all", micro_batch_size=mbs,
                                         loss_fn=loss_fn, fisher_type=fisher_type, mc_samples=k, seed=0)
        configs[name] = lambda b: collector_step(fc, model, b)
        passes[name] = {"empirical": n_mb, "mc": k * n_mb, "exact": positions * classes}[fisher_type]

    add_fc("empirical", "empirical")
    add_fc("empirical (zarr)", "empirical", backend="zarr")
    for k in MC_KS:
        add_fc(f"mc k={k}", "mc", k)
    add_fc("exact", "exact")
    k = MC_KS[-1]
    configs[f"mc k={k} (autograd only)"] = lambda b: autograd_only(model, loss_fn, b, mbs, "mc", k)
    passes[f"mc k={k} (autograd only)"] = k * n_mb
    configs["exact (autograd only)"] = lambda b: autograd_only(model, loss_fn, b, mbs, "exact", 1)
    passes["exact (autograd only)"] = positions * classes

    for fn in configs.values():  # warm-up on a small batch: allocator, threads, each store's first step
        fn(warm)
    names = list(configs)
    rounds: list[dict[str, float]] = []
    for r, b in enumerate(batches):
        row = {}
        for name in names if r % 2 == 0 else names[::-1]:
            row[name] = configs[name](b)
        rounds.append(row)
        print(f"{label} round {r}: " + ", ".join(f"{n} {row[n]:.3f}s" for n in names), file=sys.stderr, flush=True)
    flush = {}
    for name, fc in fcs.items():
        t = time.perf_counter()
        fc.flush()
        flush[name] = time.perf_counter() - t
        fc.close()
    med = {n: statistics.median(r[n] for r in rounds) for n in names}
    ratio = {n: statistics.median(r[n] / r["plain fwd/bwd"] for r in rounds) for n in names}
    F = med["forward only"]
    Bw = max(med["plain fwd/bwd"] - F, 1e-12) / n_mb  # one micro-batch's backward
    paper, paper_here = {}, {}
    for n in names:  # every configuration runs one forward per micro-batch, then its passes
        paper[n] = (n_mb + 2 * passes[n]) / (3 * n_mb)  # B = 2F
        paper_here[n] = (F + Bw * passes[n]) / med["plain fwd/bwd"]
    return {"label": label, "params": sum(p.numel() for p in model.parameters()), "micro_batches": n_mb,
            "micro_batch_size": mbs, "rows": next(iter(batches[0].values())).shape[0], "positions": positions,
            "classes": classes, "rounds": rounds, "s_per_batch": med, "ratio": ratio, "passes": passes,
            "paper": paper, "paper_here": paper_here, "flush_s": flush, "forward_s": F,
            "backward_s_per_micro_batch": Bw}


# -- the report -----------------------------------------------------------------------------------
def per_pass(m: dict[str, Any], name: str) -> float:
    """Seconds per backward pass of ``name``: its forwards (as measured alone) and, for a collector row, the
    collector's fixed cost per step (``empirical`` less plain) taken out."""
    s = m["s_per_batch"]
    fixed = 0.0 if "autograd" in name else s["empirical"] - s["plain fwd/bwd"]
    return (s[name] - m["forward_s"] - fixed) / m["passes"][name]


def report(res: dict[str, Any], cmd: str) -> str:
    lines = [f"`{cmd}`", "",
             f"Machine: {res['machine']}; torch {res['torch']} on {res['threads']} thread(s), transformers "
             f"{res['transformers']}, device cpu. Load average {res['load_before']:.1f} before, "
             f"{res['load_after']:.1f} after (a shared machine); {res['wall_s']:.0f} s in all.", ""]
    if res["quick"]:
        lines += ["(--quick: a smoke run of the machinery on tiny models and batches.)", ""]
    lines += ["Seconds per batch (median over interleaved rounds, the order reversed every other round) and the "
              "median ratio to the plain forward/backward of the same round. Paper: F + passes·B against "
              "F + B per micro-batch, with B = 2F (\"B = 2F\") and with this machine's F (forward only) and B "
              "(plain less it, \"F, B here\"). Stores collect `params=\"all\"`; the zarr store keeps its state "
              "resident and writes it at the flush, timed once after the rounds.", ""]
    for m in res["models"]:
        lines += [f"## {m['title']}", "",
                  f"{m['params']:,} parameters; a batch of {m['rows']} rows in {m['micro_batches']} micro-batch(es) of "
                  f"{m['micro_batch_size']}, {m['positions']} target positions, C = {m['classes']} classes; "
                  f"{len(m['rounds'])} rounds. Forward {m['forward_s'] * 1e3:.1f} ms per batch, backward "
                  f"{m['backward_s_per_micro_batch'] * 1e3:.2f} ms per micro-batch (plain less forward).", "",
                  "| configuration | backward passes / batch | s / batch | × plain | paper × plain (B = 2F) "
                  "| paper × plain (F, B here) |",
                  "|---|---|---|---|---|---|"]
        for n, s in m["s_per_batch"].items():
            lines.append(f"| {n} | {m['passes'][n]} | {s:.4f} | {m['ratio'][n]:.2f}× | {m['paper'][n]:.2f}× | "
                         f"{m['paper_here'][n]:.2f}× |")
        zarr_add = m["s_per_batch"]["empirical (zarr)"] - m["s_per_batch"]["empirical"]
        k = MC_KS[-1]
        lines += ["", "Per backward pass (forward and the collector's fixed cost per step taken out): plain "
                  f"{m['backward_s_per_micro_batch'] * 1e3:.2f} ms, "
                  f"mc k={k} {per_pass(m, f'mc k={k}') * 1e3:.2f} ms (autograd only "
                  f"{per_pass(m, f'mc k={k} (autograd only)') * 1e3:.2f} ms), exact {per_pass(m, 'exact') * 1e3:.2f} ms "
                  f"(autograd only {per_pass(m, 'exact (autograd only)') * 1e3:.2f} ms). The zarr store adds "
                  f"{zarr_add * 1e3:+.1f} ms per step to the ram store's (resident state), and "
                  f"{m['flush_s']['empirical (zarr)']:.2f} s for its flush (ram: {m['flush_s']['empirical']:.3f} s).",
                  ""]
    lines += differ(res)
    return "\n".join(lines)


def differ(res: dict[str, Any]) -> list[str]:
    """Where measured and paper part, model by model, from the figures above."""
    k = MC_KS[-1]
    lines = ["## Where measured and paper differ", "",
             "Three things the paper's F + passes·B leaves out, each measured above:", "",
             "1. **B need not be 2F.** The paper's (1 + 2k)/3 assumes a backward costs two forwards (B / F below); the column "
             "\"F, B here\" puts in this machine's own; the *autograd only* rows run the same passes "
             "themselves, with nothing else, to compare it with.",
             "2. **A fixed cost per step.** The collector's step (hooks, the store's step, the EMA update of every "
             "tracked parameter, the group view) costs the same whatever the fisher type: `empirical` less plain. "
             "On these small models it is a large share of plain, which lifts every collector row, most of all the "
             "cheap ones (empirical, mc k=1).",
             "3. **Work per pass.** With more than one pass per micro-batch, each pass's hooks square the gradient "
             "of every tracked parameter, multiply it by its weight (1/k, or p(y)) and add it to a per-micro-batch "
             "fp32 sum: three elementwise passes over all parameters per backward pass, on top of autograd's. "
             "That is the gap between a collector row and its *autograd only* row.", "",
             "| model | B / F here | fixed cost per step (empirical − plain) | plain backward per micro-batch | "
             f"mc k={k}: ms per pass, collector / autograd only | exact: ms per pass, collector / autograd only |",
             "|---|---|---|---|---|---|"]
    for m in res["models"]:
        F1 = m["forward_s"] / m["micro_batches"]
        fixed = m["s_per_batch"]["empirical"] - m["s_per_batch"]["plain fwd/bwd"]
        plain_s = m["s_per_batch"]["plain fwd/bwd"]
        lines.append(
            f"| {m['label']} | {m['backward_s_per_micro_batch'] / F1:.2f} | {fixed * 1e3:.2f} ms "
            f"({fixed / plain_s:.2f}× plain) | {m['backward_s_per_micro_batch'] * 1e3:.2f} ms | "
            f"{per_pass(m, f'mc k={k}') * 1e3:.2f} / {per_pass(m, f'mc k={k} (autograd only)') * 1e3:.2f} | "
            f"{per_pass(m, 'exact') * 1e3:.2f} / {per_pass(m, 'exact (autograd only)') * 1e3:.2f} |")
    lines.append("")
    return lines


def check_out(ap: argparse.ArgumentParser, out: str) -> str:
    stem = out[:-3] if out.endswith(".md") else out
    where = os.path.dirname(os.path.abspath(stem))
    if not os.path.isdir(where):
        ap.error(f"--out {out!r}: the directory {where!r} does not exist")
    return stem


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fisher_types", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and batches, 2 rounds (CI-sized)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per model (default 5; quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--scratch", default=None, help="directory for the zarr stores (default: system temp)")
    ap.add_argument("--out", default=None, help="output stem, .md and .json (default benchmarks/results/fisher_types"
                    "[_quick])")
    args = ap.parse_args(argv)
    stem = check_out(ap, args.out or os.path.join(HERE, "results", "fisher_types_quick" if args.quick else "fisher_types"))
    rounds = args.rounds or (2 if args.quick else 5)
    if rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be positive")
    if args.scratch is not None and not os.path.isdir(args.scratch):
        ap.error(f"--scratch {args.scratch!r} is not a directory")
    import torch
    import transformers

    from fisherstore.losses import causal_lm, classification

    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "full"
    t0 = time.perf_counter()
    res: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} "
                           "CPU cores", "argv": sys.argv[1:] if argv is None else argv, "quick": args.quick,
                           "load_before": os.getloadavg()[0], "models": []}
    scratch = tempfile.mkdtemp(prefix="fs-fisher-types-", dir=args.scratch)
    try:
        rows, seq, mbs = LM_BATCH[size]
        lm = build_lm(size)
        m = run_model("lm", lm, causal_lm, [lm_batch(rows, seq, 1 + r) for r in range(rounds)], lm_batch(1, 2, 0),
                      mbs, rows * (seq - 1), VOCAB, scratch)
        h, n, H, Hkv, inter = LM_SIZES[size]
        m["title"] = (f"LM: LLaMA (GQA) from LlamaConfig, random weights, hidden {h}, {n} layer(s), {H} heads "
                      f"({Hkv} kv), vocabulary {VOCAB}, sequences of {seq} tokens")
        res["models"].append(m)
        d, hid = MLP_SIZES[size]
        rows, mbs = MLP_BATCH[size]
        for C in MLP_CLASSES:
            mlp = build_mlp(size, C)
            m = run_model(f"mlp{C}", mlp, classification, [mlp_batch(rows, d, C, 1 + r) for r in range(rounds)],
                          mlp_batch(1, d, C, 0), mbs, rows, C, scratch)
            m["title"] = (f"MLP classifier, C = {C}: {d} → {hid} → {hid} → {C}, ReLU, random inputs and labels")
            res["models"].append(m)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res["wall_s"] = time.perf_counter() - t0
    res["load_after"] = os.getloadavg()[0]
    cmd = " ".join(["python -m benchmarks.fisher_types", *res["argv"]])
    md = report(res, cmd)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
