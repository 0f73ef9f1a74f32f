"""Every technique in one recipe and one checkpoint: SparseGPT + int4 stored sparse (MLP), int4 +
WINA tables (q/k/v), MPO tensor networks and the RF8 codebook (o_proj), then int4 again.

The reference is independent of every module class: a plain ``LlamaForCausalLM`` whose weights are
each module's ``dequantized_weight()``; the loaded checkpoint (transformers after ``import
llmcomp``) and the native runtime must compute exactly that model.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmcomp.pipeline import compress
from llmcomp.recipes import recipe_from_dict

STACKED = {
    "name": "stacked-tiny",
    "calibration": {"num_samples": 4, "seq_len": 64},
    "passes": [
        {"type": "sparsegpt", "sparsity": 0.5, "targets": ["*.mlp.*"]},
        {"type": "finequant", "bits": 4, "symmetric": False, "min_group_size": 32, "fit_iters": 2,
         "respect_mask": True, "targets": ["*.mlp.*", "*.q_proj", "*.k_proj", "*.v_proj"]},
        {"type": "sparse_store"},
        {"type": "wina", "grid": [0.5], "step": 0.25, "targets": ["*.q_proj", "*.k_proj", "*.v_proj"]},
        {"type": "tensornet", "ratio": 0.5, "num_cores": 2, "dense_first_blocks": 1, "dense_modules": [],
         "targets": ["*.o_proj"]},
        {"type": "codebook", "format": "rf8", "targets": ["model.layers.0.self_attn.o_proj"]},
    ],
}
KINDS = {"sparse_int_affine", "activation_sparse", "mpo", "codebook"}


@pytest.fixture(scope="module")
def stacked(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stacked") / "ck"
    compress(str(tiny_llama_dir), recipe_from_dict(STACKED), out, progress=False)
    return out


def reference_model(tiny_llama_dir, loaded, names):
    """The dense model with every compressed module replaced by its own materialized weight."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    compressed = {n: loaded.get_submodule(n) for n in names}
    with torch.no_grad():
        for name, module in compressed.items():
            ref.get_submodule(name).weight.copy_(module.dequantized_weight(torch.float64))
    return ref.eval(), compressed


def test_one_checkpoint_holds_every_kind_and_loads_as_its_materialized_model(tiny_llama_dir, stacked):
    from transformers import AutoModelForCausalLM

    import llmcomp  # noqa: F401  (registers the format with transformers)

    config = json.loads((stacked / "config.json").read_text())["quantization_config"]
    kinds = {m["kind"] for m in config["modules"].values()}
    assert kinds == KINDS, kinds
    loaded = AutoModelForCausalLM.from_pretrained(stacked, dtype=torch.float64).eval()
    ref, compressed = reference_model(tiny_llama_dir, loaded, config["modules"])
    assert {type(m).kind for m in compressed.values()} == KINDS
    mlp = [m for n, m in compressed.items() if ".mlp." in n]
    assert all(float((m.dequantized_weight() == 0).float().mean()) >= 0.5 for m in mlp)  # the mask survived int4
    ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded(ids).logits, ref(ids).logits
        dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert float((got - dense).abs().max()) > 1e-3  # compressed for real


@pytest.mark.parametrize("activation_sparsity", [None, 0.5])
def test_native_runtime_decodes_the_stacked_checkpoint(stacked, activation_sparsity):
    """Slot decode equals the model's own full forward, also with WINA active on the wrapped q/k/v
    (per-token top-k does not depend on the position, so both see the same inputs dropped)."""
    from llmcomp.activation_sparsity import apply_activation_sparsity
    from llmcomp.loading import load_model
    from llmcomp.runtime.runner import ModelRunner

    model, _ = load_model(str(stacked), dtype=torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        before = model(torch.tensor([ids])).logits[0, 7:]
    if activation_sparsity is not None:
        summary = apply_activation_sparsity(model, activation_sparsity, "wina")
        assert summary["norms_computed_at_load"] == 0  # only the q/k/v the wina pass wrapped take part
    runner = ModelRunner(model, max_batch_size=2, max_model_len=32)
    runner.prefill(0, ids[:7])
    steps = [runner.decode([t])[0] for t in ids[7:]]
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0, 7:]
    torch.testing.assert_close(torch.stack(steps), full, rtol=1e-6, atol=1e-6)
    if activation_sparsity is not None:
        assert float((full - before).abs().max()) > 1e-4  # inputs really were dropped
