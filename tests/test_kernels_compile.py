"""Compile the Triton kernels for an H100 (sm_90) without a GPU.

The interpreter runs kernel bodies as Python, so it misses errors that only the real compiler
sees (type rules, constexpr handling, layouts, shared memory). Triton's wheel ships ``ptxas``, so
the full CUDA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) runs here on the CPU.
"""

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # internal API moved in another Triton version
    pytest.skip("this Triton has no ASTSource/GPUTarget", allow_module_level=True)

from llmcomp.kernels import triton_gemm as tg  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90


def compile_for_h100(fn, pointers: dict[str, str], constexprs: dict, num_warps=4, num_stages=3):
    """Compile ``fn``; pointer args typed from ``pointers``, other non-constexpr args are i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        else:
            sig[name] = "i32"
    src = ASTSource(fn, sig, constexprs)
    return triton.compile(src, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})


@pytest.fixture
def jit_mode(monkeypatch):
    """The kernels decorated for the real compiler (restored to the interpreter afterwards)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield tg.jit_kernels()
    monkeypatch.undo()
    tg.jit_kernels()


GEMM_VARIANTS = {
    # decode: int4 sym, fp16, word tile, bias
    "int4-decode-fp16": ({"x_ptr": "*fp16", "w_ptr": "*i32", "out_ptr": "*fp32"},
                         dict(BITS=4, HAS_ZERO=False, USE_LUT=False, HAS_BIAS=True, GROUP_ALIGNED=True,
                              WORD_TILE=True, COMPUTE=tl.float16, PRECISION="tf32",
                              BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)),
    # prefill: int8 asym, bf16 tensor cores
    "int8-prefill-bf16": ({"x_ptr": "*bf16", "w_ptr": "*i8", "out_ptr": "*bf16"},
                          dict(BITS=8, HAS_ZERO=True, USE_LUT=False, HAS_BIAS=False, GROUP_ALIGNED=True,
                               WORD_TILE=False, COMPUTE=tl.bfloat16, PRECISION="tf32",
                               BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)),
    # LUT 4-bit with gathered scales, fp16
    "lut4-gather-fp16": ({"x_ptr": "*fp16", "w_ptr": "*i32", "out_ptr": "*fp16"},
                         dict(BITS=4, HAS_ZERO=False, USE_LUT=True, HAS_BIAS=False, GROUP_ALIGNED=False,
                              WORD_TILE=True, COMPUTE=tl.float16, PRECISION="tf32",
                              BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)),
}


@pytest.mark.parametrize("variant", list(GEMM_VARIANTS))
def test_gemm_compiles_for_sm90(jit_mode, variant):
    pointers, constexprs = GEMM_VARIANTS[variant]
    kernel = compile_for_h100(jit_mode.gemm_kernel, pointers, constexprs)
    assert kernel.metadata.shared <= SMEM_LIMIT
    assert "mma" in kernel.asm["ptx"]  # tensor cores, not a scalar fallback


def test_sparse_gemv_compiles_for_sm90(jit_mode):
    constexprs = dict(BITS=4, HAS_ZERO=True, HAS_BIAS=True, WORD_TILE=True, COMPUTE=tl.float16,
                      PRECISION="tf32", BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    kernel = compile_for_h100(jit_mode.sparse_gemv_kernel, {"x_ptr": "*fp16", "w_ptr": "*i32",
                                                              "idx_ptr": "*i32"}, constexprs)
    assert kernel.metadata.shared <= SMEM_LIMIT
