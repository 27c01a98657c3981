// e^v for v <= 0 in float32, written for the auto-vectoriser: the exp of the C++ core's softmax
// loops (subject_small.cpp, row_exp.cpp).
//
// e^v = 2^n·p(r) with n = round(v·log2 e), r = v − n·ln 2 (ln 2 split in two parts for an exact
// product) and p(r) = 1 + r + r²·P5(r), P5 the degree-5 polynomial of Cephes' expf: relative error
// under 1e-7 on [-88, 0] (measured), about float32's half ulp. v is clamped at -88, where n = -127
// makes the bit pattern of 2^n, and so the result, exactly 0: masked keys (-inf, -10000) get P = 0.
// A NaN stays NaN. Arguments a rounding error above 0 are fine (n = 0 there).

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace semfid_cpu {

inline float exp_nonpositive_one(float x) {
  const float v = std::max(x, -88.0f);
  // round(v·log2 e) for v <= 0: truncation (toward zero) of a value shifted down by 1/2
  const int32_t n = static_cast<int32_t>(v * 1.44269504088896341f - 0.5f);
  const float nf = static_cast<float>(n);
  const float r = (v - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

}  // namespace semfid_cpu
