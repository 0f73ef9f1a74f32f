"""E-LANG routing: the energy, the threshold decision and router.json, and routed lm-eval scoring,
checked against hand-computed references (naive float64 loops, full HF forwards)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lm_eval.api.instance import Instance
from tiny_models import byte_tokenizer, tiny_llama

from llmcomp.errors import LlmcompError
from llmcomp.eval.routed import RoutedLM, weight_traffic_saved
from llmcomp.eval.runtime_lm import RuntimeLM
from llmcomp.routing import SUPER, SWIFT, Router, RouterConfig, energy, load_router, save_router

TOL = 1e-9


def naive_energy(values: list[float], temperature: float) -> float:
    """-T * log(sum_i exp(v_i / T)), with the max taken out by hand (no torch)."""
    top = max(v / temperature for v in values)
    return -temperature * (top + math.log(sum(math.exp(v / temperature - top) for v in values)))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_energy_matches_hand_computed(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen, dtype=torch.float64) * 4
    got = energy(logits, temperature)
    for row, value in zip(logits.tolist(), got.tolist(), strict=True):
        assert value == pytest.approx(naive_energy(row, temperature), abs=TOL)


def test_energy_closed_forms_and_low_precision():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, generator=gen, dtype=torch.float64)
    # a shift of every logit by c shifts the energy by -c; uniform logits: -v - T log V
    assert float(energy(logits + 3.0)) == pytest.approx(float(energy(logits)) - 3.0, abs=TOL)
    assert float(energy(torch.full((8,), 0.7, dtype=torch.float64), 2.0)) == pytest.approx(-0.7 - 2 * math.log(8))
    # bf16 logits are summed in float32, not bf16
    half = logits.to(torch.bfloat16)
    assert energy(half).dtype == torch.float32
    assert float(energy(half)) == pytest.approx(naive_energy(half.double().tolist(), 1.0), abs=1e-5)
    with pytest.raises(ValueError):
        energy(logits, 0.0)


def test_decision_is_energy_above_tau_and_tau_changes_at_run_time():
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(64, 30, generator=gen) * 3
    values = [naive_energy(r, 1.0) for r in rows.double().tolist()]
    ordered = sorted(values)
    tau = (ordered[40] + ordered[41]) / 2  # between two energies: float32 rounding cannot flip a decision
    router = Router(RouterConfig(tau=tau))
    assert router.decide_energy(tau).model == SWIFT  # equal to tau stays on swift: strictly above defers
    decisions = [router.decide(r) for r in rows]
    assert [d.model for d in decisions] == [SUPER if v > tau else SWIFT for v in values]
    assert sum(d.deferred for d in decisions) == 23
    assert [d.energy for d in decisions] == pytest.approx(values, abs=1e-4)
    router.update(tau=min(values) - 1.0)
    assert all(router.decide(r).deferred for r in rows)
    with pytest.raises(ValueError):
        router.update(tau=float("inf"))
    with pytest.raises(ValueError):
        router.update(temperature=-1.0)
    assert router.tau == min(values) - 1.0
    with pytest.raises(ValueError):
        router.decide(rows)


def test_router_json_round_trip_and_errors(tmp_path):
    config = RouterConfig(tau=-12.5, temperature=2.0, energy_over="choices", swift="a", super="b")
    save_router(config, tmp_path / "r" / "router.json")
    assert load_router(tmp_path / "r" / "router.json") == config
    (tmp_path / "bad.json").write_text(json.dumps({"tau": -1.0, "temperature": 0.0}))
    with pytest.raises(LlmcompError, match="temperature"):
        load_router(tmp_path / "bad.json")
    (tmp_path / "extra.json").write_text(json.dumps({"tau": -1.0, "thresh": 2}))
    with pytest.raises(LlmcompError, match="thresh"):
        load_router(tmp_path / "extra.json")
    with pytest.raises(LlmcompError, match="does not exist"):
        load_router(tmp_path / "missing.json")


def test_weight_traffic_saved_closed_form():
    assert weight_traffic_saved(30, 100, 0.2) == pytest.approx(1 - (30 + 20) / 100)
    assert weight_traffic_saved(None, 100, 0.2) is None


# -- routed lm-eval scoring --------------------------------------------------------------------
DOCS = [  # (context, choices): each document's choices share its context
    ("The film was", [" good", " bad"]),
    ("A long and quiet plot", [" yes", " no"]),
    ("Answer:", [" positive", " negative"]),
    ("the actors were not", [" fun", " dull"]),
    ("It rained all day and", [" we", " they"]),
    ("Q", [" a", " b"]),
]


@pytest.fixture(scope="module")
def pair():
    swift = tiny_llama(seed=0, init_std=0.3).double()
    super_ = tiny_llama(seed=7, init_std=0.3).double()
    return swift, super_, byte_tokenizer()


def doc_instances(docs=DOCS, task: str = "sst2") -> list[Instance]:
    out = []
    for doc_id, (ctx, choices) in enumerate(docs):
        for k, choice in enumerate(choices):
            out.append(Instance("loglikelihood", {}, (ctx, choice), k, metadata=(task, doc_id, 1)))
    return out


def full_forward(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()


def reference_score(model, ctx: list[int], cont: list[int]) -> float:
    logp = torch.log_softmax(full_forward(model, ctx + cont[:-1])[len(ctx) - 1:], dim=-1)
    return sum(float(logp[j, t]) for j, t in enumerate(cont))


@pytest.mark.parametrize("energy_over", ["vocab", "choices"])
def test_routed_scores_are_the_chosen_models(pair, energy_over):
    swift, super_, tok = pair
    encoded = [(tok.encode(ctx), [tok.encode(ctx + c)[len(tok.encode(ctx)):] for c in choices])
               for ctx, choices in DOCS]
    energies = []
    for ctx, conts in encoded:
        last = full_forward(swift, ctx)[-1]
        values = last.tolist() if energy_over == "vocab" else [float(last[t]) for t in sorted({c[0] for c in conts})]
        energies.append(naive_energy(values, 1.5))
    tau = sum(sorted(energies)[2:4]) / 2  # three documents above it
    config = RouterConfig(tau=tau, temperature=1.5, energy_over=energy_over)
    lm = RoutedLM(swift, tok, config, RuntimeLM(super_, tok, slots=2, progress=False), slots=3, progress=False)
    got = lm.loglikelihood(doc_instances())
    expected = []
    for (ctx, conts), value in zip(encoded, energies, strict=True):
        model = super_ if value > tau else swift
        expected += [reference_score(model, ctx, cont) for cont in conts]
    assert [ll for ll, _ in got] == pytest.approx(expected, abs=1e-7)
    task = lm.stats.tasks["sst2"]
    assert (task.examples, task.super_calls) == (len(DOCS), 3)
    assert task.super_fraction == pytest.approx(0.5)
    assert [lm.stats.doc_energy[("sst2", i)] for i in range(len(DOCS))] == pytest.approx(energies, abs=1e-7)


def test_swift_only_lm_records_energies_without_super(pair):
    swift, _, tok = pair
    lm = RoutedLM(swift, tok, RouterConfig(tau=-1e9), None, slots=4, progress=False)
    got = lm.loglikelihood(doc_instances())
    plain = RuntimeLM(swift, tok, slots=4, progress=False).loglikelihood(doc_instances())
    assert got == plain
    assert lm.stats.tasks["sst2"].super_calls == 0 and len(lm.stats.doc_energy) == len(DOCS)


def test_generation_routed_per_request_after_prefill(pair):
    swift, super_, tok = pair
    prompts = ["The film was", "A long and quiet plot", "Answer:", "Q"]
    energies = [naive_energy(full_forward(swift, tok.encode(p))[-1].tolist(), 1.0) for p in prompts]
    tau = sum(sorted(energies)[1:3]) / 2  # two prompts above it
    lm = RoutedLM(swift, tok, RouterConfig(tau=tau), RuntimeLM(super_, tok, slots=2, progress=False), slots=2,
                  progress=False)
    kwargs = {"until": ["\n\n\n"], "max_gen_toks": 6, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, kwargs), 0, metadata=("gen", i, 1)) for i, p in enumerate(prompts)]
    got = lm.generate_until(requests)
    for prompt, value, text in zip(prompts, energies, got, strict=True):
        model = super_ if value > tau else swift
        ids = tok.encode(prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, len(ids):]
        assert text == tok.decode(out, skip_special_tokens=True)
    assert lm.stats.tasks["gen"].super_calls == 2


def test_normalized_energy_is_renyi_of_the_probabilities():
    """normalize: the energy of log-probabilities, -T log sum_i p_i^(1/T): shift-invariant."""
    from llmcomp.routing import routing_energy

    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(30, generator=gen, dtype=torch.float64) * 2
    top = float(logits.max())
    z = sum(math.exp(v - top) for v in logits.tolist())
    probs = [math.exp(v - top) / z for v in logits.tolist()]
    config = RouterConfig(tau=0.0, temperature=0.5, normalize=True)
    expected = -0.5 * math.log(sum(p ** 2 for p in probs))
    assert float(routing_energy(logits, config)) == pytest.approx(expected, abs=TOL)
    assert float(routing_energy(logits + 5.0, config)) == pytest.approx(expected, abs=TOL)
    raw = RouterConfig(tau=0.0, temperature=0.5)
    assert float(routing_energy(logits, raw)) == pytest.approx(naive_energy(logits.tolist(), 0.5), abs=TOL)


# -- token-level deferral ----------------------------------------------------------------------
def test_token_deferral_matches_full_forward_reference(pair):
    """Each step: naive energy of the swift model's full-forward logits; above tau the super model's
    full-forward argmax, else the swift one. The runtime version (caches caught up lazily) must
    produce the same tokens, the same decisions, and prefill exactly the super model's catch-up."""
    from llmcomp.route_generate import generate_with_deferral
    from llmcomp.runtime import ModelRunner

    swift, super_, tok = pair
    prompt, steps = tok.encode("The film was quite"), 14

    def reference(tau: float) -> tuple[list[int], list[bool], list[float]]:
        seq, tokens, used, energies = list(prompt), [], [], []
        for _ in range(steps):
            last = full_forward(swift, seq)[-1]
            e = naive_energy(last.tolist(), 1.0)
            chosen = full_forward(super_, seq)[-1] if e > tau else last
            tokens.append(int(chosen.argmax()))
            used.append(e > tau)
            energies.append(e)
            seq.append(tokens[-1])
        return tokens, used, energies

    _, _, swift_energies = reference(tau=1e9)
    ordered = sorted(swift_energies)
    tau = (ordered[6] + ordered[7]) / 2
    tokens, used, energies = reference(tau)
    assert 0 < sum(used) < steps
    runners = [ModelRunner(m, max_batch_size=1, max_model_len=len(prompt) + steps + 1) for m in (swift, super_)]
    got = generate_with_deferral(runners[0], runners[1], prompt, Router(RouterConfig(tau=tau)), steps)
    assert got.tokens == tokens and got.by_super == used
    assert got.energies == pytest.approx(energies, abs=1e-7)
    last = max(i for i, u in enumerate(used) if u)
    assert got.super_prefill_tokens == len(prompt) + last  # the super cache: a prefix, caught up once per deferral
    assert got.super_fraction == pytest.approx(sum(used) / steps)
