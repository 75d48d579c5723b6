"""Imports and anchors are all or nothing; the classification loss keeps a padded batch's mask; gaps a review found.

A failed ``write_state`` (a disk error, Ctrl-C, a refused value) must leave no pending state a
flush could commit and no half task; ``import_adam`` and ``save_anchor`` inherit that. Also:
merge's relative ε in magnitude, and the Monte Carlo draws' seeding per step and micro-batch.
"""

import pytest
import torch

import fisherstore
from fisherstore import import_adam
from fisherstore.backends.zarr_backend import ZarrBackend


def _adam(steps=3):
    """A small classifier and a live Adam (β2 = 0.95) after ``steps`` steps: four parameters with state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    opt = torch.optim.Adam(model.parameters(), betas=(0.9, 0.95))
    for _ in range(steps):
        model(torch.randn(4, 5)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _fail_generation_write(monkeypatch, nth, exc):
    """The ``nth`` write into a generation array (1-based) raises ``exc`` once; every other write goes through."""
    orig = ZarrBackend.write
    seen = {"n": 0}

    def write(self, key, region, data):
        if "/g" in key:
            seen["n"] += 1
            if seen["n"] == nth:
                raise exc
        return orig(self, key, region, data)

    monkeypatch.setattr(ZarrBackend, "write", write)


def test_write_state_that_fails_in_a_fold_leaves_no_pending_state_behind(tmp_path, monkeypatch):
    """write_state's rollback (store/write_verbs.py, the ``except BaseException`` block) resets only the
    parameters already in ``written``. The parameter whose fold failed keeps ``p.acc = x`` and
    ``p.a_last = step``, so the next flush folds and commits it: a manifest whose parameter has
    ``t_last = step`` in a task at step 0. Every later ``fisherstore.open`` of the store then raises
    CorruptStoreError ("t_last = 3 is after the task's step 0"): one transient I/O error (or a
    Ctrl-C) during an import makes the whole store unreadable."""
    s = fisherstore.open(tmp_path / "s", mode="w", decay=0.5)
    s.create("t", "a", (4, 3))
    s.create("t", "b", (4, 3))
    _fail_generation_write(monkeypatch, 2, OSError(5, "Input/output error (injected, once)"))
    with pytest.raises(fisherstore.StorageError, match=r"writing the state of 'b' into task 't'.*Nothing of the call"):
        s.write_state("t", {"a": torch.ones(4, 3), "b": torch.full((4, 3), 2.0)}, step=3)
    monkeypatch.undo()
    assert "t" not in s.tasks()  # a task created for the import is forgotten whole
    s.create("t", "a", (4, 3))
    s.create("t", "b", (4, 3))
    s.write_state("t", {"a": torch.ones(4, 3), "b": torch.full((4, 3), 2.0)}, step=3)  # the retry lands
    s.close()
    with fisherstore.open(tmp_path / "s", mode="r") as r:  # was CorruptStoreError: t_last 3 in a task at step 0
        assert r.step("t") == 3 and torch.equal(r.read("t", "b", bias_corrected=False), torch.full((4, 3), 2.0))


def test_a_failed_write_state_into_a_task_with_steps_keeps_the_task(tmp_path):
    """Only a task that held nothing is forgotten: a refusal on a task with steps leaves it as it was."""
    s = fisherstore.open(tmp_path / "s", mode="w", decay=0.5)
    s.update("t", {"a": torch.ones(3)}, layouts={"a": None})
    with pytest.raises(fisherstore.StepError, match="new task"):
        s.write_state("t", {"a": torch.ones(3)}, step=2)
    assert s.step("t") == 1 and "t" in s.tasks()
    s.close()
    with fisherstore.open(tmp_path / "s", mode="r") as r:
        assert r.step("t") == 1


def test_import_adam_into_a_path_interrupted_by_an_io_error_does_not_corrupt_the_store(tmp_path, monkeypatch):
    """import_adam(path, ...) runs ``with open_store(...) as s: write(s)``; when write_state fails in the
    fold of a parameter, the ``with`` block closes the store, and close() flushes the half-written
    parameter (see the test above) into a manifest a reader refuses. The docstring promises "an
    import that fails leaves no task"; instead the store at ``path``, other tasks included, can no
    longer be opened."""
    model, opt = _adam()
    path = tmp_path / "s"
    with fisherstore.open(path, mode="w") as s:  # a store with a task worth keeping
        s.create("keep", "w", (3,))
        s.update("keep", {"w": torch.ones(3)})
    _fail_generation_write(monkeypatch, 2, OSError(5, "Input/output error (injected, once)"))
    with pytest.raises(fisherstore.StorageError):
        import_adam(path, "adam", model, opt)
    monkeypatch.undo()
    with fisherstore.open(path, mode="r") as r:  # was CorruptStoreError
        assert r.step("keep") == 1
        assert "adam" not in r.tasks()


def test_import_adam_that_fails_leaves_no_task_and_can_be_retried(tmp_path, monkeypatch):
    """With an open store, an import whose write fails leaves the created parameters (and, with the
    first parameter's fold failing, its pending state) in the catalogue: the task exists at step 0,
    the retry is refused with "task 'adam' already exists", and the next flush would commit it.
    The docstring says "an import that fails leaves no task"."""
    model, opt = _adam()
    s = fisherstore.open(tmp_path / "s", mode="w")
    _fail_generation_write(monkeypatch, 1, OSError(28, "No space left on device (injected, once)"))
    with pytest.raises(fisherstore.StorageError):
        import_adam(s, "adam", model, opt)
    monkeypatch.undo()
    assert "adam" not in s.tasks()
    res = import_adam(s, "adam", model, opt)  # was InvalidArgumentError "already exists"
    assert res.step == 3
    s.close()


def test_a_refused_save_anchor_leaves_no_anchor_task(tmp_path):
    """save_anchor creates every parameter of '<task>@anchor' before write_state checks the weights for
    NaN/Inf (store/anchor_verbs.py: create loop, then write_state). The refusal leaves the created,
    empty anchor task in the catalogue, and the next flush commits it (step 0, estimator None): every
    reader lists a task 'n@anchor' that holds nothing. The docstring says NaN/Inf weights are refused
    with "nothing written then"; the other refusals (unknown name, shape) leave no task."""
    s = fisherstore.open(tmp_path / "s", mode="w")
    with pytest.raises(fisherstore.NonFiniteGradientError):
        s.save_anchor("n", {"a": torch.tensor([1.0, float("nan")])}, names=["a"])
    assert "n@anchor" not in s.tasks()
    s.close()
    with fisherstore.open(tmp_path / "s", mode="r") as r:
        assert r.tasks() == []


def test_save_anchor_refused_for_its_description_is_not_left_half_written(tmp_path):
    """save_anchor validates ``description`` (set_metadata's JSON check) only after write_state has
    written the weights and set the anchor task to step 1. The refusal leaves an anchor task at
    step 1 without estimator="anchor": has_anchor() is False, yet every retry is refused for good
    with "task 'x' already has an anchor ... saved at commit 0" (the store cannot delete a task),
    and the next flush commits weights that any reader takes for a Fisher of estimator None."""
    s = fisherstore.open(tmp_path / "s", mode="w")
    w = {"a": torch.randn(3, 5)}
    with pytest.raises(fisherstore.InvalidArgumentError, match="JSON"):
        s.save_anchor("x", w, names=["a"], description={"when": torch.tensor(1.0)})
    assert "x@anchor" not in s.tasks()
    s.save_anchor("x", w, names=["a"], description={"when": "now"})  # was StepError "already has an anchor"
    assert s.has_anchor("x") and torch.equal(s.anchor("x", "a"), w["a"])
    s.close()


def test_classification_loss_respects_the_attention_mask_of_a_padded_batch():
    """losses.Classification.logits calls ``model(batch["inputs"])`` and nothing else, though its docstring
    names Hugging Face ``*ForSequenceClassification`` models. A padded batch's ``attention_mask`` is
    silently dropped, so a padded sequence is classified with its padding attended: the empirical,
    "mc" and "exact" Fishers are then of other logits than the model gives that sequence, without a
    word. Here the padded row's logits are far from those of the same sequence unpadded."""
    T = pytest.importorskip("transformers")
    from fisherstore.losses import classification

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=64, num_labels=3, initializer_range=0.5)
    model = T.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(4, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:], ids[1, 3:] = 0, 0  # the second sequence has 3 tokens and 3 of padding
    batch = {"inputs": ids, "attention_mask": mask, "labels": torch.tensor([0, 2])}
    with torch.no_grad():
        got = classification.logits(model, batch)[1]
        want = model(ids[1:2, :3]).logits[0]  # the same sequence, unpadded
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_merge_relative_eps_has_the_documented_magnitude(tmp_path):
    """ε = eps · (Σ λ_i mean F_i)/Σ λ_i: with eps=1 the floor is as large as the mean Fisher, so a wrong
    scale (not divided by Σλ, or another multiple) moves the result well past the tolerance."""
    s = fisherstore.open(tmp_path / "s", mode="w", decay=0.5)
    g = torch.Generator().manual_seed(0)
    F = [torch.rand(6, 4, generator=g) ** 4 for _ in range(2)]  # skewed: a floor of the mean matters
    th = [torch.randn(6, 4, generator=g) for _ in range(2)]
    for i, f in enumerate(F):
        s.update(f"f{i}", {"w": f}, layouts={"w": None})
    lam = [1.0, 3.0]
    got = fisherstore.merge([({"w": th[0]}, s, "f0"), ({"w": th[1]}, s, "f1")], weights=lam, eps=1.0)["w"]
    Fd = [s.read(f"f{i}", "w").double() for i in range(2)]
    e = sum(w * f.mean() for w, f in zip(lam, Fd)) / sum(lam)
    want = sum(w * (f + e) * t.double() for w, f, t in zip(lam, Fd, th)) / sum(w * (f + e) for w, f in zip(lam, Fd))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    s.close()


def test_mc_draws_differ_between_steps_and_between_micro_batches():
    """The draws are seeded per (seed, rank, task, step, micro-batch): identical rows in two micro-batches,
    or the same batch at two steps, draw other labels (a near-uniform classifier makes them visible)."""
    from fisherstore import FisherCollector
    from fisherstore.losses import classification

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
    x = torch.randn(1, 5)
    same = {"inputs": x.repeat(2, 1), "labels": torch.zeros(2, dtype=torch.long)}
    fc = FisherCollector(backend="ram", params="all", loss_fn=classification, fisher_type="mc", seed=5,
                         micro_batch_size=1, ema_decay=0.5)
    grads = []
    orig = fc.store.begin_step

    def spy(task, **kw):  # record each micro-batch's square as it reaches the step
        st = orig(task, **kw)
        add = st.add

        def rec(name, x, **k):
            if name == "0.bias":
                grads.append(x.clone())
            return add(name, x, **k)

        st.add = rec
        return st

    fc.store.begin_step = spy
    fc.collect_fisher(model, same, task="t")
    fc.collect_fisher(model, same, task="t")
    assert len(grads) == 4
    # with 4 near-equiprobable classes, each square (p - e_y)² tells the drawn label apart
    labels = [int(g.argmax()) for g in grads]
    assert len(set(labels)) > 1, labels
