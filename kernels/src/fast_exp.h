// What the training kernels (activations.cpp, causal_attention.cpp) share: exp(x) for x <= 0 as a
// short polynomial the compiler vectorizes, and a sum in a fixed order of 16 lanes. Internal
// linkage: each TU gets its own copy.
//
// exp(x) for x <= 0, the only inputs the kernels need (softmax's x - max, sigmoid's -|x|, attention's
// s - max and s - logsumexp):
//   n = x log2(e) rounded to the nearest integer, r = x - n ln2 (ln2 in two parts, Cody and Waite's trick, so r
//   keeps its bits), exp(r) by Horner's rule on the degree-7 Taylor polynomial (|r| <= ln2 / 2:
//   the first term left out is below 2^-27), times 2^n made from its exponent bits.
//   x below -87.33 (exp under FLT_MIN) gives 0, so a masked -inf score gives exactly 0; NaN stays
//   NaN. Measured against float64: at most 2 ulps (spec/day_4_3_backprop.py).
// Every TU that includes this is compiled with -ffp-contract=off (no fused multiply-add anywhere),
// and its loops are cloned (TINY_LLM_CLONES, clones.h): each clone does the same roundings in the
// same order, so all give the same bits.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "clones.h"

namespace tiny_llm {
namespace {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;       // ln 2's first 11 bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;    // ln 2 - kLn2Hi
constexpr float kExpMin = -87.3365447505531f;  // ln(FLT_MIN): below it, 0
constexpr float kRound = 12582912.0f;            // 1.5 * 2^23

// exp(x) for x <= 0 (see the top of the file); inlined into each loop.
inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  const bool under = x < kExpMin;
  const float xc = under ? kExpMin : x;  // NaN passes (NaN < a is false)
  // Round to nearest by adding and taking away 1.5 * 2^23 (|x log2 e| < 2^22): no floor() call,
  // which the baseline clone could not vectorize. -ffp-contract=off keeps both roundings.
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n, n in [-126, 0]: the exponent field n + 127. A NaN's n converts to garbage; p is NaN.
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  const float y = p * std::bit_cast<float>(under ? 0 : e);
  return under ? 0.0f : y;
}

// sigmoid(x) = 1 / (1 + exp(-x)) from e = exp(-|x|): 1 / (1 + e) for x >= 0, e / (1 + e) below.
// NaN stays NaN (e is NaN). The sigmoid of every kernel that needs one (training's, SwiGLU's).
inline __attribute__((always_inline)) float sigmoid_fast(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}

// f(0) + ... + f(n-1) in 16 lanes (term i to lane i % 16), then the lanes in a fixed tree: the
// same order in every clone, and a loop the compiler can vectorize.
template <class F>
inline __attribute__((always_inline)) float sum16_of(int n, F&& f) {
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += f(i + j);
  for (int j = 0; i < n; ++i, ++j) acc[j] += f(i);
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// x[0] + ... + x[n-1] in sum16_of's order.
inline __attribute__((always_inline)) float sum16(const float* x, int n) {
  return sum16_of(n, [x](int i) { return x[i]; });
}

}  // namespace
}  // namespace tiny_llm
