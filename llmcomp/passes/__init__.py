"""Compression passes; importing this package registers the built-in ones."""

from llmcomp.passes import autobits, finequant, rtn, wanda  # noqa: F401
from llmcomp.passes.base import CompressionPass, PassConfig, pass_registry, register_pass

__all__ = ["CompressionPass", "PassConfig", "pass_registry", "register_pass"]
