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
  const int nd = a.ndim();
  tmp.resize(a.size() * item);
  std::vector<int> idx(nd, 0);
  const char* src = a.data<char>();
  for (size_t i = 0; i < a.size(); ++i) {
    int64_t off = 0;
    for (int d = 0; d < nd; ++d) off += idx[d] * a.strides()[d];
    std::memcpy(tmp.data() + i * item, src + off * int64_t(item), item);
    for (int d = nd - 1; d >= 0 && ++idx[d] == a.shape(d); --d) idx[d] = 0;
  }
  return tmp.data();
}

}  // namespace tiny_llm
