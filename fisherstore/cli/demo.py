"""``fisherstore demo``: collect two tasks on a tiny LLaMA-style model, read head blocks, score QK-OV.

The README's first command. It needs transformers (the ``hf`` extra); the PNG heat map
needs matplotlib (the ``plot`` extra).

Usage: ``run_demo("/tmp/demo", steps=3)`` → ``{"out", "store", "png", "heat"}``.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from .._version import __version__
from ..errors import InvalidArgumentError

__all__ = ["run_demo", "demo_model", "demo_batch"]


def demo_model(seed: int = 0) -> Any:
    """The demo's tiny LLaMA-style GQA model (2 layers, H=4, H_kv=2, d=16), random weights, in eval mode."""
    import torch
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        attn_implementation="eager")
    model = T.LlamaForCausalLM(cfg)
    return model.eval()


def demo_batch(task_lo: int, seed: int, n: int = 8, seq: int = 16) -> dict[str, Any]:
    """``n`` random sequences of token ids in ``[task_lo, task_lo + 64)``, the last one half padded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(task_lo, task_lo + 64, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run_demo(out: str | None = None, backend: str = "zarr", steps: int = 3, quiet: bool = False) -> dict[str, Any]:
    """The README demo: a tiny GQA model, two tasks, lazy head reads and a QK-OV heat map."""
    from ..collect import FisherCollector
    from ..qkov import QKOVIndexer, QKOVInterference, heatmap_png

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(
            f"the demo needs at least one step per task to have a Fisher to read, got steps={steps!r}"
        )
    say = (lambda *a: None) if quiet else print
    t0 = time.process_time()
    out = out or tempfile.mkdtemp(prefix="fisherstore-demo-")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "fisher.zarr")
    model = demo_model()
    tasks = {"task_a": 0, "task_b": 64}
    say(f"fisherstore {__version__} demo: tiny LLaMA (2 layers, H=4, H_kv=2, d=16) -> {path}")
    with FisherCollector(ema_decay=0.99, backend=backend, path=path, mode="w") as fc:
        for task, lo in tasks.items():
            for i in range(steps):
                fc.collect_fisher(model, demo_batch(lo, seed=100 * lo + i), task=task)
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
        a = fc.sample_gradients(model, demo_batch(0, seed=7, n=4))
        b = fc.sample_gradients(model, demo_batch(64, seed=8, n=4))
        heat = qk.heatmap(a.contributions(), b.signed(), fc.full_fisher("task_a"))
    say("  QK-OV interference, task_a samples x task_b samples, Fisher of task_a (mean over pairs):")
    say("    layer head " + " ".join(f"{blk:>10s}" for blk in "QKVO"))
    for li, layer in enumerate(heat["layers"]):
        for hi, h in enumerate(heat["heads"]):
            say(f"    {layer:5d} {h:4d} " + " ".join(f"{heat[blk][li, hi]:10.3e}" for blk in "QKVO"))
    png = None
    try:
        png = heatmap_png(heat, os.path.join(out, "qkov_heatmap.png"),
                          "QK-OV interference: task_a samples vs task_b samples, EMA Fisher of task_a")
        say(f"  heat map: {png}")
    except ImportError:
        say("  (matplotlib is not installed: pip install 'fisherstore[plot]' for the PNG heat map)")
    say(f"  store: {path}  (inspect it with: fisherstore info {path})")
    say(f"  done in {time.process_time() - t0:.1f} s of CPU time")
    return {"out": out, "store": path, "png": png, "heat": heat}
