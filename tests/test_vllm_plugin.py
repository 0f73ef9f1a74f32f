"""The vLLM plugin's linear method inside real vLLM layers (fused q/k/v and gate/up, TP sharding).

Tensor parallelism is simulated by pretending to be rank ``r`` of ``tp`` (vLLM reads the rank when
layers and parameters are built); only loading and the local matmul are checked, as the
all-reduce is vLLM's job.
"""

from __future__ import annotations

import pytest
import torch

from llmcomp import intquant

pytestmark = pytest.mark.slow  # importing vLLM takes ~20-30 s on this machine

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 4, 2, 16, 96
SCHEMES = [(4, 16, False), (8, -1, True), (3, 16, True), (2, 16, False)]  # (bits, group_size, symmetric)


def quantized(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool, seed: int):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    qw = intquant.quantize_rtn(w, bits, group_size, symmetric)
    tensors = {"weight_packed": intquant.pack(qw.q, bits), "weight_scale": qw.scale,
               "weight_shape": torch.tensor([out_features, in_features])}
    if qw.zero is not None:
        tensors["weight_zero_point"] = qw.zero
    return tensors, intquant.dequantize_qw(qw).double()


def module_spec(in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool) -> dict:
    return {"type": "quant_linear", "in_features": in_features, "out_features": out_features, "bits": bits,
            "group_size": intquant.effective_group_size(group_size, in_features), "symmetric": symmetric,
            "bias": False}


def make_config(vllm_plugin, modules: dict):
    cfg = vllm_plugin.LlmcompConfig.from_config({"quant_method": "llmcomp", "format_version": 1, "modules": modules})
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    return cfg


def load(layer, tensors: dict, shard_id=None) -> None:
    params = dict(layer.named_parameters())
    for name, t in tensors.items():
        param = params[name]
        if shard_id is None:
            param.weight_loader(param, t)
        else:
            param.weight_loader(param, t, shard_id)


@pytest.mark.parametrize(("rank", "size"), [(0, 1), (1, 2)])
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), SCHEMES)
def test_fused_qkv_loads_each_shard_and_matches_float64(vllm_env, tp, rank, size, bits, group_size, symmetric):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    tp(rank, size)
    prefix = "model.layers.0.self_attn"
    shapes = {"q": HEADS * HEAD_DIM, "k": KV_HEADS * HEAD_DIM, "v": KV_HEADS * HEAD_DIM}
    modules = {f"{prefix}.{s}_proj": module_spec(HIDDEN, n, bits, group_size, symmetric) for s, n in shapes.items()}
    cfg = make_config(vllm_env, modules)
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=False, quant_config=cfg,
                              prefix=f"{prefix}.qkv_proj", params_dtype=torch.float32)
    assert type(layer.quant_method).__name__ == "LlmcompLinearMethod"
    parts = []
    for i, (shard, n) in enumerate(shapes.items()):
        tensors, dense = quantized(n, HIDDEN, bits, group_size, symmetric, seed=i)
        load(layer, tensors, shard)
        local = n // size
        parts.append(dense[rank * local : (rank + 1) * local])
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(9))
    out = layer(x)[0]
    torch.testing.assert_close(out.double(), x.double() @ torch.cat(parts).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), SCHEMES)
def test_row_parallel_shard_holds_its_input_slice(vllm_env, tp, bits, group_size, symmetric):
    from vllm.model_executor.layers.linear import RowParallelLinear

    rank, size = 1, 2
    tp(rank, size)
    name = "model.layers.0.mlp.down_proj"
    cfg = make_config(vllm_env, {name: module_spec(INTER, HIDDEN, bits, group_size, symmetric)})
    layer = RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=cfg, prefix=name, params_dtype=torch.float32)
    tensors, dense = quantized(HIDDEN, INTER, bits, group_size, symmetric, seed=3)
    load(layer, tensors)  # 3 bits: 48 columns per rank split a 10-value word, so the rank cuts its own
    layer.quant_method.process_weights_after_loading(layer)
    local = INTER // size
    x = torch.randn(4, local, generator=torch.Generator().manual_seed(4))
    out = layer.quant_method.apply(layer, x)
    ref = x.double() @ dense[:, rank * local : (rank + 1) * local].T
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_merged_gate_up_and_unquantized_layers(vllm_env, tp):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, UnquantizedLinearMethod

    tp(0, 1)
    prefix = "model.layers.0.mlp"
    modules = {f"{prefix}.{n}": module_spec(HIDDEN, INTER, 4, 32, False) for n in ("gate_proj", "up_proj")}
    cfg = make_config(vllm_env, modules)
    layer = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, quant_config=cfg,
                                       prefix=f"{prefix}.gate_up_proj", params_dtype=torch.float32)
    dense = []
    for i in range(2):
        tensors, d = quantized(INTER, HIDDEN, 4, 32, False, seed=10 + i)
        load(layer, tensors, i)
        dense.append(d)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x)[0].double(), x.double() @ torch.cat(dense).T, rtol=1e-4, atol=1e-4)
    assert isinstance(cfg.get_quant_method(layer, "model.layers.0.self_attn.o_proj"), UnquantizedLinearMethod)


def test_row_parallel_split_inside_a_group_is_refused(vllm_env, tp):
    from vllm.model_executor.layers.linear import RowParallelLinear

    tp(0, 2)
    name = "model.layers.0.mlp.down_proj"
    cfg = make_config(vllm_env, {name: module_spec(INTER, HIDDEN, 4, 32, True)})  # 48 per rank, group 32
    with pytest.raises(ValueError, match="per-rank input size 48 must be a multiple of group_size 32"):
        RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=cfg, prefix=name, params_dtype=torch.float32)


def test_register_makes_the_method_known(vllm_env):
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    vllm_env.register()  # twice is harmless: vLLM loads plugins in every process, sometimes repeatedly
    assert "llmcomp" in QUANTIZATION_METHODS
    assert get_quantization_config("llmcomp") is vllm_env.LlmcompConfig


def factors(out_features: int, in_features: int, rank: int, seed: int, threshold: float | None = None):
    """A test-only factorized kind (tests/spec_kinds.py): its tensors, spec and float64 weight."""
    from spec_kinds import FACTORS_KIND

    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g)
    spec = {"kind": FACTORS_KIND, "in_features": in_features, "out_features": out_features, "rank": rank,
            "input_threshold": threshold}
    return {"weight_u": u, "weight_v": v}, spec, u.double() @ v.double()


def make_config_v2(vllm_plugin, modules: dict):
    cfg = vllm_plugin.LlmcompConfig.from_config({"quant_method": "llmcomp", "format_version": 2, "modules": modules})
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    return cfg


@pytest.mark.parametrize(("rank", "size"), [(0, 1), (1, 2)])
def test_other_kinds_are_materialized_per_shard_next_to_int_and_dense_shards(vllm_env, tp, rank, size):
    """q: a factorized kind, k: int4, v: left dense; each rank holds its rows of each shard."""
    from vllm.model_executor.layers.linear import QKVParallelLinear

    tp(rank, size)
    prefix = "model.layers.0.self_attn"
    q_tensors, q_spec, q_dense = factors(HEADS * HEAD_DIM, HIDDEN, 6, seed=1)
    k_tensors, k_dense = quantized(KV_HEADS * HEAD_DIM, HIDDEN, 4, 16, False, seed=2)
    v_dense = torch.randn(KV_HEADS * HEAD_DIM, HIDDEN, generator=torch.Generator().manual_seed(3))
    k_spec = {**module_spec(HIDDEN, KV_HEADS * HEAD_DIM, 4, 16, False), "kind": "int_affine"}
    k_spec.pop("type")
    cfg = make_config_v2(vllm_env, {f"{prefix}.q_proj": q_spec, f"{prefix}.k_proj": k_spec})
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=False, quant_config=cfg,
                              prefix=f"{prefix}.qkv_proj", params_dtype=torch.float32)
    assert type(layer.quant_method).__name__ == "LlmcompModuleMethod"
    load(layer, q_tensors, "q")
    load(layer, k_tensors, "k")
    load(layer, {"weight": v_dense}, "v")
    layer.quant_method.process_weights_after_loading(layer)
    parts = []
    for dense in (q_dense, k_dense, v_dense.double()):
        local = dense.shape[0] // size
        parts.append(dense[rank * local : (rank + 1) * local])
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(layer(x)[0].double(), x.double() @ torch.cat(parts).T, rtol=1e-4, atol=1e-4)
    assert not [n for n, _ in layer.named_parameters() if n != "bias"]  # placeholders are gone


def test_materialized_row_parallel_holds_its_columns_and_input_transforms_apply_per_shard(vllm_env, tp):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    tp(1, 2)
    name = "model.layers.0.mlp.down_proj"
    tensors, spec, dense = factors(HIDDEN, INTER, 5, seed=4)
    layer = RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=make_config_v2(vllm_env, {name: spec}),
                              prefix=name, params_dtype=torch.float32)
    load(layer, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    local = INTER // 2
    x = torch.randn(4, local, generator=torch.Generator().manual_seed(5))
    ref = x.double() @ dense[:, local:].T
    torch.testing.assert_close(layer.quant_method.apply(layer, x).double(), ref, rtol=1e-4, atol=1e-4)

    tp(0, 1)
    prefix = "model.layers.0.mlp"
    gate = factors(INTER, HIDDEN, 4, seed=6, threshold=0.5)
    up = factors(INTER, HIDDEN, 4, seed=7)
    cfg = make_config_v2(vllm_env, {f"{prefix}.gate_proj": gate[1], f"{prefix}.up_proj": up[1]})
    merged = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, quant_config=cfg,
                                        prefix=f"{prefix}.gate_up_proj", params_dtype=torch.float32)
    load(merged, gate[0], 0)
    load(merged, up[0], 1)
    merged.quant_method.process_weights_after_loading(merged)
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(8)).double()
    kept = x * (x.abs() > 0.5)  # only the gate shard drops its small inputs
    ref = torch.cat([kept @ gate[2].T, x @ up[2].T], dim=-1)
    torch.testing.assert_close(merged(x.float())[0].double(), ref, rtol=1e-4, atol=1e-4)


def test_activation_sparse_shards_apply_their_criterion_in_vllm(vllm_env, tp, monkeypatch):
    """gate: a rotated dense weight, up: int4; S and the criterion (WINA) come from the serve flags' env vars.
    The reference is each llmcomp module's own forward (itself tested against naive float64 loops)."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    from llmcomp.activation_sparsity import ENV_CRITERION, ENV_SPARSITY
    from llmcomp.modules.activation_sparse import ActivationSparseLinear
    from llmcomp.modules.quant_linear import QuantLinear

    tp(0, 1)
    monkeypatch.setenv(ENV_SPARSITY, "0.5")
    monkeypatch.setenv(ENV_CRITERION, "wina")
    g = torch.Generator().manual_seed(21)
    dense = torch.nn.Linear(HIDDEN, INTER, bias=False, dtype=torch.float64)
    dense.weight.data = torch.randn(INTER, HIDDEN, generator=g, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=g, dtype=torch.float64)).Q
    gate = ActivationSparseLinear.wrap(dense, "wina", rotation=rotation)
    qw = intquant.quantize_rtn(torch.randn(INTER, HIDDEN, generator=g), 4, 16, False)
    up = ActivationSparseLinear.wrap(QuantLinear.from_quantized(qw, None, torch.float32), "teal")
    prefix = "model.layers.0.mlp"
    specs = {f"{prefix}.gate_proj": gate.spec().model_dump(), f"{prefix}.up_proj": up.spec().model_dump()}
    layer = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, quant_config=make_config_v2(vllm_env, specs),
                                       prefix=f"{prefix}.gate_up_proj", params_dtype=torch.float64)
    load(layer, dict(gate.state_dict()), 0)
    load(layer, dict(up.state_dict()), 1)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(4, HIDDEN, generator=g, dtype=torch.float64)
    gate.configure(0.5, "wina")
    up.configure(0.5, "wina")
    up.double()
    with torch.no_grad():
        ref = torch.cat([gate(x), up(x)], dim=-1)
        weights = [m.dequantized_weight(torch.float64) for m in (gate, up)]
        dense_out = torch.cat([x @ w.T for w in weights], dim=-1)
    out = layer(x)[0]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert float((out - dense_out).abs().max()) > 1e-3  # inputs really were dropped
