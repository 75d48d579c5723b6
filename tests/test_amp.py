"""Mixed precision: the Fisher of gradients a torch GradScaler scaled, checked against fp32 training.

Every scaler here is a real ``torch.amp.GradScaler("cpu")``. A power-of-two loss scale
multiplies every gradient exactly, so fp32 training with a scaler takes the very same
optimizer steps as without one, and the stored Fisher must match fp32 training's to fp32
rounding. Overflow steps are real: a loss made infinite, or fp16 autocast under a scale
too big for fp16, which the scaler itself detects and skips.
"""

import math
import warnings

import pytest
import torch

from fisherstore import FisherCollector, InvalidArgumentError
from fisherstore.errors import AmpOverflowWarning, NonFiniteGradientError
from fisherstore.integrations import amp_state, collect_from_grads
from tests.models import tiny_model, token_batch

BETA = 0.9
NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]
S0 = 2.0 ** 16


def _close(got, want, rtol=1e-5):
    return torch.allclose(got, want, rtol=rtol, atol=rtol * 1e-3 * float(want.abs().max()))


def _batch(seed):
    b = token_batch(n=2, seq=8, seed=seed)
    b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return b


def _tokens(b):
    return int((b["labels"][:, 1:] != -100).sum())


def _ema(xs):
    """Bias-corrected EMA of the steps' x, as the store reads it (written apart from fisherstore's maths)."""
    acc = 0
    for x in xs:
        acc = BETA * acc + (1 - BETA) * x
    return acc / (1 - BETA ** len(xs))


def _fp32_run(batches, skip=(), summed=False):
    """Plain fp32 training (token-mean loss, clipped, SGD) of the steps not in ``skip``: each step's hand-made
    x = (∇Σℓ)²/T = T·g² from its fp32 gradient g, and the final weights."""
    model = tiny_model("llama")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    xs = []
    for k, b in enumerate(batches):
        if k in skip:
            continue
        opt.zero_grad(set_to_none=True)
        T = _tokens(b)
        loss = model(**b).loss
        (loss * T if summed else loss).backward()
        named = dict(model.named_parameters())
        g_sum = {n: named[n].grad.detach().double() * (1 if summed else T) for n in NAMES}
        xs.append({n: (g_sum[n] ** 2 / T).float() for n in NAMES})
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    return xs, model


def _amp_run(batches, order, *, inf_steps=(), summed=False, fc=None, init_scale=S0, **scaler_kw):
    """The same training under a real GradScaler, collecting with ``scaler=``, at the point ``order`` names."""
    model = tiny_model("llama")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, **scaler_kw)
    fc = fc or FisherCollector(ema_decay=BETA, params=NAMES)
    written, scales = [], []
    for k, b in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        T = _tokens(b)
        loss = model(**b).loss
        loss = loss * T if summed else loss
        if k in inf_steps:
            loss = loss * math.inf  # an overflow: every scaled gradient is inf or NaN
        scaler.scale(loss).backward()
        scales.append(scaler.get_scale())
        kw = {"grad_scale": 1} if summed else {}
        if order == "before_unscale":  # where the README says: after backward, before clipping
            written.append(collect_from_grads(fc, model, "t", tokens=T, scaler=scaler, **kw))
            scaler.unscale_(opt)
        else:  # the loop unscaled first (to clip), then collects: the scaler's record says so
            scaler.unscale_(opt)
            opt_kw = {"optimizer": opt} if order == "after_unscale_given_optimizer" else {}
            written.append(collect_from_grads(fc, model, "t", tokens=T, scaler=scaler, **kw, **opt_kw))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
    return fc, model, written, scales


ORDERS = ["before_unscale", "after_unscale", "after_unscale_given_optimizer"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("summed", [False, True], ids=["mean_loss", "summed_loss"])
def test_collect_from_grads_with_a_scaler_stores_the_fp32_fisher(order, summed):
    batches = [_batch(seed=s) for s in range(3)]
    want, plain = _fp32_run(batches, summed=summed)
    fc, trained, written, scales = _amp_run(batches, order, summed=summed)
    assert written == [True] * 3 and scales == [S0] * 3  # the scaler really scaled every step by 2^16
    for (n, p), (_, q) in zip(trained.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), n  # the power-of-two scale is exact: the same training, step for step
    assert fc.store.step("t") == 3
    for n in NAMES:
        assert _close(fc.full_fisher("t", n).load(), _ema([x[n] for x in want])), n
    assert "amp_skipped_steps" not in fc.store.metadata("t").get("user", {})


@pytest.mark.parametrize("order", ["before_unscale", "after_unscale"])
@pytest.mark.parametrize("budget", [None, 0], ids=["resident", "streamed"])
def test_an_overflow_step_is_skipped_counted_and_warned_once(tmp_path, order, budget):
    batches = [_batch(seed=s) for s in range(5)]
    fc = FisherCollector(backend="zarr", path=tmp_path / "f.zarr", ema_decay=BETA, params=NAMES, memory_budget=budget)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fc, trained, written, scales = _amp_run(batches, order, inf_steps=(1, 3), fc=fc)
    assert written == [True, False, True, False, True]
    assert scales == [S0, S0, S0 / 2, S0 / 2, S0 / 4]  # the scaler backed off after each skipped step
    amp = [w for w in caught if issubclass(w.category, AmpOverflowWarning)]
    assert len(amp) == 1 and "'t'" in str(amp[0].message) and "amp_skipped_steps" in str(amp[0].message)
    want, plain = _fp32_run(batches, skip=(1, 3))  # fp32 training that never saw the skipped steps
    for (n, p), (_, q) in zip(trained.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), n  # the scaler skipped the optimizer steps the Fisher skipped
    fc.flush()
    with FisherCollector(backend="zarr", path=tmp_path / "f.zarr", mode="r") as r:
        assert r.store.step("t") == 3
        assert r.store.metadata("t")["user"]["amp_skipped_steps"] == 2
        for n in NAMES:
            assert _close(r.full_fisher("t", n).load(), _ema([x[n] for x in want])), n
    fc.close()


def test_a_real_fp16_overflow_is_skipped_and_later_steps_match_the_scalers_own_unscaling():
    """fp16 autocast on the CPU under a scale too big for fp16: the backward itself overflows."""
    model = tiny_model("llama")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -12)
    fc = FisherCollector(ema_decay=BETA, params=NAMES)
    want, written = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(4):
            b = _batch(seed=k)
            T = _tokens(b)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(**b).loss
            scaler.scale(loss).backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            written.append(collect_from_grads(fc, model, "t", tokens=T, scaler=scaler))
            scaler.unscale_(opt)  # the reference: the scaler's own unscaling of the same gradients
            named = dict(model.named_parameters())
            finite = all(torch.isfinite(p.grad).all() for p in named.values() if p.grad is not None)
            if finite:
                want.append({n: named[n].grad.double() ** 2 * T for n in NAMES})
            scaler.step(opt)
            scaler.update()
            stepped = any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
            assert written[-1] == finite == stepped, k  # skipped here exactly when the optimizer skipped
    assert written == [False, False, True, True]  # 2^40 and 2^28 overflow fp16; 2^16 does not
    assert len([w for w in caught if issubclass(w.category, AmpOverflowWarning)]) == 1
    assert fc.store.step("t") == 2 and fc.store.metadata("t")["user"]["amp_skipped_steps"] == 2
    for n in NAMES:
        assert _close(fc.full_fisher("t", n).load(), _ema([x[n] for x in want]).float()), n


def test_the_scalers_record_tells_scaled_from_unscaled_gradients():
    model = tiny_model("llama")
    model.train()
    a = torch.optim.SGD(list(model.parameters())[:3], lr=0.1)
    b = torch.optim.SGD(list(model.parameters())[3:], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=S0)
    scaler.scale(model(**_batch(0)).loss).backward()
    assert amp_state(scaler, model) == (S0, False)  # nothing unscaled yet
    scaler.unscale_(a)
    assert amp_state(scaler, model, a) == (1.0, False)
    assert amp_state(scaler, model, b) == (S0, False)  # b's gradients still carry the scale
    scaler.step(a)  # stepped: unscaled, until update()
    assert amp_state(scaler, model, a) == (1.0, False)
    scaler.step(b)
    assert amp_state(scaler, model, b) == (1.0, False)


def test_scaler_arguments_are_checked_and_a_disabled_scaler_changes_nothing():
    model = tiny_model("llama")
    model.train()
    fc = FisherCollector(ema_decay=BETA, params=NAMES)
    b = _batch(0)
    T = _tokens(b)
    scaler = torch.amp.GradScaler("cpu", init_scale=S0)
    scaler.scale(model(**b).loss).backward()
    with pytest.raises(InvalidArgumentError, match="pass a GradScaler as scaler="):
        collect_from_grads(fc, model, "t", tokens=T, grad_scale=scaler)
    with pytest.raises(InvalidArgumentError, match="scaler must be a torch.amp.GradScaler"):
        collect_from_grads(fc, model, "t", tokens=T, scaler=2.0 ** 16)
    assert "t" not in fc.store.tasks()
    # a disabled scaler neither scales nor skips: plain gradients, and a non-finite one is an error as before
    model.zero_grad(set_to_none=True)
    off = torch.amp.GradScaler("cpu", enabled=False)
    off.scale(model(**b).loss).backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if n in NAMES}
    assert collect_from_grads(fc, model, "t", tokens=T, scaler=off)
    for n in NAMES:
        assert _close(fc.full_fisher("t", n).load(), g[n] ** 2 * T), n
    model.zero_grad(set_to_none=True)
    off.scale(model(**b).loss * math.inf).backward()
    with pytest.raises(NonFiniteGradientError):
        collect_from_grads(fc, model, "t", tokens=T, scaler=off)


# -- the Hugging Face Trainer ---------------------------------------------------------------------
class _Weights:
    """Weights at the start of each optimizer step and each training forward's batch: the hand reference."""

    def __init__(self):
        self.weights, self.batches = [], []

    def callback(self):
        from transformers import TrainerCallback

        rec = self

        class Rec(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kw):
                rec.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
                rec.batches.append([])

        return Rec()

    def hook(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.batches[-1].append({k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")})


def _trainer_run(tmp_path, callbacks, *, scaler=None, autocast=False, steps=3, rec=None):
    """A real Trainer, 2 micro-batches per step, clipping on. With ``scaler``, fp16 training as Accelerate sets it
    up on a GPU: its GradScaler on ``trainer.accelerator.scaler`` (so the optimizer it wraps steps through it, and
    backward scales the loss), native AMP on (so clipping unscales first), autocast to fp16 only if asked."""
    from accelerate.utils import AutocastKwargs
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama")
    data = [{k: v[0] for k, v in _batch(seed=s).items()} for s in range(4 * steps)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, max_grad_norm=1.0, num_train_epochs=1,
                             report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, seed=3,
                             dataloader_num_workers=0, fp16=scaler is not None)
    cbs = list(callbacks) + ([rec.callback()] if rec is not None else [])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=cbs)
    if scaler is not None:
        # On the CPU Accelerate makes no scaler for fp16 (accelerator.py: fp16 and device != cpu); this is
        # what it does on a GPU, with a real torch GradScaler
        acc = trainer.accelerator
        assert acc.mixed_precision == "fp16" and acc.scaler is None
        acc.scaler, acc.native_amp = scaler, True
        acc.autocast_handler = AutocastKwargs(enabled=autocast)  # off: an fp32 forward, to compare exactly
    if rec is not None:
        model.register_forward_pre_hook(rec.hook, with_kwargs=True)
    trainer.train()
    if scaler is not None:
        assert trainer.optimizer.scaler is scaler  # the Trainer's optimizer stepped through our scaler
    return model


def test_trainer_callback_under_fp16_stores_the_fp32_fisher(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from transformers import TrainerCallback

    from fisherstore.integrations.hf import FisherCallback

    names = ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.o_proj.weight",
             "model.embed_tokens.weight"]
    fp32 = FisherCallback(tmp_path / "fp32.zarr", task="sft", params=names, ema_decay=BETA)
    plain = _trainer_run(tmp_path, [fp32])
    scaler = torch.amp.GradScaler("cpu", init_scale=S0)
    fp16 = FisherCallback(tmp_path / "fp16.zarr", task="sft", params=names, ema_decay=BETA)
    seen = []

    class Seen(TrainerCallback):  # what the callback sees of the scaler when it settles a step
        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            seen.append((type(optimizer).__name__, amp_state(scaler, model, optimizer)))

    with warnings.catch_warnings():
        warnings.simplefilter("error", AmpOverflowWarning)
        trained = _trainer_run(tmp_path, [fp16, Seen()], scaler=scaler)
    assert scaler.get_scale() == S0 and fp16.overflow_steps == 0
    # the Trainer unscaled to clip, and the scaler's record of it is found through Accelerate's optimizer wrapper
    assert seen == [("AcceleratedOptimizer", (1.0, False))] * 3
    for (n, p), (_, q) in zip(trained.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), n  # scaled, unscaled before clipping, stepped: fp32 training exactly
    with FisherCollector(backend="zarr", path=tmp_path / "fp32.zarr", mode="r") as a, \
            FisherCollector(backend="zarr", path=tmp_path / "fp16.zarr", mode="r") as b:
        assert a.store.step("sft") == b.store.step("sft") == 3
        for n in names:
            assert _close(b.full_fisher("sft", n).load(), a.full_fisher("sft", n).load()), n


@pytest.mark.parametrize("budget", [None, 0], ids=["resident", "streamed"])
def test_trainer_callback_skips_fp16_overflow_steps(tmp_path, budget):
    """fp16 autocast on the CPU, a scale too big for fp16: the first two steps overflow inside backward."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from fisherstore.integrations.hf import FisherCallback

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -12)
    cb = FisherCallback(tmp_path / "f.zarr", task="sft", params=names, ema_decay=BETA, memory_budget=budget)
    rec = _Weights()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer_run(tmp_path, [cb], scaler=scaler, autocast=True, steps=4, rec=rec)
    assert len([w for w in caught if issubclass(w.category, AmpOverflowWarning)]) == 1
    assert cb.overflow_steps == 2 and scaler.get_scale() == S0  # 2^40 and 2^28 overflowed, then 2^16
    assert all(torch.equal(rec.weights[0][n], rec.weights[2][n]) for n in rec.weights[0])  # the Trainer skipped
    # the two steps kept, by hand in fp32 from the weights and batches they saw (fp16 forward: a loose match)
    model = tiny_model("llama")
    model.train()
    want = []
    for w, batches in zip(rec.weights[2:], rec.batches[2:]):
        model.load_state_dict(w)
        model.zero_grad(set_to_none=True)
        T = sum(_tokens(b) for b in batches)
        for b in batches:
            (model(**b).loss * _tokens(b)).backward()
        want.append({n: dict(model.named_parameters())[n].grad ** 2 / T for n in names})
    with FisherCollector(backend="zarr", path=tmp_path / "f.zarr", mode="r") as fc:
        assert fc.store.step("sft") == 2 and fc.store.metadata("sft")["user"]["amp_skipped_steps"] == 2
        for n in names:
            got, ref = fc.full_fisher("sft", n).load(), _ema([x[n] for x in want])
            assert float((got - ref).norm() / ref.norm()) < 0.05, n  # 2^32 (or 2^-32) off would be far out
