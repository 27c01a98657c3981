// Backward kernels: dq, dk, dv of out = P v and of the selected map columns, with P recomputed from
// q, k, bias and the saved lse (P is never stored).
//
//   P     = exp(logits - lse)                       (lse = +inf on fully masked rows gives P = 0)
//   dP    = dout v^T + G,   G[n, key] = sum over s with select[s] == key of dmaps[n, s] (* 1/H for
//                           head-mean maps: every head receives dmaps / H), plus the subject loss
//                           term dloss * diff_scale * w[s] * diff[n, s] (see scatter_map_gradient)
//   delta = rowsum(P * dP)                          (= rowsum(dout * out) + rowsum(P[sel] * dmaps))
//   dS    = P * (dP - delta)
//   dq    = dS k * scale,   dk = dS^T q * scale,   dv = P^T dout
//
// Three kernels, launched in this order on one stream (xattn_bwd_launch_template.h):
//   xattn_bwd_dq_kernel      grid (ceil(N / kBlockM), H, B): like the forward kernel, a warp owns 16
//                            query rows and all keys; writes dq and delta.
//   xattn_bwd_dkdv_kernel    grid (ceil(M / 80), splits, B * H): a warp owns 16 keys and walks the
//                            query tiles of one split, recomputing the transposed scores P^T and dS^T
//                            (so both feed dV = P^T dout and dK = dS^T q from registers); writes one
//                            fp32 partial of dk and dv per split.
//   xattn_bwd_reduce_kernel  sums the partials of the splits in split order: dk and dv are
//                            deterministic, with no atomics anywhere.
#pragma once

#include "params.h"
#include "warp_tiles.cuh"

namespace semfid {

// Fill `grad_s` ([rows_total, row_floats] fp32, shared) with the map gradient G for query rows
// [row0, row0 + rows_total) and keys [key0, key0 + keys_in_tile):
//   G[n, key] = sum over s with select[s] == key of  dmaps[n, s] * dmaps_scale
//                                                  + dloss[b] * diff_scale * w[s] * diff[n, s]
// Each thread owns one query row and adds its terms in select order, so duplicate selections sum in a
// fixed order. Ends with __syncthreads() (which also publishes earlier shared and global writes).
__device__ __forceinline__ void scatter_map_gradient(float* grad_s, int row_floats, int rows_total, int keys_in_tile,
                                                     const Xattn_bwd_params& params, int b, int h, int row0, int key0) {
    for (int i = threadIdx.x; i < rows_total * row_floats; i += blockDim.x) grad_s[i] = 0.f;
    __syncthreads();
    const int row = threadIdx.x;
    if (row < rows_total && row0 + row < params.num_queries) {
        const int64_t n = row0 + row;
        const int64_t* select = params.select_ptr + b * params.select_batch_stride;
        const float* dmaps = params.dmaps_ptr == nullptr ? nullptr
                           : params.dmaps_ptr + b * params.dmaps_batch_stride + h * params.dmaps_head_stride +
                             n * params.dmaps_row_stride;
        const float* diff = params.diff_ptr == nullptr ? nullptr
                          : params.diff_ptr + b * params.diff_batch_stride + h * params.diff_head_stride +
                            n * params.diff_row_stride;
        const float coef = diff == nullptr ? 0.f : params.dloss_ptr[b * params.dloss_stride] * params.diff_scale;
        const float* weights = params.weights_ptr == nullptr ? nullptr : params.weights_ptr + b * params.weights_batch_stride;
        const float inv_s = 1.f / static_cast<float>(params.num_selected);
        for (int s = 0; s < params.num_selected; ++s) {
            const int key = static_cast<int>(select[s * params.select_index_stride]) - key0;
            if (key >= 0 && key < keys_in_tile) {
                float g = 0.f;
                if (dmaps != nullptr) g += dmaps[s * params.dmaps_index_stride] * params.dmaps_scale;
                if (diff != nullptr) {
                    const float w = weights == nullptr ? inv_s : weights[s * params.weights_index_stride];
                    g += coef * w * diff[s];
                }
                grad_s[row * row_floats + key] += g;
            }
        }
    }
    __syncthreads();
}

__device__ __forceinline__ bool has_map_gradient(const Xattn_bwd_params& params) {
    return params.dmaps_ptr != nullptr || params.diff_ptr != nullptr;
}

// Load bias * log2(e) for keys [key0, key0 + count) into shared memory (-inf past the last key).
__device__ __forceinline__ void load_key_bias(float* bias_s, int count, const Xattn_bwd_params& params,
                                              int b, int h, int key0) {
    load_key_bias(bias_s, count, params.bias_ptr, params.bias_batch_stride, params.bias_head_stride,
                  params.bias_key_stride, params.num_keys, b, h, key0);
}

// ------------------------------------------------------------------------------------------------------
// dq and delta
// ------------------------------------------------------------------------------------------------------
template <typename Traits, typename Element>
__global__ void __launch_bounds__(Traits::kNThreads) xattn_bwd_dq_kernel(const Xattn_bwd_params params) {
    constexpr int kStride = Traits::kSmemStride;
    extern __shared__ __align__(16) unsigned char smem[];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int h = blockIdx.y, b = blockIdx.z;
    const int N = params.num_queries, M = params.num_keys;
    const int block_row0 = blockIdx.x * Traits::kBlockM;
    const int m16 = padded_keys(M);
    const bool use_dout = params.v_ptr != nullptr && params.dout_ptr != nullptr;
    const bool has_dmaps = has_map_gradient(params);

    const auto layout = xattn_bwd_dq_smem_layout<Traits>(M, use_dout, has_dmaps);
    Element* k_s = reinterpret_cast<Element*>(smem + layout.k);
    Element* v_s = reinterpret_cast<Element*>(smem + layout.v);
    Element* q_s = reinterpret_cast<Element*>(smem + layout.q);
    Element* do_s = reinterpret_cast<Element*>(smem + layout.dout);
    float* bias_s = reinterpret_cast<float*>(smem + layout.bias);
    float* grad_s = reinterpret_cast<float*>(smem + layout.grad_maps);
    const int grad_row = score_row_floats(m16);

    // ---- stage K, V, Q, dout, bias, and the scattered map gradient ---------------------------------------
    const int rows_valid = min(Traits::kBlockM, N - block_row0);
    const Element* k = static_cast<const Element*>(params.k_ptr) + b * params.k_strides.batch + h * params.k_strides.head;
    load_rows_to_smem<Traits>(k_s, k, params.k_strides.row, M, m16);
    const Element* q = static_cast<const Element*>(params.q_ptr) + b * params.q_strides.batch +
                       h * params.q_strides.head + block_row0 * params.q_strides.row;
    load_rows_to_smem<Traits>(q_s, q, params.q_strides.row, rows_valid, Traits::kBlockM);
    if (use_dout) {
        const Element* v = static_cast<const Element*>(params.v_ptr) + b * params.v_strides.batch + h * params.v_strides.head;
        load_rows_to_smem<Traits>(v_s, v, params.v_strides.row, M, m16);
        const Element* dout = static_cast<const Element*>(params.dout_ptr) + b * params.dout_strides.batch +
                              h * params.dout_strides.head + block_row0 * params.dout_strides.row;
        load_rows_to_smem<Traits>(do_s, dout, params.dout_strides.row, rows_valid, Traits::kBlockM);
    }
    load_key_bias(bias_s, m16, params, b, h, 0);
    if (has_dmaps) {
        scatter_map_gradient(grad_s, grad_row, Traits::kBlockM, m16, params, b, h, block_row0, 0);
    } else {
        __syncthreads();
    }

    // ---- recompute P for this warp's 16 rows ----------------------------------------------------------------
    const int key_tiles = m16 / 8;
    const int warp_row0 = block_row0 + warp * 16;
    const int warp_rows = min(16, N - warp_row0);
    const int64_t bh = static_cast<int64_t>(b) * params.heads + h;
    float lse_log2[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = g + 8 * half;
        lse_log2[half] = row < warp_rows ? params.lse_ptr[bh * N + warp_row0 + row] * kLog2e : INFINITY;
    }

    float p[Traits::kMaxKeyTiles][4];
    float dp[Traits::kMaxKeyTiles][4];
#pragma unroll
    for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) p[j][e] = dp[j][e] = 0.f;
    }
    warp_gemm_rows_by_rows<Traits, Element, Traits::kMaxKeyTiles>(p, q_s + warp * 16 * kStride, k_s, key_tiles, lane);
#pragma unroll
    for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
        if (j < key_tiles) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                p[j][e] = exp2f(p[j][e] * params.scale_log2 + bias_s[j * 8 + 2 * t + (e & 1)] - lse_log2[e / 2]);
            }
        }
    }

    // ---- dP = dout V^T + G; delta = rowsum(P * dP); dS = P * (dP - delta) -----------------------------------
    if (use_dout) {
        warp_gemm_rows_by_rows<Traits, Element, Traits::kMaxKeyTiles>(dp, do_s + warp * 16 * kStride, v_s, key_tiles, lane);
    }
    float delta[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
        if (j < key_tiles) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (has_dmaps) dp[j][e] += grad_s[(warp * 16 + g + 8 * (e / 2)) * grad_row + j * 8 + 2 * t + (e & 1)];
                delta[e / 2] += p[j][e] * dp[j][e];
            }
        }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) delta[half] = quad_sum(delta[half]);
    if (t == 0) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            if (g + 8 * half < warp_rows) params.delta_ptr[bh * N + warp_row0 + g + 8 * half] = delta[half];
        }
    }
#pragma unroll
    for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) p[j][e] *= dp[j][e] - delta[e / 2];  // p now holds dS
    }

    // ---- dq = dS K * scale ----------------------------------------------------------------------------------
    float dq[Traits::kDTiles][4];
#pragma unroll
    for (int jd = 0; jd < Traits::kDTiles; ++jd) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[jd][e] = 0.f;
    }
    warp_gemm_scores_by_rows<Traits, Element, Traits::kMaxKeyTiles>(dq, p, k_s, m16 / 16, lane);
    Element* dq_rows = static_cast<Element*>(params.dq_ptr) + b * params.dq_strides.batch +
                       h * params.dq_strides.head + static_cast<int64_t>(warp_row0) * params.dq_strides.row;
    store_warp_rows<Traits, Element>(dq_rows, params.dq_strides.row, warp_rows, dq, params.scale, lane);
}

// ------------------------------------------------------------------------------------------------------
// dk and dv partials of one split of the queries
// ------------------------------------------------------------------------------------------------------
template <typename Traits, typename Element>
__global__ void __launch_bounds__(Traits::kDkdvThreads) xattn_bwd_dkdv_kernel(const Xattn_bwd_params params) {
    constexpr int kStride = Traits::kSmemStride;
    extern __shared__ __align__(16) unsigned char smem[];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int key0 = blockIdx.x * Traits::kBlockN;
    const int split = blockIdx.y;
    const int b = blockIdx.z / params.heads, h = blockIdx.z % params.heads;
    const int N = params.num_queries, M = params.num_keys;
    const bool use_dout = params.v_ptr != nullptr && params.dout_ptr != nullptr;
    const bool has_dmaps = has_map_gradient(params);

    const auto layout = xattn_bwd_dkdv_smem_layout<Traits>(use_dout, has_dmaps);
    Element* k_s = reinterpret_cast<Element*>(smem + layout.k);
    Element* v_s = reinterpret_cast<Element*>(smem + layout.v);
    Element* q_s = reinterpret_cast<Element*>(smem + layout.q);
    Element* do_s = reinterpret_cast<Element*>(smem + layout.dout);
    float* bias_s = reinterpret_cast<float*>(smem + layout.bias);
    float* lse_s = reinterpret_cast<float*>(smem + layout.lse);      // lse * log2(e), +inf past N
    float* delta_s = reinterpret_cast<float*>(smem + layout.delta);
    float* grad_s = reinterpret_cast<float*>(smem + layout.grad_maps);
    constexpr int kGradRow = Traits::kBlockN + 4;  // == score_row_floats(kBlockN)

    // ---- this block's keys stay in shared memory for every query tile -----------------------------------
    const int keys_valid = min(Traits::kBlockN, M - key0);
    const Element* k = static_cast<const Element*>(params.k_ptr) + b * params.k_strides.batch +
                       h * params.k_strides.head + key0 * params.k_strides.row;
    load_rows_to_smem<Traits>(k_s, k, params.k_strides.row, keys_valid, Traits::kBlockN);
    if (use_dout) {
        const Element* v = static_cast<const Element*>(params.v_ptr) + b * params.v_strides.batch +
                           h * params.v_strides.head + key0 * params.v_strides.row;
        load_rows_to_smem<Traits>(v_s, v, params.v_strides.row, keys_valid, Traits::kBlockN);
    }
    load_key_bias(bias_s, Traits::kBlockN, params, b, h, key0);

    const int warp_key0 = warp * 16;                 // this warp's keys within the block
    const bool warp_active = warp_key0 < keys_valid;  // warp-uniform
    const int64_t bh = static_cast<int64_t>(b) * params.heads + h;

    float dk[Traits::kDTiles][4], dv[Traits::kDTiles][4];
#pragma unroll
    for (int jd = 0; jd < Traits::kDTiles; ++jd) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[jd][e] = dv[jd][e] = 0.f;
    }

    const int query_tiles = (N + Traits::kBlockQ - 1) / Traits::kBlockQ;
    const int tile_begin = split * params.query_tiles_per_split;
    const int tile_end = min(tile_begin + params.query_tiles_per_split, query_tiles);
    for (int tile = tile_begin; tile < tile_end; ++tile) {
        const int row0 = tile * Traits::kBlockQ;
        const int rows_valid = min(Traits::kBlockQ, N - row0);
        __syncthreads();  // every warp is done with the previous tile's shared memory

        // ---- stage Q, dout, lse and delta of this query tile (and G restricted to this block's keys) ----
        const Element* q = static_cast<const Element*>(params.q_ptr) + b * params.q_strides.batch +
                           h * params.q_strides.head + row0 * params.q_strides.row;
        load_rows_to_smem<Traits>(q_s, q, params.q_strides.row, rows_valid, Traits::kBlockQ);
        if (use_dout) {
            const Element* dout = static_cast<const Element*>(params.dout_ptr) + b * params.dout_strides.batch +
                                  h * params.dout_strides.head + row0 * params.dout_strides.row;
            load_rows_to_smem<Traits>(do_s, dout, params.dout_strides.row, rows_valid, Traits::kBlockQ);
        }
        for (int i = threadIdx.x; i < Traits::kBlockQ; i += Traits::kDkdvThreads) {
            lse_s[i] = i < rows_valid ? params.lse_ptr[bh * N + row0 + i] * kLog2e : INFINITY;
            delta_s[i] = i < rows_valid ? params.delta_ptr[bh * N + row0 + i] : 0.f;
        }
        if (has_dmaps) {
            scatter_map_gradient(grad_s, kGradRow, Traits::kBlockQ, Traits::kBlockN, params, b, h, row0, key0);
        } else {
            __syncthreads();
        }
        if (!warp_active) continue;  // warp-uniform; the barriers above are reached by every warp

        // ---- transposed scores: rows are this warp's 16 keys, columns the kBlockQ queries ----------------
        // Thread (g, t) holds keys warp_key0 + g + 8 * half and queries 8 jq + 2t + (e & 1).
        float pt[Traits::kQTiles][4], dpt[Traits::kQTiles][4];
#pragma unroll
        for (int jq = 0; jq < Traits::kQTiles; ++jq) {
#pragma unroll
            for (int e = 0; e < 4; ++e) pt[jq][e] = dpt[jq][e] = 0.f;
        }
        warp_gemm_rows_by_rows<Traits, Element, Traits::kQTiles>(pt, k_s + warp_key0 * kStride, q_s, Traits::kQTiles, lane);
#pragma unroll
        for (int jq = 0; jq < Traits::kQTiles; ++jq) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = warp_key0 + g + 8 * (e / 2), query = jq * 8 + 2 * t + (e & 1);
                pt[jq][e] = exp2f(pt[jq][e] * params.scale_log2 + bias_s[key] - lse_s[query]);
            }
        }
        if (use_dout) {
            warp_gemm_rows_by_rows<Traits, Element, Traits::kQTiles>(dpt, v_s + warp_key0 * kStride, do_s, Traits::kQTiles, lane);
            // dV += P^T dout
            warp_gemm_scores_by_rows<Traits, Element, Traits::kQTiles>(dv, pt, do_s, Traits::kQSteps, lane);
        }
#pragma unroll
        for (int jq = 0; jq < Traits::kQTiles; ++jq) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = warp_key0 + g + 8 * (e / 2), query = jq * 8 + 2 * t + (e & 1);
                float d = dpt[jq][e];
                if (has_dmaps) d += grad_s[query * kGradRow + key];
                pt[jq][e] *= d - delta_s[query];  // pt now holds dS^T
            }
        }
        // dK += dS^T Q
        warp_gemm_scores_by_rows<Traits, Element, Traits::kQTiles>(dk, pt, q_s, Traits::kQSteps, lane);
    }

    // ---- one fp32 partial per split: [split, B, H, M, D] ---------------------------------------------------
    if (!warp_active) return;
    const int64_t partial_head = ((static_cast<int64_t>(split) * params.batch + b) * params.heads + h) * M;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = key0 + warp_key0 + g + 8 * half;
        if (key < M) {
            const int64_t offset = (partial_head + key) * Traits::kHeadDim + 2 * t;
#pragma unroll
            for (int jd = 0; jd < Traits::kDTiles; ++jd) {
                *reinterpret_cast<float2*>(params.dk_partial_ptr + offset + jd * 8) =
                    make_float2(dk[jd][2 * half] * params.scale, dk[jd][2 * half + 1] * params.scale);
                if (use_dout) {
                    *reinterpret_cast<float2*>(params.dv_partial_ptr + offset + jd * 8) =
                        make_float2(dv[jd][2 * half], dv[jd][2 * half + 1]);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------------
// ordered sum of the split partials
// ------------------------------------------------------------------------------------------------------
// out[b, h, m, d] (through out_strides) = sum over s = 0, 1, ..., splits - 1 of partial[s][b, h, m, d]
// ([B, H, M, D] contiguous per split), rounded once to Element.
template <typename Element>
__global__ void xattn_bwd_reduce_kernel(const float* __restrict__ partial, Element* __restrict__ out,
                                        Xattn_strides out_strides, int heads, int keys, int head_dim,
                                        int64_t numel, int splits) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < splits; ++s) acc += partial[s * numel + i];
        const int64_t d = i % head_dim, row = i / head_dim;
        const int64_t m = row % keys, bh = row / keys;
        const int64_t offset = (bh / heads) * out_strides.batch + (bh % heads) * out_strides.head + m * out_strides.row + d;
        out[offset] = ElementOps<Element>::from_float(acc);
    }
}

}  // namespace semfid
