"""Evaluation: perplexity, GLUE, comparison reports and plots (``llmcomp.eval``)."""
