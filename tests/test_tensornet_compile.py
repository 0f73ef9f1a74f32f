"""MPO layers inside the compiled decode step: one graph per batch bucket, the same logits as eager.

Regression: ``MPOLinear.forward`` used to compute its contraction plan per call with
``math.prod(<generator>)``, which dynamo cannot trace; the graph broke inside the layer loop, so
dynamo skipped the whole step and compiled ``LlamaForward._qkv`` / ``_mlp`` once per layer index
(hitting the recompile limit on a 30-layer model).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import TINY_CONFIG, random_llama

from llmcomp.modules.mpo_linear import MPOLinear
from llmcomp.passes import pass_registry
from llmcomp.passes.base import apply_to_layer
from llmcomp.runtime import ModelRunner

BUCKETS = [1, 2, 8]  # the MPO layers contract at 1 and 2 rows and rebuild the weight at 8 (checked below)


def mpo_model(core_bits: int | None) -> torch.nn.Module:
    model = random_llama(0, torch.float32, vocab_size=300, **TINY_CONFIG)
    cls = pass_registry()["tensornet"]
    cfg = {"ratio": 0.5, "dense_first_blocks": 0, "core_bits": core_bits, "core_group_size": 16}
    tensornet = cls(cls.Config.model_validate(cfg))
    for i, layer in enumerate(model.model.layers):
        apply_to_layer(tensornet, layer, f"model.layers.{i}")
    return model


@pytest.mark.parametrize("core_bits", [None, 8])
def test_compiled_mpo_step_is_one_graph_per_bucket_and_equals_eager(core_bits: int | None) -> None:
    model = mpo_model(core_bits)
    mpos = [m for m in model.modules() if isinstance(m, MPOLinear)]
    assert len(mpos) == 6 * TINY_CONFIG["num_hidden_layers"] and all(m.core_bits == core_bits for m in mpos)
    assert all(m.uses_contraction(2) and not m.uses_contraction(8) for m in mpos)  # both forward paths compiled
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = ModelRunner(copy.deepcopy(model), max_batch_size=8, max_model_len=16, buckets=BUCKETS)
    compiled = ModelRunner(model, max_batch_size=8, max_model_len=16, buckets=BUCKETS, compile=True,
                           compile_backend="eager")
    prompts = [torch.randint(1, 300, (3 + s,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(8)]
    for runner in (eager, compiled):
        for slot, prompt in enumerate(prompts):
            runner.prefill(slot, prompt)
    for n in (1, 2, 5, 8, 1):  # buckets 1, 2, 8 (three pad rows), 8, 1
        tokens = [7 * n + i for i in range(n)]
        want, got = eager.decode(tokens), compiled.decode(tokens)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for i, t in enumerate(tokens):
            prompts[i].append(t)
        with torch.no_grad():  # and slot 0 equals the HF forward of its whole sequence
            ref = model(torch.tensor([prompts[0]])).logits[0, -1]
        torch.testing.assert_close(got[0], ref, rtol=1e-4, atol=1e-4)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == len(BUCKETS)
