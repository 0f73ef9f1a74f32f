"""bench/serve_load.py: percentiles, and its launcher mode against a real native server on a tiny Llama."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from bench_modules import load_bench


@pytest.fixture(scope="module")
def serve_load():
    return load_bench("serve_load")


def naive_percentile(values: list[float], q: int) -> float:
    """numpy's default ('linear') percentile from the standard library's inclusive quantiles."""
    if q == 0:
        return min(values)
    if q == 100:
        return max(values)
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def test_percentile_matches_reference(serve_load):
    rng = random.Random(0)
    for n in (2, 3, 10, 101, 1000):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 99, 100):
            assert serve_load.percentile(values, q) == pytest.approx(naive_percentile(values, q), rel=1e-12)
    assert serve_load.percentile([5.0, 1.0, 3.0], 50) == 3.0  # the middle of the sorted list
    assert serve_load.percentile([2.5], 99) == 2.5
    assert serve_load.percentile([], 50) is None


def test_server_spec_forces_kernels_on_native_servers_only(serve_load):
    spec = serve_load.ServerSpec.parse("native:/ck/rtn-w8@cpu_w8a8+cpu_int8pack")
    assert (spec.engine, spec.checkpoint, spec.kernels) == ("native", "/ck/rtn-w8", "cpu_w8a8,cpu_int8pack")
    assert spec.label == "rtn-w8@cpu_w8a8+cpu_int8pack" and spec.kernel_args == ["--kernel", "cpu_w8a8,cpu_int8pack"]
    plain = serve_load.ServerSpec.parse("vllm:/ck/rtn-w8")
    assert plain.kernels is None and plain.kernel_args == [] and plain.label == "rtn-w8"
    with pytest.raises(argparse.ArgumentTypeError, match="native servers only"):
        serve_load.ServerSpec.parse("vllm:/ck/rtn-w8@cpu_w8a8")
    with pytest.raises(argparse.ArgumentTypeError, match="not all among"):
        serve_load.parse_cpus("0,4096")


def bare_python_rss() -> int:
    out = subprocess.run([sys.executable, "-c", "import psutil; print(psutil.Process().memory_info().rss)"],
                         capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout)


def test_launcher_sweeps_a_native_server(serve_load, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "load.json"
    cpu = min(os.sched_getaffinity(0))
    rc = serve_load.main(["--serve", f"native:{tiny_llama_dir}", "--server-args", "--no-compile --max-batch-size 4",
                          "--clients", "1,2", "--duration", "2", "--max-tokens", "8", "--startup-timeout", "120",
                          "--server-cpus", str(cpu), "--output", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    log = Path(rows[0]["log"])
    assert rc == 0, log.read_text()[-3000:]
    assert log.parent == tmp_path and "Finished server process" in log.read_text()  # stopped with SIGTERM
    assert [(r["engine"], r["checkpoint"], r["clients"]) for r in rows] == [
        ("native", tiny_llama_dir.name, 1), ("native", tiny_llama_dir.name, 2)]
    bare = bare_python_rss()
    for row in rows:
        assert row["errors"] == 0 and row["error_kinds"] == {}
        assert row["requests"] > 0 and row["output_tokens"] == 8 * row["requests"]  # ignore_eos: all 8 tokens
        assert row["output_tokens_per_s"] > 0 and row["requests_per_s"] > 0
        for metric in ("itl_s", "ttft_s", "latency_s", "tpot_s"):
            assert 0 < row[metric]["p50"] <= row[metric]["p99"], (metric, row[metric])
        assert row["itl_s"]["p99"] < row["latency_s"]["p99"]
        # API process + model worker, both with torch loaded: several times a bare interpreter
        assert row["peak_rss_mib"] * 2**20 > 2 * bare
        assert row["startup_s"] > 0 and row["server_exit_code"] in (0, -15)
        assert row["server_cpus"] == [cpu]
    meta = result["meta"]
    assert meta["cpu"] and meta["versions"]["torch"] and "--clients 1,2" in meta["command"]
    printed = capsys.readouterr().out
    assert "| native | " + tiny_llama_dir.name + " | 2 |" in printed  # the markdown table


def test_failed_start_is_an_error_row(serve_load, tmp_path):
    out = tmp_path / "load.json"
    rc = serve_load.main(["--serve", f"native:{tmp_path / 'missing'}", "--clients", "1", "--duration", "1",
                          "--output", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert rc == 1 and row["clients"] is None
    assert "exited with status" in row["error"] and "not found" in row["log_tail"]
