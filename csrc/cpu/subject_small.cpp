// The subject op for small layers: one pass over the query rows of each (batch, head) pair, in
// plain loops on the tensors' memory, with no ATen call inside.
//
// SDXL's structural twin has 60 of its 70 cross-attention layers at B·H = 8, N = 16, M = 77,
// D = 16: about half a million multiply-adds per direction, which the ATen chunk loop of
// subject_core.cpp spreads over ~35 (forward) and ~50 (backward) calls of a few microseconds of
// dispatch each. Here the same arithmetic is a few nested loops per (b, h) pair, split over
// threads by at::parallel_for. The math is subject_core.cpp's (and semfid/backends/torch.py's):
//
//   forward, per query row:  P_t = softmax(scale·q·Kᵀ + bias),  P_r = softmax(scale·q·K_refᵀ + ref_bias)
//                            out = P_t·V,  A_t[s] = P_t[tokens[s]],  A_r[s] = P_r[ref_tokens[s]]
//   backward, per query row: G_t = factor·d (+ dmaps),  G_r = -factor·d (reference not detached)
//                            dP_t = dout·Vᵀ, dP_t[tokens] += G_t;  dS = P ⊙ (dP − ⟨P, dP⟩)
//                            dq = scale·(dS_t·K + dS_r·K_ref), dK += scale·dS_tᵀ·q, dV += P_tᵀ·dout
//
// with P recomputed in backward, d = A_t − A_r (per head, or the saved head-mean diff), and a row
// whose keys are all masked (-inf bias) given P = 0, as the ATen path's dead rows. Every sum runs
// in the accumulation type (float32; float64 for float64 inputs); the key blocks are copied into
// that type once per (b, h), in both row and column layouts, so that every inner loop walks
// contiguous memory and the compiler can vectorise it (reductions over a row are split into
// partial sums by hand, so their order differs from the chunk loop's by rounding only).

#include "subject_small.h"
#include "vector_exp.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace semfid_cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Multiply-adds per task below which at::parallel_for keeps pairs together on one thread.
constexpr int64_t kTaskWork = 1 << 15;
// Row lengths of the local buffers are padded (with zeros) to a multiple of this, so that every
// product loop runs over whole blocks of 16 accumulators.
constexpr int64_t kPad = 16;

int64_t padded(int64_t n) {
  return (n + kPad - 1) / kPad * kPad;
}

// Strided element access to a tensor of up to four dimensions (sizes checked by the caller).
template <typename T>
struct Strided {
  T* data;
  int64_t s[4] = {0, 0, 0, 0};
  explicit Strided(const Tensor& t) : data(t.data_ptr<T>()) {
    for (int64_t i = 0; i < t.dim(); ++i) {
      s[i] = t.stride(i);
    }
  }
  T& operator()(int64_t a, int64_t b) const { return data[a * s[0] + b * s[1]]; }
  T& operator()(int64_t a, int64_t b, int64_t c) const { return data[a * s[0] + b * s[1] + c * s[2]]; }
  T& operator()(int64_t a, int64_t b, int64_t c, int64_t d) const {
    return data[a * s[0] + b * s[1] + c * s[2] + d * s[3]];
  }
};

// Slice (b, h) of a [B, H, L, E] tensor in the accumulation type, as rows [L][pad(E)] and/or
// columns [E][pad(L)] (either may be null); the padding is written once by the caller (zeros).
template <typename T, typename A>
void load_block(const Strided<T>& t, int64_t b, int64_t h, int64_t L, int64_t E, A* rows, A* cols) {
  const int64_t row_stride = padded(E), col_stride = padded(L);
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t e = 0; e < E; ++e) {
      const A x = static_cast<A>(t(b, h, i, e));
      if (rows != nullptr) {
        rows[i * row_stride + e] = x;
      }
      if (cols != nullptr) {
        cols[e * col_stride + i] = x;
      }
    }
  }
}

// The inner loops below are written for the auto-vectoriser: restrict-qualified pointers,
// accumulators in fixed-size local blocks (kept in registers), sums split over kLanes partial
// sums, and no branch in an elementwise loop (built with -fno-trapping-math, which lets the
// compiler turn a select into a vector blend). With GCC on x86-64 Linux each is also compiled for
// AVX2 and picked at load time (target_clones); elsewhere it is the baseline build.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SEMFID_VECTOR_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define SEMFID_VECTOR_LOOP
#endif

constexpr int64_t kLanes = 8;   // partial sums of a reduction

// out[0, W) = Σ_i w[i]·rows[i][0, W) for a fixed W: W accumulators in registers, one chain each.
template <int64_t W, typename A>
inline void combine_block(const A* __restrict__ w, const A* __restrict__ rows, int64_t n, int64_t stride,
                          A* __restrict__ out) {
  A acc[W] = {};
  for (int64_t i = 0; i < n; ++i) {
    const A x = w[i];
    const A* __restrict__ r = rows + i * stride;
    for (int64_t l = 0; l < W; ++l) {
      acc[l] += x * r[l];
    }
  }
  for (int64_t l = 0; l < W; ++l) {
    out[l] = acc[l];
  }
}

// The same for W = kPad with the rows split over four partial sums: a narrow output (16 values,
// two AVX registers) would otherwise wait on the latency of one chain per register.
template <typename A>
inline void combine_block_split(const A* __restrict__ w, const A* __restrict__ rows, int64_t n,
                                int64_t stride, A* __restrict__ out) {
  A a0[kPad] = {}, a1[kPad] = {}, a2[kPad] = {}, a3[kPad] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const A x0 = w[i], x1 = w[i + 1], x2 = w[i + 2], x3 = w[i + 3];
    const A* __restrict__ r0 = rows + i * stride;
    const A* __restrict__ r1 = r0 + stride;
    const A* __restrict__ r2 = r1 + stride;
    const A* __restrict__ r3 = r2 + stride;
    for (int64_t l = 0; l < kPad; ++l) {
      a0[l] += x0 * r0[l];
      a1[l] += x1 * r1[l];
      a2[l] += x2 * r2[l];
      a3[l] += x3 * r3[l];
    }
  }
  for (; i < n; ++i) {
    const A x = w[i];
    const A* __restrict__ r = rows + i * stride;
    for (int64_t l = 0; l < kPad; ++l) {
      a0[l] += x * r[l];
    }
  }
  for (int64_t l = 0; l < kPad; ++l) {
    out[l] = (a0[l] + a1[l]) + (a2[l] + a3[l]);
  }
}

// out[e] = Σ_i w[i]·rows[i][e] for e < E, rows [n][E] with E a multiple of kPad (padded buffers).
template <typename A>
SEMFID_VECTOR_LOOP void combine_rows(const A* __restrict__ w, const A* __restrict__ rows, int64_t n,
                                     int64_t E, A* __restrict__ out) {
  int64_t e0 = 0;
  for (; e0 + 4 * kPad <= E; e0 += 4 * kPad) {
    combine_block<4 * kPad>(w, rows + e0, n, E, out + e0);
  }
  for (; e0 + 2 * kPad <= E; e0 += 2 * kPad) {
    combine_block<2 * kPad>(w, rows + e0, n, E, out + e0);
  }
  for (; e0 < E; e0 += kPad) {
    combine_block_split(w, rows + e0, n, E, out + e0);
  }
}

// total[j][e] += w[j]·x[e] (total [L][E]).
template <typename A>
SEMFID_VECTOR_LOOP void add_outer(A* __restrict__ total, const A* __restrict__ w, const A* __restrict__ x,
                                  int64_t L, int64_t E) {
  for (int64_t j = 0; j < L; ++j) {
    const A c = w[j];
    A* __restrict__ t = total + j * E;
    for (int64_t e = 0; e < E; ++e) {
      t[e] += c * x[e];
    }
  }
}

// Σ_j x[j]·y[j] in kLanes partial sums.
template <typename A>
SEMFID_VECTOR_LOOP A lane_dot(const A* __restrict__ x, const A* __restrict__ y, int64_t L) {
  A acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= L; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      acc[l] += x[j + l] * y[j + l];
    }
  }
  A total = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    total += acc[l];
  }
  for (; j < L; ++j) {
    total += x[j] * y[j];
  }
  return total;
}

// Σ_j x[j] in kLanes partial sums.
template <typename A>
SEMFID_VECTOR_LOOP A lane_sum(const A* __restrict__ x, int64_t L) {
  A acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= L; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      acc[l] += x[j + l];
    }
  }
  A total = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    total += acc[l];
  }
  for (; j < L; ++j) {
    total += x[j];
  }
  return total;
}

template <typename A>
SEMFID_VECTOR_LOOP A lane_max(const A* __restrict__ x, int64_t L) {
  A acc[kLanes];
  std::fill(acc, acc + kLanes, -std::numeric_limits<A>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= L; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      acc[l] = acc[l] > x[j + l] ? acc[l] : x[j + l];
    }
  }
  A top = -std::numeric_limits<A>::infinity();
  for (int64_t l = 0; l < kLanes; ++l) {
    top = top > acc[l] ? top : acc[l];
  }
  for (; j < L; ++j) {
    top = top > x[j] ? top : x[j];
  }
  return top;
}

// x[j] = e^x[j] for x[j] <= 0, in place (a vectorisable std::exp: vector_exp.h). double: std::exp.
SEMFID_VECTOR_LOOP void exp_nonpositive(float* __restrict__ x, int64_t L) {
  for (int64_t j = 0; j < L; ++j) {
    x[j] = exp_nonpositive_one(x[j]);
  }
}

void exp_nonpositive(double* x, int64_t L) {
  for (int64_t j = 0; j < L; ++j) {
    x[j] = std::exp(x[j]);
  }
}

// s[j] = Σ_d qs[d]·cols[d][j] + bias[j] for j < pad(L) (cols [D][pad(L)]; bias, may be null, on j < L).
template <typename A>
void scores(const A* qs, const A* cols, int64_t D, int64_t L, const A* bias, A* s) {
  combine_rows(qs, cols, D, padded(L), s);
  if (bias != nullptr) {
    for (int64_t j = 0; j < L; ++j) {
      s[j] += bias[j];
    }
  }
}

// Scores to probabilities in place; every key masked (max = -inf): all zeros.
template <typename A>
void softmax_row(A* s, int64_t L) {
  const A top = lane_max(s, L);
  if (top == -std::numeric_limits<A>::infinity()) {
    std::fill(s, s + L, A(0));
    return;
  }
  for (int64_t j = 0; j < L; ++j) {
    s[j] -= top;
  }
  exp_nonpositive(s, L);
  const A inv = A(1) / lane_sum(s, L);
  for (int64_t j = 0; j < L; ++j) {
    s[j] *= inv;
  }
}

// dS = P ⊙ (dP − ⟨P, dP⟩), in place over dp.
template <typename A>
void softmax_grad(const A* p, A* dp, int64_t L) {
  const A dot = lane_dot(p, static_cast<const A*>(dp), L);
  for (int64_t j = 0; j < L; ++j) {
    dp[j] = p[j] * (dp[j] - dot);
  }
}

// Bias row (b, h) of [B, H, L] in the accumulation type, or null when there is no bias.
template <typename A>
const A* load_bias(const OptTensor& bias, int64_t b, int64_t h, int64_t L, std::vector<A>& row) {
  if (!bias.has_value()) {
    return nullptr;
  }
  const Strided<A> t(*bias);
  row.resize(L);
  for (int64_t j = 0; j < L; ++j) {
    row[j] = t(b, h, j);
  }
  return row.data();
}

void check_tokens(const Tensor& tokens, int64_t L, const char* name) {
  const Strided<int64_t> t(tokens);
  for (int64_t b = 0; b < tokens.size(0); ++b) {
    for (int64_t s = 0; s < tokens.size(1); ++s) {
      const int64_t j = t(b, s);
      TORCH_CHECK_INDEX(0 <= j && j < L, name, "[", b, ", ", s, "] = ", j, " is outside [0, ", L, ")");
    }
  }
}

OptTensor to_acc(const OptTensor& t, at::ScalarType acc) {
  return t.has_value() ? OptTensor(t->to(acc)) : OptTensor();
}

int64_t grain(int64_t work_per_pair) {
  return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, work_per_pair));
}

template <typename T>
void forward_loops(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_ref,
                   const OptTensor& bias, const OptTensor& ref_bias, const Tensor& tokens,
                   const Tensor& ref_tokens, double scale_in, const Tensor& out, const Tensor& selected) {
  using A = at::opmath_type<T>;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t M = k.size(2), M_ref = k_ref.size(2), Dv = v.size(3), S = tokens.size(1);
  const int64_t Mp = padded(M), Mrp = padded(M_ref), Dp = padded(D), Dvp = padded(Dv);
  const A scale = static_cast<A>(scale_in);
  const Strided<T> q_(q), k_(k), v_(v), kr_(k_ref), out_(out);
  const Strided<int64_t> tok(tokens), rtok(ref_tokens);
  A* sel = selected.data_ptr<A>();  // [B, H, N, 2·S] contiguous: A_t then A_r
  const int64_t pair_work = N * ((M + M_ref) * D + M * Dv);
  at::parallel_for(0, B * H, grain(pair_work), [&](int64_t begin, int64_t end) {
    std::vector<A> k_cols(Dp * Mp, A(0)), v_rows(M * Dvp, A(0)), kref_cols(Dp * Mrp, A(0));
    std::vector<A> qrow(Dp, A(0)), st(Mp), sr(Mrp), orow(Dvp), bias_row, ref_bias_row;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      load_block(k_, b, h, M, D, static_cast<A*>(nullptr), k_cols.data());
      load_block(v_, b, h, M, Dv, v_rows.data(), static_cast<A*>(nullptr));
      load_block(kr_, b, h, M_ref, D, static_cast<A*>(nullptr), kref_cols.data());
      const A* bt = load_bias(bias, b, h, M, bias_row);
      const A* br = load_bias(ref_bias, b, h, M_ref, ref_bias_row);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t d = 0; d < D; ++d) {
          qrow[d] = static_cast<A>(q_(b, h, n, d)) * scale;
        }
        scores(qrow.data(), k_cols.data(), D, M, bt, st.data());
        softmax_row(st.data(), M);
        combine_rows(st.data(), v_rows.data(), M, Dvp, orow.data());
        for (int64_t e = 0; e < Dv; ++e) {
          out_(b, h, n, e) = static_cast<T>(orow[e]);
        }
        scores(qrow.data(), kref_cols.data(), D, M_ref, br, sr.data());
        softmax_row(sr.data(), M_ref);
        A* a = sel + (bh * N + n) * 2 * S;
        for (int64_t s = 0; s < S; ++s) {
          a[s] = st[tok(b, s)];
          a[S + s] = sr[rtok(b, s)];
        }
      }
    }
  });
}

// From the selected columns [B, H, N, 2·S] to the maps, the head-mean diff and the loss (as the
// chunk loop: maps = mean_h A_t or A_t, d = maps − (mean_h A_r or A_r), loss[b] = Σ w·d² / norm).
template <typename A>
void reduce_selected(const Tensor& selected, const OptTensor& weights, bool mean_heads, bool return_maps,
                     const Tensor& maps, const Tensor& diff, const Tensor& loss) {
  const int64_t B = selected.size(0), H = selected.size(1), N = selected.size(2), S = selected.size(3) / 2;
  const A* sel = selected.data_ptr<A>();
  A* maps_p = return_maps ? maps.data_ptr<A>() : nullptr;  // [B, N, S] or [B, H, N, S], contiguous
  A* diff_p = mean_heads ? diff.data_ptr<A>() : nullptr;   // [B, N, S], contiguous
  A* loss_p = loss.data_ptr<A>();
  std::optional<Strided<A>> w;
  if (weights.has_value()) {
    w.emplace(*weights);
  }
  const A inv_h = A(1) / static_cast<A>(H);
  const double h_red = mean_heads ? 1.0 : static_cast<double>(H);
  const A norm = static_cast<A>(
      1.0 / (static_cast<double>(N) * h_red * (weights.has_value() ? 1.0 : static_cast<double>(S))));
  for (int64_t b = 0; b < B; ++b) {
    A total = 0;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t s = 0; s < S; ++s) {
        const A weight = w.has_value() ? (*w)(b, s) : A(1);
        if (mean_heads) {
          A a_t = 0, a_r = 0;
          for (int64_t h = 0; h < H; ++h) {
            const A* a = sel + ((b * H + h) * N + n) * 2 * S;
            a_t += a[s];
            a_r += a[S + s];
          }
          a_t *= inv_h;
          a_r *= inv_h;
          const A d = a_t - a_r;
          diff_p[(b * N + n) * S + s] = d;
          if (return_maps) {
            maps_p[(b * N + n) * S + s] = a_t;
          }
          total += weight * d * d;
        } else {
          for (int64_t h = 0; h < H; ++h) {
            const A* a = sel + ((b * H + h) * N + n) * 2 * S;
            const A d = a[s] - a[S + s];
            if (return_maps) {
              maps_p[((b * H + h) * N + n) * S + s] = a[s];
            }
            total += weight * d * d;
          }
        }
      }
    }
    loss_p[b] = total * norm;
  }
}

template <typename T>
void backward_loops(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_ref,
                    const OptTensor& bias, const OptTensor& ref_bias, const Tensor& tokens,
                    const Tensor& ref_tokens, double scale_in, bool mean_heads, bool detach_reference,
                    const Tensor& diff, const OptTensor& dout, const std::vector<double>& factor,
                    const OptTensor& dmaps, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                    const Tensor& dk_ref) {
  using A = at::opmath_type<T>;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t M = k.size(2), M_ref = k_ref.size(2), Dv = v.size(3), S = tokens.size(1);
  const int64_t Mp = padded(M), Mrp = padded(M_ref), Dp = padded(D), Dvp = padded(Dv);
  const A scale = static_cast<A>(scale_in);
  const bool has_factor = !factor.empty();  // [B·S] map-gradient factors (empty: no loss gradient)
  // A_r is needed for the reference's own gradient, and for a per-head loss's d = A_t − A_r.
  const bool with_ref = !detach_reference || (has_factor && !mean_heads);
  const bool has_dout = dout.has_value(), has_dmaps = dmaps.has_value();
  const A map_alpha = mean_heads ? A(1) / static_cast<A>(H) : A(1);
  const Strided<T> q_(q), k_(k), v_(v), kr_(k_ref), dq_(dq), dk_(dk), dv_(dv);
  const Strided<int64_t> tok(tokens), rtok(ref_tokens);
  std::optional<Strided<T>> dout_, dkr_;
  std::optional<Strided<A>> dmaps_, diff_;
  if (has_dout) dout_.emplace(*dout);
  if (!detach_reference) dkr_.emplace(dk_ref);
  if (has_dmaps) dmaps_.emplace(*dmaps);
  if (mean_heads) diff_.emplace(diff);
  const int64_t pair_work = N * ((M + (with_ref ? M_ref : 0)) * 3 * D + 2 * M * Dv);
  at::parallel_for(0, B * H, grain(pair_work), [&](int64_t begin, int64_t end) {
    std::vector<A> k_rows(M * Dp, A(0)), k_cols(Dp * Mp, A(0)), v_cols(Dvp * Mp, A(0));
    std::vector<A> kref_rows, kref_cols, qrow(Dp, A(0)), dorow(Dvp, A(0)), pt(Mp), dpt(Mp), pr, dpr;
    std::vector<A> dqrow(Dp), dqref(Dp), gt(S), gr(S), dkacc, dvacc, dkracc, bias_row, ref_bias_row;
    if (with_ref) {
      kref_cols.assign(Dp * Mrp, A(0));
      pr.resize(Mrp);
    }
    if (!detach_reference) {
      kref_rows.assign(M_ref * Dp, A(0));
      dpr.resize(Mrp);
    }
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      load_block(k_, b, h, M, D, k_rows.data(), k_cols.data());
      load_block(v_, b, h, M, Dv, static_cast<A*>(nullptr), v_cols.data());
      if (with_ref) {
        load_block(kr_, b, h, M_ref, D, detach_reference ? static_cast<A*>(nullptr) : kref_rows.data(),
                   kref_cols.data());
      }
      const A* bt = load_bias(bias, b, h, M, bias_row);
      const A* br = with_ref ? load_bias(ref_bias, b, h, M_ref, ref_bias_row) : nullptr;
      dkacc.assign(M * Dp, A(0));
      dvacc.assign(M * Dvp, A(0));
      dkracc.assign(detach_reference ? 0 : M_ref * Dp, A(0));
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t d = 0; d < D; ++d) {
          qrow[d] = static_cast<A>(q_(b, h, n, d)) * scale;
        }
        scores(qrow.data(), k_cols.data(), D, M, bt, pt.data());
        softmax_row(pt.data(), M);
        if (with_ref) {
          scores(qrow.data(), kref_cols.data(), D, M_ref, br, pr.data());
          softmax_row(pr.data(), M_ref);
        }
        // the map gradients of this row: G_t onto P_t's selected columns, G_r onto P_r's
        for (int64_t s = 0; s < S; ++s) {
          A g_t = 0, g_r = 0;
          if (has_factor) {
            const A d = mean_heads ? (*diff_)(b, n, s) : pt[tok(b, s)] - pr[rtok(b, s)];
            const A fd = d * static_cast<A>(factor[b * S + s]);
            g_t = fd;
            g_r = -fd;
          }
          if (has_dmaps) {
            g_t += (mean_heads ? (*dmaps_)(b, n, s) : (*dmaps_)(b, h, n, s)) * map_alpha;
          }
          gt[s] = g_t;
          gr[s] = g_r;
        }
        if (has_dout) {
          for (int64_t e = 0; e < Dv; ++e) {
            dorow[e] = static_cast<A>((*dout_)(b, h, n, e));
          }
          combine_rows(dorow.data(), v_cols.data(), Dv, Mp, dpt.data());
          add_outer(dvacc.data(), pt.data(), dorow.data(), M, Dvp);
        } else {
          std::fill(dpt.begin(), dpt.end(), A(0));
        }
        for (int64_t s = 0; s < S; ++s) {
          dpt[tok(b, s)] += gt[s];
        }
        softmax_grad(pt.data(), dpt.data(), M);  // dpt now holds dS_t
        combine_rows(dpt.data(), k_rows.data(), M, Dp, dqrow.data());
        add_outer(dkacc.data(), dpt.data(), qrow.data(), M, Dp);
        if (!detach_reference) {
          std::fill(dpr.begin(), dpr.end(), A(0));
          for (int64_t s = 0; s < S; ++s) {
            dpr[rtok(b, s)] += gr[s];
          }
          softmax_grad(pr.data(), dpr.data(), M_ref);
          combine_rows(dpr.data(), kref_rows.data(), M_ref, Dp, dqref.data());
          for (int64_t d = 0; d < D; ++d) {
            dqrow[d] += dqref[d];
          }
          add_outer(dkracc.data(), dpr.data(), qrow.data(), M_ref, Dp);
        }
        for (int64_t d = 0; d < D; ++d) {
          dq_(b, h, n, d) = static_cast<T>(dqrow[d] * scale);
        }
      }
      for (int64_t j = 0; j < M; ++j) {
        for (int64_t d = 0; d < D; ++d) {
          dk_(b, h, j, d) = static_cast<T>(dkacc[j * Dp + d]);
        }
        for (int64_t e = 0; e < Dv; ++e) {
          dv_(b, h, j, e) = static_cast<T>(dvacc[j * Dvp + e]);
        }
      }
      if (!detach_reference) {
        for (int64_t j = 0; j < M_ref; ++j) {
          for (int64_t d = 0; d < D; ++d) {
            (*dkr_)(b, h, j, d) = static_cast<T>(dkracc[j * Dp + d]);
          }
        }
      }
    }
  });
}

}  // namespace

bool small_layer_applies(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_ref,
                         const Tensor& tokens, int64_t max_work) {
  const at::ScalarType t = q.scalar_type();
  const bool float_type = t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
  if (max_work <= 0 || !q.device().is_cpu() || !float_type || q.size(2) == 0 || tokens.size(1) == 0) {
    return false;
  }
  // counted as the loops do it, on the padded buffers (a head dim of 4 costs as much as one of 16)
  const int64_t pairs = q.size(0) * q.size(1), N = q.size(2), D = padded(q.size(3));
  const int64_t M = padded(k.size(2)), M_ref = padded(k_ref.size(2)), Dv = padded(v.size(3));
  const int64_t work = pairs * N * ((M + M_ref) * D + M * Dv);
  return work <= max_work;
}

std::vector<Tensor> small_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_ref,
                                  const OptTensor& bias, const OptTensor& ref_bias, const Tensor& tokens,
                                  const Tensor& ref_tokens, const OptTensor& weights, double scale,
                                  bool mean_heads, bool return_maps) {
  at::NoGradGuard no_grad;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), S = tokens.size(1);
  check_tokens(tokens, k.size(2), "tokens");
  check_tokens(ref_tokens, k_ref.size(2), "ref_tokens");
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  const at::TensorOptions acc_options = q.options().dtype(acc);
  Tensor out = at::empty({B, N, H, v.size(3)}, q.options()).transpose(1, 2);
  Tensor selected = at::empty({B, H, N, 2 * S}, acc_options);
  const OptTensor bias_acc = to_acc(bias, acc), ref_bias_acc = to_acc(ref_bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "semfid_small_forward", [&] {
    forward_loops<scalar_t>(q, k, v, k_ref, bias_acc, ref_bias_acc, tokens, ref_tokens, scale, out,
                            selected);
  });
  // distinct empty tensors: a custom op's outputs must not alias one another
  auto nothing = [&] { return at::empty({0}, acc_options); };
  Tensor maps = !return_maps ? nothing()
                : mean_heads ? at::empty({B, N, S}, acc_options)
                             : at::empty({B, H, N, S}, acc_options);
  Tensor diff = mean_heads ? at::empty({B, N, S}, acc_options) : nothing();
  Tensor loss = at::empty({B}, acc_options);
  const OptTensor weights_acc = to_acc(weights, acc);
  if (acc == at::kDouble) {
    reduce_selected<double>(selected, weights_acc, mean_heads, return_maps, maps, diff, loss);
  } else {
    reduce_selected<float>(selected, weights_acc, mean_heads, return_maps, maps, diff, loss);
  }
  return {out, nothing(), nothing(), loss, maps, diff};
}

std::vector<Tensor> small_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_ref,
                                   const OptTensor& bias, const OptTensor& ref_bias, const Tensor& tokens,
                                   const Tensor& ref_tokens, const OptTensor& weights, double scale,
                                   bool mean_heads, bool detach_reference, const Tensor& diff,
                                   const OptTensor& dout, const OptTensor& dloss, const OptTensor& dmaps) {
  at::NoGradGuard no_grad;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), S = tokens.size(1);
  check_tokens(tokens, k.size(2), "tokens");
  check_tokens(ref_tokens, k_ref.size(2), "ref_tokens");
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  Tensor dk_ref = detach_reference ? at::empty({0}, q.options()) : at::empty_like(k_ref);
  // factor[b·S + s] turns d into the map gradient: 2·dloss[b]·w[b, s] / (N·H) with w = 1/S for
  // rectangular rows (per head: H_red = H; head mean: each head's P carries 1/H of the mean).
  std::vector<double> factor;
  if (dloss.has_value()) {
    const Tensor c = dloss->to(at::kDouble).contiguous();
    const Tensor w = weights.has_value() ? weights->to(at::kDouble).contiguous() : Tensor();
    factor.resize(B * S);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t s = 0; s < S; ++s) {
        const double ws = w.defined() ? w.data_ptr<double>()[b * S + s] : 1.0 / static_cast<double>(S);
        factor[b * S + s] = c.data_ptr<double>()[b] * (2.0 / static_cast<double>(N * H)) * ws;
      }
    }
  }
  const OptTensor bias_acc = to_acc(bias, acc), ref_bias_acc = to_acc(ref_bias, acc);
  const OptTensor dmaps_acc = to_acc(dmaps, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "semfid_small_backward", [&] {
    backward_loops<scalar_t>(q, k, v, k_ref, bias_acc, ref_bias_acc, tokens, ref_tokens, scale, mean_heads,
                             detach_reference, diff, dout, factor, dmaps_acc, dq, dk, dv, dk_ref);
  });
  return {dq, dk, dv, dk_ref};
}

}  // namespace semfid_cpu
