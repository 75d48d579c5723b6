"""Check layouts against the model: does each head block hold what the model's attention uses as that head?

A :class:`~fisherstore.ParamLayout` says which rows (or columns) of an attention
projection belong to head ``h``. Its shape check cannot tell a right layout from a wrong
one of the same extent: Bloom's interleaved ``query_key_value`` declared ``fused="block"``
fits its shape and collects, and every head block then holds another head's rows. So a
``layouts=`` override is verified against the model itself, before anything is stored.

The evidence is where the gradient lands. The model's attention output of head ``h`` is
a slice of its output projection's *input* (the concatenated heads, before O mixes them);
O's layout says which slice. Autograd then tells which rows of Q, K and V that slice
depends on, and the check compares them with the rows the layouts give head ``h``:

1. **Containment.** ``probe = <X[..., O's head h features], r>`` (``X`` the O module's
   input, captured with a forward pre-hook; ``r`` fixed noise). Its gradient must lie in
   the rows the layout gives head ``h`` (Q: head ``h``; K/V: its key/value head
   ``h // (H / H_kv)``), and must cover every one of them (a weight's whole head block
   moves: each of a head's output features depends on all its Q and K rows through the
   scores, and on one V row each). A misplaced, permuted or wrongly fused block fails here.
2. **One head per head block.** The same probe on the *first* and on the *last* feature
   of O's head ``h``. Both features belong to one model head when O's layout is right, so
   they move the same Q/K rows; a head block that spans two model heads (``H=2, d=16``
   declared for a model with ``H=4, d=8``: same shapes) moves two different row sets. And
   the single first feature still moves every row of the layout's Q and K head blocks
   (one feature depends on the whole ``q·k`` score), so a Q/K block twice the model's head
   is caught too, and so is a value projection declared as a key (one feature moves one
   V row only).
3. **O itself.** The O module applied to ``X`` with every feature but head ``h``'s zeroed:
   the O weight's gradient must lie exactly in the columns (rows, for a Conv1D) its
   layout gives head ``h``. A wrong ``transposed`` on a square O fails here.

Why gradients, and not "perturb a head block's weights and look at the outputs": both
ask the same question (which weights does head ``h``'s output depend on), but one
backward pass answers it for every row of every projection at once, exactly (rows of
other heads get an exact zero, not a small difference to threshold), and it needs no
copy of the weights. ``torch.autograd.grad`` with only the layer's own Q/K/V weights as
inputs prunes the graph to that layer, so each probe costs one backward through one
attention layer. The forward is one run of ``loss_fn`` on the first ``rows`` sequences
of a batch, in eval mode (no dropout), with every ``requires_grad`` and ``.grad`` put back
afterwards (:func:`~fisherstore.collect.autograd.grads_of`).

Which layers: every layer holding an overridden parameter, but a layer whose layouts,
parameter names (layer number aside) and module classes repeat an already checked layer's
is skipped: the same layouts on the same attention code give the same verdict, and a
model of L identical layers would otherwise pay L times for one answer. Cost per checked
layer: 3·H attention-layer backward passes plus H tiny O products (docs/layouts.md
has measurements). ``all_layers=True`` checks every layer anyway.

What it cannot see (docs/layouts.md): Q and K of one head swapped in an MHA layer (the
score ``q·k`` is symmetric in where the gradient lands), a key projection declared as a
value, and attention whose heads are not independent before O (a norm over all heads'
queries, talking-heads attention): there every head's output moves every row, and the
check refuses the layout as not fitting.

Usage::

    report = check_layouts(model, layouts, overridden_names, batch, causal_lm)
    report.layers, report.passes      # what was checked, at what cost
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import InvalidArgumentError, LayoutError, LayoutMismatchError
from ..losses import LossFn, call_loss
from ..spec.layers import layer_keys
from ..spec.layout import ParamLayout, head_labels
from .autograd import grads_of
from .batches import batch_rows, on_device, take_rows

__all__ = ["LayoutCheck", "check_layouts"]

#: A row is "moved" when its gradient exceeds this fraction of the probe's largest one. Rows of
#: other heads get an exact zero (zero upstream gradient through softmax and matmul), so any
#: small positive number separates them; it is not 0 only so a denormal never decides a verdict.
_RTOL = 1e-6
#: The seed of the probe noise ``r``: the verdict must not change from one run to the next.
_SEED = 20


class LayoutCheck(NamedTuple):
    """What :func:`check_layouts` did: the layers it checked, those it skipped as repeats, its cost."""

    layers: list[str]
    repeats: list[str]
    passes: int
    seconds: float


def check_layouts(model: nn.Module, layouts: Mapping[str, ParamLayout], names: Iterable[str],
                  batch: Mapping[str, Any], loss_fn: LossFn, *, rows: int = 2,
                  all_layers: bool = False) -> LayoutCheck:
    """Verify the head layouts of every attention layer holding one of ``names`` against ``model`` itself.

    ``layouts``: every parameter's layout (the overrides merged in, as
    :func:`~fisherstore.layouts_from_model` returns them); ``names``: the parameters to
    vouch for (a collector's overrides). ``batch``/``loss_fn``: one forward of
    ``loss_fn(model, first rows of batch)`` supplies the attention inputs (``rows``
    sequences, 2 by default: enough for every head to see several tokens, and cheap).
    ``all_layers``: check every layer, also those that repeat a checked layer's layouts,
    names and module classes (skipped by default: the same verdict, L times the cost).
    The model is left as it was (``requires_grad``, ``.grad``, train mode).

    Returns a :class:`LayoutCheck`. Usage: ``check_layouts(model, layouts, overrides, batch, causal_lm)``.

    Raises:
        LayoutMismatchError: a layout does not fit where the model puts its heads; the
            message names the parameter, the block and the head whose attention output
            moved, and the rows its gradient landed on.
        LayoutError: a layer has no O (output projection) layout to take head outputs
            from, O is not the weight of a module of its own, the layer's layouts disagree
            on the number of heads, or ``loss_fn`` never runs its O module.
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise InvalidArgumentError(f"rows must be a positive int, got {rows!r}")
    start = time.perf_counter()
    named = dict(model.named_parameters())
    groups = _layer_groups(layouts, named)
    todo: dict[str, _Layer] = {}
    repeats: list[str] = []
    seen: set[Any] = set()
    for n in names:
        lay = layouts.get(n)
        if lay is None or not lay.has_heads:
            continue  # an override without heads (mlp, norm, ...) has no attention to check
        key = next((k for k, g in groups.items() if n in g.members), None)
        if key is None or key in todo or key in repeats:
            continue
        layer = groups[key]
        layer.require_o(n)
        sig = layer.signature(model)
        if sig in seen and not all_layers:
            repeats.append(key)
            continue
        seen.add(sig)
        todo[key] = layer
    if not todo:
        return LayoutCheck([], repeats, 0, time.perf_counter() - start)
    wanted = [n for layer in todo.values() for n in layer.members]
    mods = {key: _o_module(model, layer.o_name) for key, layer in todo.items()}
    seen_x: dict[str, list[torch.Tensor]] = {key: [] for key in todo}
    passes = 0
    with grads_of(model, wanted) as params:
        handles = [mod.register_forward_pre_hook(_capture(seen_x[key]), with_kwargs=True) for key, mod in mods.items()]
        try:
            small = on_device(take_rows(batch, slice(0, min(rows, batch_rows(batch)))), _device(model))
            with torch.enable_grad():
                call_loss(loss_fn, model, small)
        finally:
            for h in handles:
                h.remove()
        for key, layer in todo.items():
            if not seen_x[key]:
                raise LayoutError(
                    f"cannot check the layouts of layer {key!r}: loss_fn {getattr(loss_fn, 'name', '')} never ran "
                    f"its output projection {layer.o_name!r} on the batch, so there is no head output to follow. "
                    "Pass a batch (and loss_fn) that runs this attention"
                )
            passes += layer.check(params, mods[key], seen_x[key])
    return LayoutCheck(list(todo), repeats, passes, time.perf_counter() - start)


# -- one layer --------------------------------------------------------------------------------
class _Layer:
    """The headed parameters of one attention layer and its O weight, and the checks on them."""

    def __init__(self, key: str, members: list[str], layouts: Mapping[str, ParamLayout],
                 shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.key = key
        self.members = members
        self.layouts = {n: layouts[n] for n in members}
        self.shapes = {n: shapes[n] for n in members}
        # _layer_groups gives each group at most one O weight
        self.o_name = next((n for n in members if self.layouts[n].kind == "o" and len(shapes[n]) == 2), "")
        # Q/K/V parameters whose gradient is followed: the O weight is checked on its own.
        self.inputs = [n for n in members if self.layouts[n].kind != "o"]
        self.problems: list[tuple[int, str]] = []  # (0 for a weight, 1 for a bias; the line)

    def require_o(self, name: str) -> None:
        """Refuse a layer the check cannot read head outputs from, before any forward."""
        if not self.o_name:
            raise LayoutError(
                f"cannot check the layout of {name!r}: its attention layer ({self.key}) has no output projection "
                "with an 'o' layout, and the check reads each head's output where O takes it in. Give the O layout "
                "too, e.g. layouts={'<...>.o_proj.weight': ParamLayout.attention('o', num_heads, head_dim)}"
            )
        heads = {n: self.layouts[n].num_heads for n in self.members}
        if len(set(heads.values())) > 1:
            shown = ", ".join(f"{n}: H={h}" for n, h in heads.items())
            raise LayoutError(
                f"the layouts of layer {self.key} disagree on the number of query heads ({shown}); every "
                "projection of one attention has the same H (grouped K/V differ in num_kv_heads, not num_heads)"
            )

    def signature(self, model: nn.Module) -> Any:
        """What makes two layers' verdicts the same: names (layer number aside), layouts and module classes."""
        return tuple(sorted(
            (re.sub(r"\.\d+\.", ".#.", n), repr(self.layouts[n]), self.shapes[n],
             type(model.get_submodule(n.rpartition(".")[0])).__qualname__)
            for n in self.members
        ))

    def check(self, params: Mapping[str, nn.Parameter], o_mod: nn.Module, xs: list[torch.Tensor]) -> int:
        """Run the three checks of every head (module docstring); raise naming every misfit. Returns the passes."""
        lo = self.layouts[self.o_name]
        gen = torch.Generator().manual_seed(_SEED)
        inputs = [params[n] for n in self.inputs]
        width = xs[0].shape[-1]
        passes = 0
        reached = {n: False for n in self.inputs}
        live = [x for x in xs if x.requires_grad]
        for h in range(lo.num_heads):
            s, e = lo.head_range(h, "O")
            if e > width:
                self._report(self.o_name,
                    f"{self.o_name!r} (O): head {h} is features {s}:{e} of its input, which has {width}; is "
                    "transposed= right?")
                continue
            if live and inputs:
                full = self._grads(inputs, live, slice(s, e), gen)
                first = self._grads(inputs, live, slice(s, s + 1), gen)
                last = self._grads(inputs, live, slice(e - 1, e), gen)
                passes += 3
                for n in self.inputs:
                    reached[n] = reached[n] or bool(_moved(full[n], self.layouts[n]).any())
                misplaced = self._contained(h, s, e, full, first)
                self._one_head(h, s, e, first, last, skip=misplaced)
            passes += self._check_o(h, s, e, params[self.o_name], o_mod, xs, gen)
        for n in self.inputs:
            if len(self.shapes[n]) == 2 and not reached[n]:
                self._report(n,
                    f"{n!r}: no head's attention output (the input of {self.o_name!r}) depends on it. Is "
                    f"{self.o_name!r} the output projection of the attention it belongs to? (Or the batch's sequences "
                    "are one token long, which gives queries and keys no gradient.)")
        if self.problems:
            # Weights first: a bias repeats its weight's verdict, and the list is cut at 8 lines.
            lines = [p for _, p in sorted(self.problems, key=lambda t: t[0])]
            shown = "\n  - ".join(lines[:8])
            more = f"\n  ... ({len(self.problems) - 8} more)" if len(self.problems) > 8 else ""
            raise LayoutMismatchError(
                f"the layouts of attention layer {self.key} do not fit the model: moving one head's attention output "
                f"moves other weights than the layouts give that head.\n  - {shown}{more}\n"
                "Fix num_heads/head_dim/num_kv_heads, fused= or transposed= of the parameters named "
                "(docs/layouts.md shows how to read them off the attention's forward)")
        return passes

    def _report(self, name: str, line: str) -> None:
        self.problems.append((0 if len(self.shapes[name]) == 2 else 1, line))

    # -- the probes -----------------------------------------------------------------------------
    def _grads(self, inputs: list[nn.Parameter], xs: list[torch.Tensor], cols: slice,
               gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The gradient of ``<X[..., cols], r>`` for every Q/K/V parameter of the layer (zeros where unused)."""
        probe = sum(_dot(x[..., cols], gen) for x in xs)
        got = torch.autograd.grad(probe, inputs, retain_graph=True, allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(self.inputs, inputs, got)}

    def _contained(self, h: int, s: int, e: int, full: Mapping[str, torch.Tensor],
                   first: Mapping[str, torch.Tensor]) -> set[str]:
        """Check 1 for head ``h``; returns the parameters whose gradient left the head's rows."""
        misplaced: set[str] = set()
        for n, g in full.items():
            lay = self.layouts[n]
            moved = _moved(g, lay)
            own = torch.zeros_like(moved)
            for b in lay.blocks:
                a, z = lay.head_range(h, b)
                own[a:z] = True
            stray = moved & ~own
            if stray.any():
                misplaced.add(n)
                self._report(n,
                    f"{n!r} ({'/'.join(lay.blocks)}): head {h}'s attention output (features {s}:{e} of the input of "
                    f"{self.o_name!r}) moves {_axis(lay)} {_spans(moved)}; of those, {_spans(stray)} are not head {h}'s "
                    f"in the layout, which gives them to {_labels(lay, stray)} and puts head {h} at {_own(lay, h)}")
                continue
            if len(g.shape) != 2:
                continue  # a bias may get no gradient at all (K's: softmax ignores a per-query shift)
            one = _moved(first[n], lay)
            qk = [b for b in lay.blocks if b in "QK"]
            # One feature moves every Q and K row of its head through the score q·k, unless no score has a
            # gradient at all (sequences one token long): then Q/K coverage cannot be told, and is not claimed.
            scored = any(bool(one[slice(*lay.head_range(h, b))].any()) for b in qk)
            for b in lay.blocks:
                a, z = lay.head_range(h, b)
                src = moved if b == "V" else one  # one feature moves one V row, but all Q and K rows of its head
                if bool(src[a:z].all()) or (b != "V" and not scored) or not bool(moved.any()):
                    continue
                what = "attention output" if b == "V" else f"first output feature (feature {s})"
                hint = " Is it a value projection?" if b != "V" and int(one[a:z].sum()) == 1 else ""
                self._report(n,
                    f"{n!r} ({b}): the layout gives head {h}'s {b} {_axis(lay)} {a}:{z}, but head {h}'s {what} "
                    f"moves only {_spans(src & _mask(src, a, z))} of them: the model's head is narrower than the "
                    f"layout's (check num_heads/head_dim/num_kv_heads).{hint}")
        return misplaced

    def _one_head(self, h: int, s: int, e: int, first: Mapping[str, torch.Tensor],
                  last: Mapping[str, torch.Tensor], skip: set[str]) -> None:
        """Check 2 for head ``h`` (its Q/K coverage is in :meth:`_contained`), on parameters check 1 passed."""
        for n in self.inputs:
            lay = self.layouts[n]
            if n in skip or len(self.shapes[n]) != 2 or not ({"Q", "K"} & set(lay.blocks)):
                continue
            # Only the rows the layout gives head h's Q and K: the two features move different V rows by design.
            qk = torch.zeros(self.shapes[n][lay.head_axis], dtype=torch.bool)
            for blk in lay.blocks:
                if blk in "QK":
                    qk[slice(*lay.head_range(h, blk))] = True
            a, b = _moved(first[n], lay) & qk, _moved(last[n], lay) & qk
            if a.any() and b.any() and not torch.equal(a, b):
                self._report(self.o_name,
                    f"{self.o_name!r} (O): the layout's head {h} (features {s}:{e} of its input) spans several of the "
                    f"model's heads: feature {s} moves {n!r} {_axis(lay)} {_spans(a)}, feature {e - 1} moves "
                    f"{_spans(b)} (check num_heads/head_dim)")
                return

    def _check_o(self, h: int, s: int, e: int, weight: nn.Parameter, o_mod: nn.Module, xs: list[torch.Tensor],
                 gen: torch.Generator) -> int:
        lay = self.layouts[self.o_name]
        probe = 0
        for x in xs:
            kept = torch.zeros_like(x)
            kept[..., s:e] = x.detach()[..., s:e]
            probe = probe + _dot(o_mod(kept), gen)
        (g,) = torch.autograd.grad(probe, [weight], allow_unused=True)
        if g is None:
            self._report(self.o_name, f"{self.o_name!r} (O): calling its module gives its weight no gradient")
            return 1
        moved = _moved(g, lay)
        want = _mask(moved, s, e)
        if bool((moved & ~want).any()):
            self._report(self.o_name,
                f"{self.o_name!r} (O): head {h}'s input features {s}:{e} move its weight's {_axis(lay)} "
                f"{_spans(moved)}, not {s}:{e} alone: the heads lie along the other axis (check transposed=)")
        return 1


# -- helpers ----------------------------------------------------------------------------------
def _layer_groups(layouts: Mapping[str, ParamLayout], named: Mapping[str, nn.Parameter]) -> dict[str, _Layer]:
    """The headed parameters of the model, by attention: layer keys, then the O weight each shares most of its path with.

    A layer key alone can hold two attentions (a cross-attention its name does not mark, such as a
    diffusion block's ``attn1``/``attn2``); each Q/K/V then goes with the O weight it shares the
    longest module path with, and the group's key names that O's module.
    """
    headed = [n for n, lay in layouts.items() if lay.has_heads and n in named]
    keys = layer_keys(headed)
    groups: dict[str, list[str]] = {}
    for n in headed:
        k = keys[n]
        groups.setdefault("(no layer number)" if k is None else str(k), []).append(n)
    out: dict[str, list[str]] = {}
    for k, members in groups.items():
        os_ = [n for n in members if layouts[n].kind == "o" and named[n].ndim == 2]
        if len(os_) <= 1:
            out[k] = members
            continue
        for n in members:
            o = n if n in os_ else max(os_, key=lambda o: _shared(n, o))
            out.setdefault(f"{k} ({o.rpartition('.')[0].rpartition('.')[0]})", []).append(n)
    shapes = {n: tuple(named[n].shape) for n in headed}
    return {k: _Layer(k, ms, layouts, shapes) for k, ms in out.items()}


def _shared(a: str, b: str) -> int:
    """How many leading dotted components two parameter names share."""
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def _o_module(model: nn.Module, o_name: str) -> nn.Module:
    """The projection module whose ``weight`` is ``o_name``: its input is the heads' outputs, side by side."""
    path, _, leaf = o_name.rpartition(".")
    mod = model.get_submodule(path)
    if leaf != "weight" or next(mod.children(), None) is not None:
        # An O weight the attention multiplies itself (F.linear(x, self.o_weight)): no module of its own
        # takes the heads' outputs in, so there is nothing to hook and nothing to call.
        raise LayoutError(
            f"cannot check the layouts around {o_name!r}: it is not the weight of a projection module of its own "
            f"({type(mod).__name__} has submodules or calls it {leaf!r}), and the check reads the heads' outputs "
            "where such a module (nn.Linear, Conv1D) takes them in. Pass verify_layouts=False to FisherCollector "
            "to collect with these layouts unchecked (docs/layouts.md)"
        )
    return mod


def _capture(into: list[torch.Tensor]) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(x, torch.Tensor):
            into.append(x)
    return hook


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dot(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``<x, r>`` with fixed noise ``r``: a probe whose gradient is ``r`` on ``x`` (never cancels to zero by accident)."""
    r = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    return (x * r).float().sum()


def _moved(g: torch.Tensor, lay: ParamLayout) -> torch.Tensor:
    """Which indices along ``lay``'s head axis a gradient moved (a bool vector)."""
    a = g.detach().float().abs()
    if a.ndim > 1:
        a = a.movedim(lay.head_axis, 0).reshape(a.shape[lay.head_axis], -1).amax(dim=1)
    a = a.cpu()  # verdicts are small bool vectors on the host, whatever device the model is on
    top = float(a.max()) if a.numel() else 0.0
    return a > top * _RTOL if top > 0 else torch.zeros_like(a, dtype=torch.bool)


def _mask(like: torch.Tensor, a: int, z: int) -> torch.Tensor:
    m = torch.zeros_like(like, dtype=torch.bool)
    m[a:z] = True
    return m


def _axis(lay: ParamLayout) -> str:
    return "rows" if lay.head_axis == 0 else "columns"


def _spans(mask: torch.Tensor) -> str:
    """``rows 8:24, 40:48`` style: the runs of True in a bool vector."""
    idx = mask.nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    shown = ", ".join(f"{a}:{z}" for a, z in runs[:6])
    return shown + (f", ... ({len(runs) - 6} more runs)" if len(runs) > 6 else "") if runs else "nothing"


def _labels(lay: ParamLayout, mask: Sequence[bool] | torch.Tensor) -> str:
    """What the layout calls the indices in ``mask``: ``Q of heads 1-2, K of head 0``."""
    heads, blocks = head_labels(lay, len(mask))
    by_block: dict[str, list[int]] = {}
    for i, m in enumerate(mask):
        if bool(m):
            got = by_block.setdefault(blocks[i] or "?", [])
            if heads[i] not in got:
                got.append(heads[i])
    return ", ".join(f"{b} of head{'s' if len(hs) > 1 else ''} {_heads(hs)}" for b, hs in by_block.items())


def _heads(hs: list[int]) -> str:
    hs = sorted(hs)
    return f"{hs[0]}-{hs[-1]}" if len(hs) > 2 and hs[-1] - hs[0] == len(hs) - 1 else ", ".join(map(str, hs))


def _own(lay: ParamLayout, h: int) -> str:
    return ", ".join(f"{b} {'{}:{}'.format(*lay.head_range(h, b))}" for b in lay.blocks)
