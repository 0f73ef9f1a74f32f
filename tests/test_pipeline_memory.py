"""Peak memory of compression stays near one layer, not the whole model."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from tiny_models import random_llama

LAYERS = 24
WIDE = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=LAYERS, num_attention_heads=8,
            num_key_value_heads=8, tie_word_embeddings=True)


SAMPLER = """
import threading, time, psutil, torch, transformers, llmcomp, llmcomp.pipeline, llmcomp.recipes
from transformers import LlamaConfig, LlamaForCausalLM  # import the model code before measuring
proc, peak, done = psutil.Process(), [0], threading.Event()
base = proc.memory_info().rss
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss - base)
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
"""


def _peak_rss_mb(code: str) -> float:
    """Peak RSS growth (MB) of running ``code`` in a fresh interpreter, after the imports."""
    prelude = SAMPLER
    epilogue = "\ndone.set(); time.sleep(0.01); print(peak[0] / 2**20)\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue],
                          capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_compression_peak_memory_is_about_one_layer(tmp_path):
    src = tmp_path / "wide"
    model = random_llama(0, vocab_size=1024, **WIDE)
    model.save_pretrained(src)
    layer_mb = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()) / 2**20
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    del model
    compressed = _peak_rss_mb(f"""
        r = llmcomp.recipes.recipe_from_dict({{"passes": [{{"type": "rtn", "bits": 4, "group_size": 64}}]}})
        llmcomp.pipeline.compress({str(src)!r}, r, {str(tmp_path / 'out')!r}, progress=False, shard_bytes=16 * 2**20)
    """)
    # Holding the model would cost model_mb; compression must stay far below that
    # (one layer in flight plus the embeddings, with slack for the allocator).
    assert model_mb > 10 * layer_mb
    assert compressed < 0.4 * model_mb, (compressed, model_mb, layer_mb)
