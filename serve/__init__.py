"""Serving: native OpenAI-compatible server and the vLLM plugin (``llmcomp.serve``)."""
