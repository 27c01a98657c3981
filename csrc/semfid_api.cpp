// Host side of semfid's CUDA extension: argument checks, parameter packing and kernel dispatch.
//
// Registers the ops of namespace `semfid_C` (distinct from the Python custom ops `semfid::xattn_fwd` /
// `semfid::xattn_bwd`, whose `cuda` backend calls these; autograd and fake tensors live there):
//
//   semfid_C::fwd(q, k, v?, bias?, select?, scale, mean_heads) -> (out, lse, maps)
//   semfid_C::bwd(q, k, v?, bias?, select?, scale, mean_heads, out, lse, dout?, dmaps?) -> (dq, dk, dv)
//   semfid_C::smem_bytes(kernel, head_dim, num_keys) -> int     (for python -m semfid.info --cuda-resources)
//
// Shapes, dtypes and semantics are those of semfid/backends/base.py. Every check raises a Python
// RuntimeError naming the op and the argument; a failed launch raises with the CUDA error and all shapes.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include "kernel_traits.h"
#include "params.h"
#include "static_switch.h"

namespace semfid {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int kSupportedHeadDims[] = {40, 64, 80, 128, 160};

// ---- argument checks (each names the argument it checks) ------------------------------------------------
// OP is the op name ("semfid_C::fwd"); #x turns the argument expression into its name in the message.
#define CHECK_CUDA(OP, x) TORCH_CHECK((x).is_cuda(), OP, ": " #x " must be a CUDA tensor, got device ", (x).device())
#define CHECK_DTYPE(OP, x, dtype) \
    TORCH_CHECK((x).scalar_type() == (dtype), OP, ": " #x " must have dtype ", (dtype), ", got ", (x).scalar_type())
#define CHECK_SHAPE(OP, x, ...)                                                                             \
    TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), OP, ": " #x " must have shape (" #__VA_ARGS__ \
                ") = ", at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
#define CHECK_SAME_DEVICE(OP, x, ref) \
    TORCH_CHECK((x).device() == (ref).device(), OP, ": " #x " must be on ", (ref).device(), ", got ", (x).device())

bool is_supported_head_dim(int64_t d) {
    for (int s : kSupportedHeadDims) {
        if (s == d) return true;
    }
    return false;
}

// The kernels load 16-byte vectors: unit stride over the head dim, other strides multiples of 8
// elements, 16-byte aligned base. Anything else (rare: a sliced head dim) is copied once.
bool vector_loadable(const Tensor& t) {
    if (t.stride(-1) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
    for (int64_t i = 0; i + 1 < t.dim(); ++i) {
        if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
    }
    return true;
}

Tensor vector_ready(const Tensor& t) { return vector_loadable(t) ? t : t.contiguous(); }

// Outputs have the shapes and strides of the fake implementations in semfid/ops.py (so torch.compile's
// view of them is exact): out is contiguous, dq / dk / dv are empty_like(q / k / v). When such a
// layout cannot be written by the kernels (rare: unaligned rows), they write `work` and we copy.
struct Output {
    Tensor result;  // what the op returns
    Tensor work;    // what the kernels write (result itself, or a contiguous buffer)
    void finish() {
        if (!work.is_same(result)) result.copy_(work);
    }
};

Output output_like(const Tensor& like, bool vector_store) {
    Tensor result = at::empty_like(like);
    const bool usable = vector_store ? vector_loadable(result) : result.is_contiguous();
    return {result, usable ? result : at::empty(like.sizes(), like.options())};
}

Xattn_strides rows_strides(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

std::string describe(const char* name, const Tensor& t) {
    std::ostringstream s;
    s << name << " " << t.sizes() << " " << t.scalar_type() << " strides " << t.strides();
    return s.str();
}

std::string describe(const char* name, const OptTensor& t) {
    return t.has_value() ? describe(name, *t) : std::string(name) + " None";
}

// Checks shared by forward and backward; returns B, H, N, M, D, S through the reference arguments.
void check_common(const char* op, const Tensor& q, const Tensor& k, const OptTensor& v, const OptTensor& bias,
                  const OptTensor& select, double scale) {
    CHECK_CUDA(op, q);
    CHECK_CUDA(op, k);
    TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                ": q must be float16 or bfloat16, got ", q.scalar_type());
    CHECK_DTYPE(op, k, q.scalar_type());
    CHECK_SAME_DEVICE(op, k, q);
    TORCH_CHECK(q.dim() == 4, op, ": q must be [B, H, N, D], got shape ", q.sizes());
    const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
    TORCH_CHECK(k.dim() == 4, op, ": k must be [B, H, M, D], got shape ", k.sizes());
    const int64_t M = k.size(2);
    CHECK_SHAPE(op, k, B, H, M, D);
    TORCH_CHECK(M >= 1 && M <= kMaxKeys, op, ": k must hold 1 to ", kMaxKeys, " keys per head, got M = ", M);
    TORCH_CHECK(is_supported_head_dim(D), op, ": head dim must be one of 40, 64, 80, 128, 160, got ", D);
    TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
    if (v.has_value()) {
        CHECK_CUDA(op, *v);
        CHECK_DTYPE(op, *v, q.scalar_type());
        CHECK_SAME_DEVICE(op, *v, q);
        CHECK_SHAPE(op, *v, B, H, M, D);  // value dim == head dim (other value dims route elsewhere)
    }
    if (bias.has_value()) {
        CHECK_CUDA(op, *bias);
        CHECK_DTYPE(op, *bias, at::kFloat);
        CHECK_SAME_DEVICE(op, *bias, q);
        CHECK_SHAPE(op, *bias, B, H, M);
    }
    if (select.has_value()) {
        CHECK_CUDA(op, *select);
        CHECK_DTYPE(op, *select, at::kLong);
        CHECK_SAME_DEVICE(op, *select, q);
        TORCH_CHECK(select->dim() == 2 && select->size(0) == B && select->size(1) >= 1, op,
                    ": select must be [B, S] with S >= 1, got shape ", select->sizes());
    }
}

template <typename Params>
void fill_inputs(Params& p, const Tensor& q, const Tensor& k, const OptTensor& v, const OptTensor& bias,
                 const OptTensor& select, double scale) {
    p.q_ptr = q.data_ptr();
    p.k_ptr = k.data_ptr();
    p.v_ptr = v.has_value() ? v->data_ptr() : nullptr;
    p.q_strides = rows_strides(q);
    p.k_strides = rows_strides(k);
    p.v_strides = v.has_value() ? rows_strides(*v) : Xattn_strides{0, 0, 0};
    p.bias_ptr = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    p.bias_batch_stride = bias.has_value() ? bias->stride(0) : 0;
    p.bias_head_stride = bias.has_value() ? bias->stride(1) : 0;
    p.bias_key_stride = bias.has_value() ? bias->stride(2) : 0;
    p.select_ptr = select.has_value() ? select->data_ptr<int64_t>() : nullptr;
    p.select_batch_stride = select.has_value() ? select->stride(0) : 0;
    p.select_index_stride = select.has_value() ? select->stride(1) : 0;
    p.batch = static_cast<int>(q.size(0));
    p.heads = static_cast<int>(q.size(1));
    p.num_queries = static_cast<int>(q.size(2));
    p.num_keys = static_cast<int>(k.size(2));
    p.head_dim = static_cast<int>(q.size(3));
    p.num_selected = select.has_value() ? static_cast<int>(select->size(1)) : 0;
    p.scale = static_cast<float>(scale);
    p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
}

void check_launch(const char* op, cudaError_t err, const Tensor& q, const Tensor& k, const OptTensor& v,
                  const OptTensor& bias, const OptTensor& select) {
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err), " (",
                cudaGetErrorName(err), "); inputs: ", describe("q", q), ", ", describe("k", k), ", ",
                describe("v", v), ", ", describe("bias", bias), ", ", describe("select", select));
}

// ---------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> xattn_fwd(const Tensor& q_in, const Tensor& k_in, const OptTensor& v_in,
                                             const OptTensor& bias, const OptTensor& select, double scale,
                                             bool mean_heads) {
    constexpr const char* op = "semfid_C::fwd";
    check_common(op, q_in, k_in, v_in, bias, select, scale);
    TORCH_CHECK(q_in.size(2) <= INT32_MAX / 2, op, ": too many queries: ", q_in.size(2));
    c10::cuda::CUDAGuard device_guard(q_in.device());

    const Tensor q = vector_ready(q_in);
    const Tensor k = k_in.contiguous();  // small: [B, H, M <= 128, D]
    const OptTensor v = v_in.has_value() ? OptTensor(v_in->contiguous()) : std::nullopt;
    const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
    const auto f32 = q.options().dtype(at::kFloat);

    Tensor out = v.has_value() ? at::empty(q.sizes(), q.options()) : q.new_empty({0});
    Tensor lse = at::empty({B, H, N}, f32);
    Tensor maps = select.has_value() ? at::empty({B, H, N, select->size(1)}, f32) : at::empty({0}, f32);

    if (B * H * N > 0) {
        Xattn_fwd_params p{};
        fill_inputs(p, q, k, v, bias, select, scale);
        p.out_ptr = v.has_value() ? out.data_ptr() : nullptr;
        p.out_strides = v.has_value() ? rows_strides(out) : Xattn_strides{0, 0, 0};
        p.lse_ptr = lse.data_ptr<float>();
        p.maps_ptr = select.has_value() ? maps.data_ptr<float>() : nullptr;
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        const cudaError_t err = ELEMENT_SWITCH(q.scalar_type() == at::kBFloat16, [&] {
            return HEADDIM_SWITCH(p.head_dim, [&] { return run_xattn_fwd_<Element, kHeadDim>(p, stream); });
        });
        check_launch(op, err, q_in, k_in, v_in, bias, select);
    }
    if (select.has_value() && mean_heads) maps = maps.mean(1);  // ordered reduction over heads
    return {out, lse, maps};
}

// ---------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> xattn_bwd(const Tensor& q_in, const Tensor& k_in, const OptTensor& v_in,
                                             const OptTensor& bias, const OptTensor& select, double scale,
                                             bool mean_heads, const Tensor& out, const Tensor& lse_in,
                                             const OptTensor& dout_in, const OptTensor& dmaps_in) {
    constexpr const char* op = "semfid_C::bwd";
    check_common(op, q_in, k_in, v_in, bias, select, scale);
    TORCH_CHECK(q_in.size(2) <= INT32_MAX / 2, op, ": too many queries: ", q_in.size(2));
    const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), M = k_in.size(2), D = q_in.size(3);
    CHECK_CUDA(op, lse_in);
    CHECK_DTYPE(op, lse_in, at::kFloat);
    CHECK_SHAPE(op, lse_in, B, H, N);
    (void)out;  // delta is rowsum(P * dP), computed from recomputed P: the output itself is not needed
    const bool use_dout = v_in.has_value() && dout_in.has_value();
    if (use_dout) {
        CHECK_CUDA(op, *dout_in);
        CHECK_DTYPE(op, *dout_in, q_in.scalar_type());
        CHECK_SHAPE(op, *dout_in, B, H, N, D);
    }
    const bool has_dmaps = select.has_value() && dmaps_in.has_value();
    if (has_dmaps) {
        CHECK_CUDA(op, *dmaps_in);
        const int64_t S = select->size(1);
        if (mean_heads) {
            CHECK_SHAPE(op, *dmaps_in, B, N, S);
        } else {
            CHECK_SHAPE(op, *dmaps_in, B, H, N, S);
        }
    }
    c10::cuda::CUDAGuard device_guard(q_in.device());

    const Tensor q = vector_ready(q_in);
    const Tensor k = k_in.contiguous();
    const OptTensor v = v_in.has_value() ? OptTensor(v_in->contiguous()) : std::nullopt;
    const Tensor lse = lse_in.contiguous();
    const OptTensor dout = use_dout ? OptTensor(vector_ready(*dout_in)) : std::nullopt;
    const OptTensor dmaps = has_dmaps ? OptTensor(dmaps_in->to(at::kFloat)) : std::nullopt;
    const auto f32 = q.options().dtype(at::kFloat);

    Output dq = output_like(q_in, /*vector_store=*/true);
    Output dk = output_like(k_in, /*vector_store=*/false);  // the reduce kernel writes [B, H, M, D]
    Output dv = v_in.has_value() ? output_like(*v_in, false) : Output{q.new_empty({0}), q.new_empty({0})};
    if (B * H == 0) return {dq.result, dk.result, dv.result};
    if (N == 0) {
        dk.result.zero_();
        dv.result.zero_();
        return {dq.result, dk.result, dv.result};
    }

    // Split the queries so that the dkdv grid has ~512 blocks; the split depends on shapes only, so
    // the order of the partial sums (and the bits of dk, dv) is the same on every run and device.
    const int64_t query_tiles = (N + dkdv_block_queries(D) - 1) / dkdv_block_queries(D);
    const int64_t key_blocks = (M + 63) / 64;
    const int64_t wanted = std::max<int64_t>(1, (512 + key_blocks * B * H - 1) / (key_blocks * B * H));
    const int64_t tiles_per_split = (query_tiles + std::min(wanted, query_tiles) - 1) / std::min(wanted, query_tiles);
    const int64_t splits = (query_tiles + tiles_per_split - 1) / tiles_per_split;
    TORCH_CHECK(splits <= 65535, op, ": too many query splits: ", splits);

    Tensor delta = at::empty({B, H, N}, f32);
    Tensor dk_partial = at::empty({splits, B, H, M, D}, f32);
    Tensor dv_partial = use_dout ? at::empty({splits, B, H, M, D}, f32) : at::empty({0}, f32);

    Xattn_bwd_params p{};
    fill_inputs(p, q, k, v, bias, select, scale);
    p.lse_ptr = lse.data_ptr<float>();
    p.dout_ptr = use_dout ? dout->data_ptr() : nullptr;
    p.dout_strides = use_dout ? rows_strides(*dout) : Xattn_strides{0, 0, 0};
    p.dmaps_ptr = has_dmaps ? dmaps->data_ptr<float>() : nullptr;
    if (has_dmaps && mean_heads) {  // [B, N, S], the same gradient / H for every head
        p.dmaps_batch_stride = dmaps->stride(0);
        p.dmaps_head_stride = 0;
        p.dmaps_row_stride = dmaps->stride(1);
        p.dmaps_index_stride = dmaps->stride(2);
        p.dmaps_scale = 1.f / static_cast<float>(H);
    } else if (has_dmaps) {
        p.dmaps_batch_stride = dmaps->stride(0);
        p.dmaps_head_stride = dmaps->stride(1);
        p.dmaps_row_stride = dmaps->stride(2);
        p.dmaps_index_stride = dmaps->stride(3);
        p.dmaps_scale = 1.f;
    }
    p.dq_ptr = dq.work.data_ptr();
    p.dq_strides = rows_strides(dq.work);
    p.dk_ptr = dk.work.data_ptr();
    p.dv_ptr = use_dout ? dv.work.data_ptr() : nullptr;
    p.delta_ptr = delta.data_ptr<float>();
    p.dk_partial_ptr = dk_partial.data_ptr<float>();
    p.dv_partial_ptr = use_dout ? dv_partial.data_ptr<float>() : nullptr;
    p.num_splits = static_cast<int>(splits);
    p.query_tiles_per_split = static_cast<int>(tiles_per_split);

    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const cudaError_t err = ELEMENT_SWITCH(q.scalar_type() == at::kBFloat16, [&] {
        return HEADDIM_SWITCH(p.head_dim, [&] { return run_xattn_bwd_<Element, kHeadDim>(p, stream); });
    });
    check_launch(op, err, q_in, k_in, v_in, bias, select);
    if (v.has_value() && !use_dout) dv.work.zero_();  // no gradient reaches out, so none reaches v
    dq.finish();
    dk.finish();
    dv.finish();
    return {dq.result, dk.result, dv.result};
}

// Dynamic shared memory (bytes) one block of `kernel` ("fwd", "bwd_dq", "bwd_dkdv") asks for, with
// every optional input present; reported by python -m semfid.info --cuda-resources.
int64_t smem_bytes(const std::string& kernel, int64_t head_dim, int64_t num_keys) {
    TORCH_CHECK(is_supported_head_dim(head_dim), "semfid_C::smem_bytes: head_dim must be one of 40, 64, 80, 128, 160, got ",
                head_dim);
    TORCH_CHECK(num_keys >= 1 && num_keys <= kMaxKeys, "semfid_C::smem_bytes: num_keys must be in [1, ", kMaxKeys,
                "], got ", num_keys);
    const int m = static_cast<int>(num_keys);
    return HEADDIM_SWITCH(head_dim, [&]() -> int64_t {
        using Traits = Xattn_kernel_traits<kHeadDim>;
        if (kernel == "fwd") return xattn_fwd_smem_layout<Traits>(m, true, true).total;
        if (kernel == "bwd_dq") return xattn_bwd_dq_smem_layout<Traits>(m, true, true).total;
        if (kernel == "bwd_dkdv") return xattn_bwd_dkdv_smem_layout<Traits>(true, true).total;
        TORCH_CHECK(false, "semfid_C::smem_bytes: kernel must be fwd, bwd_dq or bwd_dkdv, got ", kernel);
    });
}

}  // namespace
}  // namespace semfid

TORCH_LIBRARY(semfid_C, m) {
    m.def("fwd(Tensor q, Tensor k, Tensor? v, Tensor? bias, Tensor? select, float scale, bool mean_heads)"
          " -> (Tensor, Tensor, Tensor)");
    m.def("bwd(Tensor q, Tensor k, Tensor? v, Tensor? bias, Tensor? select, float scale, bool mean_heads,"
          " Tensor out, Tensor lse, Tensor? dout, Tensor? dmaps) -> (Tensor, Tensor, Tensor)");
    m.def("smem_bytes(str kernel, int head_dim, int num_keys) -> int", &semfid::smem_bytes);
}

TORCH_LIBRARY_IMPL(semfid_C, CUDA, m) {
    m.impl("fwd", &semfid::xattn_fwd);
    m.impl("bwd", &semfid::xattn_bwd);
}

// `import semfid._C` loads this library, which registers the ops above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                        "semfid CUDA kernels, registered as torch.ops.semfid_C", -1, nullptr};
    return PyModule_Create(&module);
}
