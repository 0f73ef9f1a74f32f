"""Serving: native OpenAI-compatible server and the vLLM plugin (``llmcomp.serve``).

Native engine (no HTTP): ``engine`` (continuous batching thread), ``kv_batch`` (joinable
left-padded KV cache), ``sampling``, ``detok``. HTTP layer: ``app`` (FastAPI routes), ``protocol``
(pydantic request/response/error models: the OpenAPI schema), ``openai_format`` (response bodies),
``metrics`` (Prometheus), ``server`` (load model + run uvicorn), ``background`` (serve on a thread).
vLLM: ``vllm_plugin`` (entry point ``register``), ``vllm_spec`` (config parsing), ``vllm_launch`` (``--engine vllm``).
See docs/SERVING.md.
"""
