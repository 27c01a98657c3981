// Block-level copies between global and shared memory, and the two warp-level matrix products every
// semfid kernel is built from. Shared-memory tiles are row-major with Traits::kSmemStride elements per
// row; a warp always works on 16 rows of its A operand.
#pragma once

#include <math.h>
#include <stdint.h>

#include "kernel_traits.h"
#include "mma_sm80.cuh"

namespace semfid {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Copy rows [0, rows_valid) of a [rows, kHeadDim] global tile (row stride in elements, 16-byte aligned
// rows) into shared memory, as 16-byte vectors; rows [rows_valid, rows_total) and the head-dim padding
// columns [kHeadDim, kHeadDimPadded) become zeros, so padded rows and columns add nothing to a product
// (and never inject NaN from stale shared memory). Called by all threads of the block.
template <typename Traits, typename Element>
__device__ __forceinline__ void load_rows_to_smem(Element* smem, const Element* gmem, int64_t row_stride,
                                                  int rows_valid, int rows_total) {
    constexpr int kChunks = Traits::kHeadDimPadded / 8;  // 16-byte chunks per padded row
    for (int i = threadIdx.x; i < rows_total * kChunks; i += blockDim.x) {
        const int row = i / kChunks;
        const int col = (i % kChunks) * 8;
        uint4 chunk = make_uint4(0u, 0u, 0u, 0u);
        if (row < rows_valid && col < Traits::kHeadDim) {
            chunk = *reinterpret_cast<const uint4*>(gmem + row * row_stride + col);
        }
        *reinterpret_cast<uint4*>(smem + row * Traits::kSmemStride + col) = chunk;
    }
}

// bias[key] * log2(e) for keys [key0, key0 + count) of head (b, h) into shared memory: 0 without a
// bias, -inf past the last key (so padded keys get P = 0). Called by all threads of the block.
__device__ __forceinline__ void load_key_bias(float* bias_s, int count, const float* bias, int64_t batch_stride,
                                              int64_t head_stride, int64_t key_stride, int num_keys, int b, int h,
                                              int key0) {
    for (int j = threadIdx.x; j < count; j += blockDim.x) {
        float value = -INFINITY;
        if (key0 + j < num_keys) {
            value = bias == nullptr ? 0.f : bias[b * batch_stride + h * head_stride + (key0 + j) * key_stride] * kLog2e;
        }
        bias_s[j] = value;
    }
}

// acc[j] += A . B_j^T over the (padded) head dim, for the n8 tiles j < n_tiles (a runtime bound, the
// loop is unrolled to kNTiles so acc stays in registers).
//   a_s: 16 rows of A in shared memory (e.g. 16 query rows of Q); b_s: rows 8j..8j+7 of B are the
//   n-tile j (e.g. keys of K), both [row][head dim]. Used for S = Q K^T and dP = dO V^T.
template <typename Traits, typename Element, int kNTiles>
__device__ __forceinline__ void warp_gemm_rows_by_rows(float (&acc)[kNTiles][4], const Element* a_s,
                                                       const Element* b_s, int n_tiles, int lane) {
#pragma unroll
    for (int kk = 0; kk < Traits::kDSteps; ++kk) {
        uint32_t a[4];
        load_a_fragment(a, a_s + kk * 16, Traits::kSmemStride, lane);
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) {
            if (j < n_tiles) {
                uint32_t b[2];
                load_b_fragment_nk(b, b_s + j * 8 * Traits::kSmemStride + kk * 16, Traits::kSmemStride, lane);
                mma_16816<Element>(acc[j], a, b);
            }
        }
    }
}

// acc[jd] += P . B over k-steps ks < k_steps (16 columns of P / rows of B each), for every n8 tile jd of
// the head dim. P is given as fp32 C fragments (the scores of warp_gemm_rows_by_rows) and rounded to
// Element here; b_s holds B as [k][head dim] (e.g. V [key][d], or Q [query][d]). Used for O = P V,
// dQ = dS K, dV = P^T dO and dK = dS^T Q.
template <typename Traits, typename Element, int kNTiles>
__device__ __forceinline__ void warp_gemm_scores_by_rows(float (&acc)[Traits::kDTiles][4],
                                                         const float (&p)[kNTiles][4], const Element* b_s,
                                                         int k_steps, int lane) {
    static_assert(kNTiles % 2 == 0, "k-steps of 16 take two n8 score tiles");
#pragma unroll
    for (int ks = 0; ks < kNTiles / 2; ++ks) {
        if (ks < k_steps) {
            uint32_t a[4];
            c_to_a_fragment<Element>(a, p[2 * ks], p[2 * ks + 1]);
#pragma unroll
            for (int jd = 0; jd < Traits::kDTiles; ++jd) {
                uint32_t b[2];
                load_b_fragment_kn(b, b_s + ks * 16 * Traits::kSmemStride + jd * 8, Traits::kSmemStride, lane);
                mma_16816<Element>(acc[jd], a, b);
            }
        }
    }
}

// Store a warp's [16, kHeadDim] fp32 accumulator (times `factor`) to global rows [0, rows_valid) as
// Element pairs; `rows` points at the warp's first row.
template <typename Traits, typename Element>
__device__ __forceinline__ void store_warp_rows(Element* rows, int64_t row_stride, int rows_valid,
                                                const float (&acc)[Traits::kDTiles][4], float factor, int lane) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = g + 8 * half;
        if (row < rows_valid) {
#pragma unroll
            for (int jd = 0; jd < Traits::kDTiles; ++jd) {
                const uint32_t pair = ElementOps<Element>::pack(acc[jd][2 * half] * factor,
                                                                acc[jd][2 * half + 1] * factor);
                *reinterpret_cast<uint32_t*>(rows + row * row_stride + jd * 8 + 2 * t) = pair;
            }
        }
    }
}

// In-register softmax of a warp's 16 rows of logits (the C fragments of warp_gemm_rows_by_rows over
// key_tiles n8 tiles): s = exp2(s * scale_log2 + bias - max) / sum, and lse (natural log) per row
// half (rows g and g + 8). A row whose keys are all -inf gives P = 0 and lse = +inf; NaN propagates.
template <int kNTiles>
__device__ __forceinline__ void softmax_rows(float (&s)[kNTiles][4], int key_tiles, const float* bias_s,
                                             float scale_log2, int t, float (&lse)[2]) {
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
        if (j < key_tiles) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float x = s[j][e] * scale_log2 + bias_s[j * 8 + 2 * t + (e & 1)];
                s[j][e] = x;
                row_max[e / 2] = fmaxf(row_max[e / 2], x);
            }
        }
    }
    float shift[2], inv_sum[2], row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float m = quad_max(row_max[half]);
        shift[half] = m == -INFINITY ? 0.f : m;
    }
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
        if (j < key_tiles) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[j][e] - shift[e / 2]);
                s[j][e] = p;
                row_sum[e / 2] += p;
            }
        }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float sum = quad_sum(row_sum[half]);
        inv_sum[half] = sum == 0.f ? 0.f : 1.f / sum;  // sum == 0 only for fully masked rows
        lse[half] = sum == 0.f ? INFINITY : (shift[half] + log2f(sum)) * kLn2;
    }
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= inv_sum[e / 2];
    }
}

// P = exp2(s * scale_log2 + bias - lse_log2) from saved lse (log2 units; +inf gives P = 0).
template <int kNTiles>
__device__ __forceinline__ void probabilities_from_lse(float (&s)[kNTiles][4], int key_tiles, const float* bias_s,
                                                       float scale_log2, const float (&lse_log2)[2], int t) {
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
        if (j < key_tiles) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[j][e] = exp2f(s[j][e] * scale_log2 + bias_s[j * 8 + 2 * t + (e & 1)] - lse_log2[e / 2]);
            }
        }
    }
}

// Write a warp's 16 rows of scores (C fragments) to a row-major fp32 tile with row_floats per row.
template <int kNTiles>
__device__ __forceinline__ void store_scores_to_smem(float* tile, int row_floats, const float (&s)[kNTiles][4],
                                                     int key_tiles, int lane) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
        if (j < key_tiles) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                *reinterpret_cast<float2*>(tile + (g + 8 * half) * row_floats + j * 8 + 2 * t) =
                    make_float2(s[j][2 * half], s[j][2 * half + 1]);
            }
        }
    }
}

// Deterministic sum over the 32 lanes of a warp (a fixed butterfly: every lane gets the same bits).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

}  // namespace semfid
