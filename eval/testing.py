"""Tiny, fully offline model + tokenizer for tests of the evaluation code.

They live in the package (not in ``tests/``) so every test module can import them the same way
whatever pytest's import mode is. Nothing here downloads anything.
"""

from __future__ import annotations

import torch

BYTE_VOCAB = 256
EOS_TOKEN = "<|endoftext|>"
TINY_VOCAB = BYTE_VOCAB + 4  # bytes + a few special ids, so the model's vocab covers the tokenizer


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


def tiny_llama(
    seed: int = 0, max_positions: int = 512, dtype: torch.dtype = torch.float32, init_std: float = 0.02
):
    """A randomly initialised 2-layer Llama whose vocab covers :func:`byte_tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=max_positions,
        eos_token_id=BYTE_VOCAB,
        bos_token_id=None,
        pad_token_id=BYTE_VOCAB,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    # The default init (std 0.02) gives nearly uniform predictions; sharper logits make
    # comparisons between models and between choices meaningful.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return model
