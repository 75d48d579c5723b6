"""FisherCollector: point it at a model and batches; it streams each grad² EMA to a store.

TensorScope users know the interface (``ema_decay``, ``reduction="group"``,
``collect_fisher``, ``fisher_ema``, ``get_group_fisher``); what is new is ``backend=``,
``path=`` and ``full_fisher()``, which gives the *full* Fisher of every tracked parameter
as lazy, head-chunked tensors::

    fc = FisherCollector(backend="zarr", path="fisher.zarr")
    fc.collect_fisher(model, batch, task="math")
    F = fc.full_fisher("math", "model.layers.0.self_attn.q_proj.weight")
    F[h * d:(h + 1) * d, :]          # one chunk read

What ``x`` is (recorded as the task's ``estimator``):

* ``"micro_batch"`` (default): ``x = Σ_mb (∇ Σ_{tokens∈mb} ℓ)² / T``. Each micro-batch's
  gradient is squared on its own, so with ``micro_batch_size=1`` this is the empirical
  Fisher over sequences.
* ``"batch"``: ``x = (∇ Σ_{tokens∈batch} ℓ)² / T``, the square of the summed gradient,
  i.e. (E g)² rather than E[g²] (TensorScope's quantity, normalised the same way).

``T`` is the number of predicted tokens in the batch (labels ≠ -100 after the shift).
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .api import open as open_store
from .ema import accumulate_, readout_scale, step_weight
from .errors import UnknownParamError, UnknownTaskError, close_matches, listing
from .layout import ParamLayout
from .models import attention_param_names, layouts_from_model, model_description

__all__ = ["FisherCollector", "SampleGrads", "group_reduce"]

ESTIMATORS = ("micro_batch", "batch")
ParamFilter = str | Iterable[str] | Callable[[str, nn.Parameter], bool] | None


def group_reduce(x: torch.Tensor, layout: ParamLayout | None) -> dict[str, torch.Tensor]:
    """Reduce a full (squared-gradient or Fisher) tensor to TensorScope's group vectors.

    Attention parameters give one value per head block (``"head"``; a fused QKV gives
    ``"head_q"``, ``"head_k"``, ``"head_v"``), counting each GQA key/value head once.
    2-D tensors without heads give ``"channel"`` (sum per row), embeddings ``"token"``,
    1-D tensors their full vector (``"bias"`` or ``"row"``), anything else ``"param"``.
    """
    if layout is not None and layout.has_heads:
        out = {}
        for b in layout.blocks:
            reps = range(0, layout.num_heads, layout.group_size) if b in "KV" else range(layout.num_heads)
            vals = torch.stack([x[layout.head_index(h, b, x.ndim)].sum() for h in reps])
            out["head" if len(layout.blocks) == 1 else f"head_{b.lower()}"] = vals
        return out
    kind = layout.kind if layout is not None else "other"
    if x.ndim == 2:
        return {"token" if kind == "embedding" else "channel": x.sum(dim=1)}
    if x.ndim == 1:
        return {"bias" if kind == "bias" else "row": x.clone()}
    return {"param": x.clone()}


@dataclass
class SampleGrads:
    """Per-sample gradients of each sample's token-summed loss, and its token counts."""

    grads: dict[str, torch.Tensor]  # name -> [n, *shape]
    tokens: torch.Tensor  # [n]

    def contributions(self) -> dict[str, torch.Tensor]:
        """C_i = g_i² / T_i, a per-sample squared gradient normalised like the Fisher."""
        t = self.tokens.float()
        return {n: g.pow(2) / t.view(-1, *[1] * (g.ndim - 1)) for n, g in self.grads.items()}

    def signed(self) -> dict[str, torch.Tensor]:
        """g_j / T_j, the per-sample gradient of the token-mean loss (signed)."""
        t = self.tokens.float()
        return {n: g / t.view(-1, *[1] * (g.ndim - 1)) for n, g in self.grads.items()}


class FisherCollector:
    """Collect EMA Fisher information of a model's parameters into a fisherstore store.

    Args:
        reduction: ``"group"`` (TensorScope's group vectors are kept alongside the full
            tensors). The full tensors are always stored.
        ema_decay: EMA β.
        backend: ``"ram"``, ``"zarr"`` or ``"tensorstore"``.
        path: the store directory (required for disk backends; reopened if it exists).
        params: which parameters to track: None (default) for the attention projection
            weights, ``"all"``, a list of names or regular expressions, or a callable
            ``(name, param) -> bool``.
        micro_batch_size: sequences per forward/backward.
        memory_budget: bytes of RAM the store may hold (see :func:`fisherstore.open`).
        estimator: ``"micro_batch"`` (default) or ``"batch"``; see the module docstring.
        flush_every: flush the store every N steps (default: on ``flush()``/``close()``).
        mode: how to open ``path``: ``"a"`` (default, continue or create) or ``"w"`` (replace).
        **store_options: passed to :func:`fisherstore.open`, e.g. ``group=RankGroup.from_torch()``
            to have each rank of a ``torch.distributed`` job write the parameters it owns
            (its group view then holds only those).
    """

    def __init__(
        self,
        reduction: str = "group",
        ema_decay: float = 0.99,
        *,
        backend: str = "ram",
        path: str | None = None,
        params: ParamFilter = None,
        micro_batch_size: int = 4,
        memory_budget: int | None = None,
        estimator: str = "micro_batch",
        flush_every: int | None = None,
        mode: str = "a",
        **store_options: Any,
    ) -> None:
        if reduction not in ("group", "param"):
            raise ValueError(f"reduction must be 'group' or 'param', got {reduction!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
        self.reduction = reduction
        self.ema_decay = ema_decay
        self.params = params
        self.micro_batch_size = micro_batch_size
        self.estimator = estimator
        self.store = open_store(
            path,
            mode=mode,
            backend=backend,
            decay=ema_decay,
            memory_budget=memory_budget,
            flush_every=flush_every,
            **store_options,
        )
        # Group EMAs are tiny, so they live in RAM: {task: {key: [raw EMA, t_last]}}.
        self._groups: dict[str, dict[str, list[Any]]] = {}
        self._layout_cache: dict[int, dict[str, ParamLayout]] = {}

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> FisherCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        return (
            f"FisherCollector(backend={self.store.backend_name!r}, path={self.store.path!r}, "
            f"ema_decay={self.ema_decay}, estimator={self.estimator!r}, tasks={self.store.tasks()})"
        )

    # -- collection ---------------------------------------------------------------------
    def collect_fisher(self, model: nn.Module, batch: Mapping[str, torch.Tensor], task: str = "default",
                       mode: str = "ema") -> None:
        """One EMA step of ``task`` from ``batch`` (``input_ids``, ``attention_mask``, ``labels``)."""
        if mode != "ema":
            raise ValueError(f"mode {mode!r} is not supported; FisherCollector collects mode='ema'")
        self.update_fisher_ema(model, batch, task)

    def update_fisher_ema(self, model: nn.Module, batch: Mapping[str, torch.Tensor], task: str = "default") -> None:
        """Micro-batched forward/backward; each tracked grad² streams to the store as soon as it is final."""
        layouts = self.layouts(model)
        tracked = self._select(model, layouts)
        ids, mask, labels = _prepare(batch, next(model.parameters()).device)
        T = int((labels[:, 1:] != -100).sum())
        if T == 0:
            raise ValueError("the batch has no tokens to predict (every label is -100 or sequences have length 1)")
        named = dict(model.named_parameters())
        was_training = model.training
        saved = {n: p.requires_grad for n, p in named.items()}
        # A caller's stale .grad would be summed into the first micro-batch: stash it.
        saved_grads = {n: named[n].grad for n in tracked}
        for n in tracked:
            named[n].grad = None
        group_x: dict[str, dict[str, torch.Tensor]] = {}
        n_mb = (ids.shape[0] + self.micro_batch_size - 1) // self.micro_batch_size
        state = {"last": False}
        handles = []
        new_task = task not in self.store.tasks()
        if self.reduction == "group":
            self._task_groups(task)  # after a reopen, rebuild the group view before this step
        # Create in model order before any hook fires: under a rank group, creation is
        # collective and decides which rank owns which parameter.
        for n in tracked:
            self.store.create(task, n, tuple(named[n].shape), layouts[n])
        owned = {n for n in tracked if self.store.owns(task, n)}
        model.eval()
        try:
            with self.store.begin_step(task, tokens=T, layouts={n: layouts[n] for n in tracked}) as st:

                def make_hook(name: str) -> Callable[[torch.Tensor], None]:
                    def hook(p: torch.Tensor) -> None:
                        if self.estimator == "batch" and not state["last"]:
                            return  # the batch estimator squares the summed gradient
                        if name not in owned:  # another rank of the group writes it
                            p.grad = None
                            return
                        x = p.grad.detach().float().square()
                        st.add(name, x)
                        if self.reduction == "group":
                            for gt, v in group_reduce(x, layouts[name]).items():
                                acc = group_x.setdefault(name, {})
                                acc[gt] = acc[gt] + v.cpu() if gt in acc else v.cpu()
                        p.grad = None  # the next micro-batch's gradient starts from zero
                    return hook

                for n, p in named.items():
                    p.requires_grad_(n in tracked)
                handles = [named[n].register_post_accumulate_grad_hook(make_hook(n)) for n in tracked]
                for i in range(n_mb):
                    sl = slice(i * self.micro_batch_size, (i + 1) * self.micro_batch_size)
                    state["last"] = i == n_mb - 1
                    tgt = labels[sl, 1:]
                    if not bool((tgt != -100).any()):
                        continue
                    logits = model(input_ids=ids[sl], attention_mask=mask[sl]).logits[:, :-1]
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                           ignore_index=-100, reduction="sum")
                    loss.backward()
                if self.estimator == "batch":  # the last micro-batch may have had no tokens
                    for n in tracked:
                        if named[n].grad is not None:
                            make_hook(n)(named[n])
        finally:
            for h in handles:
                h.remove()
            for n, p in named.items():
                p.requires_grad_(saved[n])
            for n in tracked:
                named[n].grad = saved_grads[n]
            model.train(was_training)
        if new_task:
            self.store.set_metadata(task, estimator=self.estimator, model=model_description(model),
                                    micro_batch_size=self.micro_batch_size)
        self._update_groups(task, group_x, T)

    def _update_groups(self, task: str, group_x: dict[str, dict[str, torch.Tensor]], T: int) -> None:
        if self.reduction != "group":
            return
        groups = self._groups[task]
        t = self.store.step(task)
        w = step_weight(self.ema_decay, T)
        for name, per_type in group_x.items():
            for gt, v in per_type.items():
                key = f"{task}|{name}|{gt}"
                entry = groups.get(key)
                if entry is None:
                    groups[key] = [v * w, t]
                else:
                    accumulate_(entry[0], v * w, self.ema_decay, t - entry[1])
                    entry[1] = t

    def _task_groups(self, task: str) -> dict[str, list[Any]]:
        """This task's group EMAs; after a reopen, rebuilt by reducing the stored tensors."""
        if task in self._groups:
            return self._groups[task]
        groups: dict[str, list[Any]] = {}
        if task in self.store.tasks():
            t = self.store.step(task)
            for name in self.store.params(task):
                raw = self.store.fisher(task, name, bias_corrected=False).load()
                for gt, v in group_reduce(raw, self.store.layout(task, name)).items():
                    groups[f"{task}|{name}|{gt}"] = [v, t]
        self._groups[task] = groups
        return groups

    # -- reading ------------------------------------------------------------------------
    @property
    def fisher_ema(self) -> dict[str, torch.Tensor]:
        """Group-reduced raw EMA values at each task's current step, keyed ``task|param|group``."""
        out = {}
        for task in self.store.tasks():
            t = self.store.step(task)
            for key, (v, t_last) in self._task_groups(task).items():
                out[key] = v * readout_scale(self.ema_decay, t, t_last, False)
        return out

    def get_group_fisher(
        self, task: str, param_name: str | None = None, group_type: str | None = None, bias_corrected: bool = True
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """Group vectors of ``task``: a dict keyed ``task|param|group``, or the tensor when one key matches.

        ``param_name`` and ``group_type`` match exactly (``"head"`` does not match
        ``"head_q"``). The per-head value equals the sum of the stored full head block.
        """
        if task not in self.store.tasks():
            raise UnknownTaskError(
                f"unknown task {task!r}; collected tasks: {listing(self.store.tasks())}."
                + close_matches(task, self.store.tasks())
            )
        if param_name is not None and param_name not in self.store.params(task):
            raise UnknownParamError(
                f"parameter {param_name!r} is not tracked for task {task!r}." + close_matches(param_name, self.store.params(task))
            )
        t = self.store.step(task)
        out = {}
        for key, (v, t_last) in self._task_groups(task).items():
            _, name, gt = key.split("|")
            if (param_name is None or name == param_name) and (group_type is None or gt == group_type):
                out[key] = v * readout_scale(self.ema_decay, t, t_last, bias_corrected)
        if len(out) == 1:
            return next(iter(out.values()))
        return out

    def get_token_count(self, task: str) -> int:
        return self.store.metadata(task)["tokens_seen"]

    def full_fisher(self, task: str, name: str | None = None, bias_corrected: bool = True) -> Any:
        """Full lazy Fisher tensors: a read-only ``{param: LazyFisher}`` mapping, or one LazyFisher."""
        if name is not None:
            return self.store.fisher(task, name, bias_corrected)
        return types.MappingProxyType({n: self.store.fisher(task, n, bias_corrected) for n in self.store.params(task)})

    # -- per-sample gradients (for QK-OV scoring) ---------------------------------------
    def sample_gradients(self, model: nn.Module, batch: Mapping[str, torch.Tensor],
                         names: Iterable[str] | None = None) -> SampleGrads:
        """Per-sample gradients (token-summed loss) of the tracked parameters, on the CPU.

        Memory is ``n × Σ|param|`` fp32: meant for the few samples a QK-OV heat map uses.
        """
        layouts = self.layouts(model)
        names = list(names) if names is not None else self._select(model, layouts)
        ids, mask, labels = _prepare(batch, next(model.parameters()).device)
        named = dict(model.named_parameters())
        grads = {n: [] for n in names}
        tokens = []
        saved = {n: p.requires_grad for n, p in named.items()}
        saved_grads = {n: p.grad for n, p in named.items()}
        was_training = model.training
        model.eval()
        try:
            for n, p in named.items():
                p.requires_grad_(n in grads)
            for i in range(ids.shape[0]):
                tgt = labels[i : i + 1, 1:]
                logits = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[:, :-1]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                       ignore_index=-100, reduction="sum")
                model.zero_grad(set_to_none=True)
                loss.backward()
                tokens.append(int((tgt != -100).sum()))
                for n in names:
                    g = named[n].grad
                    grads[n].append(torch.zeros(named[n].shape) if g is None else g.detach().float().cpu())
        finally:
            for n, p in named.items():
                p.requires_grad_(saved[n])
                p.grad = saved_grads[n]
            model.train(was_training)
        return SampleGrads({n: torch.stack(v) for n, v in grads.items()}, torch.tensor(tokens).clamp_min(1))

    # -- helpers ------------------------------------------------------------------------
    def layouts(self, model: nn.Module) -> dict[str, ParamLayout]:
        """``layouts_from_model(model)``, cached per model."""
        key = id(model)
        if key not in self._layout_cache:
            self._layout_cache[key] = layouts_from_model(model)
        return self._layout_cache[key]

    def _select(self, model: nn.Module, layouts: dict[str, ParamLayout]) -> list[str]:
        named = dict(model.named_parameters())
        sel = self.params
        if sel is None:
            names = attention_param_names(layouts)
        elif sel == "all":
            names = list(named)
        elif callable(sel):
            names = [n for n, p in named.items() if sel(n, p)]
        else:
            pats = [sel] if isinstance(sel, str) else list(sel)
            names = [n for n in named if any(n == p or re.search(p, n) for p in pats)]
        if not names:
            raise UnknownParamError(
                f"the params filter {sel!r} selects no parameter of {type(model).__name__}; "
                f"its parameters include {listing(named, 5)}"
            )
        return names


def _prepare(batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    if "input_ids" not in batch:
        raise ValueError(f"the batch needs 'input_ids'; it has {sorted(batch)}")
    ids = batch["input_ids"].to(device)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    labels = batch.get("labels")
    labels = ids.masked_fill(mask == 0, -100) if labels is None else labels.to(device)
    return ids, mask, labels
