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

import secrets
import types
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..engine.dist import RankGroup
from ..errors import InvalidArgumentError, LayoutError, RankFailedError, listing
from ..losses import LossFn, causal_lm, loss_name
from ..losses import check_loss as check_loss_fn
from ..spec.layout import ParamLayout
from ..store.api import open as open_store
from .fisher_types import check_fisher_type
from .group_view import GroupView
from .layout_check import LayoutCheck
from .layout_check import check_layouts as check_layouts_of
from .models import layouts_from_model, model_description
from .samples import SampleGrads, sample_gradients
from .step_loop import StepRun
from .tracking import ParamFilter, check_options, select_params

__all__ = ["FisherCollector", "Prepared"]


class Prepared(NamedTuple):
    """What :meth:`FisherCollector.prepare` returns: the tracked parameters in store order, and every layout."""

    order: list[str]
    layouts: dict[str, ParamLayout]


class FisherCollector(GroupView):
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
            attention modules fisherstore does not recognise (docs/layouts.md). They are
            checked against the model's own attention before anything is stored
            (:meth:`check_layouts`): a layout that does not fit raises
            :class:`~fisherstore.errors.LayoutMismatchError` naming the parameter and head.
        fisher_type: whose labels the squared gradients are of (docs/estimators.md):
            ``"empirical"`` (the default: the data's), ``"mc"`` (``mc_samples`` labels drawn per
            target position from the model's predictive distribution, each square weighted
            ``1/mc_samples``; unbiased for the true Fisher at any micro-batch size) or
            ``"exact"`` (the true Fisher itself, ``Σ_y p(y) (∇log p(y))²`` per position: one
            backward per position and class, up to
            :data:`~fisherstore.collect.fisher_types.EXACT_MAX_CLASSES` classes). The last two
            need a loss that exposes its logits and targets (every :mod:`fisherstore.losses`
            loss does) and ``estimator="micro_batch"``. A task keeps the type it was
            collected with; recorded in its metadata (``fisher_type``, ``mc_samples``).
        mc_samples: labels drawn per target position for ``fisher_type="mc"``.
        seed: seeds the ``"mc"`` draws (per rank, task, step and micro-batch, so a multi-pass
            run draws the same labels in every pass); None draws one, kept as :attr:`seed`.
        verify_layouts: ``False`` skips that check. Only for attention whose heads mix
            before the output projection (a norm over every head's queries, as OLMo-2's
            ``q_norm``; talking-heads attention): there every head's output depends on
            every head's rows, so even the right layout cannot pass (docs/layouts.md).
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
        store: an open :class:`~fisherstore.store.FisherStore` to collect into instead of
            opening ``path`` (its own options apply).
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
        store: Any = None,
        verify_layouts: bool = True,
        fisher_type: str = "empirical",
        mc_samples: int = 1,
        seed: int | None = None,
        **store_options: Any,
    ) -> None:
        check_options(reduction, estimator, micro_batch_size, loss_fn, layouts, data_parallel)
        check_fisher_type(fisher_type, mc_samples, seed, loss_fn, estimator)
        if not isinstance(verify_layouts, bool):
            raise InvalidArgumentError(f"verify_layouts must be True or False, got {verify_layouts!r}")
        group = store_options.get("group") if store is None else getattr(store, "group", None)
        if group is not None and not isinstance(group, RankGroup):
            raise InvalidArgumentError(f"group must be a fisherstore.RankGroup, got {type(group).__name__}")
        self.reduction = reduction
        self.ema_decay = ema_decay
        self.params = params
        self.micro_batch_size = micro_batch_size
        self.estimator = estimator
        self.loss_fn = loss_fn
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        #: The seed of the ``"mc"`` draws; drawn at random when none is given (pass it again to repeat a run).
        self.seed = seed if seed is not None else secrets.randbits(63)
        self.group = group if group is not None else RankGroup.solo()
        if seed is None and fisher_type == "mc" and self.group.world_size > 1:
            self.seed = self.group.all_gather(self.seed)[0]  # rank 0's on every rank: the seed shown repeats the run
        #: Whether ranks see different batches, so every step is reduced onto the owners.
        self.data_parallel = self.group.world_size > 1 if data_parallel is None else data_parallel
        self._layout_overrides = dict(layouts or {})
        self.verify_layouts = verify_layouts
        if store is not None:  # an open store adopted as it is (its own options)
            if path is not None or store_options:
                raise InvalidArgumentError("pass either store= (an open FisherStore) or path= and store options, not both")
            self.store = store
        else:
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
        # The models whose overrides passed check_layouts (weak: a verdict dies with its model, never
        # passes to a new model that happens to get the old one's id).
        self._checked: weakref.WeakKeyDictionary[nn.Module, LayoutCheck] = weakref.WeakKeyDictionary()
        self._owners: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        self._decay_warned: set[str] = set()  # tasks whose stored β differs from ema_decay, warned once

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> FisherCollector:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """Close (flushing); under a rank group, an error leaves the group and commits nothing.

        With an error inside the block, this rank cannot take its part in a collective
        flush: the others may be anywhere (in their next step, in their own flush). So it
        tells them (:meth:`RankGroup.leave`: they raise :class:`~fisherstore.errors.RankFailedError`
        naming it at their next collective), closes the store without a commit (it stays at
        its last one), and its own error propagates unchanged. A single process flushes as
        before: nobody waits on it.
        """
        if exc is None or self.group.world_size == 1:
            self.close()
            return
        self.group.leave(exc)
        self._abandon()

    def _abandon(self) -> None:
        """Close the store without committing, once this rank has left its group; it keeps its last commit."""
        try:
            self.store.close()  # the flush raises at its first collective (the group is left): no commit
        except RankFailedError:
            pass  # expected: the store's resources are released all the same

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        """Flush and close the store; once this rank's group saw a rank fail, close without a commit.

        The failure was raised once already (a :class:`~fisherstore.errors.RankFailedError`, or this
        rank's own error), so ``close()`` in a ``finally`` does not raise it again over it.
        """
        if self.group.failed is not None:
            self._abandon()
            return
        self.store.close()

    def __repr__(self) -> str:
        return (
            f"FisherCollector(backend={self.store.backend_name!r}, path={self.store.path!r}, "
            f"ema_decay={self.ema_decay}, estimator={self.estimator!r}, fisher_type={self._type_repr()}, "
            f"loss_fn={loss_name(self.loss_fn)}, "
            f"data_parallel={self.data_parallel}, tasks={self.store.tasks()})"
        )

    def _type_repr(self) -> str:
        if self.fisher_type == "mc":
            return f"'mc' (mc_samples={self.mc_samples}, seed={self.seed})"
        return repr(self.fisher_type)

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
        self.check_layouts(model, batch)
        self.run_step(model, batch, task, *self.prepare(model, task))

    def collect_fisher_dataset(self, model: nn.Module, batches: Any, task: str = "default", *,
                               progress: bool | None = None) -> Any:
        """One EMA step per batch of a replayable set, in as many passes as the memory budget needs.

        ``batches``: a list (or tuple) of batches, a ``DataLoader`` with a fixed order, or a
        callable returning a fresh iterator of the same batches on every call. When the
        tracked state fits the store's budget this is one pass; otherwise the parameters
        are split into ⌈S/B⌉ groups and each pass runs every batch with only its group
        requiring gradients, then writes that group once. The result equals one pass with
        a budget large enough for everything (bit for bit on the CPU). The run is atomic:
        it commits once, at its end; interrupted, the store stays at its last commit.
        Returns a :class:`~fisherstore.collect.multipass.DatasetRun` (passes, steps, tokens, bytes).
        In a data-parallel rank group every rank calls it with its own batches, the same number
        on every rank: each pass is data-parallel, and the run equals one process on the union
        batches. See :mod:`fisherstore.collect.multipass`.
        Usage: ``run = fc.collect_fisher_dataset(model, batches, task="math")``.
        """
        from .multipass import collect_dataset

        # The overrides are checked on the first batch inside the run, agreed by every rank of a group.
        unchecked = bool(self._layout_overrides) and self.verify_layouts and model not in self._checked
        return collect_dataset(self, model, batches, task, progress=progress, check_layouts=unchecked)

    def collect_samples(self, model: nn.Module, batch: Mapping[str, torch.Tensor], task: str = "default", *,
                        names: Iterable[str] | None = None, ids: Iterable[str] | None = None, dtype: str | None = None,
                        flush: bool = True, progress: bool | None = None, resume: bool = False,
                        commit_every: int | None = None, commit_seconds: float | None = 300.0) -> list[str]:
        """Per-sample gradients of the tracked parameters (or ``names``) into ``task``; see :mod:`fisherstore.collect.samples`.

        Commits a segment every ``commit_every`` samples (None: no count) or about every
        ``commit_seconds`` (default 300 s; None: no time bound), so a kill loses only the
        segment in progress. ``resume=True`` (with ``ids=``) skips, with no forward, the ids
        ``task`` already holds; without it such an id is refused. Returns the ids this call
        wrote (skipped ids are not in it).
        Usage: ``fc.collect_samples(model, batch, "math", ids=row_ids, resume=True)``.
        """
        from .samples import collect_samples

        if self.group.world_size > 1:  # before any collective: every rank raises alike
            raise InvalidArgumentError(
                "collect_samples runs in one process: each sample's gradient is written whole by the process that "
                "computed it, and segments are not shared across ranks. Collect per-sample gradients on one rank, "
                "with a collector opened without a group"
            )
        check_loss_fn(self.loss_fn, model)
        self.check_layouts(model, batch)
        layouts = self.layouts(model)
        chosen = list(names) if names is not None else self._select(model, layouts)
        return collect_samples(self.store, model, batch, task, chosen, layouts, self.loss_fn,
                               ids=list(ids) if ids is not None else None, dtype=dtype, flush=flush, progress=progress,
                               resume=resume, commit_every=commit_every, commit_seconds=commit_seconds)

    # -- the seams multi-pass runs and training integrations use ---------------------------
    def prepare(self, model: nn.Module, task: str, *, check_loss: bool = True) -> Prepared:
        """Make ``task`` ready to collect ``model``: check the loss (unless ``check_loss=False``: the caller's
        gradients come from elsewhere), create the tracked parameters, rebuild the group view after a reopen.

        Returns :class:`Prepared`: the tracked parameters in the store's creation order (the
        same on every rank, so it orders collectives) and every parameter's layout.
        Usage: ``order, layouts = fc.prepare(model, "math")``.

        Raises :class:`~fisherstore.errors.LayoutError` when the collector has ``layouts=``
        overrides not yet checked against ``model``: nothing may be stored under a layout
        nobody verified. ``collect_fisher``, ``collect_samples`` and ``collect_fisher_dataset``
        check them on their first batch; gradients from elsewhere (``collect_from_grads``,
        the Trainer callback) have no batch of ours, so call :meth:`check_layouts` first.
        """
        if check_loss:
            check_loss_fn(self.loss_fn, model)
        layouts = self.layouts(model)
        if self._layout_overrides and self.verify_layouts and model not in self._checked:
            raise LayoutError(
                f"the layouts= overrides of this collector are not yet checked against {type(model).__name__}, and "
                "nothing is stored under an unchecked layout. Call fc.check_layouts(model, batch) once with a batch "
                "the model takes (collect_fisher, collect_samples and collect_fisher_dataset do it themselves; "
                "collect_from_grads and the Trainer callback have no batch to do it with)"
            )
        tracked = self._select(model, layouts)
        named = dict(model.named_parameters())
        new_task = task not in self.store.tasks()
        if not new_task:
            self._check_same_type(task)
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
        return Prepared([n for n in self.store.params(task) if n in chosen], layouts)

    def _check_same_type(self, task: str) -> None:
        """Refuse to mix estimators in one EMA: a task keeps the fisher_type (and mc_samples) it was collected with."""
        meta = self.store.metadata(task)
        if meta.get("estimator") is None:
            return  # no step landed yet: nothing to mix with
        if meta.get("estimator") not in ("micro_batch", "batch"):
            raise InvalidArgumentError(
                f"task {task!r} holds estimator {meta.get('estimator')!r} (not collected by a FisherCollector); collect "
                "into another task")
        stored = (meta.get("fisher_type") or "empirical", meta.get("mc_samples") if meta.get("fisher_type") == "mc"
                  else None)
        mine = (self.fisher_type, self.mc_samples if self.fisher_type == "mc" else None)
        if stored != mine:
            raise InvalidArgumentError(
                f"task {task!r} was collected with fisher_type={stored[0]!r}"
                + (f", mc_samples={stored[1]}" if stored[1] else "")
                + f", but this collector has fisher_type={mine[0]!r}" + (f", mc_samples={mine[1]}" if mine[1] else "")
                + "; one EMA of two estimators is neither. Collect into another task, or open the collector with "
                f"fisher_type={stored[0]!r}" + (f", mc_samples={stored[1]}" if stored[1] else ""))

    def run_step(self, model: nn.Module, batch: Mapping[str, Any], task: str, order: list[str],
                 layouts: dict[str, ParamLayout]) -> int:
        """One EMA step of ``task`` tracking ``order`` (what :meth:`prepare` returned, or a part of it).

        Returns the step's token count T. Usage: ``T = fc.run_step(model, batch, "math", *fc.prepare(model, "math"))``.
        """
        run = StepRun(self, model, task, order, layouts)
        if self.data_parallel:
            T = run.data_parallel(batch)
        elif getattr(self.loss_fn, "count_tokens", None) is not None:
            T = run.streamed(batch)
        else:
            T = run.summed(batch)
        # On the first step that lands: a call that failed after creating the task left none.
        if self.store.metadata(task).get("estimator") is None:
            mc = self.mc_samples if self.fisher_type == "mc" else None
            seed = {"mc_seed": self.seed} if self.fisher_type == "mc" else {}  # the draws a continued task holds
            self.store.set_metadata(task, estimator=self.estimator, model=model_description(model),
                                    fisher_type=self.fisher_type, mc_samples=mc,
                                    micro_batch_size=self.micro_batch_size, loss=loss_name(self.loss_fn), **seed)
        self.record_groups(task, run.groups.to_host(), T)
        return T

    def owner_ranks(self, task: str, order: list[str]) -> list[int]:
        """Which rank owns each of ``order`` (collective the first time for a task and parameter list)."""
        key = (task, tuple(order))
        if key not in self._owners:
            self._owners[key] = self.group.owner_ranks(order, [self.store.owns(task, n) for n in order])
        return self._owners[key]

    # -- reading ------------------------------------------------------------------------
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
        check_loss_fn(self.loss_fn, model)
        layouts = self.layouts(model)
        return sample_gradients(self.loss_fn, model, batch, list(names) if names is not None else self._select(model, layouts))

    def check_layouts(self, model: nn.Module, batch: Mapping[str, Any]) -> LayoutCheck | None:
        """Check the ``layouts=`` overrides against ``model``'s own attention, once per model.

        One forward of ``loss_fn`` on the first two sequences of ``batch``, then a few
        backward passes per checked attention layer (:mod:`fisherstore.collect.layout_check`
        says which and why). Returns its :class:`~fisherstore.collect.layout_check.LayoutCheck`,
        the cached one on later calls, or None when the collector has no overrides (or
        ``verify_layouts=False``).
        Usage: ``fc.check_layouts(model, batch)`` before ``collect_from_grads`` or a Trainer with a callback.

        Raises:
            LayoutMismatchError: an override does not fit the model (nothing was stored);
                the message names the parameter, block and head. Not cached: a later call checks again.
        """
        if not self._layout_overrides or not self.verify_layouts:
            return None
        done = self._checked.get(model)
        if done is None:
            check_loss_fn(self.loss_fn, model)
            done = check_layouts_of(model, self.layouts(model), self._layout_overrides, batch, self.loss_fn)
            self._checked[model] = done
        return done

    # -- helpers ------------------------------------------------------------------------
    def layouts(self, model: nn.Module) -> dict[str, ParamLayout]:
        """``layouts_from_model(model, overrides=layouts)``, cached per model."""
        key = id(model)
        if key not in self._layout_cache:
            self._layout_cache[key] = layouts_from_model(model, overrides=self._layout_overrides)
        return self._layout_cache[key]

    def _select(self, model: nn.Module, layouts: dict[str, ParamLayout]) -> list[str]:
        return select_params(model, layouts, self.params)
