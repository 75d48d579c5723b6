"""Losses for Fisher collection: the token-summed cross entropy a model is trained with.

A loss is any callable ``loss_fn(model, batch) -> (loss_sum, n_tokens)``: ``loss_sum`` is
the cross entropy **summed** over the predicted tokens of ``batch`` (a scalar tensor to
backpropagate), and ``n_tokens`` the number of those tokens (labels ≠ -100). The
collector squares the gradient of ``loss_sum`` and divides by the step's total
``n_tokens``, so the choice of loss decides both what is predicted and what T is.

=================  ===========================================  ===============================
loss               models                                       targets
=================  ===========================================  ===============================
``causal_lm``      decoder-only LMs (LLaMA, GPT-2, OPT, ...)    ``labels`` (default: input_ids,
                                                                padding -100) shifted left by one
``seq2seq_lm``     encoder-decoders (BART, T5, mBART, ...;      ``labels`` as given (required);
                   Whisper: ``input_features``, no input_ids)   HF builds the decoder inputs by
                                                                shifting them right
``masked_lm``      BERT, RoBERTa, ... (``*ForMaskedLM``)        ``labels`` as given (required):
                                                                -100 except at masked positions
``classification`` any classifier: ``model(batch["inputs"])``   ``labels`` ``[N]`` (one class per
                   returns logits ``[N, C]`` (or ``.logits``)   input, -100 to skip one); T = N
=================  ===========================================  ===============================

**Any other model.** A loss for ``fisher_type="mc"`` or ``"exact"`` must expose the model's
predictive distribution: subclass :class:`TokenLoss` and give :meth:`TokenLoss.logits`
(``[..., C]``) and :meth:`TokenLoss.targets` (the same leading shape, -100 where nothing is
predicted: the target mask). The cross entropy, the token count and the label draws then
come for free. An audio encoder-decoder, for instance (docs/estimators.md runs it)::

    class WhisperLoss(fisherstore.losses.TokenLoss):
        name = "whisper"

        def targets(self, batch):
            return batch["labels"]

        def logits(self, model, batch):
            return model(input_features=batch["input_features"],
                         decoder_input_ids=batch["decoder_input_ids"]).logits

The built-in losses are :class:`TokenLoss` objects: besides the call they count a batch's
tokens without running the model (:meth:`TokenLoss.count_tokens`), which lets the
collector stream each micro-batch's squared gradient to the store as soon as it is final.
A plain function works too; the collector then keeps a per-step sum until the last
micro-batch has told it T.

Usage::

    from fisherstore import FisherCollector
    from fisherstore.losses import seq2seq_lm

    fc = FisherCollector(loss_fn=seq2seq_lm)
    fc.collect_fisher(bart, {"input_ids": src, "attention_mask": src_mask, "labels": tgt})

Whatever the loss, the collector calls it through :func:`call_loss` (which checks what it
returns) and first asks :func:`check_loss` whether it can be the model's at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError

__all__ = ["LossFn", "TokenLoss", "causal_lm", "seq2seq_lm", "masked_lm", "classification", "IGNORE_INDEX",
           "call_loss", "check_loss", "loss_name"]

#: The label that marks a position with nothing to predict (Hugging Face's convention).
IGNORE_INDEX = -100

LossFn = Callable[[nn.Module, Mapping[str, Any]], tuple[torch.Tensor, int]]


def _need(batch: Mapping[str, Any], key: str, loss: str, why: str) -> torch.Tensor:
    v = batch.get(key)
    if v is None:
        raise InvalidArgumentError(
            f"the batch has no {key!r}, which the {loss} loss needs ({why}); it has {sorted(batch)}. "
            f"Add {key!r} to the batch, or pass the loss_fn that matches the model"
        )
    if not isinstance(v, torch.Tensor) or v.ndim != 2:
        raise InvalidArgumentError(
            f"batch[{key!r}] must be a [batch, seq] tensor for the {loss} loss, got "
            f"{type(v).__name__} of shape {tuple(getattr(v, 'shape', ()))}"
        )
    return v


def _model_inputs(batch: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: batch[k] for k in keys if batch.get(k) is not None}


class TokenLoss:
    """A cross-entropy loss over predicted tokens: ``loss(model, batch) -> (loss_sum, n_tokens)``.

    Subclasses say which tokens are targets (:meth:`targets`) and which logits predict
    them (:meth:`logits`); the cross entropy (fp32, summed, ``-100`` ignored) and the
    token count are shared, so every built-in loss normalises the same way.
    Usage: ``loss_sum, n = causal_lm(model, batch)``.
    """

    name = "token_loss"

    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The target ids aligned with :meth:`logits`, ``-100`` where nothing is predicted."""
        raise NotImplementedError

    def logits(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """The logits ``[batch, positions, vocab]`` that predict :meth:`targets`."""
        raise NotImplementedError

    def count_tokens(self, batch: Mapping[str, Any]) -> int:
        """How many tokens ``batch`` predicts (the ``n_tokens`` a call returns), without the model."""
        return int((self.targets(batch) != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
        tgt = self.targets(batch)
        logits = self.logits(model, batch)
        if tuple(logits.shape[:-1]) != tuple(tgt.shape):
            raise InvalidArgumentError(
                f"the {self.name} loss got logits of shape {tuple(logits.shape)} for targets of shape "
                f"{tuple(tgt.shape)}; the model's output positions must line up with the labels "
                "(check labels / decoder_input_ids lengths, or pass the loss_fn that matches the model)"
            )
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, int((tgt != IGNORE_INDEX).sum())

    def __repr__(self) -> str:
        return f"fisherstore.losses.{self.name}"


class CausalLM(TokenLoss):
    """Next-token prediction: position i predicts token i+1 (decoder-only models).

    ``labels`` default to ``input_ids`` with padding (``attention_mask == 0``) set to -100;
    either way they are shifted left by one, as Hugging Face's causal-LM loss does.
    """

    name = "causal_lm"

    def _mask(self, batch: Mapping[str, Any], ids: torch.Tensor) -> torch.Tensor:
        mask = batch.get("attention_mask")
        return torch.ones_like(ids) if mask is None else mask

    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        ids = _need(batch, "input_ids", self.name, "the tokens to predict from")
        labels = batch.get("labels")
        if labels is None:
            labels = ids.masked_fill(self._mask(batch, ids) == 0, IGNORE_INDEX)
        return labels[:, 1:]

    def logits(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        ids = _need(batch, "input_ids", self.name, "the tokens to predict from")
        return model(input_ids=ids, attention_mask=self._mask(batch, ids)).logits[:, :-1]


class Seq2SeqLM(TokenLoss):
    """Encoder-decoder prediction: decoder position i predicts ``labels[:, i]`` (BART, T5, Whisper, ...).

    The encoder reads ``input_ids`` (text) or ``input_features`` (audio: Whisper's
    ``[batch, mel bins, frames]``); the model gets whichever the batch has, ``attention_mask``
    and, when the batch has them, ``decoder_input_ids`` / ``decoder_attention_mask``;
    otherwise it gets ``labels`` and builds the decoder inputs itself by shifting them right.
    The labels are used unshifted, and only they count: T is the labels ≠ -100, whatever
    the encoder read (audio frames are inputs, not predicted tokens).
    """

    name = "seq2seq_lm"
    _inputs = ("input_ids", "input_features", "attention_mask", "decoder_input_ids", "decoder_attention_mask")

    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return _need(batch, "labels", self.name, "the decoder's target tokens, -100 where there are none")

    def logits(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        if batch.get("input_features") is None and batch.get("input_ids") is None:
            raise InvalidArgumentError(
                f"the batch has neither 'input_ids' (a text encoder's tokens) nor 'input_features' (an audio "
                f"encoder's, e.g. Whisper's log-mel frames), one of which the seq2seq_lm loss needs for the "
                f"encoder; it has {sorted(batch)}. Add the encoder's input to the batch"
            )
        if batch.get("input_features") is None:
            _need(batch, "input_ids", self.name, "the encoder's input tokens")
        else:
            feats = batch["input_features"]
            if not isinstance(feats, torch.Tensor) or feats.ndim != 3:
                raise InvalidArgumentError(
                    "batch['input_features'] must be a [batch, features, frames] tensor for the seq2seq_lm loss "
                    f"(Whisper: [batch, num_mel_bins, 2 * max_source_positions]), got {type(feats).__name__} of "
                    f"shape {tuple(getattr(feats, 'shape', ()))}"
                )
        kw = _model_inputs(batch, self._inputs)
        if "decoder_input_ids" not in kw:
            kw["labels"] = self.targets(batch)  # the model shifts them right into decoder inputs
        return model(**kw).logits


class MaskedLM(TokenLoss):
    """Masked-token prediction: position i predicts ``labels[:, i]`` (BERT, RoBERTa, ...).

    The model gets ``input_ids``, ``attention_mask`` and ``token_type_ids`` when present;
    ``labels`` hold the original token at masked positions and -100 elsewhere.
    """

    name = "masked_lm"
    _inputs = ("input_ids", "attention_mask", "token_type_ids")

    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return _need(batch, "labels", self.name, "the original tokens at masked positions, -100 elsewhere")

    def logits(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        _need(batch, "input_ids", self.name, "the (masked) input tokens")
        return model(**_model_inputs(batch, self._inputs)).logits


class Classification(TokenLoss):
    """One class per input: ``model(batch["inputs"])`` gives logits ``[N, C]``, ``batch["labels"]`` the classes.

    ``attention_mask``, ``token_type_ids`` and ``position_ids`` go to the model as keywords
    when the batch has them (a padded batch of a ``*ForSequenceClassification`` model). The
    model may return the logits or an object with ``.logits`` (Hugging Face's
    ``*ForSequenceClassification``, ``*ForImageClassification``). T = N, less the labels set
    to -100. Usage: ``FisherCollector(loss_fn=classification, params="all", fisher_type="exact")``.
    """

    name = "classification"
    #: What a Hugging Face sequence classifier takes beside its input ids, passed on when the batch has it.
    _extra = ("attention_mask", "token_type_ids", "position_ids")

    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        y = batch.get("labels")
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.is_floating_point():
            raise InvalidArgumentError(
                f"the classification loss needs batch['labels'], one integer class per input ([N]); got "
                f"{type(y).__name__} of shape {tuple(getattr(y, 'shape', ()))}. Put the class indices there "
                "(-100 to skip an input)"
            )
        return y

    def logits(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        x = batch.get("inputs")
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(
                f"the classification loss calls model(batch['inputs']), but the batch has no 'inputs' tensor; it has "
                f"{sorted(batch)}. Put the model's input there, or subclass fisherstore.losses.TokenLoss for a "
                "model called otherwise (docs/estimators.md)"
            )
        # A padded batch of a sequence classifier carries its mask: dropped, padding would be attended.
        extra = {k: batch[k] for k in self._extra if batch.get(k) is not None}
        out = model(x, **extra)
        out = getattr(out, "logits", out)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise InvalidArgumentError(
                f"the classification loss needs the model to return logits [N, C] (or an object with .logits), got "
                f"{type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}"
            )
        return out


#: Decoder-only next-token loss (the collector's default).
causal_lm = CausalLM()
#: Encoder-decoder loss on unshifted ``labels``.
seq2seq_lm = Seq2SeqLM()
#: Masked-token loss on unshifted ``labels``.
masked_lm = MaskedLM()
#: One class per input: ``model(batch["inputs"])`` -> logits ``[N, C]``, ``batch["labels"]`` ``[N]``.
classification = Classification()


# -- calling a loss, and checking it fits the model ---------------------------------------------
def check_loss(loss_fn: Any, model: nn.Module) -> None:
    """Refuse a loss that cannot be this model's: it would train on the wrong targets, silently."""
    cfg = getattr(model, "config", None)
    enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
    cls = type(model).__name__
    if isinstance(loss_fn, CausalLM) and enc_dec:
        raise InvalidArgumentError(
            f"{cls} is an encoder-decoder model (config.is_encoder_decoder), but loss_fn is the causal-LM "
            "loss, which would shift the encoder's input_ids into targets. Pass "
            "loss_fn=fisherstore.losses.seq2seq_lm and put the decoder targets in batch['labels']"
        )
    if isinstance(loss_fn, CausalLM) and cls.endswith("ForMaskedLM"):
        raise InvalidArgumentError(
            f"{cls} is a masked language model, but loss_fn is the causal-LM loss, which would predict "
            "each next token of a model that sees the whole sequence. Pass "
            "loss_fn=fisherstore.losses.masked_lm and put the masked targets in batch['labels']"
        )
    if isinstance(loss_fn, Seq2SeqLM) and cfg is not None and not enc_dec:
        raise InvalidArgumentError(
            f"{cls} is not an encoder-decoder model (config.is_encoder_decoder is False), but loss_fn is "
            "seq2seq_lm, which uses labels unshifted. Pass loss_fn=fisherstore.losses.causal_lm "
            "(decoder-only) or fisherstore.losses.masked_lm (masked LM)"
        )


def loss_name(loss_fn: Any) -> str:
    return str(getattr(loss_fn, "name", None) or getattr(loss_fn, "__name__", None) or type(loss_fn).__name__)


def call_loss(loss_fn: Any, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
    """``loss_fn(model, batch)``, checked: a scalar tensor and a non-negative token count."""
    out = loss_fn(model, batch)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
        raise InvalidArgumentError(
            f"loss_fn {loss_name(loss_fn)} must return (loss_sum: Tensor, n_tokens: int), got {type(out).__name__}; "
            "see fisherstore.losses"
        )
    loss, n = out
    n = int(n.item()) if isinstance(n, torch.Tensor) else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgumentError(f"loss_fn {loss_name(loss_fn)} returned n_tokens={n!r}; it must be an int >= 0")
    if loss.numel() != 1:
        raise InvalidArgumentError(
            f"loss_fn {loss_name(loss_fn)} returned a loss of shape {tuple(loss.shape)}; it must be the scalar "
            "token-summed loss (reduction='sum')"
        )
    return loss, n
