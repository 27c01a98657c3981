// Parameters of semfid's CUDA kernels: raw pointers, strides (in elements) and sizes.
//
// Filled by semfid_api.cpp from the canonical inputs of semfid.backends.base (see the contract there):
//   q [B, H, N, D], k [B, H, M, D], v [B, H, M, D] or absent, bias [B, H, M] fp32 or absent,
//   select [B, S] int64 or absent. The last dimension of q, k, v, out, dout, dq is contiguous and every
//   other stride of those tensors is a multiple of 8 elements with 16-byte aligned base pointers
//   (the host makes a copy otherwise), so the kernels load 16-byte vectors.
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

struct Xattn_fwd_params {
    // ---- inputs -------------------------------------------------------------------------------------
    const void* q_ptr;        // [B, H, N, D]
    const void* k_ptr;        // [B, H, M, D]
    const void* v_ptr;        // [B, H, M, D] or nullptr (maps-only pass)
    const float* bias_ptr;    // [B, H, M] additive key bias or nullptr
    const int64_t* select_ptr;  // [B, S] selected key indices in [0, M) or nullptr
    Xattn_strides q_strides, k_strides, v_strides;
    int64_t bias_batch_stride, bias_head_stride, bias_key_stride;  // head stride is often 0
    int64_t select_batch_stride, select_index_stride;             // batch stride may be 0

    // ---- outputs ------------------------------------------------------------------------------------
    void* out_ptr;            // [B, H, N, D] (same dtype as q) or nullptr when v is absent
    Xattn_strides out_strides;
    float* lse_ptr;           // [B, H, N] contiguous, natural log; +inf for fully masked rows
    float* maps_ptr;          // [B, H, N, S] contiguous per-head maps, or nullptr without select

    // ---- sizes --------------------------------------------------------------------------------------
    int batch, heads, num_queries, num_keys, head_dim, num_selected;
    float scale;              // logit scale (natural units)
    float scale_log2;         // scale * log2(e): the kernels exponentiate with exp2
};

struct Xattn_bwd_params {
    // ---- inputs (as in forward) -----------------------------------------------------------------------
    const void* q_ptr;
    const void* k_ptr;
    const void* v_ptr;        // nullptr for a maps-only pass
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

    // ---- outputs and scratch ------------------------------------------------------------------------------
    void* dq_ptr;             // [B, H, N, D], dtype of q
    Xattn_strides dq_strides;
    void* dk_ptr;             // [B, H, M, D] contiguous, dtype of k
    void* dv_ptr;             // [B, H, M, D] contiguous, or nullptr without v
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

// Launchers, specialised once per (element type, head dim) in instantiations/*.cu.
// They return the first CUDA error (cudaSuccess when every launch was accepted).
template <typename Element, int kHeadDim>
cudaError_t run_xattn_fwd_(const Xattn_fwd_params& params, cudaStream_t stream);

template <typename Element, int kHeadDim>
cudaError_t run_xattn_bwd_(const Xattn_bwd_params& params, cudaStream_t stream);

}  // namespace semfid
