"""generate() on the runtime against transformers' own generate, and the sampler against closed forms."""

from __future__ import annotations

import json

import pytest
import torch

from llmcomp.generation import generate
from llmcomp.runtime.sampling import SamplingParams, sample_rows, sample_token

PROMPTS = ["The cat sat on", "A big red house is very"]


@pytest.fixture
def make(tiny_llama_factory, tokenizer_dir, tmp_path):
    """``make(seed, **config)`` -> (model, tokenizer): a random tiny Llama and SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    def build(seed: int = 0, **overrides):
        model = tiny_llama_factory(tmp_path / f"m{seed}", seed=seed, **overrides)
        return model, AutoTokenizer.from_pretrained(tokenizer_dir)

    return build


def _hf_greedy(model, tok, prompts: list[str], n: int) -> list[list[int]]:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
def test_greedy_matches_transformers_generate(make, prompts: list[str]) -> None:
    model, tok = make()
    res = generate(model, tok, prompts, max_new_tokens=10, stop_at_eos=False)
    assert res.token_ids == _hf_greedy(model, tok, prompts, 10)
    assert res.batch_size == len(prompts) and res.decode_steps == 9 and res.new_tokens == 10 * len(prompts)
    assert res.decode_tokens_per_second > 0 and res.prefill_seconds > 0


def test_left_padding_does_not_change_a_sequence(make) -> None:
    """A prompt batched with a longer one decodes exactly as it does alone."""
    model, tok = make(1)
    alone = generate(model, tok, PROMPTS[:1], max_new_tokens=6, stop_at_eos=False).token_ids[0]
    batched = generate(model, tok, PROMPTS, max_new_tokens=6, stop_at_eos=False).token_ids[0]
    assert alone == batched


def test_stops_at_eos_and_cuts_the_text(make) -> None:
    model, tok = make(2)
    free = generate(model, tok, PROMPTS[:1], max_new_tokens=8, stop_at_eos=False).token_ids[0]
    # Declare the third generated token an end-of-sequence token: generation must stop right there.
    model.generation_config.eos_token_id = free[2]
    res = generate(model, tok, PROMPTS[:1], max_new_tokens=8)
    first = free.index(free[2])
    assert res.token_ids[0] == free[: first + 1]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(make) -> None:
    model, tok = make(3)
    a = generate(model, tok, PROMPTS, 8, temperature=1.0, seed=7, stop_at_eos=False).token_ids
    b = generate(model, tok, PROMPTS, 8, temperature=1.0, seed=7, stop_at_eos=False).token_ids
    c = generate(model, tok, PROMPTS, 8, temperature=1.0, seed=8, stop_at_eos=False).token_ids
    assert a == b and a != c
    greedy = generate(model, tok, PROMPTS, 8, stop_at_eos=False).token_ids
    assert generate(model, tok, PROMPTS, 8, temperature=0.7, top_k=1, seed=1, stop_at_eos=False).token_ids == greedy


def _empirical(logits: torch.Tensor, n: int, **kw) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(**kw)
    draws = torch.tensor([sample_token(logits[0], params, gen) for _ in range(n)])
    return torch.bincount(draws, minlength=logits.shape[-1]).double() / n


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"temperature": 1.0}, torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), 0)),
        ({"temperature": 2.0}, torch.softmax(torch.tensor([1.0, 0.5, 0.0, -0.5]), 0)),
        ({"temperature": 1.0, "top_k": 2}, torch.cat([torch.softmax(torch.tensor([2.0, 1.0]), 0), torch.zeros(2)])),
        # softmax = [.644, .237, .087, .032]: nucleus 0.8 keeps the first two (0.644 < 0.8 <= 0.881).
        ({"temperature": 1.0, "top_p": 0.8}, torch.cat([torch.softmax(torch.tensor([2.0, 1.0]), 0), torch.zeros(2)])),
    ],
)
def test_sampling_distribution_closed_form(kw: dict, expected: torch.Tensor) -> None:
    freq = _empirical(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), 20000, **kw)
    torch.testing.assert_close(freq, expected.double(), atol=0.015, rtol=0)


def test_sample_rows_mixes_greedy_and_seeded_rows() -> None:
    """Greedy rows take the argmax; sampled rows equal sample_token with the same generator state."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=0.8, top_k=5, seed=4)]
    got = sample_rows(logits, params, [torch.Generator().manual_seed(p.seed or 0) for p in params])
    want = [int(logits[0].argmax()),
            sample_token(logits[1], params[1], torch.Generator().manual_seed(3)),
            sample_token(logits[2], params[2], torch.Generator().manual_seed(4))]
    assert got == want
    top5 = set(torch.topk(logits[2], 5).indices.tolist())
    assert all(sample_token(logits[2], params[2], torch.Generator().manual_seed(s)) in top5 for s in range(50))


def test_compiled_step_matches_eager(make) -> None:
    """Graph capture of the decode step (dynamo, eager backend: no C++ toolchain needed in CI)."""
    model, tok = make(4, num_hidden_layers=1)
    eager = generate(model, tok, PROMPTS, 6, stop_at_eos=False)
    compiled = generate(model, tok, PROMPTS, 6, stop_at_eos=False, compile=True, compile_backend="eager")
    assert compiled.compiled and compiled.token_ids == eager.token_ids
    # The graphs are built by a warm-up before the timed loop, so every step is counted.
    assert compiled.decode_steps == 5 and compiled.compile_seconds > 0


def test_rejects_bad_arguments(make) -> None:
    model, tok = make()
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, tok, [], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, PROMPTS, 0)


def test_bench_cli_json_and_bad_input(tiny_llama_dir, tmp_path) -> None:
    from typer.testing import CliRunner

    from llmcomp.cli.main import app

    runner = CliRunner()
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(tiny_llama_dir), "--batch-sizes", "1,2", "--tokens", "5",
                                 "--warmup", "0", "--dtype", "float32", "--modes", "eager", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["batch_size"] for r in data["results"]] == [1, 2]
    assert all(r["decode_tokens_per_second"] > 0 and r["new_tokens_per_sequence"] == 5 for r in data["results"])
    result = runner.invoke(app, ["bench", str(tiny_llama_dir), "--batch-sizes", "one"])
    assert result.exit_code == 2 and "--batch-sizes" in result.output and "Traceback" not in result.output
