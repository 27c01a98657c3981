// Turn runtime values into compile-time constants for the explicit kernel instantiations:
//
//   HEADDIM_SWITCH(head_dim, [&] { run<kHeadDim>(...); });   kHeadDim in {40, 64, 80, 128, 160}
//   ELEMENT_SWITCH(is_bf16, [&] { run<Element>(...); });     Element in {__half, __nv_bfloat16}
//
// The lambda runs with the constant in scope. semfid_api.cpp checks the head dim against
// kSupportedHeadDims before switching, so the final `else` (160) is reached by 160 only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define HEADDIM_SWITCH(HEADDIM, ...)            \
    [&] {                                       \
        if ((HEADDIM) == 40) {                  \
            constexpr static int kHeadDim = 40; \
            return __VA_ARGS__();               \
        } else if ((HEADDIM) == 64) {           \
            constexpr static int kHeadDim = 64; \
            return __VA_ARGS__();               \
        } else if ((HEADDIM) == 80) {           \
            constexpr static int kHeadDim = 80; \
            return __VA_ARGS__();               \
        } else if ((HEADDIM) == 128) {          \
            constexpr static int kHeadDim = 128; \
            return __VA_ARGS__();               \
        } else {                                \
            constexpr static int kHeadDim = 160; \
            return __VA_ARGS__();               \
        }                                       \
    }()

#define ELEMENT_SWITCH(IS_BF16, ...)            \
    [&] {                                       \
        if (IS_BF16) {                          \
            using Element = __nv_bfloat16;      \
            return __VA_ARGS__();               \
        } else {                                \
            using Element = __half;             \
            return __VA_ARGS__();               \
        }                                       \
    }()
