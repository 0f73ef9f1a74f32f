"""Fuzzing the checkpoint readers: whatever ``quantization_config``, ``config.json`` or safetensors
header they are given, the only failure is a one-line :class:`CheckpointError`.

Inputs are arbitrary JSON-like values and mutations of valid ones (dropped keys, wrong types,
random kinds/bits/group sizes, negative and huge numbers, nested garbage). Runs are derandomized
(fixed seed) and keep no example database, so CI sees the same examples every time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import random_llama

from llmcomp.errors import CheckpointError
from llmcomp.formats.checkpoint import validate_checkpoint
from llmcomp.pipeline import compress
from llmcomp.recipes import recipe_from_dict
from llmcomp.scheme import parse_quantization_config

V1_CONFIG = Path(__file__).parent / "data" / "v1_checkpoint" / "config.json"
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FILE_FUZZ = settings(FUZZ, max_examples=60)


def _spec(kind: str = "int_affine", k: int = 64, n: int = 32, bits: int = 4, group: int = 32) -> dict[str, Any]:
    return {"kind": kind, "in_features": k, "out_features": n, "bits": bits, "group_size": group,
            "symmetric": False, "bias": False}


VALID_V2 = {
    "quant_method": "llmcomp", "format_version": 2, "llmcomp_version": "0.1.0", "recipe": "custom",
    "modules": {"model.layers.0.self_attn.q_proj": _spec(), "model.layers.0.mlp.down_proj": _spec(k=128, group=128),
                "lm_head": _spec(bits=8, group=64)},
    "files": {"model.safetensors": {"bytes": 1234, "sha256": "0" * 64}},
}
VALID_V1 = json.loads(V1_CONFIG.read_text())["quantization_config"]

# -- strategies ----------------------------------------------------------------------------------
HUGE = [2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30)]
INTERESTING = st.sampled_from([
    0, -1, 1, 2, 3, 4, 5, 8, 16, 31, 32, 33, 64, 127, 128, -4, *HUGE,
    0.0, -0.0, 1.5, 4.0, float("nan"), float("inf"), float("-inf"), 1e308,
    "", "4", "int_affine", "quant_linear", "llmcomp", "dense", "model.safetensors", "../x", "a\nb", "\x00",
    True, False, None, [], {}, [4], [[]], {"kind": "int_affine"}, {"type": "quant_linear"},
])
SCALARS = (st.none() | st.booleans() | st.integers() | st.sampled_from(HUGE)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
REPLACEMENTS = INTERESTING | JSON_VALUES


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position inside a nested dict/list value (the root is ``()``)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _fresh(value: Any) -> Any:
    """A copy: sampled constants ([], {}) are shared between examples and must not be edited."""
    return copy.deepcopy(value)


@st.composite
def mutated(draw: st.DrawFn, base: Any, max_mutations: int = 4) -> Any:
    """``base`` with a few random edits: a value replaced, a key/item dropped, a key added."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_mutations))):
        path = draw(st.sampled_from(_paths(obj)))
        op = draw(st.sampled_from(["replace", "drop", "add"]))
        if not path:
            if op == "replace":
                obj = _fresh(draw(REPLACEMENTS))
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if op == "drop":
            del parent[key]
        elif op == "add" and isinstance(parent[key], dict):
            parent[key][draw(st.text(max_size=8) | st.sampled_from(list(_spec())))] = _fresh(draw(REPLACEMENTS))
        else:
            parent[key] = _fresh(draw(REPLACEMENTS))
    return obj


def _maybe(values: list[Any]) -> st.SearchStrategy:
    return st.sampled_from(values) | REPLACEMENTS


MODULE_SPECS = st.fixed_dictionaries(
    {},
    optional={
        "kind": _maybe(["int_affine", "quant_linear", "sparse", "INT_AFFINE"]),
        "type": _maybe(["quant_linear", "int_affine"]),
        "in_features": _maybe([1, 16, 64, 160, 0, -64]),
        "out_features": _maybe([1, 16, 64, 0, -1]),
        "bits": _maybe([2, 3, 4, 8, 1, 5, 16]),
        "group_size": _maybe([-1, 0, 1, 16, 32, 64, 65, 160]),
        "symmetric": _maybe([True, False, "yes", 0]),
        "bias": _maybe([True, False]),
    },
)
QUANT_CONFIGS = st.fixed_dictionaries(
    {"quant_method": _maybe(["llmcomp"]), "format_version": _maybe([1, 2]),
     "modules": st.dictionaries(st.text(max_size=12), MODULE_SPECS, max_size=3) | REPLACEMENTS},
    optional={"files": st.dictionaries(st.text(max_size=12), mutated({"bytes": 10, "sha256": "a" * 64})) | REPLACEMENTS,
              "llmcomp_version": _maybe(["0.1.0"]), "recipe": _maybe(["r"]), "extra": REPLACEMENTS},
)


def _only_checkpoint_errors(fn, *args: Any) -> Any:
    """Call ``fn``; a CheckpointError is fine if it is one line, any other exception fails the test."""
    try:
        return fn(*args)
    except CheckpointError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return None


def _check_parse(data: Any) -> None:
    parsed = _only_checkpoint_errors(parse_quantization_config, data)
    if parsed is not None:  # a config that parses survives its own serialization unchanged
        again = parse_quantization_config(parsed.to_json())
        assert again.modules == parsed.modules and again.files == parsed.files


# -- parse_quantization_config ---------------------------------------------------------------------
def test_valid_bases_parse():
    """The mutation bases are valid, so mutations start from configs that get deep into parsing."""
    assert len(parse_quantization_config(VALID_V2).modules) == 3
    assert len(parse_quantization_config(VALID_V1).modules) == 15


@FUZZ
@given(JSON_VALUES)
def test_parse_arbitrary_json(data):
    _check_parse(data)


@FUZZ
@given(QUANT_CONFIGS)
def test_parse_structured_garbage(data):
    _check_parse(data)


@FUZZ
@given(st.sampled_from([VALID_V2, VALID_V1]).flatmap(mutated))
def test_parse_mutated_valid_config(data):
    _check_parse(data)


@FUZZ
@given(st.dictionaries(st.sampled_from(list(VALID_V2["modules"])), MODULE_SPECS, min_size=1),
       st.sampled_from([1, 2]))
def test_parse_random_module_specs(modules, version):
    _check_parse({**VALID_V2, "format_version": version, "modules": modules})


# -- validate_checkpoint on files ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A valid format-2 checkpoint of a one-layer Llama with a 64-token vocabulary (a few KB)."""
    root = tmp_path_factory.mktemp("fuzz")
    random_llama(0, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                 tie_word_embeddings=True).save_pretrained(root / "src")
    recipe = recipe_from_dict({"passes": [{"type": "rtn", "bits": 4, "group_size": 16, "symmetric": False}]})
    out = compress(str(root / "src"), recipe, root / "ckpt", progress=False).output_dir
    assert validate_checkpoint(out).stored_version == 2
    return out


@pytest.fixture(scope="module")
def scratch(small_checkpoint, tmp_path_factory) -> Path:
    """A copy that each example overwrites (config.json and model.safetensors are rewritten every time)."""
    path = tmp_path_factory.mktemp("scratch") / "ckpt"
    shutil.copytree(small_checkpoint, path)
    return path


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def config_files(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    """What a replaced config.json may hold: random bytes, random JSON, or an edited valid config."""
    kind = draw(st.sampled_from(["bytes", "json", "quant", "quant", "whole", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return _json_bytes(draw(JSON_VALUES))
    if kind == "truncated":
        text = _json_bytes(valid)
        return text[: draw(st.integers(0, len(text) - 1))]
    if kind == "quant":  # edits inside quantization_config, where validation looks
        return _json_bytes({**valid, "quantization_config": draw(mutated(valid["quantization_config"]))})
    return _json_bytes(draw(mutated(valid)))


def _restore(scratch: Path, original: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(original / name, scratch / name)


def test_fuzz_config_json(small_checkpoint, scratch):
    valid = _config(small_checkpoint)

    @FILE_FUZZ
    @given(config_files(valid))
    def run(content: bytes) -> None:
        _restore(scratch, small_checkpoint)
        (scratch / "config.json").write_bytes(content)
        _only_checkpoint_errors(validate_checkpoint, scratch)

    run()


def _header_of(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U64", "f32", ""]
INTS = st.integers(-5, 300) | st.sampled_from(HUGE) | st.booleans() | st.floats(-1, 1e4) | st.none()
HEADER_ENTRIES = st.fixed_dictionaries(
    {},
    optional={"dtype": _maybe(DTYPES), "shape": st.lists(INTS, max_size=4) | REPLACEMENTS,
              "data_offsets": st.lists(INTS, max_size=3) | REPLACEMENTS},
)


@st.composite
def tensor_files(draw: st.DrawFn, header: dict[str, Any], data: bytes) -> bytes:
    """A safetensors file: an 8-byte little-endian header length, a header, the data."""
    names = list(header)
    kind = draw(st.sampled_from(["bytes", "json", "entries", "mutated", "mutated"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "json":
        body = _json_bytes(draw(JSON_VALUES))
    elif kind == "entries":
        entries = draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=10), HEADER_ENTRIES, max_size=4))
        body = _json_bytes(entries)
    else:
        body = _json_bytes(draw(mutated(header)))
    declared = draw(st.sampled_from([len(body)] * 4 + [0, len(body) + 1, 2**64 - 1]) | st.integers(0, 2**64 - 1))
    tail = draw(st.sampled_from([data, data[: len(data) // 2], b""]) | st.binary(max_size=64))
    return struct.pack("<Q", declared) + body + tail


def _write_tensor_file(scratch: Path, valid_config: dict[str, Any], content: bytes) -> None:
    """Replace the tensor file and record its true size and hash, so validation reaches the header."""
    (scratch / "model.safetensors").write_bytes(content)
    cfg = copy.deepcopy(valid_config)
    cfg["quantization_config"]["files"]["model.safetensors"] = {
        "bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (scratch / "config.json").write_text(json.dumps(cfg))


def test_fuzz_safetensors_header(small_checkpoint, scratch):
    valid = _config(small_checkpoint)
    header, data = _header_of(small_checkpoint / "model.safetensors")

    @FILE_FUZZ
    @given(tensor_files(header, data))
    def run(content: bytes) -> None:
        _write_tensor_file(scratch, valid, content)
        _only_checkpoint_errors(validate_checkpoint, scratch)

    run()


def test_rewritten_tensor_file_with_its_own_header_still_validates(small_checkpoint, scratch):
    """The fuzzers' file rewriting is sound: the unchanged header and data pass validation."""
    header, data = _header_of(small_checkpoint / "model.safetensors")
    body = _json_bytes(header)
    _write_tensor_file(scratch, _config(small_checkpoint), struct.pack("<Q", len(body)) + body + data)
    assert len(validate_checkpoint(scratch).modules) == 7


SIZES = st.integers(1, 256) | st.integers(1, 2**70) | st.sampled_from([2**31, 2**62, 2**63 - 1, 2**63, 2**64])


def test_fuzz_module_sizes(small_checkpoint, scratch):
    """Specs that parse but do not fit the stored tensors, down to sizes that overflow int64."""
    valid = _config(small_checkpoint)
    names = sorted(valid["quantization_config"]["modules"])

    @FILE_FUZZ
    @given(st.dictionaries(st.sampled_from(names), st.tuples(SIZES, SIZES, SIZES, st.sampled_from([2, 3, 4, 8])),
                           min_size=1, max_size=3))
    def run(edits: dict[str, tuple[int, int, int, int]]) -> None:
        cfg = copy.deepcopy(valid)
        for name, (k, n, group, bits) in edits.items():
            cfg["quantization_config"]["modules"][name].update(
                in_features=k, out_features=n, group_size=min(group, k), bits=bits)
        _restore(scratch, small_checkpoint)
        (scratch / "config.json").write_text(json.dumps(cfg))
        _only_checkpoint_errors(validate_checkpoint, scratch)

    run()


# -- regressions: what the fuzzers found -------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("bad", [[], {"a": 1}])
def test_unhashable_kind_or_v1_type_is_a_checkpoint_error(version, bad):
    """Was a TypeError (unhashable type) from the kind lookup."""
    field = "type" if version == 1 else "kind"
    spec = {k: v for k, v in _spec().items() if k != "kind"} | {field: bad}
    with pytest.raises(CheckpointError, match="has unknown kind"):
        parse_quantization_config({**VALID_V2, "format_version": version, "modules": {"m": spec}})


def test_integer_too_long_to_parse_in_config_json(small_checkpoint, scratch):
    """Python refuses integers over 4300 digits with a plain ValueError (not a JSONDecodeError)."""
    _restore(scratch, small_checkpoint)
    text = (scratch / "config.json").read_text()
    (scratch / "config.json").write_text(text.replace('"vocab_size": 64', '"vocab_size": 1' + "0" * 5000))
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON \(ValueError"):
        validate_checkpoint(scratch)


def test_integer_too_long_to_parse_in_safetensors_header(small_checkpoint, scratch):
    header, data = _header_of(small_checkpoint / "model.safetensors")
    body = json.dumps({**header, "__metadata__": {"format": "@"}}).replace('"@"', "1" + "0" * 5000).encode()
    _write_tensor_file(scratch, _config(small_checkpoint), struct.pack("<Q", len(body)) + body + data)
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt safetensors header \(ValueError\)"):
        validate_checkpoint(scratch)


@pytest.mark.parametrize("field", ["in_features", "out_features"])
@pytest.mark.parametrize("size", [2**60, 2**64])
def test_sizes_overflowing_int64_are_one_line_errors(small_checkpoint, scratch, field, size):
    """Was a RuntimeError (storage size overflow) or a CheckpointError carrying torch's multi-line
    C++ trace, from building the module on the meta device."""
    cfg = _config(small_checkpoint)
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"][field] = size
    _restore(scratch, small_checkpoint)
    (scratch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj' has an invalid spec") as err:
        validate_checkpoint(scratch)
    assert "\n" not in str(err.value)
