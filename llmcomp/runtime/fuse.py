"""Fuse sibling projections that read the same input (q/k/v, gate/up) into one matmul call.

Why: at batch 1 a decode step makes seven weight-only int4 calls per layer, each paying its own
dispatch and activation packing; fused, it is four (measured about 5% of a SmolLM2 int4 step).
Only quantized siblings with one layout (bits, group size, symmetry: FineQuant's ``tie_fused``
gives them that) are fused: their packed codes are small, so the fused copy costs little memory,
while fusing dense weights would duplicate the model's largest tensors. Siblings wrapped by
activation sparsity over int bases are grouped without copying (``FusedSparseSiblings``: one
call of the packed sparse kernel for all of them at decode). The model is not changed.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcomp.modules.activation_sparse import ActivationSparseLinear, FusedSparseSiblings
from llmcomp.modules.quant_linear import QuantLinear


def fuse_quant_linears(modules: list[nn.Module]) -> QuantLinear | None:
    """One ``QuantLinear`` whose output is the concatenation of ``modules``' outputs, or None."""
    if len(modules) < 2 or not all(type(m) is QuantLinear for m in modules):
        return None
    first: QuantLinear = modules[0]  # type: ignore[assignment]
    key = (first.in_features, first.bits, first.group_size, first.symmetric, first.bias is not None,
           first.weight_scale.dtype)
    if any((m.in_features, m.bits, m.group_size, m.symmetric, m.bias is not None, m.weight_scale.dtype) != key
           for m in modules):  # type: ignore[union-attr]
        return None
    out = sum(m.out_features for m in modules)  # type: ignore[misc]
    dtype = first.bias.dtype if first.bias is not None else first.weight_scale.dtype
    fused = QuantLinear(first.in_features, out, first.bits, first.group_size, first.symmetric,
                        bias=first.bias is not None, dtype=dtype, scale_dtype=first.weight_scale.dtype)
    with torch.no_grad():
        fused.weight_packed.copy_(torch.cat([m.weight_packed for m in modules]))
        fused.weight_scale.copy_(torch.cat([m.weight_scale for m in modules]))
        if not first.symmetric:
            fused.weight_zero_point.copy_(torch.cat([m.weight_zero_point for m in modules]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in modules]))
    return fused.to(first.weight_packed.device)


def fuse_activation_sparse(modules: list[nn.Module]) -> FusedSparseSiblings | None:
    """Activation-sparse siblings over int bases of one bit width, as one module; else None."""
    if len(modules) < 2 or not all(type(m) is ActivationSparseLinear and isinstance(m.base, QuantLinear)
                                   for m in modules):
        return None
    if len({(m.in_features, m.base.bits) for m in modules}) != 1:  # type: ignore[union-attr]
        return None
    return FusedSparseSiblings(modules)  # type: ignore[arg-type]


def fuse_siblings(modules: list[nn.Module]) -> nn.Module | None:
    """The fused form of sibling projections (plain int layers, or activation-sparse ones), or None."""
    fused = fuse_quant_linears(modules)
    return fused if fused is not None else fuse_activation_sparse(modules)
