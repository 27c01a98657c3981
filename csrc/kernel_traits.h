// Tile sizes of semfid's kernels, as compile-time constants of the head dim, and the shared-memory
// budget each block asks for. Plain C++ (no device code), so semfid_api.cpp includes it too.
//
// Work split:
//   forward, backward-dq: a block owns kBlockM = 16 * kNWarps query rows of one batch item, each warp
//     16 of them, and stages all M <= kMaxKeys keys (K, V) of a head in shared memory once. The forward
//     block of head-mean maps loops over the heads (the mean is taken on chip); otherwise every block
//     handles one (batch, head).
//   backward-dkdv: a block owns kBlockN = 16 * kDkdvWarps = 80 keys (16 per warp: SD's 77 text keys
//     fit one block) and walks the query tiles (kBlockQ rows each) of one split of the queries; partial
//     dK/dV of the splits are summed in order.
#pragma once

#include "semfid_limits.h"

// The layout helpers below run on the host (launch code, semfid_api.cpp) and in the kernels.
#ifdef __CUDACC__
#define SEMFID_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SEMFID_HOST_DEVICE inline
#endif

namespace semfid {

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

    static constexpr int kDkdvWarps = 5;                // 80 keys: M <= 80 (SD's 77) in one block
    static constexpr int kDkdvThreads = 32 * kDkdvWarps;
    static constexpr int kBlockN = 16 * kDkdvWarps;     // keys per dkdv block
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

// Forward: slot_a holds K, then K_ref (reloaded once the target pass is done), slot_b holds V; probs is
// each warp's 16 rows of P (for the gathers of selected columns); maps_acc / diff_acc are the on-chip
// head sums of A_t and of A_t - A_r (per-head passes keep A_t of one head in diff_acc).
struct Xattn_fwd_smem_layout {
    int slot_a, slot_b, q, bias, probs, maps_acc, diff_acc, total;  // byte offsets of each region, total size
};

template <typename Traits>
SEMFID_HOST_DEVICE Xattn_fwd_smem_layout xattn_fwd_smem_layout(int num_keys, bool has_v, int num_selected,
                                                               bool maps_acc, bool diff_acc) {
    const int m16 = padded_keys(num_keys);
    const int kv_bytes = m16 * Traits::kSmemStride * kElementBytes;
    const int acc_bytes = Traits::kBlockM * num_selected * 4;
    Xattn_fwd_smem_layout l;
    l.slot_a = 0;
    l.slot_b = l.slot_a + kv_bytes;
    l.q = l.slot_b + (has_v ? kv_bytes : 0);
    l.bias = l.q + Traits::kBlockM * Traits::kSmemStride * kElementBytes;
    l.probs = l.bias + round_up(m16 * 4, 16);
    l.maps_acc = l.probs + (num_selected > 0 ? Traits::kBlockM * score_row_floats(m16) * 4 : 0);
    l.diff_acc = l.maps_acc + round_up(maps_acc ? acc_bytes : 0, 16);
    l.total = l.diff_acc + round_up(diff_acc ? acc_bytes : 0, 16);
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

// Subject dq kernel: slot_a / slot_b hold (K_ref, K) while diff is recomputed, (K, V) for the target
// softmax backward, then K_ref for the reference one; ref_bias beside bias; grad_maps holds the
// scattered map gradient of one key set at a time (and the probabilities the diff gathers read).
struct Subject_bwd_dq_smem_layout {
    int slot_a, slot_b, q, dout, bias, ref_bias, grad_maps, total;
};

template <typename Traits>
SEMFID_HOST_DEVICE Subject_bwd_dq_smem_layout subject_bwd_dq_smem_layout(int num_keys, int num_ref_keys) {
    const int m16 = padded_keys(num_keys > num_ref_keys ? num_keys : num_ref_keys);
    const int kv_bytes = m16 * Traits::kSmemStride * kElementBytes;
    const int rows_bytes = Traits::kBlockM * Traits::kSmemStride * kElementBytes;
    Subject_bwd_dq_smem_layout l;
    l.slot_a = 0;
    l.slot_b = l.slot_a + kv_bytes;
    l.q = l.slot_b + kv_bytes;
    l.dout = l.q + rows_bytes;
    l.bias = l.dout + rows_bytes;
    l.ref_bias = l.bias + round_up(m16 * 4, 16);
    l.grad_maps = l.ref_bias + round_up(m16 * 4, 16);
    l.total = l.grad_maps + Traits::kBlockM * score_row_floats(m16) * 4;
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
