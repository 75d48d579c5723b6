"""Resumable per-sample collection: ``collect_samples(..., ids=, resume=True)`` commits as it goes and resumes.

A call writes its rows in segments, each committed by a flush (every ``commit_every``
samples or about ``commit_seconds``), so a kill -9 loses only the segment in progress;
a call again with ``resume=True`` skips, with no forward, the ids the task holds. Real
tiny Hugging Face model, real Zarr stores; the reference is an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fisherstore
import fisherstore.collect.samples as samples_mod
from fisherstore import FisherCollector
from fisherstore.collect.samples import FIRST_SEGMENT
from fisherstore.verify import verify_store
from tests.models import tiny_model, token_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(batch, lo, hi):
    return {k: v[lo:hi] for k, v in batch.items()}


def forwards(model) -> list[int]:
    """A list that grows by one at every forward of ``model`` (one per sample)."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls


def by_id(store, task) -> dict[str, dict[str, torch.Tensor]]:
    """Every sample's stored gradient of every parameter, and its token count, keyed by sample id."""
    ids = store.sample_ids(task)
    out = {i: {} for i in ids}
    for name in store.sample_params(task):
        S = store.samples(task, name)
        for k, i in enumerate(ids):
            out[i][name] = S[k]
    for k, t in enumerate(store.sample_tokens(task).tolist()):
        out[ids[k]]["<tokens>"] = torch.tensor(t)
    return out


def assert_same_samples(got, want):
    assert sorted(got) == sorted(want)
    for i in want:
        assert sorted(got[i]) == sorted(want[i])
        for name, g in want[i].items():
            assert torch.equal(got[i][name], g), (i, name)


def reference(tmp_path, batch, ids, task="t"):
    """An uninterrupted run of the whole batch: what every resumed store must equal, per id."""
    with FisherCollector(backend="zarr", path=tmp_path / "ref", mode="w") as fc:
        fc.collect_samples(tiny_model("llama"), batch, task=task, ids=ids, progress=False)
    with fisherstore.open(tmp_path / "ref", mode="r") as r:
        return by_id(r, task)


# -- 1. resume after a clean partial run ----------------------------------------------------------
def test_resume_after_a_partial_run_skips_the_held_ids_without_a_forward(tmp_path, monkeypatch):
    batch, ids = token_batch(n=10, seq=6, seed=3), [f"row{i}" for i in range(10)]
    want = reference(tmp_path, batch, ids)
    model = tiny_model("llama")
    calls = forwards(model)
    path = tmp_path / "s"
    with FisherCollector(backend="zarr", path=path, mode="w") as fc:
        assert fc.collect_samples(model, rows(batch, 0, 6), task="t", ids=ids[:6], progress=False) == ids[:6]
    assert len(calls) == 6
    bars = []
    real_bar = samples_mod.progress_bar

    def bar(total, enabled, desc, **kw):
        bars.append((total, desc))
        return real_bar(total, enabled, desc, **kw)

    monkeypatch.setattr(samples_mod, "progress_bar", bar)
    with FisherCollector(backend="zarr", path=path) as fc:  # a new run: reopen, all ids, resume
        new = fc.collect_samples(model, batch, task="t", ids=ids, resume=True, progress=False)
        assert new == ids[6:]  # the ids this call wrote; the skipped ones are not in it
        assert len(calls) == 6 + 4  # no forward for a skipped id
        assert bars == [(4, "samples of t (resumed: 6 of 10 samples already committed)")]
        assert fc.store.sample_ids("t") == ids
        # all there: another resume runs no forward, writes nothing and returns no ids
        assert fc.collect_samples(model, batch, task="t", ids=ids, resume=True, progress=False) == []
        assert len(calls) == 10
    with fisherstore.open(path, mode="r") as r:
        assert sorted(r.sample_ids("t")) == sorted(ids)
        assert_same_samples(by_id(r, "t"), want)
    assert verify_store(path).ok


def test_resume_takes_the_rows_to_skip_from_anywhere_in_the_batch(tmp_path):
    batch, ids = token_batch(n=6, seq=6, seed=4), [f"r{i}" for i in range(6)]
    want = reference(tmp_path, batch, ids)
    model = tiny_model("llama")
    calls = forwards(model)
    with FisherCollector(backend="zarr", path=tmp_path / "s", mode="w") as fc:
        held = [1, 4]  # not a prefix: rows collected by an earlier, shuffled run
        fc.collect_samples(model, {k: v[held] for k, v in batch.items()}, task="t", ids=[ids[i] for i in held])
        assert fc.collect_samples(model, batch, task="t", ids=ids, resume=True) == ["r0", "r2", "r3", "r5"]
        assert len(calls) == 6
        assert_same_samples(by_id(fc.store, "t"), want)


# -- 2. kill -9 in the middle of a call, then resume ------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads({threads})
    from fisherstore import FisherCollector
    from tests.models import tiny_model, token_batch

    model = tiny_model("llama")
    seen = []

    def pre(module, args):
        print("forward", len(seen), flush=True)
        if len(seen) == {stop}:
            time.sleep(120)  # sample {stop} of the call: the parent kills us here
        seen.append(1)

    model.register_forward_pre_hook(pre)
    fc = FisherCollector(backend="zarr", path={path!r}, mode="w")
    fc.collect_samples(model, token_batch(n={n}, seq=6, seed=5), task="t", ids={ids!r}, commit_every={every},
                       progress=False)
    print("finished", flush=True)
""")


def test_kill_9_mid_call_keeps_the_committed_segments_whole_and_resume_collects_the_rest(tmp_path):
    n, every, stop = 12, 2, 7  # killed computing sample 7: samples 0-5 committed (3 segments), 6 written, not committed
    batch, ids = token_batch(n=n, seq=6, seed=5), [f"s{i:02d}" for i in range(n)]
    want = reference(tmp_path, batch, ids)
    path = str(tmp_path / "s")
    script = CHILD.format(root=ROOT, threads=torch.get_num_threads(), stop=stop, path=path, n=n, ids=ids,
                          every=every)
    with open(tmp_path / "child.err", "w") as err:
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            said = ""
            deadline = time.monotonic() + 60
            while said != f"forward {stop}" and time.monotonic() < deadline:
                said = child.stdout.readline().strip()
                if not said:  # the child ended before reaching sample `stop`
                    break
            assert said == f"forward {stop}", (said, (tmp_path / "child.err").read_text()[-2000:])
            with fisherstore.open(path, mode="r") as r:  # a reader of the live run sees whole segments
                assert r.sample_ids("t") == ids[:6]
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(10) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            child.stdout.close()
    rep = verify_store(path)  # sample 6's arrays (one per parameter) are on disk, named by no commit
    assert rep.ok and rep.rolled_back and {f.kind for f in rep.rolled_back} == {"uncommitted_samples"}
    with fisherstore.open(path, mode="r") as r:
        held = r.sample_ids("t")
        assert held == ids[:len(held)] and len(held) % every == 0 and len(held) == 6  # whole segments, nothing half
    model = tiny_model("llama")
    calls = forwards(model)
    with pytest.warns(fisherstore.RecoveryWarning, match="uncommitted node"):
        fc = FisherCollector(backend="zarr", path=path)  # the next writer's open recovers the store
    with fc:
        assert fc.collect_samples(model, batch, task="t", ids=ids, resume=True, commit_every=every) == ids[6:]
        assert len(calls) == n - 6
    rep = verify_store(path)
    assert rep.ok and not rep.rolled_back
    with fisherstore.open(path, mode="r") as r:
        assert r.sample_ids("t") == ids
        assert_same_samples(by_id(r, "t"), want)


# -- 3. refusals ---------------------------------------------------------------------------------
def test_resume_refuses_a_call_without_ids_or_with_an_id_twice(tmp_path):
    model = tiny_model("llama")
    calls = forwards(model)
    batch = token_batch(n=3, seq=6, seed=6)
    with FisherCollector(backend="zarr", path=tmp_path / "s", mode="w") as fc:
        with pytest.raises(fisherstore.InvalidArgumentError, match=r"resume=True needs ids=.*stable id per row"):
            fc.collect_samples(model, batch, task="t", resume=True)
        with pytest.raises(fisherstore.InvalidArgumentError, match=r"sample id 'a' is given twice in ids \(rows 0 and 2\)"):
            fc.collect_samples(model, batch, task="t", ids=["a", "b", "a"], resume=True)
        with pytest.raises(fisherstore.InvalidArgumentError, match=r"sample id '1' is given twice"):
            fc.collect_samples(model, batch, task="t", ids=[1, "1", 2])  # ids are stored as strings
        with pytest.raises(fisherstore.InvalidArgumentError, match="ids has 2 ids for a batch of 3 rows"):
            fc.collect_samples(model, batch, task="t", ids=["a", "b"], resume=True)
        for bad in ({"commit_every": 0}, {"commit_every": True}, {"commit_seconds": 0}, {"commit_seconds": float("nan")},
                    {"commit_every": 2, "flush": False}):
            with pytest.raises(fisherstore.InvalidArgumentError, match="commit_every|commit_seconds"):
                fc.collect_samples(model, batch, task="t", ids=["a", "b", "c"], **bad)
        assert calls == [] and "t" not in fc.store.tasks()  # nothing ran, nothing was created


def test_an_id_the_task_holds_is_refused_by_name_without_resume_and_nothing_is_written(tmp_path):
    model = tiny_model("llama")
    batch = token_batch(n=3, seq=6, seed=7)
    path = tmp_path / "s"
    with FisherCollector(backend="zarr", path=path, mode="w") as fc:
        fc.collect_samples(model, rows(batch, 0, 2), task="t", ids=["a", "b"])
        size = fc.store.nbytes_on_disk("t")
        calls = forwards(model)
        with pytest.raises(fisherstore.InvalidArgumentError,
                           match=r"task 't' already holds sample id 'b'; nothing was written\. Pass resume=True"):
            fc.collect_samples(model, batch, task="t", ids=["c", "b", "d"])
        with pytest.raises(fisherstore.InvalidArgumentError, match=r"already holds sample id 'a' \(and 1 more"):
            fc.collect_samples(model, batch, task="t", ids=["a", "b", "e"])
        assert calls == [] and fc.store.sample_ids("t") == ["a", "b"]
        assert fc.store.nbytes_on_disk("t") == size
    with fisherstore.open(path, mode="r") as r:
        assert r.sample_ids("t") == ["a", "b"]
    assert verify_store(path).ok


# -- 4. commits as it goes ----------------------------------------------------------------------------
def test_commit_every_commits_whole_segments_as_the_call_goes(tmp_path):
    path = str(tmp_path / "s")
    batch, ids = token_batch(n=10, seq=6, seed=8), [f"x{i}" for i in range(10)]
    want = reference(tmp_path, batch, ids)
    model = tiny_model("llama")
    name = "model.layers.0.self_attn.q_proj.weight"
    trail: list[list[str]] = []  # what a reader sees at each forward
    reads: dict[str, torch.Tensor] = {}

    def look(module, args):
        if not os.path.exists(path):
            trail.append([])
            return
        with fisherstore.open(path, mode="r") as r:
            seen = r.sample_ids("t") if "t" in r.tasks() else []
            trail.append(seen)
            if seen:  # every sample a reader sees is whole: each parameter reads back
                S = r.samples("t", name)
                reads.update({i: S[k] for k, i in enumerate(seen)})

    model.register_forward_pre_hook(look)
    with FisherCollector(backend="zarr", path=path, mode="w") as fc:
        assert fc.collect_samples(model, batch, task="t", ids=ids, commit_every=3, progress=False) == ids
        assert [len(t) for t in trail] == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]
        assert all(t == ids[:len(t)] for t in trail)
        assert fc.store.metadata("t")["commit"] == 4  # 3 + 3 + 3 + 1: four segments, one commit each
        assert "segments=4" in repr(fc.store.samples("t", name))
    assert sorted(reads) == ids[:9] and all(torch.equal(g, want[i][name]) for i, g in reads.items())
    with fisherstore.open(path, mode="r") as r:
        assert_same_samples(by_id(r, "t"), want)


def test_commit_seconds_sizes_segments_by_time_and_a_short_call_stays_one_segment(tmp_path):
    model = tiny_model("llama")
    name = "model.layers.0.self_attn.q_proj.weight"
    n = FIRST_SEGMENT + 2
    batch = token_batch(n=n, seq=6, seed=9)
    with FisherCollector(backend="zarr", path=tmp_path / "s", mode="w") as fc:
        fc.collect_samples(model, rows(batch, 0, 4), task="short", progress=False)  # the defaults: one segment
        assert "segments=1" in repr(fc.store.samples("short", name))
        # a bound far below one sample's time: the first segment (nothing timed yet) holds FIRST_SEGMENT, then one each
        fc.collect_samples(model, batch, task="fast", commit_seconds=1e-6, progress=False)
        assert "segments=3" in repr(fc.store.samples("fast", name)) and fc.store.metadata("fast")["commit"] == 3
        assert fc.store.sample_ids("fast") == [str(i) for i in range(n)]  # numbered across segments as one call
        # no bound at all: one segment, as a call did before it committed as it went
        fc.collect_samples(model, batch, task="whole", commit_seconds=None, progress=False)
        assert "segments=1" in repr(fc.store.samples("whole", name))
        # flush=False: one segment, committed by the caller's flush
        fc.collect_samples(model, batch, task="later", flush=False, progress=False)
        assert "segments=1" in repr(fc.store.samples("later", name))
