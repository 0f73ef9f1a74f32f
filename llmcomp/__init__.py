"""llmcomp: compress, evaluate and serve Hugging Face causal language models.

Importing the package registers the ``llmcomp`` checkpoint format with transformers, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads compressed checkpoints. The registration runs
as soon as transformers loads its quantizer registry (immediately if it already has), so a bare
``import llmcomp`` stays cheap.
"""

__version__ = "0.1.0"

from llmcomp._import_hook import call_after_import  # noqa: E402
from llmcomp.errors import LlmcompError  # noqa: E402


def _register_with_transformers() -> None:
    import llmcomp.hf_integration  # noqa: F401


call_after_import("transformers.quantizers.auto", _register_with_transformers)

__all__ = ["LlmcompError", "__version__"]
