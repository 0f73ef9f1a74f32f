"""``sparse_store``: store pruned modules compressed, so the checkpoint shrinks with sparsity.

The sparsity passes leave a dense ``nn.Linear`` with zeros and the mask in the module state, so
quantization can follow them and honour the mask. This pass, last in a recipe, turns each masked
module into a stored-sparse kind (:mod:`llmcomp.modules.sparse_linear`):

* dense + exact 2:4 mask -> ``sparse_2of4`` (unless ``layout: bitmask``);
* dense + any other mask -> ``sparse_bitmask``;
* int-quantized (``int_affine``, 2/4/8 bits) + mask -> ``sparse_int_affine`` (bitmask + kept codes).

Modules without a mask, or sparser than dense storage would pay for (``min_sparsity``), are left as
they are. Decoding is exact: the stored module's weight equals the one it replaces, bit for bit.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from llmcomp.calibration import InputStats
from llmcomp.modules.quant_linear import QuantLinear
from llmcomp.modules.registry import DENSE_KIND
from llmcomp.modules.sparse_linear import CODE_BITS, Sparse2of4Linear, SparseLinear, SparseQuantLinear
from llmcomp.passes.base import CompressionPass, ModuleReport, ModuleState, PassConfig, register_pass
from llmcomp.passes.sparsity_masks import holds_pattern

# Below this sparsity a bitmask (1 bit per weight) plus the kept values is hardly smaller than dense.
DEFAULT_MIN_SPARSITY = 0.1


class SparseStoreConfig(PassConfig):
    layout: Literal["auto", "bitmask"] = Field("auto", description="auto: 2:4 masks get the compact 2:4 layout")
    min_sparsity: float = Field(DEFAULT_MIN_SPARSITY, ge=0.0, le=1.0,
                                description="store sparse only modules at least this sparse")


def _stored_bits(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() * 8 for name, t in module.state_dict().items() if name != "bias")


@register_pass
class SparseStorePass(CompressionPass):
    name = "sparse_store"
    Config = SparseStoreConfig
    accepts = frozenset({DENSE_KIND, "int_affine"})
    calibration_optional = True

    def compress_module(
        self, name: str, module: nn.Module, state: ModuleState, stats: InputStats | None
    ) -> tuple[nn.Module | None, ModuleReport]:
        cfg: SparseStoreConfig = self.config_for(name)  # type: ignore[assignment]
        if state.mask is None:
            return None, {"stored": "unchanged (no mask)"}
        keep = state.mask.to(torch.bool)
        sparsity = float(1.0 - keep.float().mean())
        if sparsity < cfg.min_sparsity or sparsity == 0.0:
            return None, {"stored": f"unchanged (sparsity {sparsity:.3f} < min_sparsity)"}
        before = _stored_bits(module)
        if isinstance(module, QuantLinear):
            if module.bits not in CODE_BITS:
                return None, {"stored": f"unchanged ({module.bits}-bit codes do not pack into bytes)"}
            stored: nn.Module = SparseQuantLinear.from_quant_linear(module, keep)
        elif cfg.layout == "auto" and keep.shape[1] % 4 == 0 and holds_pattern(keep, "2:4"):
            stored = Sparse2of4Linear.from_dense(module.weight.data, keep, module.bias)
        else:
            stored = SparseLinear.from_dense(module.weight.data, keep, module.bias)
        after = _stored_bits(stored)
        # bits_per_weight replaces a quantization pass's figure: this is what is stored now.
        return stored, {"stored": stored.kind, "bits_per_weight": after / state.numel,
                        "stored_ratio": after / max(before, 1), "numel": state.numel}
