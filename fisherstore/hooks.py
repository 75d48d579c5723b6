"""One collector step: the micro-batch loop, its backward hooks, and how their sums reach the store.

The hooks are on the hot path of backward, so they never wait for the device (issue 11):
each squares its gradient in place (the gradient is ours and dropped right after), adds
one group vector on the device (:class:`~fisherstore.groups.GroupSums`) and hands the
square to the open step, which accumulates it where the accumulator lives (a device
twin, host memory through a side-stream copy, or a streamed slab) and checks its values
only when the step settles. Usage (from :class:`~fisherstore.collector.FisherCollector`)::

    run = StepRun(fc, model, task, order, layouts)
    T = run.streamed(batch)            # or run.summed(batch), run.data_parallel(batch)
    increments = run.groups.to_host()  # the step's group vectors, one transfer
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from .dist import RankGroup
from .errors import FisherStoreError, InvalidArgumentError
from .groups import GroupSums
from .layout import ParamLayout
from .losses import CausalLM, Seq2SeqLM

__all__ = ["Collecting", "StepRun", "check_loss", "call_loss", "loss_name", "batch_rows", "take_rows", "on_device", "fingerprint"]

class Collecting(Protocol):
    """What one step's loop needs of the collector that drives it (:class:`~fisherstore.collector.FisherCollector`).

    Declared here, below the collector, so that the loop depends on these few settings
    and not on the class that sits above it.
    """

    store: Any
    group: RankGroup
    loss_fn: Any
    estimator: str
    reduction: str
    micro_batch_size: int | None

    def _owner_ranks(self, task: str, order: list[str]) -> list[int]: ...


#: ``sink(name, x, final)``: x is this micro-batch's (or the step's) square, ``final`` its last one.
Sink = Callable[[str, torch.Tensor, bool], None]


class StepRun:
    """One EMA step of one task: the micro-batch loop and how its sums reach the store.

    Three ways, one result (the class docstring of :class:`FisherCollector` says when
    each is used): :meth:`streamed` feeds each micro-batch's grad² to the open step;
    :meth:`summed` keeps a per-step sum and feeds it after the loop, once T is known;
    :meth:`data_parallel` keeps the sum of every tracked parameter and reduces it onto
    the parameter's owner rank. The group view's increments go to :attr:`groups`.
    """

    def __init__(self, fc: Collecting, model: nn.Module, task: str, order: list[str],
                 layouts: dict[str, ParamLayout]) -> None:
        self.fc = fc
        self.model = model
        self.task = task
        self.order = order  # tracked parameters in the store's creation order
        self.layouts = layouts
        self.groups = GroupSums(layouts)
        self.named = dict(model.named_parameters())

    def _begin(self, T: int) -> Any:
        return self.fc.store.begin_step(self.task, tokens=T, layouts={n: self.layouts[n] for n in self.order})

    # -- the three ways ---------------------------------------------------------------------
    def streamed(self, batch: Mapping[str, Any]) -> int:
        """Each micro-batch's grad² goes to the store as soon as it is final (T counted up front)."""
        fc = self.fc
        batch_rows(batch)  # not a batch: say so before anything else runs
        if fc.group.world_size > 1:
            check_same_batch(fc.group, batch)
        T = int(fc.loss_fn.count_tokens(batch))
        check_tokens(T)
        owned = {n for n in self.order if fc.store.owns(self.task, n)}
        with self._begin(T) as st:
            square = fc.estimator == "batch"  # the batch estimator's sink gets the summed gradient
            got = self.backward(batch, owned, lambda n, x, final: self.feed(st, n, _square(x) if square else x, final))
            if got != T:  # discard the step: its x was divided by the wrong T
                raise FisherStoreError(
                    f"{loss_name(fc.loss_fn)} counted {got} tokens over the micro-batches of a batch for which its "
                    f"count_tokens said {T}; the step was discarded. Make count_tokens(batch) equal the sum of the "
                    "n_tokens its calls return"
                )
        return T

    def summed(self, batch: Mapping[str, Any]) -> int:
        """A loss that cannot count tokens up front: sum the step on this rank, then feed it."""
        fc = self.fc
        batch_rows(batch)
        if fc.group.world_size > 1:
            check_same_batch(fc.group, batch)
        owned = {n for n in self.order if fc.store.owns(self.task, n)}
        sums: dict[str, torch.Tensor] = {}
        T = self.backward(batch, owned, lambda n, x, final: _add_to(sums, n, x))
        check_tokens(T)
        with self._begin(T) as st:
            for n in self.order:
                x = sums.pop(n, None)
                if x is not None:
                    self.feed(st, n, _square(x) if fc.estimator == "batch" else x, True)
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
            T_local = self.backward(batch, set(self.order), lambda n, x, final: _add_to(sums, n, x))
        except Exception as e:
            err = e
        err = group.agree(err, f"compute its gradients for step {fc.store.step(self.task) + 1} of task {self.task!r}")
        if err is not None:
            raise err
        # T of the union batch, and which parameters have a gradient on any rank: one without
        # is skipped on every rank and decays lazily, as in a single process.
        counts = group.all_reduce_ints([T_local] + [int(n in sums) for n in self.order])
        T = counts[0]
        check_tokens(T, data_parallel=True)
        with self._begin(T) as st:
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
                        self.feed(st, n, _square(x) if fc.estimator == "batch" else x, True)
                    except Exception as e:  # keep reducing with the others; fail together below
                        err = e
            err = group.agree(err, f"write step {st.t} of task {self.task!r}")
            if err is not None:
                raise err  # inside the step: every rank discards it
        return T

    # -- the parts --------------------------------------------------------------------------
    def feed(self, st: Any, name: str, x: torch.Tensor, final: bool) -> None:
        """Give ``x`` (this step's Σ g² of ``name``, or a part of it; ours) to the group view, then to the step."""
        if self.fc.reduction == "group":
            self.groups.add(name, x)  # queued before the step may sum into x
        st.add(name, x, trusted=True, donate=True, final=final)

    def backward(self, batch: Mapping[str, Any], feed: set[str], sink: Sink) -> int:
        """The micro-batch loop; returns this rank's token count.

        ``sink(name, x, final)`` receives, for each parameter in ``feed``, every micro-batch's
        squared gradient (``"micro_batch"``), or once the summed gradient (``"batch"``).
        Every tracked parameter needs a gradient (the graph is the same on every rank);
        those not in ``feed`` are dropped as soon as they are final.
        """
        fc, model, named = self.fc, self.model, self.named
        tracked = set(self.order)
        batch = on_device(batch, next(model.parameters()).device)
        rows = batch_rows(batch)
        saved = {n: p.requires_grad for n, p in named.items()}
        # A caller's stale .grad would be summed into the first micro-batch: stash it.
        saved_grads = {n: named[n].grad for n in self.order}
        was_training = model.training
        micro = fc.estimator == "micro_batch"
        last = [False]

        def make_hook(name: str) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                if name not in feed:  # another rank writes it, from its own gradient
                    p.grad = None
                elif micro:
                    g, p.grad = p.grad, None  # the next micro-batch's gradient starts from zero
                    sink(name, _square(g), last[0])
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
            mb = fc.micro_batch_size
            for start in range(0, rows, mb):
                last[0] = start + mb >= rows
                loss, n_tok = call_loss(fc.loss_fn, model, take_rows(batch, slice(start, start + mb)))
                T += n_tok
                if n_tok:  # a micro-batch with nothing to predict adds nothing
                    loss.backward()
            if not micro:
                for n in self.order:
                    if n in feed and named[n].grad is not None:
                        g, named[n].grad = named[n].grad, None
                        sink(n, _dense(g).float(), True)
        finally:
            for h in handles:
                h.remove()
            for n, p in named.items():
                p.requires_grad_(saved[n])
            for n in self.order:
                named[n].grad = saved_grads[n]
            model.train(was_training)
        return T


def check_loss(loss_fn: Any, model: nn.Module) -> None:
    """Refuse a loss that cannot be this model's: it would train on the wrong targets, silently."""
    cfg = getattr(model, "config", None)
    enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
    cls = type(model).__name__
    if isinstance(loss_fn, CausalLM) and enc_dec:
        raise InvalidArgumentError(
            f"{cls} is an encoder-decoder model (config.is_encoder_decoder), but loss_fn is the causal-LM "
            "loss, which would shift the encoder's input_ids into targets. Pass "
            "loss_fn=fisherstore.losses.seq2seq_lm and put the decoder targets in batch['labels']"
        )
    if isinstance(loss_fn, CausalLM) and cls.endswith("ForMaskedLM"):
        raise InvalidArgumentError(
            f"{cls} is a masked language model, but loss_fn is the causal-LM loss, which would predict "
            "each next token of a model that sees the whole sequence. Pass "
            "loss_fn=fisherstore.losses.masked_lm and put the masked targets in batch['labels']"
        )
    if isinstance(loss_fn, Seq2SeqLM) and cfg is not None and not enc_dec:
        raise InvalidArgumentError(
            f"{cls} is not an encoder-decoder model (config.is_encoder_decoder is False), but loss_fn is "
            "seq2seq_lm, which uses labels unshifted. Pass loss_fn=fisherstore.losses.causal_lm "
            "(decoder-only) or fisherstore.losses.masked_lm (masked LM)"
        )


def _square(g: torch.Tensor) -> torch.Tensor:
    """``g²`` in fp32, in place when ``g`` is a dense fp32 gradient of our own (no new memory, one kernel)."""
    g = _dense(g)
    if g.dtype != torch.float32 or g._base is not None:
        g = g.to(torch.float32, copy=True)
    return g.square_()


def _dense(g: torch.Tensor) -> torch.Tensor:
    """A gradient as a dense tensor: sparse ones (``nn.Embedding(sparse=True)``) cannot be summed across ranks."""
    g = g.detach()
    return g.to_dense() if g.layout != torch.strided else g


def _add_to(sums: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    if name in sums:
        sums[name].add_(x)
    else:
        sums[name] = x if x.dtype == torch.float32 else x.float()


def loss_name(loss_fn: Any) -> str:
    return str(getattr(loss_fn, "name", None) or getattr(loss_fn, "__name__", None) or type(loss_fn).__name__)


def call_loss(loss_fn: Any, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
    """``loss_fn(model, batch)``, checked: a scalar tensor and a non-negative token count."""
    out = loss_fn(model, batch)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
        raise InvalidArgumentError(
            f"loss_fn {loss_name(loss_fn)} must return (loss_sum: Tensor, n_tokens: int), got {type(out).__name__}; "
            "see fisherstore.losses"
        )
    loss, n = out
    n = int(n.item()) if isinstance(n, torch.Tensor) else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgumentError(f"loss_fn {loss_name(loss_fn)} returned n_tokens={n!r}; it must be an int >= 0")
    if loss.numel() != 1:
        raise InvalidArgumentError(
            f"loss_fn {loss_name(loss_fn)} returned a loss of shape {tuple(loss.shape)}; it must be the scalar "
            "token-summed loss (reduction='sum')"
        )
    return loss, n


def check_tokens(T: int, data_parallel: bool = False) -> None:
    if T == 0:
        where = "the batches of every rank have" if data_parallel else "the batch has"
        raise InvalidArgumentError(
            f"{where} no tokens to predict (every label is -100, or sequences have length 1); "
            "pass a batch with at least one target token"
        )


def batch_rows(batch: Mapping[str, Any]) -> int:
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


def take_rows(batch: Mapping[str, Any], rows: slice) -> dict[str, Any]:
    """Rows ``rows`` of every tensor in ``batch`` (other values as they are)."""
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.ndim >= 1 else v for k, v in batch.items()}


def on_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    batch_rows(batch)  # a batch that is not a mapping of tensors fails here, with its reason
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fingerprint(batch: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...], int]]:
    """A checksum of the batch's integer tensors (token ids, masks, labels): equal batches, equal prints."""
    fp = []
    for k in sorted(batch):
        v = batch[k]
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex():
            data = v.detach().cpu().contiguous()
            fp.append((k, tuple(v.shape), zlib.crc32(data.numpy().tobytes())))
    return fp


def check_same_batch(group: RankGroup, batch: Mapping[str, Any]) -> None:
    """With ``data_parallel=False`` every rank must see the same batch; refuse one that does not.

    The ranks compare a checksum of the batch's integer tensors (token ids, masks, labels),
    so a DDP job that set ``data_parallel=False`` fails instead of writing each parameter
    from its owner's batch alone.
    """
    views = group.all_gather(fingerprint(batch))
    bad = [r for r, v in enumerate(views) if v != views[0]]
    if bad:
        raise InvalidArgumentError(
            f"data_parallel=False means every rank sees the same batch, but rank {bad[0]}'s batch differs from "
            "rank 0's. For ranks that see different batches (DDP) pass data_parallel=True (the default with a "
            "group), so every rank's gradients count"
        )
