"""Every tiny model the tests build, in one place: random Llamas and an offline byte tokenizer.

Nothing here downloads anything. Models are randomly initialised with a fixed seed; tests that
need the real tokenizer take it from the embedded SmolLM2 (see ``conftest.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

BYTE_VOCAB = 256
EOS_TOKEN = "<|endoftext|>"
TINY_VOCAB = BYTE_VOCAB + 4  # bytes + a few special ids, so the model's vocab covers the tokenizer
# Small enough to run in milliseconds, odd enough to reach edge cases: 160 is not a multiple of 128
# (short last groups), GQA with 2 KV heads.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


def random_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **config):
    """A randomly initialised ``LlamaForCausalLM`` (eval mode) from ``LlamaConfig(**config)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()


def make_tiny_llama(path: Path, tokenizer_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as an HF directory at ``path``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = random_llama(seed, dtype, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **{**TINY_CONFIG, **overrides})
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: one token per UTF-8 byte, plus an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN)
    fast.pad_token = EOS_TOKEN
    fast.model_max_length = 1 << 20
    return fast


def tiny_llama(seed: int = 0, max_positions: int = 512, dtype: torch.dtype = torch.float32, init_std: float = 0.02):
    """A 2-layer random Llama whose vocab covers :func:`byte_tokenizer` (evaluation tests)."""
    model = random_llama(
        seed, dtype, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=max_positions,
        eos_token_id=BYTE_VOCAB, bos_token_id=None, pad_token_id=BYTE_VOCAB, tie_word_embeddings=False,
        initializer_range=init_std,
    )
    # The default init (std 0.02) gives nearly uniform predictions; sharper logits make
    # comparisons between models and between choices meaningful.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return model
