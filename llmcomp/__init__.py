"""llmcomp: compress, evaluate and serve Hugging Face causal language models.

Importing the package registers the ``llmcomp`` checkpoint format with transformers, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads compressed checkpoints.
"""

__version__ = "0.1.0"

from llmcomp import hf_integration  # noqa: E402,F401  (registers the format with transformers)
from llmcomp.errors import LlmcompError  # noqa: E402

__all__ = ["LlmcompError", "__version__"]
