"""A Hugging Face ``Trainer`` callback that collects the Fisher from the training gradients.

:class:`FisherCallback` writes one EMA step every ``every`` optimizer steps from the
gradients the Trainer computes anyway: no second forward or backward, and ``.grad``, the
clipping and ``optimizer.step()`` are left exactly as they were.

When it reads them. Backward hooks on the tracked parameters fire in the **last** backward
of each gradient-accumulation window (Accelerate's ``sync_gradients``), when each
gradient is final: so the Fisher is of the full accumulated gradient, *before* the
Trainer clips it (``max_grad_norm``, on by default), which a callback at
``on_pre_optimizer_step`` would see already clipped. The step is settled at
``on_pre_optimizer_step``.

What ``x`` and ``T`` are. ``T`` is the number of target tokens of the optimizer step's
batch, over all its accumulation micro-batches and counted as the Trainer counts
``num_items_in_batch`` (labels ≠ -100 after the causal shift; with ``loss_fn=`` another
:mod:`fisherstore.losses` loss, as that loss counts). Causal LMs that take
``num_items_in_batch`` (LLaMA, Mistral, Qwen2, GPT-2, ... in transformers ≥ 4.46) train on
``Σ ℓ / num_items_in_batch``, so ``x = (num_items_in_batch · g)² / T``: the square of the
token-summed gradient over T, the collector's *batch* estimator (recorded as
``estimator="batch"``). A model that averages each micro-batch instead is exact when the
micro-batches have equal token counts; otherwise the callback warns once
(:class:`FisherCallbackWarning`) and uses ``g·T``.

Mixed precision. Under ``fp16=True`` the Trainer's Accelerate scaler (a
``torch.amp.GradScaler``, on the optimizer as ``optimizer.scaler``) multiplies the loss by
its scale ``S`` before backward, and unscales only later, to clip. The hooks read the
gradients while they are still ``S · g``, so the callback divides them by ``S`` (the
scale of this step's backward). An overflow step (inf or NaN in the scaled gradients,
which the scaler skips) is skipped too: decided at ``on_pre_optimizer_step`` by the
scaler's own inf check, counted in :attr:`FisherCallback.overflow_steps` and in the task's
metadata (``"amp_skipped_steps"``), and warned once (:class:`AmpOverflowWarning`). bf16
has no scaler: gradients are read as they are.

One process: in a multi-process job the gradients at the hooks are each rank's own
before the all-reduce; the callback refuses to start there (use
:func:`fisherstore.integrations.collect_from_grads` on rank 0 after the all-reduce).

Usage::

    from fisherstore.integrations.hf import FisherCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[FisherCallback("fisher.zarr", every=10, task="sft", params="all")])
    trainer.train()        # the store is flushed at the end of training
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from ..collect.collector import FisherCollector
from ..collect.group_view import GroupSums
from ..errors import AmpOverflowWarning, FisherCallbackWarning, InvalidArgumentError, NonFiniteGradientError
from ..losses import causal_lm
from ..store import FisherStore
from . import (
    active_scaler,
    amp_state,
    mark_training_task,
    require_empirical,
    scaled_square,
    skip_overflow,
    square_of,
)

__all__ = ["FisherCallback", "FisherCallbackWarning", "AmpOverflowWarning"]


class FisherCallback(TrainerCallback):
    """Collect ``task``'s Fisher EMA every ``every`` optimizer steps from the Trainer's own gradients.

    Args:
        store_or_path: a store directory (opened with ``backend``, ``ema_decay`` and
            ``**options``), an open :class:`~fisherstore.store.FisherStore`, or a
            :class:`~fisherstore.FisherCollector` (its ``params`` and loss apply).
        every: collect on optimizer steps ``every``, ``2·every``, ...
        task: the store task.
        params: which parameters (as :class:`~fisherstore.FisherCollector`'s ``params``);
            only those the Trainer trains (``requires_grad``) have gradients.
        loss_fn: how ``T`` is counted from a batch (:mod:`fisherstore.losses`).

    Attributes:
        overflow_steps: the steps it collects that overflowed under fp16 and were skipped,
            in this run (the task's metadata ``"amp_skipped_steps"`` keeps the total over runs).
    """

    def __init__(self, store_or_path: Any, every: int = 1, task: str = "train", params: Any = None, *,
                 ema_decay: float = 0.99, backend: str = "zarr", loss_fn: Any = causal_lm, **options: Any) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidArgumentError(f"every must be a positive number of optimizer steps, got {every!r}")
        if isinstance(store_or_path, FisherCollector):
            require_empirical(store_or_path, "FisherCallback")
            self.fc = store_or_path
        elif isinstance(store_or_path, FisherStore):
            self.fc = FisherCollector(store=store_or_path, params=params, ema_decay=ema_decay, loss_fn=loss_fn)
        elif isinstance(store_or_path, (str, os.PathLike)):
            self.fc = FisherCollector(backend=backend, path=store_or_path, params=params, ema_decay=ema_decay,
                                      loss_fn=loss_fn, **options)
        else:
            raise InvalidArgumentError(f"store_or_path must be a path, a FisherStore or a FisherCollector, got "
                                       f"{type(store_or_path).__name__}")
        self.every, self.task = every, task
        self._handles: list[Any] = []
        self._window: list[int] = []  # target tokens of each micro-batch of this optimizer step
        self._items: Any = None  # the Trainer's num_items_in_batch, when the model takes it
        self._collect = False
        self._st: Any = None
        self._sums: GroupSums | None = None
        self._T = 0
        self._warned = False
        self._model_ref: Any = None
        self._scaler: Any = None  # the Trainer's GradScaler under fp16, else None
        self._nonfinite: NonFiniteGradientError | None = None  # held until the scaler says whether it overflowed
        self._amp_warned: set[Any] = set()
        self.overflow_steps = 0

    # -- Trainer events -----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if getattr(args, "world_size", 1) > 1:
            raise InvalidArgumentError(
                "FisherCallback collects in one process: with several, the gradients its hooks see are each rank's "
                "own before the all-reduce. Call fisherstore.integrations.collect_from_grads on rank 0 after the "
                "all-reduce instead"
            )
        order, layouts = self.fc.prepare(model, self.task, check_loss=False)
        self._order, self._layouts = order, layouts
        named = dict(model.named_parameters())
        self._handles = [model.register_forward_pre_hook(self._on_forward, with_kwargs=True)]
        self._handles += [named[n].register_post_accumulate_grad_hook(self._grad_hook(n))
                          for n in order if named[n].requires_grad]

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self._abandon()  # a step left open when training raised between backward and the optimizer step
        self._window, self._items, self._nonfinite = [], None, None
        self._collect = (state.global_step + 1) % self.every == 0
        # Accelerate hands its GradScaler to the optimizer it wraps (prepared after on_train_begin, so read here)
        self._scaler = active_scaler(getattr(optimizer, "scaler", None))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        st, self._st = self._st, None
        err, self._nonfinite = self._nonfinite, None
        if st is None and err is None:
            return
        # The Trainer has unscaled (to clip, or to measure the norm), so the scaler's own inf check decides
        if self._scaler is not None and amp_state(self._scaler, self._model_ref, optimizer)[1]:
            if st is not None:
                st.discard()
            self.overflow_steps += 1
            skip_overflow(self.fc, self.task, self._amp_warned)
            return
        if err is not None:  # non-finite, yet the scaler found no overflow: a real error
            if st is not None:
                st.discard()
            raise err
        st.__exit__(None, None, None)  # settles the step: applied whole, or discarded and raised
        mark_training_task(self.fc, self._model_ref, self.task)
        self.fc.record_groups(self.task, self._sums.to_host(), self._T)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._abandon()
        for h in self._handles:
            h.remove()
        self._handles = []
        self.fc.flush()

    # -- hooks ----------------------------------------------------------------------------------
    def _on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation and generation are not training steps
        self._model_ref = module
        self._window.append(int(self.fc.loss_fn.count_tokens(kwargs)))
        if kwargs.get("num_items_in_batch") is not None:
            self._items = kwargs["num_items_in_batch"]

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if not self._collect or p.grad is None or not _sync_gradients():
                return  # not this window, or not its last backward: the gradient is not final yet
            if self._st is None:
                self._open()
            if self._scaler is None:
                x = square_of(p.grad, self._scale)
            else:  # .grad is S·g here: the Trainer unscales only after backward, to clip
                x = scaled_square(p.grad, self._scale)
            if self.fc.reduction == "group":
                self._sums.add(name, x)
            try:
                self._st.add(name, x, trusted=True, donate=True, final=True)
            except NonFiniteGradientError as e:
                if self._scaler is None:
                    raise
                # likely the overflow step the scaler will skip: it tells at on_pre_optimizer_step
                self._nonfinite, self._collect = e, False
                self._abandon()
        return hook

    def _open(self) -> None:
        self._T = T = sum(self._window)
        if self._items is None and len(set(self._window)) > 1 and not self._warned:
            self._warned = True
            warnings.warn(FisherCallbackWarning(
                f"the model does not take num_items_in_batch, so the Trainer averages each micro-batch's loss on its "
                f"own, and the micro-batches of this step have {self._window} target tokens: the gradient is not a "
                "constant times the token-summed one, and the stored x weights micro-batches unequally. Use a model "
                "that takes num_items_in_batch, or micro-batches of equal token counts"), stacklevel=2)
        self._scale = self._items if self._items is not None else T
        if self._scaler is not None:
            # The scale of this backward: it changes only at scaler.update(), after the optimizer step
            self._scale = self._scale / float(self._scaler.get_scale())
        self._sums = GroupSums(self._layouts)
        self._st = self.fc.store.begin_step(self.task, tokens=T, layouts={n: self._layouts[n] for n in self._order})

    def _abandon(self) -> None:
        st, self._st = self._st, None
        if st is not None:
            st.discard()


def _sync_gradients() -> bool:
    """Whether this backward ends a gradient-accumulation window (Accelerate's shared flag; True without it)."""
    try:
        from accelerate.state import GradientState
    except ImportError:
        return True
    return bool(GradientState().sync_gradients)
