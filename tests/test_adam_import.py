"""import_adam and `fisherstore import-adam`: real Adam/AdamW steps on a tiny HF model, imported into a real zarr store.

Usage: ``pytest tests/test_adam_import.py``.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from models import tiny_model, token_batch

import fisherstore
from fisherstore import (
    InvalidArgumentError,
    NonFiniteGradientError,
    ShapeMismatchError,
    UnknownParamError,
    import_adam,
)
from fisherstore.cli import main
from fisherstore.optimizers.adam import trainer_param_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BETA2 = 0.95  # not the store's default β, so a wrong β shows
STEPS = 4


def _loss(model, seed):
    b = token_batch(seed=seed)
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return model(**b, labels=labels).loss  # HF's mean over the predicted tokens, as a Trainer's loss is


def _train(model, opt, steps=STEPS, grads=None, skip=()):
    """``steps`` real optimizer steps; ``grads`` (a list) receives each step's gradients; ``skip`` never get one."""
    for s in range(steps):
        _loss(model, s).backward()
        for n, p in model.named_parameters():
            if n in skip:
                p.grad = None
        if grads is not None:
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
    return opt


@pytest.fixture(scope="module")
def trained():
    """A tiny LLaMA, AdamW (β2=0.95, weight decay on) after STEPS steps, and the gradients of each step."""
    model = tiny_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, BETA2), weight_decay=0.1)
    grads = []
    _train(model, opt, grads=grads)
    return model, opt, grads


def _state(opt, model):
    """name -> exp_avg_sq of a live optimizer."""
    return {n: opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters()}


def _open(path, mode="w"):
    return fisherstore.open(path, mode=mode)


# -- 1. a live optimizer -------------------------------------------------------------------
def test_live_import_is_exp_avg_sq_bit_for_bit_and_its_readout_is_bias_corrected(trained, tmp_path):
    model, opt, _ = trained
    with _open(tmp_path / "s") as s:
        res = import_adam(s, "adam", model, opt)
        assert res.task == "adam" and res.step == STEPS and res.beta2 == BETA2 and res.tokens_per_step is None
        assert res.params == [n for n, _ in model.named_parameters()]
        assert "21 params" in repr(res) and "AdamW" in repr(res)
        for n, v in _state(opt, model).items():
            assert torch.equal(s.read("adam", n, bias_corrected=False), v), n
            ref = v.double() / (1 - BETA2 ** STEPS)  # independent float64 reference
            torch.testing.assert_close(s.read("adam", n).double(), ref, rtol=1e-6, atol=0)
            torch.testing.assert_close(s.fisher("adam", n)[...].double(), ref, rtol=1e-6, atol=0)
            assert s.param("adam", n).decay == BETA2
            assert s.param("adam", n).shape == tuple(v.shape)
        meta = s.metadata("adam")
        assert meta["estimator"] == "adam" and meta["step"] == STEPS and meta["tokens_seen"] == 0
        assert meta["fisher_type"] == "empirical"
        assert meta["model"]["class"] == "LlamaForCausalLM" and meta["model"]["num_kv_heads"] == 2
        assert meta["user"] == {"beta2": BETA2, "tokens_per_step": None, "amsgrad": False, "optimizer": "AdamW",
                                "source": "AdamW (live optimizer)",
                                # AdamW's decay is decoupled: exp_avg_sq is of the loss gradients alone
                                "weight_decay": [{"weight_decay": 0.1, "decoupled": True}]}
        # attention projections got head layouts: one chunk per head block
        q = "model.layers.0.self_attn.q_proj.weight"
        assert s.layout("adam", q).kind == "q" and s.fisher("adam", q).head(1, "Q").shape == (8, 32)


# -- 2. a state_dict, in RAM and saved ------------------------------------------------------
def test_state_dict_and_saved_file_import_the_same_values_as_the_live_optimizer(trained, tmp_path):
    model, opt, _ = trained
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    torch.save(opt.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # no mmap possible
    with _open(tmp_path / "s") as s:
        import_adam(s, "live", model, opt)
        r1 = import_adam(s, "sd", model, opt.state_dict())
        r2 = import_adam(s, "file", model, tmp_path / "optimizer.pt")
        import_adam(s, "legacy", model, str(tmp_path / "legacy.pt"))
        assert r1.source == "state_dict" and r2.source == str(tmp_path / "optimizer.pt")
        assert s.metadata("file")["user"]["optimizer"] is None  # a state_dict does not say its class
        for task in ("sd", "file", "legacy"):
            assert s.step(task) == STEPS
            for n in s.params("live"):
                assert torch.equal(s.read(task, n, bias_corrected=False), s.read("live", n, bias_corrected=False))
                assert torch.equal(s.read(task, n), s.read("live", n))


def test_a_store_path_is_opened_and_closed(trained, tmp_path):
    model, opt, _ = trained
    res = import_adam(tmp_path / "s", "adam", model, opt.state_dict())
    assert res.step == STEPS
    with fisherstore.open(tmp_path / "s", mode="r+") as s:  # a writer could take it: the import let go
        assert s.tasks() == ["adam"]


# -- 3. the EMA itself, from the gradients --------------------------------------------------
def test_readout_is_the_ema_of_the_recorded_gradients(trained, tmp_path):
    """v_t = β2 v + (1-β2) g², in float64 from each step's .grad: AdamW's weight decay never enters it."""
    model, opt, grads = trained
    assert len(grads) == STEPS
    with _open(tmp_path / "s") as s:
        import_adam(s, "adam", model, opt)
        for n, _ in model.named_parameters():
            v = torch.zeros_like(grads[0][n], dtype=torch.float64)
            for g in grads:
                v = BETA2 * v + (1 - BETA2) * g[n].double() ** 2
            torch.testing.assert_close(s.read("adam", n, bias_corrected=False).double(), v, rtol=1e-5, atol=1e-30)
            torch.testing.assert_close(s.read("adam", n).double(), v / (1 - BETA2 ** STEPS), rtol=1e-5, atol=1e-30)


# -- 4. tokens_per_step ---------------------------------------------------------------------
def test_tokens_per_step_scales_the_state_by_T(trained, tmp_path):
    model, opt, _ = trained
    T = 29  # the batch's predicted tokens would do; any T shows the scale
    with _open(tmp_path / "s") as s:
        import_adam(s, "plain", model, opt)
        res = import_adam(s, "scaled", model, opt, tokens_per_step=T)
        assert res.tokens_per_step == T and f"tokens_per_step={T}" in repr(res)
        for n, v in _state(opt, model).items():
            assert torch.equal(s.read("scaled", n, bias_corrected=False), v * T)
            torch.testing.assert_close(s.read("scaled", n), s.read("plain", n) * T, rtol=1e-6, atol=0)
        meta = s.metadata("scaled")
        assert meta["user"]["tokens_per_step"] == T and meta["tokens_seen"] == T * STEPS


def test_amsgrad_imports_the_ema_not_its_running_maximum(tmp_path):
    model = tiny_model("llama")
    opt = _train(model, torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, BETA2), amsgrad=True), steps=3)
    with _open(tmp_path / "s") as s:
        import_adam(s, "adam", model, opt.state_dict())
        assert s.metadata("adam")["user"]["amsgrad"] is True
        for n, p in model.named_parameters():
            assert torch.equal(s.read("adam", n, bias_corrected=False), opt.state[p]["exp_avg_sq"])


# -- 5. refusals ----------------------------------------------------------------------------
def test_another_optimizer_is_refused_by_name(tmp_path):
    model = tiny_model("llama")
    sgd = _train(model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), steps=1)
    with _open(tmp_path / "s") as s:
        with pytest.raises(InvalidArgumentError, match=r"torch\.optim\.sgd\.SGD, not Adam or AdamW.*exp_avg_sq"):
            import_adam(s, "x", model, sgd)
        with pytest.raises(InvalidArgumentError, match=r"not Adam's state \(it looks like SGD's\).*exp_avg_sq"):
            import_adam(s, "x", model, sgd.state_dict())
        nadam = _train(model, torch.optim.NAdam(model.parameters(), lr=1e-3), steps=1)
        with pytest.raises(InvalidArgumentError, match=r"NAdam"):
            import_adam(s, "x", model, nadam)
        with pytest.raises(InvalidArgumentError, match=r"looks like NAdam's"):
            import_adam(s, "x", model, nadam.state_dict())
        radam = _train(model, torch.optim.RAdam(model.parameters(), lr=1e-3), steps=1)
        with pytest.raises(InvalidArgumentError, match=r"looks like RAdam's"):
            import_adam(s, "x", model, radam.state_dict())
        with pytest.raises(InvalidArgumentError, match=r"not a torch optimizer state_dict.*'state' and 'param_groups'"):
            import_adam(s, "x", model, {"module": {}})
        assert s.tasks() == []


def test_a_state_for_a_parameter_the_model_lacks_names_the_index(trained, tmp_path):
    model, opt, _ = trained
    sd = opt.state_dict()
    n = len(sd["state"])
    extra = {"state": {**sd["state"], n: {"step": torch.tensor(float(STEPS)), "exp_avg": torch.zeros(5),
                                          "exp_avg_sq": torch.zeros(5)}},
             "param_groups": [{**sd["param_groups"][0], "params": [*sd["param_groups"][0]["params"], n]}]}
    stray = {"state": {**sd["state"], 99: sd["state"][0]}, "param_groups": sd["param_groups"]}
    with _open(tmp_path / "s") as s:
        with pytest.raises(UnknownParamError, match=rf"indices \[{n}\] \(shapes \[\(5,\)\]\) have no parameter"):
            import_adam(s, "x", model, extra)
        with pytest.raises(UnknownParamError, match=r"indices \[99\] that no param group lists"):
            import_adam(s, "x", model, stray)
        other = tiny_model("llama", seed=1)  # another model object: its parameters are not the optimizer's
        with pytest.raises(UnknownParamError, match=r"param 0 of param group 0 \(shape \(64, 32\)\) is not a "
                                                    r"parameter of the LlamaForCausalLM given"):
            import_adam(s, "x", other, opt)
        with pytest.raises(UnknownParamError, match=r"'model.embed_tokens.weigth'.*Did you mean.*embed_tokens"):
            import_adam(s, "x", model, opt, params=["model.embed_tokens.weigth"])
        assert s.tasks() == []


def test_parameters_with_no_state_are_named(tmp_path):
    model = tiny_model("llama")
    never = "model.layers.1.mlp.down_proj.weight"
    opt = _train(model, torch.optim.Adam(model.parameters(), lr=1e-2), steps=2, skip={never})
    fresh = torch.optim.Adam(model.parameters(), lr=1e-2)
    with _open(tmp_path / "s") as s:
        with pytest.raises(InvalidArgumentError, match=rf"no state for 1 of the 21 parameters.*'{never}'.*at least "
                                                       r"one optimizer step.*params="):
            import_adam(s, "x", model, opt)
        with pytest.raises(InvalidArgumentError, match=rf"'{never}'"):
            import_adam(s, "x", model, opt.state_dict())
        with pytest.raises(InvalidArgumentError, match=r"no state for 21 of the 21 parameters"):
            import_adam(s, "x", model, fresh)
        with pytest.raises(InvalidArgumentError, match=r"no state for 21 of the 21 parameters"):
            import_adam(s, "x", model, fresh.state_dict())
        assert s.tasks() == []
        keep = [n for n, _ in model.named_parameters() if n != never]
        res = import_adam(s, "rest", model, opt, params=keep)  # the way out the message names
        assert res.params == keep and s.params("rest") == keep


def test_states_at_different_steps_are_named(tmp_path):
    model = tiny_model("llama")
    late = "lm_head.weight"
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, steps=1, skip={late})
    _train(model, opt, steps=2)
    with _open(tmp_path / "s") as s, pytest.raises(InvalidArgumentError,
                                                   match=rf"different steps \(step 2: '{late}'; step 3: "):
        import_adam(s, "x", model, opt)


def test_groups_with_different_beta2_are_named(tmp_path):
    model = tiny_model("llama")
    named = list(model.named_parameters())
    opt = torch.optim.Adam([{"params": [p for _, p in named[:5]], "betas": (0.9, 0.99)},
                            {"params": [p for _, p in named[5:]], "betas": (0.9, 0.999)}], lr=1e-2)
    _train(model, opt, steps=2)
    with _open(tmp_path / "s") as s:
        for src in (opt, opt.state_dict()):
            with pytest.raises(InvalidArgumentError, match=r"group 0: β2=0\.99 \(5 params.*group 1: β2=0\.999 "
                                                           r"\(16 params.*its own task.*params="):
                import_adam(s, "x", model, src)
        first = [n for n, _ in named[:5]]
        assert import_adam(s, "g0", model, opt, params=first).beta2 == 0.99  # one group, one task
        assert import_adam(s, "g1", model, opt.state_dict(), params=[n for n, _ in named[5:]]).beta2 == 0.999
        assert s.param("g0", first[0]).decay == 0.99


def test_an_existing_task_is_refused_and_kept(trained, tmp_path):
    model, opt, _ = trained
    with _open(tmp_path / "s") as s:
        import_adam(s, "adam", model, opt)
        before = s.read("adam", "lm_head.weight")
        with pytest.raises(InvalidArgumentError, match=r"task 'adam' already exists.*another task name"):
            import_adam(s, "adam", model, opt.state_dict(), tokens_per_step=3)
        assert torch.equal(s.read("adam", "lm_head.weight"), before)


def test_nonfinite_and_step_zero_and_bad_arguments_are_refused_before_the_store_is_touched(trained, tmp_path):
    model, opt, _ = trained
    sd = opt.state_dict()
    bad = {"state": {i: dict(st) for i, st in sd["state"].items()}, "param_groups": sd["param_groups"]}
    bad["state"][3]["exp_avg_sq"] = bad["state"][3]["exp_avg_sq"].clone()
    bad["state"][3]["exp_avg_sq"][0, 0] = math.nan
    zero = {"state": {i: {**st, "step": torch.tensor(0.0)} for i, st in sd["state"].items()},
            "param_groups": sd["param_groups"]}
    with _open(tmp_path / "s") as s:
        with pytest.raises(NonFiniteGradientError,
                           match=r"'model.layers.0.self_attn.v_proj.weight' \(index 3 in param group 0\)"):
            import_adam(s, "x", model, bad)
        with pytest.raises(InvalidArgumentError, match=r"step 0"):
            import_adam(s, "x", model, zero)
        huge = {"state": {i: dict(st) for i, st in sd["state"].items()}, "param_groups": sd["param_groups"]}
        huge["state"][0]["exp_avg_sq"] = torch.full_like(huge["state"][0]["exp_avg_sq"], 1e38)
        with pytest.raises(NonFiniteGradientError, match=r"'model.embed_tokens.weight' times tokens_per_step=10 "
                                                         r"overflows fp32"):
            import_adam(s, "x", model, huge, tokens_per_step=10)
        with pytest.raises(InvalidArgumentError, match=r"tokens_per_step must be a positive int"):
            import_adam(s, "x", model, opt, tokens_per_step=0)
        with pytest.raises(InvalidArgumentError, match=r"no such file.*torch\.save"):
            import_adam(s, "x", model, tmp_path / "missing.pt")
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        with pytest.raises(InvalidArgumentError, match=r"junk\.pt: torch\.load could not read it"):
            import_adam(s, "x", model, tmp_path / "junk.pt")
        with pytest.raises(InvalidArgumentError, match=r"param_names= names a state_dict's indices"):
            import_adam(s, "x", model, opt, param_names=["lm_head.weight"])
        assert s.tasks() == []  # nothing was created by any refused import
    with fisherstore.open(tmp_path / "s", mode="r") as s:
        assert s.tasks() == []


# -- 6. Hugging Face Trainer's two param groups --------------------------------------------
def _trainer_style(model):
    """AdamW over two groups as Trainer.create_optimizer builds them: weight-decayed parameters first."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in named if "norm" not in n and "bias" not in n]
    no_decay = [(n, p) for n, p in named if not ("norm" not in n and "bias" not in n)]
    opt = torch.optim.AdamW([{"params": [p for _, p in decay], "weight_decay": 0.1},
                             {"params": [p for _, p in no_decay], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, BETA2))
    return opt, [n for n, _ in decay] + [n for n, _ in no_decay]


def test_trainer_style_groups_map_live_and_with_param_names(tmp_path):
    model = tiny_model("llama")
    opt, order = _trainer_style(model)
    assert order != [n for n, _ in model.named_parameters()]  # the indices are not the model's order
    _train(model, opt)
    with _open(tmp_path / "s") as s:
        import_adam(s, "live", model, opt)
        import_adam(s, "sd", model, opt.state_dict(), param_names=order)
        for n, v in _state(opt, model).items():
            assert torch.equal(s.read("live", n, bias_corrected=False), v)
            assert torch.equal(s.read("sd", n, bias_corrected=False), v)
        with pytest.raises(ShapeMismatchError, match=r"index 8 in param group 0 has exp_avg_sq of shape \(32, 32\), "
                                                     r"but the parameter it maps to, "
                                                     r"'model.layers.0.input_layernorm.weight', has shape \(32,\).*"
                                                     r"Pass param_names="):
            import_adam(s, "bad", model, opt.state_dict())
        with pytest.raises(ShapeMismatchError, match=r"not in the order of param_names"):
            import_adam(s, "bad", model, opt.state_dict(), param_names=order[1:] + order[:1])
        assert "bad" not in s.tasks()


def test_a_real_trainer_optimizer_state_dict_maps_with_trainer_param_names(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model("gpt2")  # biases and LayerNorms: the no-decay group is large
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True,
                                          weight_decay=0.1)
    opt = transformers.Trainer(model=model, args=args).create_optimizer()
    assert len(opt.param_groups) == 2
    _train(model, opt, steps=2)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with _open(tmp_path / "s") as s:
        import_adam(s, "adam", model, tmp_path / "optimizer.pt", param_names=trainer_param_names(model))
        for n, v in _state(opt, model).items():
            assert torch.equal(s.read("adam", n, bias_corrected=False), v), n


# -- 7. the command ------------------------------------------------------------------------
@pytest.fixture
def checkpoint(trained, tmp_path):
    """A checkpoint directory as a Trainer leaves one: config.json and optimizer.pt."""
    model, opt, _ = trained
    ckpt = tmp_path / "checkpoint-4"
    model.config.save_pretrained(ckpt)
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    return ckpt


def test_cli_imports_a_checkpoint_directory(trained, checkpoint, tmp_path, capsys):
    model, opt, _ = trained
    store = str(tmp_path / "s")
    assert main(["import-adam", str(checkpoint), "--store", store, "--task", "adam", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "adam" and out["step"] == STEPS and out["beta2"] == BETA2 and out["param_order"] == "model"
    assert out["params"] == [n for n, _ in model.named_parameters()]
    assert main(["import-adam", str(checkpoint / "optimizer.pt"), "--store", store, "--task", "scaled",
                 "--tokens-per-step", "5"]) == 0
    line = capsys.readouterr().out
    assert "task 'scaled' holds Adam's exp_avg_sq of 21 parameters at step 4" in line and "=5" in line
    with fisherstore.open(store, mode="r") as s:
        for n, v in _state(opt, model).items():
            assert torch.equal(s.read("adam", n, bias_corrected=False), v)
            assert torch.equal(s.read("scaled", n, bias_corrected=False), v * 5)
        assert s.metadata("adam")["model"]["class"] == "LlamaForCausalLM"


def test_cli_usage_errors_exit_2(checkpoint, tmp_path, capsys):
    store = str(tmp_path / "s")
    assert main(["import-adam", str(tmp_path / "nope"), "--store", store, "--task", "a"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["import-adam", str(tmp_path / "empty"), "--store", store, "--task", "a"]) == 2
    assert "holds no optimizer.pt" in capsys.readouterr().err
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "optimizer.pt").write_bytes((checkpoint / "optimizer.pt").read_bytes())
    assert main(["import-adam", str(lone), "--store", store, "--task", "a"]) == 2
    err = capsys.readouterr().err
    assert "holds no config.json" in err and "pass --model DIR" in err
    assert main(["import-adam", str(lone), "--store", store, "--task", "a", "--model", str(checkpoint)]) == 0
    capsys.readouterr()
    assert main(["import-adam", str(checkpoint), "--store", store, "--task", "a"]) == 2
    assert "task 'a' already exists" in capsys.readouterr().err
    # a Trainer checkpoint (trainer_state.json) whose state_dict is in model order: 'auto' takes Trainer's order
    (checkpoint / "trainer_state.json").write_text("{}")
    assert main(["import-adam", str(checkpoint), "--store", store, "--task", "b"]) == 2
    err = capsys.readouterr().err
    assert "not in the 'trainer' order" in err and "--param-order model" in err and "param_names=" not in err
    assert main(["import-adam", str(checkpoint), "--store", store, "--task", "b", "--param-order", "model"]) == 0


def test_cli_help_and_subprocess(checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-m", "fisherstore.cli", "import-adam", str(checkpoint), "--store",
                          str(tmp_path / "s"), "--task", "adam", "--json"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["step"] == STEPS
    helped = subprocess.run([sys.executable, "-m", "fisherstore.cli", "import-adam", "--help"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert helped.returncode == 0 and "--tokens-per-step" in helped.stdout and "--param-order" in helped.stdout


# -- 8. what is on disk --------------------------------------------------------------------
def test_values_survive_a_read_only_reopen_at_format_4(trained, tmp_path):
    model, opt, _ = trained
    path = tmp_path / "s"
    import_adam(str(path), "adam", model, opt, tokens_per_step=3)
    with fisherstore.open(path, mode="r") as s:
        assert s.step("adam") == STEPS and s.metadata("adam")["estimator"] == "adam"
        for n, v in _state(opt, model).items():
            assert torch.equal(s.read("adam", n, bias_corrected=False), v * 3)
            torch.testing.assert_close(s.read("adam", n).double(), 3 * v.double() / (1 - BETA2 ** STEPS),
                                       rtol=1e-6, atol=0)
    with open(path / "zarr.json") as f:
        assert json.load(f)["attributes"]["fisherstore"]["format_version"] == 4
