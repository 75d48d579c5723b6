"""Several processes writing one store: a rank group over ``torch.distributed``, and every collective.

The rule (docs/design.md, "Several processes"; docs/reliability.md): **each rank owns whole parameters** (and so
whole chunk files), never parts of a chunk or inner chunks of a shared shard; zarr has no
shard lock and concurrent inner-chunk writes lose data (zarr-python #3682). Rank 0 holds
the writer lock and writes every metadata document; the other ranks write only the
generation arrays of the parameters they own. A flush is collective: every rank writes
and syncs its data, the manifest entries are gathered to rank 0, rank 0 commits, and only
then does any rank delete what the commit superseded.

Usage (every rank runs the same code)::

    import torch.distributed as dist
    dist.init_process_group("gloo")
    group = fisherstore.RankGroup.from_torch()
    with fisherstore.open("fisher.zarr", mode="a", group=group) as store:
        for name, shape in params.items():          # collective: same calls on every rank
            store.create("t", name, shape)
        with store.begin_step("t") as st:
            for name in params:
                if store.owns("t", name):
                    st.add(name, grad_sq[name])

When a rank fails (docs/reliability.md, "When a rank fails"): every collective here begins
with a *check-in*, one tiny all-gather in which each rank says whether it came to take
part or to leave after an error of its own (:meth:`RankGroup.leave`, which
``FisherCollector.__exit__`` calls). So a rank that left is seen at the others' next
collective, whichever it is, and they raise :class:`~fisherstore.errors.RankFailedError`
naming it instead of pairing their collective with a different one (a hang, a garbled
result). A rank that dies or stops answering is seen as a transport error (gloo: the peer
closed its connection) or a timeout, raised as a ``RankFailedError`` too. A rank that saw
a failure takes part in no further collective of the group: its later calls raise at once.

The timeout: :meth:`RankGroup.from_torch` runs fisherstore's collectives on a gloo group of
its own, created with ``timeout`` seconds (default :data:`DEFAULT_TIMEOUT_S`, or the
``FISHERSTORE_COLLECTIVE_TIMEOUT`` environment variable), so no collective of fisherstore
waits longer than that for a rank, and none of them is ever paired with a collective of
the job's own. The bound it must exceed: the longest a healthy rank works between two
collectives of fisherstore, i.e. one step's forward and backward on its batch, or its part
of a flush (folding and syncing what it owns). The reductions of a data-parallel step run
on that group too when the job's group is gloo; with NCCL they run on the job's group
under NCCL's own timeout.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from ..errors import FisherStoreError, InvalidArgumentError, RankFailedError

__all__ = ["RankGroup", "DEFAULT_TIMEOUT_S", "collective_timeout"]

#: Seconds a collective of fisherstore waits for the slowest rank before it raises
#: :class:`RankFailedError` (10 minutes, torch's own default for NCCL). Raise it when one
#: rank's step or its part of a flush can take longer than that.
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "FISHERSTORE_COLLECTIVE_TIMEOUT"
#: The kinds of collective a check-in names (what a rank that reached another kind is told).
_KINDS = {"leave": 0, "gather": 1, "agree": 2, "sum": 3, "reduce": 4, "barrier": 5, "gather_agreed": 6}
_KIND_WORDS = {1: "gather a value from every rank", 2: "agree on an outcome", 3: "sum counts over the ranks",
               4: "sum a gradient onto its owner", 5: "wait at a barrier",
               6: "gather every rank's result once all could make it"}


def collective_timeout(timeout: float | None = None) -> float:
    """The collective timeout in seconds: ``timeout``, else ``$FISHERSTORE_COLLECTIVE_TIMEOUT``, else the default.

    Usage: ``collective_timeout(120)`` -> 120.0; ``collective_timeout()`` -> 600.0 with no variable set.
    """
    where = "timeout"
    if timeout is None and os.environ.get(TIMEOUT_ENV):
        where, timeout = f"${TIMEOUT_ENV}", os.environ[TIMEOUT_ENV]  # type: ignore[assignment]
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgumentError(f"{where} must be a positive number of seconds, got {timeout!r}; "
                                   f"the default is {DEFAULT_TIMEOUT_S:g}")
    return value


class RankGroup:
    """Which rank this process is, who owns which parameter, and the collectives to agree.

    Args:
        rank, world_size: this process's place in the group.
        process_group: a ``torch.distributed`` group (None: the default group). Built this
            way, the collectives run on it, under its own timeout; :meth:`from_torch` gives
            them a group of their own with fisherstore's timeout.
        owner: ``owner(name) -> rank``; default: parameters are dealt round-robin in the
            order they are created (the same on every rank, since creation is collective).
        timeout: the seconds ``collective_groups`` wait for a rank (what messages say), set by
            :meth:`from_torch`; None: ``process_group``'s own timeout.
        collective_groups: ``(control, data)``, the groups fisherstore's collectives run on
            (:meth:`from_torch` makes them); None: ``process_group`` for both.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        process_group: Any = None,
        owner: Callable[[str], int] | None = None,
        *,
        timeout: float | None = None,
        collective_groups: tuple[Any, Any] | None = None,
    ) -> None:
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group
        self._owner = owner
        #: Seconds a collective waits for a rank (None: the process group's own timeout).
        self.timeout = timeout
        # (check-ins, objects and integers; the tensors of a data-parallel step)
        self._ctl, self._data = collective_groups or (process_group, process_group)
        # Set once this rank has seen a rank fail (or has left itself): every later collective
        # raises it again, since the ranks no longer run the same sequence of collectives.
        self._failed: RankFailedError | None = None

    @classmethod
    def from_torch(cls, process_group: Any = None, owner: Callable[[str], int] | None = None, *,
                   timeout: float | None = None) -> RankGroup:
        """The group of an initialised ``torch.distributed`` job (collective: every rank calls it, in the same order).

        ``timeout``: seconds any collective of fisherstore waits for a rank before raising
        :class:`RankFailedError` (default :data:`DEFAULT_TIMEOUT_S`, or ``$FISHERSTORE_COLLECTIVE_TIMEOUT``).
        fisherstore's collectives run on a gloo group of their own made here with that
        timeout, so they never pair with the job's own collectives.
        Usage: ``group = fisherstore.RankGroup.from_torch(timeout=300)``.
        """
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call dist.init_process_group(...) first")
        seconds = collective_timeout(timeout)
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
        groups = None
        if world > 1:
            ranks = dist.get_process_group_ranks(process_group) if process_group is not None else None
            # A subgroup's ranks make it alone, in its own rank order (so rank r is rank r in both);
            # the default group's every rank makes it.
            ctl = dist.new_group(ranks, timeout=timedelta(seconds=seconds), backend="gloo",
                                 use_local_synchronization=process_group is not None, sort_ranks=ranks is None)
            # Gradients stay on the job's backend when it is not gloo (NCCL: on the GPU, under NCCL's timeout).
            groups = (ctl, ctl if dist.get_backend(process_group) == "gloo" else process_group)
        return cls(rank, world, process_group, owner, timeout=seconds, collective_groups=groups)

    @classmethod
    def solo(cls) -> RankGroup:
        """The group of one process (rank 0 of 1): every collective is local and free."""
        return cls(0, 1)

    @property
    def is_leader(self) -> bool:
        """Whether this rank holds the writer lock and writes the metadata documents (rank 0)."""
        return self.rank == 0

    @property
    def failed(self) -> RankFailedError | None:
        """The failure this rank saw (a rank failed, died, or this rank left); None while the group is whole."""
        return self._failed

    def owner_of(self, name: str, index: int) -> int:
        """The rank that writes parameter ``name`` (the ``index``-th created in its task)."""
        r = self._owner(name) if self._owner is not None else index % self.world_size
        if not (isinstance(r, int) and 0 <= r < self.world_size):
            raise ValueError(f"owner({name!r}) returned {r!r}; it must be a rank in [0, {self.world_size})")
        return r

    # -- failures ---------------------------------------------------------------------------
    def leave(self, err: BaseException) -> None:
        """Tell the other ranks this one is leaving after ``err``, its own error; they raise RankFailedError.

        Takes the place of the next collective this rank would have run: the others see it
        at their next check-in, whichever collective that begins. Never raises (the caller
        re-raises ``err``): if the others are gone too, nothing is left to tell. After it,
        this rank runs no collective of the group. Usage (``FisherCollector.__exit__``)::

            except BaseException as e:
                group.leave(e)
                raise
        """
        if self.world_size == 1 or self._failed is not None:
            return
        note = _describe(err)
        try:
            self._check_in("leave", "leave", note)
        except RankFailedError:
            pass  # a peer is gone as well; this rank's own error is what its caller raises
        self._failed = RankFailedError(f"rank {self.rank} left its rank group after its own error ({note}); "
                                       "it takes part in no further collective of the group", rank=self.rank)

    def _check_in(self, what: str, kind: str, leaving: str | None = None) -> None:
        """The start of every collective: each rank says whether it came to ``what`` or is leaving.

        One all-gather of two integers per rank: leaving or not, and the ``kind`` of collective
        (a key of :data:`_KINDS`), so ranks that reached different collectives fail here
        instead of pairing them. Only when some rank is leaving does a second gather carry
        the leavers' errors. A rank that finds another leaving raises :class:`RankFailedError`
        naming it (the leaver itself returns).
        """
        if self._failed is not None:
            raise RankFailedError(f"{self._failed} (asked to {what})", rank=self._failed.rank)
        import torch
        import torch.distributed as dist

        dev = self._comm_device(self._ctl)
        mine = torch.tensor([0 if leaving is None else 1, _KINDS[kind]], dtype=torch.int64, device=dev)
        views = [torch.zeros(2, dtype=torch.int64, device=dev) for _ in range(self.world_size)]
        self._transport(what, lambda: dist.all_gather(views, mine, group=self._ctl))
        flags = [(int(v[0]), int(v[1])) for v in views]
        left = [r for r, (f, _) in enumerate(flags) if f and r != self.rank]
        if not left and leaving is None:
            elsewhere = [r for r, (_, k) in enumerate(flags) if k != _KINDS[kind]]
            if elsewhere:  # every rank sees the same views, so every rank raises here
                r = elsewhere[0]
                self._failed = RankFailedError(
                    f"the ranks are out of step: rank {r} reached a collective to {_KIND_WORDS[flags[r][1]]} while rank "
                    f"{self.rank} was to {what}. A rank skipped or repeated a call of fisherstore that the others "
                    "made (as when one rank catches an error and goes on alone): every rank must make the same calls "
                    "in the same order. The store keeps its last commit", rank=r)
                raise self._failed
            return
        notes: list[Any] = [None] * self.world_size
        self._transport(what, lambda: dist.all_gather_object(notes, leaving, group=self._ctl))
        if leaving is not None:
            return
        r = left[0]
        self._failed = RankFailedError(
            f"rank {r} of the group failed with its own error ({notes[r]}) and left while rank {self.rank} was to "
            f"{what}. This rank stops writing too; the store keeps its last commit. Fix what rank {r} raised "
            "(its own traceback says where) and rerun from the last commit", rank=r)
        raise self._failed

    def _transport(self, what: str, call: Callable[[], Any]) -> Any:
        """Run one torch collective; a transport error or timeout becomes a RankFailedError."""
        try:
            return call()
        except RuntimeError as e:  # gloo: "Connection closed by peer", "Timed out waiting ... for recv"
            # Which rank a gloo error means is not in it (an address, not a rank); with two
            # ranks it can only be the other one, beyond that it stays unknown.
            r = 1 - self.rank if self.world_size == 2 else None
            who = f"rank {r}" if r is not None else "a peer rank"
            bound = (f"the {self.timeout:g} s collective timeout (RankGroup.from_torch(timeout=...), "
                     f"${TIMEOUT_ENV})" if self.timeout is not None else "the process group's timeout")
            self._failed = RankFailedError(
                f"{who} stopped answering while rank {self.rank} was to {what}: it died, or did not arrive within "
                f"{bound} ({type(e).__name__}: {str(e).strip()[:300]}). This rank stops writing; the store keeps its "
                f"last commit. Look at {who}'s own log for why it stopped, then rerun from the last commit", rank=r)
            raise self._failed from e

    # -- collectives --------------------------------------------------------------------------
    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        self._check_in("gather a value from every rank", "gather")
        out: list[Any] = [None] * self.world_size
        self._transport("gather a value from every rank", lambda: dist.all_gather_object(out, obj, group=self._ctl))
        return out

    def agree(self, err: BaseException | None, what: str) -> BaseException | None:
        """Every rank learns whether any rank failed to do ``what``, so none goes on alone.

        Returns this rank's own error, or a :class:`RankFailedError` naming the first rank
        that failed, or None. The ranks stay in step: each raises what it got, and may go on.
        """
        if self.world_size == 1:
            return err
        import torch.distributed as dist

        self._check_in(f"agree whether every rank could {what}", "agree")
        msgs: list[Any] = [None] * self.world_size
        self._transport(f"agree whether every rank could {what}",
                        lambda: dist.all_gather_object(msgs, None if err is None else _describe(err), group=self._ctl))
        if err is None:
            bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
            if bad:
                err = RankFailedError(f"rank {bad[0][0]} failed to {what} ({bad[0][1]}); nothing was committed",
                                      rank=bad[0][0])
        return err

    def gather_agreed(self, value: Any, err: BaseException | None, what: str) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank, if every rank could ``what``; else every rank raises.

        :meth:`agree` and :meth:`all_gather` in one collective: each rank brings its result
        (``value``) or the error that kept it from one (``err``, then ``value`` is not sent).
        When no rank failed, every rank gets the list of values. When one did, a rank that
        failed raises its own ``err`` and every other rank a :class:`RankFailedError` naming
        the first that failed, so none waits for a result that will not come. Either way the
        ranks stay in step and the group stays usable. ``value`` is pickled
        (``all_gather_object``): keep tensors on the CPU.
        Usage (each rank scores its own blocks, then every rank has them all)::

            err, mine = None, None
            try:
                mine = score(my_blocks)
            except Exception as e:
                err = e
            parts = group.gather_agreed(mine, err, "score its blocks")
        """
        if self.world_size == 1:
            if err is not None:
                raise err
            return [value]
        import torch.distributed as dist

        doing = f"gather every rank's result once all could {what}"
        self._check_in(doing, "gather_agreed")
        out: list[Any] = [None] * self.world_size
        mine = (None, value) if err is None else (_describe(err), None)
        self._transport(doing, lambda: dist.all_gather_object(out, mine, group=self._ctl))
        if err is not None:
            raise err
        bad = [(r, note) for r, (note, _) in enumerate(out) if note is not None]
        if bad:
            r, note = bad[0]
            raise RankFailedError(
                f"rank {r} could not {what} ({note}), so rank {self.rank} stops as well. Fix what rank {r} raised "
                "(its own traceback says where) and call again on every rank", rank=r)
        return [v for _, v in out]

    def all_reduce_ints(self, values: Sequence[int]) -> list[int]:
        """The sum over ranks of each of ``values`` (the same length on every rank), on every rank.

        ``group.all_reduce_ints([tokens])[0]`` is the token count of a data-parallel step.
        """
        vals = [int(v) for v in values]
        if self.world_size == 1:
            return vals
        import torch
        import torch.distributed as dist

        self._check_in("sum counts over the ranks", "sum")
        t = torch.tensor(vals, dtype=torch.int64, device=self._comm_device(self._ctl))
        self._transport("sum counts over the ranks",
                        lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._ctl))
        return [int(v) for v in t.tolist()]

    def reduce_to(self, tensor: Any, dst: int) -> Any:
        """Sum ``tensor`` over ranks onto rank ``dst``: the sum there, None on every other rank.

        Every rank calls it with a tensor of the same shape and dtype, in the same order
        (``for name in names: x = group.reduce_to(local[name], owner[name])``).
        ``tensor`` is a buffer: it is reduced in place, and on other ranks than ``dst``
        its contents are undefined afterwards. With NCCL it must live on this rank's GPU.
        """
        if not (isinstance(dst, int) and 0 <= dst < self.world_size):
            raise InvalidArgumentError(f"dst must be a rank in [0, {self.world_size}), got {dst!r}")
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        self._check_in(f"sum a gradient onto rank {dst}", "reduce")
        buf = tensor.contiguous()  # a no-op for contiguous tensors; collectives need one
        if buf.device.type != self._comm_device(self._data).type:
            buf = buf.to(self._comm_device(self._data))  # gloo reduces host tensors
        # dst is a rank of this group; torch wants the global rank unless group_dst is given.
        dst_global = dst if self._data is None else dist.get_global_rank(self._data, dst)
        self._transport(f"sum a gradient onto rank {dst}",
                        lambda: dist.reduce(buf, dst=dst_global, op=dist.ReduceOp.SUM, group=self._data))
        if self.rank != dst:
            return None
        return buf if buf.device == tensor.device else buf.to(tensor.device)

    def owner_ranks(self, names: Sequence[str], owned: Sequence[bool]) -> list[int]:
        """The rank owning each of ``names``, from every rank's own ``owned`` flags (collective).

        ``names`` must be the same list, in the same order, on every rank (it orders the
        collectives that follow), and each name must be owned by exactly one rank.
        Usage: ``owners = group.owner_ranks(names, [store.owns(task, n) for n in names])``.
        """
        if len(owned) != len(names):
            raise InvalidArgumentError(f"owned has {len(owned)} flags for {len(names)} names; pass one per name")
        mine = [i for i, o in enumerate(owned) if o]
        if self.world_size == 1:
            missing = [names[i] for i, o in enumerate(owned) if not o]
            if missing:
                raise FisherStoreError(f"no rank owns {missing[:3]} (a group of one process owns everything)")
            return [0] * len(names)
        # A checksum of the names, so ranks holding different lists fail here instead of
        # pairing one rank's parameter with another's in the collectives that follow.
        digest = zlib.crc32("\n".join(names).encode())
        views = self.all_gather((len(names), digest, mine))
        if any(v[:2] != (len(names), digest) for v in views):
            bad = next(r for r, v in enumerate(views) if v[:2] != (len(names), digest))
            raise FisherStoreError(
                f"rank {bad} holds a different list of parameters ({views[bad][0]} names) than rank {self.rank} "
                f"({len(names)}); every rank must track the same parameters of the same model, in the same order"
            )
        owner = [-1] * len(names)
        for r, (_, _, idx) in enumerate(views):
            for i in idx:
                if owner[i] != -1:
                    raise FisherStoreError(f"parameter {names[i]!r} is owned by ranks {owner[i]} and {r}; "
                                           "an owner function must give each parameter one rank, the same on every rank")
                owner[i] = r
        if -1 in owner:
            raise FisherStoreError(f"no rank owns parameter {names[owner.index(-1)]!r}")
        return owner

    def _comm_device(self, group: Any) -> Any:
        """Where a collective's tensors must live on ``group``: this rank's GPU for NCCL, else the CPU."""
        import torch
        import torch.distributed as dist

        if dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def barrier(self) -> None:
        """Wait until every rank is here (a check-in: a rank that left or died raises RankFailedError)."""
        if self.world_size > 1:
            self._check_in("wait for every rank at a barrier", "barrier")

    def __repr__(self) -> str:
        return f"<RankGroup rank {self.rank} of {self.world_size}>"


def _describe(err: BaseException) -> str:
    """One line for other ranks: the error's type and message (short, so a check-in stays small)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:500]}" if lines else type(err).__name__
