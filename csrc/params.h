// Parameters of semfid's CUDA kernels: raw pointers, strides (in elements) and sizes.
//
// Filled by semfid_api.cpp from the canonical inputs of semfid.backends.base (see the contract there
// and /CONTRACT.md): q [B, H, N, D], k [B, H, M, D], v [B, H, M, D] or absent, k_ref [B, H, M_ref, D],
// biases [B, H, M] fp32 or absent, selections (select / tokens / ref_tokens) [B, S] int64. The last
// dimension of q, k, v, k_ref, out, dout and dq is contiguous and every other stride of those tensors
// is a multiple of 8 elements with 16-byte aligned base pointers (diffusers' transposed views of
// [B, N, H * D] qualify; the host copies anything else), so the kernels load 16-byte vectors.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace semfid {

// Strides of one [B, H, rows, D] tensor (the D stride is 1).
struct Xattn_strides {
    int64_t batch;
    int64_t head;
    int64_t row;
};

// One forward pass over up to two key sets: the target keys (k, v, bias, select) and, for the
// subject-wise loss, the reference keys (k_ref, ref_bias, ref_select).
struct Xattn_fwd_params {
    // ---- inputs -------------------------------------------------------------------------------------
    const void* q_ptr;        // [B, H, N, D]
    const void* k_ptr;        // [B, H, M, D]
    const void* v_ptr;        // [B, H, M, D] or nullptr (maps-only pass)
    const float* bias_ptr;    // [B, H, M] additive key bias or nullptr
    const int64_t* select_ptr;  // [B, S] selected key indices in [0, M) (the subject op's tokens) or nullptr
    Xattn_strides q_strides, k_strides, v_strides;
    int64_t bias_batch_stride, bias_head_stride, bias_key_stride;  // head stride is often 0
    int64_t select_batch_stride, select_index_stride;             // batch stride may be 0

    // reference key set: k_ref_ptr == nullptr for plain cross-attention
    const void* k_ref_ptr;    // [B, H, M_ref, D]
    const float* ref_bias_ptr;  // [B, H, M_ref] or nullptr
    const int64_t* ref_select_ptr;  // [B, S] indices in [0, M_ref)
    Xattn_strides k_ref_strides;
    int64_t ref_bias_batch_stride, ref_bias_head_stride, ref_bias_key_stride;
    int64_t ref_select_batch_stride, ref_select_index_stride;
    const float* weights_ptr;  // [B, S] loss weight per selected column, or nullptr: 1/S
    int64_t weights_batch_stride, weights_index_stride;

    // ---- outputs ------------------------------------------------------------------------------------
    void* out_ptr;            // [B, H, N, D] (same dtype as q) or nullptr when v is absent
    Xattn_strides out_strides;
    float* lse_ptr;           // [B, H, N] contiguous, natural log; +inf for fully masked rows
    float* lse_ref_ptr;       // [B, H, N] contiguous lse of the reference keys, or nullptr
    float* maps_ptr;          // selected columns of P: [B, N, S] (mean_heads) or [B, H, N, S], contiguous; or nullptr
    float* diff_ptr;          // [B, N, S] contiguous head-mean A_t - A_r (mean_heads with a reference), or nullptr
    float* loss_partial_ptr;  // [B, gridDim.y, gridDim.x]: sum of w * diff^2 per block (with a reference)
    float* loss_ptr;          // [B]: loss_partial summed in order, / (N * (1 if mean_heads else H))

    // ---- sizes --------------------------------------------------------------------------------------
    int batch, heads, num_queries, num_keys, num_ref_keys, head_dim, num_selected;
    bool mean_heads;          // maps / diff averaged over heads (in the kernel: a block loops over heads)
    int heads_per_block;      // H when a block loops over the heads (mean_heads with a selection), else 1
    float scale;              // logit scale (natural units)
    float scale_log2;         // scale * log2(e): the kernels exponentiate with exp2
};

struct Xattn_bwd_params {
    // ---- inputs (as in forward) -----------------------------------------------------------------------
    const void* q_ptr;
    const void* k_ptr;
    const void* v_ptr;        // nullptr for a maps-only pass (and for the reference keys)
    const float* bias_ptr;
    const int64_t* select_ptr;
    Xattn_strides q_strides, k_strides, v_strides;
    int64_t bias_batch_stride, bias_head_stride, bias_key_stride;
    int64_t select_batch_stride, select_index_stride;
    const float* lse_ptr;     // [B, H, N] contiguous, saved by forward

    // ---- incoming gradients ------------------------------------------------------------------------------
    const void* dout_ptr;     // [B, H, N, D] or nullptr (no gradient flows into out)
    Xattn_strides dout_strides;
    const float* dmaps_ptr;   // maps gradient, or nullptr; read as [B, H, N, S] through strides:
    int64_t dmaps_batch_stride, dmaps_head_stride, dmaps_row_stride, dmaps_index_stride;
    float dmaps_scale;        // 1, or 1/H for head-mean maps (their head stride is then 0)

    // Subject-wise loss term of the map gradient (diff_ptr == nullptr: none):
    //   G[b, h, n, s] += dloss[b] * diff_scale * w[b, s] * diff[b, (h), n, s]
    // with w = weights (or 1/S) and diff_scale = +-2 / (N * Hred) (/ H per head for head-mean maps).
    const float* diff_ptr;    // [B, N, S] (head stride 0) or [B, H, N, S] scratch, index stride 1
    int64_t diff_batch_stride, diff_head_stride, diff_row_stride;
    const float* dloss_ptr;   // [B]
    int64_t dloss_stride;
    const float* weights_ptr;  // [B, S] or nullptr (1/S)
    int64_t weights_batch_stride, weights_index_stride;
    float diff_scale;

    // ---- outputs and scratch ------------------------------------------------------------------------------
    void* dq_ptr;             // [B, H, N, D], dtype of q
    Xattn_strides dq_strides;
    void* dk_ptr;             // [B, H, M, D] through dk_strides, dtype of k
    Xattn_strides dk_strides;
    void* dv_ptr;             // [B, H, M, D] through dv_strides, or nullptr without v
    Xattn_strides dv_strides;
    float* delta_ptr;         // [B, H, N] scratch: rowsum(P * dP), written by the dq kernel
    float* dk_partial_ptr;    // [splits, B, H, M, D] scratch: per-split partial sums of dK
    float* dv_partial_ptr;    // [splits, B, H, M, D] scratch, or nullptr without v

    // ---- sizes --------------------------------------------------------------------------------------
    int batch, heads, num_queries, num_keys, head_dim, num_selected;
    int num_splits;           // query ranges whose dK/dV partials are summed in order
    int query_tiles_per_split;
    float scale;
    float scale_log2;
};

// The subject-wise backward: one dq kernel over both key sets, then the dk/dv kernels of
// Xattn_bwd_params once per key set (target: dk, dv; reference: dk_ref).
struct Subject_bwd_params {
    Xattn_bwd_params target;     // q, k, v, bias, tokens, lse, dout, dmaps, loss term, dq, delta, dk / dv
    Xattn_bwd_params reference;  // k_ref (as k), no v, ref_bias, ref_tokens, lse_ref, loss term with a
                                 // negative diff_scale, its own delta and dk partials
    bool recompute_diff;  // per-head maps with a loss: the dq kernel writes diff per head into
                          // target.diff_ptr ([B, H, N, S] scratch) from P_t and P_r
    bool reference_grad;  // a gradient reaches k_ref (reference not detached, loss gradient given)
};

// Launchers, specialised once per (element type, head dim) in instantiations/*.cu.
// They return the first CUDA error (cudaSuccess when every launch was accepted).
template <typename Element, int kHeadDim>
cudaError_t run_xattn_fwd_(const Xattn_fwd_params& params, cudaStream_t stream);

template <typename Element, int kHeadDim>
cudaError_t run_xattn_bwd_(const Xattn_bwd_params& params, cudaStream_t stream);

template <typename Element, int kHeadDim>
cudaError_t run_subject_bwd_(const Subject_bwd_params& params, cudaStream_t stream);

}  // namespace semfid
