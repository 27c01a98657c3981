// Forward kernel of both ops: cross-attention with selected maps, and the one-pass subject-wise loss.
//
//   logits = q k^T * scale + bias          (padded keys -> -inf)
//   P      = softmax(logits) over the keys (a row whose keys are all -inf gives P = 0, lse = +inf)
//   out    = P v,   lse = log sum exp(logits) (natural log),   A_t[..., s] = P[..., select[s]]
// and, with reference keys (the subject op), P_r from q k_ref^T * scale + ref_bias, lse_ref,
//   A_r[..., s] = P_r[..., ref_select[s]],   diff = A_t - A_r   (both averaged over heads for mean_heads),
//   loss[b] = sum over (h), n, s of w[b, s] * diff^2 / (N * (1 if mean_heads else H)).
//
// Grid: (ceil(N / kBlockM), H / heads_per_block, B). A block stages the K and V of a head (all
// M <= kMaxKeys keys, zero padded to a multiple of 16) and its kBlockM query rows in shared memory;
// each warp then owns 16 query rows and keeps their whole row of logits in registers (fp32), so the
// softmax is exact in one pass and P feeds P V straight from registers. The query tile is read once
// per head for both key sets: K_ref replaces K in shared memory after the target pass.
// Head-mean maps (heads_per_block = H): the block loops over the heads and sums A_t (and A_t - A_r)
// per (row, column) in shared memory, always in head order, then divides by H: no host-side mean.
// The loss is summed per block in a fixed order into loss_partial; xattn_loss_reduce_kernel adds the
// partials of each batch item in order (no atomics: the bits do not depend on scheduling).
#pragma once

#include "params.h"
#include "warp_tiles.cuh"

namespace semfid {

template <typename Traits, typename Element>
__global__ void __launch_bounds__(Traits::kNThreads) xattn_fwd_kernel(const Xattn_fwd_params params) {
    constexpr int kStride = Traits::kSmemStride;
    extern __shared__ __align__(16) unsigned char smem[];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int b = blockIdx.z;
    const int N = params.num_queries, S = params.num_selected;
    const int block_row0 = blockIdx.x * Traits::kBlockM;
    const bool has_v = params.v_ptr != nullptr;
    const bool has_select = params.select_ptr != nullptr;
    const bool has_ref = params.k_ref_ptr != nullptr;
    const bool head_loop = params.mean_heads && has_select;  // maps / diff are head sums (heads_per_block = H)
    const bool acc_maps = head_loop && params.maps_ptr != nullptr;
    const int m16_max = padded_keys(has_ref && params.num_ref_keys > params.num_keys ? params.num_ref_keys
                                                                                    : params.num_keys);

    const auto layout = xattn_fwd_smem_layout<Traits>(m16_max, has_v, has_select ? S : 0, acc_maps, has_ref);
    Element* slot_a = reinterpret_cast<Element*>(smem + layout.slot_a);  // K, then K_ref
    Element* slot_b = reinterpret_cast<Element*>(smem + layout.slot_b);  // V
    Element* q_s = reinterpret_cast<Element*>(smem + layout.q);
    float* bias_s = reinterpret_cast<float*>(smem + layout.bias);  // bias * log2(e), -inf on padding
    const int probs_row = score_row_floats(m16_max);
    float* probs = reinterpret_cast<float*>(smem + layout.probs) + warp * 16 * probs_row;  // this warp's rows
    float* maps_acc = reinterpret_cast<float*>(smem + layout.maps_acc) + warp * 16 * S;
    float* diff_acc = reinterpret_cast<float*>(smem + layout.diff_acc) + warp * 16 * S;

    const int warp_row0 = block_row0 + warp * 16;  // first global query row of this warp
    const int warp_rows = min(16, N - warp_row0);   // may be <= 0 for the last block
    const int rows_valid = min(Traits::kBlockM, N - block_row0);
    const int64_t* select = has_select ? params.select_ptr + b * params.select_batch_stride : nullptr;
    const int64_t* ref_select = has_ref ? params.ref_select_ptr + b * params.ref_select_batch_stride : nullptr;
    const float inv_s = S > 0 ? 1.f / static_cast<float>(S) : 0.f;
    float loss_acc = 0.f;  // this thread's share of sum w * diff^2, in a fixed element order

    if (head_loop) {
        for (int i = lane; i < 16 * S; i += 32) {
            if (acc_maps) maps_acc[i] = 0.f;
            if (has_ref) diff_acc[i] = 0.f;
        }
    }

    for (int hh = 0; hh < params.heads_per_block; ++hh) {
        const int h = blockIdx.y * params.heads_per_block + hh;
        const int64_t bh = static_cast<int64_t>(b) * params.heads + h;
        __syncthreads();  // every warp is done with the previous head's K_ref / V / Q

        // ---- stage K, V, Q and the key bias of head h ----------------------------------------------------
        const int M = params.num_keys, m16 = padded_keys(M);
        const Element* k = static_cast<const Element*>(params.k_ptr) + b * params.k_strides.batch + h * params.k_strides.head;
        load_rows_to_smem<Traits>(slot_a, k, params.k_strides.row, M, m16);
        if (has_v) {
            const Element* v = static_cast<const Element*>(params.v_ptr) + b * params.v_strides.batch + h * params.v_strides.head;
            load_rows_to_smem<Traits>(slot_b, v, params.v_strides.row, M, m16);
        }
        const Element* q = static_cast<const Element*>(params.q_ptr) + b * params.q_strides.batch +
                           h * params.q_strides.head + block_row0 * params.q_strides.row;
        load_rows_to_smem<Traits>(q_s, q, params.q_strides.row, rows_valid, Traits::kBlockM);
        load_key_bias(bias_s, m16, params.bias_ptr, params.bias_batch_stride, params.bias_head_stride,
                      params.bias_key_stride, M, b, h, 0);
        __syncthreads();

        // ---- target logits, softmax, lse -------------------------------------------------------------------
        // Thread (g, t) holds rows g and g + 8 (index `half` = 0, 1) and columns 8j + 2t, 8j + 2t + 1.
        float s[Traits::kMaxKeyTiles][4];
#pragma unroll
        for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
        }
        warp_gemm_rows_by_rows<Traits, Element, Traits::kMaxKeyTiles>(s, q_s + warp * 16 * kStride, slot_a, m16 / 8, lane);
        float lse[2];
        softmax_rows<Traits::kMaxKeyTiles>(s, m16 / 8, bias_s, params.scale_log2, lane % 4, lse);
        if (lane % 4 == 0) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = lane / 4 + 8 * half;
                if (row < warp_rows) params.lse_ptr[bh * N + warp_row0 + row] = lse[half];
            }
        }

        // ---- out = P V -------------------------------------------------------------------------------------
        if (has_v) {
            float o[Traits::kDTiles][4];
#pragma unroll
            for (int jd = 0; jd < Traits::kDTiles; ++jd) {
#pragma unroll
                for (int e = 0; e < 4; ++e) o[jd][e] = 0.f;
            }
            warp_gemm_scores_by_rows<Traits, Element, Traits::kMaxKeyTiles>(o, s, slot_b, m16 / 16, lane);
            Element* out = static_cast<Element*>(params.out_ptr) + b * params.out_strides.batch +
                           h * params.out_strides.head + static_cast<int64_t>(warp_row0) * params.out_strides.row;
            store_warp_rows<Traits, Element>(out, params.out_strides.row, warp_rows, o, 1.f, lane);
        }

        // ---- A_t: selected columns of P, gathered from this warp's rows of the fp32 probability tile --------
        // Lane `lane` owns elements i = lane + 32 j of the warp's [16, S] tile, in every pass below.
        if (has_select) {
            store_scores_to_smem<Traits::kMaxKeyTiles>(probs, probs_row, s, m16 / 8, lane);
            __syncwarp();
            float* maps = params.maps_ptr;
            for (int i = lane; i < warp_rows * S; i += 32) {
                const int row = i / S, col = i - row * S;
                const float a = probs[row * probs_row + static_cast<int>(select[col * params.select_index_stride])];
                if (maps != nullptr) {
                    if (head_loop) {
                        maps_acc[i] += a;
                    } else {
                        maps[(bh * N + warp_row0 + row) * S + col] = a;
                    }
                }
                if (has_ref) diff_acc[i] = head_loop ? diff_acc[i] + a : a;
            }
        }
        if (!has_ref) continue;

        // ---- reference logits: K_ref replaces K once every warp is done with K and V ------------------------
        __syncthreads();
        const int M_ref = params.num_ref_keys, mr16 = padded_keys(M_ref);
        const Element* k_ref = static_cast<const Element*>(params.k_ref_ptr) + b * params.k_ref_strides.batch +
                               h * params.k_ref_strides.head;
        load_rows_to_smem<Traits>(slot_a, k_ref, params.k_ref_strides.row, M_ref, mr16);
        load_key_bias(bias_s, mr16, params.ref_bias_ptr, params.ref_bias_batch_stride, params.ref_bias_head_stride,
                      params.ref_bias_key_stride, M_ref, b, h, 0);
        __syncthreads();
#pragma unroll
        for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
        }
        warp_gemm_rows_by_rows<Traits, Element, Traits::kMaxKeyTiles>(s, q_s + warp * 16 * kStride, slot_a, mr16 / 8, lane);
        softmax_rows<Traits::kMaxKeyTiles>(s, mr16 / 8, bias_s, params.scale_log2, lane % 4, lse);
        if (params.lse_ref_ptr != nullptr && lane % 4 == 0) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = lane / 4 + 8 * half;
                if (row < warp_rows) params.lse_ref_ptr[bh * N + warp_row0 + row] = lse[half];
            }
        }
        __syncwarp();  // the A_t gathers of every lane are done with probs
        store_scores_to_smem<Traits::kMaxKeyTiles>(probs, probs_row, s, mr16 / 8, lane);
        __syncwarp();
        const float* weights = params.weights_ptr == nullptr ? nullptr : params.weights_ptr + b * params.weights_batch_stride;
        for (int i = lane; i < warp_rows * S; i += 32) {
            const int row = i / S, col = i - row * S;
            const float a_r = probs[row * probs_row + static_cast<int>(ref_select[col * params.ref_select_index_stride])];
            if (head_loop) {
                diff_acc[i] -= a_r;
            } else {
                const float d = diff_acc[i] - a_r;
                const float w = weights == nullptr ? inv_s : weights[col * params.weights_index_stride];
                loss_acc += w * d * d;
            }
        }
    }

    // ---- head means: maps, diff and the loss terms of this warp's rows -------------------------------------
    if (head_loop && has_select) {
        const float inv_h = 1.f / static_cast<float>(params.heads);
        const float* weights = params.weights_ptr == nullptr ? nullptr : params.weights_ptr + b * params.weights_batch_stride;
        const int64_t row_base = (static_cast<int64_t>(b) * N + warp_row0) * S;
        for (int i = lane; i < warp_rows * S; i += 32) {
            if (params.maps_ptr != nullptr) params.maps_ptr[row_base + i] = maps_acc[i] * inv_h;
            if (has_ref) {
                const float d = diff_acc[i] * inv_h;
                if (params.diff_ptr != nullptr) params.diff_ptr[row_base + i] = d;
                const int col = i % S;
                const float w = weights == nullptr ? inv_s : weights[col * params.weights_index_stride];
                loss_acc += w * d * d;
            }
        }
    }

    // ---- this block's loss partial: lanes by a fixed butterfly, warps in order -----------------------------
    if (has_ref) {
        __syncthreads();  // probs is free: reuse it for the four warp sums
        float* warp_sums = reinterpret_cast<float*>(smem + layout.probs);
        const float total = warp_sum(loss_acc);
        if (lane == 0) warp_sums[warp] = total;
        __syncthreads();
        if (threadIdx.x == 0) {
            float block_total = 0.f;
            for (int w = 0; w < Traits::kNWarps; ++w) block_total += warp_sums[w];
            params.loss_partial_ptr[(static_cast<int64_t>(b) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] = block_total;
        }
    }
}

// loss[b] = factor * sum of the `count` partials of batch item b, in a fixed order: lane l adds
// partials l, l + 32, ... in order, then the lanes are summed by a fixed butterfly. One warp per b.
// `static`: every forward instantiation file includes this header, each keeps its own copy.
static __global__ void xattn_loss_reduce_kernel(const float* __restrict__ partial, float* __restrict__ loss, int count,
                                         float factor) {
    const int b = blockIdx.x;
    float acc = 0.f;
    for (int i = threadIdx.x; i < count; i += 32) acc += partial[static_cast<int64_t>(b) * count + i];
    acc = warp_sum(acc);
    if (threadIdx.x == 0) loss[b] = acc * factor;
}

}  // namespace semfid
