"""A module kind that only tests know, standing in for kinds a consumer cannot run (yet)."""

from __future__ import annotations

from typing import Literal

from llmcomp.scheme import ModuleSpec, register_spec, spec_kinds

DUMMY_KIND = "test_only_kind"


class DummySpec(ModuleSpec):
    kind: Literal["test_only_kind"] = "test_only_kind"


if DUMMY_KIND not in spec_kinds():
    register_spec(DummySpec)


FACTORS_KIND = "test_factors"


class FactorsSpec(ModuleSpec):
    """W = U @ V, optionally keeping only inputs with |x| above a threshold (an input transform)."""

    kind: Literal["test_factors"] = "test_factors"
    rank: int
    input_threshold: float | None = None


def _register_factors() -> type:
    import torch
    from torch import nn

    from llmcomp.modules.registry import module_types, register_module

    if FACTORS_KIND in module_types():
        return module_types()[FACTORS_KIND]
    register_spec(FactorsSpec)

    @register_module(FACTORS_KIND)
    class Factors(nn.Module):
        def __init__(self, spec: FactorsSpec, dtype: torch.dtype) -> None:
            super().__init__()
            self.config = spec
            self.register_buffer("weight_u", torch.zeros(spec.out_features, spec.rank, dtype=dtype))
            self.register_buffer("weight_v", torch.zeros(spec.rank, spec.in_features, dtype=dtype))
            if spec.input_threshold is not None:
                self.transform_input = self._keep_large

        @classmethod
        def from_spec(cls, spec: FactorsSpec, dtype: torch.dtype) -> Factors:
            return cls(spec, dtype)

        def spec(self) -> FactorsSpec:
            return self.config

        def _keep_large(self, x: torch.Tensor) -> torch.Tensor:
            return x * (x.abs() > self.config.input_threshold)

        def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return (self.weight_u.float() @ self.weight_v.float()).to(dtype)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.config.input_threshold is not None:
                x = self._keep_large(x)
            return x @ self.dequantized_weight(x.dtype).T

    return Factors


FactorsModule = _register_factors()
