"""Training-time collection: the Fisher of the gradients a training loop computes anyway, checked by hand."""

import pytest
import torch
import torch.nn.functional as F

from fisherstore import FisherCollector, InvalidArgumentError
from fisherstore.integrations import collect_from_grads
from tests.models import tiny_model, token_batch

BETA = 0.9


def _close(got, want, rtol=1e-4):
    return torch.allclose(got, want, rtol=rtol, atol=rtol * 1e-3 * float(want.abs().max()))


def _summed_grads(model, batches, names):
    """The gradient of the token-summed causal-LM loss over ``batches``, and its token count T."""
    model.zero_grad(set_to_none=True)
    T = 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                        reduction="sum").backward()
        T += int((labels != -100).sum())
    params = dict(model.named_parameters())
    return {n: params[n].grad.detach().clone() for n in names}, T


def _ema(xs):
    """Bias-corrected EMA of the steps' x, as the store reads it."""
    F_ = 0
    for x in xs:
        F_ = BETA * F_ + (1 - BETA) * x
    return F_ / (1 - BETA ** len(xs))


def _labelled(n, seed, pad_last=True):
    b = token_batch(n=n, seq=8, seed=seed, pad_last=pad_last)
    b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return b


def test_collect_from_grads_of_a_mean_loss_equals_hand_computation():
    model = tiny_model("llama")
    model.train()
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    fc = FisherCollector(ema_decay=BETA, params=names)
    want = []
    for step in range(2):
        batches = [_labelled(2, seed=10 * step + i) for i in range(2)]
        g_sum, T = _summed_grads(model, batches, names)
        want.append({n: g_sum[n] ** 2 / T for n in names})
        # the training loop: the token-mean loss over the whole step, accumulated over two micro-batches
        model.zero_grad(set_to_none=True)
        for b in batches:
            (model(**b, num_items_in_batch=T).loss).backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters() if n in names}
        collect_from_grads(fc, model, "train", tokens=T)
        assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters() if n in names)  # untouched
    for n in names:
        assert _close(fc.full_fisher("train", n).load(), _ema([w[n] for w in want])), n
    meta = fc.store.metadata("train")
    assert meta["estimator"] == "batch" and meta["user"]["source"] == "training gradients"
    assert fc.get_token_count("train") == sum(int((b["labels"][:, 1:] != -100).sum()) for s in range(2)
                                                for b in [_labelled(2, seed=10 * s + i) for i in range(2)])
    g = fc.get_group_fisher("train", names[0], "head")
    assert torch.allclose(g, torch.stack([fc.full_fisher("train", names[0]).head(h, "Q").sum() for h in range(4)]),
                          rtol=1e-5)
    with pytest.raises(InvalidArgumentError, match="tokens must be a positive int"):
        collect_from_grads(fc, model, "train", tokens=0)


class _Recorder:
    """Weights at the start of each optimizer step and every training forward's batch, for the hand computation."""

    def __init__(self):
        self.weights, self.batches, self.calls = [], [], 0

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
            self.calls += 1
            self.batches[-1].append({k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")})


def _train(tmp_path, callbacks, rec=None, steps_data=12):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama")
    data = [{k: v[0] for k, v in _labelled(1, seed=s, pad_last=s % 3 == 0).items()} for s in range(steps_data)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, max_grad_norm=1.0, num_train_epochs=1,
                             report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, seed=3,
                             dataloader_num_workers=0)
    cbs = list(callbacks) + ([rec.callback()] if rec is not None else [])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=cbs)
    if rec is not None:
        model.register_forward_pre_hook(rec.hook, with_kwargs=True)
    trainer.train()
    return model


@pytest.mark.parametrize("every", [1, 2])
def test_trainer_callback_stores_the_fisher_of_the_steps_it_saw(tmp_path, every):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from fisherstore.integrations.hf import FisherCallback

    names = ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.o_proj.weight",
             "model.embed_tokens.weight"]
    rec = _Recorder()
    cb = FisherCallback(tmp_path / "fisher.zarr", every=every, task="sft", params=names, ema_decay=BETA)
    trained = _train(tmp_path, [cb], rec)
    plain = _train(tmp_path, [])
    # the optimiser step is untouched: the same weights as training without the callback
    for (n, p), (_m, q) in zip(trained.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), n
    assert len(rec.weights) == 3 and rec.calls == 6  # 3 optimizer steps of 2 micro-batches, no extra forward
    want, clipped = [], False
    model = tiny_model("llama")
    model.train()
    for k, (w, batches) in enumerate(zip(rec.weights, rec.batches)):
        if (k + 1) % every:
            continue
        model.load_state_dict(w)
        g_sum, T = _summed_grads(model, batches, [n for n, _ in model.named_parameters()])
        clipped |= float(torch.stack([(g / T).norm() for g in g_sum.values()]).norm()) > 1.0
        want.append({n: g_sum[n] ** 2 / T for n in names})
    assert clipped  # the Trainer clipped these gradients; the callback read them before it did
    with FisherCollector(backend="zarr", path=tmp_path / "fisher.zarr", mode="r") as fc:
        assert fc.store.step("sft") == len(want)
        for n in names:
            assert _close(fc.full_fisher("sft", n).load(), _ema([x[n] for x in want])), n
        assert fc.store.metadata("sft")["estimator"] == "batch"
