// Backward of the subject-wise op, dq part: one kernel over both key sets (CONTRACT.md, "Backward").
//
//   P_t  = exp(q k^T s + bias - lse),   P_r = exp(q k_ref^T s + ref_bias - lse_ref)      (recomputed)
//   diff = A_t - A_r per head (per-head maps: recomputed here and written to a [B, H, N, S] scratch
//          that the dkdv kernels read; head-mean maps: the [B, N, S] diff saved by forward)
//   G_t  = dloss * 2 / (N Hred) * w * diff (+ dmaps) (/ H),   G_r = -dloss * 2 / (N Hred) * w * diff (/ H)
//   dS_t = P_t * (dout v^T + scatter(G_t) - delta_t),   dS_r = P_r * (scatter(G_r) - delta_r)
//   dq   = (dS_t k + dS_r k_ref) * scale;  delta_t, delta_r are written for the dkdv kernels.
//
// Grid (ceil(N / kBlockM), H, B); a warp owns 16 query rows and all keys of both sets. Shared memory
// holds two key slots that are refilled per phase: (K_ref, K) for the diff recompute, (K, V) for the
// target softmax backward, K_ref for the reference one. The gradient tile holds one key set's
// scattered G at a time (and, before that, the probabilities the diff gathers read).
// dk, dv and dk_ref come from xattn_bwd_dkdv_kernel, launched once per key set.
#pragma once

#include "params.h"
#include "warp_tiles.cuh"
#include "xattn_bwd_kernel.cuh"

namespace semfid {

// Scores of a warp's 16 rows against the keys in `keys_s`, turned into P with the rows' saved lse.
template <typename Traits, typename Element>
__device__ __forceinline__ void recompute_probabilities(float (&p)[Traits::kMaxKeyTiles][4], const Element* q_s,
                                                        const Element* keys_s, int key_tiles, const float* bias_s,
                                                        float scale_log2, const float (&lse_log2)[2], int lane) {
#pragma unroll
    for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) p[j][e] = 0.f;
    }
    warp_gemm_rows_by_rows<Traits, Element, Traits::kMaxKeyTiles>(p, q_s, keys_s, key_tiles, lane);
    probabilities_from_lse<Traits::kMaxKeyTiles>(p, key_tiles, bias_s, scale_log2, lse_log2, lane % 4);
}

// lse * log2(e) of the warp's rows g and g + 8 (+inf past the last query: P = 0 there).
__device__ __forceinline__ void load_row_lse(float (&lse_log2)[2], const float* lse, int64_t row0, int rows, int lane) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = lane / 4 + 8 * half;
        lse_log2[half] = row < rows ? lse[row0 + row] * kLog2e : INFINITY;
    }
}

// delta = rowsum(P * dP) per row half, and P <- dS = P * (dP - delta); dP = dp (+ the gradient tile).
template <int kNTiles>
__device__ __forceinline__ void softmax_backward_rows(float (&p)[kNTiles][4], const float (&dp)[kNTiles][4],
                                                      bool use_dp, const float* grad, int grad_row, int key_tiles,
                                                      int lane, float (&delta)[2]) {
    const int g = lane / 4, t = lane % 4;
    delta[0] = delta[1] = 0.f;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
        if (j < key_tiles) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float d = use_dp ? dp[j][e] : 0.f;
                if (grad != nullptr) d += grad[(g + 8 * (e / 2)) * grad_row + j * 8 + 2 * t + (e & 1)];
                delta[e / 2] += p[j][e] * d;
            }
        }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) delta[half] = quad_sum(delta[half]);
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
        if (j < key_tiles) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float d = use_dp ? dp[j][e] : 0.f;
                if (grad != nullptr) d += grad[(g + 8 * (e / 2)) * grad_row + j * 8 + 2 * t + (e & 1)];
                p[j][e] *= d - delta[e / 2];
            }
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) p[j][e] = 0.f;
        }
    }
}

__device__ __forceinline__ void store_row_delta(float* delta_out, const float (&delta)[2], int64_t row0, int rows, int lane) {
    if (lane % 4 == 0) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = lane / 4 + 8 * half;
            if (row < rows) delta_out[row0 + row] = delta[half];
        }
    }
}

template <typename Traits, typename Element>
__global__ void __launch_bounds__(Traits::kNThreads) subject_bwd_dq_kernel(const Subject_bwd_params params) {
    constexpr int kStride = Traits::kSmemStride;
    extern __shared__ __align__(16) unsigned char smem[];
    const Xattn_bwd_params& tgt = params.target;
    const Xattn_bwd_params& ref = params.reference;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y, b = blockIdx.z;
    const int N = tgt.num_queries, S = tgt.num_selected;
    const int M = tgt.num_keys, M_ref = ref.num_keys;
    const int m16 = padded_keys(M), mr16 = padded_keys(M_ref);
    const int block_row0 = blockIdx.x * Traits::kBlockM;
    const int rows_valid = min(Traits::kBlockM, N - block_row0);
    const bool use_dout = tgt.v_ptr != nullptr && tgt.dout_ptr != nullptr;

    const auto layout = subject_bwd_dq_smem_layout<Traits>(M, M_ref);
    Element* slot_a = reinterpret_cast<Element*>(smem + layout.slot_a);
    Element* slot_b = reinterpret_cast<Element*>(smem + layout.slot_b);
    Element* q_s = reinterpret_cast<Element*>(smem + layout.q);
    Element* do_s = reinterpret_cast<Element*>(smem + layout.dout);
    float* bias_s = reinterpret_cast<float*>(smem + layout.bias);
    float* ref_bias_s = reinterpret_cast<float*>(smem + layout.ref_bias);
    float* grad_s = reinterpret_cast<float*>(smem + layout.grad_maps);
    const int grad_row = score_row_floats(m16 > mr16 ? m16 : mr16);
    float* grad_warp = grad_s + warp * 16 * grad_row;  // this warp's 16 rows

    const Element* k = static_cast<const Element*>(tgt.k_ptr) + b * tgt.k_strides.batch + h * tgt.k_strides.head;
    const Element* k_ref = static_cast<const Element*>(ref.k_ptr) + b * ref.k_strides.batch + h * ref.k_strides.head;
    const int warp_row0 = block_row0 + warp * 16;
    const int warp_rows = min(16, N - warp_row0);
    const int64_t bh = static_cast<int64_t>(b) * tgt.heads + h;
    const Element* q_warp = q_s + warp * 16 * kStride;

    // ---- stage Q, dout and both biases ------------------------------------------------------------------
    const Element* q = static_cast<const Element*>(tgt.q_ptr) + b * tgt.q_strides.batch + h * tgt.q_strides.head +
                       block_row0 * tgt.q_strides.row;
    load_rows_to_smem<Traits>(q_s, q, tgt.q_strides.row, rows_valid, Traits::kBlockM);
    if (use_dout) {
        const Element* dout = static_cast<const Element*>(tgt.dout_ptr) + b * tgt.dout_strides.batch +
                              h * tgt.dout_strides.head + block_row0 * tgt.dout_strides.row;
        load_rows_to_smem<Traits>(do_s, dout, tgt.dout_strides.row, rows_valid, Traits::kBlockM);
    }
    load_key_bias(bias_s, m16, tgt, b, h, 0);
    load_key_bias(ref_bias_s, mr16, ref, b, h, 0);
    float lse_t[2], lse_r[2] = {INFINITY, INFINITY};
    load_row_lse(lse_t, tgt.lse_ptr + bh * N, warp_row0, warp_rows, lane);
    if (ref.lse_ptr != nullptr) load_row_lse(lse_r, ref.lse_ptr + bh * N, warp_row0, warp_rows, lane);

    float p[Traits::kMaxKeyTiles][4];

    // ---- per-head maps: diff = A_t - A_r of this head, into the scratch the dkdv kernels read too ----------
    // Lane `lane` owns elements i = lane + 32 j of the warp's [16, S] rows in both gathers.
    if (params.recompute_diff) {
        load_rows_to_smem<Traits>(slot_a, k_ref, ref.k_strides.row, M_ref, mr16);
        load_rows_to_smem<Traits>(slot_b, k, tgt.k_strides.row, M, m16);
        __syncthreads();
        float* diff = const_cast<float*>(tgt.diff_ptr) + b * tgt.diff_batch_stride + h * tgt.diff_head_stride +
                      static_cast<int64_t>(warp_row0) * tgt.diff_row_stride;
        const int64_t* ref_select = ref.select_ptr + b * ref.select_batch_stride;
        const int64_t* select = tgt.select_ptr + b * tgt.select_batch_stride;

        recompute_probabilities<Traits, Element>(p, q_warp, slot_a, mr16 / 8, ref_bias_s, ref.scale_log2, lse_r, lane);
        store_scores_to_smem<Traits::kMaxKeyTiles>(grad_warp, grad_row, p, mr16 / 8, lane);
        __syncwarp();
        for (int i = lane; i < warp_rows * S; i += 32) {
            const int row = i / S, col = i - row * S;
            diff[row * tgt.diff_row_stride + col] =
                -grad_warp[row * grad_row + static_cast<int>(ref_select[col * ref.select_index_stride])];
        }
        __syncwarp();
        recompute_probabilities<Traits, Element>(p, q_warp, slot_b, m16 / 8, bias_s, tgt.scale_log2, lse_t, lane);
        store_scores_to_smem<Traits::kMaxKeyTiles>(grad_warp, grad_row, p, m16 / 8, lane);
        __syncwarp();
        for (int i = lane; i < warp_rows * S; i += 32) {
            const int row = i / S, col = i - row * S;
            diff[row * tgt.diff_row_stride + col] +=
                grad_warp[row * grad_row + static_cast<int>(select[col * tgt.select_index_stride])];
        }
        __syncthreads();  // slots and tile are free; the diff scratch is visible to the whole block
    }

    // ---- target: dP_t = dout V^T + G_t; dS_t; dq = dS_t K -------------------------------------------------
    load_rows_to_smem<Traits>(slot_a, k, tgt.k_strides.row, M, m16);
    if (use_dout) {
        const Element* v = static_cast<const Element*>(tgt.v_ptr) + b * tgt.v_strides.batch + h * tgt.v_strides.head;
        load_rows_to_smem<Traits>(slot_b, v, tgt.v_strides.row, M, m16);
    }
    const bool grad_t = has_map_gradient(tgt);
    if (grad_t) {
        scatter_map_gradient(grad_s, grad_row, Traits::kBlockM, m16, tgt, b, h, block_row0, 0);
    } else {
        __syncthreads();
    }
    recompute_probabilities<Traits, Element>(p, q_warp, slot_a, m16 / 8, bias_s, tgt.scale_log2, lse_t, lane);
    float delta[2];
    {
        float dp[Traits::kMaxKeyTiles][4];
#pragma unroll
        for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[j][e] = 0.f;
        }
        if (use_dout) {
            warp_gemm_rows_by_rows<Traits, Element, Traits::kMaxKeyTiles>(dp, do_s + warp * 16 * kStride, slot_b, m16 / 8, lane);
        }
        softmax_backward_rows<Traits::kMaxKeyTiles>(p, dp, use_dout, grad_t ? grad_warp : nullptr, grad_row, m16 / 8,
                                                    lane, delta);
    }
    store_row_delta(tgt.delta_ptr + bh * N, delta, warp_row0, warp_rows, lane);
    float dq[Traits::kDTiles][4];
#pragma unroll
    for (int jd = 0; jd < Traits::kDTiles; ++jd) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[jd][e] = 0.f;
    }
    warp_gemm_scores_by_rows<Traits, Element, Traits::kMaxKeyTiles>(dq, p, slot_a, m16 / 16, lane);

    // ---- reference: dP_r = G_r; dS_r; dq += dS_r K_ref ------------------------------------------------------
    if (params.reference_grad) {
        __syncthreads();  // every warp is done with K and the target gradient tile
        load_rows_to_smem<Traits>(slot_a, k_ref, ref.k_strides.row, M_ref, mr16);
        scatter_map_gradient(grad_s, grad_row, Traits::kBlockM, mr16, ref, b, h, block_row0, 0);
        recompute_probabilities<Traits, Element>(p, q_warp, slot_a, mr16 / 8, ref_bias_s, ref.scale_log2, lse_r, lane);
        softmax_backward_rows<Traits::kMaxKeyTiles>(p, p, false, grad_warp, grad_row, mr16 / 8, lane, delta);
        store_row_delta(ref.delta_ptr + bh * N, delta, warp_row0, warp_rows, lane);
        warp_gemm_scores_by_rows<Traits, Element, Traits::kMaxKeyTiles>(dq, p, slot_a, mr16 / 16, lane);
    }

    Element* dq_rows = static_cast<Element*>(tgt.dq_ptr) + b * tgt.dq_strides.batch + h * tgt.dq_strides.head +
                       static_cast<int64_t>(warp_row0) * tgt.dq_strides.row;
    store_warp_rows<Traits, Element>(dq_rows, tgt.dq_strides.row, warp_rows, dq, tgt.scale, lane);
}

}  // namespace semfid
