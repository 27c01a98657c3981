// Warp-level tensor-core primitives for sm_80+ (Ampere, Hopper): ldmatrix and mma.sync m16n8k16.
//
// Every matrix product in semfid's kernels is a sum of m16n8k16 tiles:
//     D[16x8] (fp32) += A[16x16] (fp16/bf16, row-major) * B[16x8] (fp16/bf16, "col": stored as [n][k])
// Register layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4, t = lane % 4:
//   A: 4 x b32, each two adjacent elements of one row:
//      a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   B: 2 x b32: b0 = B[k=2t..2t+1][n=g], b1 = B[k=2t+8..2t+9][n=g]
//   C/D: 4 x f32: c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// Consequence used by every kernel: the C fragments of two adjacent n8 tiles (columns 16k..16k+15)
// hold exactly the A fragment of k-step k once packed to 16-bit pairs (see c_to_a_fragment), so
// softmax probabilities never leave registers between "S = Q K^T" and "O = P V".
//
// ldmatrix.m8n8 loads 8x8 tiles of 16-bit elements from shared memory: lanes 8i..8i+7 give the
// addresses of the 8 rows (16 bytes each, 16-byte aligned) of tile i. Without .trans, lane L receives
// row L/4, columns 2(L%4)..+1 of each tile; with .trans it receives rows 2(L%4)..+1 of column L/4,
// i.e. the tile transposed. So a B operand stored as [n][k] in shared memory (K for S = Q K^T) is
// loaded without .trans, and one stored as [k][n] (V for O = P V) with .trans.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace semfid {

// ---- element types ---------------------------------------------------------------------------------
template <typename Element>
struct ElementOps;

template <>
struct ElementOps<__half> {
    // Two fp32 values rounded to one b32 register holding (lo, hi) halves.
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct ElementOps<__nv_bfloat16> {
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// ---- mma.sync ----------------------------------------------------------------------------------------
// d += a * b for one m16n8k16 tile, fp32 accumulation.
template <typename Element>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---- ldmatrix ----------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// A operand (16x16 tile, row-major in shared memory at `tile`, `row_stride` elements per row).
// Lane L addresses row L % 16, column 8 * (L / 16): tiles 0..3 are the quadrants in a0..a3 order.
template <typename Element>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const Element* tile, int row_stride, int lane) {
    const Element* row = tile + (lane % 16) * row_stride + (lane / 16) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                 : "r"(smem_address(row)));
}

// B operand stored as [n][k] (8 rows of n, 16 columns of k, at `tile`): no transpose.
// Lanes 0..7 address rows n = 0..7 at k = 0 (b0), lanes 8..15 the same rows at k = 8 (b1).
// Lanes 16..31 repeat lanes 0..15 (their addresses are ignored by .x2 but must be valid).
template <typename Element>
__device__ __forceinline__ void load_b_fragment_nk(uint32_t (&b)[2], const Element* tile, int row_stride, int lane) {
    const Element* row = tile + (lane % 8) * row_stride + ((lane / 8) % 2) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(smem_address(row)));
}

// B operand stored as [k][n] (16 rows of k, 8 columns of n, at `tile`): transposed on load.
// Lanes 0..7 address rows k = 0..7 (b0), lanes 8..15 rows k = 8..15 (b1).
template <typename Element>
__device__ __forceinline__ void load_b_fragment_kn(uint32_t (&b)[2], const Element* tile, int row_stride, int lane) {
    const Element* row = tile + (lane % 16) * row_stride;
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(smem_address(row)));
}

// The A fragment of k-step k (columns 16k..16k+15) from the fp32 C fragments of n8 tiles 2k, 2k+1.
template <typename Element>
__device__ __forceinline__ void c_to_a_fragment(uint32_t (&a)[4], const float (&c_lo)[4], const float (&c_hi)[4]) {
    a[0] = ElementOps<Element>::pack(c_lo[0], c_lo[1]);
    a[1] = ElementOps<Element>::pack(c_lo[2], c_lo[3]);
    a[2] = ElementOps<Element>::pack(c_hi[0], c_hi[1]);
    a[3] = ElementOps<Element>::pack(c_hi[2], c_hi[3]);
}

// Reduce a value over the 4 lanes of a quad (the lanes holding one row of a C fragment).
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace semfid
