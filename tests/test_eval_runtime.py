"""lm-eval scoring through the runtime (``RuntimeLM``), checked against independent float64 loops.

References here re-implement what lm-eval scores: HFLM's context/continuation split (trailing
context spaces moved to the continuation, the whole string encoded and split at the context
length, an empty context replaced by the prefix token), one full HF forward of context +
continuation[:-1], log-softmax, sum over the continuation; rolling windows written out by hand.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lm_eval.api.instance import Instance
from tiny_models import byte_tokenizer, tiny_llama
from typer.testing import CliRunner

from llmcomp.eval.runtime_lm import RuntimeLM

TOL = 1e-9  # float64 end to end
REQUESTS = [  # interleaved contexts, so scoring order (longest context first) differs from request order
    ("The film was", " good"),
    ("A", " bad plot"),
    ("The film was", " quite boring indeed"),
    ("", "hello"),  # empty context: scored after the prefix (EOS) token
    ("Answer: ", "yes"),  # trailing space moves to the continuation
    ("The film was quite long and the actors were", " fun"),
    ("The film was", " good"),  # a repeat
    ("A", " b"),
    ("The film was quite long and the actors were", " not very good at all"),
]


@pytest.fixture(scope="module")
def tiny64():
    return tiny_llama(seed=0, init_std=0.3).double(), byte_tokenizer()


def instances(pairs: list[tuple[str, str]], kind: str = "loglikelihood") -> list[Instance]:
    return [Instance(kind, {}, pair, i) for i, pair in enumerate(pairs)]


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """HFLM's tokenization of one request, written out."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tokenizer.encode(context)
    return ctx, tokenizer.encode(context + continuation)[len(ctx):]


def reference(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One full forward of ctx + cont[:-1]; float64 log-softmax summed over the continuation."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1:].double()
    logp = torch.log_softmax(logits, dim=-1)
    ll = sum(float(logp[j, t]) for j, t in enumerate(cont))
    return ll, all(int(logits[j].argmax()) == t for j, t in enumerate(cont))


@pytest.mark.parametrize("slots", [1, 3, 16])
def test_loglikelihood_equals_float64_reference(tiny64, slots):
    model, tokenizer = tiny64
    got = RuntimeLM(model, tokenizer, slots=slots, progress=False).loglikelihood(instances(REQUESTS))
    assert len(got) == len(REQUESTS)
    for (context, continuation), (ll, greedy) in zip(REQUESTS, got, strict=True):
        ref_ll, ref_greedy = reference(model, *split_pair(tokenizer, context, continuation))
        assert ll == pytest.approx(ref_ll, abs=TOL), (context, continuation)
        assert greedy == ref_greedy


def test_tokenization_is_hflms(tiny64):
    """The context/continuation split is lm-eval's own, token for token (HFLM as the oracle)."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny64
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    lm = RuntimeLM(model, tokenizer, progress=False)
    for context, continuation in REQUESTS:
        if context:
            assert lm._encode_pair(context, continuation) == hf._encode_pair(context, continuation)
            assert lm._encode_pair(context, continuation) == split_pair(tokenizer, context, continuation)
    assert (lm.prefix_token_id, lm.eot_token_id, lm.max_length) == (hf.prefix_token_id, hf.eot_token_id,
                                                                    hf.max_length)


def test_is_greedy_true_for_the_argmax_continuation(tiny64):
    model, tokenizer = tiny64
    ctx = tokenizer.encode("The film was")
    greedy = []
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(model(input_ids=torch.tensor([ctx + greedy])).logits[0, -1].argmax()))
    other = greedy[:2] + [(greedy[2] + 1) % 256] + greedy[3:]
    lm = RuntimeLM(model, tokenizer, slots=2, progress=False)
    (ll, is_greedy), (ll_other, is_greedy_other) = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)])
    assert is_greedy and not is_greedy_other
    assert ll == pytest.approx(reference(model, ctx, greedy)[0], abs=TOL)
    assert ll_other == pytest.approx(reference(model, ctx, other)[0], abs=TOL)


def test_results_follow_request_order(tiny64):
    model, tokenizer = tiny64
    lm = RuntimeLM(model, tokenizer, slots=3, progress=False)
    forward = lm.loglikelihood(instances(REQUESTS))
    order = [5, 0, 8, 3, 1, 7, 2, 6, 4]
    permuted = lm.loglikelihood(instances([REQUESTS[i] for i in order]))
    assert [p[0] for p in permuted] == pytest.approx([forward[i][0] for i in order], abs=TOL)
    assert [p[1] for p in permuted] == [forward[i][1] for i in order]


def test_shared_context_is_computed_once(tiny64):
    """Embedded tokens = each distinct context once + every continuation but its last token
    (HFLM embeds the whole context again for every choice)."""
    model, tokenizer = tiny64
    seen: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(args[0].numel()))
    try:
        RuntimeLM(model, tokenizer, slots=1, progress=False).loglikelihood(instances(REQUESTS))
    finally:
        hook.remove()
    splits = [split_pair(tokenizer, *r) for r in REQUESTS]
    contexts = {tuple(c) for c, _ in splits}
    scored = {(tuple(c), tuple(k)) for c, k in splits}  # a repeated request is scored once
    expected = sum(map(len, contexts)) + sum(len(k) - 1 for _, k in scored)
    naive = sum(len(c) + len(k) - 1 for c, k in splits)
    assert sum(seen) == expected < naive


def test_one_token_choices_need_no_forward_of_their_own(tiny64):
    """sst2's shape: two one-token choices per context; one padded forward over all contexts."""
    model, tokenizer = tiny64
    pairs = [(f"sentence {i}\nAnswer:", choice) for i in range(5) for choice in ("a", "b")]
    calls: list[tuple[int, ...]] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape)))
    try:
        got = RuntimeLM(model, tokenizer, slots=8, progress=False).loglikelihood(instances(pairs))
    finally:
        hook.remove()
    assert calls == [(5, len(tokenizer.encode("sentence 0\nAnswer:")))]
    for pair, (ll, greedy) in zip(pairs, got, strict=True):
        assert (ll, greedy) == pytest.approx(reference(model, *split_pair(tokenizer, *pair)), abs=TOL)


def rolling_reference(model, tokens: list[int], prefix: int, max_len: int) -> float:
    """Disjoint windows predicting tokens [0, L), [L, 2L), ..., each from up to L inputs ending
    right before its last prediction (the last window keeps a full L-token input)."""
    ids = [prefix, *tokens]
    total = 0.0
    for start in range(0, len(tokens), max_len):
        end = min(start + max_len, len(tokens))
        lo = max(0, end - max_len)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids[lo:end]])).logits[0].double(), dim=-1)
        total += sum(float(logp[j - lo, ids[j + 1]]) for j in range(start, end))
    return total


@pytest.mark.parametrize("slots", [1, 4])
def test_loglikelihood_rolling_equals_hand_written_windows(slots):
    model, tokenizer = tiny_llama(seed=2, max_positions=32, init_std=0.3).double(), byte_tokenizer()
    texts = ["short text.", "a" * 32, "the quick brown fox jumps over the lazy dog, " * 3]
    lm = RuntimeLM(model, tokenizer, slots=slots, progress=False)
    assert lm.max_length == 32
    got = lm.loglikelihood_rolling(instances([(t,) for t in texts], "loglikelihood_rolling"))
    for text, ll in zip(texts, got, strict=True):
        assert ll == pytest.approx(rolling_reference(model, tokenizer.encode(text), tokenizer.eos_token_id, 32),
                                   abs=TOL)


def test_too_long_context_is_left_truncated_as_hflm_does():
    """HFLM feeds (context + continuation)[-(L + 1):][:-1]; the continuation is never cut."""
    model, tokenizer = tiny_llama(seed=3, max_positions=32, init_std=0.3).double(), byte_tokenizer()
    ctx, cont = tokenizer.encode("x" * 20 + "a long context that overflows"), tokenizer.encode(" the end")
    ((ll, greedy),) = RuntimeLM(model, tokenizer, progress=False)._loglikelihood_tokens([(None, ctx, cont)])
    keep = 32 + 1 - len(cont)
    assert (ll, greedy) == pytest.approx(reference(model, ctx[-keep:], cont), abs=TOL)


def test_hf_fallback_architecture_scores_the_same():
    """A model the lean forward does not cover (GPT-2) runs through the HF graph in the runner."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=260, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       initializer_range=0.3)).double().eval()
    tokenizer = byte_tokenizer()
    lm = RuntimeLM(model, tokenizer, slots=3, progress=False)
    got = lm.loglikelihood(instances(REQUESTS))
    for (context, continuation), (ll, greedy) in zip(REQUESTS, got, strict=True):
        assert (ll, greedy) == pytest.approx(reference(model, *split_pair(tokenizer, context, continuation)),
                                             abs=TOL)


def test_generate_until_matches_hf_greedy(tiny64):
    model, tokenizer = tiny64
    prompts = ["The film was", "A much longer prompt about the plot"]
    with torch.no_grad():
        hf = [model.generate(torch.tensor([tokenizer.encode(p)]), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, len(tokenizer.encode(p)):].tolist()
              for p in prompts]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in hf]
    stop = texts[1][5:7]  # a stop string inside the second completion cuts it there
    lm = RuntimeLM(model, tokenizer, slots=2, progress=False)
    got = lm.generate_until(instances([(p, {"until": [stop], "max_gen_toks": 12, "do_sample": False})
                                       for p in prompts], "generate_until"))
    assert got == [texts[0].split(stop)[0], texts[1].split(stop)[0]]
    assert len(got[1]) < len(texts[1])


def test_cli_sst2_same_accuracy_as_hflm(tmp_path, monkeypatch):
    """``llmcomp eval --tasks sst2,wikitext`` with the runtime (default) and with ``--engine hf``."""
    from llmcomp.cli.main import app

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = tiny_llama(seed=0, init_std=0.3), byte_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    words = ["the", "film", "was", "good", "bad", "plot", "not", "fun"]
    gen = torch.Generator().manual_seed(4)
    sentences = [" ".join(words[i] for i in torch.randint(0, 8, (int(n),), generator=gen).tolist())
                 for n in torch.randint(3, 12, (24,), generator=gen)]
    for task, rows in (("sst2", [{"sentence": s, "label": i % 2} for i, s in enumerate(sentences)]),
                       ("wikitext", [{"page": " ".join(sentences[i:i + 8])} for i in (0, 8, 16)])):
        (tmp_path / "data" / task).mkdir(parents=True)
        name = "validation.jsonl" if task == "sst2" else "test.jsonl"
        (tmp_path / "data" / task / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for engine in ("native", "hf"):
        out = tmp_path / f"{engine}.json"
        result = CliRunner().invoke(app, ["eval", str(tmp_path / "model"), "--tasks", "sst2,wikitext", "--data-dir",
                                          str(tmp_path / "data"), "--engine", engine, "--slots", "4",
                                          "--no-progress", "-o", str(out)])
        assert result.exit_code == 0, result.output
        results[engine] = json.loads(out.read_text())["models"][0]["results"]
    native, hf = results["native"], results["hf"]
    assert native["sst2"]["samples"] == hf["sst2"]["samples"] == 24
    assert native["sst2"]["acc"] == hf["sst2"]["acc"]
    assert 0.0 < native["sst2"]["acc"] < 1.0
    assert native["wikitext"]["word_perplexity"] == pytest.approx(hf["wikitext"]["word_perplexity"], rel=1e-5)


def test_float32_model_scores_close_to_float64(tiny64):
    """The runtime in the model's own dtype: float32 log-likelihoods within float32 rounding."""
    model64, tokenizer = tiny64
    model32 = copy.deepcopy(model64).float()
    got = RuntimeLM(model32, tokenizer, slots=4, progress=False).loglikelihood(instances(REQUESTS))
    for (context, continuation), (ll, _) in zip(REQUESTS, got, strict=True):
        ref, _ = reference(model64, *split_pair(tokenizer, context, continuation))
        assert ll == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padded_continuations_reaching_the_last_position(arch):
    """Two contexts batched, one continuation ending exactly at the model's last position while
    padded to the other's width: pad tokens must not overwrite it."""
    tokenizer = byte_tokenizer()
    if arch == "llama":
        model = tiny_llama(seed=4, max_positions=32, init_std=0.3).double()
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=260, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                           initializer_range=0.3)).double().eval()
    long_ctx, short_ctx = list(range(65, 85)), list(range(97, 102))  # 20 and 5 tokens
    requests = [(None, long_ctx, list(range(40, 53))),  # 20 + 13 - 1 = 32 positions: the whole context
                (None, short_ctx, list(range(40, 60)))]  # a wider row (19 tokens) from position 5
    got = RuntimeLM(model, tokenizer, slots=2, progress=False)._loglikelihood_tokens(requests)
    for (_, ctx, cont), score in zip(requests, got, strict=True):
        assert score == pytest.approx(reference(model, ctx, cont), abs=TOL)
