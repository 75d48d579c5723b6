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
}


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = TINY[arch]()
    cfg._attn_implementation = "eager"
    cfg.use_cache = False
    m = T.AutoModelForCausalLM.from_config(cfg)
    m.eval()
    return m


def token_batch(n=4, seq=8, vocab=64, seed=0, lo=0, pad_last=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    if pad_last:
        mask[-1, seq // 2:] = 0  # one padded sequence
    return {"input_ids": ids, "attention_mask": mask}
