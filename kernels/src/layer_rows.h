// The row loops of RMSNorm and SwiGLU, shared by their own kernels (rms_norm.cpp,
// swiglu.cpp) and by quantized_matmul's fused prologues: every file that includes this
// is compiled with the same flags, so a fused prologue rounds exactly as the kernel does.
// T: float, mx::float16_t or mx::bfloat16_t; every arithmetic step in fp32.
#pragma once

#include <cmath>

namespace tiny_llm {

// y = x / sqrt(mean(x^2) + eps) * w per row of D; (x * rms) is rounded to T before the
// product with w, as the twin (impl.norm.RMSNorm) does.
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, long rows, int D, float eps) {
  for (long r = 0; r < rows; ++r, x += D, y += D) {
    float sum = 0.0f;
    for (int i = 0; i < D; ++i) sum += float(x[i]) * float(x[i]);
    const float rms = 1.0f / std::sqrt(sum * (1.0f / D) + eps);
    for (int i = 0; i < D; ++i) y[i] = T(float(T(float(x[i]) * rms)) * float(w[i]));
  }
}

// y = silu(gate) * up per row of x = [gate | up] (2I) -> (I). The twin
// (impl.layer_kernels.swiglu_mlx) rounds to T after the sigmoid, after gate * sigmoid
// and after the product with up: so does this.
template <typename T>
void swiglu_rows(const T* x, T* y, long rows, int I) {
  for (long r = 0; r < rows; ++r, x += 2 * I, y += I)
    for (int i = 0; i < I; ++i) {
      const float g = float(x[i]);
      const T sig = T(1.0f / (1.0f + std::exp(-g)));
      y[i] = T(float(T(g * float(sig))) * float(x[I + i]));
    }
}

}  // namespace tiny_llm
