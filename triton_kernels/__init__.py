"""GEMM kernels for compressed weights (Triton on CUDA, torch ops on CPU), imported as ``llmcomp.kernels``."""

from llmcomp.kernels.dispatch import QuantLayout, QuantTensors, register_kernel, select_kernel

__all__ = ["QuantLayout", "QuantTensors", "register_kernel", "select_kernel"]
