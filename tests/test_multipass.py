"""Multi-pass collection: exactly one big-budget pass, in ⌈S/B⌉ passes of parameter groups, atomic."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

import fisherstore
from fisherstore import FisherCollector, InvalidArgumentError
from fisherstore.collect.multipass import plan_passes
from fisherstore.errors import BatchesChangedError
from tests.models import tiny_model, token_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE = 78464  # bytes of fp32 state of the tiny llama and phi3 with params="all"
FOLD = 2 * 8192  # what the end-of-pass folds hold: a read chunk and a codec copy of the largest (embed, lm_head)


def _budget(passes):
    """A memory budget that holds 1/passes of the state (accumulated in place) plus the folds' slabs."""
    return STATE // passes + FOLD + 64


def _batches(n=3):
    return [token_batch(n=3, seq=7, seed=s) for s in range(n)]


def _collector(path, budget, estimator="micro_batch", **kw):
    return FisherCollector(backend="zarr", path=path, mode="w", params="all", micro_batch_size=2, ema_decay=0.9,
                           memory_budget=budget, estimator=estimator, **kw)


def _state(fc, task="a"):
    return ({n: fc.full_fisher(task, n, bias_corrected=False).load() for n in fc.store.params(task)},
            fc.get_group_fisher(task), fc.store.step(task), fc.get_token_count(task))


@pytest.mark.parametrize("arch", ["llama", "phi3"])  # GQA (k/v with 2 of 4 heads); a fused qkv_proj
@pytest.mark.parametrize("estimator", ["micro_batch", "batch"])
def test_multi_pass_equals_single_pass_bit_for_bit(tmp_path, arch, estimator):
    model = tiny_model(arch)
    batches = _batches()
    warm = token_batch(n=2, seq=7, seed=99)  # the task has a committed state before the run
    out = {}
    for way, budget in (("multi", _budget(3)), ("single", 1 << 30), ("steps", 1 << 30)):
        fc = _collector(tmp_path / way, budget, estimator)
        fc.collect_fisher(model, warm, task="a")
        fc.flush()
        if way == "steps":  # today's path: one collect_fisher per batch, everything resident, one flush
            for b in batches:
                fc.collect_fisher(model, b, task="a")
            fc.flush()
        else:
            run = fc.collect_fisher_dataset(model, batches, task="a", progress=False)
            assert run.steps == 3 and not run.streamed
            assert run.passes >= run.bound and (run.passes > 1) == (way == "multi")
        out[way] = _state(fc)
        fc.close()
        with fisherstore.open(tmp_path / way, mode="r") as r:  # what was committed is the same
            assert r.step("a") == 4
    ref_F, ref_g, ref_step, ref_tokens = out["steps"]
    for way in ("multi", "single"):
        F, g, step, tokens = out[way]
        assert (step, tokens) == (ref_step, ref_tokens) == (4, ref_tokens)
        assert F.keys() == ref_F.keys() and len(F) > 10
        for n in ref_F:
            assert torch.equal(F[n], ref_F[n]), (way, n)
        assert g.keys() == ref_g.keys()
        for k in ref_g:
            assert torch.equal(g[k], ref_g[k]), (way, k)


def test_group_view_of_a_multi_pass_run_is_the_sum_of_stored_head_blocks(tmp_path):
    model = tiny_model("llama")
    fc = _collector(tmp_path / "s", _budget(4))
    run = fc.collect_fisher_dataset(model, _batches(), task="a", progress=False)
    assert run.passes >= 3
    for block, name in (("Q", "q_proj"), ("K", "k_proj"), ("O", "o_proj")):
        full = f"model.layers.1.self_attn.{name}.weight"
        g = fc.get_group_fisher("a", full, "head")
        reps = range(0, 4, 2) if block == "K" else range(4)
        F = fc.full_fisher("a", full)
        assert torch.allclose(g, torch.stack([F.head(h, block).sum() for h in reps]), rtol=1e-5)
    fc.close()


def test_batches_may_be_a_list_a_fixed_dataloader_or_a_callable_but_not_a_shuffle_or_an_iterator(tmp_path):
    model = tiny_model("llama")
    batches = _batches(4)
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(3)]
    got = {}
    for way, src in (("list", batches), ("loader", DataLoader(rows, batch_size=3, shuffle=False)),
                     ("callable", lambda: iter(batches))):
        fc = _collector(tmp_path / way, 1 << 30)
        fc.collect_fisher_dataset(model, src, task="a", progress=False)
        got[way] = _state(fc)
        fc.close()
    for way in ("loader", "callable"):
        assert got[way][2:] == got["list"][2:]
        assert all(torch.equal(got[way][0][n], got["list"][0][n]) for n in got["list"][0])
    fc = _collector(tmp_path / "bad", 1 << 30)
    with pytest.raises(InvalidArgumentError, match="shuffle=False"):
        fc.collect_fisher_dataset(model, DataLoader(rows, batch_size=3, shuffle=True), task="a")
    with pytest.raises(InvalidArgumentError, match="can be read once"):
        fc.collect_fisher_dataset(model, iter(batches), task="a")
    assert "a" not in fc.store.tasks() or fc.store.step("a") == 0
    fc.close()


class Boom(Exception):
    pass


def test_an_interrupted_run_leaves_the_store_at_its_last_commit(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "s"
    fc = _collector(path, _budget(3))
    fc.collect_fisher(model, token_batch(n=2, seq=7, seed=99), task="a")
    fc.collect_fisher(model, token_batch(n=2, seq=7, seed=98), task="a")  # one step not yet flushed: the run commits it first
    batches = _batches()
    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        for i, b in enumerate(batches):
            if calls["n"] == 2 and i == 1:
                raise Boom("interrupted in pass 2")
            yield b

    with pytest.raises(Boom):
        fc.collect_fisher_dataset(model, failing, task="a", progress=False)
    before = _state(fc)
    assert before[2] == 2
    # nothing the run wrote is left: only the committed generation of each parameter
    for n in fc.store.params("a"):
        assert len([d for d in os.listdir(path / "a" / n) if d.startswith("g")]) == 1, n
    # a changed batch in a later pass is refused the same way
    seen = {"n": 0}

    def changing():
        seen["n"] += 1
        return iter(batches if seen["n"] == 1 else batches[::-1])

    with pytest.raises(BatchesChangedError, match="pass 2 .* position 0"):
        fc.collect_fisher_dataset(model, changing, task="a", progress=False)
    after = _state(fc)
    assert after[2:] == before[2:]
    assert all(torch.equal(after[0][n], before[0][n]) for n in before[0])
    for k in before[1]:
        assert torch.equal(after[1][k], before[1][k]), k
    # and a rerun from there equals an uninterrupted run
    fc.collect_fisher_dataset(model, batches, task="a", progress=False)
    ref = _collector(tmp_path / "ref", 1 << 30)
    for seed in (99, 98):
        ref.collect_fisher(model, token_batch(n=2, seq=7, seed=seed), task="a")
    ref.flush()
    for b in batches:
        ref.collect_fisher(model, b, task="a")
    ref.flush()
    F, g, step, tokens = _state(fc)
    rF, rg, rstep, rtokens = _state(ref)
    assert (step, tokens) == (rstep, rtokens) == (5, rtokens)
    assert all(torch.equal(F[n], rF[n]) for n in rF)
    fc.close()
    ref.close()


KILLED = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from fisherstore import FisherCollector
    from tests.models import tiny_model, token_batch

    model = tiny_model("llama")
    fc = FisherCollector(backend="zarr", path=sys.argv[1], mode="w", params="all", micro_batch_size=2,
                         memory_budget={budget})
    fc.collect_fisher(model, token_batch(n=2, seq=7, seed=99), task="a")
    fc.flush()
    batches = [token_batch(n=3, seq=7, seed=s) for s in range(3)]
    calls = []

    def dying():
        calls.append(1)
        for i, b in enumerate(batches):
            if len(calls) == 2 and i == 2:
                os._exit(9)  # killed in pass 2, after pass 1 wrote its group
            yield b

    fc.collect_fisher_dataset(model, dying, task="a", progress=False)
""")


def test_a_killed_run_is_rolled_back_by_the_next_writer(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(root=ROOT, budget=_budget(3)))
    path = tmp_path / "s"
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    leftovers = [n for n in os.listdir(path / "a") if (path / "a" / n).is_dir()
                 and any(d.startswith("g") and d != "g00000001" for d in os.listdir(path / "a" / n))]
    assert leftovers  # pass 1 had written its group's generations, uncommitted
    with pytest.warns(fisherstore.RecoveryWarning):
        s = fisherstore.open(path, mode="a")
    assert s.step("a") == 1 and s.metadata("a")["tokens_seen"] > 0
    s.close()
    for n in os.listdir(path / "a"):
        if (path / "a" / n).is_dir():
            assert [d for d in os.listdir(path / "a" / n) if d.startswith("g")] == ["g00000001"], n


def test_plan_packs_passes_first_fit_decreasing_and_streams_what_fits_nowhere():
    sizes = [(f"p{i}", 10) for i in range(8)]
    groups, where, streamed = plan_passes(sizes, host=20, device=0)
    assert len(groups) == 4 and not streamed and all(w == "host" for w in where.values())
    assert [g for grp in groups for g in grp] == [f"p{i}" for i in range(8)]  # store order kept
    groups, where, streamed = plan_passes(sizes + [("big", 50)], host=20, device=20)
    assert len(groups) == 2 and streamed == ["big"] and "big" in groups[-1]
    assert sum(w == "device" for w in where.values()) == 4


def test_everything_fits_one_pass_and_the_bar_shows_passes(tmp_path, capsys):
    model = tiny_model("llama")
    fc = _collector(tmp_path / "s", _budget(2))
    run = fc.collect_fisher_dataset(model, _batches(2), task="a", progress=True)
    assert run.passes >= 2 == run.bound
    assert "pass 2/2" in capsys.readouterr().err
    run = FisherCollector(params="all", micro_batch_size=2).collect_fisher_dataset(model, _batches(2), progress=False)
    assert run.passes == 1 and run.steps == 2
    fc.close()


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("ratio", [2, 3, 4])
def test_passes_are_within_one_of_state_over_budget(tmp_path, arch, ratio):
    """⌈S/B⌉ passes, at most one more: the fold's buffers come out of the accumulators it frees."""
    model = tiny_model(arch)
    budget = STATE // ratio
    fc = _collector(tmp_path / "s", budget)
    run = fc.collect_fisher_dataset(model, _batches(2), task="a", progress=False)
    assert run.state_bytes == STATE
    assert ratio <= run.passes <= ratio + 1, (run.passes, run.groups)
    fc.close()


def test_fold_headroom_counts_what_earlier_folds_freed():
    from fisherstore.collect.multipass import fold_headroom

    # one parameter: its whole chunk; several: the smallest ones go first and free room for the big chunk
    assert fold_headroom([(100, 40)], per_chunk=2) == 80
    assert fold_headroom([(10, 1), (10, 1), (100, 40)], per_chunk=2) == 80 - 20
    assert fold_headroom([(50, 1), (50, 1), (50, 1), (100, 40)], per_chunk=1) == 1
    assert fold_headroom([], per_chunk=2) == 0
