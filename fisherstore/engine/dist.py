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
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import FisherStoreError, InvalidArgumentError

__all__ = ["RankGroup"]


class RankGroup:
    """Which rank this process is, who owns which parameter, and the collectives to agree.

    Args:
        rank, world_size: this process's place in the group.
        process_group: a ``torch.distributed`` group (None: the default group).
        owner: ``owner(name) -> rank``; default: parameters are dealt round-robin in the
            order they are created (the same on every rank, since creation is collective).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        process_group: Any = None,
        owner: Callable[[str], int] | None = None,
    ) -> None:
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group
        self._owner = owner

    @classmethod
    def from_torch(cls, process_group: Any = None, owner: Callable[[str], int] | None = None) -> RankGroup:
        """The group of an initialised ``torch.distributed`` job."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call dist.init_process_group(...) first")
        return cls(dist.get_rank(process_group), dist.get_world_size(process_group), process_group, owner)

    @classmethod
    def solo(cls) -> RankGroup:
        """The group of one process (rank 0 of 1): every collective is local and free."""
        return cls(0, 1)

    @property
    def is_leader(self) -> bool:
        """Whether this rank holds the writer lock and writes the metadata documents (rank 0)."""
        return self.rank == 0

    def owner_of(self, name: str, index: int) -> int:
        """The rank that writes parameter ``name`` (the ``index``-th created in its task)."""
        r = self._owner(name) if self._owner is not None else index % self.world_size
        if not (isinstance(r, int) and 0 <= r < self.world_size):
            raise ValueError(f"owner({name!r}) returned {r!r}; it must be a rank in [0, {self.world_size})")
        return r

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.process_group)
        return out

    def agree(self, err: BaseException | None, what: str) -> BaseException | None:
        """Every rank learns whether any rank failed to do ``what``, so none goes on alone.

        Returns this rank's own error, or an error naming the first rank that failed, or None.
        """
        if self.world_size == 1:
            return err
        msgs = self.all_gather(None if err is None else f"{type(err).__name__}: {err}")
        if err is None:
            bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
            if bad:
                err = FisherStoreError(f"rank {bad[0][0]} failed to {what} ({bad[0][1]}); nothing was committed")
        return err

    def all_reduce_ints(self, values: Sequence[int]) -> list[int]:
        """The sum over ranks of each of ``values`` (the same length on every rank), on every rank.

        ``group.all_reduce_ints([tokens])[0]`` is the token count of a data-parallel step.
        """
        vals = [int(v) for v in values]
        if self.world_size == 1:
            return vals
        import torch
        import torch.distributed as dist

        t = torch.tensor(vals, dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
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

        buf = tensor.contiguous()  # a no-op for contiguous tensors; collectives need one
        # dst is a rank of this group; torch wants the global rank unless group_dst is given.
        dst_global = dst if self.process_group is None else dist.get_global_rank(self.process_group, dst)
        dist.reduce(buf, dst=dst_global, op=dist.ReduceOp.SUM, group=self.process_group)
        return buf if self.rank == dst else None

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

    def _comm_device(self) -> Any:
        """Where a collective's tensors must live: this rank's GPU for NCCL, else the CPU."""
        import torch
        import torch.distributed as dist

        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.process_group)

    def __repr__(self) -> str:
        return f"<RankGroup rank {self.rank} of {self.world_size}>"
