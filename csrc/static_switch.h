// Turn runtime values into compile-time constants for the explicit kernel instantiations:
//
//   HEADDIM_SWITCH(head_dim, [&] { run<kHeadDim>(...); });   from semfid_limits.h (generated from the limits table)
//   ELEMENT_SWITCH(is_bf16, [&] { run<Element>(...); });     Element in {__half, __nv_bfloat16}
//
// The lambda runs with the constant in scope. semfid_api.cpp checks the head dim against
// kSupportedHeadDims before switching.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "semfid_limits.h"

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
