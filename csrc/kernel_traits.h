// Tile sizes of semfid's kernels, as compile-time constants of the head dim, and the shared-memory
// budget each block asks for. Plain C++ (no device code), so semfid_api.cpp includes it too.
//
// Work split (every block handles one (batch, head)):
//   forward, backward-dq: a block owns kBlockM = 16 * kNWarps query rows, each warp 16 of them, and
//     stages all M <= kMaxKeys keys (K, V) of its head in shared memory once.
//   backward-dkdv: a block owns kBlockN = 16 * kNWarps keys (16 per warp) and walks the query tiles
//     (kBlockQ rows each) of one split of the queries; partial dK/dV of the splits are summed in order.
#pragma once

// The layout helpers below run on the host (launch code, semfid_api.cpp) and in the kernels.
#ifdef __CUDACC__
#define SEMFID_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SEMFID_HOST_DEVICE inline
#endif

namespace semfid {

// Keys per head staged in shared memory (SD cross-attention has 77 text tokens).
constexpr int kMaxKeys = 128;

SEMFID_HOST_DEVICE constexpr int round_up(int x, int multiple) { return (x + multiple - 1) / multiple * multiple; }

// Query rows per tile of the dkdv kernel: 32 for the large head dims keeps the dK and dV accumulators
// of a warp (2 x 16 keys x head dim, fp32) in registers next to the 16 x kBlockQ score tiles.
SEMFID_HOST_DEVICE constexpr int dkdv_block_queries(int head_dim) { return head_dim <= 80 ? 64 : 32; }

template <int kHeadDim_>
struct Xattn_kernel_traits {
    static constexpr int kHeadDim = kHeadDim_;
    static_assert(kHeadDim % 8 == 0, "head dims are multiples of 8 (16-byte vector loads, n8 tiles)");
    // Q K^T runs in k-steps of 16 over the head dim: 40 and 80 are padded with zeros in shared memory.
    static constexpr int kHeadDimPadded = round_up(kHeadDim, 16);
    static constexpr int kDSteps = kHeadDimPadded / 16;
    // Outputs (O, dQ, dK, dV) are n8 tiles over the true head dim.
    static constexpr int kDTiles = kHeadDim / 8;
    // Shared-memory row length in elements: +8 (16 bytes) puts the 8 rows read by one ldmatrix
    // on 8 different 16-byte bank groups, for every head dim above.
    static constexpr int kSmemStride = kHeadDimPadded + 8;

    static constexpr int kNWarps = 4;
    static constexpr int kNThreads = 32 * kNWarps;
    static constexpr int kBlockM = 16 * kNWarps;        // query rows per forward / dq block
    static constexpr int kMaxKeyTiles = kMaxKeys / 8;   // n8 tiles of one row of logits

    static constexpr int kBlockN = 16 * kNWarps;        // keys per dkdv block
    static constexpr int kBlockQ = dkdv_block_queries(kHeadDim);  // queries per dkdv tile
    static constexpr int kQTiles = kBlockQ / 8;
    static constexpr int kQSteps = kBlockQ / 16;
};

// ---- shared-memory layouts (bytes); every region starts 16-byte aligned -------------------------------
// Both element types are 2 bytes wide, so the sizes depend on the head dim only.
constexpr int kElementBytes = 2;

SEMFID_HOST_DEVICE int padded_keys(int num_keys) { return round_up(num_keys, 16); }

// Row length (floats) of the fp32 scratch tiles holding probabilities or map gradients per key.
SEMFID_HOST_DEVICE int score_row_floats(int keys) { return keys + 4; }

struct Xattn_fwd_smem_layout {
    int k, v, q, bias, probs, total;  // byte offsets of each region, total size
};

template <typename Traits>
SEMFID_HOST_DEVICE Xattn_fwd_smem_layout xattn_fwd_smem_layout(int num_keys, bool has_v, bool has_select) {
    const int m16 = padded_keys(num_keys);
    const int kv_bytes = m16 * Traits::kSmemStride * kElementBytes;
    Xattn_fwd_smem_layout l;
    l.k = 0;
    l.v = l.k + kv_bytes;
    l.q = l.v + (has_v ? kv_bytes : 0);
    l.bias = l.q + Traits::kBlockM * Traits::kSmemStride * kElementBytes;
    l.probs = l.bias + round_up(m16 * 4, 16);
    l.total = l.probs + (has_select ? Traits::kBlockM * score_row_floats(m16) * 4 : 0);
    return l;
}

struct Xattn_bwd_dq_smem_layout {
    int k, v, q, dout, bias, grad_maps, total;
};

template <typename Traits>
SEMFID_HOST_DEVICE Xattn_bwd_dq_smem_layout xattn_bwd_dq_smem_layout(int num_keys, bool use_dout, bool has_dmaps) {
    const int m16 = padded_keys(num_keys);
    const int kv_bytes = m16 * Traits::kSmemStride * kElementBytes;
    const int rows_bytes = Traits::kBlockM * Traits::kSmemStride * kElementBytes;
    Xattn_bwd_dq_smem_layout l;
    l.k = 0;
    l.v = l.k + kv_bytes;
    l.q = l.v + (use_dout ? kv_bytes : 0);
    l.dout = l.q + rows_bytes;
    l.bias = l.dout + (use_dout ? rows_bytes : 0);
    l.grad_maps = l.bias + round_up(m16 * 4, 16);
    l.total = l.grad_maps + (has_dmaps ? Traits::kBlockM * score_row_floats(m16) * 4 : 0);
    return l;
}

struct Xattn_bwd_dkdv_smem_layout {
    int k, v, q, dout, bias, lse, delta, grad_maps, total;
};

template <typename Traits>
SEMFID_HOST_DEVICE Xattn_bwd_dkdv_smem_layout xattn_bwd_dkdv_smem_layout(bool use_dout, bool has_dmaps) {
    const int keys_bytes = Traits::kBlockN * Traits::kSmemStride * kElementBytes;
    const int rows_bytes = Traits::kBlockQ * Traits::kSmemStride * kElementBytes;
    Xattn_bwd_dkdv_smem_layout l;
    l.k = 0;
    l.v = l.k + keys_bytes;
    l.q = l.v + (use_dout ? keys_bytes : 0);
    l.dout = l.q + rows_bytes;
    l.bias = l.dout + (use_dout ? rows_bytes : 0);
    l.lse = l.bias + round_up(Traits::kBlockN * 4, 16);
    l.delta = l.lse + round_up(Traits::kBlockQ * 4, 16);
    l.grad_maps = l.delta + round_up(Traits::kBlockQ * 4, 16);
    l.total = l.grad_maps + (has_dmaps ? Traits::kBlockQ * score_row_floats(Traits::kBlockN) * 4 : 0);
    return l;
}

}  // namespace semfid
