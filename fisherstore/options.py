"""How a store is opened: every option in one place, validated once.

:func:`fisherstore.open` and :class:`~fisherstore.store.FisherStore` both take these
options by keyword; this dataclass is the one list of them, with their documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .codecs import CodecSpec
from .dist import RankGroup
from .ema import NONFINITE_POLICIES, validate_decay
from .errors import InvalidArgumentError

__all__ = ["MODES", "StoreOptions", "DEFAULT_MEMORY_BUDGET"]

MODES = ("r", "r+", "a", "w")
#: Default bound on what a disk-backed store holds in RAM (accumulators and staging).
DEFAULT_MEMORY_BUDGET = 1 << 30


@dataclass(frozen=True)
class StoreOptions:
    """The options of an open store.

    Attributes:
        mode: ``"r"`` read only; ``"r+"`` read/write, must exist; ``"a"`` read/write,
            created if missing; ``"w"`` create, replacing an existing store.
        decay: default EMA β for new parameters.
        nonfinite: ``"raise"`` (default) or ``"skip"`` for NaN/Inf squared gradients.
        memory_budget: bytes of RAM the store may hold for accumulators and staging
            (None: 1 GiB for disk backends, 0 in RAM).
        flush_every: flush automatically every N steps (None: on flush()/close()).
        io_workers: threads that read and write slabs in the background.
        progress: tqdm bar for flushes over a second: None shows it on a TTY.
        device_budget: bytes of GPU memory for accumulators of parameters whose squared
            gradients arrive on a GPU (0: copy them to pinned host memory instead).
        force: take over a stale writer lock whose process is gone (pidfile locks only;
            an ``flock`` lock is released by the kernel when its writer dies).
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
    device_budget: int = 0
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

    @property
    def writable(self) -> bool:
        return self.mode != "r"

    @classmethod
    def split(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split keyword arguments into (store options, the rest: backend options)."""
        names = {f.name for f in fields(cls)}
        return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}
