"""End to end on the embedded SmolLM2: tensornet checkpoint, transformers load, native runtime decode."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmcomp  # noqa: F401
from llmcomp.modules.mpo_linear import MPOLinear
from llmcomp.pipeline import compress
from llmcomp.recipes import recipe_from_dict
from llmcomp.runtime import ModelRunner

pytestmark = pytest.mark.slow


def test_smollm2_mpo_loads_and_decodes_on_both_paths(smollm2_dir, tmp_path) -> None:
    # The last block only, to stay fast; the defaults keep its down_proj dense.
    recipe = recipe_from_dict({"passes": [{"type": "tensornet", "ratio": 0.5, "targets": ["model.layers.29.*"]}]})
    out = compress("smollm2-135m", recipe, tmp_path / "mpo", progress=False, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(out.output_dir).eval()
    kinds = {n: type(m) for n, m in model.model.layers[29].named_modules() if n.endswith("_proj")}
    assert sum(k is MPOLinear for k in kinds.values()) == 6 and kinds["mlp.down_proj"] is torch.nn.Linear
    twin = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if isinstance(module, MPOLinear):
            twin.get_submodule(name).weight.data.copy_(module.dequantized_weight(torch.float32))
    ids = [1, 504, 3458, 282, 4649, 314, 3575, 30]
    with torch.no_grad():
        ref = twin(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(model(torch.tensor([ids])).logits[0], ref, rtol=1e-3, atol=1e-3)
    runner = ModelRunner(model, max_batch_size=1, max_model_len=32)
    runner.prefill(0, ids[:5])
    for t in range(5, len(ids)):
        torch.testing.assert_close(runner.decode([ids[t]])[0], ref[t], rtol=1e-3, atol=1e-3)
