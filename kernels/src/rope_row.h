// One head's row rotated by RoPE, shared by tiny_llm_kernels.rope and cached_attention.
// Every file that includes it is compiled with -ffp-contract=off (CMakeLists.txt): a*c - b*s
// then rounds as the twin's (impl.rope.RoPE) separate multiply and subtract do.
#pragma once

#include <cstdint>

namespace tiny_llm {

// row: D values of type T, `step` elements apart; c, s: the position's cos and sin (D/2
// each, cs and ss apart). Pairs (a, b) = (x_i, x_{i+D/2}) (half-split) or (x_2i, x_2i+1)
// (traditional) -> (a cos - b sin, a sin + b cos) in fp32, rounded to U (T by default) into
// y (D, contiguous).
template <typename T, typename U = T>
inline void rotate_row(const T* row, int64_t step, const float* c, int64_t cs, const float* s, int64_t ss, int half,
                       bool traditional, U* y) {
  const int64_t first = traditional ? 2 * step : step, second = traditional ? step : half * step;
  const int out_first = traditional ? 2 : 1, out_second = traditional ? 1 : half;
  for (int i = 0; i < half; ++i) {
    const float a = float(row[i * first]), b = float(row[i * first + second]);
    y[i * out_first] = U(a * c[i * cs] - b * s[i * ss]);
    y[i * out_first + out_second] = U(a * s[i * ss] + b * c[i * cs]);
  }
}

}  // namespace tiny_llm
