// Row kernels of the GEMM-built CPU attention (semfid/backends/gemm_attention.py): the softmax
// and backward steps between its matrix products, each one pass over a logit block in place.
//
// Blocks are float32, contiguous, 2-D; the Python caller checks that. "Rows" are the block's first
// dimension: queries in the forward's [R, M] logit blocks, keys in the backward's transposed
// [C, N] blocks (so per-query terms such as lse broadcast along a row there).

#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace semfid_cpu {

// s [R, M] <- exp(s + bias - m_r) with m_r the row max (bias [M] or none); returns
// (lse [R] = m_r + log(sum_r), inv_sum [R] = 1 / sum_r). A row whose logits are all -inf (no key)
// is set to 0 with lse = +inf and inv_sum = 0; a row holding a NaN gives NaN lse and inv_sum.
std::vector<at::Tensor> softmax_rows_(at::Tensor s, const std::optional<at::Tensor>& bias);

// s [C, N] <- exp(s + row_bias[c] - col_sub[n]): P^T from the transposed logits and lse
// (row_bias [C] or none; col_sub = +inf gives 0). col_sub must be at least every logit of its
// column, as lse is: the exp (vector_exp.h) is exact to float32 only for arguments <= 0.
void exp_rows_cols_(at::Tensor s, const std::optional<at::Tensor>& row_bias, const at::Tensor& col_sub);

// dp [C, N] <- p * (dp - col_delta[n]): dS^T from P^T, dP^T and the softmax backward's row term.
void softmax_grad_cols_(at::Tensor dp, const at::Tensor& p, const at::Tensor& col_delta);

}  // namespace semfid_cpu
