"""Tiny Hugging Face models built from configs with random weights (no downloads)."""

import torch
import transformers as T

T.logging.set_verbosity_error()

TINY = {
    "llama": lambda: T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: T.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2),
    "gemma": lambda: T.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=12),
    "gpt2": lambda: T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                 bos_token_id=0, eos_token_id=0),
    "pythia": lambda: T.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4),
    "phi3": lambda: T.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2),
    "opt": lambda: T.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                               num_attention_heads=4, word_embed_proj_dim=32),
    # encoder-decoders (AutoModelForSeq2SeqLM): 2 encoder + 2 decoder layers
    "bart": lambda: T.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                 decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                 eos_token_id=2, decoder_start_token_id=2),
    # d_kv=6: the inner dimension H*d = 24 is not d_model = 32
    "t5": lambda: T.T5Config(vocab_size=64, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=2,
                             num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                             decoder_start_token_id=0),
}

# Masked LMs (AutoModelForMaskedLM). Not in TINY: layouts_from_model does not recognise BERT's
# attention, so they are collected through layouts= (see bert_layouts).
MASKED = {
    "bert": lambda: T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=64),
}
MASK_ID = 3


def tiny_model(arch: str, seed: int = 0):
    """A tiny model of ``arch`` with random weights: causal LM, seq2seq LM or masked LM by its config."""
    torch.manual_seed(seed)
    cfg = (TINY.get(arch) or MASKED[arch])()
    cfg._attn_implementation = "eager"
    cfg.use_cache = False
    if arch in MASKED:
        m = T.AutoModelForMaskedLM.from_config(cfg)
    elif cfg.is_encoder_decoder:
        m = T.AutoModelForSeq2SeqLM.from_config(cfg)
    else:
        m = T.AutoModelForCausalLM.from_config(cfg)
    m.eval()
    return m


def bert_layouts(model):
    """BERT's q/k/v (attention.self.query/key/value) and o (attention.output.dense), said by hand."""
    from fisherstore import ParamLayout

    cfg = model.config
    H, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    out = {}
    for i in range(cfg.num_hidden_layers):
        pre = f"bert.encoder.layer.{i}.attention"
        for child, kind in (("self.query", "q"), ("self.key", "k"), ("self.value", "v"), ("output.dense", "o")):
            out[f"{pre}.{child}.weight"] = ParamLayout.attention(kind, H, d)
    return out


def seq2seq_batch(n=4, src=7, tgt=5, vocab=64, seed=0, lo=4, pad_last=True):
    """input_ids/attention_mask of the source, labels of the target (-100 after a short last target)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, vocab, (n, src), generator=g)
    mask = torch.ones(n, src, dtype=torch.long)
    labels = torch.randint(lo, vocab, (n, tgt), generator=g)
    if pad_last:
        mask[-1, src // 2:] = 0
        labels[-1, tgt // 2:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def masked_batch(n=4, seq=8, vocab=64, seed=0, lo=4):
    """input_ids with every third position masked; labels hold the original tokens there, -100 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    orig = torch.randint(lo, vocab, (n, seq), generator=g)
    masked = torch.zeros(n, seq, dtype=torch.bool)
    masked[:, (seed % 3)::3] = True
    return {"input_ids": orig.masked_fill(masked, MASK_ID), "attention_mask": torch.ones(n, seq, dtype=torch.long),
            "labels": orig.masked_fill(~masked, -100)}


def token_batch(n=4, seq=8, vocab=64, seed=0, lo=0, pad_last=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    if pad_last:
        mask[-1, seq // 2:] = 0  # one padded sequence
    return {"input_ids": ids, "attention_mask": mask}
