// Host side of semfid's CUDA extension: argument checks, parameter packing and kernel dispatch.
//
// Registers the ops of namespace `semfid_C` (distinct from the Python custom ops `semfid::*`, whose
// `cuda` backend calls these; autograd and fake tensors live there). Flat signatures of CONTRACT.md:
//
//   xattn_fwd(q, k, v?, bias?, select?, scale, mean_heads) -> (out, lse, maps)
//   xattn_bwd(q, k, v?, bias?, select?, scale, mean_heads, out, lse, dout?, dmaps?) -> (dq, dk, dv)
//   subject_fwd(q, k, v, k_ref, bias?, ref_bias?, tokens, ref_tokens, weights?, scale, mean_heads,
//               detach_reference, return_maps) -> (out, lse, lse_ref, loss, maps, diff)
//   subject_bwd(q, k, v, k_ref, bias?, ref_bias?, tokens, ref_tokens, weights?, scale, mean_heads,
//               detach_reference, out, lse, lse_ref, diff, dout?, dloss?, dmaps?) -> (dq, dk, dv, dk_ref)
//   smem_bytes(kernel, head_dim, num_keys, num_selected) -> int  (python -m semfid.info --cuda-resources)
//
// Layouts: q, k, v, k_ref and dout are read through their strides (no copies for diffusers'
// transposed views); out has [B, N, H, D] memory seen as [B, H, N, D]; dq, dk, dv, dk_ref have the
// strides of q, k, v, k_ref (empty_like). Every launch runs on q's device and its current stream.
// Every check raises a Python RuntimeError naming the op and the argument; a failed launch raises with
// the CUDA error and all shapes.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
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

// ---- argument checks (each names the argument it checks) ------------------------------------------------
// OP is the op name ("semfid_C::xattn_fwd"); #x turns the argument expression into its name in the message.
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
OptTensor vector_ready(const OptTensor& t) { return t.has_value() ? OptTensor(vector_ready(*t)) : std::nullopt; }

// dq has the strides of q (empty_like), as the fakes in semfid/ops.py say. When the dq kernel cannot
// store to that layout (rare: unaligned rows) it writes `work` and we copy.
struct Output {
    Tensor result;  // what the op returns
    Tensor work;    // what the kernels write (result itself, or a contiguous buffer)
    void finish() {
        if (!work.is_same(result)) result.copy_(work);
    }
};

Output output_like(const Tensor& like) {
    Tensor result = at::empty_like(like);
    return {result, vector_loadable(result) ? result : at::empty(like.sizes(), like.options())};
}

// out [B, H, N, D] over [B, N, H, D] memory: the processor's out.transpose(1, 2).reshape(B, N, H * D) is a view.
Tensor empty_output(const Tensor& q, int64_t value_dim) {
    return at::empty({q.size(0), q.size(2), q.size(1), value_dim}, q.options()).transpose(1, 2);
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

void check_keys(const char* op, const char* name, const Tensor& q, const Tensor& k) {
    CHECK_CUDA(op, k);
    CHECK_DTYPE(op, k, q.scalar_type());
    CHECK_SAME_DEVICE(op, k, q);
    TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op, ": ",
                name, " must be [B, H, M, D] = [", q.size(0), ", ", q.size(1), ", M, ", q.size(3), "], got shape ",
                k.sizes());
    TORCH_CHECK(k.size(2) >= 1 && k.size(2) <= kMaxKeys, op, ": ", name, " must hold 1 to ", kMaxKeys,
                " keys per head, got M = ", k.size(2));
}

void check_bias(const char* op, const char* name, const OptTensor& bias, const Tensor& q, const Tensor& k) {
    if (!bias.has_value()) return;
    CHECK_CUDA(op, *bias);
    TORCH_CHECK(bias->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", bias->scalar_type());
    CHECK_SAME_DEVICE(op, *bias, q);
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({q.size(0), q.size(1), k.size(2)}), op, ": ", name,
                " must have shape [B, H, M] = ", at::IntArrayRef({q.size(0), q.size(1), k.size(2)}), ", got ",
                bias->sizes());
}

void check_selection(const char* op, const char* name, const Tensor& select, const Tensor& q) {
    CHECK_CUDA(op, select);
    TORCH_CHECK(select.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", select.scalar_type());
    CHECK_SAME_DEVICE(op, select, q);
    TORCH_CHECK(select.dim() == 2 && select.size(0) == q.size(0) && select.size(1) >= 1 &&
                    select.size(1) <= kMaxSelected,
                op, ": ", name, " must be [B, S] with 1 <= S <= ", kMaxSelected, ", got shape ", select.sizes());
}

// Checks shared by every op on q, k, v, bias, select.
void check_common(const char* op, const Tensor& q, const Tensor& k, const OptTensor& v, const OptTensor& bias,
                  const OptTensor& select, double scale) {
    CHECK_CUDA(op, q);
    TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                ": q must be float16 or bfloat16, got ", q.scalar_type());
    TORCH_CHECK(q.dim() == 4, op, ": q must be [B, H, N, D], got shape ", q.sizes());
    TORCH_CHECK(q.size(2) <= INT32_MAX / 2, op, ": too many queries: ", q.size(2));
    TORCH_CHECK(is_supported_head_dim(q.size(3)), op, ": head dim must be one of ", kSupportedHeadDimsText, ", got ",
                q.size(3));
    check_keys(op, "k", q, k);
    TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
    if (v.has_value()) {
        CHECK_CUDA(op, *v);
        CHECK_DTYPE(op, *v, q.scalar_type());
        CHECK_SAME_DEVICE(op, *v, q);
        CHECK_SHAPE(op, *v, k.size(0), k.size(1), k.size(2), k.size(3));  // value dim == head dim
    }
    check_bias(op, "bias", bias, q, k);
    if (select.has_value()) check_selection(op, "select", *select, q);
}

void check_row_stats(const char* op, const char* name, const Tensor& t, const Tensor& q) {
    CHECK_CUDA(op, t);
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}), op, ": ", name,
                " must have shape [B, H, N] = ", at::IntArrayRef({q.size(0), q.size(1), q.size(2)}), ", got ", t.sizes());
}

void fill_key_set(Xattn_bwd_params& p, const Tensor& k, const OptTensor& v, const OptTensor& bias,
                  const OptTensor& select) {
    p.k_ptr = k.data_ptr();
    p.k_strides = rows_strides(k);
    p.v_ptr = v.has_value() ? v->data_ptr() : nullptr;
    p.v_strides = v.has_value() ? rows_strides(*v) : Xattn_strides{0, 0, 0};
    p.bias_ptr = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    p.bias_batch_stride = bias.has_value() ? bias->stride(0) : 0;
    p.bias_head_stride = bias.has_value() ? bias->stride(1) : 0;
    p.bias_key_stride = bias.has_value() ? bias->stride(2) : 0;
    p.select_ptr = select.has_value() ? select->data_ptr<int64_t>() : nullptr;
    p.select_batch_stride = select.has_value() ? select->stride(0) : 0;
    p.select_index_stride = select.has_value() ? select->stride(1) : 0;
    p.num_keys = static_cast<int>(k.size(2));
    p.num_selected = select.has_value() ? static_cast<int>(select->size(1)) : 0;
}

void fill_sizes(Xattn_bwd_params& p, const Tensor& q, double scale) {
    p.q_ptr = q.data_ptr();
    p.q_strides = rows_strides(q);
    p.batch = static_cast<int>(q.size(0));
    p.heads = static_cast<int>(q.size(1));
    p.num_queries = static_cast<int>(q.size(2));
    p.head_dim = static_cast<int>(q.size(3));
    p.scale = static_cast<float>(scale);
    p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
}

Xattn_fwd_params fwd_params(const Tensor& q, const Tensor& k, const OptTensor& v, const OptTensor& bias,
                            const OptTensor& select, double scale, bool mean_heads) {
    Xattn_fwd_params p{};
    p.q_ptr = q.data_ptr();
    p.q_strides = rows_strides(q);
    p.k_ptr = k.data_ptr();
    p.k_strides = rows_strides(k);
    p.v_ptr = v.has_value() ? v->data_ptr() : nullptr;
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
    p.mean_heads = mean_heads;
    // Head-mean maps are averaged on chip: one block loops over every head of its query rows.
    p.heads_per_block = mean_heads && select.has_value() ? p.heads : 1;
    p.scale = static_cast<float>(scale);
    p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
    return p;
}

void check_launch(const char* op, cudaError_t err, const Tensor& q, const Tensor& k, const OptTensor& v,
                  const OptTensor& bias, const OptTensor& select) {
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err), " (",
                cudaGetErrorName(err), "); inputs: ", describe("q", q), ", ", describe("k", k), ", ",
                describe("v", v), ", ", describe("bias", bias), ", ", describe("select", select));
}

// Query splits of the dkdv kernels: ~512 blocks, from the shapes only, so the order of the partial
// sums (and the bits of dk, dv) is the same on every run and every GPU (never the SM count).
void set_splits(const char* op, Xattn_bwd_params& p) {
    const int64_t block_q = dkdv_block_queries(p.head_dim);
    const int64_t query_tiles = (p.num_queries + block_q - 1) / block_q;
    const int64_t key_blocks = (p.num_keys + 79) / 80;  // Traits::kBlockN
    const int64_t bh = static_cast<int64_t>(p.batch) * p.heads;
    const int64_t wanted = std::min(query_tiles, std::max<int64_t>(1, (512 + key_blocks * bh - 1) / (key_blocks * bh)));
    const int64_t tiles_per_split = (query_tiles + wanted - 1) / wanted;
    const int64_t splits = (query_tiles + tiles_per_split - 1) / tiles_per_split;
    TORCH_CHECK(splits <= 65535, op, ": too many query splits: ", splits);
    p.num_splits = static_cast<int>(splits);
    p.query_tiles_per_split = static_cast<int>(tiles_per_split);
}

void set_dmaps(Xattn_bwd_params& p, const Tensor& dmaps, bool mean_heads, int64_t heads) {
    p.dmaps_ptr = dmaps.data_ptr<float>();
    if (mean_heads) {  // [B, N, S], the same gradient / H for every head
        p.dmaps_batch_stride = dmaps.stride(0);
        p.dmaps_head_stride = 0;
        p.dmaps_row_stride = dmaps.stride(1);
        p.dmaps_index_stride = dmaps.stride(2);
        p.dmaps_scale = 1.f / static_cast<float>(heads);
    } else {
        p.dmaps_batch_stride = dmaps.stride(0);
        p.dmaps_head_stride = dmaps.stride(1);
        p.dmaps_row_stride = dmaps.stride(2);
        p.dmaps_index_stride = dmaps.stride(3);
        p.dmaps_scale = 1.f;
    }
}

void check_dmaps(const char* op, const Tensor& dmaps, const Tensor& q, int64_t S, bool mean_heads) {
    CHECK_CUDA(op, dmaps);
    CHECK_SAME_DEVICE(op, dmaps, q);
    const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
    if (mean_heads) {
        CHECK_SHAPE(op, dmaps, B, N, S);
    } else {
        CHECK_SHAPE(op, dmaps, B, H, N, S);
    }
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// ---------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> xattn_fwd(const Tensor& q_in, const Tensor& k_in, const OptTensor& v_in,
                                             const OptTensor& bias, const OptTensor& select, double scale,
                                             bool mean_heads) {
    constexpr const char* op = "semfid_C::xattn_fwd";
    check_common(op, q_in, k_in, v_in, bias, select, scale);
    const c10::cuda::CUDAGuard device_guard(q_in.device());

    const Tensor q = vector_ready(q_in), k = vector_ready(k_in);
    const OptTensor v = vector_ready(v_in);
    const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
    const auto f32 = q.options().dtype(at::kFloat);

    Tensor out = v.has_value() ? empty_output(q, v->size(3)) : q.new_empty({0});
    Tensor lse = at::empty({B, H, N}, f32);
    Tensor maps = !select.has_value() ? at::empty({0}, f32)
                : mean_heads          ? at::empty({B, N, select->size(1)}, f32)
                                      : at::empty({B, H, N, select->size(1)}, f32);
    if (B * H * N == 0) return {out, lse, maps};

    Xattn_fwd_params p = fwd_params(q, k, v, bias, select, scale, mean_heads);
    p.out_ptr = v.has_value() ? out.data_ptr() : nullptr;
    p.out_strides = v.has_value() ? rows_strides(out) : Xattn_strides{0, 0, 0};
    p.lse_ptr = lse.data_ptr<float>();
    p.maps_ptr = select.has_value() ? maps.data_ptr<float>() : nullptr;
    const cudaStream_t stream = current_stream();
    const cudaError_t err = ELEMENT_SWITCH(q.scalar_type() == at::kBFloat16, [&] {
        return HEADDIM_SWITCH(p.head_dim, [&] { return run_xattn_fwd_<Element, kHeadDim>(p, stream); });
    });
    check_launch(op, err, q_in, k_in, v_in, bias, select);
    return {out, lse, maps};
}

// ---------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> xattn_bwd(const Tensor& q_in, const Tensor& k_in, const OptTensor& v_in,
                                             const OptTensor& bias, const OptTensor& select, double scale,
                                             bool mean_heads, const Tensor& out, const Tensor& lse_in,
                                             const OptTensor& dout_in, const OptTensor& dmaps_in) {
    constexpr const char* op = "semfid_C::xattn_bwd";
    check_common(op, q_in, k_in, v_in, bias, select, scale);
    check_row_stats(op, "lse", lse_in, q_in);
    (void)out;  // delta is rowsum(P * dP), computed from recomputed P: the output itself is not needed
    const bool use_dout = v_in.has_value() && dout_in.has_value();
    if (use_dout) {
        CHECK_CUDA(op, *dout_in);
        CHECK_DTYPE(op, *dout_in, q_in.scalar_type());
        CHECK_SHAPE(op, *dout_in, q_in.size(0), q_in.size(1), q_in.size(2), q_in.size(3));
    }
    const bool has_dmaps = select.has_value() && dmaps_in.has_value();
    if (has_dmaps) check_dmaps(op, *dmaps_in, q_in, select->size(1), mean_heads);
    const c10::cuda::CUDAGuard device_guard(q_in.device());

    const Tensor q = vector_ready(q_in), k = vector_ready(k_in);
    const OptTensor v = vector_ready(v_in);
    const Tensor lse = lse_in.contiguous();
    const OptTensor dout = use_dout ? vector_ready(dout_in) : std::nullopt;
    const OptTensor dmaps = has_dmaps ? OptTensor(dmaps_in->to(at::kFloat)) : std::nullopt;
    const int64_t B = q.size(0), H = q.size(1), N = q.size(2), M = k.size(2), D = q.size(3);
    const auto f32 = q.options().dtype(at::kFloat);

    Output dq = output_like(q_in);
    Tensor dk = at::empty_like(k_in);  // the reduce kernel writes through any strides
    Tensor dv = v_in.has_value() ? at::empty_like(*v_in) : q.new_empty({0});
    if (B * H == 0) return {dq.result, dk, dv};
    if (N == 0) {
        dk.zero_();
        dv.zero_();
        return {dq.result, dk, dv};
    }

    Xattn_bwd_params p{};
    fill_sizes(p, q, scale);
    fill_key_set(p, k, v, bias, select);
    set_splits(op, p);
    p.lse_ptr = lse.data_ptr<float>();
    p.dout_ptr = use_dout ? dout->data_ptr() : nullptr;
    p.dout_strides = use_dout ? rows_strides(*dout) : Xattn_strides{0, 0, 0};
    if (has_dmaps) set_dmaps(p, *dmaps, mean_heads, H);
    Tensor delta = at::empty({B, H, N}, f32);
    Tensor dk_partial = at::empty({p.num_splits, B, H, M, D}, f32);
    Tensor dv_partial = use_dout ? at::empty({p.num_splits, B, H, M, D}, f32) : at::empty({0}, f32);
    p.dq_ptr = dq.work.data_ptr();
    p.dq_strides = rows_strides(dq.work);
    p.dk_ptr = dk.data_ptr();
    p.dk_strides = rows_strides(dk);
    p.dv_ptr = use_dout ? dv.data_ptr() : nullptr;
    p.dv_strides = use_dout ? rows_strides(dv) : Xattn_strides{0, 0, 0};
    p.delta_ptr = delta.data_ptr<float>();
    p.dk_partial_ptr = dk_partial.data_ptr<float>();
    p.dv_partial_ptr = use_dout ? dv_partial.data_ptr<float>() : nullptr;

    const cudaStream_t stream = current_stream();
    const cudaError_t err = ELEMENT_SWITCH(q.scalar_type() == at::kBFloat16, [&] {
        return HEADDIM_SWITCH(p.head_dim, [&] { return run_xattn_bwd_<Element, kHeadDim>(p, stream); });
    });
    check_launch(op, err, q_in, k_in, v_in, bias, select);
    if (v.has_value() && !use_dout) dv.zero_();  // no gradient reaches out, so none reaches v
    dq.finish();
    return {dq.result, dk, dv};
}

// ---------------------------------------------------------------------------------------------------------
// The subject-wise op. Checks of k_ref, ref_bias, tokens, ref_tokens, weights on top of check_common.
void check_subject(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_ref,
                   const OptTensor& bias, const OptTensor& ref_bias, const Tensor& tokens, const Tensor& ref_tokens,
                   const OptTensor& weights, double scale) {
    check_common(op, q, k, v, bias, tokens, scale);
    check_keys(op, "k_ref", q, k_ref);
    check_bias(op, "ref_bias", ref_bias, q, k_ref);
    check_selection(op, "ref_tokens", ref_tokens, q);
    TORCH_CHECK(ref_tokens.sizes() == tokens.sizes(), op, ": ref_tokens must have the shape of tokens ",
                tokens.sizes(), ", got ", ref_tokens.sizes());
    if (weights.has_value()) {
        CHECK_CUDA(op, *weights);
        CHECK_DTYPE(op, *weights, at::kFloat);
        CHECK_SAME_DEVICE(op, *weights, q);
        CHECK_SHAPE(op, *weights, tokens.size(0), tokens.size(1));
    }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> subject_fwd(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& k_ref_in, const OptTensor& bias,
    const OptTensor& ref_bias, const Tensor& tokens, const Tensor& ref_tokens, const OptTensor& weights, double scale,
    bool mean_heads, bool detach_reference, bool return_maps) {
    constexpr const char* op = "semfid_C::subject_fwd";
    check_subject(op, q_in, k_in, v_in, k_ref_in, bias, ref_bias, tokens, ref_tokens, weights, scale);
    const c10::cuda::CUDAGuard device_guard(q_in.device());

    const Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in), k_ref = vector_ready(k_ref_in);
    const int64_t B = q.size(0), H = q.size(1), N = q.size(2), S = tokens.size(1);
    const auto f32 = q.options().dtype(at::kFloat);
    const bool keep_lse_ref = !(mean_heads && detach_reference);  // CONTRACT.md: backward recomputes P_r then

    Tensor out = empty_output(q, v.size(3));
    Tensor lse = at::empty({B, H, N}, f32);
    Tensor lse_ref = keep_lse_ref ? at::empty({B, H, N}, f32) : at::empty({0}, f32);
    Tensor loss = at::empty({B}, f32);
    Tensor maps = !return_maps ? at::empty({0}, f32) : mean_heads ? at::empty({B, N, S}, f32) : at::empty({B, H, N, S}, f32);
    Tensor diff = mean_heads ? at::empty({B, N, S}, f32) : at::empty({0}, f32);
    if (B * H * N == 0) {
        loss.zero_();
        return {out, lse, lse_ref, loss, maps, diff};
    }

    const OptTensor v_opt(v), tokens_opt(tokens);
    Xattn_fwd_params p = fwd_params(q, k, v_opt, bias, tokens_opt, scale, mean_heads);
    p.k_ref_ptr = k_ref.data_ptr();
    p.k_ref_strides = rows_strides(k_ref);
    p.num_ref_keys = static_cast<int>(k_ref.size(2));
    p.ref_bias_ptr = ref_bias.has_value() ? ref_bias->data_ptr<float>() : nullptr;
    p.ref_bias_batch_stride = ref_bias.has_value() ? ref_bias->stride(0) : 0;
    p.ref_bias_head_stride = ref_bias.has_value() ? ref_bias->stride(1) : 0;
    p.ref_bias_key_stride = ref_bias.has_value() ? ref_bias->stride(2) : 0;
    p.ref_select_ptr = ref_tokens.data_ptr<int64_t>();
    p.ref_select_batch_stride = ref_tokens.stride(0);
    p.ref_select_index_stride = ref_tokens.stride(1);
    p.weights_ptr = weights.has_value() ? weights->data_ptr<float>() : nullptr;
    p.weights_batch_stride = weights.has_value() ? weights->stride(0) : 0;
    p.weights_index_stride = weights.has_value() ? weights->stride(1) : 0;
    p.out_ptr = out.data_ptr();
    p.out_strides = rows_strides(out);
    p.lse_ptr = lse.data_ptr<float>();
    p.lse_ref_ptr = keep_lse_ref ? lse_ref.data_ptr<float>() : nullptr;
    p.maps_ptr = return_maps ? maps.data_ptr<float>() : nullptr;
    p.diff_ptr = mean_heads ? diff.data_ptr<float>() : nullptr;
    const int64_t query_blocks = (N + 63) / 64;  // Traits::kBlockM
    Tensor loss_partial = at::empty({B, H / p.heads_per_block, query_blocks}, f32);
    p.loss_partial_ptr = loss_partial.data_ptr<float>();
    p.loss_ptr = loss.data_ptr<float>();

    const cudaStream_t stream = current_stream();
    const cudaError_t err = ELEMENT_SWITCH(q.scalar_type() == at::kBFloat16, [&] {
        return HEADDIM_SWITCH(p.head_dim, [&] { return run_xattn_fwd_<Element, kHeadDim>(p, stream); });
    });
    check_launch(op, err, q_in, k_in, v_in, bias, tokens);
    return {out, lse, lse_ref, loss, maps, diff};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> subject_bwd(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& k_ref_in, const OptTensor& bias,
    const OptTensor& ref_bias, const Tensor& tokens, const Tensor& ref_tokens, const OptTensor& weights, double scale,
    bool mean_heads, bool detach_reference, const Tensor& out, const Tensor& lse_in, const Tensor& lse_ref_in,
    const Tensor& diff_in, const OptTensor& dout_in, const OptTensor& dloss_in, const OptTensor& dmaps_in) {
    constexpr const char* op = "semfid_C::subject_bwd";
    check_subject(op, q_in, k_in, v_in, k_ref_in, bias, ref_bias, tokens, ref_tokens, weights, scale);
    (void)out;
    const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3), S = tokens.size(1);
    const int64_t M = k_in.size(2), M_ref = k_ref_in.size(2);
    check_row_stats(op, "lse", lse_in, q_in);
    const bool has_loss = dloss_in.has_value();
    const bool recompute_diff = has_loss && !mean_heads;
    const bool reference_grad = has_loss && !detach_reference;
    if (recompute_diff || reference_grad) check_row_stats(op, "lse_ref", lse_ref_in, q_in);
    if (has_loss) {
        CHECK_CUDA(op, *dloss_in);
        CHECK_SAME_DEVICE(op, *dloss_in, q_in);
        CHECK_SHAPE(op, *dloss_in, B);
        if (mean_heads) {
            CHECK_CUDA(op, diff_in);
            CHECK_DTYPE(op, diff_in, at::kFloat);
            CHECK_SHAPE(op, diff_in, B, N, S);
        }
    }
    if (dout_in.has_value()) {
        CHECK_CUDA(op, *dout_in);
        CHECK_DTYPE(op, *dout_in, q_in.scalar_type());
        CHECK_SHAPE(op, *dout_in, B, H, N, D);
    }
    if (dmaps_in.has_value()) check_dmaps(op, *dmaps_in, q_in, S, mean_heads);
    const c10::cuda::CUDAGuard device_guard(q_in.device());

    const Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in), k_ref = vector_ready(k_ref_in);
    const OptTensor dout = vector_ready(dout_in);
    const OptTensor dmaps = dmaps_in.has_value() ? OptTensor(dmaps_in->to(at::kFloat)) : std::nullopt;
    const auto f32 = q.options().dtype(at::kFloat);

    Output dq = output_like(q_in);
    Tensor dk = at::empty_like(k_in), dv = at::empty_like(v_in);
    Tensor dk_ref = detach_reference ? q.new_empty({0}) : at::empty_like(k_ref_in);
    if (B * H == 0) return {dq.result, dk, dv, dk_ref};
    if (N == 0) {
        dk.zero_();
        dv.zero_();
        dk_ref.zero_();
        return {dq.result, dk, dv, dk_ref};
    }

    const Tensor lse = lse_in.contiguous();
    const Tensor lse_ref = recompute_diff || reference_grad ? lse_ref_in.contiguous() : lse_ref_in;
    const Tensor dloss = has_loss ? dloss_in->to(at::kFloat) : Tensor();
    // diff read by the dq and dkdv kernels: the saved head mean, or a per-head scratch the dq kernel writes.
    Tensor diff = !has_loss ? Tensor() : mean_heads ? diff_in : at::empty({B, H, N, S}, f32);

    Subject_bwd_params sp{};
    sp.recompute_diff = recompute_diff;
    sp.reference_grad = reference_grad;
    Xattn_bwd_params& t = sp.target;
    Xattn_bwd_params& r = sp.reference;
    fill_sizes(t, q, scale);
    fill_sizes(r, q, scale);
    const OptTensor v_opt(v), tokens_opt(tokens), ref_tokens_opt(ref_tokens);
    fill_key_set(t, k, v_opt, bias, tokens_opt);
    fill_key_set(r, k_ref, std::nullopt, ref_bias, ref_tokens_opt);
    set_splits(op, t);
    set_splits(op, r);
    t.lse_ptr = lse.data_ptr<float>();
    r.lse_ptr = recompute_diff || reference_grad ? lse_ref.data_ptr<float>() : nullptr;
    t.dout_ptr = dout.has_value() ? dout->data_ptr() : nullptr;
    t.dout_strides = dout.has_value() ? rows_strides(*dout) : Xattn_strides{0, 0, 0};
    if (dmaps.has_value()) set_dmaps(t, *dmaps, mean_heads, H);
    if (has_loss) {
        // c = 2 dloss / (N Hred), and / H per head for head-mean maps (CONTRACT.md)
        const double c = 2.0 / (static_cast<double>(N) * (mean_heads ? 1 : H)) / (mean_heads ? H : 1);
        for (Xattn_bwd_params* p : {&t, &r}) {
            p->diff_ptr = diff.data_ptr<float>();
            p->diff_batch_stride = diff.stride(0);
            p->diff_head_stride = mean_heads ? 0 : diff.stride(1);
            p->diff_row_stride = diff.stride(mean_heads ? 1 : 2);
            p->dloss_ptr = dloss.data_ptr<float>();
            p->dloss_stride = dloss.stride(0);
            p->weights_ptr = weights.has_value() ? weights->data_ptr<float>() : nullptr;
            p->weights_batch_stride = weights.has_value() ? weights->stride(0) : 0;
            p->weights_index_stride = weights.has_value() ? weights->stride(1) : 0;
        }
        t.diff_scale = static_cast<float>(c);
        r.diff_scale = static_cast<float>(-c);
    }
    Tensor delta = at::empty({reference_grad ? 2 : 1, B, H, N}, f32);
    Tensor dk_partial = at::empty({t.num_splits, B, H, M, D}, f32);
    Tensor dv_partial = dout.has_value() ? at::empty({t.num_splits, B, H, M, D}, f32) : at::empty({0}, f32);
    Tensor dk_ref_partial = reference_grad ? at::empty({r.num_splits, B, H, M_ref, D}, f32) : at::empty({0}, f32);
    t.dq_ptr = dq.work.data_ptr();
    t.dq_strides = rows_strides(dq.work);
    t.dk_ptr = dk.data_ptr();
    t.dk_strides = rows_strides(dk);
    t.dv_ptr = dout.has_value() ? dv.data_ptr() : nullptr;
    t.dv_strides = rows_strides(dv);
    t.delta_ptr = delta[0].data_ptr<float>();
    t.dk_partial_ptr = dk_partial.data_ptr<float>();
    t.dv_partial_ptr = dout.has_value() ? dv_partial.data_ptr<float>() : nullptr;
    if (reference_grad) {
        r.dk_ptr = dk_ref.data_ptr();
        r.dk_strides = rows_strides(dk_ref);
        r.delta_ptr = delta[1].data_ptr<float>();
        r.dk_partial_ptr = dk_ref_partial.data_ptr<float>();
    }

    const cudaStream_t stream = current_stream();
    const cudaError_t err = ELEMENT_SWITCH(q.scalar_type() == at::kBFloat16, [&] {
        return HEADDIM_SWITCH(t.head_dim, [&] { return run_subject_bwd_<Element, kHeadDim>(sp, stream); });
    });
    check_launch(op, err, q_in, k_in, v_in, bias, tokens);
    if (!dout.has_value()) dv.zero_();            // no gradient reaches out, so none reaches v
    if (!detach_reference && !reference_grad) dk_ref.zero_();  // no loss gradient: none reaches k_ref
    dq.finish();
    return {dq.result, dk, dv, dk_ref};
}

// Dynamic shared memory (bytes) one block of `kernel` asks for, with every optional input present, for
// num_keys keys (both key sets) and num_selected tokens; reported by python -m semfid.info
// --cuda-resources and checked against the device by semfid.backends.cuda.
//   "xattn_fwd" (head-mean maps), "subject_fwd" (head-mean maps returned), "xattn_bwd_dq",
//   "subject_bwd_dq", "bwd_dkdv".
int64_t smem_bytes(const std::string& kernel, int64_t head_dim, int64_t num_keys, int64_t num_selected) {
    constexpr const char* op = "semfid_C::smem_bytes";
    TORCH_CHECK(is_supported_head_dim(head_dim), op, ": head_dim must be one of ", kSupportedHeadDimsText, ", got ",
                head_dim);
    TORCH_CHECK(num_keys >= 1 && num_keys <= kMaxKeys, op, ": num_keys must be in [1, ", kMaxKeys, "], got ", num_keys);
    TORCH_CHECK(num_selected >= 1 && num_selected <= kMaxSelected, op, ": num_selected must be in [1, ", kMaxSelected,
                "], got ", num_selected);
    const int m = static_cast<int>(num_keys), s = static_cast<int>(num_selected);
    return HEADDIM_SWITCH(head_dim, [&]() -> int64_t {
        using Traits = Xattn_kernel_traits<kHeadDim>;
        if (kernel == "xattn_fwd") return xattn_fwd_smem_layout<Traits>(m, true, s, true, false).total;
        if (kernel == "subject_fwd") return xattn_fwd_smem_layout<Traits>(m, true, s, true, true).total;
        if (kernel == "xattn_bwd_dq") return xattn_bwd_dq_smem_layout<Traits>(m, true, true).total;
        if (kernel == "subject_bwd_dq") return subject_bwd_dq_smem_layout<Traits>(m, m).total;
        if (kernel == "bwd_dkdv") return xattn_bwd_dkdv_smem_layout<Traits>(true, true).total;
        TORCH_CHECK(false, op, ": kernel must be xattn_fwd, subject_fwd, xattn_bwd_dq, subject_bwd_dq or bwd_dkdv, got ",
                    kernel);
    });
}

}  // namespace
}  // namespace semfid

TORCH_LIBRARY(semfid_C, m) {
    m.def("xattn_fwd(Tensor q, Tensor k, Tensor? v, Tensor? bias, Tensor? select, float scale, bool mean_heads)"
          " -> (Tensor, Tensor, Tensor)");
    m.def("xattn_bwd(Tensor q, Tensor k, Tensor? v, Tensor? bias, Tensor? select, float scale, bool mean_heads,"
          " Tensor out, Tensor lse, Tensor? dout, Tensor? dmaps) -> (Tensor, Tensor, Tensor)");
    m.def("subject_fwd(Tensor q, Tensor k, Tensor v, Tensor k_ref, Tensor? bias, Tensor? ref_bias, Tensor tokens,"
          " Tensor ref_tokens, Tensor? weights, float scale, bool mean_heads, bool detach_reference,"
          " bool return_maps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
    m.def("subject_bwd(Tensor q, Tensor k, Tensor v, Tensor k_ref, Tensor? bias, Tensor? ref_bias, Tensor tokens,"
          " Tensor ref_tokens, Tensor? weights, float scale, bool mean_heads, bool detach_reference, Tensor out,"
          " Tensor lse, Tensor lse_ref, Tensor diff, Tensor? dout, Tensor? dloss, Tensor? dmaps)"
          " -> (Tensor, Tensor, Tensor, Tensor)");
    m.def("smem_bytes(str kernel, int head_dim, int num_keys, int num_selected) -> int", &semfid::smem_bytes);
}

TORCH_LIBRARY_IMPL(semfid_C, CUDA, m) {
    m.impl("xattn_fwd", &semfid::xattn_fwd);
    m.impl("xattn_bwd", &semfid::xattn_bwd);
    m.impl("subject_fwd", &semfid::subject_fwd);
    m.impl("subject_bwd", &semfid::subject_bwd);
}

// `import semfid._C` loads this library, which registers the ops above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                        "semfid CUDA kernels, registered as torch.ops.semfid_C", -1, nullptr};
    return PyModule_Create(&module);
}
