"""The one decode runtime: slot KV cache, lean Llama forward, sampler and stop rule.

Used by the native server's engine, ``llmcomp bench`` (through :func:`llmcomp.generation.generate`)
and evaluation.
"""

from llmcomp.runtime.runner import ModelRunner, batch_buckets, context_length

__all__ = ["ModelRunner", "batch_buckets", "context_length"]
