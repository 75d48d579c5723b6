"""How a store is opened: every option in one place, validated once.

:func:`fisherstore.open` and :class:`~fisherstore.store.FisherStore` both take these
options by keyword; this dataclass is the one list of them, with their documentation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from ..errors import InvalidArgumentError
from ..spec.codecs import CodecSpec
from ..spec.ema import NONFINITE_POLICIES, validate_decay
from .dist import RankGroup

__all__ = ["MODES", "StoreOptions", "DEFAULT_MEMORY_BUDGET", "default_memory_budget"]

MODES = ("r", "r+", "a", "w")
#: Default bound on what a disk-backed store holds in RAM (accumulators and staging).
DEFAULT_MEMORY_BUDGET = 1 << 30


def default_memory_budget(persistent: bool) -> int:
    """The ``memory_budget`` of a store opened with None: 1 GiB on disk, the machine's RAM in RAM.

    A RAM store holds its arrays in memory whatever its budget, so a budget below that
    only sends steps through read-modify-writes of numpy arrays (77× a plain backward in
    the GPU check of 2026-11-26) without saving anything.
    """
    if persistent:
        return DEFAULT_MEMORY_BUDGET
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): a bound no model reaches
        return 1 << 50


@dataclass(frozen=True)
class StoreOptions:
    """The options of an open store.

    Attributes:
        mode: ``"r"`` read only; ``"r+"`` read/write, must exist; ``"a"`` read/write,
            created if missing; ``"w"`` create, replacing an existing store.
        decay: default EMA β for new parameters.
        nonfinite: ``"raise"`` (default) or ``"skip"`` for NaN/Inf squared gradients.
        memory_budget: bytes of RAM the store may hold for accumulators and staging
            (None: 1 GiB for disk backends; for ``"ram"`` the machine's physical memory, so
            every parameter is resident and no step reads or rewrites an array).
        flush_every: flush automatically every N steps (None: on flush()/close()).
        io_workers: threads that read and write slabs in the background (the ``"ram"``
            backend runs its few array copies inline and ignores it).
        progress: tqdm bar for flushes over a second: None shows it on a TTY.
        device_budget: bytes of GPU memory for accumulators of parameters whose squared
            gradients arrive on a GPU. None (default): the device's free memory less a
            margin (the larger of 2 GiB and 10 %), measured when the first gradient arrives
            there. 0: accumulate in pinned host memory instead (copies overlap backward,
            and a step's micro-batches are summed on the device first where they fit).
            Irrelevant on a machine without a GPU.
        force: take over a stale writer lock whose process is gone (pidfile locks; an
            ``flock`` lock is released by the kernel when its writer dies). On ``s3://`` the
            lock is a lease renewed by its writer's heartbeat: ``force`` takes it over only
            once it expired (``FISHERSTORE_LOCK_TTL`` seconds, default 60, after the last
            heartbeat); a live lease is a :class:`~fisherstore.StoreLockedError` naming its holder.

    The backend's options travel beside these (:meth:`split`); for ``s3://`` locations,
    ``storage_options`` holds obstore's S3 settings (``endpoint``, ``region``,
    ``access_key_id``, ...) over the ``AWS_*`` variables, and ``timeout`` (seconds per
    request attempt, default 30) and ``retries`` (default 3), which bound every request:
    one that gets no answer fails with :class:`~fisherstore.StorageError` after about
    ``timeout × (retries + 1)`` seconds. An unknown key is an :class:`InvalidArgumentError`.
        group: a :class:`~fisherstore.RankGroup` when several processes write this store
            together (``torch.distributed``); each rank then writes only what it owns.
        codecs: the codec chain of a new store (an existing store keeps its own).
    """

    mode: str = "a"
    decay: float = 0.99
    nonfinite: str = "raise"
    memory_budget: int | None = None
    flush_every: int | None = None
    io_workers: int = 2
    progress: bool | None = None
    device_budget: int | None = None
    force: bool = False
    group: RankGroup | None = None
    codecs: CodecSpec | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgumentError(f"mode must be 'r', 'r+', 'a' or 'w', got {self.mode!r}")
        object.__setattr__(self, "decay", validate_decay(self.decay))
        if self.nonfinite not in NONFINITE_POLICIES:
            raise InvalidArgumentError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        if self.flush_every is not None and (not isinstance(self.flush_every, int) or self.flush_every < 1):
            raise InvalidArgumentError(f"flush_every must be a positive int or None, got {self.flush_every!r}")
        if self.memory_budget is not None and (not isinstance(self.memory_budget, int) or self.memory_budget < 0):
            raise InvalidArgumentError(
                f"memory_budget must be a non-negative number of bytes, got {self.memory_budget!r}"
            )
        if self.device_budget is not None and (isinstance(self.device_budget, bool) or not isinstance(
                self.device_budget, int) or self.device_budget < 0):
            raise InvalidArgumentError(
                f"device_budget must be a non-negative number of bytes or None (from free device memory), got "
                f"{self.device_budget!r}"
            )
        if isinstance(self.io_workers, bool) or not isinstance(self.io_workers, int) or self.io_workers < 0:
            raise InvalidArgumentError(f"io_workers must be an int >= 0, got {self.io_workers!r}")

    @property
    def writable(self) -> bool:
        return self.mode != "r"

    @classmethod
    def split(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split keyword arguments into (store options, the rest: backend options)."""
        names = {f.name for f in fields(cls)}
        return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}
