// Launch code of the subject-wise backward (subject dq kernel, then dk / dv and dk_ref with the
// dkdv kernel and ordered reduction of xattn_bwd_launch_template.h), instantiated once per
// (element type, head dim) by instantiations/subject_bwd_hdim*_*.cu (generate_kernels.py).
#pragma once

#include "kernel_traits.h"
#include "params.h"
#include "subject_bwd_kernel.cuh"
#include "xattn_bwd_launch_template.h"

namespace semfid {

template <typename Element, int kHeadDim>
cudaError_t run_subject_bwd_hdim(const Subject_bwd_params& params, cudaStream_t stream) {
    using Traits = Xattn_kernel_traits<kHeadDim>;
    const Xattn_bwd_params& tgt = params.target;
    const int smem = subject_bwd_dq_smem_layout<Traits>(tgt.num_keys, params.reference.num_keys).total;
    auto kernel = &subject_bwd_dq_kernel<Traits, Element>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid((tgt.num_queries + Traits::kBlockM - 1) / Traits::kBlockM, tgt.heads, tgt.batch);
    kernel<<<grid, Traits::kNThreads, smem, stream>>>(params);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if ((err = run_xattn_bwd_dkdv<Element, kHeadDim>(tgt, stream)) != cudaSuccess || !params.reference_grad) return err;
    return run_xattn_bwd_dkdv<Element, kHeadDim>(params.reference, stream);
}

}  // namespace semfid
