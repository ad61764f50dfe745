// What the ops' argument checks and dtype switches share: the three float dtypes the CPU
// kernels take (float32, float16, bfloat16), a switch from such a dtype to its C++ type,
// an array's shape as text for error messages, and the quantized ops' checks of bits,
// group size, scales and biases.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "mlx/array.h"

namespace tiny_llm {

inline bool is_float(const mlx::core::Dtype& t) {
  return t == mlx::core::float32 || t == mlx::core::float16 || t == mlx::core::bfloat16;
}

// f(T{}) with T the C++ type of float dtype t: float, mx::float16_t or mx::bfloat16_t.
template <typename F>
void with_float_type(const mlx::core::Dtype& t, F&& f) {
  if (t == mlx::core::float16) {
    f(mlx::core::float16_t{});
  } else if (t == mlx::core::bfloat16) {
    f(mlx::core::bfloat16_t{});
  } else {
    f(float{});
  }
}

// A shape as Python prints its tuple: "(2, 3, 4)", "(4,)".
inline std::string shape_str(const mlx::core::Shape& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}
inline std::string shape_str(const mlx::core::array& a) { return shape_str(a.shape()); }

// Throws std::invalid_argument("<op>: ...") unless 4 or 8 bits in groups of 32, 64 or 128,
// worded as impl.quantize.check_bits_and_group_size.
inline void check_bits_and_group_size(const std::string& op, int group_size, int bits) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(op + ": " + what); };
  if (bits != 4 && bits != 8) fail("bits must be 4 or 8, got " + std::to_string(bits));
  if (group_size != 32 && group_size != 64 && group_size != 128)
    fail("group_size must be 32, 64 or 128, got " + std::to_string(group_size));
}

// Throws std::invalid_argument("<op>: ...") unless w_q (..., N, K * bits / 32) holds K, a positive
// multiple of group_size, values per row and scales/biases are float (..., N, K / group_size),
// worded as impl.quantize.check_scales_and_biases.
inline void check_scales_and_biases(const std::string& op, const mlx::core::array& w_q,
                                    const mlx::core::array& scales, const mlx::core::array& biases,
                                    int group_size, int bits) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(op + ": " + what); };
  const int64_t K = int64_t(w_q.shape(-1)) * 32 / bits;
  if (K == 0 || K % group_size != 0)
    fail("K = " + std::to_string(K) + " must be a positive multiple of group_size = " + std::to_string(group_size));
  mlx::core::Shape sb = w_q.shape();  // (..., N, K / group_size)
  sb.back() = int(K / group_size);
  if (scales.shape() != sb || biases.shape() != sb)
    fail("scales and biases must be " + shape_str(sb) + ", got " + shape_str(scales.shape()) + " and " +
         shape_str(biases.shape()));
  if (!is_float(scales.dtype()) || !is_float(biases.dtype()))
    fail("scales and biases must be float32, float16 or bfloat16");
}

}  // namespace tiny_llm
