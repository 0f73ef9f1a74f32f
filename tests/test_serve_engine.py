"""Native engine building blocks: sampling, detokenization, batched KV cache, continuous batching."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch
from tiny_models import random_llama
from transformers import AutoTokenizer

from llmcomp.loading import resolve_source
from llmcomp.runtime.sampling import SamplingParams, sample_token, token_logprob, top_p_filter
from llmcomp.serve.detok import IncrementalDetokenizer
from llmcomp.serve.engine import Engine, QueueFullError

PROMPTS = ["Hello world", "The capital of France is a long sentence here", "a", "one two three four five six"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_source("smollm2-135m").location)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return random_llama(0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512)


def hf_greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


# -- sampling ---------------------------------------------------------------------------------
def test_top_p_filter_matches_naive_loop():
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(50, generator=gen) * 2, dim=-1).double()
    for top_p in (0.1, 0.5, 0.9, 0.999):
        got = top_p_filter(probs, top_p)
        order = sorted(range(50), key=lambda i: -probs[i].item())
        kept, mass = [], 0.0
        for i in order:
            if mass >= top_p:
                break
            kept.append(i)
            mass += probs[i].item()
        expected = torch.zeros_like(probs)
        expected[kept] = probs[kept] / probs[kept].sum()
        torch.testing.assert_close(got, expected)


def test_sampling_frequencies_follow_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    params = SamplingParams(temperature=0.7, seed=3)
    gen = torch.Generator().manual_seed(3)
    draws = 6000
    counts = torch.bincount(torch.tensor([sample_token(logits, params, gen) for _ in range(draws)]), minlength=5)
    expected = torch.softmax(logits.double() / 0.7, dim=-1)
    # 4 standard deviations of a binomial proportion
    tol = 4 * torch.sqrt(expected * (1 - expected) / draws)
    assert torch.all((counts.double() / draws - expected).abs() <= tol)


def test_greedy_and_seeded_sampling_are_deterministic():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(5))
    assert sample_token(logits, SamplingParams(temperature=0.0), torch.Generator()) == int(logits.argmax())
    params = SamplingParams(temperature=1.0, seed=11)
    a = [sample_token(logits, params, torch.Generator().manual_seed(11)) for _ in range(3)]
    b = [sample_token(logits, params, torch.Generator().manual_seed(11)) for _ in range(3)]
    assert a == b


def test_token_logprob_matches_float64_reference():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    lp = token_logprob(logits, 7, k=4)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert lp.logprob == pytest.approx(ref[7].item(), abs=1e-5)
    assert [t for t, _ in lp.top] == torch.topk(ref, 4).indices.tolist()
    assert [v for _, v in lp.top] == pytest.approx(torch.topk(ref, 4).values.tolist(), abs=1e-5)


# -- detokenization ---------------------------------------------------------------------------
def _feed(tokenizer, text: str, stop: list[str]) -> tuple[list[str], IncrementalDetokenizer]:
    prompt = tokenizer("Say:").input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt, stop)
    deltas = []
    for t in tokenizer(text, add_special_tokens=False).input_ids:
        deltas.append(detok.add(t))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return deltas, detok


def test_detokenizer_stream_equals_full_decode(tokenizer):
    text = " Hello wörld, naïve café — 東京 ok."
    deltas, detok = _feed(tokenizer, text, [])
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_cuts_at_stop_and_never_leaks_it(tokenizer):
    deltas, detok = _feed(tokenizer, " Hello world. Goodbye now", ["Goodbye", "zzz"])
    assert detok.stopped
    assert "".join(deltas) == " Hello world. "
    assert all("Good" not in d for d in deltas)


def test_detokenizer_releases_held_back_prefix(tokenizer):
    # "world" could be the start of the stop "world!" until "." arrives
    deltas, detok = _feed(tokenizer, " hello world. more", ["world!"])
    assert not detok.stopped
    assert "".join(deltas) == " hello world. more"


# -- engine -----------------------------------------------------------------------------------
def test_continuous_batching_matches_hf_generate(tiny_model, tokenizer):
    refs = [hf_greedy(tiny_model, tokenizer, p, 12) for p in PROMPTS]
    engine = Engine(tiny_model, tokenizer, max_batch_size=2, max_queue=8)  # forces joins mid-flight
    results: list = [None] * len(PROMPTS)

    def run(i: int) -> None:
        time.sleep(0.03 * i)
        results[i] = engine.generate(tokenizer(PROMPTS[i]).input_ids, SamplingParams(max_tokens=12, temperature=0))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        engine.close()
    for res, ref in zip(results, refs, strict=True):
        assert res.token_ids == ref
        assert res.finish_reason == "length"
        assert res.text == tokenizer.decode(ref, skip_special_tokens=True)


def test_eos_finishes_with_stop(tiny_model, tokenizer):
    ref = hf_greedy(tiny_model, tokenizer, PROMPTS[0], 3)
    engine = Engine(tiny_model, tokenizer)
    engine.eos_ids = {ref[2]}
    try:
        res = engine.generate(tokenizer(PROMPTS[0]).input_ids, SamplingParams(max_tokens=10, temperature=0))
    finally:
        engine.close()
    assert res.token_ids == ref[:3] and res.finish_reason == "stop"


def test_cancel_frees_slot_and_queue_is_bounded(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer, max_batch_size=1, max_queue=1, context_length=512)
    long = SamplingParams(max_tokens=400, temperature=0)
    ids = tokenizer(PROMPTS[1]).input_ids
    events: queue.Queue = queue.Queue()
    try:
        first = engine.submit(ids, long, events.put)
        second = engine.submit(ids, long, lambda ev: None)
        with pytest.raises(QueueFullError) as info:
            engine.submit(ids, long, lambda ev: None)
        assert info.value.retry_after >= 1
        events.get(timeout=30)  # the first request is running
        first.cancel()
        second.cancel()
        while True:
            ev = events.get(timeout=30)
            if ev.finished:
                break
        assert ev.finish_reason == "cancelled" and ev.completion_tokens < 400
        deadline = time.monotonic() + 10
        while (engine.num_active or engine.num_waiting) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_active == 0 and engine.num_waiting == 0
        res = engine.generate(ids, SamplingParams(max_tokens=4, temperature=0), timeout=30)
        assert len(res.token_ids) == 4
    finally:
        engine.close()


def test_engine_survives_a_failing_forward(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer)
    calls = {"n": 0}

    def boom(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated out of memory")

    # The embedding runs first in every forward (the lean runtime forward and the HF graph alike).
    hook = tiny_model.model.embed_tokens.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="simulated out of memory"):
            engine.generate(tokenizer("x").input_ids, SamplingParams(max_tokens=3, temperature=0), timeout=30)
        res = engine.generate(tokenizer("x").input_ids, SamplingParams(max_tokens=3, temperature=0), timeout=30)
        assert len(res.token_ids) == 3
    finally:
        hook.remove()
        engine.close()


def test_chunked_prefill_interleaves_with_running_streams(tiny_model, tokenizer):
    """A long prompt is prefilled 3 tokens per iteration, inside the decode steps of the streams
    already running; sequences of different lengths leave at different steps (their slots are
    compacted, the half-prefilled prompt follows them): every output still equals HF's greedy
    continuation."""
    long_prompt = " ".join(["word"] * 40)
    cases = [(PROMPTS[0], 20), (long_prompt, 6), (PROMPTS[3], 3), (PROMPTS[1], 9)]
    refs = [hf_greedy(tiny_model, tokenizer, p, n) for p, n in cases]
    engine = Engine(tiny_model, tokenizer, max_batch_size=3, max_queue=8, prefill_chunk=3)
    events: list[queue.Queue] = [queue.Queue() for _ in cases]
    chunks_seen: list[int] = []
    hook = tiny_model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: chunks_seen.append(args[0].numel()))
    try:
        engine.submit_many([(tokenizer(p).input_ids, SamplingParams(max_tokens=n, temperature=0), q.put)
                            for (p, n), q in zip(cases, events, strict=True)])
        outs = []
        for q in events:
            ids = []
            while True:
                ev = q.get(timeout=60)
                ids.extend(ev.token_ids)
                if ev.finished:
                    assert ev.finish_reason == "length" and ev.error is None
                    break
            outs.append(ids)
    finally:
        hook.remove()
        engine.close()
    assert outs == refs
    # Every forward holds at most one 3-token chunk plus the other two slots' decode rows, and some
    # held both (a mixed step); the 40-token prompt never ran whole.
    assert max(chunks_seen) == 5 and engine.runner.kv_cache_bytes > 0


def test_engine_rejects_a_prompt_longer_than_the_context(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer, context_length=8)
    try:
        with pytest.raises(RuntimeError, match="maximum context is 8"):
            engine.generate(list(range(1, 9)), SamplingParams(max_tokens=2, temperature=0), timeout=30)
        res = engine.generate(list(range(1, 6)), SamplingParams(max_tokens=10, temperature=0), timeout=30)
        assert res.finish_reason == "length" and len(res.token_ids) == 3  # 5 + 3 fills the 8 positions
    finally:
        engine.close()


def test_failed_compile_falls_back_to_eager(tiny_model, tokenizer, monkeypatch):
    """A machine without a working compiler still serves: one progress line, then eager decode."""
    from llmcomp.runtime import runner as runner_module

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("simulated: no C++ compiler found")
        return run

    monkeypatch.setattr(runner_module.torch, "compile", broken_compile)
    lines: list[str] = []
    engine = Engine(tiny_model, tokenizer, max_batch_size=2, compile=True, progress=lines.append)
    try:
        assert not engine.runner.compiled and any("decoding eagerly" in line for line in lines)
        res = engine.generate(tokenizer(PROMPTS[0]).input_ids, SamplingParams(max_tokens=4, temperature=0), 30)
        assert res.token_ids == hf_greedy(tiny_model, tokenizer, PROMPTS[0], 4)
    finally:
        engine.close()


def test_simultaneous_short_prompts_are_admitted_in_one_forward(tiny_model, tokenizer):
    """Four requests arriving together start in one forward (their prompts share one step), and
    each still equals HF's greedy continuation."""
    refs = [hf_greedy(tiny_model, tokenizer, p, 5) for p in PROMPTS]
    engine = Engine(tiny_model, tokenizer, max_batch_size=4, max_queue=8)
    forwards: list[int] = []
    hook = tiny_model.model.embed_tokens.register_forward_hook(lambda m, args, out: forwards.append(args[0].numel()))
    events: list[queue.Queue] = [queue.Queue() for _ in PROMPTS]
    try:
        engine.submit_many([(tokenizer(p).input_ids, SamplingParams(max_tokens=5, temperature=0), q.put)
                            for p, q in zip(PROMPTS, events, strict=True)])
        outs = []
        for q in events:
            ids = []
            while not (ev := q.get(timeout=60)).finished:
                ids.extend(ev.token_ids)
            outs.append(ids + ev.token_ids)
    finally:
        hook.remove()
        engine.close()
    assert outs == refs
    assert forwards[0] == sum(len(tokenizer(p).input_ids) for p in PROMPTS)  # all four prompts at once
    assert len(forwards) == 5  # then four decode steps for the four sequences together
