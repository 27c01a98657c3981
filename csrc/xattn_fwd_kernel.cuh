// Forward kernel: out = P V, lse, and the selected columns of P, for up to kMaxKeys keys per head.
//
//   logits = q k^T * scale + bias          (padded keys -> -inf)
//   P      = softmax(logits) over the keys (a row whose keys are all -inf gives P = 0, lse = +inf)
//   out    = P v,   lse = log sum exp(logits) (natural log),   maps[..., s] = P[..., select[s]]
//
// Grid: (ceil(N / kBlockM), H, B). A block stages K and V of its head (all M <= kMaxKeys keys, zero
// padded to a multiple of 16) and its kBlockM query rows in shared memory once; each warp then owns
// 16 query rows and keeps their whole row of logits in registers (fp32), so the softmax is exact in one
// pass (no online rescaling), and P feeds the P V product straight from registers. Selected map columns
// go through a per-warp fp32 tile in shared memory so that the map stores are coalesced.
// Head-mean maps are reduced over heads by the host (an ordered, deterministic mean).
#pragma once

#include "params.h"
#include "warp_tiles.cuh"

namespace semfid {

template <typename Traits, typename Element>
__global__ void __launch_bounds__(Traits::kNThreads) xattn_fwd_kernel(const Xattn_fwd_params params) {
    constexpr int kStride = Traits::kSmemStride;
    extern __shared__ __align__(16) unsigned char smem[];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int h = blockIdx.y, b = blockIdx.z;
    const int N = params.num_queries, M = params.num_keys, S = params.num_selected;
    const int block_row0 = blockIdx.x * Traits::kBlockM;
    const int m16 = padded_keys(M);
    const bool has_v = params.v_ptr != nullptr;
    const bool has_maps = params.maps_ptr != nullptr;

    const auto layout = xattn_fwd_smem_layout<Traits>(M, has_v, has_maps);
    Element* k_s = reinterpret_cast<Element*>(smem + layout.k);
    Element* v_s = reinterpret_cast<Element*>(smem + layout.v);
    Element* q_s = reinterpret_cast<Element*>(smem + layout.q);
    float* bias_s = reinterpret_cast<float*>(smem + layout.bias);  // bias * log2(e), -inf on padding
    float* probs_s = reinterpret_cast<float*>(smem + layout.probs);
    const int probs_row = score_row_floats(m16);

    // ---- stage K, V, Q and the key bias -------------------------------------------------------------
    const Element* k = static_cast<const Element*>(params.k_ptr) + b * params.k_strides.batch + h * params.k_strides.head;
    load_rows_to_smem<Traits>(k_s, k, params.k_strides.row, M, m16);
    if (has_v) {
        const Element* v = static_cast<const Element*>(params.v_ptr) + b * params.v_strides.batch + h * params.v_strides.head;
        load_rows_to_smem<Traits>(v_s, v, params.v_strides.row, M, m16);
    }
    const Element* q = static_cast<const Element*>(params.q_ptr) + b * params.q_strides.batch +
                       h * params.q_strides.head + block_row0 * params.q_strides.row;
    load_rows_to_smem<Traits>(q_s, q, params.q_strides.row, min(Traits::kBlockM, N - block_row0), Traits::kBlockM);
    for (int j = threadIdx.x; j < m16; j += Traits::kNThreads) {
        float bias = -INFINITY;
        if (j < M) {
            bias = params.bias_ptr == nullptr ? 0.f
                 : params.bias_ptr[b * params.bias_batch_stride + h * params.bias_head_stride +
                                   j * params.bias_key_stride] * kLog2e;
        }
        bias_s[j] = bias;
    }
    __syncthreads();

    // ---- logits of this warp's 16 rows, in log2 units ----------------------------------------------------
    // Thread (g, t) holds rows g and g + 8 (index `half` = 0, 1) and columns 8j + 2t, 8j + 2t + 1.
    const int key_tiles = m16 / 8;
    float s[Traits::kMaxKeyTiles][4];
#pragma unroll
    for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    }
    warp_gemm_rows_by_rows<Traits, Element, Traits::kMaxKeyTiles>(s, q_s + warp * 16 * kStride, k_s, key_tiles, lane);

    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
        if (j < key_tiles) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float x = s[j][e] * params.scale_log2 + bias_s[j * 8 + 2 * t + (e & 1)];
                s[j][e] = x;
                row_max[e / 2] = fmaxf(row_max[e / 2], x);
            }
        }
    }

    // ---- softmax: P = exp2(x - max) / sum; fully masked rows (max = -inf) shift by 0 and give P = 0 --------
    float shift[2], inv_sum[2], lse[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float m = quad_max(row_max[half]);
        shift[half] = m == -INFINITY ? 0.f : m;
    }
    float row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
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
        // sum == 0 only for fully masked rows; a NaN sum propagates into lse and P.
        inv_sum[half] = sum == 0.f ? 0.f : 1.f / sum;
        lse[half] = sum == 0.f ? INFINITY : (shift[half] + log2f(sum)) * kLn2;
    }
#pragma unroll
    for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= inv_sum[e / 2];
    }

    const int warp_row0 = block_row0 + warp * 16;  // first global query row of this warp
    const int warp_rows = min(16, N - warp_row0);   // may be <= 0 for the last block
    const int64_t bh = static_cast<int64_t>(b) * params.heads + h;
    if (t == 0) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            if (g + 8 * half < warp_rows) params.lse_ptr[bh * N + warp_row0 + g + 8 * half] = lse[half];
        }
    }

    // ---- out = P V ------------------------------------------------------------------------------------------
    if (has_v) {
        float o[Traits::kDTiles][4];
#pragma unroll
        for (int jd = 0; jd < Traits::kDTiles; ++jd) {
#pragma unroll
            for (int e = 0; e < 4; ++e) o[jd][e] = 0.f;
        }
        warp_gemm_scores_by_rows<Traits, Element, Traits::kMaxKeyTiles>(o, s, v_s, m16 / 16, lane);
        Element* out = static_cast<Element*>(params.out_ptr) + b * params.out_strides.batch +
                       h * params.out_strides.head + static_cast<int64_t>(warp_row0) * params.out_strides.row;
        store_warp_rows<Traits, Element>(out, params.out_strides.row, warp_rows, o, 1.f, lane);
    }

    // ---- selected columns of P, through this warp's 16 rows of the fp32 probability tile -------------------
    if (has_maps) {
        float* probs = probs_s + warp * 16 * probs_row;
#pragma unroll
        for (int j = 0; j < Traits::kMaxKeyTiles; ++j) {
            if (j < key_tiles) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    *reinterpret_cast<float2*>(probs + (g + 8 * half) * probs_row + j * 8 + 2 * t) =
                        make_float2(s[j][2 * half], s[j][2 * half + 1]);
                }
            }
        }
        __syncwarp();
        const int64_t* select = params.select_ptr + b * params.select_batch_stride;
        float* maps = params.maps_ptr + (bh * N + warp_row0) * S;
        for (int i = lane; i < warp_rows * S; i += 32) {
            const int row = i / S, col = i - row * S;
            maps[static_cast<int64_t>(row) * S + col] = probs[row * probs_row + static_cast<int>(select[col * params.select_index_stride])];
        }
    }
}

}  // namespace semfid
