"""Object storage: stores at s3://bucket/prefix on a real S3-compatible server (moto's, started here).

The core store behaviour (exact EMA at any budget, lazy slicing, reopen, atomic steps,
crash safety under kill -9, one writer, a replaced store's stale reader) on both
backends, with credentials and the endpoint from the standard AWS_* variables.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("obstore", reason="s3:// stores need obstore (pip install 'fisherstore[s3]')")
moto = pytest.importorskip("moto", reason="the S3 tests run against moto's server (pip install 'moto[server]')")

import fisherstore  # noqa: E402
from fisherstore import ParamLayout, StoreLockedError, StoreReplacedError  # noqa: E402
from fisherstore.verify import verify_store  # noqa: E402

BACKENDS = ["zarr", "tensorstore"]
Q = ParamLayout.attention("q", 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget", [0, 1 << 20], ids=["streamed", "resident"])
def test_ema_on_s3_equals_plain_ema_and_reads_back_after_reopen(s3, backend, budget):
    url, beta = s3(), 0.8
    ref = torch.zeros(16, 8, dtype=torch.float64)
    with fisherstore.open(url, mode="w", backend=backend, decay=beta, memory_budget=budget, flush_every=2) as s:
        s.create("t", "w", (16, 8), Q)
        for i in range(5):
            x = torch.rand(16, 8, generator=torch.Generator().manual_seed(i))
            s.update("t", {"w": x})
            ref = beta * ref + (1 - beta) * x.double()
    with fisherstore.open(url, mode="r", backend=backend) as r:
        F = r.fisher("t", "w", bias_corrected=False)
        assert torch.allclose(F.load().double(), ref, rtol=1e-5)
        before = r.io_counters()["chunk_files_read"]
        assert torch.allclose(F.head(2, "Q").double(), ref[8:12], rtol=1e-5)
        assert r.io_counters()["chunk_files_read"] - before == 1  # one head block: one GET
        np.testing.assert_array_equal(F[3:11, ::3].numpy(), F.load().numpy()[3:11, ::3])
        assert r.step("t") == 5
    assert verify_store(url, backend=backend).ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_writer_on_s3_by_conditional_put(s3, backend):
    url = s3()
    s = fisherstore.open(url, mode="w", backend=backend)
    s.create("t", "w", (4, 4))
    s.flush()
    with pytest.raises(StoreLockedError, match="force=True"):
        fisherstore.open(url, mode="a", backend=backend)
    with fisherstore.open(url, mode="r", backend=backend) as r:  # readers never lock
        assert r.params("t") == ["w"]
    s.close()
    fisherstore.open(url, mode="a", backend=backend).close()  # released on close


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_discarded_step_and_a_replaced_store_on_s3(s3, backend):
    url = s3()
    with fisherstore.open(url, mode="w", backend=backend, decay=0.5, memory_budget=0) as s:
        s.create("t", "w", (8, 4), ParamLayout.attention("q", 2, 4))
        s.update("t", {"w": torch.ones(8, 4)})
        with pytest.raises(fisherstore.NonFiniteGradientError):
            s.update("t", {"w": torch.full((8, 4), float("nan"))})
        assert s.step("t") == 1
    r = fisherstore.open(url, mode="r", backend=backend)
    F = r.fisher("t", "w")
    assert torch.allclose(F.load(), torch.ones(8, 4))
    with fisherstore.open(url, mode="w", backend=backend, decay=0.5) as w:  # the same names again
        w.create("t", "w", (8, 4), ParamLayout.attention("q", 2, 4))
        w.update("t", {"w": torch.full((8, 4), 7.0)})
    with pytest.raises(StoreReplacedError):
        F.load()
    r.close()


def _s3_writer(url: str, backend: str, env: dict, conn) -> None:
    os.environ.update(env)
    while True:  # force takes over the killed writer's lease once it expired (FISHERSTORE_LOCK_TTL in env)
        try:
            s = fisherstore.open(url, mode="a", backend=backend, decay=0.9, memory_budget=1 << 20, force=True)
            break
        except StoreLockedError:
            time.sleep(0.2)
    for n in ("a", "b"):
        s.create("t", n, (32, 16), Q.__class__.attention("q", 8, 4))
    s.flush()
    t = s.step("t")
    conn.send(("ready", t))
    while True:
        t += 1
        g = torch.Generator().manual_seed(t)
        s.update("t", {n: torch.rand(32, 16, generator=g) for n in ("a", "b")}, tokens=3)
        if t % 2 == 0:
            conn.send(("flushing", t))
            s.flush()
            conn.send(("flushed", t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_during_a_flush_on_s3_leaves_a_completed_commit(s3, backend, monkeypatch):
    url = s3()
    monkeypatch.setenv("FISHERSTORE_LOCK_TTL", "1")  # a killed writer's lease expires in a second
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                                      "FISHERSTORE_LOCK_TTL")}
    ref = fisherstore.open(backend="ram", decay=0.9, memory_budget=1 << 20)
    for n in ("a", "b"):
        ref.create("t", n, (32, 16), ParamLayout.attention("q", 8, 4))
    states = {0: {n: torch.zeros(32, 16) for n in ("a", "b")}}
    ctx = mp.get_context("forkserver")
    hit = 0
    for k in range(6):
        a, c = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_s3_writer, args=(url, backend, env, c), daemon=True)
        p.start()
        while True:
            msg = a.recv()
            if msg[0] == "flushing" and k % 2 == 0 or msg[0] == "flushed" and k % 2:
                break
        time.sleep(0.01 * k)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        with fisherstore.open(url, mode="r", backend=backend) as r:
            step = r.step("t")
            while ref.step("t") < step:  # the reference, flushed at the same steps
                t = ref.step("t") + 1
                g = torch.Generator().manual_seed(t)
                ref.update("t", {n: torch.rand(32, 16, generator=g) for n in ("a", "b")}, tokens=3)
                if t % 2 == 0:
                    ref.flush()
                    states[t] = {n: ref.fisher("t", n, bias_corrected=False).load() for n in ("a", "b")}
            assert step in states, step
            for n in ("a", "b"):
                assert torch.equal(r.fisher("t", n, bias_corrected=False).load(), states[step][n]), (step, n)
        hit += step > 0
        rep = verify_store(url, backend=backend)
        assert rep.ok, [f.message for f in rep.problems]
    assert hit >= 3
    # the next writer (taking over the dead one's lock) removes what the kills left, and says so
    left = verify_store(url, backend=backend).rolled_back
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        time.sleep(2.5)  # the last killed writer's lease expires
        fisherstore.open(url, mode="a", backend=backend, force=True).close()
    assert bool(left) == any(issubclass(w.category, fisherstore.RecoveryWarning) for w in caught)
    assert verify_store(url, backend=backend).rolled_back == []
