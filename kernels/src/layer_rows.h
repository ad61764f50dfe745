// The row loops of RMSNorm and SwiGLU, shared by their own kernels (rms_norm.cpp,
// swiglu.cpp) and by quantized_matmul's fused prologues: every file that includes this
// is compiled with the same flags (-ffp-contract=off among them), so a fused prologue rounds
// exactly as the kernel does.
// T: float, mx::float16_t or mx::bfloat16_t; every arithmetic step in fp32.
#pragma once

#include <cmath>
#include <type_traits>

#include "clones.h"
#include "fast_exp.h"

namespace tiny_llm {

// sum(x^2) over a row of D in fast_exp.h's sum16_of order (16 lanes, then a fixed tree): a loop
// that vectorizes, where one running sum stayed a scalar chain.
template <typename T>
inline __attribute__((always_inline)) float sum_squares(const T* x, int D) {
  return sum16_of(D, [x](int i) { return float(x[i]) * float(x[i]); });
}

namespace {  // each file its own copy (target_clones makes an ifunc per copy)
// One fp32 row of RMSNorm, cloned per instruction set (the same bits in each: -ffp-contract=off).
[[maybe_unused]] TINY_LLM_CLONES void rms_norm_row_f32(const float* x, const float* w, float* y, int D, float eps) {
  const float rms = 1.0f / std::sqrt(sum_squares(x, D) * (1.0f / D) + eps);
  for (int i = 0; i < D; ++i) y[i] = x[i] * rms * w[i];
}
}  // namespace

// y = x / sqrt(mean(x^2) + eps) * w per row of D; (x * rms) is rounded to T before the
// product with w, as the twin (impl.norm.RMSNorm) does.
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, long rows, int D, float eps) {
  for (long r = 0; r < rows; ++r, x += D, y += D) {
    if constexpr (std::is_same_v<T, float>) {
      rms_norm_row_f32(x, w, y, D, eps);
    } else {
      const float rms = 1.0f / std::sqrt(sum_squares(x, D) * (1.0f / D) + eps);
      for (int i = 0; i < D; ++i) y[i] = T(float(T(float(x[i]) * rms)) * float(w[i]));
    }
  }
}

// One fp32 row of SwiGLU, cloned per instruction set (the same bits in each: -ffp-contract=off):
// the training kernels' sigmoid (fast_exp.h's sigmoid_fast, exp within 2 ulps), so the row is
// silu_mul's forward; a loop of it vectorizes, where one calling std::exp stayed scalar (SwiGLU
// was 8% of a prefill's time).
namespace {  // each file its own copy (target_clones makes an ifunc per copy)
[[maybe_unused]] TINY_LLM_CLONES void swiglu_row_f32(const float* gate, const float* up, float* y, int I) {
  for (int i = 0; i < I; ++i) y[i] = gate[i] * sigmoid_fast(gate[i]) * up[i];
}
}  // namespace

// y = silu(gate) * up per row of x = [gate | up] (2I) -> (I). The twin
// (impl.layer_kernels.swiglu_mlx) rounds to T after the sigmoid, after gate * sigmoid
// and after the product with up: so does this (for fp32 each rounding is the operation's own).
template <typename T>
void swiglu_rows(const T* x, T* y, long rows, int I) {
  for (long r = 0; r < rows; ++r, x += 2 * I, y += I) {
    if constexpr (std::is_same_v<T, float>) {
      swiglu_row_f32(x, x + I, y, I);
    } else {
      for (int i = 0; i < I; ++i) {
        const float g = float(x[i]);
        const T sig = T(sigmoid_fast(g));
        y[i] = T(float(T(g * float(sig))) * float(x[I + i]));
      }
    }
  }
}

}  // namespace tiny_llm
