"""Adam's second moment ``exp_avg_sq`` taken into a store as an EMA Fisher: :func:`import_adam`.

``torch.optim.Adam`` and ``AdamW`` keep, per parameter, ``v_t = β2·v_{t-1} + (1-β2)·g_t²``:
the store's own recurrence with β = β2. Importing it writes ``v_t`` as the task's raw EMA
state at step ``t`` (:meth:`~fisherstore.FisherStore.write_state`), so the bias-corrected
readout is ``v_t / (1 - β2^t)``, Adam's ``v̂_t``. docs/estimators.md says how it compares
with the collector's estimators (``tokens_per_step``).

Usage::

    fisherstore.import_adam("fisher.zarr", "adam", model, "checkpoint-500/optimizer.pt", tokens_per_step=8192)
    fisherstore.import_adam(store, "adam", model, optimizer)            # a live optimizer: exact names
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..collect.models import layouts_from_model, model_description
from ..errors import (
    InvalidArgumentError,
    NonFiniteGradientError,
    ShapeMismatchError,
    UnknownParamError,
    close_matches,
    listing,
    require,
)
from ..store.api import open as open_store
from ..store.facade import FisherStore

__all__ = ["import_adam", "AdamImport", "trainer_param_names"]

#: The largest fp32: a state scaled by ``tokens_per_step`` must stay below it.
_FP32_MAX = float(torch.finfo(torch.float32).max)
#: Elements checked at a time for NaN and Inf (16 Mi: 16 MiB of flags).
_BLOCK = 1 << 24

#: Keys of a state, then of a param group, that give another optimizer's state_dict away, for the message refusing it.
_TELLTALES = (("momentum_buffer", "SGD"), ("exp_inf", "Adamax"), ("mu_product", "NAdam"), ("square_avg", "RMSprop"),
              ("acc_delta", "Adadelta"), ("eta", "ASGD"), ("prev", "Rprop"), ("sum", "Adagrad"))
_GROUP_TELLTALES = (("nesterov", "SGD"), ("momentum_decay", "NAdam"), ("lr_decay", "Adagrad"), ("rho", "Adadelta"),
                    ("alpha", "RMSprop"), ("etas", "Rprop"), ("lambd", "ASGD"), ("decoupled_weight_decay", "RAdam"),
                    ("betas", "Adamax"))

_ONLY_ADAM = ("only torch.optim.Adam / AdamW's exp_avg_sq is an EMA of squared gradients with a known β and step, "
              "i.e. a Fisher estimate the store can hold")


@dataclass(frozen=True)
class AdamImport:
    """What :func:`import_adam` wrote: the task, Adam's step and β2, and the parameters, in the store's order.

    ``tokens_per_step`` is the scale applied (None: the state as Adam keeps it); ``source``
    says where the state came from, as recorded in the task's metadata.
    """

    task: str
    step: int
    beta2: float
    params: list[str] = field(repr=False)
    tokens_per_step: int | None = None
    source: str = ""

    def __repr__(self) -> str:
        scale = f", tokens_per_step={self.tokens_per_step}" if self.tokens_per_step else ""
        return (f"AdamImport(task={self.task!r}, step={self.step}, beta2={self.beta2}, {len(self.params)} params"
                f"{scale}, source={self.source!r})")


@dataclass
class _Held:
    """One parameter the optimizer holds: its model name, its param group, where it sits, and its state (or None)."""

    name: str
    group: int
    where: str
    state: Mapping[str, Any] | None


def trainer_param_names(model: torch.nn.Module) -> list[str]:
    """``model``'s trainable parameter names in the order Hugging Face ``Trainer``'s default optimizer indexes them.

    ``Trainer.create_optimizer`` gives the optimizer two param groups: the parameters with
    weight decay, then those without (biases and norms), each in ``named_parameters()``
    order. A saved ``optimizer.pt`` numbers its states in that order, not the model's; pass
    this as ``param_names=`` to :func:`import_adam`. The split is transformers' own rule
    (``Trainer.get_decay_parameter_names``), so use the transformers version that trained.
    Usage: ``import_adam(store, "adam", model, "ckpt/optimizer.pt", param_names=trainer_param_names(model))``.
    """
    transformers = require("transformers", "trainer_param_names", extra="hf")
    # The method reads only its model argument (every transformers release since 4.26): no Trainer is needed.
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return [n for n in trainable if n in decay] + [n for n in trainable if n not in decay]


def import_adam(
    store: FisherStore | str | os.PathLike[str],
    task: str,
    model: torch.nn.Module,
    source: torch.optim.Optimizer | Mapping[str, Any] | str | os.PathLike[str],
    tokens_per_step: int | None = None,
    *,
    param_names: Sequence[str] | None = None,
    params: Sequence[str] | None = None,
    backend: str = "zarr",
) -> AdamImport:
    """Write Adam's ``exp_avg_sq`` into a new task of ``store``, as its EMA Fisher with β = β2 at Adam's step.

    The readout (``store.read(task, name)``, ``store.fisher(task, name)[...]``) is then
    ``exp_avg_sq / (1 - β2^t)`` to fp32 rounding of the scale, and ``bias_corrected=False``
    reads ``exp_avg_sq`` itself, bit for bit (after a cast to fp32 when Adam kept it in
    bf16 or fp16). Amsgrad is accepted: its ``exp_avg_sq`` is the same EMA (the running
    maximum ``max_exp_avg_sq`` is not imported). The task records ``estimator="adam"``, the
    model's description, ``beta2``, ``tokens_per_step``, ``amsgrad`` and ``source``.

    Normalisation: Adam's gradient is that of the *mean* loss, ``g = ∇Σℓ / T`` with ``T``
    the tokens one optimizer step averages over (all micro-batches of gradient accumulation,
    all data-parallel ranks), so ``exp_avg_sq`` is an EMA of ``(∇Σℓ)² / T²``. The collector's
    ``"batch"`` estimator is ``x = (∇Σℓ)² / T``: ``tokens_per_step=T`` multiplies the state
    by ``T`` to put it on that scale (and records ``T·t`` tokens seen); None stores it as
    it is. The gradients Adam saw were clipped (``max_grad_norm``) and unscaled (AMP) before
    it squared them; AdamW's weight decay never enters ``exp_avg_sq``. docs/estimators.md
    says more.

    Args:
        store: an open, writable :class:`~fisherstore.FisherStore`, or a store's path
            (opened with ``mode="a"`` and ``backend``, and closed again).
        task: a task the store does not have yet.
        model: the model the optimizer trained: its ``named_parameters()`` name the states.
            Only names, order and shapes are read (a model on the ``meta`` device will do).
        source: a live ``torch.optim.Adam`` / ``AdamW``; its ``state_dict()``; or the path of
            one saved with ``torch.save`` (a Hugging Face Trainer checkpoint's
            ``optimizer.pt``), loaded memory-mapped so only one state is read at a time.
        tokens_per_step: ``T``, the tokens one optimizer step's loss averaged over; None
            (default) stores the state unscaled.
        param_names: for a state_dict, the model's names of the optimizer's parameters in
            its index order (the param groups' ``params`` lists, concatenated). Default: the
            model's trainable parameters in ``named_parameters()`` order, which is what
            ``Adam(model.parameters())`` numbers. Hugging Face Trainer numbers them
            otherwise: pass :func:`trainer_param_names` ``(model)``. Every state's shape is
            checked against the parameter it is mapped to; nothing beyond that is guessed.
            A live optimizer needs none: its parameters are the model's own objects.
        params: import only these parameters (default: every one the optimizer holds);
            e.g. one param group when the groups' β2 differ, or all but those never stepped.
        backend: the backend that opens ``store`` when it is a path.

    Returns:
        :class:`AdamImport`: the task, step, β2, the parameters written (in model order),
        ``tokens_per_step`` and the source.

    Raises:
        InvalidArgumentError: ``source`` is not Adam's (another optimizer's class or
            state_dict), or unreadable; a parameter the import needs has no state yet (not
            stepped); the imported parameters' param groups differ in β2, or their states
            in step; the step is 0; ``task`` already exists.
        UnknownParamError: the optimizer holds a parameter the model lacks (a state_dict
            index past the model's trainable parameters, a live parameter not in the model),
            or ``param_names`` / ``params`` names one the model lacks.
        ShapeMismatchError: a state's shape is not its mapped parameter's (the names are
            in another order than the optimizer's: pass ``param_names=``).
        NonFiniteGradientError: a state holds NaN or Inf (or overflows fp32 once scaled).

    Every check runs before the store is touched: an import that fails leaves no task.
    """
    if not isinstance(task, str) or not task:
        raise InvalidArgumentError(f"task must be a non-empty str (the new task's name), got {task!r}")
    if tokens_per_step is not None and (isinstance(tokens_per_step, bool) or not isinstance(tokens_per_step, int)
                                        or tokens_per_step < 1):
        raise InvalidArgumentError(f"tokens_per_step must be a positive int (the tokens one optimizer step's loss "
                                   f"averaged over) or None, got {tokens_per_step!r}")
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"model must be the torch.nn.Module the optimizer trained, got "
                                   f"{type(model).__name__}")
    named = dict(model.named_parameters())
    held, groups, desc, cls_name = _held_params(model, named, source, param_names)
    chosen = _choose(held, named, params)
    _check_states(held, chosen, named, groups, param_names is not None)
    beta2 = _one_beta2(held, chosen, groups)
    step = _one_step(held, chosen)
    layouts = layouts_from_model(model)  # a LayoutError is refused here, before the store is touched
    amsgrad = sorted({bool(groups[held[n].group].get("amsgrad", False)) for n in chosen})

    def write(s: FisherStore) -> AdamImport:
        if task in s.tasks():
            raise InvalidArgumentError(
                f"task {task!r} already exists in the store {s.path or ''}; an import writes a new task. Choose "
                "another task name (or import into another store)")
        if not s.writable or s.group.world_size > 1:
            raise InvalidArgumentError(
                f"import_adam writes a new task, so it needs a writable store opened without a rank group (one process); "
                f"the store {s.path or ''} is " + ("read-only" if not s.writable else "opened with a group"))
        _check_finite(held, chosen, tokens_per_step)  # reads every state: after the cheap checks
        for n in chosen:
            s.create(task, n, tuple(named[n].shape), layouts.get(n), decay=beta2)
        # Metadata first: if the write fails, write_state forgets the new task whole, metadata and all.
        s.set_metadata(task, estimator="adam", fisher_type="empirical", model=model_description(model),
                       beta2=beta2, tokens_per_step=tokens_per_step, amsgrad=amsgrad[0] if len(amsgrad) == 1 else
                       amsgrad, optimizer=cls_name, source=desc,
                       weight_decay=_weight_decays(groups, chosen, held, cls_name == "AdamW"))
        s.write_state(task, ((n, _scaled(held[n].state["exp_avg_sq"], tokens_per_step)) for n in chosen), step,
                      tokens=(tokens_per_step or 0) * step)
        s.flush()
        return AdamImport(task, step, beta2, list(chosen), tokens_per_step, desc)

    if isinstance(store, FisherStore):
        return write(store)
    if isinstance(store, (str, os.PathLike)):
        with open_store(store, mode="a", backend=backend) as s:
            return write(s)
    raise InvalidArgumentError(f"store must be an open FisherStore or a store's path, got {type(store).__name__}")


def _weight_decays(groups: Sequence[Mapping[str, Any]], chosen: Sequence[str], held: Mapping[str, _Held],
                   adamw: bool) -> Any:
    """The imported groups' weight decay, recorded: under Adam's L2 decay (not AdamW's decoupled one)
    ``exp_avg_sq`` is the EMA of ``(g + λθ)²``, not of the loss gradient's square (docs/estimators.md)."""
    out = sorted({(float(groups[held[n].group].get("weight_decay", 0.0) or 0.0),
                   bool(groups[held[n].group].get("decoupled_weight_decay", adamw))) for n in chosen})
    return [{"weight_decay": wd, "decoupled": dec} for wd, dec in out]


# -- the optimizer's parameters, named ------------------------------------------------------
def _held_params(model: torch.nn.Module, named: dict[str, torch.nn.Parameter], source: Any,
                 param_names: Sequence[str] | None) -> tuple[dict[str, _Held], Sequence[Mapping[str, Any]], str,
                                                             str | None]:
    """Every parameter the optimizer holds, by model name; its param groups; a short description; its class name."""
    if isinstance(source, torch.optim.Optimizer):
        if not isinstance(source, (torch.optim.Adam, torch.optim.AdamW)):
            raise InvalidArgumentError(f"the optimizer is a {type(source).__module__}.{type(source).__name__}, not "
                                       f"Adam or AdamW: {_ONLY_ADAM}")
        if param_names is not None:
            raise InvalidArgumentError("param_names= names a state_dict's indices; a live optimizer holds the model's "
                                       "own parameters, which name themselves. Leave param_names out")
        return (_held_live(model, source), source.param_groups, f"{type(source).__name__} (live optimizer)",
                type(source).__name__)
    if isinstance(source, (str, os.PathLike)):
        sd, desc = _load(source), os.fspath(source)
    elif isinstance(source, Mapping):
        sd, desc = source, "state_dict"
    else:
        raise InvalidArgumentError(f"source must be a torch.optim.Adam/AdamW, its state_dict(), or the path of a saved "
                                   f"state_dict (optimizer.pt), got {type(source).__name__}")
    if not isinstance(sd.get("state"), Mapping) or not isinstance(sd.get("param_groups"), Sequence):
        raise InvalidArgumentError(
            f"the {desc} is not a torch optimizer state_dict: it holds {listing(map(str, sd))}, not 'state' and "
            "'param_groups'. Give optimizer.state_dict() (torch.save(optimizer.state_dict(), path) for a file); a "
            "DeepSpeed or FSDP checkpoint must be consolidated into one first")
    return _held_from_state_dict(named, sd, desc, param_names), sd["param_groups"], desc, None


def _load(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """A saved state_dict, memory-mapped when it is in torch's zip format (so a state is read when it is used)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InvalidArgumentError(
            f"{path}: no such file" + (" (it is a directory: give its optimizer.pt)" if os.path.isdir(path) else "")
            + ". Give the path of a state_dict saved by torch.save(optimizer.state_dict(), path)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # unpickling errors come in many classes; each means the same here
        raise InvalidArgumentError(f"{path}: torch.load could not read it as an optimizer state_dict "
                                   f"({type(e).__name__}: {e})") from e
    if not isinstance(sd, Mapping):
        raise InvalidArgumentError(f"{path} holds a {type(sd).__name__}, not an optimizer state_dict")
    return sd


def _held_live(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, _Held]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    held: dict[str, _Held] = {}
    for g, group in enumerate(opt.param_groups):
        for k, p in enumerate(group["params"]):
            where = f"param {k} of param group {g}"
            name = by_id.get(id(p))
            if name is None:
                raise UnknownParamError(
                    f"the optimizer's {where} (shape {tuple(p.shape)}) is not a parameter of the "
                    f"{type(model).__name__} given: pass the model this optimizer was built over")
            held[name] = _Held(name, g, where, opt.state.get(p))
    return held


def _held_from_state_dict(named: dict[str, torch.nn.Parameter], sd: Mapping[str, Any], desc: str,
                          param_names: Sequence[str] | None) -> dict[str, _Held]:
    groups, states = sd["param_groups"], sd["state"]
    try:
        order = [(g, int(i)) for g, group in enumerate(groups) for i in group["params"]]
    except (TypeError, ValueError, KeyError) as e:
        raise InvalidArgumentError(f"the {desc}'s param groups do not list integer parameter indices ({e}); it is "
                                   "not a state_dict torch wrote") from e
    position = {i: k for k, (_, i) in enumerate(order)}
    if len(position) != len(order):
        raise InvalidArgumentError(f"the {desc}'s param groups list an index twice; it is not a state_dict torch wrote")
    listed = {str(i) for i in position}
    stray = [i for i in states if str(i) not in listed]
    if stray:
        raise UnknownParamError(f"the {desc} holds states for parameter indices {stray[:8]} that no param group "
                                "lists: it is not a state_dict torch wrote, or not one whole optimizer's")
    trainable = [n for n, p in named.items() if p.requires_grad]
    if param_names is None:
        names = trainable
        if len(order) > len(names):
            extra = [(i, states.get(i)) for _, i in order[len(names):]]
            raise UnknownParamError(
                f"the {desc} holds {len(order)} parameters, but the model has only {len(names)} trainable ones "
                f"(indices 0..{len(names) - 1}): indices {[i for i, _ in extra][:8]} "
                f"(shapes {[_shape_of(s) for _, s in extra][:8]}) have no parameter. Pass the model the optimizer "
                "trained (with the same parameters trainable), or param_names= naming every index")
        if len(order) < len(names):
            raise InvalidArgumentError(
                f"the {desc} holds {len(order)} parameters, but the model has {len(names)} trainable ones, so its "
                "indices cannot be the model's trainable parameters in order. Pass param_names= (the names in the "
                "optimizer's index order), or the live optimizer")
    else:
        names = list(param_names)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise UnknownParamError(f"param_names names {unknown[0]!r}, which the model does not have."
                                    + close_matches(str(unknown[0]), named))
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidArgumentError(f"param_names names {listing(twice)} more than once")
        if len(names) != len(order):
            raise InvalidArgumentError(f"param_names has {len(names)} names, but the {desc}'s param groups hold "
                                       f"{len(order)} parameters: give one name per index, in index order")
    return {names[k]: _Held(names[k], g, f"index {i} in param group {g}", states.get(i, states.get(str(i))))
            for k, (g, i) in enumerate(order)}


def _shape_of(state: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    v = (state or {}).get("exp_avg_sq")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


# -- the checks, before anything is written ------------------------------------------------
def _choose(held: dict[str, _Held], named: dict[str, torch.nn.Parameter], params: Sequence[str] | None) -> list[str]:
    """The parameters to import, in model order: ``params``, or every one the optimizer holds."""
    if params is None:
        return [n for n in named if n in held]
    if isinstance(params, str):
        raise InvalidArgumentError(f"params must be a list of parameter names, got the str {params!r}")
    want = list(params)
    for n in want:
        if n not in named:
            raise UnknownParamError(f"params names {n!r}, which the model does not have."
                                    + close_matches(str(n), named))
        if n not in held:
            raise UnknownParamError(f"params names {n!r}, which the optimizer does not hold (it was not given to "
                                    "the optimizer). Import only parameters the optimizer trains")
    if len(set(want)) != len(want) or not want:
        raise InvalidArgumentError(f"params must name each parameter once, and at least one; got {listing(want)}")
    return [n for n in named if n in set(want)]


def _check_states(held: dict[str, _Held], chosen: list[str], named: dict[str, torch.nn.Parameter],
                  groups: Sequence[Mapping[str, Any]], names_given: bool) -> None:
    """Adam's states, one for every parameter to import, each of its parameter's shape."""
    for g, group in enumerate(groups):  # first: an SGD without momentum has no state at all to tell it by
        b = group.get("betas")
        if "amsgrad" not in group or not isinstance(b, Sequence) or len(b) != 2:
            keys = listing(str(k) for k in group if k != "params")
            raise InvalidArgumentError(f"param group {g} has no Adam betas and amsgrad flag (it holds {keys}): "
                                       f"this is not Adam's state{_guess(held, group)}; {_ONLY_ADAM}")
    foreign = [h for h in held.values() if h.state and "exp_avg_sq" not in h.state]
    if foreign:
        h = foreign[0]
        raise InvalidArgumentError(
            f"the optimizer state of {h.name!r} ({h.where}) holds {sorted(map(str, h.state))}, not Adam's "
            f"'exp_avg_sq'{_guess(held, groups[h.group])}: {_ONLY_ADAM}")
    missing = [n for n in chosen if not held[n].state]
    if missing:
        raise InvalidArgumentError(
            f"the optimizer holds no state for {len(missing)} of the {len(chosen)} parameters to import: "
            f"{listing(missing)}. Adam makes a parameter's state at its first step with a gradient: import after "
            "at least one optimizer step, or pass params= without the parameters that never get a gradient")
    for h in held.values():
        v = (h.state or {}).get("exp_avg_sq")
        if h.state and not isinstance(v, torch.Tensor):
            raise InvalidArgumentError(f"the state of {h.name!r} ({h.where}) has an exp_avg_sq of type "
                                       f"{type(v).__name__}, not a tensor")
        if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(named[h.name].shape):
            fix = ("the state_dict's indices are not in the order of param_names" if names_given else
                   "the state_dict's indices are not the model's trainable parameters in named_parameters() order "
                   "(Hugging Face Trainer numbers parameters with weight decay first)")
            raise ShapeMismatchError(
                f"the optimizer's {h.where} has exp_avg_sq of shape {tuple(v.shape)}, but the parameter it maps to, "
                f"{h.name!r}, has shape {tuple(named[h.name].shape)}: {fix}. Pass param_names= with the names in "
                "the optimizer's index order (for a Trainer checkpoint: param_names=trainer_param_names(model)), "
                "or pass the live optimizer")


def _guess(held: dict[str, _Held], group: Mapping[str, Any]) -> str:
    """`` (it looks like SGD's)``: which optimizer a state_dict that is not Adam's seems to be, or ''."""
    keys = {str(k) for h in held.values() for k in (h.state or {})}
    cls = next((c for k, c in _TELLTALES if k in keys), None) or next((c for k, c in _GROUP_TELLTALES if k in group),
                                                                       None)
    return f" (it looks like {cls}'s)" if cls else ""


def _one_beta2(held: dict[str, _Held], chosen: list[str], groups: Sequence[Mapping[str, Any]]) -> float:
    by_group: dict[int, list[str]] = {}
    for n in chosen:
        by_group.setdefault(held[n].group, []).append(n)
    betas = {g: float(groups[g]["betas"][1]) for g in by_group}  # checked by _check_states
    if len(set(betas.values())) > 1:
        shown = "; ".join(f"group {g}: β2={b} ({len(by_group[g])} params: {listing(by_group[g], 3)})"
                          for g, b in betas.items())
        raise InvalidArgumentError(
            f"the parameters to import sit in param groups with different β2 ({shown}); one task holds one EMA β. "
            "Import each group into its own task: import_adam(store, task_g, model, source, params=[that group's "
            "names])")
    return next(iter(betas.values()))


def _one_step(held: dict[str, _Held], chosen: list[str]) -> int:
    steps: dict[int, list[str]] = {}
    for n in chosen:
        s = held[n].state.get("step")
        try:
            f = float(s)  # a tensor (float or int) in torch >= 1.12, an int before
        except (TypeError, ValueError, RuntimeError):
            f = math.nan
        if not math.isfinite(f) or f != int(f) or f < 0:
            raise InvalidArgumentError(f"the state of {n!r} ({held[n].where}) has step {s!r}, not a whole number "
                                       "of optimizer steps")
        steps.setdefault(int(f), []).append(n)
    if len(steps) > 1:
        shown = "; ".join(f"step {t}: {listing(ns, 3)}" for t, ns in sorted(steps.items()))
        raise InvalidArgumentError(
            f"the parameters' Adam states are at different steps ({shown}): those with fewer steps had no gradient "
            "at some steps, so their EMA is not one task's. Import each step's parameters into its own task with "
            "params=")
    step = next(iter(steps))
    if step == 0:
        raise InvalidArgumentError("the Adam states are at step 0: no gradient has entered them yet. Import after "
                                   "at least one optimizer step")
    return step


def _check_finite(held: dict[str, _Held], chosen: list[str], tokens_per_step: int | None) -> None:
    """NaN, Inf, or an fp32 overflow once scaled, found before anything is created.

    Reads each state once, a block at a time, so a memory-mapped state needs no more RAM
    than one block's flags.
    """
    for n in chosen:
        flat = held[n].state["exp_avg_sq"].reshape(-1)
        top = 0.0
        for i in range(0, flat.numel(), _BLOCK):
            part = flat[i:i + _BLOCK]
            if not bool(torch.isfinite(part).all()):
                raise NonFiniteGradientError(
                    f"the exp_avg_sq of {n!r} ({held[n].where}) holds NaN or Inf; nothing was written. An optimizer "
                    "state after an overflow is no Fisher: import a checkpoint from before it")
            top = max(top, float(part.amax()))
        if tokens_per_step and top * tokens_per_step > _FP32_MAX:
            raise NonFiniteGradientError(
                f"the exp_avg_sq of {n!r} times tokens_per_step={tokens_per_step} overflows fp32; nothing was "
                "written. Import it unscaled (tokens_per_step=None) and scale when reading")


def _scaled(v: torch.Tensor, tokens_per_step: int | None) -> torch.Tensor:
    """The state to store: Adam's own, or ``T`` times it (in fp32, the store's dtype)."""
    return v if tokens_per_step is None else v.to(torch.float32) * tokens_per_step
