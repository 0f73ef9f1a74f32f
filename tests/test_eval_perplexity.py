"""Perplexity against an independent float64 loop over windows, on a tiny random Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llama
from torch import nn

from llmcomp.errors import LlmcompError
from llmcomp.eval.perplexity import compute_perplexity, plan_windows

SEED_TEXT = 1234
TEXT_CHARS = 900


def random_text(n: int = TEXT_CHARS, seed: int = SEED_TEXT) -> str:
    gen = torch.Generator().manual_seed(seed)
    words = ["model", "weight", "the", "of", "quantized", "layer", "token", "and", "a", "group"]
    picks = torch.randint(0, len(words), (n // 5,), generator=gen).tolist()
    return " ".join(words[i] for i in picks)[:n]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def text():
    return random_text()


def window_nll64(model64: nn.Module, tokens: list[int], scored_from: int) -> tuple[float, int]:
    """Sum of -log p(t_i | t_<i) in float64 for positions i >= max(scored_from, 1) of one window."""
    with torch.no_grad():
        logits = model64(input_ids=torch.tensor([tokens])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    total, count = 0.0, 0
    for i in range(max(scored_from, 1), len(tokens)):
        total -= float(logp[i - 1, tokens[i]])
        count += 1
    return total, count


def reference_nonoverlapping(model, ids: list[int], seq_len: int) -> tuple[float, int, int]:
    model64 = copy.deepcopy(model).double()
    total, count, windows = 0.0, 0, 0
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        nll, n = window_nll64(model64, ids[start : start + seq_len], 0)
        total, count, windows = total + nll, count + n, windows + 1
    return total / count, count, windows


def reference_strided(model, ids: list[int], seq_len: int, stride: int) -> tuple[float, int, int]:
    """Hugging Face's sliding-window recipe written as a plain loop."""
    model64 = copy.deepcopy(model).double()
    total, count, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        target = end - prev_end
        nll, n = window_nll64(model64, ids[begin:end], (end - begin) - target)
        total, count, windows = total + nll, count + n, windows + 1
        prev_end = end
        if end == len(ids):
            break
    return total / count, count, windows


def test_plan_windows_nonoverlapping_drops_tail():
    windows = plan_windows(1000, 128, None)
    assert len(windows) == 1000 // 128
    assert [(w.begin, w.end) for w in windows[:2]] == [(0, 128), (128, 256)]
    assert all(w.target_len == 128 for w in windows)


@pytest.mark.parametrize("n,seq_len,stride", [(1000, 128, 64), (1000, 128, 128), (777, 100, 33), (300, 300, 7)])
def test_plan_windows_strided_scores_each_token_once(n, seq_len, stride):
    windows = plan_windows(n, seq_len, stride)
    scored = []
    for w in windows:
        assert w.length <= seq_len
        scored.extend(range(w.end - w.target_len, w.end))
    assert scored == list(range(n))  # token 0 is the first window's unscored context position


@pytest.mark.parametrize("batch_size", [1, 3])
def test_nonoverlapping_matches_float64_loop(model, tokenizer, text, batch_size):
    seq_len = 96
    ids = tokenizer(text)["input_ids"]
    ref_nll, ref_tokens, ref_windows = reference_nonoverlapping(model, ids, seq_len)
    res = compute_perplexity(model, tokenizer, text, seq_len=seq_len, batch_size=batch_size, progress=False)
    assert (res.tokens, res.windows, res.seq_len, res.stride) == (ref_tokens, ref_windows, seq_len, None)
    assert res.tokens == (len(ids) // seq_len) * (seq_len - 1)
    assert res.nll == pytest.approx(ref_nll, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(ref_nll), rel=1e-4)


@pytest.mark.parametrize("stride,batch_size", [(48, 1), (64, 4)])
def test_strided_matches_float64_loop(model, tokenizer, text, stride, batch_size):
    seq_len = 96
    ids = tokenizer(text)["input_ids"]
    ref_nll, ref_tokens, ref_windows = reference_strided(model, ids, seq_len, stride)
    res = compute_perplexity(model, tokenizer, text, seq_len=seq_len, stride=stride, batch_size=batch_size,
                             progress=False)
    assert res.tokens == ref_tokens == len(ids) - 1
    assert res.windows == ref_windows
    assert res.nll == pytest.approx(ref_nll, rel=1e-5)
    assert res.stride == stride


def test_stride_is_not_ignored(model, tokenizer, text):
    # Overlapping windows give tokens more context, so the result must differ.
    a = compute_perplexity(model, tokenizer, text, seq_len=96, max_tokens=400, progress=False)
    b = compute_perplexity(model, tokenizer, text, seq_len=96, stride=48, max_tokens=400, progress=False)
    assert a.perplexity != pytest.approx(b.perplexity, rel=1e-6)


def test_deterministic_and_max_tokens(model, tokenizer, text):
    a = compute_perplexity(model, tokenizer, text, seq_len=64, max_tokens=640, progress=False)
    b = compute_perplexity(model, tokenizer, text, seq_len=64, max_tokens=640, progress=False)
    assert a == b
    assert a.windows == 10 and a.tokens == 10 * 63
    ref_nll, _, _ = reference_nonoverlapping(model, tokenizer(text)["input_ids"][:640], 64)
    assert a.nll == pytest.approx(ref_nll, rel=1e-5)


def test_seq_len_capped_at_model_context(tokenizer, text):
    small = tiny_llama(seed=5, max_positions=64)
    res = compute_perplexity(small, tokenizer, text, seq_len=4096, progress=False)
    assert res.seq_len == 64
    assert res.windows == len(tokenizer(text)["input_ids"]) // 64


def test_text_shorter_than_seq_len_is_a_clear_error(model, tokenizer):
    with pytest.raises(LlmcompError, match=r"only 11 tokens, fewer than seq_len=96.*--seq-len"):
        compute_perplexity(model, tokenizer, "short text.", seq_len=96, progress=False)


def test_bad_stride_is_a_clear_error(model, tokenizer, text):
    with pytest.raises(LlmcompError, match="stride must be between 1 and seq_len"):
        compute_perplexity(model, tokenizer, text, seq_len=64, stride=65, progress=False)


def test_runs_on_quantlinear_model(model, tokenizer, text):
    """The compressed modules really run: ppl equals a float64 loop on the dequantized weights."""
    from llmcomp import intquant
    from llmcomp.modules import QuantLinear

    qmodel = copy.deepcopy(model)
    dequant = copy.deepcopy(model)
    for layer_q, layer_d in zip(qmodel.model.layers, dequant.model.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer_q.self_attn, name)
            qw = intquant.quantize_rtn(lin.weight.detach(), bits=4, group_size=32, symmetric=True)
            qlin = QuantLinear.from_quantized(qw, None, torch.float32)
            setattr(layer_q.self_attn, name, qlin)
            getattr(layer_d.self_attn, name).weight.data.copy_(qlin.dequantized_weight(torch.float32))
    assert sum(isinstance(m, QuantLinear) for m in qmodel.modules()) == 8
    res = compute_perplexity(qmodel, tokenizer, text, seq_len=96, progress=False)
    ref_nll, ref_tokens, _ = reference_nonoverlapping(dequant, tokenizer(text)["input_ids"], 96)
    plain = compute_perplexity(model, tokenizer, text, seq_len=96, progress=False)
    assert res.tokens == ref_tokens
    assert res.nll == pytest.approx(ref_nll, rel=1e-4)
    assert res.nll != pytest.approx(plain.nll, rel=1e-6)  # quantization changed something
