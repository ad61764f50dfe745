// Writing a cache in place, as vLLM's cache write is, shared by cached_attention.cpp (the
// contiguous cache) and paged_attention.cpp (the pools).
#pragma once

#include <cstddef>
#include <memory>

#include "mlx/allocator.h"
#include "mlx/array.h"

namespace tiny_llm {

// How many arrays hold `a` (its descriptor): MLX has no accessor for the count, and an
// mx::array is that one shared pointer, nothing else.
inline long holders(const mlx::core::array& a) {
  static_assert(sizeof(mlx::core::array) == sizeof(std::shared_ptr<void>), "mx::array is one shared_ptr");
  return reinterpret_cast<const std::shared_ptr<void>&>(a).use_count();
}

// `out` takes `in`'s buffer when nothing else can see it. MLX's own test (is_donatable: one
// holder) cannot pass on a node with several outputs, since each output holds the inputs; so:
// held only by this node's outputs (not by the caller's Python variable, not by another node of
// the graph), and no other array views the buffer (say, a slice of the old cache kept across a
// rewind). Else `out` gets a new buffer and the task copies `in` into it first; returns whether.
inline bool take_buffer(const mlx::core::array& in, mlx::core::array& out, size_t n_outputs) {
  if (holders(in) == long(n_outputs) && in.data_shared_ptr().use_count() == 1 && in.data_shared_ptr()->is_owned() &&
      in.flags().row_contiguous) {
    out.copy_shared_buffer(in);
    return false;
  }
  out.set_data(mlx::core::allocator::malloc(out.nbytes()));
  return true;
}

}  // namespace tiny_llm
