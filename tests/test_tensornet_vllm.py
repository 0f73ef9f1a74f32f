"""MPO (float and int cores) and low-rank modules inside real vLLM fused layers, through the plugin's
materialized path."""

from __future__ import annotations

import pytest
import torch

from llmcomp.modules.lowrank_linear import LowRankLinear
from llmcomp.modules.mpo_linear import MPOLinear, mpo_to_matrix
from llmcomp.passes.lowrank import FactorizedConfig, truncated_svd
from llmcomp.passes.tensornet import TensorNetConfig, decompose_for, quantize_cores

pytestmark = pytest.mark.slow  # importing vLLM takes ~20-30 s

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 4, 2, 16, 96


def mpo(out_f: int, in_f: int, seed: int, core_bits: int | None = None):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    cores, _ = decompose_for(w, TensorNetConfig(ratio=0.4, num_cores=3))
    module = MPOLinear.from_cores(cores, None, torch.float32)
    if core_bits is not None:
        module = quantize_cores(module, core_bits, 16)
    return dict(module.state_dict()), module.spec().model_dump(mode="json"), mpo_to_matrix(
        [c.double() for c in module.cores])


def lowrank(out_f: int, in_f: int, seed: int):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    u, v, _ = truncated_svd(w, FactorizedConfig(ratio=0.4))
    module = LowRankLinear.from_factors(u, v, None, torch.float32)
    return dict(module.state_dict()), module.spec().model_dump(mode="json"), module.weight_u.double() @ \
        module.weight_v.double()


def config(vllm_plugin, modules: dict):
    cfg = vllm_plugin.LlmcompConfig.from_config({"quant_method": "llmcomp", "format_version": 2, "modules": modules})
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    return cfg


def load(layer, tensors: dict, shard_id) -> None:
    params = dict(layer.named_parameters())
    for name, t in tensors.items():
        params[name].weight_loader(params[name], t, shard_id)


def test_mpo_qkv_and_lowrank_gate_up_match_their_dense_weights(vllm_env, tp) -> None:
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    tp(0, 1)

    prefix = "model.layers.0"
    shards = {"q": mpo(HEADS * HEAD_DIM, HIDDEN, 1), "k": mpo(KV_HEADS * HEAD_DIM, HIDDEN, 2),
              "v": mpo(KV_HEADS * HEAD_DIM, HIDDEN, 3, core_bits=4)}
    mlp = {0: lowrank(INTER, HIDDEN, 4), 1: mpo(INTER, HIDDEN, 5, core_bits=8)}
    modules = {f"{prefix}.self_attn.{s}_proj": spec for s, (_, spec, _) in shards.items()}
    modules[f"{prefix}.mlp.gate_proj"] = mlp[0][1]
    modules[f"{prefix}.mlp.up_proj"] = mlp[1][1]
    cfg = config(vllm_env, modules)
    qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=False, quant_config=cfg,
                            prefix=f"{prefix}.self_attn.qkv_proj", params_dtype=torch.float32)
    for sid, (tensors, _, _) in shards.items():
        load(qkv, tensors, sid)
    qkv.quant_method.process_weights_after_loading(qkv)
    gate_up = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, quant_config=cfg,
                                         prefix=f"{prefix}.mlp.gate_up_proj", params_dtype=torch.float32)
    for sid, (tensors, _, _) in mlp.items():
        load(gate_up, tensors, sid)
    gate_up.quant_method.process_weights_after_loading(gate_up)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(9))
    ref_qkv = torch.cat([d for _, _, d in shards.values()])
    torch.testing.assert_close(qkv(x)[0].double(), x.double() @ ref_qkv.T, rtol=1e-4, atol=1e-4)
    ref_mlp = torch.cat([mlp[0][2], mlp[1][2]])
    torch.testing.assert_close(gate_up(x)[0].double(), x.double() @ ref_mlp.T, rtol=1e-4, atol=1e-4)
