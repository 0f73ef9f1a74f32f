"""Compression passes; importing this package registers the built-in ones."""

from llmcomp.passes import (  # noqa: F401  (imported to register)
    autobits,
    codebook_quant,
    deepshape,
    dsnot,
    finequant,
    lowrank,
    magnitude,
    rtn,
    sparse_store,
    sparsegpt,
    tensornet,
    wanda,
    wina,
)
from llmcomp.passes.base import CompressionPass, PassConfig, pass_registry, register_pass

__all__ = ["CompressionPass", "PassConfig", "pass_registry", "register_pass"]
