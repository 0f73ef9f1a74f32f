"""Parsing of llmcomp quantization configs for vLLM (no vLLM import needed)."""

from __future__ import annotations

import pytest
from spec_kinds import DUMMY_KIND, FACTORS_KIND

from llmcomp.serve.vllm_spec import (
    LinearQuantSpec,
    ShardedModuleSpec,
    check_checkpoint,
    layer_spec,
    parse_modules,
    shard_names,
)

MAPPING = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
ATTN = "model.layers.0.self_attn"


def spec(bits=4, group_size=64, symmetric=False, in_features=576, out_features=576):
    return {"type": "quant_linear", "in_features": in_features, "out_features": out_features, "bits": bits,
            "group_size": group_size, "symmetric": symmetric, "bias": False}


def config(modules):
    return {"quant_method": "llmcomp", "format_version": 1, "modules": modules}


def test_shard_names_follow_packed_mapping():
    assert shard_names(f"{ATTN}.qkv_proj", MAPPING) == [f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj"]
    assert shard_names(f"{ATTN}.o_proj", MAPPING) == [f"{ATTN}.o_proj"]


def test_fused_layer_spec_is_shared_and_per_channel_is_detected():
    modules = parse_modules(config({f"{ATTN}.{n}": spec() for n in ("q_proj", "k_proj", "v_proj")}))
    assert layer_spec(f"{ATTN}.qkv_proj", modules, MAPPING) == LinearQuantSpec(4, 64, False, 576)
    assert layer_spec(f"{ATTN}.o_proj", modules, MAPPING) is None
    per_channel = parse_modules(config({f"{ATTN}.o_proj": spec(bits=8, group_size=-1, symmetric=True)}))
    got = layer_spec(f"{ATTN}.o_proj", per_channel, MAPPING)
    assert got.group_size == 576 and got.per_channel


def test_fused_shards_with_different_settings_raise_one_clear_error():
    modules = parse_modules(config({
        f"{ATTN}.q_proj": spec(bits=4), f"{ATTN}.k_proj": spec(bits=4), f"{ATTN}.v_proj": spec(bits=8),
    }))
    with pytest.raises(ValueError, match=r"must share bits, group_size and symmetric.*v_proj: bits=8"):
        layer_spec(f"{ATTN}.qkv_proj", modules, MAPPING)


def test_partially_quantized_fused_layer_is_refused():
    modules = parse_modules(config({f"{ATTN}.q_proj": spec(), f"{ATTN}.k_proj": spec()}))
    with pytest.raises(ValueError, match=r"v_proj is not quantized"):
        layer_spec(f"{ATTN}.qkv_proj", modules, MAPPING)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"quant_method": "gptq", "format_version": 1, "modules": {}}, "quant_method is not 'llmcomp'"),
        ({"quant_method": "llmcomp", "format_version": 9, "modules": {}}, "format_version 9"),
        ({"quant_method": "llmcomp", "format_version": 1, "modules": []}, "modules is missing or not a mapping"),
        (config({"m": {"type": "no_such_kind"}}), "module 'm' has unknown kind 'no_such_kind'"),
        ({"quant_method": "llmcomp", "format_version": 2,
          "modules": {"m": {"kind": DUMMY_KIND, "in_features": 8, "out_features": 8}}},
         f"no module class runs kind {DUMMY_KIND} \\(1 modules"),
        (config({"m": spec(bits=5)}), r"module 'm' \(int_affine\): bits: Input should be 2, 3, 4 or 8 \(got 5\)"),
    ],
)
def test_bad_configs_are_refused_before_loading(cfg, message):
    with pytest.raises(ValueError, match=message):
        parse_modules(cfg)


def test_check_checkpoint_walks_every_fused_group():
    modules = {f"model.layers.{i}.self_attn.{n}": spec() for i in range(2) for n in ("q_proj", "k_proj", "v_proj")}
    modules.update({f"model.layers.{i}.mlp.{n}": spec(out_features=1536) for i in range(2)
                    for n in ("gate_proj", "up_proj")})
    modules["model.layers.1.mlp.down_proj"] = spec(bits=8, group_size=-1, in_features=1536)
    assert check_checkpoint(config(modules)) == len(modules)
    modules["model.layers.1.mlp.up_proj"] = spec(bits=2, out_features=1536)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.gate_up_proj"):
        check_checkpoint(config(modules))


def test_quantized_output_head_is_refused_before_vllm_starts():
    """vLLM builds lm_head as a vocab-parallel layer the plugin cannot run: one line, naming the fix."""
    modules = {f"{ATTN}.{n}": spec() for n in ("q_proj", "k_proj", "v_proj")}
    assert check_checkpoint(config(modules)) == 3
    modules["lm_head"] = spec(bits=8, group_size=-1, symmetric=True, out_features=49152)
    with pytest.raises(ValueError, match="lm_head is quantized.*--engine native.*without lm_head: true"):
        check_checkpoint(config(modules))


def test_a_layer_with_another_kind_takes_the_materialized_path_shard_by_shard():
    """Any non-int shard sends the whole fused layer to the module path; dense shards stay None there."""
    factors = {"kind": FACTORS_KIND, "in_features": 576, "out_features": 576, "rank": 8}
    cfg = {"quant_method": "llmcomp", "format_version": 2,
           "modules": {f"{ATTN}.q_proj": factors, f"{ATTN}.k_proj": {**spec(), "kind": "int_affine"}}}
    cfg["modules"][f"{ATTN}.k_proj"].pop("type")
    modules = parse_modules(cfg)
    got = layer_spec(f"{ATTN}.qkv_proj", modules, MAPPING)
    assert isinstance(got, ShardedModuleSpec)
    assert got.names == tuple(f"{ATTN}.{n}" for n in ("q_proj", "k_proj", "v_proj"))
    assert [s.kind if s else None for s in got.specs] == [FACTORS_KIND, "int_affine", None]
    assert check_checkpoint(cfg) == 2
