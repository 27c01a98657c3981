// Row kernels of the GEMM-built CPU attention (see row_exp.h).
//
// Every exp argument is at most 0 (logits minus their row max or their lse), so the loops use
// vector_exp.h's exp, which the compiler vectorises; each loop is compiled for AVX-512, AVX2 and
// plain x86-64 and picked at load time (target_clones) where the compiler supports it (the small
// loops of subject_small.cpp clone AVX2 only). Results below e^-88 are 0 (PyTorch's exp keeps
// subnormals down to e^-103): a probability that small is invisible next to the row's largest.

#include "row_exp.h"
#include "vector_exp.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SEMFID_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define SEMFID_CLONES
#endif

namespace semfid_cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

SEMFID_CLONES
void softmax_block(float* s, const float* bias, float* lse, float* inv, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * cols;
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) row[c] += bias[c];
    }
    float m = -kInf;
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < cols; ++c) m = row[c] > m ? row[c] : m;
    if (m == -kInf) {  // no key, or only NaN: the comparison above skips NaN
      bool nan = false;
      for (int64_t c = 0; c < cols; ++c) nan = nan || row[c] != row[c];
      const float fill = nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
      for (int64_t c = 0; c < cols; ++c) row[c] = fill;
      lse[r] = nan ? fill : kInf;
      inv[r] = fill;
      continue;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cols; ++c) {
      const float e = exp_nonpositive_one(row[c] - m);
      row[c] = e;
      sum += e;
    }
    lse[r] = m + std::log(sum);
    inv[r] = 1.0f / sum;
  }
}

SEMFID_CLONES
void exp_block(float* s, const float* row_bias, const float* col_sub, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * cols;
    const float b = row_bias != nullptr ? row_bias[r] : 0.0f;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] = exp_nonpositive_one(row[c] + b - col_sub[c]);
  }
}

SEMFID_CLONES
void grad_block(float* dp, const float* p, const float* delta, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dp + r * cols;
    const float* pr = p + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) d[c] = pr[c] * (d[c] - delta[c]);
  }
}

void check_block(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.is_contiguous() && t.is_cpu(),
              name, " must be a contiguous 2-D float32 CPU tensor, got ", t.sizes(), " ", t.scalar_type());
}

void check_vector(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.is_cpu(),
              name, " must be a contiguous float32 CPU vector of ", n, " elements, got ", t.sizes());
}

// rows per parallel task: about 32K elements of work each
int64_t grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cols)); }

}  // namespace

std::vector<at::Tensor> softmax_rows_(at::Tensor s, const std::optional<at::Tensor>& bias) {
  check_block(s, "s");
  const int64_t rows = s.size(0), cols = s.size(1);
  if (bias) check_vector(*bias, cols, "bias");
  at::Tensor lse = at::empty({rows}, s.options());
  at::Tensor inv = at::empty({rows}, s.options());
  float* sp = s.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* lp = lse.data_ptr<float>();
  float* ip = inv.data_ptr<float>();
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    softmax_block(sp + begin * cols, bp, lp + begin, ip + begin, end - begin, cols);
  });
  return {lse, inv};
}

void exp_rows_cols_(at::Tensor s, const std::optional<at::Tensor>& row_bias, const at::Tensor& col_sub) {
  check_block(s, "s");
  const int64_t rows = s.size(0), cols = s.size(1);
  if (row_bias) check_vector(*row_bias, rows, "row_bias");
  check_vector(col_sub, cols, "col_sub");
  float* sp = s.data_ptr<float>();
  const float* bp = row_bias ? row_bias->data_ptr<float>() : nullptr;
  const float* cp = col_sub.data_ptr<float>();
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    exp_block(sp + begin * cols, bp == nullptr ? nullptr : bp + begin, cp, end - begin, cols);
  });
}

void softmax_grad_cols_(at::Tensor dp, const at::Tensor& p, const at::Tensor& col_delta) {
  check_block(dp, "dp");
  check_block(p, "p");
  TORCH_CHECK(p.sizes() == dp.sizes(), "p must have dp's shape ", dp.sizes(), ", got ", p.sizes());
  const int64_t rows = dp.size(0), cols = dp.size(1);
  check_vector(col_delta, cols, "col_delta");
  float* dpp = dp.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  const float* dl = col_delta.data_ptr<float>();
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    grad_block(dpp + begin * cols, pp + begin * cols, dl, end - begin, cols);
  });
}

}  // namespace semfid_cpu
