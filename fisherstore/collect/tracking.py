"""What a collector tracks: which parameters (``params=``), with which EMA β, under which options.

Kept apart from :mod:`fisherstore.collect.collector` so the collector reads as the collection
loop; these are the decisions it makes before a step, each a plain function.

Usage::

    names = select_params(model, layouts_from_model(model), r"q_proj")   # regular expressions
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from ..errors import InvalidArgumentError, StoredDecayWarning, UnknownParamError, listing
from ..spec.layout import ParamLayout, attention_param_names
from ..spec.manifest import ESTIMATORS

__all__ = ["ParamFilter", "check_options", "select_params", "stored_decays"]

ParamFilter = str | Iterable[str] | Callable[[str, nn.Parameter], bool] | None


def check_options(reduction: str, estimator: str, micro_batch_size: int, loss_fn: Any, layouts: Any,
                  data_parallel: Any) -> None:
    """Refuse a :class:`~fisherstore.collect.collector.FisherCollector` option that is not understood, naming the fix."""
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


def select_params(model: nn.Module, layouts: Mapping[str, ParamLayout], sel: ParamFilter) -> list[str]:
    """The names a ``params=`` filter picks from ``model``, in model order; raises when it picks none.

    ``sel``: None (the attention projection weights ``layouts`` names), ``"all"``, names
    or regular expressions, or a callable ``(name, param) -> bool``.
    """
    named = dict(model.named_parameters())
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


def stored_decays(store: Any, task: str, ema_decay: float, warned: set[str]) -> list[float]:
    """The distinct EMA β of ``task``'s parameters; warns once per task (``warned``) if they are not ``ema_decay``."""
    decays = sorted({store.param(task, n).decay for n in store.params(task)})
    if decays and decays != [ema_decay] and task not in warned:
        warned.add(task)
        shown = ", ".join(f"{d:g}" for d in decays)
        warnings.warn(
            StoredDecayWarning(
                f"task {task!r} was collected with ema_decay={shown}, but this collector has "
                f"ema_decay={ema_decay:g}; the stored β is used for every readout and update of the task "
                f"and for parameters added to it. Open the collector with ema_decay={decays[0]:g} to silence "
                "this warning"
            ),
            stacklevel=4,  # past _stored_decays and _prepare, to the collector method called
        )
    return decays
