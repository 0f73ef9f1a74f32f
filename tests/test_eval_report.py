"""Model size (bits/weight), comparison rows, markdown report and the trade-off plot."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import byte_tokenizer, tiny_llama

from llmcomp import intquant
from llmcomp.eval.model_size import measure_model_size
from llmcomp.eval.plots import pareto_front, plot_tradeoff
from llmcomp.eval.report import comparison_rows, markdown_report, report_dict
from llmcomp.eval.runner import EvalSettings, ModelResult
from llmcomp.eval.tasks import TASKS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_llmcomp_checkpoint(path, bits=4, group=32, n=64, k=128, asym=True):
    """Tensors laid out as docs/FORMAT.md says: one quantized decoder linear + unquantized extras."""
    gen = torch.Generator().manual_seed(0)
    qw = intquant.quantize_rtn(torch.randn(n, k, generator=gen), bits, group, symmetric=not asym)
    prefix = "model.layers.0.mlp.down_proj"
    tensors = {
        f"{prefix}.weight_packed": intquant.pack(qw.q, bits),
        f"{prefix}.weight_scale": qw.scale.to(torch.float16),
        f"{prefix}.weight_shape": torch.tensor([n, k]),
        "model.layers.0.input_layernorm.weight": torch.ones(k, dtype=torch.float16),
        "model.embed_tokens.weight": torch.randn(300, k, generator=gen).to(torch.float16),
    }
    if asym:
        tensors[f"{prefix}.weight_zero_point"] = qw.zero
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "llmcomp"}}))
    return n * k + k + 300 * k


def test_bits_per_weight_from_headers_matches_closed_form(tmp_path):
    params = fake_llmcomp_checkpoint(tmp_path / "ck", bits=4, group=32)
    size = measure_model_size(tmp_path / "ck")
    assert size.bits_per_weight == pytest.approx(4 + (16 + 8) / 32)  # packed + fp16 scale + int8 zero
    assert size.parameters == params
    assert size.disk_bytes == (tmp_path / "ck" / "model.safetensors").stat().st_size
    assert size.bits_source == "safetensors headers"


def test_report_file_takes_precedence(tmp_path):
    fake_llmcomp_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "llmcomp_report.json").write_text(json.dumps({"average_bits_per_weight": 4.31}))
    size = measure_model_size(tmp_path / "ck")
    assert size.bits_per_weight == 4.31 and size.bits_source == "llmcomp_report.json"


@pytest.mark.parametrize("dtype,bits", [(torch.float32, 32.0), (torch.bfloat16, 16.0)])
def test_plain_hf_model_bits_are_its_dtype(tmp_path, dtype, bits):
    model = tiny_llama(dtype=dtype)
    model.save_pretrained(tmp_path / "m")
    size = measure_model_size(tmp_path / "m")
    assert size.bits_per_weight == pytest.approx(bits)
    assert size.parameters == sum(p.numel() for p in model.parameters())


def test_unknown_location_has_no_size():
    size = measure_model_size("org/not-local")
    assert size.disk_bytes is None and size.bits_per_weight is None


def test_pareto_front_matches_brute_force():
    gen = torch.Generator().manual_seed(4)
    points = [(float(x), float(y)) for x, y in torch.rand(25, 2, generator=gen).tolist()]
    for higher in (True, False):
        def beats(a, b, higher=higher):
            better_y = a[1] >= b[1] if higher else a[1] <= b[1]
            return a[0] <= b[0] and better_y and a != b
        brute = sorted(p for p in points if not any(beats(q, p) for q in points))
        assert sorted(pareto_front(points, higher)) == brute


def _results():
    from llmcomp.eval.model_size import ModelSize

    base = ModelResult("base", "/b", ModelSize(2_000_000, 16.0, 10, "x"),
                       {"wikitext2": {"perplexity": 20.0, "tokens": 100, "windows": 2},
                        "mrpc": {"acc": 0.70, "f1": 0.80}})
    small = ModelResult("w4", "/c", ModelSize(600_000, 4.5, 10, "x"),
                        {"wikitext2": {"perplexity": 21.5, "tokens": 100, "windows": 2},
                         "mrpc": {"acc": 0.65, "f1": 0.81}})
    return [base, small]


def test_comparison_rows_and_deltas():
    rows = comparison_rows(_results(), [TASKS["wikitext2"], TASKS["mrpc"]], "base")
    by_key = {(r.task, r.metric): r for r in rows}
    ppl = by_key[("wikitext2", "perplexity")]
    assert ppl.deltas == {"w4": pytest.approx(1.5)} and ppl.relative["w4"] == pytest.approx(0.075)
    assert ppl.better("w4") is False  # higher perplexity is worse
    assert by_key[("mrpc", "f1")].better("w4") is True
    assert by_key[("mrpc", "acc")].deltas["w4"] == pytest.approx(-0.05)
    assert by_key[("size", "bits_per_weight")].values == {"base": 16.0, "w4": 4.5}


def test_markdown_and_json_report(tmp_path):
    models = _results()
    specs = [TASKS["wikitext2"], TASKS["mrpc"]]
    settings = EvalSettings(tasks=specs, seq_len=128)
    rows = comparison_rows(models, specs, "base")
    data = report_dict(models, rows, settings, {}, "base")
    json.dumps(data)  # serializable
    assert data["models"][1]["results"]["wikitext2"]["perplexity"] == 21.5
    text = markdown_report(data, rows, "plot.png")
    assert "| wikitext2 | perplexity ↓ | 20.000 | 21.500 (+1.5000 (+7.50%)) |" in text
    assert "| mrpc | f1 ↑ | 0.8000 | 0.8100 (+0.0100 (+1.25%)) |" in text
    assert "![trade-off plot](plot.png)" in text


def test_plot_is_written(tmp_path):
    import matplotlib.image

    path = plot_tradeoff(_results(), [TASKS["wikitext2"], TASKS["mrpc"]], tmp_path / "sub" / "p.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > height  # two panels side by side


def test_tiny_tokenizer_roundtrips_bytes():
    tok = byte_tokenizer()
    text = "naïve café — 3 < 4\n\n"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 256 and tok("x<|endoftext|>")["input_ids"][-1] == 256
