"""GPU check of issue 19's paths: the true Fisher (mc, exact), import_adam, ewc_penalty, merge on CUDA.

Run on a GPU machine (falls back to the CPU): ``python -m benchmarks.gpu_estimators OUT.json``. Each CUDA result is
compared with the same computation on the CPU; results: benchmarks/results/gpu_check_2026-12-04.md.
"""
import json
import sys
import tempfile
import time

import torch

import fisherstore
from fisherstore import FisherCollector
from fisherstore.losses import classification

dev = "cuda" if torch.cuda.is_available() else "cpu"
out = []


def emit(**kw):
    out.append(kw)
    print(json.dumps(kw), flush=True)


def rel(a, b):
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max().clamp_min(1e-30))


torch.manual_seed(0)
clf = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
batch = {"inputs": torch.randn(32, 16), "labels": torch.randint(0, 10, (32,))}
ref = {}
for d in ("cpu", dev):
    m = clf.to(d)
    for kind, kw in (("empirical", {}), ("exact", {}), ("mc", dict(mc_samples=8, seed=3))):
        fc = FisherCollector(backend="ram", params="all", loss_fn=classification, fisher_type=kind, micro_batch_size=8, **kw)
        t0 = time.perf_counter()
        fc.collect_fisher(m, batch, task="t")
        s = time.perf_counter() - t0
        F = {n: fc.store.read("t", n) for n in fc.store.params("t")}
        if d == "cpu":
            ref[kind] = F
        else:
            emit(part="fisher_type", kind=kind, device=d, s=round(s, 3),
                 max_rel_err_vs_cpu=max(rel(F[n], ref[kind][n]) for n in F))
clf = clf.cpu()

# a tiny LLaMA on the device: mc with a CUDA generator, exact, through a zarr store with a device budget
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
torch.manual_seed(0)
lm = LlamaForCausalLM(cfg)
lb = {"input_ids": torch.randint(0, 128, (4, 12))}
res = {}
for d in ("cpu", dev):
    m = lm.to(d)
    for kind in ("exact", "mc"):
        with tempfile.TemporaryDirectory() as tmp:
            kw = dict(mc_samples=4, seed=1) if kind == "mc" else {}
            try:
                fc = FisherCollector(backend="zarr", path=tmp + "/s", params="all", fisher_type=kind, micro_batch_size=2,
                                     memory_budget=1 << 30, device_budget=1 << 30 if d != "cpu" else 0, **kw)
                t0 = time.perf_counter()
                fc.collect_fisher(m, lb, task="t")
                fc.flush()
                s = time.perf_counter() - t0
                F = {n: fc.store.read("t", n) for n in fc.store.params("t")}
                fc.close()
                res[(d, kind)] = F
                if d != "cpu":
                    base = res[("cpu", kind)]
                    emit(part="lm_fisher_type", kind=kind, device=d, s=round(s, 3),
                         max_rel_err_vs_cpu=max(rel(F[n], base[n]) for n in F),
                         finite=all(bool(torch.isfinite(v).all()) for v in F.values()))
            except Exception as e:
                emit(part="lm_fisher_type", kind=kind, device=d, error=f"{type(e).__name__}: {e}"[:400])
lm = lm.cpu()

# import_adam from an optimizer whose state lives on the device
try:
    m = clf.to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(3):
        opt.zero_grad()
        classification(m, {k: v.to(dev) for k, v in batch.items()})[0].backward()
        opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        with fisherstore.open(tmp + "/s", mode="w", backend="zarr") as st:
            fisherstore.import_adam(st, "adam", m, opt)
            errs = [rel(st.read("adam", n, bias_corrected=False), opt.state[p]["exp_avg_sq"])
                    for n, p in m.named_parameters()]
    emit(part="import_adam", device=dev, max_rel_err=max(errs))
except Exception as e:
    emit(part="import_adam", error=f"{type(e).__name__}: {e}"[:400])

# ewc_penalty and merge on the device, against the in-RAM formula
try:
    m = clf.to(dev)
    with tempfile.TemporaryDirectory() as tmp:
        fc = FisherCollector(backend="zarr", path=tmp + "/s", params="all", loss_fn=classification)
        fc.collect_fisher(m, batch, task="t")
        fc.flush()
        st = fc.store
        st.save_anchor("t", m)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        m.zero_grad(set_to_none=True)  # the Adam part above left its gradients
        pen = fisherstore.ewc_penalty(m, st, "t")
        pen.backward()
        F = {n: st.read("t", n).to(dev) for n in st.params("t")}
        A = {n: st.anchor("t", n).to(dev) for n in st.params("t")}
        named = dict(m.named_parameters())
        want = sum(((F[n].double() * (named[n].double() - A[n].double()) ** 2).sum()) for n in F)
        gerr = max(rel(named[n].grad, 2 * F[n] * (named[n].detach() - A[n])) for n in F)
        emit(part="ewc_penalty", device=str(pen.device), value_rel_err=abs(float(pen.detach()) - float(want)) / float(want),
             grad_max_rel_err=gerr)
        merged = fisherstore.merge([(m, st, "t"), (st, "t")])
        emit(part="merge", device=dev, n=len(merged), finite=all(bool(torch.isfinite(v).all()) for v in merged.values()))
        fc.close()
except Exception as e:
    import traceback
    traceback.print_exc()
    emit(part="ewc_merge", error=f"{type(e).__name__}: {e}"[:400])
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/extra.json", "w"), indent=1)
