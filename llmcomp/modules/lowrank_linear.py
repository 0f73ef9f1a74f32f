"""``LowRankLinear``: ``W ~ U V`` with ``U [out, r]`` and ``V [r, in]`` (truncated SVD).

The baseline the tensor-network layer must beat at an equal parameter count. Tensors
``weight_u`` and ``weight_v`` are the checkpoint tensors; like :class:`~llmcomp.modules.mpo_linear.MPOLinear`
they are frozen ``nn.Parameter``s so healing can train them in place. The forward is two thin
matmuls (``x V^T`` then ``U``), never the dense product.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from llmcomp.modules.registry import register_module
from llmcomp.scheme import ModuleSpec, register_spec


@register_spec
class LowRankSpec(ModuleSpec):
    """Rank-``rank`` factorization ``W = U V`` (docs/TENSORNET.md)."""

    kind: Literal["low_rank"] = "low_rank"
    rank: int = Field(gt=0)

    @model_validator(mode="after")
    def _rank_fits(self) -> LowRankSpec:
        if self.rank > min(self.in_features, self.out_features):
            raise ValueError(f"rank {self.rank} exceeds min(in_features, out_features)")
        return self


@register_module("low_rank")
class LowRankLinear(nn.Module):
    """Drop-in ``nn.Linear`` over two low-rank factors."""

    kind = "low_rank"

    def __init__(self, spec: LowRankSpec, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = spec.in_features, spec.out_features, spec.rank
        self.weight_u = nn.Parameter(torch.zeros(spec.out_features, spec.rank, dtype=dtype), requires_grad=False)
        self.weight_v = nn.Parameter(torch.zeros(spec.rank, spec.in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(spec.out_features, dtype=dtype), requires_grad=False) if spec.bias \
            else None

    @classmethod
    def from_spec(cls, spec: LowRankSpec, dtype: torch.dtype) -> LowRankLinear:
        return cls(spec, dtype)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype) -> LowRankLinear:
        spec = LowRankSpec(in_features=v.shape[1], out_features=u.shape[0], bias=bias is not None, rank=u.shape[1])
        module = cls(spec, dtype)
        with torch.no_grad():
            module.weight_u.copy_(u.to(dtype))
            module.weight_v.copy_(v.to(dtype))
            if bias is not None:
                module.bias.copy_(bias.detach().to(dtype))
        return module

    def spec(self) -> LowRankSpec:
        return LowRankSpec(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                           rank=self.rank)

    @property
    def num_params(self) -> int:
        return self.weight_u.numel() + self.weight_v.numel()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        with torch.no_grad():
            return self.weight_u.to(dtype) @ self.weight_v.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.to(self.weight_v.dtype), self.weight_v)
        return F.linear(h, self.weight_u, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"
