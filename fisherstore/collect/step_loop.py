"""One collector step: the micro-batch loop, its backward hooks, and how their sums reach the store.

The hooks are on the hot path of backward, so they never wait for the device (a GPU that
waits for the host inside backward idles): each squares its gradient in place (the
gradient is ours and dropped right after), adds one group vector on the device
(:class:`~fisherstore.collect.group_view.GroupSums`) and hands the square to the open
step, which accumulates it where the accumulator lives (a device twin, host memory
through a side-stream copy, or a streamed slab) and checks its values only when the step
settles. Usage (from :class:`~fisherstore.collect.collector.FisherCollector`)::

    run = StepRun(fc, model, task, order, layouts)
    T = run.streamed(batch)            # or run.summed(batch), run.data_parallel(batch)
    increments = run.groups.to_host()  # the step's group vectors, one transfer
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from ..engine.dist import RankGroup
from ..errors import FisherStoreError, InvalidArgumentError
from ..losses import loss_name
from ..spec.layout import ParamLayout
from .autograd import dense, grads_of, square
from .batches import batch_rows, check_same_batch, on_device, take_rows
from .fisher_types import backward_passes, draw_seed
from .group_view import GroupSums

__all__ = ["Collecting", "StepRun", "Sink", "check_tokens"]


class Collecting(Protocol):
    """What one step's loop needs of the collector that drives it (:class:`~fisherstore.FisherCollector`).

    Declared here, below the collector, so that the loop depends on these few public
    settings and not on the class that sits above it.
    """

    store: Any
    group: RankGroup
    loss_fn: Any
    estimator: str
    reduction: str
    micro_batch_size: int
    fisher_type: str
    mc_samples: int
    seed: int

    def owner_ranks(self, task: str, order: list[str]) -> list[int]: ...


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
        self.t = fc.store.step(task) + 1  # the step this run writes: the same in every pass of a multi-pass run

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
            err: BaseException | None = None
            try:
                summed = fc.estimator == "batch"  # the batch estimator's sink gets the summed gradient
                got = self.backward(batch, owned,
                                    lambda n, x, final: self.feed(st, n, square(x) if summed else x, final))
                if got != T:  # discard the step: its x was divided by the wrong T
                    raise FisherStoreError(
                        f"{loss_name(fc.loss_fn)} counted {got} tokens over the micro-batches of a batch for which "
                        f"its count_tokens said {T}; the step was discarded. Make count_tokens(batch) equal the sum of "
                        "the n_tokens its calls return"
                    )
            except Exception as e:
                err = e
            # A rank whose part failed must not leave the others applying theirs: all discard it.
            err = fc.group.agree(err, f"write step {st.t} of task {self.task!r}")
            if err is not None:
                raise err
        return T

    def summed(self, batch: Mapping[str, Any]) -> int:
        """A loss that cannot count tokens up front: sum the step on this rank, then feed it."""
        fc = self.fc
        batch_rows(batch)
        if fc.group.world_size > 1:
            check_same_batch(fc.group, batch)
        owned = {n for n in self.order if fc.store.owns(self.task, n)}
        sums: dict[str, torch.Tensor] = {}
        err: BaseException | None = None
        T = 0
        try:  # a rank that fails must still reach the collectives, or the others would wait on it
            T = self.backward(batch, owned, lambda n, x, final: _add_to(sums, n, x))
            check_tokens(T)
        except Exception as e:
            err = e
        err = fc.group.agree(err, f"compute its gradients for step {fc.store.step(self.task) + 1} of task {self.task!r}")
        if err is not None:
            raise err
        with self._begin(T) as st:
            try:
                for n in self.order:
                    x = sums.pop(n, None)
                    if x is not None:
                        self.feed(st, n, square(x) if fc.estimator == "batch" else x, True)
            except Exception as e:
                err = e
            err = fc.group.agree(err, f"write step {st.t} of task {self.task!r}")
            if err is not None:
                raise err  # inside the step: every rank discards it
        return T

    def data_parallel(self, batch: Mapping[str, Any]) -> int:
        """Every rank sums its own batch; each sum is reduced onto its owner rank, which writes it.

        No collective runs inside the backward hooks, so ranks may run different numbers
        of micro-batches; every collective below runs in the same order on every rank.
        """
        fc, group = self.fc, self.fc.group
        owners = fc.owner_ranks(self.task, self.order)
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
                        self.feed(st, n, square(x) if fc.estimator == "batch" else x, True)
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
        fc, model = self.fc, self.model
        batch = on_device(batch, next(model.parameters()).device)
        rows = batch_rows(batch)
        micro = fc.estimator == "micro_batch"
        last = [False]
        weight = [1.0]

        def make_hook(name: str) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                if name not in feed:  # another rank writes it, from its own gradient
                    p.grad = None
                elif micro:
                    g, p.grad = p.grad, None  # the next micro-batch's (or pass's) gradient starts from zero
                    x = square(g)
                    if weight[0] != 1.0:
                        x.mul_(weight[0])
                    # Several passes per micro-batch ("mc", "exact") feed like micro-batches: the store sums them
                    # where its budget says (no second buffer here, outside the budget).
                    sink(name, x, last[0])
                # the batch estimator lets the gradient sum over micro-batches
            return hook

        T = 0
        with grads_of(model, self.order, {n: make_hook(n) for n in self.order}) as named:
            mb = fc.micro_batch_size
            for start in range(0, rows, mb):
                final_mb = start + mb >= rows
                passes = backward_passes(fc.fisher_type, fc.loss_fn, model, take_rows(batch, slice(start, start + mb)),
                                         mc_samples=fc.mc_samples, seed=self._seed(start))
                T += passes.n_tokens
                for loss, w, more in passes.items:  # none for a micro-batch with nothing to predict
                    weight[0], last[0] = w, final_mb and not more
                    loss.backward(retain_graph=more)
            if not micro:
                for n in self.order:
                    if n in feed and named[n].grad is not None:
                        g, named[n].grad = named[n].grad, None
                        sink(n, dense(g).float(), True)
        return T

    def _seed(self, rows: int) -> int | None:
        """The seed of one micro-batch's ``"mc"`` draws: where it is (rank, task, step, rows) under the run's seed."""
        if self.fc.fisher_type != "mc":
            return None
        return draw_seed(self.fc.seed, self.fc.group.rank, self.task, self.t, rows)


def _add_to(sums: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    if name in sums:
        sums[name].add_(x)
    else:
        sums[name] = x if x.dtype == torch.float32 else x.float()


def check_tokens(T: int, data_parallel: bool = False) -> None:
    if T == 0:
        where = "the batches of every rank have" if data_parallel else "the batch has"
        raise InvalidArgumentError(
            f"{where} no tokens to predict (every label is -100, or sequences have length 1); "
            "pass a batch with at least one target token"
        )
