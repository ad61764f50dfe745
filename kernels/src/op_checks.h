// What the ops' argument checks and dtype switches share: the three float dtypes the CPU
// kernels take (float32, float16, bfloat16), a switch from such a dtype to its C++ type,
// and an array's shape as text for error messages.
#pragma once

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

}  // namespace tiny_llm
