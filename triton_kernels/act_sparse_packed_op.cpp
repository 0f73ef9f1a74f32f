// The cpu_sparse_packed kernel (act_sparse_packed.c, compiled separately with its ISA flags and
// linked in) as the torch operator llmcomp_sparse::gemv, so eager calls and compiled graphs reach it
// through the C++ dispatcher: about 4 us per call, where the Python custom op with its ctypes call
// costs about 10 us, and a decoded SmolLM2 token makes up to 210 of these calls.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

extern "C" {
int sparse_gemv_int4(const void* x, int x_bf16, const float* norms, int64_t k, int64_t keep, const uint8_t* codes,
                     int64_t width, const float* scale, const float* offset, int64_t group, void* y, int y_bf16);
int sparse_gemv_int8(const void* x, int x_bf16, const float* norms, int64_t k, int64_t keep, const int8_t* codes,
                     int64_t width, const float* scale, const float* offset, int64_t group, void* y, int y_bf16);
}

namespace {

// The same contract as check_inputs in act_sparse_packed.py (which also runs at trace time); kept
// here so that no call can make the C code read out of bounds.
void check(const at::Tensor& x, const std::optional<at::Tensor>& norms, const at::Tensor& codes,
           const at::Tensor& scale, const at::Tensor& offset, int64_t keep, int64_t group, int64_t bits) {
    TORCH_CHECK(bits == 4 || bits == 8, "act_sparse_packed: bits must be 4 or 8, got ", bits);
    TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() &&
                    codes.scalar_type() == (bits == 4 ? at::kByte : at::kChar),
                "act_sparse_packed: codes must be contiguous ", bits == 4 ? "uint8" : "int8", " [K, width]");
    const int64_t k = codes.size(0), n = codes.size(1) * (bits == 4 ? 2 : 1);
    TORCH_CHECK(x.dim() == 1 && x.size(0) == k && x.is_contiguous() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                "act_sparse_packed: x must be one contiguous float32/bfloat16 row of ", k);
    TORCH_CHECK(scale.dim() == 2 && scale.size(1) == n && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                    offset.sizes() == scale.sizes() && offset.scalar_type() == at::kFloat && offset.is_contiguous(),
                "act_sparse_packed: scale/offset must be contiguous float32 [groups, ", n, "]");
    TORCH_CHECK(!norms || (norms->dim() == 1 && norms->size(0) == k && norms->scalar_type() == at::kFloat &&
                           norms->is_contiguous()),
                "act_sparse_packed: norms must be contiguous float32 [", k, "]");
    TORCH_CHECK(keep >= 1 && keep <= k && group >= 1 && scale.size(0) * group >= k, "act_sparse_packed: keep ", keep,
                " not in [1, ", k, "] or groups ", scale.size(0), " x ", group, " do not cover ", k);
}

// Packed weights registered once (at prepare) and named by an int handle in every call: the
// compiled decode step then passes ints, not four tensors per layer, and torch.compile's guards
// (checked before every step, about a microsecond per tensor) stay as few as the dense path's.
struct Weights {
    at::Tensor codes, scale, offset;
    std::optional<at::Tensor> norms;
    int64_t group = 0, bits = 0;
};
std::mutex registry_mutex;
std::vector<std::optional<Weights>> registry;  // index = handle; released entries are empty

int64_t put(const std::optional<at::Tensor>& norms, const at::Tensor& codes, const at::Tensor& scale,
            const at::Tensor& offset, int64_t group, int64_t bits) {
    TORCH_CHECK(codes.dim() == 2 && codes.size(0) >= 1, "act_sparse_packed: codes must be [K, width]");
    check(at::empty({codes.size(0)}, scale.options()), norms, codes, scale, offset, 1, group, bits);
    std::lock_guard<std::mutex> lock(registry_mutex);
    registry.push_back(Weights{codes, scale, offset, norms, group, bits});
    return static_cast<int64_t>(registry.size()) - 1;
}

void drop(int64_t handle) {
    std::lock_guard<std::mutex> lock(registry_mutex);
    if (handle >= 0 && handle < static_cast<int64_t>(registry.size())) registry[handle].reset();
}

// One row x through the registered weights `handles` (q/k/v or gate/up siblings read the same row;
// one layer is a list of one), each keeping keep[i] inputs: outputs concatenated, N_pad each.
at::Tensor gemv(const at::Tensor& x, at::IntArrayRef handles, at::IntArrayRef keep) {
    TORCH_CHECK(handles.size() >= 1 && keep.size() == handles.size(), "act_sparse_packed: one keep per handle");
    TORCH_CHECK(x.dim() == 1 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                "act_sparse_packed: x must be one contiguous float32/bfloat16 row");
    std::vector<Weights> parts;
    int64_t total = 0;
    {
        std::lock_guard<std::mutex> lock(registry_mutex);
        for (size_t i = 0; i < handles.size(); ++i) {
            const int64_t h = handles[i];
            TORCH_CHECK(h >= 0 && h < static_cast<int64_t>(registry.size()) && registry[h],
                        "act_sparse_packed: no registered weights ", h);
            parts.push_back(*registry[h]);
        }
    }
    for (size_t i = 0; i < parts.size(); ++i) {
        const Weights& w = parts[i];
        TORCH_CHECK(x.size(0) == w.codes.size(0) && keep[i] >= 1 && keep[i] <= x.size(0),
                    "act_sparse_packed: x has ", x.size(0), " inputs, weights ", handles[i], " have ", w.codes.size(0),
                    ", keep ", keep[i]);
        total += w.codes.size(1) * (w.bits == 4 ? 2 : 1);
    }
    at::Tensor y = at::empty({total}, x.options());
    const int bf16 = x.scalar_type() == at::kBFloat16;
    char* out = static_cast<char*>(y.data_ptr());
    for (size_t i = 0; i < parts.size(); ++i) {
        const Weights& w = parts[i];
        const int64_t width = w.codes.size(1);
        const float* nptr = w.norms ? w.norms->data_ptr<float>() : nullptr;
        const int rc = w.bits == 4
            ? sparse_gemv_int4(x.data_ptr(), bf16, nptr, x.size(0), keep[i], w.codes.data_ptr<uint8_t>(), width,
                               w.scale.data_ptr<float>(), w.offset.data_ptr<float>(), w.group, out, bf16)
            : sparse_gemv_int8(x.data_ptr(), bf16, nptr, x.size(0), keep[i], w.codes.data_ptr<int8_t>(), width,
                               w.scale.data_ptr<float>(), w.offset.data_ptr<float>(), w.group, out, bf16);
        TORCH_CHECK(rc == 0, "act_sparse_packed: out of memory for its scratch buffers");
        out += width * (w.bits == 4 ? 2 : 1) * y.element_size();
    }
    return y;
}

}  // namespace

TORCH_LIBRARY(llmcomp_sparse, lib) {
    lib.def("put(Tensor? norms, Tensor codes, Tensor scale, Tensor offset, int group, int bits) -> int", &put);
    lib.def("drop(int handle) -> ()", &drop);
    lib.def("gemv(Tensor x, int[] handles, int[] keep) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmcomp_sparse, CPU, lib) { lib.impl("gemv", &gemv); }
