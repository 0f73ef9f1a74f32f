"""Activation sparsity (TEAL / WINA) as a module kind and as load-time flags.

References are naive float64 Python loops: per token, score every input channel, sort, keep the
best ``ceil((1 - s) K)`` (or those above the threshold), sum the kept columns.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import TINY_CONFIG, byte_tokenizer, random_llama, tiny_llama
from torch import nn
from typer.testing import CliRunner

from llmcomp import intquant
from llmcomp.activation_sparsity import ActivationSettings, applied_at_load, apply_activation_sparsity
from llmcomp.errors import LlmcompError
from llmcomp.modules.activation_sparse import ActivationSparseLinear, ActivationSparseSpec
from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.modules.registry import build_module

N, K = 24, 40


def naive_sparse_linear(x: torch.Tensor, w: torch.Tensor, sparsity: float | None, criterion: str,
                        threshold: float | None = None) -> torch.Tensor:
    """float64 per-token selection by Python loops; ``threshold`` replaces top-k when given."""
    rows = x.reshape(-1, x.shape[-1]).double().tolist()
    wd = w.double().tolist()
    n, k = len(wd), len(wd[0])
    norms = [math.sqrt(sum(wd[o][i] ** 2 for o in range(n))) for i in range(k)]
    out = []
    for row in rows:
        score = [abs(row[i]) * (norms[i] if criterion == "wina" else 1.0) for i in range(k)]
        if threshold is not None:
            kept = [i for i in range(k) if score[i] > threshold]
        else:
            keep = max(1, math.ceil((1.0 - sparsity) * k - 1e-9))
            kept = sorted(range(k), key=lambda i: -score[i])[:keep]
        out.append([sum(wd[o][i] * row[i] for i in kept) for o in range(n)])
    return torch.tensor(out, dtype=torch.float64).reshape(*x.shape[:-1], n)


def make_base(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A dense or int4 (group 8, asymmetric) base layer and its float64 weight."""
    gen = torch.Generator().manual_seed(seed)
    # Uneven column scales, so WINA's and TEAL's choices differ.
    w = torch.randn(N, K, generator=gen) * torch.linspace(0.2, 3.0, K)
    if kind == "dense":
        lin = nn.Linear(K, N, bias=False)
        lin.weight.data.copy_(w)
        return lin, w.double()
    qw = intquant.quantize_rtn(w, 4, 8, False, scale_dtype=torch.float32)
    q = QuantLinear.from_quantized(qw, None, dtype=torch.float32)
    return q, q.dequantized_weight(torch.float64)


@pytest.mark.parametrize("kind", ["dense", "int4"])
@pytest.mark.parametrize("criterion", ["teal", "wina"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.65])
def test_topk_matches_naive_reference(kind, criterion, sparsity):
    base, w64 = make_base(kind)
    mod = ActivationSparseLinear.wrap(base, criterion)
    mod.configure(sparsity, criterion)
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mod(x).double(), naive_sparse_linear(x, w64, sparsity, criterion),
                               rtol=1e-4, atol=1e-4)
    one = x[:1, :1]  # batch-1 decode: the dispatch kernel that reads only the kept columns
    torch.testing.assert_close(mod(one).double(), naive_sparse_linear(one, w64, sparsity, criterion),
                               rtol=1e-4, atol=1e-4)
    assert mod._kernel_state is not None  # the decode call went through the kernel


def test_wina_and_teal_select_differently():
    base, w64 = make_base("dense")
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(2))
    wina = ActivationSparseLinear.wrap(base, "wina")
    wina.configure(0.5)
    teal = ActivationSparseLinear.wrap(base, "teal")
    teal.configure(0.5)
    assert not torch.equal(wina.input_mask(x), teal.input_mask(x))
    # WINA keeps the channels with the larger weighted contribution: its output error is smaller here.
    dense = x.double() @ w64.t()
    with torch.no_grad():
        err = {m.criterion: float((m(x).double() - dense).norm()) for m in (wina, teal)}
    assert err["wina"] < err["teal"]


@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_threshold_mode_matches_naive_reference(criterion):
    base, w64 = make_base("dense", seed=3)
    mod = ActivationSparseLinear.wrap(base, criterion, grid=(0.5,))
    threshold = 0.9 if criterion == "teal" else 4.0
    mod.threshold_table.fill_(threshold)
    mod.sparsity_table.fill_(0.5)
    mod.configure(0.5, criterion, mode="threshold")
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(4))
    kept = mod.input_mask(x).sum(-1)
    assert kept.min() != kept.max()  # a threshold keeps a varying number per token
    torch.testing.assert_close(mod(x).double(), naive_sparse_linear(x, w64, None, criterion, threshold),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mod(x[:1]).double(), naive_sparse_linear(x[:1], w64, None, criterion, threshold),
                               rtol=1e-4, atol=1e-4)


def test_configure_uses_allocation_table_and_rejects_bad_values():
    base, _ = make_base("dense")
    mod = ActivationSparseLinear.wrap(base, "wina", grid=(0.25, 0.5))
    mod.sparsity_table.copy_(torch.tensor([0.1, 0.6]))
    assert mod.configure(0.5) == pytest.approx(0.6)
    assert mod.configure(0.5, allocated=False) == pytest.approx(0.5)
    assert mod.configure(0.4) == pytest.approx(0.4)  # not a grid target: uniform
    with pytest.raises(ValueError, match="criterion"):
        mod.configure(0.5, "magnitude")
    with pytest.raises(ValueError, match="threshold mode needs"):
        mod.configure(0.4, mode="threshold")
    with pytest.raises(ValueError, match="activation sparsity"):
        mod.configure(1.0)


@pytest.mark.parametrize("kind", ["dense", "int4"])
def test_spec_round_trip_and_state_dict(kind):
    base, w64 = make_base(kind)
    mod = ActivationSparseLinear.wrap(base, "wina", grid=(0.25, 0.5))
    mod.sparsity_table.copy_(torch.tensor([0.2, 0.55]))
    spec = mod.spec()
    assert isinstance(spec, ActivationSparseSpec) and spec.kind == "activation_sparse"
    assert (spec.base is None) == (kind == "dense")
    rebuilt = build_module("m", spec.model_dump(mode="json"), torch.float32)
    assert set(rebuilt.state_dict()) == set(mod.state_dict())
    rebuilt.load_state_dict(mod.state_dict())
    torch.testing.assert_close(rebuilt.dequantized_weight(torch.float64), w64)
    torch.testing.assert_close(rebuilt.col_norms.double(), w64.norm(dim=0), rtol=1e-5, atol=1e-6)
    assert rebuilt.configure(0.5) == pytest.approx(0.55)


def test_apply_to_model_zero_is_exact_and_public_norms():
    model = random_llama(0, **TINY_CONFIG)
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
        summary = apply_activation_sparsity(model, 0.0, "wina")
        assert summary["modules"] == 7 * TINY_CONFIG["num_hidden_layers"]
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
        apply_activation_sparsity(model, 0.5, "wina", norms="public")
        layer = model.model.layers[0]
        assert layer.self_attn.k_proj.criterion == "wina" and layer.mlp.gate_proj.criterion == "wina"
        assert layer.self_attn.q_proj.criterion == "teal" and layer.mlp.down_proj.criterion == "teal"
        assert not isinstance(model.lm_head, ActivationSparseLinear)  # the head stays dense
        sparse = model(ids).logits
    assert not torch.allclose(sparse, ref)
    with pytest.raises(LlmcompError, match="--activation-sparsity must be in"):
        apply_activation_sparsity(model, 1.5)
    with pytest.raises(LlmcompError, match="--activation-criterion must be one of teal, wina"):
        apply_activation_sparsity(model, 0.5, "l1")


def test_load_time_context_wraps_loaded_models_except_skipped(tmp_path):
    import llmcomp.loading as loading

    model = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    with applied_at_load(ActivationSettings(0.4, "teal"), skip=1) as applied:
        first, _ = loading.load_model(str(tmp_path / "m"))
        second, _ = loading.load_model(str(tmp_path / "m"))
    assert type(first.model.layers[0].mlp.up_proj) is nn.Linear
    up = second.model.layers[0].mlp.up_proj
    assert isinstance(up, ActivationSparseLinear) and (up.criterion, up.sparsity) == ("teal", 0.4)
    assert len(applied) == 1 and applied[0]["criterion"] == "teal"
    third, _ = loading.load_model(str(tmp_path / "m"))  # the context restored the loader
    assert type(third.model.layers[0].mlp.up_proj) is nn.Linear


def test_eval_cli_flags(tmp_path, monkeypatch):
    from llmcomp.cli.main import app

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = tiny_llama(seed=0, init_std=0.3)
    for name in ("base", "same"):  # one model under two names: the baseline stays dense, the other not
        model.save_pretrained(tmp_path / name)
        byte_tokenizer().save_pretrained(tmp_path / name)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 20))
    runner = CliRunner()
    common = ["eval", str(tmp_path / "same"), "--tasks", "wikitext2", "--data-file", str(text), "--seq-len", "64",
              "--no-progress"]
    out = tmp_path / "r.json"
    result = runner.invoke(app, [*common, "--baseline", str(tmp_path / "base"), "-o", str(out),
                                 "--activation-sparsity", "0.6", "--activation-criterion", "teal"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["activation_sparsity"]["criterion"] == "teal"
    ppl = {m["name"].rsplit("/", 1)[-1]: m["results"]["wikitext2"]["perplexity"] for m in data["models"]}
    dense = runner.invoke(app, [*common, "-o", str(tmp_path / "d.json")])
    assert dense.exit_code == 0, dense.output
    dense_ppl = json.loads((tmp_path / "d.json").read_text())["models"][0]["results"]["wikitext2"]["perplexity"]
    assert ppl["base"] == pytest.approx(dense_ppl, rel=1e-9)
    assert ppl["same"] != pytest.approx(dense_ppl, rel=1e-6)
    bad = runner.invoke(app, [*common, "--activation-sparsity", "0.5", "--activation-criterion", "l1"])
    assert bad.exit_code == 2
    assert [line for line in bad.output.splitlines() if line.startswith("error: ")] == [
        "error: --activation-criterion must be one of teal, wina, got 'l1'"]


def test_serve_settings_travel_by_environment_and_bad_combinations_fail():
    from llmcomp.activation_sparsity import ENV_CRITERION, ENV_SPARSITY
    from llmcomp.cli.main import app

    env = ActivationSettings(0.65, "teal").to_env()
    assert env == {ENV_SPARSITY: "0.65", ENV_CRITERION: "teal"}
    assert ActivationSettings.from_env(env) == ActivationSettings(0.65, "teal")
    assert ActivationSettings.from_env({}).sparsity is None
    with pytest.raises(LlmcompError, match="must be a number"):
        ActivationSettings.from_env({ENV_SPARSITY: "half"})
    result = CliRunner().invoke(app, ["serve", "smollm2-135m", "--engine", "vllm", "--activation-sparsity", "0.5"])
    assert result.exit_code == 2 and "with the wina recipe only" in result.output
    result = CliRunner().invoke(app, ["serve", "smollm2-135m", "--activation-sparsity", "2"])
    assert result.exit_code == 2 and "--activation-sparsity must be in" in result.output


@pytest.mark.parametrize("kind", ["dense", "int4"])
def test_masked_dense_linear_from_plain_tensors_matches_module(kind):
    from llmcomp.modules.activation_sparse import masked_dense_linear

    base, w64 = make_base(kind, seed=6)
    gen = torch.Generator().manual_seed(7)
    rotation, _ = torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=torch.float64))
    mod = ActivationSparseLinear.wrap(base, "wina", rotation=rotation.float())
    mod.configure(0.5)
    x = torch.randn(5, K, generator=gen)
    with torch.no_grad():
        want = mod(x)
    got = masked_dense_linear(x, w64.float(), mod.col_norms, 0.5, mod.input_rotation)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Dense-equivalent weight (what a dense engine materialises): W' R^T, exact at sparsity 0.
    torch.testing.assert_close(x.double() @ mod.dequantized_weight(torch.float64).t(),
                               (x.double() @ rotation) @ w64.t(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weights", ["dense", "int4"])
def test_runtime_decode_matches_full_forward(weights):
    """Batch-1 decode on the runtime (the sparse kernel, per token) gives the logits of a full forward
    (every token masked on its own): one semantics for prefill, scoring and decode. Wrapped int4
    siblings (q/k/v, gate/up) are grouped by the runtime into one packed-kernel call per group,
    each projection with its own selection."""
    from llmcomp.passes.base import set_submodule
    from llmcomp.runtime import ModelRunner

    model = random_llama(0, **TINY_CONFIG)
    if weights == "int4":
        from llmcomp.activation_sparsity import decoder_linears

        for name, lin in decoder_linears(model).items():
            qw = intquant.quantize_rtn(lin.weight.detach(), 4, 32, False, scale_dtype=torch.float32)
            set_submodule(model, name, QuantLinear.from_quantized(qw, None, dtype=torch.float32))
    apply_activation_sparsity(model, 0.5, "wina")
    ids = torch.randint(0, 200, (12,), generator=torch.Generator().manual_seed(8)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0]
    runner = ModelRunner(model, max_batch_size=1, max_model_len=32)
    assert runner.backend == "lean"
    runner.prefill(0, ids[:6])
    steps = torch.stack([runner.decode([t])[0] for t in ids[6:]])  # logits after ids[6], ..., ids[11]
    torch.testing.assert_close(steps, full[6:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "int4"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 3])
def test_cpu_sparse_bag_kernel_matches_reference(kind, threads, rows):
    from llmcomp.kernels.dispatch import (
        ActivationSparseLayout,
        ActivationSparseReferenceKernel,
        ActivationSparseTensors,
        DenseLayout,
        QuantTensors,
        select_kernel,
    )

    base, w64 = make_base(kind, seed=9)
    if kind == "dense":
        layout = ActivationSparseLayout(DenseLayout(N, K), 0.4, "wina")
        tensors = ActivationSparseTensors(base.weight.data)
    else:
        layout = ActivationSparseLayout(base.layout, 0.4, "wina")
        tensors = ActivationSparseTensors(QuantTensors(base.weight_packed, base.weight_scale, base.weight_zero_point))
    kernel = select_kernel(layout, torch.device("cpu"), torch.float32, prefer="cpu_sparse_bag")
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(10))
    ref = ActivationSparseReferenceKernel()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel.apply(x, layout, kernel.prepare(layout, tensors, torch.float32), None)
    finally:
        torch.set_num_threads(before)
    want = ref.apply(x.double(), layout, ref.prepare(layout, tensors, torch.float64), None)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if rows == 1:  # and the naive per-token loop agrees (one row: shared selection = per token)
        torch.testing.assert_close(got.double(), naive_sparse_linear(x, w64, 0.6, "wina"), rtol=1e-4, atol=1e-4)
