"""The true Fisher (``fisher_type="exact"`` and ``"mc"``) against brute force written apart from the collector.

The references here backpropagate every class at every position of a float64 copy of the
model, one ``torch.autograd.grad`` each, and weight each square by the class probability:
``F = Σ_t Σ_y p_t(y) (∇log p_t(y))² / T``. Nothing of fisherstore's own label passes is used.
"""

import copy
import itertools
import json
import math

import pytest
import torch

import fisherstore
from fisherstore import FisherCollector, InvalidArgumentError
from fisherstore.losses import TokenLoss, causal_lm, classification, seq2seq_lm
from tests.models import speech_batch, tiny_model, token_batch
from tests.test_multipass import STATE, _budget


def _classifier(C=4, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, C))


def _cls_batch(n=6, C=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randn(n, 5, generator=g), "labels": torch.randint(0, C, (n,), generator=g)}


def _collect(model, batch, loss_fn=classification, params="all", task="t", **kw):
    """One step into a RAM store; the bias-corrected readout after one step is that step's x."""
    fc = FisherCollector(backend="ram", params=params, loss_fn=loss_fn, ema_decay=0.5, **kw)
    fc.collect_fisher(model, batch, task=task)
    return fc, {n: fc.store.read(task, n) for n in fc.store.params(task)}


def _brute_classifier(model, batch):
    """Σ_i Σ_c p_ic (∇ log p_ic)² / N in float64, one backward per (input, class)."""
    m = copy.deepcopy(model).double()
    params = dict(m.named_parameters())
    F = {n: torch.zeros_like(p) for n, p in params.items()}
    X = batch["inputs"].double()
    for i in range(X.shape[0]):
        logp = torch.log_softmax(m(X[i:i + 1]), -1)[0]
        for c in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True)
            for n, g in zip(params, grads):
                F[n] += logp[c].exp().detach() * g ** 2
    return {n: f / X.shape[0] for n, f in F.items()}


def _brute_causal_lm(model, batch, names):
    """Σ_t Σ_y p_t(y) (∇ log p_t(y))² / T over the shifted, unpadded targets, in float64, one sequence at a time."""
    m = copy.deepcopy(model).double()
    params = dict(m.named_parameters())
    F = {n: torch.zeros_like(params[n]) for n in names}
    T = 0
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for i in range(ids.shape[0]):
        logits = m(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits[0, :-1]
        logp = torch.log_softmax(logits, -1)
        for t in range(logp.shape[0]):
            if mask[i, t + 1] == 0:  # a padded target predicts nothing
                continue
            T += 1
            for y in range(logp.shape[1]):
                grads = torch.autograd.grad(logp[t, y], [params[n] for n in names], retain_graph=True)
                for n, g in zip(names, grads):
                    F[n] += logp[t, y].exp().detach() * g ** 2
    return {n: f / T for n, f in F.items()}


def _close(got, want, rtol):
    want = want.to(got.dtype)
    return torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


# -- exact, against brute force ----------------------------------------------------------------
@pytest.mark.parametrize("micro", [1, 4, 6])
def test_exact_fisher_of_a_softmax_classifier_equals_brute_force_at_any_micro_batch(micro):
    model, batch = _classifier(), _cls_batch()
    _, got = _collect(model, batch, fisher_type="exact", micro_batch_size=micro)
    want = _brute_classifier(model, batch)
    assert got.keys() == want.keys()
    for n in want:
        assert want[n].abs().max() > 0 and _close(got[n], want[n], 1e-5), n


def test_exact_fisher_of_a_tiny_causal_lm_equals_brute_force_and_is_micro_batch_invariant():
    model = tiny_model("llama")
    batch = token_batch(n=2, seq=5)  # the last sequence padded: its padded targets predict nothing
    runs = {mb: _collect(model, batch, loss_fn=causal_lm, params=None, fisher_type="exact", micro_batch_size=mb)
            for mb in (1, 2)}
    names = runs[1][0].store.params("t")
    assert len(names) >= 8  # q, k, v, o of two layers
    want = _brute_causal_lm(model, batch, names)
    for n in names:
        assert _close(runs[1][1][n], want[n], 1e-4), n
        assert _close(runs[2][1][n], runs[1][1][n], 1e-5), n  # micro-batching changes nothing but rounding
    assert runs[1][0].get_token_count("t") == 4 + 1  # T: targets after the shift, padding excluded


def test_exact_differs_from_empirical_and_both_are_recorded():
    model, batch = _classifier(), _cls_batch()
    fc_e, emp = _collect(model, batch)
    fc_x, exact = _collect(model, batch, fisher_type="exact")
    assert not torch.allclose(emp["2.weight"], exact["2.weight"], rtol=1e-2)
    assert fc_e.store.metadata("t")["fisher_type"] == "empirical"
    meta = fc_x.store.metadata("t")
    assert (meta["fisher_type"], meta["mc_samples"], meta["estimator"]) == ("exact", None, "micro_batch")


# -- Monte Carlo ---------------------------------------------------------------------------------
def _joint_moments(model, batch):
    """E[Z] and Var[Z] of one draw's Z = (Σ_i ∇ℓ_i(ŷ_i))² / N over ALL joint labels ŷ ~ Π_i p_i, in float64.

    Enumerating the C^N joint labels gives both moments exactly; E[Z] equal to the exact
    Fisher is the claim that the cross terms vanish, so one micro-batch of N inputs is unbiased.
    """
    m = copy.deepcopy(model).double()
    params = dict(m.named_parameters())
    X = batch["inputs"].double()
    N = X.shape[0]
    logp = torch.log_softmax(m(X), -1)  # [N, C]
    C = logp.shape[1]
    g = [[torch.autograd.grad(logp[i, c], list(params.values()), retain_graph=True) for c in range(C)]
         for i in range(N)]
    p = logp.detach().exp()
    m1 = {n: torch.zeros_like(q) for n, q in params.items()}
    m2 = {n: torch.zeros_like(q) for n, q in params.items()}
    for ys in itertools.product(range(C), repeat=N):
        w = math.prod(float(p[i, y]) for i, y in enumerate(ys))
        for k, n in enumerate(params):
            z = sum(g[i][y][k] for i, y in enumerate(ys)) ** 2 / N
            m1[n] += w * z
            m2[n] += w * z ** 2
    return m1, {n: (m2[n] - m1[n] ** 2).clamp_min(0) for n in params}


def test_mc_converges_to_exact_within_a_justified_statistical_bound():
    """MC with k draws is the mean of k independent copies of Z, so by the CLT it lies within
    z·σ/√k of E[Z] = the exact Fisher, elementwise, with σ² the exact variance of Z enumerated
    above. At z = 6 a normal tail is 2e-9 per element (~1e-7 over the 47 elements here); the
    seed is fixed, so the test is deterministic, and the bound is what justifies the seed."""
    model, batch = _classifier(C=3), _cls_batch(n=3, C=3)
    mean, var = _joint_moments(model, batch)
    exact = _collect(model, batch, fisher_type="exact")[1]
    k = 2000
    _, mc = _collect(model, batch, fisher_type="mc", mc_samples=k, seed=7, micro_batch_size=3)
    for n in mean:
        assert _close(exact[n], mean[n], 1e-5), n  # the cross terms vanish: E[Z] is the exact Fisher
        bound = 6 * var[n].sqrt() / math.sqrt(k) + 1e-6 * float(mean[n].abs().max())
        assert ((mc[n].double() - mean[n]).abs() <= bound).all(), n
        # and the draws are not degenerate: the estimate moves with the seed
    other = _collect(model, batch, fisher_type="mc", mc_samples=k, seed=8, micro_batch_size=3)[1]
    assert not torch.equal(other["2.weight"], mc["2.weight"])


def test_mc_is_reproducible_with_a_seed_and_records_its_draws():
    model, batch = _classifier(), _cls_batch()
    a = _collect(model, batch, fisher_type="mc", mc_samples=3, seed=11)
    b = _collect(model, batch, fisher_type="mc", mc_samples=3, seed=11)
    for n in a[1]:
        assert torch.equal(a[1][n], b[1][n]), n
    meta = a[0].store.metadata("t")
    assert (meta["fisher_type"], meta["mc_samples"]) == ("mc", 3)
    unseeded = FisherCollector(backend="ram", params="all", loss_fn=classification, fisher_type="mc")
    assert isinstance(unseeded.seed, int) and f"seed={unseeded.seed}" in repr(unseeded)  # drawn, shown, repeatable


def test_mc_and_exact_multi_pass_equal_one_pass_bit_for_bit(tmp_path):
    """Each pass draws the same labels (seeded per rank, task, step and micro-batch), so passes agree."""
    model = tiny_model("llama")
    batches = [token_batch(n=2, seq=4, seed=s) for s in range(2)]
    for kind, kw in (("mc", dict(mc_samples=2, seed=3)), ("exact", {})):
        out = {}
        for way, budget in (("multi", _budget(3)), ("single", 1 << 30)):
            fc = FisherCollector(backend="zarr", path=tmp_path / f"{kind}-{way}", mode="w", params="all",
                                 micro_batch_size=2, ema_decay=0.9, memory_budget=budget, fisher_type=kind, **kw)
            run = fc.collect_fisher_dataset(model, batches, task="a", progress=False)
            assert (run.passes > 1) == (way == "multi") and run.state_bytes == STATE
            out[way] = {n: fc.full_fisher("a", n, bias_corrected=False).load() for n in fc.store.params("a")}
            fc.close()
        assert out["multi"].keys() == out["single"].keys()
        for n in out["single"]:
            assert torch.equal(out["multi"][n], out["single"][n]), (kind, n)


# -- other models: the loss protocol -------------------------------------------------------------
class WhisperLoss(TokenLoss):
    """docs/estimators.md's example: any model whose loss gives its logits and targets."""

    name = "whisper"

    def targets(self, batch):
        return batch["labels"]

    def logits(self, model, batch):
        return model(input_features=batch["input_features"], decoder_input_ids=batch["decoder_input_ids"]).logits


def test_a_custom_loss_for_an_audio_encoder_decoder_gives_the_built_in_true_fisher():
    model = tiny_model("whisper")
    batch = speech_batch(n=2, tgt=2, model=model)
    # the decoder inputs HF builds from labels: shifted right, decoder_start first, -100 as pad
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), batch["labels"][:, :-1]], 1)
    dec = dec.masked_fill(dec == -100, model.config.pad_token_id)
    custom = dict(batch, decoder_input_ids=dec)
    _, mine = _collect(model, custom, loss_fn=WhisperLoss(), params=None, fisher_type="exact", micro_batch_size=2)
    _, built_in = _collect(model, batch, loss_fn=seq2seq_lm, params=None, fisher_type="exact", micro_batch_size=2)
    assert mine.keys() == built_in.keys() and len(mine) >= 8
    for n in mine:
        assert built_in[n].abs().max() > 0 and _close(mine[n], built_in[n], 1e-5), n
    _, mc = _collect(model, custom, loss_fn=WhisperLoss(), params=None, fisher_type="mc", mc_samples=2, seed=0)
    assert all(torch.isfinite(v).all() and v.abs().max() > 0 for v in mc.values())


def test_classification_accepts_an_object_with_logits_and_skips_labels_of_minus_100():
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _classifier()

        def forward(self, x):
            return type("Out", (), {"logits": self.inner(x)})()

    model, batch = Wrapped(), _cls_batch()
    batch["labels"][2] = -100
    fc, got = _collect(model, batch, fisher_type="exact")
    assert fc.get_token_count("t") == 5
    keep = [i for i in range(6) if i != 2]
    want = _brute_classifier(model.inner, {"inputs": batch["inputs"][keep]})
    for n in want:
        assert _close(got["inner." + n], want[n], 1e-5), n


# -- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(fisher_type="true"), "fisher_type must be one of"),
    (dict(fisher_type="mc", mc_samples=0), "mc_samples must be a positive int"),
    (dict(fisher_type="exact", mc_samples=4), "mc_samples=4 applies to fisher_type='mc'"),
    (dict(fisher_type="mc", estimator="batch"), "pass estimator='micro_batch'"),
    (dict(fisher_type="mc", seed=1.5), "seed must be an int"),
    (dict(fisher_type="exact", loss_fn=lambda m, b: (m(b["inputs"]).sum(), 1)), "subclass fisherstore.losses.TokenLoss"),
])
def test_a_fisher_type_the_collector_cannot_honour_is_refused_at_construction(kw, match):
    kw.setdefault("loss_fn", classification)
    with pytest.raises(InvalidArgumentError, match=match):
        FisherCollector(backend="ram", params="all", **kw)


def test_exact_over_a_large_label_space_names_mc():
    model, batch = _classifier(C=1100), _cls_batch(n=2, C=1100)
    fc = FisherCollector(backend="ram", params="all", loss_fn=classification, fisher_type="exact")
    with pytest.raises(InvalidArgumentError, match=r"1100 classes.*fisher_type='mc'"):
        fc.collect_fisher(model, batch, task="t")
    assert fc.store.step("t") == 0  # nothing landed


def test_a_task_keeps_its_fisher_type():
    model, batch = _classifier(), _cls_batch()
    fc = FisherCollector(backend="ram", params="all", loss_fn=classification, fisher_type="mc", mc_samples=2)
    fc.collect_fisher(model, batch, task="t")
    other = FisherCollector(store=fc.store, params="all", loss_fn=classification)
    with pytest.raises(InvalidArgumentError, match=r"collected with fisher_type='mc', mc_samples=2.*fisher_type='empirical'"):
        other.collect_fisher(model, batch, task="t")
    more = FisherCollector(store=fc.store, params="all", loss_fn=classification, fisher_type="mc", mc_samples=4)
    with pytest.raises(InvalidArgumentError, match="mc_samples=4"):
        more.collect_fisher(model, batch, task="t")
    assert fc.store.step("t") == 1


def test_training_gradients_are_empirical_so_other_types_are_refused_there():
    from fisherstore.integrations import collect_from_grads
    from fisherstore.integrations.hf import FisherCallback

    model, batch = _classifier(), _cls_batch()
    fc = FisherCollector(backend="ram", params="all", loss_fn=classification, fisher_type="exact")
    classification(model, batch)[0].backward()
    with pytest.raises(InvalidArgumentError, match=r"collect_from_grads.*empirical Fisher by nature"):
        collect_from_grads(fc, model, "t", tokens=6)
    with pytest.raises(InvalidArgumentError, match=r"FisherCallback.*fisher_type='exact'"):
        FisherCallback(fc)
    assert fc.store.tasks() == []


def test_true_fisher_stores_are_format_4_and_info_shows_the_type(tmp_path, capsys):
    from fisherstore.cli.main import main

    model, batch = _classifier(), _cls_batch()
    for kind, kw in (("empirical", {}), ("mc", dict(mc_samples=2, seed=0))):
        with FisherCollector(backend="zarr", path=tmp_path / kind, params="all", loss_fn=classification,
                             fisher_type=kind, **kw) as fc:
            fc.collect_fisher(model, batch, task="t")
        doc = json.load(open(tmp_path / kind / "zarr.json"))
        # an older fisherstore would read the true Fisher as an empirical one: version 4 makes it refuse
        assert doc["attributes"]["fisherstore"]["format_version"] == (4 if kind == "mc" else 1)
        with fisherstore.open(tmp_path / kind, mode="r") as s:
            assert s.metadata("t")["fisher_type"] == kind
    assert main(["info", str(tmp_path / "mc"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["tasks"]["t"]["fisher_type"], info["tasks"]["t"]["mc_samples"]) == ("mc", 2)
    assert main(["info", str(tmp_path / "mc")]) == 0
    assert "estimator micro_batch (mc, 2 draws)" in capsys.readouterr().out
