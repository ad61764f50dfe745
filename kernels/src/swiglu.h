// tiny_llm_kernels.swiglu: silu(gate) * up from the stacked gate/up projection's
// output, one MLX primitive instead of the 5 array ops of its twin
// (impl.layer_kernels.swiglu_mlx: two slices, sigmoid, two multiplies).
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace tiny_llm {

namespace mx = mlx::core;

// x (..., 2I) fp32/fp16/bf16 = [gate | up] -> (..., I) in x's dtype:
// gate * sigmoid(gate) * up, each step in fp32 and rounded to x's dtype, as the twin's ops are.
mx::array swiglu(const mx::array& x, mx::StreamOrDevice s = {});

class SwiGLUPrimitive : public mx::UnaryPrimitive {
 public:
  explicit SwiGLUPrimitive(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "TinyLLMSwiGLU"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace tiny_llm
