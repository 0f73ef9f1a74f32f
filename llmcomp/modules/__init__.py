"""Drop-in ``nn.Module``s that execute compressed weights; importing registers them."""

from llmcomp.modules.activation_sparse import ActivationSparseLinear
from llmcomp.modules.codebook_linear import CodebookLinear
from llmcomp.modules.lowrank_linear import LowRankLinear
from llmcomp.modules.mpo_linear import MPOLinear
from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.modules.registry import build_module, module_types, register_module
from llmcomp.modules.sparse_linear import Sparse2of4Linear, SparseLinear, SparseQuantLinear  # noqa: F401

__all__ = ["ActivationSparseLinear", "CodebookLinear", "LowRankLinear", "MPOLinear", "QuantLinear", "build_module",
           "module_types", "register_module"]
