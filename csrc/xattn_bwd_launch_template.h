// Launch code of the backward kernels (dq, dkdv, ordered reduction), instantiated once per
// (element type, head dim) by instantiations/xattn_bwd_hdim*_*.cu (generate_kernels.py). The dkdv
// and reduction steps are shared with the subject backward (subject_bwd_launch_template.h).
#pragma once

#include <algorithm>

#include "kernel_traits.h"
#include "params.h"
#include "xattn_bwd_kernel.cuh"

namespace semfid {

template <typename Element>
cudaError_t run_xattn_bwd_reduce(const float* partial, void* out, Xattn_strides out_strides, const Xattn_bwd_params& params,
                                 int head_dim, cudaStream_t stream) {
    constexpr int kThreads = 256;
    const int64_t numel = static_cast<int64_t>(params.batch) * params.heads * params.num_keys * head_dim;
    const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535);
    xattn_bwd_reduce_kernel<Element><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        partial, static_cast<Element*>(out), out_strides, params.heads, params.num_keys, head_dim, numel,
        params.num_splits);
    return cudaGetLastError();
}

// dk / dv partials per split of the queries (reads the delta written by a dq kernel), then their
// ordered sums into dk (and dv when a gradient reaches out).
template <typename Element, int kHeadDim>
cudaError_t run_xattn_bwd_dkdv(const Xattn_bwd_params& params, cudaStream_t stream) {
    using Traits = Xattn_kernel_traits<kHeadDim>;
    const bool use_dout = params.v_ptr != nullptr && params.dout_ptr != nullptr;
    const bool has_grad = params.dmaps_ptr != nullptr || params.diff_ptr != nullptr;
    const auto layout = xattn_bwd_dkdv_smem_layout<Traits>(use_dout, has_grad);
    auto kernel = &xattn_bwd_dkdv_kernel<Traits, Element>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, layout.total);
    if (err != cudaSuccess) return err;
    const dim3 grid((params.num_keys + Traits::kBlockN - 1) / Traits::kBlockN, params.num_splits,
                    params.batch * params.heads);
    kernel<<<grid, Traits::kDkdvThreads, layout.total, stream>>>(params);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    err = run_xattn_bwd_reduce<Element>(params.dk_partial_ptr, params.dk_ptr, params.dk_strides, params, kHeadDim, stream);
    if (err != cudaSuccess || !use_dout) return err;
    return run_xattn_bwd_reduce<Element>(params.dv_partial_ptr, params.dv_ptr, params.dv_strides, params, kHeadDim, stream);
}

template <typename Element, int kHeadDim>
cudaError_t run_xattn_bwd_hdim(const Xattn_bwd_params& params, cudaStream_t stream) {
    using Traits = Xattn_kernel_traits<kHeadDim>;
    const bool use_dout = params.v_ptr != nullptr && params.dout_ptr != nullptr;
    const bool has_grad = params.dmaps_ptr != nullptr || params.diff_ptr != nullptr;

    // 1. dq and delta.
    const auto layout = xattn_bwd_dq_smem_layout<Traits>(params.num_keys, use_dout, has_grad);
    auto kernel = &xattn_bwd_dq_kernel<Traits, Element>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, layout.total);
    if (err != cudaSuccess) return err;
    const dim3 grid((params.num_queries + Traits::kBlockM - 1) / Traits::kBlockM, params.heads, params.batch);
    kernel<<<grid, Traits::kNThreads, layout.total, stream>>>(params);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    // 2. dk / dv.
    return run_xattn_bwd_dkdv<Element, kHeadDim>(params, stream);
}

}  // namespace semfid
