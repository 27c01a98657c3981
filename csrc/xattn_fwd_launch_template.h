// Launch code of the forward kernel (and the loss reduction of the subject op), instantiated once per
// (element type, head dim) by instantiations/xattn_fwd_hdim*_*.cu (generate_kernels.py).
#pragma once

#include "kernel_traits.h"
#include "params.h"
#include "xattn_fwd_kernel.cuh"

namespace semfid {

// Shared memory of one forward block for these parameters (the host's smem_bytes reports it too).
template <typename Traits>
int xattn_fwd_smem_bytes(const Xattn_fwd_params& params) {
    const bool has_select = params.select_ptr != nullptr;
    const bool has_ref = params.k_ref_ptr != nullptr;
    const int keys = has_ref && params.num_ref_keys > params.num_keys ? params.num_ref_keys : params.num_keys;
    const bool acc_maps = params.mean_heads && has_select && params.maps_ptr != nullptr;
    return xattn_fwd_smem_layout<Traits>(keys, params.v_ptr != nullptr, has_select ? params.num_selected : 0,
                                         acc_maps, has_ref).total;
}

template <typename Element, int kHeadDim>
cudaError_t run_xattn_fwd_hdim(const Xattn_fwd_params& params, cudaStream_t stream) {
    using Traits = Xattn_kernel_traits<kHeadDim>;
    const int smem = xattn_fwd_smem_bytes<Traits>(params);
    auto kernel = &xattn_fwd_kernel<Traits, Element>;
    // Above 48 KiB of dynamic shared memory a kernel must opt in (up to 163 KiB on A100, 227 KiB on H100).
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid((params.num_queries + Traits::kBlockM - 1) / Traits::kBlockM,
                    params.heads / params.heads_per_block, params.batch);
    kernel<<<grid, Traits::kNThreads, smem, stream>>>(params);
    if ((err = cudaGetLastError()) != cudaSuccess || params.k_ref_ptr == nullptr) return err;
    const float factor = 1.f / (static_cast<float>(params.num_queries) *
                                static_cast<float>(params.mean_heads ? 1 : params.heads));
    xattn_loss_reduce_kernel<<<params.batch, 32, 0, stream>>>(params.loss_partial_ptr, params.loss_ptr,
                                                              static_cast<int>(grid.x * grid.y), factor);
    return cudaGetLastError();
}

}  // namespace semfid
