"""The writer the crash tests kill, and the in-RAM reference it must match.

Forked from a forkserver that has already imported torch, zarr and TensorStore, so a
writer starts in milliseconds and a test can kill hundreds of them.

The writer streams deterministic steps into a store (some parameters resident, some
streamed, four chunks each) and flushes every ``FLUSH_EVERY`` steps, telling the parent
when a flush starts and ends. It never returns: the parent kills it with SIGKILL.
"""

from __future__ import annotations

import torch

import fisherstore
from fisherstore import ParamLayout

TASK = "t"
NAMES = [f"p{i}" for i in range(8)]  # the manifest keeps creation order: the same residency on reload
SHAPE = (128, 256)  # 128 KiB fp32; 4 head blocks (chunks) of 32 KiB
LAYOUT = ParamLayout.attention("q", 4, 32)
BUDGET = 1 << 20  # 3 resident parameters, 5 streamed (see MemoryPlan)
DECAY = 0.9
FLUSH_EVERY = 3
TOKENS = 7


def grads(t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    return {n: torch.rand(SHAPE, generator=g) * (i + 1) for i, n in enumerate(NAMES)}


#: What a writer does between kills (tests/test_reliability.py aims each kill at one phase).
SCENARIOS = ("steps", "stream", "close", "replace", "recover")


def budget_of(scenario: str) -> int:
    return 0 if scenario == "stream" else BUDGET  # "stream": every parameter streams every step


def open_writer(path: str, backend: str, scenario: str = "steps", mode: str = "a") -> fisherstore.FisherStore:
    s = fisherstore.open(path, mode=mode, backend=backend, decay=DECAY, memory_budget=budget_of(scenario),
                         progress=False)
    for n in NAMES:
        s.create(TASK, n, SHAPE, LAYOUT)
    s.flush()  # creation is not a commit: make the task exist on disk before the first step
    return s


def run_writer(path: str, backend: str, conn, scenario: str = "steps") -> None:
    """Continue the store from its last commit, forever; report each phase to ``conn``.

    ``steps``/``stream``/``recover``: one open, then steps with a flush every FLUSH_EVERY.
    ``close``: FLUSH_EVERY steps, ``close()`` (which flushes), reopen, and again.
    ``replace``: ``mode="w"`` replaces the store, 2 × FLUSH_EVERY steps, close, and again.
    """
    while True:
        conn.send(("opening", -1))
        s = open_writer(path, backend, scenario, mode="w" if scenario == "replace" else "a")
        t = s.step(TASK)
        conn.send(("ready", t))
        rounds = {"close": 1, "replace": 2}.get(scenario)  # None: flush forever, never close
        done = 0
        while rounds is None or done < rounds:
            for _ in range(FLUSH_EVERY):
                t += 1
                s.update(TASK, grads(t), tokens=TOKENS)
            done += 1
            if rounds is None or done < rounds:  # the last round's commit is close()'s
                conn.send(("flushing", t))
                s.flush()
                conn.send(("flushed", t))
        conn.send(("closing", t))
        s.close()
        conn.send(("closed", t))


class Reference:
    """Every committed state the writer can reach, computed in RAM (``backend="ram"``).

    The RAM store runs the same steps with the same memory plan and flush points, so its
    arithmetic is the disk store's, operation for operation: states compare bit for bit.
    """

    def __init__(self, scenario: str = "steps") -> None:
        self.store = fisherstore.open(backend="ram", decay=DECAY, memory_budget=budget_of(scenario))
        for n in NAMES:
            self.store.create(TASK, n, SHAPE, LAYOUT)
        self.states: dict[int, dict[str, torch.Tensor]] = {0: {n: torch.zeros(SHAPE) for n in NAMES}}
        self.t = 0

    def at(self, step: int) -> dict[str, torch.Tensor] | None:
        """The committed state at ``step`` (None if no flush lands there)."""
        while self.t < step:
            self.t += 1
            self.store.update(TASK, grads(self.t), tokens=TOKENS)
            if self.t % FLUSH_EVERY == 0:
                self.store.flush()
                self.states[self.t] = {n: self.store.fisher(TASK, n, bias_corrected=False).load() for n in NAMES}
        return self.states.get(step)
