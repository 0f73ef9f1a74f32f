"""The runtime (slot KV cache, lean Llama forward, runner) against full HF forwards in float64."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_CONFIG, random_llama

from llmcomp.runtime import ModelRunner, batch_buckets
from llmcomp.runtime.llama import unsupported_reason

VOCAB = 300


@pytest.fixture(scope="module")
def model():
    return random_llama(0, torch.float64, vocab_size=VOCAB, **TINY_CONFIG)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Reference: one HF forward over the whole sequence, no cache."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("lean", [True, False])
def test_chunked_prefill_then_decode_matches_full_forward(model, lean: bool) -> None:
    ids = random_ids(13, 1)
    runner = ModelRunner(model, max_batch_size=3, max_model_len=32, prefill_chunk=4, lean=lean)
    assert runner.backend.startswith("lean" if lean else "hf")
    ref = full_logits(model, ids)
    torch.testing.assert_close(runner.prefill(2, ids[:9], logits_for_all=True), ref[:9], rtol=0, atol=1e-10)
    for t in range(9, 13):  # slot 2 is the only sequence: move it to slot 0 first
        if t == 9:
            runner.move(2, 0)
        logits = runner.decode([ids[t]])
        torch.testing.assert_close(logits[0], ref[t], rtol=0, atol=1e-10)
    assert runner.lengths[:3] == [13, 0, 0]


def test_batched_decode_with_ragged_lengths_and_pad_rows(model) -> None:
    """Three sequences of different lengths decode together in a bucket of 4 (one pad row)."""
    seqs = [random_ids(n, 10 + n) for n in (5, 11, 8)]
    runner = ModelRunner(model, max_batch_size=4, max_model_len=24)
    assert runner.bucket(3) == 4
    for slot, s in enumerate(seqs):
        runner.prefill(slot, s[:-3])
    for step in range(3, 0, -1):
        logits = runner.decode([s[-step] for s in seqs])
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i], full_logits(model, s)[len(s) - step], rtol=0, atol=1e-10)


def test_move_keeps_a_sequence_and_rewind_reuses_a_context(model) -> None:
    context, a, b = random_ids(7, 3), random_ids(3, 4), random_ids(5, 5)
    runner = ModelRunner(model, max_batch_size=2, max_model_len=16)
    runner.prefill(1, context)
    got_a = runner.prefill(1, a, logits_for_all=True)
    runner.rewind(1, len(context))
    got_b = runner.prefill(1, b, logits_for_all=True)
    torch.testing.assert_close(got_a, full_logits(model, context + a)[7:], rtol=0, atol=1e-10)
    torch.testing.assert_close(got_b, full_logits(model, context + b)[7:], rtol=0, atol=1e-10)
    runner.move(1, 0)
    assert runner.lengths == [12, 0]
    nxt = random_ids(1, 6)
    torch.testing.assert_close(runner.decode(nxt)[0], full_logits(model, context + b + nxt)[-1], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="rewind"):
        runner.rewind(0, 20)


def test_score_batch_continues_several_slots_in_one_forward(model) -> None:
    contexts = [random_ids(n, 20 + n) for n in (4, 9)]
    rows = [random_ids(6, 30), random_ids(2, 31)]
    runner = ModelRunner(model, max_batch_size=3, max_model_len=20)
    for slot, c in enumerate(contexts, start=1):
        runner.prefill(slot, c)
    out = runner.score_batch([1, 2], rows)
    for c, r, got in zip(contexts, rows, out, strict=True):
        torch.testing.assert_close(got, full_logits(model, c + r)[len(c):], rtol=0, atol=1e-10)
    assert runner.lengths[1:] == [10, 11]
    with pytest.raises(ValueError, match="consecutive"):
        runner.score_batch([0, 2], rows)


def test_length_limits_are_errors(model) -> None:
    runner = ModelRunner(model, max_batch_size=1, max_model_len=8)
    with pytest.raises(ValueError, match="maximum model length"):
        runner.prefill(0, random_ids(9, 0))
    runner.prefill(0, random_ids(8, 0))
    with pytest.raises(ValueError, match="maximum model length"):
        runner.decode([1])
    with pytest.raises(ValueError, match="1..1"):
        runner.decode([1, 2])


def test_compiled_decode_matches_eager_across_lengths(model) -> None:
    """One graph per bucket; the attended length is dynamic, so growing sequences do not recompile."""
    ids = random_ids(12, 7)
    eager = ModelRunner(model, max_batch_size=2, max_model_len=16)
    compiled = ModelRunner(model, max_batch_size=2, max_model_len=16, compile=True, compile_backend="eager")
    assert compiled.compiled
    compiled.warm_up()
    for runner in (eager, compiled):
        runner.prefill(0, ids[:4])
        runner.prefill(1, ids[:6])
    torch._dynamo.utils.counters.clear()
    for t in range(4, 10):
        want = eager.decode([ids[t], ids[t + 2]])
        torch.testing.assert_close(compiled.decode([ids[t], ids[t + 2]]), want, rtol=0, atol=1e-10)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # nothing recompiled


def test_decode_attention_matches_naive_loops(model) -> None:
    """The compiled step's single-query attention (grouped heads, masked keys, float32 at least)
    against a per-row, per-head softmax loop in float64; bf16 inputs within bf16 rounding."""
    from llmcomp.runtime.kv_cache import SlotKVCache
    from llmcomp.runtime.llama import LlamaForward

    forward = LlamaForward(model, SlotKVCache(3, 2, 2, 16, 9, torch.float64, torch.device("cpu")))
    gen = torch.Generator().manual_seed(5)
    q, keys, values = (torch.randn(shape, generator=gen, dtype=torch.float64)
                       for shape in ((3, 4, 1, 16), (3, 2, 7, 16), (3, 2, 7, 16)))
    lengths = [7, 3, 1]
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None])[:, None, None]  # [B, 1, 1, L]
    want = torch.empty_like(q)
    for b, n in enumerate(lengths):
        for h in range(4):
            kv = h // 2  # 4 query heads on 2 key/value heads
            w = torch.softmax(keys[b, kv, :n] @ q[b, h, 0] / 16 ** 0.5, dim=0)
            want[b, h, 0] = w @ values[b, kv, :n]
    torch.testing.assert_close(forward._decode_attention(q, keys, values, mask), want, rtol=0, atol=1e-12)
    got = forward._decode_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=0.02, atol=0.02)


def test_buckets_and_unsupported_architectures(model) -> None:
    assert batch_buckets(1) == [1] and batch_buckets(6) == [1, 2, 4, 6] and batch_buckets(8) == [1, 2, 4, 8]
    assert unsupported_reason(model, 64) is None
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32)).eval()
    reason = unsupported_reason(gpt2, 32)
    assert reason is not None and "gpt2" in reason
    runner = ModelRunner(gpt2, max_batch_size=2, max_model_len=32)
    assert runner.backend.startswith("hf") and runner.kv_cache_bytes == 0
    ids = random_ids(6, 8)
    runner.prefill(0, ids[:5])
    with torch.no_grad():
        ref = gpt2(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(runner.decode(ids[5:])[0], ref, rtol=1e-5, atol=1e-5)


def test_hf_fallback_scores_padded_rows_up_to_the_last_absolute_position() -> None:
    """GPT-2 has n_positions embeddings only: pad columns (at the spare position n_positions) must
    never reach it, and a row ending at the very last position is scored like a plain forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16)).eval()
    runner = ModelRunner(gpt2, max_batch_size=2, max_model_len=16)
    ids = random_ids(16, 11)
    runner.prefill(0, ids[:10])
    runner.prefill(1, ids[:4])
    rows = [ids[10:], ids[4:6]]  # the first row ends at position 15, the second is padded by 4 columns
    got = runner.score_batch([0, 1], rows)
    with torch.no_grad():
        full = gpt2(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got[0], full[10:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], full[4:6], rtol=1e-5, atol=1e-5)


def test_kv_cache_size_is_bounded_by_slots_times_length(model) -> None:
    runner = ModelRunner(model, max_batch_size=3, max_model_len=40)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    want = 2 * c.num_hidden_layers * 3 * c.num_key_value_heads * 41 * head_dim * 8  # float64, one spare position
    assert runner.kv_cache_bytes == want


def test_lean_forward_covers_qwen2_biases_and_mistral(model) -> None:
    """Qwen2 has q/k/v biases, Mistral a sliding window (longer than the runner's length here)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(3)
    models = [Qwen2ForCausalLM(Qwen2Config(**small)), MistralForCausalLM(MistralConfig(sliding_window=32, **small))]
    for m in models:
        m = m.double().eval()
        with torch.no_grad():  # non-zero biases, so a forward that ignored them would fail
            for layer in m.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    if proj.bias is not None:
                        proj.bias.normal_()
        runner = ModelRunner(m, max_batch_size=1, max_model_len=24)
        assert runner.backend == "lean", runner.backend
        ids = random_ids(10, 9)
        runner.prefill(0, ids[:9])
        torch.testing.assert_close(runner.decode(ids[9:])[0], full_logits(m, ids)[-1], rtol=0, atol=1e-10)
    long_window = ModelRunner(models[1].double(), max_batch_size=1, max_model_len=64)
    assert long_window.backend.startswith("hf") and "sliding" in long_window.backend


def test_quantized_siblings_run_fused_and_match_hf(model) -> None:
    """RTN int4 (one layout for q/k/v and gate/up): the lean forward fuses them into one call per
    group, and its logits equal the HF graph running the same QuantLinear modules."""
    import copy

    from llmcomp.modules.quant_linear import QuantLinear
    from llmcomp.passes import pass_registry
    from llmcomp.passes.base import apply_to_layer
    from llmcomp.runtime.fuse import fuse_quant_linears

    quantized = copy.deepcopy(model).float()
    cls = pass_registry()["rtn"]
    rtn = cls(cls.Config.model_validate({"bits": 4, "group_size": 32, "symmetric": False}))
    for i, layer in enumerate(quantized.model.layers):
        apply_to_layer(rtn, layer, f"model.layers.{i}")
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, QuantLinear)
    runner = ModelRunner(quantized, max_batch_size=2, max_model_len=16)
    assert all(f is not None for f in runner.forward.qkv + runner.forward.gate_up)
    ids = random_ids(9, 12)
    runner.prefill(0, ids[:8])
    with torch.no_grad():
        ref = quantized(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(runner.decode(ids[8:])[0], ref, rtol=1e-5, atol=1e-5)
    attn = quantized.model.layers[0].self_attn
    assert fuse_quant_linears([attn.q_proj, quantized.model.layers[0].mlp.down_proj]) is None  # K differs
    assert fuse_quant_linears([model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj]) is None


def test_compiled_quantized_step_is_one_graph_per_bucket(model) -> None:
    """Kernel selection and repacking run eagerly first, so dynamo captures each bucket's step
    whole: no graph break, no recompilation per weight shape."""
    import copy

    from llmcomp.passes import pass_registry
    from llmcomp.passes.base import apply_to_layer

    quantized = copy.deepcopy(model).float()
    cls = pass_registry()["rtn"]
    rtn = cls(cls.Config.model_validate({"bits": 8, "group_size": -1}))
    for i, layer in enumerate(quantized.model.layers):
        apply_to_layer(rtn, layer, f"model.layers.{i}")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner = ModelRunner(quantized, max_batch_size=2, max_model_len=16, compile=True, compile_backend="eager")
    runner.warm_up()
    runner.prefill(0, random_ids(5, 2))
    for t in range(3):
        runner.decode([t + 1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # buckets 1 and 2
    assert not torch._dynamo.utils.counters["graph_break"]


def test_several_compiled_runners_keep_every_bucket_compiled(model) -> None:
    """Runners share one compiled function: three runners of four buckets (12 graphs: their cache
    shapes differ) exceed dynamo's default limit of 8 graphs per function, past which it would
    silently run eagerly."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runners = [ModelRunner(model, max_batch_size=8, max_model_len=length, compile=True, compile_backend="eager")
               for length in (18, 17, 16)]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for runner in runners:
            runner.warm_up()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 12  # 3 runners x buckets 1, 2, 4, 8
    ids = random_ids(6, 3)
    eager = ModelRunner(model, max_batch_size=8, max_model_len=16)
    eager.prefill(0, ids[:5])
    runners[-1].prefill(0, ids[:5])
    torch.testing.assert_close(runners[-1].decode([ids[5]]), eager.decode([ids[5]]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("lean", [True, False])
def test_decode_with_prefill_matches_separate_forwards(model, lean: bool) -> None:
    """A decode step of two sequences fused with two prefill chunks (the second chunk of one
    prompt, the whole of another) gives the logits of full forwards for all four."""
    seqs = [random_ids(n, 40 + n) for n in (6, 9)]
    prompt, short = random_ids(12, 50), random_ids(4, 51)
    runner = ModelRunner(model, max_batch_size=4, max_model_len=24, lean=lean)
    for slot, s in enumerate(seqs):
        runner.prefill(slot, s[:-1])
    runner.prefill(2, prompt[:7])
    dec, lasts = runner.decode_with_prefill([s[-1] for s in seqs], [(2, prompt[7:12]), (3, short)])
    for i, s in enumerate(seqs):
        torch.testing.assert_close(dec[i], full_logits(model, s)[-1], rtol=0, atol=1e-10)
    torch.testing.assert_close(lasts[0], full_logits(model, prompt)[-1], rtol=0, atol=1e-10)
    torch.testing.assert_close(lasts[1], full_logits(model, short)[-1], rtol=0, atol=1e-10)
    assert runner.lengths == [6, 9, 12, 4]
    with pytest.raises(ValueError, match="free slot"):
        runner.decode_with_prefill([1, 2, 3], [(1, [4])])


def test_prefill_chunks_without_decode_rows(model) -> None:
    runner = ModelRunner(model, max_batch_size=2, max_model_len=16)
    a, b = random_ids(5, 60), random_ids(3, 61)
    dec, lasts = runner.decode_with_prefill([], [(0, a), (1, b)])
    assert dec.shape[0] == 0
    torch.testing.assert_close(lasts[0], full_logits(model, a)[-1], rtol=0, atol=1e-10)
    torch.testing.assert_close(lasts[1], full_logits(model, b)[-1], rtol=0, atol=1e-10)


def test_warm_up_leaves_live_sequences_untouched(model) -> None:
    """Warming up (compiling) after a prompt is in its slot must not change what it decodes:
    generate(compile=True) prefills first and compiles after."""
    ids = random_ids(10, 70)
    runner = ModelRunner(model, max_batch_size=2, max_model_len=16, compile=True, compile_backend="eager")
    runner.prefill(0, ids[:9])
    runner.warm_up()
    assert runner.lengths == [9, 0]
    torch.testing.assert_close(runner.decode(ids[9:])[0], full_logits(model, ids)[-1], rtol=0, atol=1e-10)
