// The subject op for small layers as plain loops over (batch, head) pairs: subject_small.cpp.
//
// subject_core.cpp calls these instead of its ATen chunk loop when a layer is small enough that
// the loop's ATen calls, not the arithmetic, would dominate (small_layer_applies). Same arguments
// and the same output layouts as subject_forward / subject_backward there.

#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace semfid_cpu {

// The accumulation type of both forms of the op: float64 for float64 inputs, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether the loops take this layer: CPU, N > 0 and S > 0, and at most `max_work` multiply-adds
// of the forward, B·H·N·((M + M_ref)·D + M·Dv) with M, M_ref, D, Dv rounded up to multiples of 16
// as the loops' buffers are; max_work <= 0 turns them off.
bool small_layer_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& k_ref, const at::Tensor& tokens, int64_t max_work);

// (out, lse, lse_ref, loss, maps, diff): lse and lse_ref empty, as in subject_core.cpp.
std::vector<at::Tensor> small_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& k_ref, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& ref_bias,
                                      const at::Tensor& tokens, const at::Tensor& ref_tokens,
                                      const std::optional<at::Tensor>& weights, double scale,
                                      bool mean_heads, bool return_maps);

// (dq, dk, dv, dk_ref) with the strides of their inputs; dk_ref empty when the reference is detached.
std::vector<at::Tensor> small_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& k_ref, const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& ref_bias,
                                       const at::Tensor& tokens, const at::Tensor& ref_tokens,
                                       const std::optional<at::Tensor>& weights, double scale,
                                       bool mean_heads, bool detach_reference, const at::Tensor& diff,
                                       const std::optional<at::Tensor>& dout,
                                       const std::optional<at::Tensor>& dloss,
                                       const std::optional<at::Tensor>& dmaps);

}  // namespace semfid_cpu
