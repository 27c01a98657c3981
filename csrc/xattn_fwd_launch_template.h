// Launch code of the forward kernel, instantiated once per (element type, head dim) by
// instantiations/xattn_fwd_hdim*_*.cu (generate_kernels.py).
#pragma once

#include "kernel_traits.h"
#include "params.h"
#include "xattn_fwd_kernel.cuh"

namespace semfid {

template <typename Element, int kHeadDim>
cudaError_t run_xattn_fwd_hdim(const Xattn_fwd_params& params, cudaStream_t stream) {
    using Traits = Xattn_kernel_traits<kHeadDim>;
    const auto layout = xattn_fwd_smem_layout<Traits>(params.num_keys, params.v_ptr != nullptr,
                                                      params.maps_ptr != nullptr);
    auto kernel = &xattn_fwd_kernel<Traits, Element>;
    // Above 48 KiB of dynamic shared memory a kernel must opt in (up to 163 KiB on A100, 227 KiB on H100).
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, layout.total);
    if (err != cudaSuccess) return err;
    const dim3 grid((params.num_queries + Traits::kBlockM - 1) / Traits::kBlockM, params.heads, params.batch);
    kernel<<<grid, Traits::kNThreads, layout.total, stream>>>(params);
    return cudaGetLastError();
}

}  // namespace semfid
