"""The GPU kernel benchmark's --dry-run (CPU, Triton interpreter) keeps working."""

import json

import pytest
from bench_modules import load_bench

pytest.importorskip("triton")


def test_kernels_gpu_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored after the test; the dry run needs it
    bench = load_bench("kernels_gpu")
    out = tmp_path / "kernels.json"
    assert bench.main(["--dry-run", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["dry_run"] and rows
    assert {r["method"] for r in rows} == {"float16", "bfloat16", "int4_g128", "int8_pc"}
    assert {r["M"] for r in rows} == set(bench.DRY_M_VALUES)
    assert all(r["ok"] and r["us"] > 0 and r["rel_err"] < 1e-2 for r in rows)
    assert "int4/fp16" in capsys.readouterr().out
