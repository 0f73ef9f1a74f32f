"""Drop-in ``nn.Module``s that execute compressed weights; importing registers them."""

from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.modules.registry import build_module, module_types, register_module

__all__ = ["QuantLinear", "build_module", "module_types", "register_module"]
