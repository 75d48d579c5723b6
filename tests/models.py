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
    # -- more of the same layouts (split, T5, interleaved, block) in other architectures
    "qwen3": lambda: T.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=6),  # H*d = 24 != 32
    "gemma2": lambda: T.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=12),
    "mixtral": lambda: T.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                       num_experts_per_tok=2),
    "phi": lambda: T.PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, pad_token_id=0),  # o is `dense`
    "gpt_neox_japanese": lambda: T.GPTNeoXJapaneseConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_multiple_size=2,
                                                         pad_token_id=0),
    "mbart": lambda: T.MBartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                   decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                   eos_token_id=2, decoder_start_token_id=2),
    "marian": lambda: T.MarianConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=1,
                                     eos_token_id=2, decoder_start_token_id=1),
    "pegasus": lambda: T.PegasusConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                       decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=0,
                                       eos_token_id=1, decoder_start_token_id=0),
    "mt5": lambda: T.MT5Config(vocab_size=64, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=2,
                               num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                               decoder_start_token_id=0),
    "umt5": lambda: T.UMT5Config(vocab_size=64, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0),
    # -- the fusions of issue 20: grouped, multi-query block, interleaved by class, sharded, MLA
    # Falcon's new decoder: query_key_value is [H_kv, g+2, d] (g = 2 query heads per kv group)
    "falcon": lambda: T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_kv_heads=2, new_decoder_architecture=True, ffn_hidden_size=48),
    # the old decoder, multi-query: [H + 2, d] (all queries, then one K and one V)
    "falcon_mqa": lambda: T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         new_decoder_architecture=False, multi_query=True, ffn_hidden_size=48),
    # the old decoder, neither: interleaved [H, 3, d], with ALiBi and biases for variety
    "falcon_mha": lambda: T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         new_decoder_architecture=False, multi_query=False, alibi=True, bias=True,
                                         ffn_hidden_size=48),
    "bloom": lambda: T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4),
    "gpt_bigcode": lambda: T.GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                              multi_query=True, bos_token_id=0, eos_token_id=0),
    "gpt_bigcode_mha": lambda: T.GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                  multi_query=False, bos_token_id=0, eos_token_id=0),
    # H=8 heads in mp_num=4 shards: 2 heads of each block per shard, so the sharding is visible
    "codegen": lambda: T.CodeGenConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=8, rotary_dim=2, n_positions=64,
                                       n_ctx=64, bos_token_id=0, eos_token_id=0),
    # MLA with distinct head sizes (nope 4, rope 2, v 6: Q 6, K 4, V 6, O 6), q_lora (q_a/q_b), MoE in layer 1
    "deepseek_v3": lambda: T.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                              moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
                                              num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=8,
                                              q_lora_rank=12, qk_rope_head_dim=2, qk_nope_head_dim=4, v_head_dim=6,
                                              first_k_dense_replace=1, pad_token_id=0, bos_token_id=0,
                                              eos_token_id=0),
    # MLA without q_lora (a plain q_proj), dense MLP
    "deepseek_v2": lambda: T.DeepseekV2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                              moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
                                              num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=8,
                                              q_lora_rank=None, qk_rope_head_dim=2, qk_nope_head_dim=4,
                                              v_head_dim=6, first_k_dense_replace=2, pad_token_id=0,
                                              bos_token_id=0, eos_token_id=0),
}

# Masked LMs (AutoModelForMaskedLM): BertAttention's self/output children map without layouts=;
# bert_layouts still says the same by hand, for tests of the layouts= path.
MASKED = {
    "bert": lambda: T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=64),
    "roberta": lambda: T.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, max_position_embeddings=72, pad_token_id=1,
                                       bos_token_id=0, eos_token_id=2),
}
MASK_ID = 3

# Speech encoder-decoders (AutoModelForSpeechSeq2Seq): the encoder reads input_features, not input_ids.
# Whisper's encoder wants exactly 2 * max_source_positions frames of num_mel_bins.
SPEECH = {
    "whisper": lambda: T.WhisperConfig(vocab_size=64, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
                                       d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
                                       encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=8,
                                       max_target_positions=16, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                       decoder_start_token_id=0, begin_suppress_tokens=None,
                                       suppress_tokens=None),
}


def tiny_model(arch: str, seed: int = 0):
    """A tiny model of ``arch`` with random weights: causal LM, seq2seq LM, masked LM or speech seq2seq."""
    torch.manual_seed(seed)
    cfg = (TINY.get(arch) or MASKED.get(arch) or SPEECH[arch])()
    cfg._attn_implementation = "eager"
    cfg.use_cache = False
    if arch in MASKED:
        m = T.AutoModelForMaskedLM.from_config(cfg)
    elif arch in SPEECH:
        m = T.AutoModelForSpeechSeq2Seq.from_config(cfg)
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


def speech_batch(n=4, tgt=5, model=None, mel=8, frames=16, vocab=64, seed=0, lo=4, pad_last=True):
    """input_features [n, mel, frames] (frames = 2 * max_source_positions) and labels (-100 after a short last target)."""
    if model is not None:
        mel, frames = model.config.num_mel_bins, 2 * model.config.max_source_positions
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, mel, frames, generator=g)
    labels = torch.randint(lo, vocab, (n, tgt), generator=g)
    if pad_last:
        labels[-1, tgt // 2:] = -100
    return {"input_features": feats, "labels": labels}
