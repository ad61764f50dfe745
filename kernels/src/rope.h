// tiny_llm_kernels.rope: rotary position embedding from precomputed cos/sin
// tables, one MLX primitive instead of the ~14 array ops of its twin (impl.rope.RoPE).
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// x (N, L, H, D) fp32/fp16/bf16; cos, sin (S, D/2) fp32 tables of
// positions [0, S). Position l of every sequence is offset + l (offset + L <= S).
// Pairs: (x_i, x_{i+D/2}) (half-split, traditional=false) or (x_2i, x_2i+1).
// (a, b) -> (a cos - b sin, a sin + b cos) in fp32 -> (N, L, H, D) in x's dtype.
mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin, int offset, bool traditional,
               mx::StreamOrDevice s = {});

class RoPEPrimitive : public mx::UnaryPrimitive {
 public:
  RoPEPrimitive(mx::Stream stream, int offset, bool traditional)
      : mx::UnaryPrimitive(stream), offset_(offset), traditional_(traditional) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "TinyLLMRoPE"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const RoPEPrimitive&>(other);
    return offset_ == o.offset_ && traditional_ == o.traditional_;
  }

 private:
  int offset_;
  bool traditional_;
};

}  // namespace tiny_llm
