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

``T`` is the number of tokens the batch predicts, as the loss counts them (``loss_fn``,
default :data:`fisherstore.losses.causal_lm`: labels ≠ -100 after the shift; pass
:data:`~fisherstore.losses.seq2seq_lm` for BART/T5 and :data:`~fisherstore.losses.masked_lm`
for BERT-style models). In a data-parallel rank group, ``Σ_mb`` runs over every rank's
micro-batches and ``T`` is the token count of all ranks' batches together.
"""

from __future__ import annotations

import re
import types
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .api import open as open_store
from .dist import RankGroup
from .ema import accumulate_, readout_scale, step_weight
from .errors import FisherStoreError, InvalidArgumentError, UnknownParamError, UnknownTaskError, close_matches, listing
from .layout import ParamLayout
from .losses import CausalLM, LossFn, Seq2SeqLM, causal_lm
from .models import attention_param_names, layouts_from_model, model_description

__all__ = ["FisherCollector", "SampleGrads", "StoredDecayWarning", "group_reduce"]

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


class StoredDecayWarning(UserWarning):
    """A task's stored EMA β differs from the collector's ``ema_decay``; the stored one is used."""


class FisherCollector:
    """Collect EMA Fisher information of a model's parameters into a fisherstore store.

    Args:
        reduction: ``"group"`` (TensorScope's group vectors are kept alongside the full
            tensors). The full tensors are always stored.
        ema_decay: EMA β of new tasks. A task already in the store keeps the β it was
            collected with (``store.param(task, name).decay``): every readout and update
            uses the stored β, parameters added to the task get it too, and the collector
            warns once (:class:`StoredDecayWarning`) when the two differ.
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
        loss_fn: ``loss_fn(model, batch) -> (loss_sum, n_tokens)``, the token-summed loss
            whose gradient is squared and the number of tokens it predicts (T comes from
            it). Default :data:`fisherstore.losses.causal_lm`; encoder-decoders need
            :data:`~fisherstore.losses.seq2seq_lm`, masked LMs :data:`~fisherstore.losses.masked_lm`.
        layouts: ``{parameter name: ParamLayout}`` merged over, and taking priority over,
            :func:`fisherstore.layouts_from_model`'s: how to collect a model whose
            attention modules fisherstore does not recognise.
        data_parallel: how the ranks of a ``group=`` share the work (ignored without one).
            ``True`` (the default when a group of more than one rank is given): ranks see
            **different** batches (DDP). A step's Fisher is that of the union batch: every
            rank's squared gradients count and ``T`` is the sum of every rank's token
            count. Each rank keeps a per-step sum of every tracked parameter (of squares
            for ``"micro_batch"``, of gradients for ``"batch"``), and after its micro-batch
            loop each sum is reduced onto the parameter's owner rank, which writes it.
            ``False``: every rank sees the **same** batch (model/tensor parallel); nothing is
            reduced and each rank writes the parameters it owns from its own gradients
            (the collector checks that the ranks' batches agree).
        **store_options: passed to :func:`fisherstore.open`, e.g. ``group=RankGroup.from_torch()``
            to have each rank of a ``torch.distributed`` job write the parameters it owns
            (its group view then holds only those).

    Memory: with a built-in loss and no data-parallel reduction, each micro-batch's
    squared gradient streams to the store as soon as it is final, as before. Otherwise
    (a data-parallel group, or a loss_fn without ``count_tokens``) each rank holds one fp32
    sum per tracked parameter, on the parameter's device, until the step is written.

    Usage::

        fc = FisherCollector(backend="zarr", path="fisher.zarr", group=fisherstore.RankGroup.from_torch())
        fc.collect_fisher(model, this_ranks_batch, task="math")   # every rank, its own batch
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
        loss_fn: LossFn = causal_lm,
        layouts: Mapping[str, ParamLayout] | None = None,
        data_parallel: bool | None = None,
        **store_options: Any,
    ) -> None:
        if reduction not in ("group", "param"):
            raise InvalidArgumentError(f"reduction must be 'group' or 'param', got {reduction!r}")
        if estimator not in ESTIMATORS:
            raise InvalidArgumentError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise InvalidArgumentError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
        if not callable(loss_fn):
            raise InvalidArgumentError(
                f"loss_fn must be a callable (model, batch) -> (loss_sum, n_tokens), got {type(loss_fn).__name__}; "
                "see fisherstore.losses (causal_lm, seq2seq_lm, masked_lm)"
            )
        if layouts is not None and not isinstance(layouts, Mapping):
            raise InvalidArgumentError(
                f"layouts must be a mapping of parameter name -> ParamLayout, got {type(layouts).__name__}"
            )
        if data_parallel is not None and not isinstance(data_parallel, bool):
            raise InvalidArgumentError(f"data_parallel must be True, False or None, got {data_parallel!r}")
        group = store_options.get("group")
        if group is not None and not isinstance(group, RankGroup):
            raise InvalidArgumentError(f"group must be a fisherstore.RankGroup, got {type(group).__name__}")
        self.reduction = reduction
        self.ema_decay = ema_decay
        self.params = params
        self.micro_batch_size = micro_batch_size
        self.estimator = estimator
        self.loss_fn = loss_fn
        self.group = group if group is not None else RankGroup.solo()
        #: Whether ranks see different batches, so every step is reduced onto the owners.
        self.data_parallel = self.group.world_size > 1 if data_parallel is None else data_parallel
        self._layout_overrides = dict(layouts or {})
        self.store = open_store(
            path,
            mode=mode,
            backend=backend,
            decay=ema_decay,
            memory_budget=memory_budget,
            flush_every=flush_every,
            **store_options,
        )
        # Group EMAs are tiny, so they live in RAM: {task: {key: [raw EMA, t_last, β]}}.
        self._groups: dict[str, dict[str, list[Any]]] = {}
        self._layout_cache: dict[int, dict[str, ParamLayout]] = {}
        self._owners: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        self._decay_warned: set[str] = set()

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
            f"ema_decay={self.ema_decay}, estimator={self.estimator!r}, loss_fn={_loss_name(self.loss_fn)}, "
            f"data_parallel={self.data_parallel}, tasks={self.store.tasks()})"
        )

    # -- collection ---------------------------------------------------------------------
    def collect_fisher(self, model: nn.Module, batch: Mapping[str, torch.Tensor], task: str = "default",
                       mode: str = "ema") -> None:
        """One EMA step of ``task`` from ``batch`` (what ``loss_fn`` needs: ``input_ids``, ``labels``, ...)."""
        if mode != "ema":
            raise InvalidArgumentError(f"mode {mode!r} is not supported; FisherCollector collects mode='ema'")
        self.update_fisher_ema(model, batch, task)

    def update_fisher_ema(self, model: nn.Module, batch: Mapping[str, torch.Tensor], task: str = "default") -> None:
        """One EMA step: micro-batched forward/backward of ``loss_fn``, each tracked grad² to the store.

        In a data-parallel group every rank calls it with its own batch; the step is the
        union batch's (see the class docstring).
        """
        self._check_loss(model)
        layouts = self.layouts(model)
        tracked = self._select(model, layouts)
        named = dict(model.named_parameters())
        new_task = task not in self.store.tasks()
        decays = [] if new_task else self._stored_decays(task)
        if self.reduction == "group":
            self._task_groups(task)  # after a reopen, rebuild the group view before this step
        existing = set() if new_task else set(self.store.params(task))
        new = [n for n in tracked if n not in existing]
        if new and len(decays) > 1:
            raise InvalidArgumentError(
                f"task {task!r} holds parameters with several EMA decays {decays}, so the new parameters "
                f"{listing(new, 3)} have no single stored β to take. Create them first with "
                "store.create(task, name, shape, layout, decay=β)"
            )
        decay = decays[0] if new and decays else None  # an existing task's β wins over ema_decay
        # Create in model order before any hook fires: under a rank group, creation is
        # collective and decides which rank owns which parameter.
        for n in tracked:
            self.store.create(task, n, tuple(named[n].shape), layouts[n], decay=decay)
        # The store's creation order: the same on every rank, so it orders the reductions.
        chosen = set(tracked)
        order = [n for n in self.store.params(task) if n in chosen]
        group_x: dict[str, dict[str, torch.Tensor]] = {}
        run = _StepRun(self, model, task, order, layouts, group_x)
        if self.data_parallel:
            T = run.data_parallel(batch)
        elif getattr(self.loss_fn, "count_tokens", None) is not None:
            T = run.streamed(batch)
        else:
            T = run.summed(batch)
        # On the first step that lands: a call that failed after creating the task left none.
        if self.store.metadata(task).get("estimator") is None:
            self.store.set_metadata(task, estimator=self.estimator, model=model_description(model),
                                    micro_batch_size=self.micro_batch_size, loss=_loss_name(self.loss_fn))
        self._update_groups(task, group_x, T)

    def _check_loss(self, model: nn.Module) -> None:
        """Refuse a loss that cannot be this model's: it would train on the wrong targets, silently."""
        cfg = getattr(model, "config", None)
        enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
        cls = type(model).__name__
        if isinstance(self.loss_fn, CausalLM) and enc_dec:
            raise InvalidArgumentError(
                f"{cls} is an encoder-decoder model (config.is_encoder_decoder), but loss_fn is the causal-LM "
                "loss, which would shift the encoder's input_ids into targets. Pass "
                "loss_fn=fisherstore.losses.seq2seq_lm and put the decoder targets in batch['labels']"
            )
        if isinstance(self.loss_fn, CausalLM) and cls.endswith("ForMaskedLM"):
            raise InvalidArgumentError(
                f"{cls} is a masked language model, but loss_fn is the causal-LM loss, which would predict "
                "each next token of a model that sees the whole sequence. Pass "
                "loss_fn=fisherstore.losses.masked_lm and put the masked targets in batch['labels']"
            )
        if isinstance(self.loss_fn, Seq2SeqLM) and cfg is not None and not enc_dec:
            raise InvalidArgumentError(
                f"{cls} is not an encoder-decoder model (config.is_encoder_decoder is False), but loss_fn is "
                "seq2seq_lm, which uses labels unshifted. Pass loss_fn=fisherstore.losses.causal_lm "
                "(decoder-only) or fisherstore.losses.masked_lm (masked LM)"
            )

    def _stored_decays(self, task: str) -> list[float]:
        """The distinct EMA β of ``task``'s parameters; warns once if they are not ``ema_decay``."""
        decays = sorted({self.store.param(task, n).decay for n in self.store.params(task)})
        if decays and decays != [self.ema_decay] and task not in self._decay_warned:
            self._decay_warned.add(task)
            shown = ", ".join(f"{d:g}" for d in decays)
            warnings.warn(
                StoredDecayWarning(
                    f"task {task!r} was collected with ema_decay={shown}, but this collector has "
                    f"ema_decay={self.ema_decay:g}; the stored β is used for every readout and update of the task "
                    f"and for parameters added to it. Open the collector with ema_decay={decays[0]:g} to silence "
                    "this warning"
                ),
                stacklevel=3,
            )
        return decays

    def _owner_ranks(self, task: str, order: list[str]) -> list[int]:
        """Which rank owns each of ``order`` (collective the first time for a task and parameter list)."""
        key = (task, tuple(order))
        if key not in self._owners:
            self._owners[key] = self.group.owner_ranks(order, [self.store.owns(task, n) for n in order])
        return self._owners[key]

    def _update_groups(self, task: str, group_x: dict[str, dict[str, torch.Tensor]], T: int) -> None:
        if self.reduction != "group":
            # No group increments are kept: a view read before this step would go stale, so
            # the next read rebuilds it from the store.
            self._groups.pop(task, None)
            return
        groups = self._groups[task]
        t = self.store.step(task)
        for name, per_type in group_x.items():
            beta = self.store.param(task, name).decay  # the stored β, which the store's tensor uses too
            w = step_weight(beta, T)
            for gt, v in per_type.items():
                key = f"{task}|{name}|{gt}"
                entry = groups.get(key)
                if entry is None:
                    groups[key] = [v * w, t, beta]
                else:
                    accumulate_(entry[0], v * w, beta, t - entry[1])
                    entry[1] = t

    def _task_groups(self, task: str) -> dict[str, list[Any]]:
        """This task's group EMAs; after a reopen, rebuilt by reducing the stored tensors this rank owns."""
        if task in self._groups:
            return self._groups[task]
        groups: dict[str, list[Any]] = {}
        if task in self.store.tasks():
            self._stored_decays(task)
            t = self.store.step(task)
            for name in self.store.params(task):
                # Only what this rank writes: another rank's parameters would never be updated
                # here, and would read back as if they had had no gradient since the reopen.
                if not self.store.owns(task, name):
                    continue
                beta = self.store.param(task, name).decay
                raw = self.store.fisher(task, name, bias_corrected=False).load()
                for gt, v in group_reduce(raw, self.store.layout(task, name)).items():
                    groups[f"{task}|{name}|{gt}"] = [v, t, beta]
        self._groups[task] = groups
        return groups

    # -- reading ------------------------------------------------------------------------
    @property
    def fisher_ema(self) -> dict[str, torch.Tensor]:
        """Group-reduced raw EMA values at each task's current step, keyed ``task|param|group``."""
        out = {}
        for task in self.store.tasks():
            t = self.store.step(task)
            for key, (v, t_last, beta) in self._task_groups(task).items():
                out[key] = v * readout_scale(beta, t, t_last, False)
        return out

    def get_group_fisher(
        self, task: str, param_name: str | None = None, group_type: str | None = None, bias_corrected: bool = True
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """Group vectors of ``task``: a dict keyed ``task|param|group``, or the tensor when one key matches.

        ``param_name`` and ``group_type`` match exactly (``"head"`` does not match
        ``"head_q"``). The per-head value equals the sum of the stored full head block,
        read with the task's stored β. In a rank group it holds the parameters this rank owns.
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
        for key, (v, t_last, beta) in self._task_groups(task).items():
            _, name, gt = key.split("|")
            if (param_name is None or name == param_name) and (group_type is None or gt == group_type):
                out[key] = v * readout_scale(beta, t, t_last, bias_corrected)
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
        """Per-sample gradients (``loss_fn``'s token-summed loss) of the tracked parameters, on the CPU.

        Memory is ``n × Σ|param|`` fp32: meant for the few samples a QK-OV heat map uses.
        """
        self._check_loss(model)
        layouts = self.layouts(model)
        names = list(names) if names is not None else self._select(model, layouts)
        batch = _on_device(batch, next(model.parameters()).device)
        rows = _rows(batch)
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
            for i in range(rows):
                loss, n_tok = _call_loss(self.loss_fn, model, _take(batch, slice(i, i + 1)))
                model.zero_grad(set_to_none=True)
                if n_tok:  # a sample with nothing to predict has a zero gradient
                    loss.backward()
                tokens.append(n_tok)
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
        """``layouts_from_model(model, overrides=layouts)``, cached per model."""
        key = id(model)
        if key not in self._layout_cache:
            self._layout_cache[key] = layouts_from_model(model, overrides=self._layout_overrides)
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




class _StepRun:
    """One EMA step of one task: the micro-batch loop and how its sums reach the store.

    Three ways, one result (the class docstring of :class:`FisherCollector` says when
    each is used): :meth:`streamed` feeds each micro-batch's grad² to the open step;
    :meth:`summed` keeps a per-step sum and feeds it after the loop, once T is known;
    :meth:`data_parallel` keeps the sum of every tracked parameter and reduces it onto
    the parameter's owner rank. The group view's increments go to ``group_x``.
    """

    def __init__(self, fc: FisherCollector, model: nn.Module, task: str, order: list[str],
                 layouts: dict[str, ParamLayout], group_x: dict[str, dict[str, torch.Tensor]]) -> None:
        self.fc = fc
        self.model = model
        self.task = task
        self.order = order  # tracked parameters in the store's creation order
        self.layouts = layouts
        self.group_x = group_x
        self.named = dict(model.named_parameters())

    # -- the three ways ---------------------------------------------------------------------
    def streamed(self, batch: Mapping[str, Any]) -> int:
        """Each micro-batch's grad² goes to the store as soon as it is final (T counted up front)."""
        fc = self.fc
        _rows(batch)  # not a batch: say so before anything else runs
        if fc.group.world_size > 1:
            _check_same_batch(fc.group, batch)
        T = int(fc.loss_fn.count_tokens(batch))
        _check_tokens(T)
        owned = {n for n in self.order if fc.store.owns(self.task, n)}
        with fc.store.begin_step(self.task, tokens=T, layouts={n: self.layouts[n] for n in self.order}) as st:
            square = fc.estimator == "batch"  # the batch estimator's sink gets the summed gradient
            got = self.backward(batch, owned, lambda n, x: self.feed(st, n, x.square() if square else x))
            if got != T:  # discard the step: its x was divided by the wrong T
                raise FisherStoreError(
                    f"{_loss_name(fc.loss_fn)} counted {got} tokens over the micro-batches of a batch for which its "
                    f"count_tokens said {T}; the step was discarded. Make count_tokens(batch) equal the sum of the "
                    "n_tokens its calls return"
                )
        return T

    def summed(self, batch: Mapping[str, Any]) -> int:
        """A loss that cannot count tokens up front: sum the step on this rank, then feed it."""
        fc = self.fc
        _rows(batch)  # not a batch: say so before anything else runs
        if fc.group.world_size > 1:
            _check_same_batch(fc.group, batch)
        owned = {n for n in self.order if fc.store.owns(self.task, n)}
        sums: dict[str, torch.Tensor] = {}
        T = self.backward(batch, owned, lambda n, x: _add_to(sums, n, x))
        _check_tokens(T)
        with fc.store.begin_step(self.task, tokens=T, layouts={n: self.layouts[n] for n in self.order}) as st:
            for n in self.order:
                x = sums.pop(n, None)
                if x is not None:
                    self.feed(st, n, x.square() if fc.estimator == "batch" else x)
        return T

    def data_parallel(self, batch: Mapping[str, Any]) -> int:
        """Every rank sums its own batch; each sum is reduced onto its owner rank, which writes it.

        No collective runs inside the backward hooks, so ranks may run different numbers
        of micro-batches; every collective below runs in the same order on every rank.
        """
        fc, group = self.fc, self.fc.group
        owners = fc._owner_ranks(self.task, self.order)
        sums: dict[str, torch.Tensor] = {}
        err: BaseException | None = None
        T_local = 0
        try:  # a rank that fails must still reach the collectives, or the others would hang
            T_local = self.backward(batch, set(self.order), lambda n, x: _add_to(sums, n, x))
        except Exception as e:
            err = e
        err = group.agree(err, f"compute its gradients for step {fc.store.step(self.task) + 1} of task {self.task!r}")
        if err is not None:
            raise err
        # T of the union batch, and which parameters have a gradient on any rank: one without
        # is skipped on every rank and decays lazily, as in a single process.
        counts = group.all_reduce_ints([T_local] + [int(n in sums) for n in self.order])
        T = counts[0]
        _check_tokens(T, data_parallel=True)
        with fc.store.begin_step(self.task, tokens=T, layouts={n: self.layouts[n] for n in self.order}) as st:
            err = None
            for n, owner, any_grad in zip(self.order, owners, counts[1:]):
                if not any_grad:
                    continue
                local = sums.pop(n, None)  # popped: each sum is freed once reduced
                if local is None:
                    p = self.named[n]
                    local = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                x = group.reduce_to(local, owner)
                if x is not None and err is None:
                    try:
                        self.feed(st, n, x.square() if fc.estimator == "batch" else x)
                    except Exception as e:  # keep reducing with the others; fail together below
                        err = e
            err = group.agree(err, f"write step {st.t} of task {self.task!r}")
            if err is not None:
                raise err  # inside the step: every rank discards it
        return T

    # -- the parts --------------------------------------------------------------------------
    def feed(self, st: Any, name: str, x: torch.Tensor) -> None:
        """Add ``x`` (this step's Σ g² of ``name``, or a part of it) to the step and the group view."""
        st.add(name, x)
        if self.fc.reduction == "group":
            acc = self.group_x.setdefault(name, {})
            for gt, v in group_reduce(x, self.layouts[name]).items():
                acc[gt] = acc[gt] + v.cpu() if gt in acc else v.cpu()

    def backward(self, batch: Mapping[str, Any], feed: set[str], sink: Callable[[str, torch.Tensor], None]) -> int:
        """The micro-batch loop; returns this rank's token count.

        ``sink(name, x)`` receives, for each parameter in ``feed``, every micro-batch's
        squared gradient (``"micro_batch"``), or once the summed gradient (``"batch"``).
        Every tracked parameter needs a gradient (the graph is the same on every rank);
        those not in ``feed`` are dropped as soon as they are final.
        """
        fc, model, named = self.fc, self.model, self.named
        tracked = set(self.order)
        batch = _on_device(batch, next(model.parameters()).device)
        rows = _rows(batch)
        saved = {n: p.requires_grad for n, p in named.items()}
        # A caller's stale .grad would be summed into the first micro-batch: stash it.
        saved_grads = {n: named[n].grad for n in self.order}
        was_training = model.training
        micro = fc.estimator == "micro_batch"

        def make_hook(name: str) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                if name not in feed:  # another rank writes it, from its own gradient
                    p.grad = None
                elif micro:
                    sink(name, _dense(p.grad).float().square())
                    p.grad = None  # the next micro-batch's gradient starts from zero
                # the batch estimator lets the gradient sum over micro-batches
            return hook

        handles = []
        T = 0
        model.eval()
        try:
            for n in self.order:
                named[n].grad = None
            for n, p in named.items():
                p.requires_grad_(n in tracked)
            handles = [named[n].register_post_accumulate_grad_hook(make_hook(n)) for n in self.order]
            for start in range(0, rows, fc.micro_batch_size):
                loss, n_tok = _call_loss(fc.loss_fn, model, _take(batch, slice(start, start + fc.micro_batch_size)))
                T += n_tok
                if n_tok:  # a micro-batch with nothing to predict adds nothing
                    loss.backward()
            if not micro:
                for n in self.order:
                    if n in feed and named[n].grad is not None:
                        sink(n, _dense(named[n].grad).float())
        finally:
            for h in handles:
                h.remove()
            for n, p in named.items():
                p.requires_grad_(saved[n])
            for n in self.order:
                named[n].grad = saved_grads[n]
            model.train(was_training)
        return T


def _dense(g: torch.Tensor) -> torch.Tensor:
    """A gradient as a dense tensor: sparse ones (``nn.Embedding(sparse=True)``) cannot be summed across ranks."""
    g = g.detach()
    return g.to_dense() if g.layout != torch.strided else g


def _add_to(sums: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    if name in sums:
        sums[name].add_(x)
    else:
        sums[name] = x if x.dtype == torch.float32 else x.float()


def _loss_name(loss_fn: Any) -> str:
    return str(getattr(loss_fn, "name", None) or getattr(loss_fn, "__name__", None) or type(loss_fn).__name__)


def _call_loss(loss_fn: Any, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
    """``loss_fn(model, batch)``, checked: a scalar tensor and a non-negative token count."""
    out = loss_fn(model, batch)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
        raise InvalidArgumentError(
            f"loss_fn {_loss_name(loss_fn)} must return (loss_sum: Tensor, n_tokens: int), got {type(out).__name__}; "
            "see fisherstore.losses"
        )
    loss, n = out
    n = int(n.item()) if isinstance(n, torch.Tensor) else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgumentError(f"loss_fn {_loss_name(loss_fn)} returned n_tokens={n!r}; it must be an int >= 0")
    if loss.numel() != 1:
        raise InvalidArgumentError(
            f"loss_fn {_loss_name(loss_fn)} returned a loss of shape {tuple(loss.shape)}; it must be the scalar "
            "token-summed loss (reduction='sum')"
        )
    return loss, n


def _check_tokens(T: int, data_parallel: bool = False) -> None:
    if T == 0:
        where = "the batches of every rank have" if data_parallel else "the batch has"
        raise InvalidArgumentError(
            f"{where} no tokens to predict (every label is -100, or sequences have length 1); "
            "pass a batch with at least one target token"
        )


def _rows(batch: Mapping[str, Any]) -> int:
    """The number of sequences in ``batch``: the first dimension every tensor in it shares."""
    if not isinstance(batch, Mapping):
        raise InvalidArgumentError(
            f"the batch must be a mapping of name -> tensor (input_ids, attention_mask, labels, ...), got "
            f"{type(batch).__name__}"
        )
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim >= 1}
    if not sizes:
        raise InvalidArgumentError(f"the batch holds no tensors; it has {sorted(batch)}")
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{k}: {n}" for k, n in sizes.items())
        raise InvalidArgumentError(
            f"the batch's tensors disagree on the number of sequences ({shown}); every tensor's first "
            "dimension must be the batch size"
        )
    return next(iter(sizes.values()))


def _take(batch: Mapping[str, Any], rows: slice) -> dict[str, Any]:
    """Rows ``rows`` of every tensor in ``batch`` (other values as they are)."""
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.ndim >= 1 else v for k, v in batch.items()}


def _on_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    _rows(batch)  # a batch that is not a mapping of tensors fails here, with its reason
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_same_batch(group: RankGroup, batch: Mapping[str, Any]) -> None:
    """With ``data_parallel=False`` every rank must see the same batch; refuse one that does not.

    The ranks compare a checksum of the batch's integer tensors (token ids, masks, labels),
    so a DDP job that set ``data_parallel=False`` fails instead of writing each parameter
    from its owner's batch alone.
    """
    fp = []
    for k in sorted(batch):
        v = batch[k]
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex():
            data = v.detach().cpu().contiguous()
            fp.append((k, tuple(v.shape), zlib.crc32(data.numpy().tobytes())))
    views = group.all_gather(fp)
    bad = [r for r, v in enumerate(views) if v != views[0]]
    if bad:
        raise InvalidArgumentError(
            f"data_parallel=False means every rank sees the same batch, but rank {bad[0]}'s batch differs from "
            "rank 0's. For ranks that see different batches (DDP) pass data_parallel=True (the default with a "
            "group), so every rank's gradients count"
        )
