"""Evaluation: perplexity, GLUE, comparison reports and plots (``llmcomp.eval``).

See docs/EVAL.md. The stable entry points are :func:`compute_perplexity` (used by ``llmcomp demo``)
and :func:`llmcomp.eval.runner.evaluate_models` (used by ``llmcomp eval``).
"""

from llmcomp.eval.perplexity import PerplexityResult, compute_perplexity

__all__ = ["PerplexityResult", "compute_perplexity"]
