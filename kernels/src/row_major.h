// The data of an MLX array in row-major order, for kernels that read it flat.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "mlx/array.h"

namespace tiny_llm {

// Its own buffer when row-contiguous (the usual case), else a gathered copy in
// `tmp` (e.g. x[:, -1] of a (B, L, K) array, or a transposed view).
inline const void* row_major(const mlx::core::array& a, std::vector<char>& tmp) {
  if (a.flags().row_contiguous) return a.data<void>();
  const size_t item = a.itemsize();
  const int nd = a.ndim();  // >= 1: a scalar is row-contiguous
  tmp.resize(a.size() * item);
  if (a.size() == 0) return tmp.data();
  // Row by row of the last axis (a strided run), the outer index stepped like an odometer.
  const int64_t inner = a.shape(nd - 1), step = a.strides()[nd - 1];
  const size_t rows = a.size() / size_t(inner);
  std::vector<int> idx(nd, 0);
  const char* src = a.data<char>();
  char* dst = tmp.data();
  for (size_t r = 0; r < rows; ++r, dst += inner * item) {
    int64_t off = 0;
    for (int d = 0; d + 1 < nd; ++d) off += idx[d] * a.strides()[d];
    const char* s = src + off * int64_t(item);
    if (item == 4) {
      for (int64_t i = 0; i < inner; ++i) std::memcpy(dst + i * 4, s + i * step * 4, 4);
    } else {
      for (int64_t i = 0; i < inner; ++i) std::memcpy(dst + i * item, s + i * step * int64_t(item), item);
    }
    for (int d = nd - 2; d >= 0 && ++idx[d] == a.shape(d); --d) idx[d] = 0;
  }
  return tmp.data();
}

// row_major of each float32 array in `arrays`, as float pointers; tmp holds the copies it needs.
inline std::vector<const float*> row_major_floats(const std::vector<mlx::core::array>& arrays,
                                                  std::vector<std::vector<char>>& tmp) {
  tmp.resize(arrays.size());
  std::vector<const float*> out(arrays.size());
  for (size_t j = 0; j < arrays.size(); ++j) out[j] = static_cast<const float*>(row_major(arrays[j], tmp[j]));
  return out;
}

}  // namespace tiny_llm
