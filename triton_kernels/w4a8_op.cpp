// The w4a8 kernel (w4a8_cpu.c) as a torch operator, so eager and compiled graphs call it through
// the C++ dispatcher (a Python custom op costs about 40 us per call, more than the kernel at M = 1).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

extern "C" {
#include "w4a8_cpu.c"
}

namespace {

constexpr int64_t kTile = 16;
const int kIsa = w4a8_isa();

at::Tensor w4a8_mm_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& zterm, int64_t group, int64_t isa, int64_t bits) {
    TORCH_CHECK(kIsa > 0, "w4a8: this CPU has neither AVX-512 VNNI nor AVX2");
    TORCH_CHECK(isa >= 0 && isa <= kIsa, "w4a8: isa ", isa, " is not available here (best: ", kIsa, ")");
    TORCH_CHECK(x.dim() == 2, "w4a8: x must be 2-D [M, K]");
    TORCH_CHECK(packed.scalar_type() == at::kByte && scale.scalar_type() == at::kFloat &&
                    zterm.scalar_type() == at::kFloat,
                "w4a8: packed must be uint8, scale and zterm float32");
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    at::Tensor xc = bf16 || x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
    const int64_t m = xc.size(0), k = xc.size(1), n = packed.size(0) * kTile;
    TORCH_CHECK(bits == 4 || bits == 8, "w4a8: bits must be 4 or 8, got ", bits);
    const int64_t cols_per_chunk = bits == 4 ? 8 : 4;
    TORCH_CHECK(packed.size(1) * cols_per_chunk == k, "w4a8: packed weight is for K=", packed.size(1) * cols_per_chunk,
                ", x has K=", k);
    at::Tensor out = at::empty({m, n}, xc.options().dtype(at::kFloat));
    const int rc = w4a8_mm(xc.data_ptr(), bf16 ? 1 : 0, m, k, n, group,
                           static_cast<const uint8_t*>(packed.contiguous().data_ptr()),
                           scale.contiguous().data_ptr<float>(), zterm.contiguous().data_ptr<float>(),
                           out.data_ptr<float>(), isa ? static_cast<int>(isa) : kIsa, static_cast<int>(bits));
    TORCH_CHECK(rc == 0, "w4a8 kernel failed (code ", rc, ") for M=", m, " K=", k, " N=", n, " group=", group);
    return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());  // output in x's dtype
}

int64_t isa() { return kIsa; }

}  // namespace

TORCH_LIBRARY(llmcomp_w4a8, lib) {
    // isa: 0 = the best this CPU has; 1 = AVX2, 2 = AVX-512 VNNI (tests run both paths).
    lib.def("mm(Tensor x, Tensor packed, Tensor scale, Tensor zterm, int group, int isa=0, int bits=4) -> Tensor");
    lib.def("isa() -> int", &isa);  // 2 AVX-512 VNNI, 1 AVX2, 0 neither
}

TORCH_LIBRARY_IMPL(llmcomp_w4a8, CPU, lib) { lib.impl("mm", &w4a8_mm_cpu); }
